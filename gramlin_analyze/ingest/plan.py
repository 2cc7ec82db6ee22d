"""The ingest plan: every check, the layer template and the steps to read, before
anything is written; then the plan written (step axis, layers, capture arrays)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gramlin_analyze.errors import GramlinError, ProbeError, StoreError, UsageError
from gramlin_analyze.ingest.task import error_message
from gramlin_analyze.ingest.template import LayerSpec, check_against, layers_of, plan_layers
from gramlin_analyze.io.discovery import CheckpointSource, scan
from gramlin_analyze.io.names import select_layers
from gramlin_analyze.io.registry import reader_for
from gramlin_analyze.store import (
    GramlinStore,
    declare_activations,
    write_probe,
)
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.faults import StoreUnavailableError
from gramlin_analyze.store.location import is_remote
from gramlin_analyze.store.provenance import describe_run, holds_run_from

if TYPE_CHECKING:
    from gramlin_analyze.capture.task import CaptureConfig

__all__ = ["Plan", "Request", "is_store", "lr_for", "make_plan", "write_plan"]

_READ_ERRORS = (GramlinError, OSError, KeyError, ValueError, RuntimeError, EOFError)


def _fingerprint_rows(man: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """``{source_path: (stat_key, fingerprint)}`` of the manifest's ok rows."""
    if "stat_key" not in man:
        return {}
    return {
        str(p): (str(k), str(f))
        for p, k, f, st in zip(
            man["source_path"], man["stat_key"], man["fingerprint"], man["status"], strict=True
        )
        if st == "ok" and k
    }


def is_store(store: str, storage_options: dict | None) -> bool:
    """Whether a gramlin store is at ``store`` already."""
    try:
        GramlinStore(store, mode="r", storage_options=storage_options)
    except StoreUnavailableError:
        raise
    except StoreError:
        return False
    return True


def lr_for(step: int, meta_lr, constant, schedule) -> tuple[float | None, str]:
    if schedule is not None or constant is not None:
        from gramlin_analyze.capture.lr import resolve_lr

        return resolve_lr(step, meta_lr=meta_lr, constant=constant, schedule=schedule)
    if meta_lr is not None:
        return float(meta_lr), "checkpoint"
    return None, "unknown"


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
        specs[name] = (flat, sdtype, has_bias, attrs)
    gs.declare_layers(specs)


# -- the plan: everything that can fail before a write ------------------------------


@dataclass(frozen=True)
class Request:
    """What the command asked for: the options that decide what is read and stored."""

    directory: str | os.PathLike
    store: str
    layers: list[str] | None
    exclude: list[str] | None
    format: str | None
    order: str | None
    reader_options: dict[str, Any]
    settle_seconds: float
    capture: CaptureConfig | None
    activations: str | os.PathLike | None
    probe: str | os.PathLike | None
    lr: float | None
    lr_schedule: str | os.PathLike | None


@dataclass(frozen=True)
class _Stored:
    """What a store holds before the command (nothing, for a new store)."""

    url: str
    attrs: dict[str, Any]
    manifest: dict[str, np.ndarray]
    template: dict[str, tuple[tuple[int, ...], str, bool]]
    probe_attrs: dict[str, Any] | None  # None: no /probe
    activation_layers: list[str]  # layers whose activation arrays are declared

    @classmethod
    def read(cls, gs: GramlinStore | None, req: Request) -> _Stored:
        if gs is None:
            return cls(req.store, {}, _empty_manifest(), {}, None, [])
        view = gs.view
        names = gs.layer_names()
        template = {}
        for name in names:
            a = dict(gs.layer(name).attrs)
            template[name] = (tuple(a["source_shape"]), a["source_dtype"], bool(a["has_bias"]))
        probe_attrs = dict(view[L.PROBE].attrs) if L.PROBE in view else None
        activations = (
            probe_attrs is not None or req.capture is not None or req.activations is not None
        )
        return cls(
            url=req.store,
            attrs=dict(gs.root.attrs),
            manifest=gs.manifest() if L.STEPS in view else _empty_manifest(),
            template=template,
            probe_attrs=probe_attrs,
            activation_layers=[n for n in names if "input" in gs.layer(n)] if activations else [],
        )


