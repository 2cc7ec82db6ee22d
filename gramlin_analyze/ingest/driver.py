"""``ingest`` in stages: check and plan (nothing written), open the write session,
write the plan, run one task per checkpoint, record each result in the manifest."""

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

from gramlin_analyze.errors import UsageError
from gramlin_analyze.ingest.plan import Plan, Request, is_store, make_plan, write_plan
from gramlin_analyze.ingest.task import error_message, ingest_one
from gramlin_analyze.scheduling import make_runner
from gramlin_analyze.store import (
    GramlinStore,
    WriteSession,
    read_all,
    release_buffers,
    share_with_tasks,
    writable,
    write_all,
)
from gramlin_analyze.store.faults import is_store_fault
from gramlin_analyze.store.provenance import source_of

if TYPE_CHECKING:
    from gramlin_analyze.capture.task import CaptureConfig

__all__ = ["IngestReport", "default_store_path", "ingest"]


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
        Tasks in parallel on threads (default: twice the cores, each with one
        BLAS/torch thread, so kernels overlap zarr I/O; one per core when capturing).
    scheduler
        Address of a running Dask scheduler (``tcp://host:8786``).
    progress
        Called as ``progress(done, total, bytes_done)`` after each checkpoint.
    on_error
        Called with one message per failed checkpoint.

    Returns
    -------
    IngestReport

    Raises
    ------
    UsageError, ProbeError, ModelError
        Before anything is written (no new store, an existing one unchanged):
        a bad option, probe, loss or model, or checkpoints that belong to
        another model or another run than the store's. A stored ``ok`` step
        is never given up for a new checkpoint that cannot replace it.
    StoreUnavailableError
        The store's disk is full or read-only, permission is denied, or its
        endpoint is gone: completed steps are kept.

    Examples
    --------
    >>> report = ingest("runs/digits/ckpts", "digits.zarr")  # doctest: +SKIP
    >>> report.ingested, report.failed  # doctest: +SKIP
    ([0, 100, 200], {})
    """
    t0 = time.perf_counter()
    store = str(store) if store is not None else default_store_path(directory)
    if capture is not None and activations is not None:
        raise UsageError(
            "pass either a model to capture with (--model/--mlp-activation) or --activations DIR, not both"
        )
    reader_options: dict[str, Any] = {}
    if state_dict_key:
        reader_options["state_dict_key"] = state_dict_key
    if allow_torchscript_code:
        reader_options["allow_code"] = True
    request = Request(
        directory=directory,
        store=store,
        layers=layers,
        exclude=exclude,
        format=format,
        order=order,
        reader_options=reader_options,
        settle_seconds=settle_seconds,
        capture=capture,
        activations=activations,
        probe=probe,
        lr=lr,
        lr_schedule=lr_schedule,
    )
    # Every check runs before the store is created or changed: a usage error
    # leaves no new store, and an existing one as it was. An existing store is
    # planned under its lock (its manifest, read once, gives scan the
    # fingerprints it may reuse); a new one is created only once its plan holds.
    plan = None if is_store(store, storage_options) else make_plan(request, None)
    with WriteSession(
        store, storage_options=storage_options, break_lock=break_lock, source=source_of(directory)
    ) as gs:
        if plan is None or not gs.created:  # (or another writer made it meanwhile)
            plan = make_plan(request, gs)
        report = IngestReport(
            store=store,
            scan_skipped=list(getattr(plan.sources, "skipped", [])),
            skipped=list(plan.skipped),
        )
        gs.initialize(source=source_of(directory))
        pos, stored_dtypes, act_layers = write_plan(gs, plan, request)
        for msg in {**plan.failed, **plan.kept}.values():
            if on_error:
                on_error(msg)
        report.failed.update({**plan.failed, **plan.kept})
        run_token = uuid.uuid4().hex
        jobs = _jobs(
            request, plan, pos, act_layers, run_token, write_behind=not (workers or scheduler)
        )
        tasks = [
            (ingest_one, store, storage_options, i, job, plan.template, stored_dtypes)
            for i, job in jobs
        ]
        recorder = _Recorder(
            gs,
            report,
            request,
            plan,
            {pos[s.step]: s for s in plan.runnable},
            total=len(tasks),
            progress=progress,
            on_error=on_error,
        )
        _run(
            gs,
            tasks,
            recorder,
            plan,
            run_token,
            workers=workers,
            scheduler=scheduler,
            threads=threads if threads is not None or plan.capture is None else os.cpu_count() or 1,
        )
        _earlier_failures(gs, report)
    report.ingested.sort()
    report.seconds = time.perf_counter() - t0
    return report


def _jobs(
    request: Request,
    plan: Plan,
    pos: dict[int, int],
    act_layers,
    run_token: str,
    *,
    write_behind: bool,
):
    """``(row index, task description)`` of every checkpoint to read."""
    capture_json = plan.capture.to_json() if plan.capture is not None else None
    return [
        (
            pos[s.step],
            {
                "path": str(s.path),
                "format": s.format,
                "step": s.step,
                "files": [str(f) for f in s.files],
                "reader_options": request.reader_options,
                "capture": capture_json,
                "activation_layers": act_layers,
                "external": str(plan.external[s.step]) if s.step in plan.external else None,
                "external_dir": str(request.activations)
                if request.activations is not None
                else None,
                "run_token": run_token,
                # threads in this process: a task may return while its activation
                # writes finish (the driver marks the step ok only after them)
                "write_behind": write_behind,
            },
        )
        for s in plan.runnable
    ]


def _run(
    gs: GramlinStore,
    tasks: list,
    recorder: _Recorder,
    plan: Plan,
    run_token: str,
    *,
    workers: int | None,
    scheduler: str | None,
    threads: int | None,
) -> None:
    """Run the tasks, recording each result; what finished is recorded even on an error.

    Capture runs one task per core (torch compute plus a background writer per
    task: 1.1x faster than two, benchmarks/capture.py), unlike the weight copy,
    whose tasks wait on I/O.
    """
    if recorder.progress:
        recorder.progress(0, len(tasks), 0)
    if "torch" not in sys.modules and any(_torch_dtype(d) for _, d, _ in plan.template.values()):
        # bf16/fp8 weights are widened through torch inside the tasks; importing
        # it here lets the runner limit its threads like BLAS's (one per task).
        import torch  # noqa: F401
    gs.ensure_consolidated()  # tasks find their arrays in the consolidated copy
    share_with_tasks(gs.url, run_token, gs.view)  # threads of this process skip re-opening it
    if not tasks:
        return
    try:
        make_runner(workers, scheduler, threads)(tasks, recorder.on_done)
    finally:
        recorder.drain(block=True)
        recorder.flush()
        release_buffers()  # capture's chunk buffers, when tasks ran in this process


def _earlier_failures(gs: GramlinStore, report: IngestReport) -> None:
    """Steps that failed in an earlier run and were not retried still count."""
    man = gs.manifest()
    for s, st, err in zip(man["step"], man["status"], man["error"], strict=True):
        if st == "failed" and int(s) not in report.failed:
            report.failed[int(s)] = err


def _torch_dtype(name: str) -> bool:
    """Whether a stored dtype has no NumPy type (bf16, fp8): reading it needs torch."""
    try:
        np.dtype(name)
    except TypeError:
        return True
    return False


class _Recorder:
    """Task results into the manifest.

    Rows are buffered and flushed about once a second: one column write per
    flush instead of per step. A step that finished but was not flushed when
    the process was killed is simply redone; ``ok`` is never written early.
    A result whose background writes are still running is recorded once they
    are done.
    """

    def __init__(
        self,
        gs: GramlinStore,
        report: IngestReport,
        request: Request,
        plan: Plan,
        by_index: dict,
        *,
        total: int,
        progress: Callable | None,
        on_error: Callable | None,
    ):
        self.gs, self.report, self.request, self.plan, self.by_index = (
            gs,
            report,
            request,
            plan,
            by_index,
        )
        self.total, self.progress, self.on_error = total, progress, on_error
        self.done = 0
        self.rows: list[tuple[int, dict]] = []
        self.nonfinite: dict[str, list[tuple[int, int]]] = {}
        self.deferred: list[tuple[dict, Any]] = []
        self.last_flush = time.monotonic()

    def on_done(self, res: dict) -> None:
        """A task returned."""
        if res.get("pending") is not None:
            self.deferred.append((res, res.pop("pending")))
        else:
            self.record(res)
        self.drain(block=False)

    def drain(self, block: bool) -> None:
        """Record the deferred results whose writes are done (all, waiting, when ``block``)."""
        keep = []
        for res, fut in self.deferred:
            if not (block or fut.done()):
                keep.append((res, fut))
                continue
            err = fut.exception()
            if err is not None and is_store_fault(err, self.gs.url):
                raise err
            if err is not None and res["status"] == "ok":
                res = {
                    **res,
                    "status": "failed",
                    "error": error_message(err, self.by_index[res["index"]].path),
                }
            self.record(res)
        self.deferred[:] = keep

    def record(self, res: dict) -> None:
        src = self.by_index[res["index"]]
        report = self.report
        self.done += 1
        report.bytes_read += src.bytes
        if res["status"] == "ok":
            from gramlin_analyze.ingest.plan import lr_for

            rate, rate_source = lr_for(src.step, res.get("lr"), self.request.lr, self.plan.schedule)
            self.rows.append(
                (
                    res["index"],
                    {
                        "lr": rate,
                        "epoch": res.get("epoch"),
                        "lr_source": rate_source,
                        "optimizer": res.get("optimizer", ""),
                        "nonfinite": res["nonfinite"],
                        "error": "",
                        "status": "ok",
                    },
                )
            )
            for name, n in res.get("layer_nonfinite", {}).items():
                self.nonfinite.setdefault(name, []).append((res["index"], n))
            report.ingested.append(src.step)
            if res["nonfinite"]:
                report.nonfinite[src.step] = res["nonfinite"]
        else:
            self.rows.append((res["index"], {"error": res["error"], "status": "failed"}))
            report.failed[src.step] = res["error"]
            if self.on_error:
                self.on_error(res["error"])
        if time.monotonic() - self.last_flush > 1.0:
            self.flush()
        if self.progress:
            self.progress(self.done, self.total, report.bytes_read)

    def flush(self) -> None:
        """Per-layer NaN/Inf counts, then the rows that mark their steps ok."""
        gs = self.gs
        arrs = {name: writable(gs.layer(name)["nonfinite"]) for name in self.nonfinite}
        # Arrays of one chunk (new stores) are rewritten whole, all at once.
        whole = [n for n, a in arrs.items() if a.chunks[0] >= a.shape[0]]
        cols = {
            n: np.array(c) for n, c in zip(whole, read_all([arrs[n] for n in whole]), strict=True)
        }
        for name, pairs in self.nonfinite.items():
            if name in cols:
                for i, v in pairs:
                    cols[name][i] = v
            else:
                arrs[name].set_coordinate_selection(
                    np.asarray([i for i, _ in pairs]),
                    np.asarray([v for _, v in pairs], dtype=np.int64),
                )
        write_all([(arrs[n], c) for n, c in cols.items()])
        self.nonfinite.clear()
        gs.write_row_fields(self.rows)
        self.rows.clear()
        self.last_flush = time.monotonic()
