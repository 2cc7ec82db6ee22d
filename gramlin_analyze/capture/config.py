"""What ``ingest --probe … --model …`` says about capture, importable without torch.

The driver plans, checks and records it (in ``/probe`` attrs, so a later
``ingest`` of new checkpoints captures them the same way without the flags);
only the tasks that run the model import torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from gramlin_analyze.dask_target import task_path
from gramlin_analyze.errors import UsageError

__all__ = ["CaptureConfig"]

#: Config keys that change what is stored (a store keeps one of each).
_IDENTITY_KEYS = (
    "model",
    "mlp_activation",
    "torchscript",
    "loss",
    "reduction",
    "dtype",
    "pool",
    "layers",
    "extra_layers",
)


@dataclass
class CaptureConfig:
    """How to capture activations and gradients for each checkpoint."""

    probe: str
    model: str | None = None
    mlp_activation: str | None = None
    torchscript: bool = False
    model_config: dict | None = None
    loss: str = "cross_entropy"
    reduction: str = "mean"
    batch_size: int = 256
    dtype: str = "float32"
    layers: list[str] | None = None
    extra_layers: list[str] = field(default_factory=list)
    pool: str | None = None
    agop: bool = False
    agop_projections: int = 64
    strict: bool = True

    def __post_init__(self) -> None:
        sources = [bool(self.model), bool(self.mlp_activation), bool(self.torchscript)]
        if sum(sources) != 1:
            raise UsageError(
                "capture needs exactly one model source: --model pkg.module:build (or file.py:build), "
                "--mlp-activation NAME (plain MLP state dicts), or --model torchscript"
            )
        if self.dtype not in ("float32", "float16", "float64"):
            raise UsageError(
                f"--activations-dtype must be float32, float16 or float64, not {self.dtype!r}"
            )
        if self.reduction not in ("mean", "sum"):
            raise UsageError(f"--reduction must be mean or sum, not {self.reduction!r}")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CaptureConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _IDENTITY_KEYS}

    def for_tasks(self) -> CaptureConfig:
        """This config with its probe and a ``file.py:build`` factory as absolute paths.

        Tasks may run on workers in another directory; the stored config keeps
        the spelling given.
        """
        model = self.model
        if model:
            module_part, sep, attr = model.rpartition(":")
            if sep and (module_part.endswith(".py") or "/" in module_part or "\\" in module_part):
                model = f"{task_path(module_part)}:{attr}"
        return replace(self, probe=task_path(self.probe), model=model)

    def describe_model(self) -> str:
        if self.torchscript:
            return "torchscript archive per checkpoint"
        if self.model:
            return f"factory {self.model}"
        return f"MLP rebuilt from weights ({self.mlp_activation})"
