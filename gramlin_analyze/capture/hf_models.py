"""``--model hf``: a ``transformers`` model built from the checkpoint's ``config.json``.

A ``Trainer`` output directory carries everything capture needs but the code:
``config.json`` names the model family (``model_type``) and the class that was
trained (``architectures``, e.g. ``GPT2LMHeadModel``). The class is looked up in
``transformers`` by that name, so the model has the trained head and its
parameter names are the checkpoint's; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from gramlin_analyze.capture.layers import CaptureLayer, is_hf_conv1d
from gramlin_analyze.errors import MissingDependencyError, ModelError, UsageError
from gramlin_analyze.io.names import common_wrapper_prefix, split_param_name

__all__ = ["check_orientation", "conv1d_layer_names", "hf_factory"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise MissingDependencyError(
            "--model hf builds the model with transformers, which is not installed: "
            "pip install gramlin-analyze[hf]"
        ) from err
    return transformers


def _model_class(transformers: Any, config: Mapping[str, Any]) -> type:
    """The class ``architectures`` names (its first entry), else the family's base model."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs:
        name = archs[0]
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
            raise ModelError(
                f"config.json names the architecture {name!r}, which this transformers "
                f"{transformers.__version__} does not have; upgrade transformers, or pass "
                "--model file.py:build with a factory that builds it"
            )
        return cls
    return transformers.AutoModel


def hf_factory(config: Mapping[str, Any]) -> nn.Module:
    """Build the model the checkpoint's ``config.json`` describes, with fresh weights.

    Raises
    ------
    ModelError
        Without a config (no ``config.json`` beside the checkpoint), without a
        ``model_type``, or when transformers cannot build it.
    MissingDependencyError
        When transformers is not installed.
    """
    if not config:
        raise ModelError(
            "--model hf needs the checkpoint's config.json (transformers' save_pretrained and "
            "Trainer write it into every checkpoint directory); none was found beside the "
            "checkpoint: copy it there, or pass --model file.py:build"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ModelError(
            "--model hf: config.json has no model_type, so transformers cannot tell which model "
            "it describes; pass --model file.py:build"
        )
    transformers = _transformers()
    settings = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **settings)
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"--model hf: transformers {transformers.__version__} cannot read a config of "
            f"model_type {model_type!r}: {err}"
        ) from err
    cls = _model_class(transformers, config)
    model = cls.from_config(hf_config) if cls is transformers.AutoModel else cls(hf_config)
    # A float64 run is captured in float64; half precision runs in float32 (capture's floor).
    dtype = config.get("dtype", config.get("torch_dtype"))
    return model.double() if dtype == "float64" else model.float()


def check_orientation(layers: Sequence[CaptureLayer], infos: Mapping[str, Any], path: Any) -> None:
    """Refuse a ``Conv1D`` layer whose checkpoint weight nothing declared as ``(in, out)``.

    Its stored weight would be ``W.T``, every Gram on the wrong side. Readers
    turn such weights when ``config.json`` names the model family, and ingest
    when the model source's module is a ``Conv1D`` (:func:`conv1d_layer_names`);
    what is left is a store that already holds these layers as listed.
    """
    prefix = common_wrapper_prefix(infos)
    flipped = {
        split_param_name(n, prefix)[0]
        for n, info in infos.items()
        if getattr(info, "source_layout", "out_in") == "in_out"
    }
    raw = [layer.name for layer in layers if layer.transposed and layer.name not in flipped]
    if raw:
        raise UsageError(
            f"{path}: layer(s) {raw} are Hugging Face Conv1D modules, whose weight is stored "
            "(in, out), and the store holds them as listed (ingested without a model "
            "source): capturing them would pair h with W transposed. Ingest the run into a "
            "new store with --model, or leave these layers out with --exclude"
        )


def conv1d_layer_names(model: nn.Module) -> list[str]:
    """The layers of ``model`` that are ``Conv1D`` modules, named as ingest names layers.

    Parameter names are normalized like a checkpoint's (wrapper prefix such as
    ``module.`` stripped), so the names match however the checkpoint was wrapped.
    """
    keys = list(model.state_dict())
    prefix = common_wrapper_prefix(keys)
    conv1d = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if is_hf_conv1d(module)
    }
    return sorted(split_param_name(k, prefix)[0] for k in keys if k in conv1d)
