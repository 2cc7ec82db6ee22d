"""The record file: one safetensors file of running sums beside each checkpoint.

Naming (what ingest looks for):

- beside a checkpoint *file* ``<dir>/<stem>.<ext>``: ``<dir>/<stem>.gramlin_record.safetensors``
  (``epoch=1-step=40.ckpt`` -> ``epoch=1-step=40.gramlin_record.safetensors``);
- inside a checkpoint *directory* (Hugging Face ``checkpoint-N/``):
  ``checkpoint-N/gramlin_record.safetensors``.

Keys are ``<layer>.<quantity>`` with the store's layer names, plus ``__record__.lr_trace``;
metadata (strings, as safetensors requires) is described in docs/record.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gramlin_analyze._version import __version__
from gramlin_analyze.errors import CheckpointFormatError

if TYPE_CHECKING:
    from gramlin_analyze.record.core import RecordCore

__all__ = ["RECORD_NAME", "RECORD_SUFFIX", "FORMAT", "record_path", "write_record", "read_record"]

RECORD_NAME = "gramlin_record.safetensors"
RECORD_SUFFIX = ".gramlin_record.safetensors"
FORMAT = "gramlin-record"
FORMAT_VERSION = "1"
TRACE_KEY = "__record__.lr_trace"


def record_path(checkpoint: str | os.PathLike) -> Path:
    """Where the record of ``checkpoint`` (a file or a directory) goes."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / RECORD_NAME
    return p.with_name(
        p.name.rsplit(".", 1)[0] + RECORD_SUFFIX if "." in p.name else p.name + RECORD_SUFFIX
    )


def _metadata(core: RecordCore, extra: dict[str, Any]) -> dict[str, str]:
    layers = {
        name: {
            "mode": s.layer.mode,
            "d_in": s.layer.d_in,
            "d_out": s.layer.d_out,
            "param_name": f"{s.layer.module_name}.weight",
            "transposed": s.layer.transposed,
            "first_order": "W^T G" if s.route != "gh" else "sum_i g_i h_i^T",
            "compute_dtype": str(s.dtype).replace("torch.", ""),
            "quantities": ["vcs", "vcs_first", "vcs_second", "dgram"]
            + (["sgd_second"] if s.sgd else []),
        }
        for name, s in core.sums.items()
    }
    optimizers = [
        {"class": type(o).__name__, "defaults": _jsonable(o.defaults)} for o in core.optimizers
    ]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "creation_library": "gramlin-analyze",
        "creation_library_version": __version__,
        "step": str(core.step_count),
        "layers": json.dumps(layers),
        "optimizers": json.dumps(optimizers),
        "plain_sgd": json.dumps(
            all(_plain_sgd(o) for o in core.optimizers) and bool(core.optimizers)
        ),
        "world_size": str(core._ranks()),
        "loss_scaler": type(core.scaler).__name__ if core.scaler is not None else "none",
        "lr_first": json.dumps(core.lr_trace[0][1] if core.lr_trace else None),
        "lr_last": json.dumps(core.lr_trace[-1][1] if core.lr_trace else None),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def _plain_sgd(opt: torch.optim.Optimizer) -> bool:
    """Plain SGD: ``W+ = W - lr G`` exactly (no momentum, decay, Nesterov or maximize)."""
    d = opt.defaults
    groups_ok = all(
        not g.get("momentum") and not g.get("weight_decay") and not g.get("maximize")
        for g in opt.param_groups
    )
    return type(opt) is torch.optim.SGD and groups_ok and not d.get("nesterov")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        try:
            json.dumps(v)
        except TypeError:
            v = repr(v)
        out[k] = v
    return out


def write_record(core: RecordCore, path: str | os.PathLike, **extra: Any) -> Path:
    """Write the running sums of ``core`` to ``path`` (atomically: a temporary name, then rename)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, sums in core.sums.items():
        for q, t in sums.tensors().items():
            tensors[f"{name}.{q}"] = t
    if core.lr_trace:
        width = max(len(groups) for _, groups in core.lr_trace)
        rows = [
            [float(step), *groups, *[float("nan")] * (width - len(groups))]
            for step, groups in core.lr_trace
        ]
        tensors[TRACE_KEY] = torch.tensor(rows, dtype=torch.float64)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata=_metadata(core, extra))
    os.replace(tmp, path)
    return path


def read_record(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a record file; refuses files that are not records."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointFormatError(
                f"{path}: not a gramlin record (metadata format={meta.get('format')!r})"
            )
        return {k: f.get_tensor(k) for k in f.keys()}, meta