@dataclass(frozen=True)
class _ExternalPlan:
    """Activations computed elsewhere: the probe to store and the arrays to declare."""

    probe: Any  # ProbeSet or None
    layers: list[str]
    by_dtype: dict[np.dtype, dict[str, tuple[int, int, int, int]]] | None  # None: declared already


@dataclass(frozen=True)
class Plan:
    """What an ingest will write, decided (and checked) before it writes anything."""

    stored: _Stored
    sources: list[CheckpointSource]
    schedule: Any
    external: dict[int, Path]
    capture: CaptureConfig | None
    todo: list[CheckpointSource]  # to read (new, changed, or every one when capture starts)
    skipped: list[int]
    moved: list[CheckpointSource]  # unchanged, at a new path
    listed: dict[int, dict[str, LayerSpec]]
    template: dict[str, tuple[tuple[int, ...], str, bool]]
    runnable: list[CheckpointSource]
    failed: dict[int, str]  # steps recorded as failed
    kept: dict[int, str]  # ok steps whose new checkpoint is unusable: they keep what they hold
    capture_counts: dict[str, tuple[int, int]] | None  # activation arrays to declare for capture
    external_plan: _ExternalPlan | None


def make_plan(req: Request, gs: GramlinStore | None) -> Plan:
    """Scan the run and check every option against it and the store; write nothing.

    Usage errors (a missing or bad probe, a loss or model that does not fit,
    layer globs matching nothing, checkpoints of another model or run than
    the store's) raise here, so the store is neither created nor changed.
    """
    st = _Stored.read(gs, req)
    sources = scan(
        req.directory,
        format=req.format,
        order=req.order,
        reader_options=req.reader_options,
        settle_seconds=req.settle_seconds,
        known=_fingerprint_rows(st.manifest),
    )
    if not is_remote(req.store) and Path(req.store).resolve() == Path(req.directory).resolve():
        raise UsageError("the store cannot be the checkpoint directory itself; pass --store OUT")
    schedule = None
    if req.lr_schedule is not None:
        from gramlin_analyze.capture.lr import load_lr_schedule

        schedule = load_lr_schedule(req.lr_schedule)
    for src in sources:  # a bad --lr/--lr-schedule fails here
        lr_for(src.step, None, req.lr, schedule)
    external: dict[int, Path] = {}
    if req.activations is not None:
        from gramlin_analyze.capture.external import discover_activation_files

        external = discover_activation_files(req.activations)
    capture, need_all = _resolve_capture(st, req.capture)

    man = st.manifest
    ok_fp = {
        int(s): fp
        for s, status, fp in zip(man["step"], man["status"], man["fingerprint"], strict=True)
        if status == "ok"
    }
    todo = list(sources) if need_all else [s for s in sources if ok_fp.get(s.step) != s.fingerprint]
    # Unchanged checkpoints that moved or were copied (same content, new path
    # or file stats): the manifest learns where they are now, so the next
    # ingest reuses their fingerprints without hashing.
    step_row = {int(s): i for i, s in enumerate(man["step"])}
    stat_keys = man.get("stat_key", [""] * len(man["step"]))
    moved = [
        s
        for s in sources
        if s not in todo
        and s.step in step_row
        and (man["source_path"][step_row[s.step]], stat_keys[step_row[s.step]])
        != (str(s.path), s.stat_key)
    ]

    # List tensors (headers only) to fix the template and fail odd checkpoints early.
    listed: dict[int, dict[str, LayerSpec]] = {}
    errors: dict[int, str] = {}
    for src in todo:
        try:
            listed[src.step] = layers_of(
                reader_for(src.format, req.reader_options).list_tensors(src.path)
            )
        except _READ_ERRORS as err:
            errors[src.step] = error_message(err, src.path)
    template = st.template or _new_template(req, listed)
    if (
        st.template
        and (req.layers or req.exclude)
        and sorted(select_layers(st.template, req.layers, req.exclude)) != sorted(st.template)
    ):
        raise UsageError(
            f"{req.store} already holds layers {sorted(st.template)}; the --layers/--exclude selection "
            "differs. Ingest into a new store to change the layer selection"
        )
    unchanged = len(sources) - len(todo)
    _refuse_another_model(req, st, listed, unchanged)
    _refuse_another_run(req, st, sources, ok_fp)
    paths = {s.step: s.path for s in todo}
    for step, lay in listed.items():
        problem = check_against(lay, template)
        if problem:
            errors[step] = f"{paths[step]}: {problem}"
    # A stored ok step is not given up for a checkpoint that cannot replace it
    # (unless capture starts: then every step must be read again).
    kept = (
        {}
        if need_all
        else {
            step: f"{msg} ({req.store} keeps step {step} as ingested before)"
            for step, msg in errors.items()
            if step in ok_fp
        }
    )
    runnable = [s for s in todo if s.step not in errors]
    return Plan(
        stored=st,
        sources=sources,
        schedule=schedule,
        external=external,
        capture=capture,
        todo=todo,
        skipped=[s.step for s in sources if s not in todo],
        moved=moved,
        listed=listed,
        template=template,
        runnable=runnable,
        failed={s: m for s, m in errors.items() if s not in kept},
        kept=kept,
        capture_counts=_check_capture(req, st, capture, runnable, template),
        external_plan=_check_external(req, st, external, template),
    )


