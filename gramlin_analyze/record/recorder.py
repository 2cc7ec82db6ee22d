"""The recorder for a plain PyTorch training loop."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gramlin_analyze.errors import UsageError
from gramlin_analyze.record.core import RecordCore
from gramlin_analyze.record.file import (
    RECORD_NAME,
    RECORD_SUFFIX,
    read_record,
    record_path,
    write_record,
)

__all__ = ["Recorder"]


class Recorder:
    """Running float64 sums of every optimizer step's VCS, its parts and the Gram change.

    Attach to a model (and an optimizer, whose every ``step()`` is then recorded through a
    step pre-hook); train as usual; ``save`` beside each checkpoint. Any interval's sums are
    the difference of two saved records.

    Parameters
    ----------
    model : torch.nn.Module
        Eager model (DDP/DataParallel wrappers allowed; ``torch.compile`` refused).
    optimizer : torch.optim.Optimizer or sequence of them, optional
        Without one, call :meth:`step` with ``lr=`` before each optimizer step.
    layers : sequence of str, optional
        Globs over the store's layer names (every ``nn.Linear`` and HF ``Conv1D`` when None).
    mode : {"auto", "full", "diag"} or mapping of glob to mode
        ``full`` keeps ``d_in x d_in`` matrices, ``diag`` their diagonals; ``auto`` is
        ``full`` up to ``full_max`` input features.
    full_max : int
    sgd_terms : bool, optional
        Record ``gamma^2 G^T G`` (``sgd_second``). Default: in ``diag`` layers only, where it
        is cheap; in ``full`` layers it costs ``d_out d_in^2`` per step.
    compute_dtype : torch.dtype, optional
        Dtype of per-step products (float64 weights: float64, else float32); sums are float64.
    scaler : torch.amp.GradScaler, optional
        Required with float16 autocast: per-sample gradients are unscaled by its scale.
    data_parallel : bool, optional
        Sum per-sample products over the process group each step (default: when one exists).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        layers: Sequence[str] | None = None,
        mode: str | Mapping[str, str] = "auto",
        full_max: int = 1024,
        sgd_terms: bool | None = None,
        compute_dtype: torch.dtype | None = None,
        scaler: Any = None,
        data_parallel: bool | None = None,
    ) -> None:
        self.core = RecordCore(
            model,
            layers=layers,
            mode=mode,
            full_max=full_max,
            sgd_terms=sgd_terms,
            compute_dtype=compute_dtype,
            scaler=scaler,
            data_parallel=data_parallel,
        )
        optimizers = [] if optimizer is None else optimizer
        if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "param_groups"):
            optimizers = [optimizers]
        for opt in optimizers:
            self.core.attach_optimizer(opt)

    @property
    def layers(self) -> list[str]:
        """The recorded layers' names (the store's)."""
        return list(self.core.sums)

    @property
    def steps(self) -> int:
        """Optimizer steps recorded."""
        return self.core.step_count

    def step(self, lr: float | Mapping[str, float] | None = None) -> None:
        """Record one optimizer step by hand (call after backward, before the weights move)."""
        if self.core.optimizers and lr is None:
            raise UsageError("gramlin record: steps are recorded by the optimizer's hook already")
        self.core.step(lr)

    def sums(self) -> dict[str, dict[str, torch.Tensor]]:
        """The running sums now: ``{layer: {quantity: float64 tensor}}``."""
        return {name: s.tensors() for name, s in self.core.sums.items()}

    def save(self, path: str | os.PathLike, **metadata: Any) -> Path | None:
        """Write the record to ``path`` (rank 0 only under data parallelism; None elsewhere).

        ``path`` is a record's own name (``*.gramlin_record.safetensors`` or
        ``gramlin_record.safetensors``), or else a checkpoint file or directory: the record
        then goes beside it, or into it (:func:`record_path`), never over it.
        """
        if not self.core.is_writer:
            return None
        p = Path(path)
        if p.is_dir() or not (p.name == RECORD_NAME or p.name.endswith(RECORD_SUFFIX)):
            p = record_path(p)
        return write_record(self.core, p, **metadata)

    def load(self, path: str | os.PathLike) -> None:
        """Resume the running sums from a record (after restoring the checkpoint's weights)."""
        tensors, meta = read_record(path)
        for name, sums in self.core.sums.items():
            own = {
                k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name
            }
            if not own:
                raise UsageError(f"gramlin record: {path} has no sums for layer {name!r}")
            sums.load(own)
        self.core.step_count = int(meta["step"])
        last = json.loads(meta.get("lr_last", "null"))
        self.core.lr_trace = [(self.core.step_count, last)] if last is not None else []

    def close(self) -> None:
        """Remove the hooks."""
        self.core.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
