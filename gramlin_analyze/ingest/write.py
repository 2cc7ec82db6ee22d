"""The checked plan written to the store: step axis, layers, capture's arrays, row status.

Runs in the write session, before any task: the tasks then only fill their
own step's chunks, and the driver marks each step ``ok`` as its task ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gramlin_analyze.ingest.recorded import RecordedLayer, declare_recorded, plan_recorded
from gramlin_analyze.io.discovery import CheckpointSource
from gramlin_analyze.store import GramlinStore, declare_activations, write_probe
from gramlin_analyze.store import layout as L

if TYPE_CHECKING:
    from gramlin_analyze.capture.config import CaptureConfig
    from gramlin_analyze.ingest.checks import ExternalPlan
    from gramlin_analyze.ingest.plan import Plan, Request
    from gramlin_analyze.ingest.template import LayerSpec

__all__ = ["WrittenPlan", "write_plan"]


@dataclass(frozen=True, slots=True)
class WrittenPlan:
    """Where the tasks write: each step's row, each layer's stored dtype, the activation layers."""

    positions: dict[int, int]  # step -> row index
    stored_dtypes: dict[str, str]
    activation_layers: list[str]  # layers whose activations the tasks write
    recorded: dict[str, RecordedLayer] = field(default_factory=dict)  # training-time records


def write_plan(gs: GramlinStore, plan: Plan, req: Request) -> WrittenPlan:
    """Moved paths, the step axis, new layers, capture's arrays, each row's status."""
    man = gs.manifest()
    step_row = {int(s): i for i, s in enumerate(man["step"])}
    if plan.moved:
        gs.write_rows(
            [step_row[s.step] for s in plan.moved],
            source_path=[str(s.path) for s in plan.moved],
            stat_key=[s.stat_key for s in plan.moved],
        )
    keep_old = {
        int(s) for s, st in zip(man["step"], man["status"], strict=True) if st in ("ok", "failed")
    }
    new_steps = np.asarray(sorted(keep_old | {s.step for s in plan.sources}), dtype=np.int64)
    # New steps' fields go in with the axis; stored rows (changed checkpoints)
    # leave ok only below, once everything else is in place.
    pos = gs.set_step_axis(
        new_steps, rows=_pending([s for s in plan.todo if s.step not in step_row])
    )
    if not plan.stored.template and plan.template:
        _declare_layers(gs, plan.template, plan.listed)
        pos = gs.set_step_axis(new_steps)
    stored_dtypes = {n: dict(gs.layer(n).attrs)["stored_dtype"] for n in gs.layer_names()}
    act_layers = _declare_activations(gs, plan, req)
    recorded = plan_recorded(gs, plan.sources, plan.template)
    declare_recorded(gs, recorded)
    redo = _pending([s for s in plan.todo if s.step in step_row and s.step not in plan.kept])
    gs.write_row_fields([(pos[step], fields) for step, fields in redo.items()])
    gs.write_rows([pos[s] for s in plan.failed], error=list(plan.failed.values()), status="failed")
    return WrittenPlan(pos, stored_dtypes, act_layers, recorded)


def _pending(rows: list[CheckpointSource]) -> dict[int, dict[str, Any]]:
    """Manifest fields of steps about to be (re)read."""
    return {
        s.step: dict(
            source_path=str(s.path),
            format=s.format,
            fingerprint=s.fingerprint,
            stat_key=s.stat_key,
            bytes=s.bytes,
            status="pending",
        )
        for s in rows
    }


def _declare_layers(
    gs: GramlinStore, template: dict, listed: dict[int, dict[str, LayerSpec]]
) -> None:
    first = listed[min(listed)]
    specs = {}
    for name, (shape, dtype, has_bias) in template.items():
        sdtype = L.storage_dtype(dtype)
        flat = (shape[0], int(np.prod(shape[1:], dtype=np.int64)))
        attrs = {
            "param_name": first[name].weight if name in first else name,
            "kind": L.layer_kind(name, shape),
            "source_shape": list(shape),
            "source_dtype": dtype,
            "stored_dtype": sdtype.name,
            "has_bias": has_bias,
            "long_name": f"layer {name}",
        }
        if len(shape) > 2:
            attrs["kernel_shape"] = list(shape[1:])
            attrs["im2col_view"] = (
                "weight is the (out, in*k...) view of the (out, in, *kernel) kernel in C order: "
                "weight.reshape(out, *kernel_shape) restores it"
            )
        if dtype == "bfloat16":
            attrs["bfloat16_stored_as"] = "float32"
        if name in first:
            attrs.update(first[name].attrs())
        specs[name] = (flat, sdtype, has_bias, attrs)
    gs.declare_layers(specs)


def _declare_activations(gs: GramlinStore, plan: Plan, req: Request) -> list[str]:
    """The layers whose activations the tasks write, their arrays declared when new."""
    if plan.capture is not None:
        if plan.capture_counts:
            return _declare_capture(gs, plan.capture, plan.capture_counts, req.store)
        if plan.stored.probe_attrs is not None:
            return list(plan.stored.activation_layers)
        return []
    if plan.external_plan is not None:
        return _declare_external(gs, plan.external_plan, req)
    return []


def _declare_capture(
    gs: GramlinStore, capture: CaptureConfig, counts: dict[str, tuple[int, int]], store: str
) -> list[str]:
    """Write ``/probe`` and declare the activation arrays; return the captured layers.

    The capture setup is recorded with its paths resolved (:func:`~gramlin_analyze.ingest.checks.settled`).
    """
    from gramlin_analyze.capture.probe import cached_probe
    from gramlin_analyze.ingest.checks import settled

    probe = cached_probe(capture.probe)
    attrs = {
        "fingerprint": probe.fingerprint,
        "n_samples": int(probe.n_samples),
        "loss": capture.loss,
        "reduction": capture.reduction,
        "probe_path": _where(capture.probe),
        "model_source": capture.describe_model(),
        "capture_config": settled(capture, store).to_json(),
        "activations_dtype": capture.dtype,
        "long_name": "probe set",
    }
    if probe.labels is not None:
        attrs["n_classes"] = int(np.max(probe.labels)) + 1
    write_probe(gs, probe, attrs)
    itemsize = np.dtype(capture.dtype).itemsize
    specs = {}
    for name, (n, d) in counts.items():
        per_example = max(1, n // probe.n_samples)
        rows = L.activation_rows(n, d, itemsize, batch_rows=capture.batch_size * per_example)
        specs[name] = (n, d, rows, per_example)
    declare_activations(gs, specs, dtype=np.dtype(capture.dtype), agop=capture.agop)
    return list(counts)


def _declare_external(gs: GramlinStore, ext: ExternalPlan, req: Request) -> list[str]:
    """Store the probe (when given) and declare the arrays of activations computed elsewhere."""
    if ext.by_dtype is None:
        return ext.layers
    p = ext.probe
    if p is not None and L.PROBE not in gs.root:
        attrs = {
            "fingerprint": p.fingerprint,
            "n_samples": int(p.n_samples),
            "loss": "external",
            "reduction": "external",
            "probe_path": _where(req.probe),
            "model_source": f"external activations from {req.activations}",
            "long_name": "probe set",
        }
        if p.labels is not None:
            attrs["n_classes"] = int(np.max(p.labels)) + 1
        write_probe(gs, p, attrs)
    for dtype, specs in ext.by_dtype.items():
        declare_activations(gs, specs, dtype=dtype, agop=False)
    return ext.layers


def _where(path) -> str:
    """A probe's location as recorded: a local path resolved, a URL as given."""
    from gramlin_analyze.io.remote import is_url

    return str(path) if is_url(str(path)) else str(Path(path).resolve())