def _empty_manifest() -> dict[str, np.ndarray]:
    man = {"step": np.zeros(0, dtype=np.int64)}
    for name, (dtype, *_) in L.MANIFEST.items():
        man[name] = np.zeros(0, dtype=object if dtype is str else dtype)
    return man


def _new_template(req: Request, listed: dict[int, dict[str, LayerSpec]]) -> dict:
    template = plan_layers(listed, include=req.layers, exclude=req.exclude)
    if not template and listed:
        avail = sorted({k for v in listed.values() for k in v})
        if not avail:
            raise UsageError(
                f"{req.directory}: no checkpoint holds a weight of two or more dimensions (only vectors "
                "or scalars), so there is no layer to store; check that these are model checkpoints"
            )
        raise UsageError(
            f"{req.directory}: no layer matches --layers {req.layers or ['*']} --exclude {req.exclude or []}; "
            f"available layers: {', '.join(avail)}"
        )
    return template


def _layer_summary(template: dict) -> str:
    if not template:
        return "no matrix-shaped weights"
    items = [
        f"{name} {'x'.join(map(str, shape))}" for name, (shape, *_) in sorted(template.items())
    ]
    shown = ", ".join(items[:8]) + (f", … ({len(items) - 8} more)" if len(items) > 8 else "")
    return f"{len(items)} layer{'s' if len(items) != 1 else ''}: {shown}"


def _first_difference(stored: dict, layers: dict[str, LayerSpec]) -> str:
    for name, (shape, _, has_bias) in sorted(stored.items()):
        spec = layers.get(name)
        if spec is None:
            return f"no layer {name!r}"
        if tuple(spec.shape) != tuple(shape):
            return f"layer {name!r} is {'x'.join(map(str, spec.shape))}, not {'x'.join(map(str, shape))}"
        if has_bias and spec.bias is None:
            return f"layer {name!r} has no bias"
    return ""


def _refuse_another_model(
    req: Request, st: _Stored, listed: dict[int, dict[str, LayerSpec]], unchanged: int
) -> None:
    """Refuse checkpoints none of which fits the store's layers: they are another model's.

    (One odd checkpoint among fitting ones fails alone, as in a new store.)
    """
    if not st.template or not listed or unchanged:
        return
    if any(check_against(lay, st.template) is None for lay in listed.values()):
        return
    theirs = plan_layers(listed, include=None, exclude=None)
    raise UsageError(
        f"{describe_run(st.attrs, req.store)} ({_layer_summary(st.template)}); the checkpoints in "
        f"{req.directory} have {_layer_summary(theirs)} ({_first_difference(st.template, listed[min(listed)])}): "
        "use another --store for them (nothing was written)"
    )


