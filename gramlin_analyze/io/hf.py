"""Hugging Face ``Trainer`` checkpoint directories (``checkpoint-N/``).

``transformers.Trainer`` saves each checkpoint as a directory holding the
model weights in one of four layouts (``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json``, ``pytorch_model.bin``,
or sharded ``pytorch_model.bin.index.json``) beside ``trainer_state.json``
(``global_step``, ``epoch``, ``log_history``) and the optimizer, scheduler
and RNG states. Only the weights, ``trainer_state.json`` and ``config.json``
are read; the weights go through the safetensors and PyTorch readers.

``config.json``'s ``model_type`` decides the orientation of the weights
(:mod:`gramlin_analyze.io.hf_conventions`): GPT-2's ``Conv1D`` weights, stored
``(in, out)``, are listed and read as ``(out, in)``; an output embedding that
``save_pretrained`` left out because the config ties it to the input
embedding (``tie_word_embeddings``) is listed under its own name and read
from the embedding, both named in :attr:`HFTensorInfo.tied_to`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gramlin_analyze.errors import CheckpointFormatError
from gramlin_analyze.io.base import CheckpointMeta, CheckpointReader
from gramlin_analyze.io.hf_conventions import (
    ConfiguredHandle,
    ReadsModelConfig,
    read_json_object,
    read_model_config,
)
from gramlin_analyze.io.safetensors import (
    SafetensorsReader,
    ShardedIndexReader,
    ShardedSafetensorsReader,
)
from gramlin_analyze.io.torch_pickle import TorchPickleReader, as_float, as_int

__all__ = ["HFTrainerReader", "TRAINER_STATE", "read_trainer_state"]

TRAINER_STATE = "trainer_state.json"


class _ShardedTorchReader(ShardedIndexReader):
    """Sharded ``pytorch_model-0000k-of-0000n.bin`` files listed by their index."""

    name = "torch-sharded"
    index_name = "pytorch_model.bin.index.json"
    index_suffix = ".bin.index.json"
    shard_reader = TorchPickleReader()


#: Weight layouts, in the order transformers prefers them when loading.
_WEIGHT_LAYOUTS: tuple[tuple[str, ReadsModelConfig], ...] = (
    ("model.safetensors", SafetensorsReader()),
    ("model.safetensors.index.json", ShardedSafetensorsReader()),
    ("pytorch_model.bin", TorchPickleReader()),
    ("pytorch_model.bin.index.json", _ShardedTorchReader()),
)


def read_trainer_state(path: os.PathLike | str) -> dict | None:
    """The parsed ``trainer_state.json`` of a checkpoint directory, None when absent."""
    return read_json_object(Path(path) / TRAINER_STATE, "transformers' TrainerState")


def _learning_rate(state: Mapping, step: int | None) -> float | None:
    """Learning rate of the last ``log_history`` entry logged at or before ``step``."""
    history = state.get("log_history")
    if not isinstance(history, list):
        return None
    for entry in reversed(history):
        if not isinstance(entry, Mapping) or "learning_rate" not in entry:
            continue
        logged_at = as_int(entry.get("step"))
        if step is None or logged_at is None or logged_at <= step:
            return as_float(entry["learning_rate"])
    return None


class HFTrainerHandle(ConfiguredHandle):
    """An open ``checkpoint-N/`` directory, delegating to the handle of its weights.

    Tensors are presented in the gramlin convention that ``config.json`` decides
    (``Conv1D`` weights transposed, declared ties listed); the weights are
    opened raw, so the convention is applied here once.
    """

    def __init__(self, reader: HFTrainerReader, path: os.PathLike | str):
        weights_reader, weights_path = reader.weights(path)
        super().__init__(weights_reader.open_raw(weights_path), read_model_config(Path(path)))
        self.reader: HFTrainerReader = reader
        self.path = Path(path)

    def read_metadata(self) -> CheckpointMeta:
        """``trainer_state.json``'s, plus the optimizer of ``optimizer.pt`` (read by a task, not the scan)."""
        from gramlin_analyze.io.optimizer import hf_optimizer

        meta = self.reader.read_metadata(self.path)
        opt = hf_optimizer(self.path)
        if opt is not None:
            meta.optimizer = opt.family or None
            meta.extra["optimizer_params"] = opt.to_json()
        return meta


def _tokens_seen(state: dict, step: int | None) -> float | None:
    """``num_input_tokens_seen``; the Trainer leaves it 0 unless asked to count, so a 0
    after step 0 means "not counted", not "no tokens"."""
    tokens = as_float(state.get("num_input_tokens_seen"))
    return tokens if tokens and tokens > 0 or (tokens == 0 and step == 0) else None


class HFTrainerReader(CheckpointReader):
    """Reader for ``transformers.Trainer`` checkpoint directories.

    ``path`` is the ``checkpoint-N/`` directory. Weights are read from
    ``model.safetensors``, a sharded safetensors index, ``pytorch_model.bin``
    or a sharded ``pytorch_model.bin`` index, preferred in that order.

    Notes
    -----
    Metadata comes from ``trainer_state.json``: ``global_step`` as the step,
    ``epoch``, and the ``learning_rate`` of the last ``log_history`` entry
    logged at or before that step. :meth:`files` lists the weight files and
    ``trainer_state.json``, not the optimizer, scheduler or RNG states.
    """

    name = "hf-trainer"
    is_directory_format = True

    def weights(self, path: os.PathLike | str) -> tuple[ReadsModelConfig, Path]:
        """The reader and path of the model weights in a checkpoint directory."""
        directory = Path(path)
        for filename, reader in _WEIGHT_LAYOUTS:
            if (directory / filename).is_file():
                return reader, directory / filename
        looked_for = ", ".join(filename for filename, _ in _WEIGHT_LAYOUTS)
        raise CheckpointFormatError(
            f"{directory}: no model weights found (looked for {looked_for}); pass the "
            "checkpoint directory that holds them, or save the model with trainer.save_model()"
        )

    def guess_can_read(self, path: os.PathLike | str) -> bool:
        directory = Path(path)
        return (
            directory.is_dir()
            and (directory / TRAINER_STATE).is_file()
            and any((directory / filename).is_file() for filename, _ in _WEIGHT_LAYOUTS)
        )

    handle_class = HFTrainerHandle

    def read_metadata(self, path: os.PathLike | str) -> CheckpointMeta:
        state = read_trainer_state(path)
        if state is None:
            return CheckpointMeta()
        step = as_int(state.get("global_step"))
        return CheckpointMeta(
            step=step,
            epoch=as_float(state.get("epoch")),
            tokens_seen=_tokens_seen(state, step),
            lr=_learning_rate(state, step),
        )

    def files(self, path: os.PathLike | str) -> list[Path]:
        """The weight files and ``trainer_state.json``."""
        weights_reader, weights_path = self.weights(path)
        state_file = Path(path) / TRAINER_STATE
        extra = [state_file] if state_file.is_file() else []
        return [*weights_reader.files(weights_path), *extra]
