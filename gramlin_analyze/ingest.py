"""``ingest``: checkpoints -> store, as one Dask graph with one task per checkpoint.

The driver plans (scan, layer template, step axis) and is the only writer of
the ``/steps`` manifest; each task reads one checkpoint, one tensor at a
time, and writes its own step's chunks. A step becomes ``ok`` only after the
task has written every array of it, so a killed ingest is finished by the
next run, and an unchanged checkpoint (same fingerprint, status ``ok``) is
never read again.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gramlin_analyze._dask import make_runner
from gramlin_analyze._ingest_task import error_message, ingest_one
from gramlin_analyze._template import LayerSpec, check_against, layers_of, plan_layers
from gramlin_analyze.errors import GramlinError, ProbeError, StoreError, UsageError
from gramlin_analyze.io.discovery import CheckpointSource, scan
from gramlin_analyze.io.names import select_layers
from gramlin_analyze.io.registry import reader_for
from gramlin_analyze.store import layout as L
from gramlin_analyze.store import (
    GramlinStore,
    declare_activations,
    read_all,
    release_buffers,
    share_with_tasks,
    writable,
    write_all,
    write_probe,
)
from gramlin_analyze.store.location import is_remote

if TYPE_CHECKING:
    from gramlin_analyze.capture.task import CaptureConfig

__all__ = ["ingest", "IngestReport", "default_store_path"]

_READ_ERRORS = (GramlinError, OSError, KeyError, ValueError, RuntimeError, EOFError)



@dataclass
class IngestReport:
    """What one ``ingest`` did."""

    store: str
    ingested: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    nonfinite: dict[int, int] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0
    scan_skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def default_store_path(directory: str | os.PathLike) -> str:
    return str(Path(directory).resolve()).rstrip("/") + ".zarr"


# -- the driver --------------------------------------------------------------------


def ingest(
    directory: str | os.PathLike,
    store: str | os.PathLike | None = None,
    *,
    layers: list[str] | None = None,
    exclude: list[str] | None = None,
    format: str | None = None,
    order: str | None = None,
    state_dict_key: str | None = None,
    settle_seconds: float = 0.0,
    allow_torchscript_code: bool = False,
    capture: CaptureConfig | None = None,
    activations: str | os.PathLike | None = None,
    probe: str | os.PathLike | None = None,
    lr: float | None = None,
    lr_schedule: str | os.PathLike | None = None,
    workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    storage_options: dict | None = None,
    break_lock: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> IngestReport:
    """Ingest every checkpoint under ``directory`` into the store at ``store``.

    Only new, changed (fingerprint) or not-yet-``ok`` checkpoints are read.

    Parameters
    ----------
    directory
        Run directory (searched recursively) or one checkpoint.
    store
        Store path or fsspec URL; default ``<directory>.zarr``.
    layers, exclude
        Glob patterns over normalized layer names (``encoder.*``).
    format, order, state_dict_key, settle_seconds
        See :func:`gramlin_analyze.io.discovery.scan`.
    allow_torchscript_code
        Read TorchScript archives (they carry code that runs with the model).
    capture
        Capture probe-set activations and gradients for every checkpoint
        (:class:`gramlin_analyze.capture.task.CaptureConfig`). A store that
        was captured before keeps capturing new checkpoints the same way.
    activations
        Directory of activation files computed elsewhere (one per step; see
        :mod:`gramlin_analyze.capture.external`), instead of ``capture``.
    probe
        Probe file to store beside external ``activations`` (for labels).
    lr, lr_schedule
        Learning rate: a constant, or a file of ``(step, lr)`` pairs; both
        win over what the checkpoints record.
    workers
        Run on a ``LocalCluster`` of this many processes instead of threads.
    threads
        Tasks in parallel on the threaded scheduler (default: twice the cores,
        each with one BLAS/torch thread, so kernels overlap zarr I/O; one per
        core when capturing).
    scheduler
        Address of a running Dask scheduler (``tcp://host:8786``).
    progress
        Called as ``progress(done, total, bytes_done)`` after each checkpoint.
    on_error
        Called with one message per failed checkpoint.

    Returns
    -------
    IngestReport

    Examples
    --------
    >>> report = ingest("runs/digits/ckpts", "digits.zarr")  # doctest: +SKIP
    >>> report.ingested, report.failed  # doctest: +SKIP
    ([0, 100, 200], {})
    """
    t0 = time.perf_counter()
    store = str(store) if store is not None else default_store_path(directory)
    reader_options: dict[str, Any] = {}
    if state_dict_key:
        reader_options["state_dict_key"] = state_dict_key
    if allow_torchscript_code:
        reader_options["allow_code"] = True
    if capture is not None and activations is not None:
        raise UsageError("pass either a model to capture with (--model/--mlp-activation) or --activations DIR, not both")

    def prepare(known: dict[str, tuple[str, str]]):
        """Scan the run and check the options: everything that can fail before a write."""
        sources = scan(
            directory, format=format, order=order, reader_options=reader_options,
            settle_seconds=settle_seconds, known=known,
        )
        if not is_remote(store) and Path(store).resolve() == Path(directory).resolve():
            raise UsageError("the store cannot be the checkpoint directory itself; pass --store OUT")
        schedule = None
        if lr_schedule is not None:
            from gramlin_analyze.capture.lr import load_lr_schedule

            schedule = load_lr_schedule(lr_schedule)
        for src in sources:  # a bad --lr/--lr-schedule fails here, before anything is written
            _lr_for(src.step, None, lr, schedule)
        external: dict[int, Path] = {}
        if activations is not None:
            from gramlin_analyze.capture.external import discover_activation_files

            external = discover_activation_files(activations)
        return sources, schedule, external

    # An existing store is locked first: its manifest (read once, under the lock)
    # gives scan the fingerprints it may reuse. A new one is created only after
    # the scan succeeded.
    existing = _is_store(store, storage_options)
    if not existing:
        sources, schedule, external = prepare({})
    gs = GramlinStore(store, mode="a", storage_options=storage_options)
    with gs.lock(break_lock=break_lock):
        if existing:
            sources, schedule, external = prepare(_fingerprint_rows(gs.manifest()))
        report = IngestReport(store=store, scan_skipped=list(getattr(sources, "skipped", [])))
        gs.initialize(source=str(directory))
        capture, need_all = _resolve_capture(gs, capture, activations is not None)
        man = gs.manifest()
        ok_fp = {
            int(s): fp
            for s, st, fp in zip(man["step"], man["status"], man["fingerprint"], strict=True)
            if st == "ok"
        }
        if need_all:
            todo = list(sources)
        else:
            todo = [s for s in sources if ok_fp.get(s.step) != s.fingerprint]
        report.skipped = [s.step for s in sources if s not in todo]
        # Unchanged checkpoints that moved or were copied (same content, new
        # path or file stats): remember where they are now, so the next ingest
        # reuses their fingerprints without hashing.
        step_row = {int(st): i for i, st in enumerate(man["step"])}
        moved = [
            s for s in sources
            if s not in todo and s.step in step_row
            and (man["source_path"][step_row[s.step]], man.get("stat_key", [""] * len(man["step"]))[step_row[s.step]])
            != (str(s.path), s.stat_key)
        ]
        if moved:
            gs.write_rows(
                [step_row[s.step] for s in moved],
                source_path=[str(s.path) for s in moved],
                stat_key=[s.stat_key for s in moved],
            )

        # List tensors (headers only) to fix the template and fail odd checkpoints early.
        listed: dict[int, dict[str, LayerSpec]] = {}
        plan_errors: dict[int, str] = {}
        for src in todo:
            try:
                listed[src.step] = layers_of(reader_for(src.format, reader_options).list_tensors(src.path))
            except _READ_ERRORS as err:
                plan_errors[src.step] = error_message(err, src.path)

        stored = gs.layer_names()
        if stored:
            template = {}
            for name in stored:
                a = dict(gs.layer(name).attrs)
                template[name] = (tuple(a["source_shape"]), a["source_dtype"], bool(a["has_bias"]))
            if (layers or exclude) and sorted(select_layers(stored, layers, exclude)) != stored:
                raise UsageError(
                    f"{store} already holds layers {stored}; the --layers/--exclude selection "
                    "differs. Ingest into a new store to change the layer selection"
                )
        else:
            template = plan_layers(listed, include=layers, exclude=exclude)
            if not template and listed:
                avail = sorted({k for v in listed.values() for k in v})
                raise UsageError(
                    f"no layer matches --layers {layers or ['*']} --exclude {exclude or []}; "
                    f"available layers: {', '.join(avail) or '(no matrix-shaped weights)'}"
                )
        for step, lay in listed.items():
            problem = check_against(lay, template)
            if problem:
                src = next(s for s in todo if s.step == step)
                plan_errors[step] = f"{src.path}: {problem}"

        keep_old = {
            int(s) for s, st in zip(man["step"], man["status"], strict=True) if st in ("ok", "failed")
        }
        new_steps = np.asarray(sorted(keep_old | {s.step for s in sources}), dtype=np.int64)
        # The rows to (re)do, pending. New steps' fields go in with the axis;
        # stored rows (changed checkpoints) leave ok only once the options
        # below are checked.
        def pending(rows: list) -> dict[int, dict[str, Any]]:
            return {
                s.step: dict(
                    source_path=str(s.path), format=s.format, fingerprint=s.fingerprint,
                    stat_key=s.stat_key, bytes=s.bytes, status="pending",
                )
                for s in rows
            }

        stored_steps = {int(s) for s in man["step"]}
        pos = gs.set_step_axis(new_steps, rows=pending([s for s in todo if s.step not in stored_steps]))
        if not stored and template:
            _declare_layers(gs, template, listed)
            pos = gs.set_step_axis(new_steps)
        stored_dtypes = {n: dict(gs.layer(n).attrs)["stored_dtype"] for n in gs.layer_names()}

        runnable = [s for s in todo if s.step not in plan_errors]
        act_layers: list[str] = []
        if capture is not None:
            act_layers = _prepare_capture(gs, capture, runnable, reader_options)
        elif activations is not None:
            act_layers = _prepare_external(gs, external, probe, activations)

        redo = pending([s for s in todo if s.step in stored_steps])
        gs.write_row_fields([(pos[step], fields) for step, fields in redo.items()])
        gs.write_rows([pos[s] for s in plan_errors], error=list(plan_errors.values()), status="failed")
        for step, msg in plan_errors.items():
            report.failed[step] = msg
            if on_error:
                on_error(msg)

        capture_json = capture.to_json() if capture is not None else None
        run_token = uuid.uuid4().hex
        tasks = []
        for s in runnable:
            job = {
                "path": str(s.path),
                "format": s.format,
                "step": s.step,
                "files": [str(f) for f in s.files],
                "reader_options": reader_options,
                "capture": capture_json,
                "activation_layers": act_layers,
                "external": str(external[s.step]) if s.step in external else None,
                "external_dir": str(activations) if activations is not None else None,
                "run_token": run_token,
                # threads in this process: a task may return while its activation
                # writes finish (the driver marks the step ok only after them)
                "write_behind": not (workers or scheduler),
            }
            tasks.append((ingest_one, store, storage_options, pos[s.step], job, template, stored_dtypes))
        by_index = {pos[s.step]: s for s in runnable}
        done = 0
        # Manifest rows are buffered and flushed about once a second: one column
        # write per flush instead of per step. A step that finished but was not
        # flushed when killed is simply redone; ok is never written early.
        pending_rows: list[tuple[int, dict]] = []
        pending_nonfinite: dict[str, list[tuple[int, int]]] = {}
        deferred: list[tuple[dict, Any]] = []  # results whose writes are still running
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush
            # Per-layer NaN/Inf counts before the rows that mark their steps ok.
            # Arrays of one chunk (new stores) are rewritten whole, all at once.
            arrs = {name: writable(gs.layer(name)["nonfinite"]) for name in pending_nonfinite}
            whole = [n for n, a in arrs.items() if a.chunks[0] >= a.shape[0]]
            cols = {n: np.array(c) for n, c in zip(whole, read_all([arrs[n] for n in whole]), strict=True)}
            for name, pairs in pending_nonfinite.items():
                if name in cols:
                    for i, v in pairs:
                        cols[name][i] = v
                else:
                    arrs[name].set_coordinate_selection(
                        np.asarray([i for i, _ in pairs]), np.asarray([v for _, v in pairs], dtype=np.int64)
                    )
            write_all([(arrs[n], c) for n, c in cols.items()])
            pending_nonfinite.clear()
            gs.write_row_fields(pending_rows)
            pending_rows.clear()
            last_flush = time.monotonic()

        def on_done(res: dict) -> None:
            """A task returned; its step is recorded once its background writes are done too."""
            if res.get("pending") is not None:
                deferred.append((res, res.pop("pending")))
            else:
                record(res)
            drain(block=False)

        def drain(block: bool) -> None:
            keep = []
            for res, fut in deferred:
                if not (block or fut.done()):
                    keep.append((res, fut))
                    continue
                err = fut.exception()
                if err is not None and res["status"] == "ok":
                    res = {**res, "status": "failed", "error": error_message(err, by_index[res["index"]].path)}
                record(res)
            deferred[:] = keep

        def record(res: dict) -> None:
            nonlocal done
            src = by_index[res["index"]]
            done += 1
            report.bytes_read += src.bytes
            if res["status"] == "ok":
                rate, rate_source = _lr_for(src.step, res.get("lr"), lr, schedule)
                pending_rows.append((res["index"], {
                    "lr": rate,
                    "epoch": res.get("epoch"),
                    "lr_source": rate_source,
                    "optimizer": res.get("optimizer", ""),
                    "nonfinite": res["nonfinite"],
                    "error": "",
                    "status": "ok",
                }))
                for name, n in res.get("layer_nonfinite", {}).items():
                    pending_nonfinite.setdefault(name, []).append((res["index"], n))
                report.ingested.append(src.step)
                if res["nonfinite"]:
                    report.nonfinite[src.step] = res["nonfinite"]
            else:
                pending_rows.append((res["index"], {"error": res["error"], "status": "failed"}))
                report.failed[src.step] = res["error"]
                if on_error:
                    on_error(res["error"])
            if time.monotonic() - last_flush > 1.0:
                flush()
            if progress:
                progress(done, len(tasks), report.bytes_read)

        if progress:
            progress(0, len(tasks), 0)
        if "torch" not in sys.modules and any(_torch_dtype(d) for _, d, _ in template.values()):
            # bf16/fp8 weights are widened through torch inside the tasks; importing
            # it here lets the runner limit its threads like BLAS's (one per task).
            import torch  # noqa: F401
        if threads is None and capture is not None:
            # Capture is torch compute plus a background writer per task: one task
            # per core was 1.1x faster than two (benchmarks/capture.py), unlike
            # the weight copy, whose tasks wait on I/O.
            threads = os.cpu_count() or 1
        gs.ensure_consolidated()  # tasks find their arrays in the consolidated copy
        share_with_tasks(store, run_token, gs.view)  # threads of this process skip re-opening it
        if tasks:
            try:
                make_runner(workers, scheduler, threads)(tasks, on_done)
            finally:
                drain(block=True)
                flush()
                release_buffers()  # capture's chunk buffers, when tasks ran in this process
        # Steps that failed in an earlier run and were not retried still count.
        man = gs.manifest()
        for s, st, err in zip(man["step"], man["status"], man["error"], strict=True):
            if st == "failed" and int(s) not in report.failed:
                report.failed[int(s)] = err
        # The structure was consolidated before the tasks started; tasks and the
        # manifest write chunk data only, so the consolidated copy is current and
        # touch() keeps it (one metadata write instead of re-reading every node).
        gs.touch()
    report.ingested.sort()
    report.seconds = time.perf_counter() - t0
    return report


def _fingerprint_rows(man: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """``{source_path: (stat_key, fingerprint)}`` of the manifest's ok rows."""
    if "stat_key" not in man:
        return {}
    return {
        str(p): (str(k), str(f))
        for p, k, f, st in zip(man["source_path"], man["stat_key"], man["fingerprint"], man["status"], strict=True)
        if st == "ok" and k
    }


def _is_store(store: str, storage_options: dict | None) -> bool:
    """Whether a gramlin store is at ``store`` already."""
    try:
        GramlinStore(store, mode="r", storage_options=storage_options)
    except StoreError:
        return False
    return True


def _torch_dtype(name: str) -> bool:
    """Whether a stored dtype has no NumPy type (bf16, fp8): reading it needs torch."""
    try:
        np.dtype(name)
    except TypeError:
        return True
    return False


def _lr_for(step: int, meta_lr, constant, schedule) -> tuple[float | None, str]:
    if schedule is not None or constant is not None:
        from gramlin_analyze.capture.lr import resolve_lr

        return resolve_lr(step, meta_lr=meta_lr, constant=constant, schedule=schedule)
    if meta_lr is not None:
        return float(meta_lr), "checkpoint"
    return None, "unknown"


def _declare_layers(gs: GramlinStore, template: dict, listed: dict[int, dict[str, LayerSpec]]) -> None:
    gs.structure_changed()
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


def _resolve_capture(
    gs: GramlinStore, capture: CaptureConfig | None, external: bool
) -> tuple[CaptureConfig | None, bool]:
    """The capture config to use, and whether every step must be (re)read.

    A store remembers how it was captured; new checkpoints are captured the
    same way. A different probe set or capture setup is refused: it would
    mix two experiments in one store.
    """
    has_probe = L.PROBE in gs.view
    attrs = dict(gs.view[L.PROBE].attrs) if has_probe else {}
    if capture is None and not attrs.get("capture_config"):
        return None, False  # weights only: no need to import the capture code (and torch)
    from gramlin_analyze.capture.task import CaptureConfig

    stored = CaptureConfig.from_json(attrs["capture_config"]) if attrs.get("capture_config") else None
    if capture is None:
        return stored, False
    from gramlin_analyze.capture.task import cached_probe

    probe = cached_probe(capture.probe)
    if has_probe and attrs.get("fingerprint") != probe.fingerprint:
        raise ProbeError(
            f"{capture.probe}: this probe set differs from the one {gs.url} already holds "
            f"(fingerprint {str(attrs.get('fingerprint'))[:16]}…); a store holds one probe set: "
            "ingest into a new store to use another"
        )
    if stored is not None and stored.identity() != capture.identity():
        diff = {k: (stored.identity()[k], v) for k, v in capture.identity().items() if stored.identity()[k] != v}
        raise UsageError(
            f"{gs.url} was captured with other settings ({diff} as stored vs given); "
            "ingest into a new store to capture differently"
        )
    return capture, stored is None


def _prepare_capture(
    gs: GramlinStore, capture: CaptureConfig, runnable: list[CheckpointSource], reader_options: dict
) -> list[str]:
    """Declare ``/probe`` and the activation arrays (once); return the captured layers."""
    from gramlin_analyze.capture.task import cached_probe, plan_capture

    declared = [n for n in gs.layer_names() if "input" in gs.layer(n)]
    if L.PROBE in gs.view and declared:
        return declared
    if not runnable:
        return []
    src = runnable[0]
    with reader_for(src.format, reader_options).open(src.path) as h:
        counts = plan_capture(capture, h, gs.layer_names())
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
    gs.structure_changed()
    write_probe(gs, probe, attrs)
    itemsize = np.dtype(capture.dtype).itemsize
    specs = {}
    for name, (n, d) in counts.items():
        per_example = max(1, n // probe.n_samples)
        rows = L.activation_rows(n, d, itemsize, batch_rows=capture.batch_size * per_example)
        specs[name] = (n, d, rows, per_example)
    declare_activations(gs, specs, dtype=np.dtype(capture.dtype), agop=capture.agop)
    return list(counts)


def _prepare_external(gs: GramlinStore, files: dict[int, Path], probe: str | None, directory) -> list[str]:
    """Declare activation arrays from the first external file; store the probe if given.

    Rows per layer may be a multiple ``P`` of the probe's samples (conv
    positions, tokens: example-major, row ``i * P + p``); ``P`` is recorded as
    ``samples_per_example`` so that analyze pairs rows with labels.
    """
    from gramlin_analyze.capture.external import read_activation_file

    p = None
    if probe is not None:
        from gramlin_analyze.capture.probe import load_probe

        p = load_probe(probe)
        if L.PROBE in gs.root and gs.root[L.PROBE].attrs.get("fingerprint") != p.fingerprint:
            raise ProbeError(
                f"{probe}: this probe set differs from the one {gs.url} already holds; a store holds "
                "one probe set: ingest into a new store to use another"
            )
    declared = [n for n in gs.layer_names() if "input" in gs.layer(n)]
    if declared:
        return declared
    if not files:
        raise UsageError(f"{directory}: no activation files (step_<N>.npz or step_<N>.safetensors) found")
    first = read_activation_file(files[min(files)])
    stored = gs.layer_names()
    unknown = sorted(set(first) - set(stored))
    if unknown:
        raise UsageError(
            f"{files[min(files)]}: layers {unknown} are not in the store (stored: {stored}); "
            "name activation arrays after the stored layers"
        )
    per_example = {}
    for name, arrs in first.items():
        n = arrs["input"].shape[0]
        if p is None:
            per_example[name] = 1
        elif n % p.n_samples:
            raise ProbeError(
                f"{files[min(files)]}: layer {name} has {n} rows, not a multiple of the probe's "
                f"{p.n_samples} samples ({probe}); rows must be (example, position) pairs, example-major"
            )
        else:
            per_example[name] = n // p.n_samples
    gs.structure_changed()
    if p is not None and L.PROBE not in gs.root:
        attrs = {
            "fingerprint": p.fingerprint, "n_samples": int(p.n_samples), "loss": "external",
            "reduction": "external", "probe_path": str(Path(probe).resolve()),
            "model_source": f"external activations from {directory}", "long_name": "probe set",
        }
        if p.labels is not None:
            attrs["n_classes"] = int(np.max(p.labels)) + 1
        write_probe(gs, p, attrs)
    by_dtype: dict[np.dtype, dict[str, tuple[int, int, int, int]]] = {}
    for name, arrs in first.items():
        n, d = arrs["input"].shape
        dtype = arrs["input"].dtype if arrs["input"].dtype in (np.float16, np.float32, np.float64) else np.float32
        rows = L.activation_rows(n, d, np.dtype(dtype).itemsize, batch_rows=1)
        by_dtype.setdefault(np.dtype(dtype), {})[name] = (n, d, rows, per_example[name])
    for dtype, specs in by_dtype.items():
        declare_activations(gs, specs, dtype=dtype, agop=False)
    return sorted(first)