def _refuse_another_run(
    req: Request, st: _Stored, sources: list[CheckpointSource], ok_fp: dict[int, str]
) -> None:
    """Refuse replacing stored steps with checkpoints of the same model from another run.

    A run read from another directory whose checkpoints differ at every
    stored step it shares is another run (a moved or copied run has its
    unchanged checkpoints; one retrained in place is in the same directory).
    """
    shared = [s for s in sources if s.step in ok_fp]
    changed = [s.step for s in shared if s.fingerprint != ok_fp[s.step]]
    if (
        not changed
        or len(changed) < len(shared)
        or holds_run_from(st.attrs, req.directory) is not False
    ):
        return
    steps = ", ".join(map(str, changed[:8])) + (
        f", … ({len(changed) - 8} more)" if len(changed) > 8 else ""
    )
    raise UsageError(
        f"{describe_run(st.attrs, req.store)}; the checkpoints in {req.directory} differ from it at "
        f"step{'s' if len(changed) > 1 else ''} {steps} (another run?): use another --store for them "
        "(nothing was written)"
    )


def _resolve_capture(
    st: _Stored, capture: CaptureConfig | None
) -> tuple[CaptureConfig | None, bool]:
    """The capture config to use, and whether every step must be (re)read.

    A store remembers how it was captured; new checkpoints are captured the
    same way. A different probe set or capture setup is refused: it would
    mix two experiments in one store.
    """
    attrs = st.probe_attrs or {}
    if capture is None and not attrs.get("capture_config"):
        return None, False  # weights only: no need to import the capture code (and torch)
    from gramlin_analyze.capture.task import CaptureConfig

    stored = (
        CaptureConfig.from_json(attrs["capture_config"]) if attrs.get("capture_config") else None
    )
    if capture is None:
        return stored, False
    from gramlin_analyze.capture.task import cached_probe

    probe = cached_probe(capture.probe)
    if st.probe_attrs is not None and attrs.get("fingerprint") != probe.fingerprint:
        raise ProbeError(
            f"{capture.probe}: this probe set differs from the one {st.url} already holds "
            f"(fingerprint {str(attrs.get('fingerprint'))[:16]}…); a store holds one probe set: "
            "ingest into a new store to use another"
        )
    if stored is not None and stored.identity() != capture.identity():
        diff = {
            k: (stored.identity()[k], v)
            for k, v in capture.identity().items()
            if stored.identity()[k] != v
        }
        raise UsageError(
            f"{st.url} was captured with other settings ({diff} as stored vs given); "
            "ingest into a new store to capture differently"
        )
    return capture, stored is None


def _check_capture(
    req: Request,
    st: _Stored,
    capture: CaptureConfig | None,
    runnable: list[CheckpointSource],
    template: dict,
) -> dict[str, tuple[int, int]] | None:
    """Check the capture setup on the first checkpoint to read; ``layer -> (rows, d_in)`` to declare.

    The probe (read by :func:`_resolve_capture`), the loss, the model (its
    factory, the checkpoint's fit, the probe's inputs) and the labels against
    the model's outputs: a setup that fails here is never recorded.
    """
    if capture is None or (st.probe_attrs is not None and st.activation_layers):
        return None  # none, or declared (and checked) by an earlier ingest
    from gramlin_analyze.capture.losses import check_loss, resolve_loss
    from gramlin_analyze.capture.task import build_model, cached_probe, plan_capture

    loss = resolve_loss(capture.loss, reduction=capture.reduction)
    if not runnable:
        if capture.model:
            from gramlin_analyze.capture.models import check_factory

            check_factory(capture.model)
        return None
    src = runnable[0]
    try:
        with reader_for(src.format, req.reader_options).open(src.path) as h:
            counts = plan_capture(capture, h, list(template))
            check_loss(loss, build_model(capture, h), cached_probe(capture.probe))
    except ProbeError as err:
        if str(capture.probe) in str(err):
            raise
        raise ProbeError(f"probe file {str(capture.probe)!r}: {err}") from err
    return counts


