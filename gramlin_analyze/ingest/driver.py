"""``ingest`` in stages: check the inputs and plan (nothing written), open the write
session, write the plan, run one task per checkpoint, record each result in the manifest."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gramlin_analyze.errors import UsageError
from gramlin_analyze.ingest.plan import Plan, Request, is_store, make_plan
from gramlin_analyze.ingest.record import Recorder
from gramlin_analyze.ingest.task import CheckpointJob, TaskContext, ingest_one
from gramlin_analyze.ingest.write import WrittenPlan, write_plan
from gramlin_analyze.io.discovery import CheckpointSource
from gramlin_analyze.io.remote import is_url
from gramlin_analyze.io.run_meta import read_run_metadata
from gramlin_analyze.scheduling import Target, WorkerCheck, dask_target, make_runner, task_path
from gramlin_analyze.store import GramlinStore, WriteSession, release_buffers, share_with_tasks
from gramlin_analyze.store.provenance import (
    check_run_attrs,
    hyperparameters_update,
    run_attrs_update,
    source_of,
)

if TYPE_CHECKING:
    from gramlin_analyze.capture.config import CaptureConfig

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
    ran_on: str = ""  # "on the active Dask client at tcp://…"; empty on this process or --workers

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
    threads_per_task: int | None = None,
    device: str = "cpu",
    scheduler: Any = None,
    client: Any = None,
    connect_timeout: float | None = None,
    storage_options: dict | None = None,
    break_lock: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    run_name: str | None = None,
    run_attrs: Mapping[str, Any] | None = None,
    replace_run_attrs: bool = False,
    select: Callable[[CheckpointSource], bool] | None = None,
) -> IngestReport:
    """Ingest every checkpoint under ``directory`` into the store at ``store``.

    Only new, changed (fingerprint) or not-yet-``ok`` checkpoints are read.

    Parameters
    ----------
    directory
        Run directory (searched recursively) or one checkpoint.
    store, storage_options
        Store path or fsspec URL (default ``<directory>.zarr``); fsspec options of a remote one.
    layers, exclude
        Glob patterns over normalized layer names (``encoder.*``).
    format, order, state_dict_key, settle_seconds, allow_torchscript_code
        See :func:`gramlin_analyze.io.discovery.scan`; the last reads TorchScript archives.
    capture
        Capture probe-set activations and gradients of every checkpoint (``CaptureConfig``);
        a store captured before keeps capturing new checkpoints the same way.
    activations, probe
        Directory of activation files computed elsewhere (:mod:`~gramlin_analyze.capture.external`),
        instead of ``capture``; the probe file to store beside them (for labels).
    lr, lr_schedule
        Learning rate, a constant or a file of ``(step, lr)`` pairs: wins over the checkpoints'.
    workers, threads
        Processes of a ``LocalCluster``; else tasks on threads (default: twice the cores, each
        with one BLAS/torch thread; one per core when capturing).
    threads_per_task
        BLAS/torch threads of each task (default: the cores of the machine a task runs on over
        the tasks running there at once, at least one).
    device
        Where capture runs: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"`` (every worker needs
        that GPU); activations and gradients are stored the same way either way.
    client, scheduler, connect_timeout
        A ``distributed.Client`` (used as is), a Dask cluster or a scheduler address
        (``scheduler``: its older name), which must answer within ``connect_timeout`` seconds
        (default 10). Neither, and no ``workers``: the active ``distributed`` client, if any.
    break_lock
        Remove a remote store's lock left by a writer that died.
    progress, on_error
        Called as ``progress(done, total, bytes_done)`` after each checkpoint; with each failure.
    run_name, run_attrs, replace_run_attrs
        The run's name and attributes (numbers, flags, text: ``{"label_noise": 0.5}``), stored
        in the root attributes beside the hyper-parameters read from the checkpoints. Giving a
        stored attribute another value is refused unless ``replace_run_attrs`` (docs/runs.md).
    select
        Consider only the scanned checkpoints this returns True for (the others are left for a
        later run): :func:`gramlin_analyze.ingest.watch` passes the complete ones.

    Raises
    ------
    UsageError, ProbeError, ModelError, SchedulerUnreachableError
        Before anything is written (no new store, an existing one unchanged): a bad option, probe,
        loss or model, checkpoints of another model or run than the store's, or no Dask scheduler
        answering. A stored ``ok`` step is never given up for a checkpoint that cannot replace it.
    WorkerSetupError
        Before any task ran (and, for a new store, before it is created): a worker cannot reach
        a path of the run, import the model, or run on ``device``.
    StoreUnavailableError
        The store's disk is full or read-only, permission is denied, or its endpoint is gone:
        completed steps are kept.

    Examples
    --------
    >>> report = ingest("runs/digits/ckpts", "digits.zarr")  # doctest: +SKIP
    >>> report.ingested, report.failed  # doctest: +SKIP
    ([0, 100, 200], {})
    """
    return _ingest(_Options(**locals()))  # locals() holds just the parameters here


@dataclass(frozen=True, slots=True)
class _Options:
    """The arguments of one :func:`ingest` call."""

    directory: str | os.PathLike
    store: str | os.PathLike | None
    layers: list[str] | None
    exclude: list[str] | None
    format: str | None
    order: str | None
    state_dict_key: str | None
    settle_seconds: float
    allow_torchscript_code: bool
    capture: CaptureConfig | None
    activations: str | os.PathLike | None
    probe: str | os.PathLike | None
    lr: float | None
    lr_schedule: str | os.PathLike | None
    workers: int | None
    threads: int | None
    threads_per_task: int | None
    device: str
    scheduler: Any
    client: Any
    connect_timeout: float | None
    storage_options: dict | None
    break_lock: bool
    progress: Callable[[int, int, int], None] | None
    on_error: Callable[[str], None] | None
    run_name: str | None
    run_attrs: Mapping[str, Any] | None
    replace_run_attrs: bool
    select: Callable[[CheckpointSource], bool] | None


def _ingest(o: _Options) -> IngestReport:
    """Check the inputs, plan, open the write session, write the plan, run and record the tasks."""
    t0 = time.perf_counter()
    request = _check_inputs(o)
    # The Dask client answers (or is refused) before the store is created or locked.
    with dask_target(
        o.client, scheduler=o.scheduler, workers=o.workers, connect_timeout=o.connect_timeout
    ) as target:
        report = _ingest_on(o, request, target)
    report.ingested.sort()
    report.seconds = time.perf_counter() - t0
    return report


def _ingest_on(o: _Options, request: Request, target: Target) -> IngestReport:
    """Plan, open the write session, write the plan, run and record the tasks on ``target``."""
    # Every check runs before the store is created or changed: a usage error
    # leaves no new store, and an existing one as it was. An existing store is
    # planned under its lock (its manifest, read once, gives scan the
    # fingerprints it may reuse); a new one is created only once its plan holds.
    # The workers are checked first (the capture setup's check runs on one).
    _check_where_tasks_run(o, request, target)
    exists = is_store(request.store, o.storage_options)
    plan = None if exists else make_plan(request, None, call=target.call)
    source = source_of(o.directory)
    with WriteSession(
        request.store, storage_options=o.storage_options, break_lock=o.break_lock, source=source
    ) as gs:
        run_update = run_attrs_update(
            gs.root.attrs,
            request.store,
            run_name=o.run_name,
            run_attrs=o.run_attrs,
            replace=o.replace_run_attrs,
        )
        if plan is None or not gs.created:  # (or another writer made it meanwhile)
            plan = make_plan(request, gs, call=target.call)
        if plan.runnable:  # the store as created, a stored capture's model: before any write
            target.check_workers(_worker_check(o, request, plan))
        report = IngestReport(
            store=request.store,
            scan_skipped=list(getattr(plan.sources, "skipped", [])),
            skipped=list(plan.skipped),
            ran_on=target.where,
        )
        gs.initialize(source=source)
        found = read_run_metadata(plan.sources)
        gs.set_root_attributes(run_update | hyperparameters_update(gs.root.attrs, found))
        written = write_plan(gs, plan, request)
        _report_plan_failures(report, plan, o.on_error)
        _run_tasks(gs, o, target, _Staged(request, plan, written), report)
        _earlier_failures(gs, report)
    return report


def _check_inputs(o: _Options) -> Request:
    """The request the plan is made for; options that contradict each other are refused."""
    if o.capture is not None and o.activations is not None:
        raise UsageError(
            "pass either a model to capture with (--model/--mlp-activation) or --activations DIR, not both"
        )
    _check_execution(o)
    check_run_attrs(o.run_attrs)
    reader_options: dict[str, Any] = {}
    if o.state_dict_key:
        reader_options["state_dict_key"] = o.state_dict_key
    if o.allow_torchscript_code:
        reader_options["allow_code"] = True
    if is_url(o.directory):
        if o.store is None:
            raise UsageError(f"{o.directory}: checkpoints behind a URL need --store OUT")
        # Checkpoints behind a URL are read with the store's storage options.
        reader_options["storage_options"] = o.storage_options
    return Request(
        directory=o.directory,
        store=str(o.store) if o.store is not None else default_store_path(o.directory),
        layers=o.layers,
        exclude=o.exclude,
        format=o.format,
        order=o.order,
        reader_options=reader_options,
        settle_seconds=o.settle_seconds,
        capture=o.capture,
        activations=o.activations,
        probe=o.probe,
        lr=o.lr,
        lr_schedule=o.lr_schedule,
        select=o.select,
    )


def _check_execution(o: _Options) -> None:
    """``threads_per_task`` and ``device`` make sense, and ``device`` has capture to run."""
    if o.threads_per_task is not None and o.threads_per_task < 1:
        raise UsageError(f"--threads-per-task must be at least 1, got {o.threads_per_task}")
    if o.device == "cpu":  # the default: no need to import the capture package (and torch)
        return
    from gramlin_analyze.capture.device import check_device_name

    if check_device_name(o.device) != "cpu" and o.capture is None:
        raise UsageError(
            f"--device {o.device} is where capture runs: pass a model to capture with "
            "(--model/--mlp-activation and --probe), or leave --device out"
        )


def _report_plan_failures(
    report: IngestReport, plan: Plan, on_error: Callable[[str], None] | None
) -> None:
    """Checkpoints the plan found unusable: failed, or kept as stored before."""
    for msg in {**plan.failed, **plan.kept}.values():
        if on_error:
            on_error(msg)
    report.failed.update({**plan.failed, **plan.kept})


@dataclass(frozen=True, slots=True)
class _Staged:
    """What the stages before the tasks settled: the request, its checked plan, what was written."""

    request: Request
    plan: Plan
    written: WrittenPlan


def _run_tasks(
    gs: GramlinStore, o: _Options, target: Target, staged: _Staged, report: IngestReport
) -> None:
    """One task per runnable checkpoint, each result recorded as it comes."""
    request, plan, written = staged.request, staged.plan, staged.written
    ctx = _task_context(o, target, staged)
    pos = written.positions
    jobs = [_job(pos[s.step], s, plan) for s in plan.runnable]
    recorder = Recorder(
        gs,
        report,
        request,
        plan,
        {pos[s.step]: s for s in plan.runnable},
        total=len(jobs),
        progress=o.progress,
        on_error=o.on_error,
    )
    # Capture runs one task per core (torch compute plus a background writer
    # per task: 1.1x faster than two, benchmarks/capture.py), unlike the weight
    # copy, whose tasks wait on I/O.
    threads = o.threads if o.threads is not None or plan.capture is None else os.cpu_count() or 1
    torch_dtypes = any(_torch_dtype(d) for _, d, _ in plan.template.values())
    runner = make_runner(
        o.workers,
        target.client,
        threads,
        threads_per_task=o.threads_per_task,
        preload=("torch",) if plan.capture is not None or torch_dtypes else (),
    )
    _run(gs, ctx, jobs, recorder, plan, runner)


def _run(
    gs: GramlinStore,
    ctx: TaskContext,
    jobs: list[CheckpointJob],
    recorder: Recorder,
    plan: Plan,
    runner: Callable[[list, Callable[[Any], None]], None],
) -> None:
    """Run the tasks, recording each result; what finished is recorded even on an error."""
    if recorder.progress:
        recorder.progress(0, len(jobs), 0)
    if "torch" not in sys.modules and any(_torch_dtype(d) for _, d, _ in plan.template.values()):
        # bf16/fp8 weights are widened through torch inside the tasks; importing
        # it here lets the runner limit its threads like BLAS's (one per task).
        import torch  # noqa: F401
    # tasks find their arrays in the consolidated copy; the store's, when they
    # run in other processes (write_behind: all in this one)
    gs.ensure_consolidated(on_store=not ctx.write_behind)
    # threads of this process skip re-opening it
    share_with_tasks(ctx.store_url, ctx.run_token, gs.view)
    if not jobs:
        return
    try:
        runner([(ingest_one, ctx, job) for job in jobs], recorder.on_done)
    finally:
        recorder.drain(block=True)
        recorder.flush()
        release_buffers()  # capture's chunk buffers, when tasks ran in this process


def _task_context(o: _Options, target: Target, staged: _Staged) -> TaskContext:
    """What every task of this run shares; its paths absolute, as workers elsewhere need them."""
    request, plan, written = staged.request, staged.plan, staged.written
    return TaskContext(
        store_url=task_path(request.store),
        storage_options=o.storage_options,
        run_token=uuid.uuid4().hex,
        template=plan.template,
        stored_dtypes=written.stored_dtypes,
        reader_options=plan.reader_options,  # (with the model source's Conv1D layers)
        capture=plan.capture.for_tasks().to_json() if plan.capture is not None else None,
        activation_layers=written.activation_layers,
        external_dir=task_path(request.activations) if request.activations is not None else None,
        write_behind=not (o.workers or target.client is not None),
        device=o.device,
        recorded=written.recorded or None,
    )


def _check_where_tasks_run(o: _Options, request: Request, target: Target) -> None:
    """Before planning: the workers (or, without a cluster, this machine) can run the tasks.

    A path a worker cannot reach, a model it cannot import or a GPU it lacks is
    one error before a new store is created.
    """
    if target.client is None:
        if o.device != "cpu":
            from gramlin_analyze.capture.device import device_problem

            problem = device_problem(o.device)
            if problem:
                raise UsageError(
                    f"no CUDA device on this machine ({problem}); run without --device "
                    f"{o.device}, or on workers with a GPU (--scheduler, --cluster)"
                )
        return
    store = task_path(request.store)
    capture = request.capture.for_tasks() if request.capture is not None else None
    local = "://" not in store
    readable = [task_path(request.directory), request.activations, capture and capture.probe]
    target.check_workers(
        WorkerCheck(
            writable=(store,) if local and os.path.exists(store) else (),
            creatable=(store,) if local and not os.path.exists(store) else (),
            readable=tuple(task_path(p) for p in readable if p and not is_url(p)),
            model=capture.model if capture is not None else None,
            device=o.device,
        )
    )


def _worker_check(o: _Options, request: Request, plan: Plan) -> WorkerCheck:
    """The store to write, the checkpoints, activations and probe to read, the model to import."""
    config = plan.capture.for_tasks() if plan.capture is not None else None
    store = task_path(request.store)
    readable = [task_path(request.directory), request.activations, config and config.probe]
    return WorkerCheck(
        writable=tuple(p for p in [store] if "://" not in p),
        readable=tuple(task_path(p) for p in readable if p and not is_url(p)),
        model=config.model if config is not None else None,
        device=o.device,
    )


def _job(index: int, s: CheckpointSource, plan: Plan) -> CheckpointJob:
    """One checkpoint's task description, its paths absolute."""
    external = plan.external.get(s.step)
    return CheckpointJob(
        index=index,
        step=s.step,
        path=task_path(s.path),
        format=s.format,
        # (objects behind a URL have no os.stat for the task's changed-file check)
        files=tuple(task_path(f) for f in s.files if not is_url(f)),
        external=task_path(external) if external is not None else None,
        record=task_path(s.record) if s.record is not None else None,
    )


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
