"""What a Hugging Face ``config.json`` says about a checkpoint's raw tensors.

Weights alone do not say their orientation: GPT-2 and the models that reuse
its layers (``transformers.pytorch_utils.Conv1D``) store ``W`` as ``(in, out)``,
and a square ``c_proj`` looks the same either way. ``model_type`` names the
family, and with it which parameters are ``Conv1D``. ``save_pretrained``
leaves out an output embedding tied to the input embedding
(``tie_word_embeddings``, true unless the config says otherwise); the tie is
listed so that both layers exist, each naming the other.

The readers of the files ``save_pretrained`` writes (safetensors, sharded or
not, and ``pytorch_model.bin``) take :class:`ReadsModelConfig`: a
``config.json`` naming a ``model_type`` in the weights' directory presents
their tensors the same way (:class:`ConfiguredHandle`). The Trainer reader
opens them raw (:meth:`ReadsModelConfig.open_raw`) and applies the conventions
itself, so nothing is transposed twice.

A model source (``ingest --model``) knows more than any config: its ``Conv1D``
modules, by parameter name. :class:`ModuleOrientedReader` wraps any reader so
that those weights are presented ``(out, in)`` too (orientation ``"module"``),
whatever the file or its config says; a weight a config already turned keeps
``"config"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError
from gramlin_analyze.io.base import CheckpointHandle, CheckpointMeta, CheckpointReader, TensorInfo
from gramlin_analyze.io.names import common_wrapper_prefix, split_param_name
from gramlin_analyze.io.remote import RemotePath

__all__ = [
    "CONV1D_MODULES",
    "TIED_OUTPUTS",
    "ConfiguredHandle",
    "Conventions",
    "HFTensorInfo",
    "ModuleOrientedReader",
    "ReadsModelConfig",
    "conventions_for",
    "read_model_config",
]

_GPT2_CONV1D = ("c_attn", "q_attn", "c_proj", "c_fc")

#: ``model_type`` -> module-name endings whose ``weight`` is a ``Conv1D`` ``(in, out)``
#: (transformers' modeling code: every ``Conv1D(...)`` it builds).
CONV1D_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": _GPT2_CONV1D,
    "imagegpt": _GPT2_CONV1D,
    "decision_transformer": _GPT2_CONV1D,
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "clvp": ("mlp.c_fc", "mlp.c_proj"),
}

#: ``model_type`` -> ``{output parameter: input embedding}`` tied when the config ties them
#: (the models' ``_tied_weights_keys``).
TIED_OUTPUTS: dict[str, dict[str, str]] = {
    "gpt2": {"lm_head.weight": "transformer.wte.weight"},
    "openai-gpt": {"lm_head.weight": "transformer.tokens_embed.weight"},
    "bert": {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"},
}

#: Architecture names (``config.json`` ``architectures``) with a language-model head:
#: only these have an output embedding that a tie may have left out.
_LM_HEADS = ("LMHead", "MaskedLM", "CausalLM", "PreTraining", "DoubleHeads")

#: Input embeddings an ``lm_head`` of another family is tied to.
_EMBEDDING_ENDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class HFTensorInfo(TensorInfo):
    """A tensor as a Hugging Face checkpoint presents it, with how that was decided.

    ``orientation`` is ``"config"`` when ``config.json`` names a ``model_type``
    (transformers' modeling code then says which weights are ``Conv1D``),
    ``"module"`` for a weight the model source's ``Conv1D`` module turned, else
    ``"default"``; ``tied_to`` names the tensor this one shares its values with.
    """

    orientation: str = "default"
    tied_to: str | None = None


def read_json_object(path: Path, written_by: str) -> dict | None:
    """A JSON object file of a checkpoint directory, None when absent; one clear error
    naming the file when it is not one (``written_by`` says what should have written it)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointFormatError(
            f"{path}: not valid JSON ({err}); the file is truncated or corrupt; re-copy the "
            "checkpoint directory"
        ) from err
    if not isinstance(doc, Mapping):
        raise CheckpointFormatError(
            f"{path}: expected a JSON object as written by {written_by}, "
            f"found {type(doc).__name__}; re-copy the checkpoint directory"
        )
    return dict(doc)


def read_model_config(directory: Path) -> dict | None:
    """``config.json`` of a checkpoint directory, None when absent."""
    return read_json_object(directory / "config.json", "transformers' save_pretrained")


def _is_conv1d(name: str, endings: tuple[str, ...]) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and any(module == e or module.endswith("." + e) for e in endings)


def _ties(model_type: str | None, raw: Mapping[str, TensorInfo]) -> dict[str, str]:
    """``{output parameter: input embedding}`` of the family's ties whose embedding is present."""
    known = TIED_OUTPUTS.get(model_type or "")
    if known:
        return {out: src for out, src in known.items() if src in raw}
    if "lm_head.weight" in raw:  # both saved: no sign of a tie but the values
        return {}
    embeddings = [n for n in raw if n.endswith(_EMBEDDING_ENDINGS) and len(raw[n].shape) == 2]
    return {"lm_head.weight": embeddings[0]} if len(embeddings) == 1 else {}


@dataclass(frozen=True)
class Conventions:
    """How one checkpoint's raw tensors become gramlin's: transposed, tied, or as they are.

    ``by_module`` (a subset of ``transposed``) are the weights turned because the
    model source's module is a ``Conv1D``; the others keep the orientation (and
    tie) their raw listing already says, else ``orientation``.
    """

    orientation: str = "default"
    transposed: frozenset[str] = frozenset()
    by_module: frozenset[str] = frozenset()
    virtual: Mapping[str, str] = field(default_factory=dict)  # listed name -> raw name
    tied: Mapping[str, str] = field(default_factory=dict)  # both directions

    def source_of(self, name: str) -> str:
        """The raw tensor a listed name is read from."""
        return self.virtual.get(name, name)

    def present(self, raw: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The raw tensor list as read: ``(out, in)`` shapes, tied outputs added."""
        out: dict[str, TensorInfo] = {}
        for name, info in raw.items():
            out[name] = self._info(name, info)
        for name, src in self.virtual.items():
            out[name] = replace(self._info(src, raw[src]), name=name, tied_to=src)
        return out

    def _info(self, name: str, info: TensorInfo) -> HFTensorInfo:
        shape, layout = tuple(info.shape), info.source_layout
        if name in self.transposed:
            shape, layout = shape[::-1], "in_out"
        return HFTensorInfo(
            name,
            shape,
            info.dtype,
            source_layout=layout,
            orientation="module"
            if name in self.by_module
            else getattr(info, "orientation", self.orientation),
            tied_to=self.tied.get(name, getattr(info, "tied_to", None)),
        )


def _module_weights(
    raw: Mapping[str, TensorInfo], layers: frozenset[str], done: frozenset[str]
) -> frozenset[str]:
    """Raw ``(in, out)`` weights of the layers ``layers`` names (normalized, as
    :func:`~gramlin_analyze.io.names.split_param_name` gives them), unless in ``done``."""
    if not layers:
        return frozenset()
    prefix = common_wrapper_prefix(raw)

    def turned(name: str, info: TensorInfo) -> bool:
        layer, role = split_param_name(name, prefix)
        return role == "weight" and layer in layers and len(info.shape) == 2

    return frozenset(
        n
        for n, info in raw.items()
        if n not in done and info.source_layout != "in_out" and turned(n, info)
    )


def conventions_for(
    config: Mapping | None,
    raw: Mapping[str, TensorInfo],
    conv1d_layers: Iterable[str] = (),
) -> Conventions:
    """The conventions ``config`` declares for the raw tensors ``raw``.

    ``conv1d_layers`` names layers whose module the model source says is a
    ``Conv1D``: their weights are turned too (orientation ``"module"``) unless
    the config turned them already.
    """
    if config is None:
        by_module = _module_weights(raw, frozenset(conv1d_layers), frozenset())
        return Conventions(transposed=by_module, by_module=by_module)
    model_type = config.get("model_type")
    model_type = model_type if isinstance(model_type, str) else None
    endings = CONV1D_MODULES.get(model_type or "", ())
    transposed = frozenset(
        n for n, info in raw.items() if len(info.shape) == 2 and _is_conv1d(n, endings)
    )
    by_module = _module_weights(raw, frozenset(conv1d_layers), transposed)
    archs = config.get("architectures")
    lm_head = isinstance(archs, list) and any(
        isinstance(a, str) and any(h in a for h in _LM_HEADS) for a in archs
    )
    ties = _ties(model_type, raw) if config.get("tie_word_embeddings", True) is not False else {}
    ties = {out: src for out, src in ties.items() if out in raw or lm_head}
    return Conventions(
        orientation="config" if model_type else "default",
        transposed=transposed | by_module,
        by_module=by_module,
        virtual={out: src for out, src in ties.items() if out not in raw},
        tied={**ties, **{src: out for out, src in ties.items()}},
    )


class ConfiguredHandle(CheckpointHandle):
    """An open checkpoint whose tensors are presented as a ``config.json`` declares
    (``Conv1D`` weights ``(out, in)``, declared ties listed) and, with ``conv1d_layers``,
    as the model source's ``Conv1D`` modules say; ``inner`` reads the raw ones."""

    def __init__(
        self,
        inner: CheckpointHandle,
        config: Mapping | None,
        conv1d_layers: Iterable[str] = (),
    ):
        super().__init__(inner.reader, inner.path)
        self.inner = inner
        self.config = config
        self.conv1d_layers = frozenset(conv1d_layers)
        self._conventions: Conventions | None = None

    def conventions(self) -> Conventions:
        """What the config and the model source say about the raw tensors (orientation, ties)."""
        if self._conventions is None:
            self._conventions = conventions_for(
                self.config, self.inner.list_tensors(), self.conv1d_layers
            )
        return self._conventions

    def list_tensors(self) -> dict[str, TensorInfo]:
        return self.conventions().present(self.inner.list_tensors())

    def read_tensor(self, name: str):
        conv = self.conventions()
        raw = self.inner.read_tensor(conv.source_of(name))
        return np.ascontiguousarray(raw.T) if name in conv.transposed else raw

    def read_metadata(self) -> CheckpointMeta:
        return self.inner.read_metadata()

    def close(self) -> None:
        self.inner.close()
        self._conventions = None
        super().close()


class ReadsModelConfig(CheckpointReader):
    """Base of the readers of ``save_pretrained``'s weight files.

    :meth:`open` presents the tensors as the ``config.json`` beside the weights
    declares when transformers wrote it (it names a ``model_type``); a file
    without one, or behind a URL, is read as it is.
    """

    def open_raw(self, path) -> CheckpointHandle:
        """The file's tensors as stored, whatever config sits beside them."""
        return super().open(path)

    def open(self, path) -> CheckpointHandle:
        handle = self.open_raw(path)
        where = handle.path
        if isinstance(where, RemotePath):
            return handle
        try:
            config = read_model_config(where if where.is_dir() else where.parent)
        except Exception:
            handle.close()
            raise
        if config is None or not isinstance(config.get("model_type"), str):
            return handle
        return ConfiguredHandle(handle, config)


class ModuleOrientedReader(CheckpointReader):
    """``inner``, its tensors presented as the model source's ``Conv1D`` modules say.

    ``conv1d_layers`` are normalized layer names (wrapper prefixes such as
    ``module.`` stripped on both sides, so a DDP checkpoint matches the bare
    model). Their ``(in, out)`` weights are listed and read ``(out, in)`` with
    ``source_layout="in_out"`` and orientation ``"module"``, so the layer
    template, the stored weights and capture's loading see one view.
    """

    def __init__(self, inner: CheckpointReader, conv1d_layers: Iterable[str]):
        super().__init__(storage_options=inner.storage_options)
        self.inner = inner
        self.conv1d_layers = frozenset(conv1d_layers)
        self.name = inner.name
        self.suffixes = inner.suffixes
        self.is_directory_format = inner.is_directory_format
        self.reads_urls = inner.reads_urls

    def guess_can_read(self, path) -> bool:
        return self.inner.guess_can_read(path)

    def files(self, path) -> list[Path]:
        return self.inner.files(path)

    def read_metadata(self, path) -> CheckpointMeta:
        return self.inner.read_metadata(path)

    def open(self, path) -> CheckpointHandle:
        return ConfiguredHandle(self.inner.open(path), None, self.conv1d_layers)

    def list_tensors(self, path) -> dict[str, TensorInfo]:
        with self.open(path) as handle:
            return handle.list_tensors()

    def read_tensor(self, path, name: str) -> np.ndarray:
        with self.open(path) as handle:
            return handle.read_tensor(name)