def _check_external(
    req: Request, st: _Stored, files: dict[int, Path], template: dict
) -> _ExternalPlan | None:
    """Check activations computed elsewhere against the store's layers and the probe.

    Rows per layer may be a multiple ``P`` of the probe's samples (conv
    positions, tokens: example-major, row ``i * P + p``); ``P`` is recorded as
    ``samples_per_example`` so that analyze pairs rows with labels.
    """
    if req.activations is None:
        return None
    from gramlin_analyze.capture.external import read_activation_file

    p = None
    if req.probe is not None:
        from gramlin_analyze.capture.probe import load_probe

        p = load_probe(req.probe)
        if st.probe_attrs is not None and st.probe_attrs.get("fingerprint") != p.fingerprint:
            raise ProbeError(
                f"{req.probe}: this probe set differs from the one {st.url} already holds; a store holds "
                "one probe set: ingest into a new store to use another"
            )
    if st.activation_layers:
        return _ExternalPlan(p, list(st.activation_layers), None)
    if not files:
        raise UsageError(
            f"{req.activations}: no activation files (step_<N>.npz or step_<N>.safetensors) found"
        )
    first = read_activation_file(files[min(files)])
    unknown = sorted(set(first) - set(template))
    if unknown:
        raise UsageError(
            f"{files[min(files)]}: layers {unknown} are not in the store (stored: {sorted(template)}); "
            "name activation arrays after the stored layers"
        )
    by_dtype: dict[np.dtype, dict[str, tuple[int, int, int, int]]] = {}
    for name, arrs in first.items():
        n, d = arrs["input"].shape
        if p is None:
            per_example = 1
        elif n % p.n_samples:
            raise ProbeError(
                f"{files[min(files)]}: layer {name} has {n} rows, not a multiple of the probe's "
                f"{p.n_samples} samples ({req.probe}); rows must be (example, position) pairs, example-major"
            )
        else:
            per_example = n // p.n_samples
        dtype = (
            arrs["input"].dtype
            if arrs["input"].dtype in (np.float16, np.float32, np.float64)
            else np.float32
        )
        rows = L.activation_rows(n, d, np.dtype(dtype).itemsize, batch_rows=1)
        by_dtype.setdefault(np.dtype(dtype), {})[name] = (n, d, rows, per_example)
    return _ExternalPlan(p, sorted(first), by_dtype)


# -- writing the plan ----------------------------------------------------------------


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


def write_plan(
    gs: GramlinStore, plan: Plan, req: Request
) -> tuple[dict[int, int], dict[str, str], list[str]]:
    """Moved paths, the step axis, new layers, capture's arrays, each row's status.

    Returns ``{step: index}``, each layer's stored dtype, and the layers whose
    activations the tasks write.
    """
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
    act_layers: list[str] = []
    if plan.capture is not None:
        if plan.capture_counts:
            act_layers = _declare_capture(gs, plan.capture, plan.capture_counts)
        elif plan.stored.probe_attrs is not None:
            act_layers = list(plan.stored.activation_layers)
    elif plan.external_plan is not None:
        act_layers = _declare_external(gs, plan.external_plan, req)
    redo = _pending([s for s in plan.todo if s.step in step_row and s.step not in plan.kept])
    gs.write_row_fields([(pos[step], fields) for step, fields in redo.items()])
    gs.write_rows([pos[s] for s in plan.failed], error=list(plan.failed.values()), status="failed")
    return pos, stored_dtypes, act_layers


def _declare_capture(
    gs: GramlinStore, capture: CaptureConfig, counts: dict[str, tuple[int, int]]
) -> list[str]:
    """Write ``/probe`` and declare the activation arrays; return the captured layers."""
    from gramlin_analyze.capture.task import cached_probe

    probe = cached_probe(capture.probe)
    attrs = {
        "fingerprint": probe.fingerprint,
        "n_samples": int(probe.n_samples),
        "loss": capture.loss,
        "reduction": capture.reduction,
        "probe_path": str(Path(capture.probe).resolve()),
        "model_source": capture.describe_model(),
        "capture_config": capture.to_json(),
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


def _declare_external(gs: GramlinStore, ext: _ExternalPlan, req: Request) -> list[str]:
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
            "probe_path": str(Path(req.probe).resolve()),
            "model_source": f"external activations from {req.activations}",
            "long_name": "probe set",
        }
        if p.labels is not None:
            attrs["n_classes"] = int(np.max(p.labels)) + 1
        write_probe(gs, p, attrs)
    for dtype, specs in ext.by_dtype.items():
        declare_activations(gs, specs, dtype=dtype, agop=False)
    return ext.layers
