"""``analyze``: one Dask graph over (step, layer), written to ``/metrics``.

Incremental: every (step, layer, family) records a provenance hash of its
inputs (the step's fingerprint, the probe's, the learning rate, the
options) in ``/metrics/_inputs``; only pairs whose hash is missing or
different are computed (``recompute=True`` forces all). Steps that are not
``ok`` are skipped and listed: their rows are never read.

A run is a sequence of stages: select what to compute (:mod:`.plan`), open
``/metrics`` for it, plan the stale (step, layer) jobs, then run their
tasks (:mod:`.task`) and each layer's phase 2 (:mod:`.phase2`), recording
as they finish (:mod:`.execution`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from gramlin_analyze.analysis.execution import Execution
from gramlin_analyze.analysis.metrics import resolve_families
from gramlin_analyze.analysis.output import MetricsOutput, ScalarBuffer, note_optimizer
from gramlin_analyze.analysis.plan import (
    JobPlan,
    RunPlan,
    check_tl_options,
    metrics_spec,
    plan_jobs,
    probe_targets,
    record_tl_attrs,
    select,
    tl_attrs,
    tl_setups,
)
from gramlin_analyze.analysis.report import AnalyzeReport
from gramlin_analyze.analysis.task import TaskContext, layer_step_task
from gramlin_analyze.scheduling import Target, WorkerCheck, dask_target, task_path, task_threads
from gramlin_analyze.store import GramlinStore, WriteSession, declare_metrics, share_with_tasks
from gramlin_analyze.store import layout as L

__all__ = ["analyze", "AnalyzeReport"]


def analyze(
    store: str | os.PathLike,
    *,
    metrics: list[str] | None = None,
    layers: list[str] | None = None,
    recompute: bool = False,
    tl_lambda: float = 0.0,
    center_features: bool = False,
    intercept: bool = False,
    tl_pca: int = 0,
    tl_pca_above: int = 1000,
    conv_samples: str = "position",
    workers: int | None = None,
    threads: int | None = None,
    threads_per_task: int | None = None,
    scheduler: Any = None,
    client: Any = None,
    connect_timeout: float | None = None,
    storage_options: dict | None = None,
    break_lock: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> AnalyzeReport:
    """Compute metrics over every ok (step, layer) of a store, into ``/metrics``.

    Parameters
    ----------
    store
        Store path or URL.
    metrics
        Metric or family names (``gram``, ``vc``, ``tl``, ``nfa``, ``nc``,
        ``cka``, or single metrics such as ``target_linearity``). Default:
        every family the store has the data for.
    layers
        Glob patterns over layer names (default: all).
    recompute
        Recompute even (step, layer) pairs whose inputs did not change.
    tl_lambda, center_features, intercept
        Target-linearity options (docs/metrics.md; defaults are the paper's).
    tl_pca, tl_pca_above, conv_samples
        The paper's conventions (docs/metrics.md): TL's ``H`` and the surrogate's ``Z``
        projected onto ``tl_pca`` principal axes when wider than ``tl_pca_above``
        (0 disables); multi-position layers' samples per ``image``, ``position`` or ``mean``.
    workers, threads, threads_per_task, client, scheduler, connect_timeout
        As for :func:`gramlin_analyze.ingest`: with none of them, the active ``distributed``
        client is used if there is one (a logged line says so).

    Returns
    -------
    AnalyzeReport

    Examples
    --------
    >>> import gramlin_analyze as ga
    >>> ga.analyze("digits.zarr", metrics=["gram", "tl"])  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    url = str(store)
    requested = resolve_families(metrics)
    # A mistyped path is an error, not a new store.
    GramlinStore(url, mode="r", storage_options=storage_options)
    report = AnalyzeReport(store=url)
    check_tl_options(tl_pca, tl_pca_above, conv_samples)
    tl_options = [tl_lambda, center_features, intercept, tl_pca, tl_pca_above, conv_samples]
    # The Dask client answers (or is refused) before the store is locked.
    with (
        dask_target(
            client, scheduler=scheduler, workers=workers, connect_timeout=connect_timeout
        ) as target,
        WriteSession(url, storage_options=storage_options, break_lock=break_lock) as gs,
    ):
        run = select(gs, url, layers, requested, report)
        if run is not None:
            setups = tl_setups(
                gs,
                run,
                tl_pca=tl_pca,
                tl_pca_above=tl_pca_above,
                conv_samples=conv_samples,
                report=report,
            )
            tl_attrs_ = tl_attrs(setups, tl_pca, tl_pca_above, conv_samples)
            out = _open_metrics(gs, url, run, report.warnings, tl_attrs_)
            base, probe_fp = _task_context(gs, run, out.run_token, tl_options, report)
            base = dataclasses.replace(base, tl_setup=setups)
            # each family's options, part of its input hash
            options = {"tl": tl_options, "nc": [conv_samples]}
            plan = plan_jobs(out, run, probe_fp, options, recompute=recompute, report=report)
            tasks = _tasks(task_path(url), storage_options, run, plan, base)
            execution = Execution(
                out,
                run,
                plan,
                report,
                progress=progress,
                recompute=recompute,
                store=(task_path(url), storage_options),
            )
            if tasks or execution.phase2_pending():
                _check_workers(target, url)
            with task_threads(threads_per_task):
                execution.run(tasks, workers=workers, scheduler=target.client, threads=threads)
        if requested is None or "vc" in requested:  # the record: beside the trapezoid estimate
            from gramlin_analyze.analysis.recorded import analyze_recorded

            report.recorded_layers = analyze_recorded(gs, layers=layers)
    report.seconds = time.perf_counter() - t0
    return report


def _check_workers(target: Target, url: str) -> None:
    """Every worker can write the store (a local one: a URL is the store's own to check)."""
    path = task_path(url)
    target.check_workers(WorkerCheck(writable=(path,) if "://" not in path else ()))


def _open_metrics(
    gs: GramlinStore, url: str, run: RunPlan, warnings: list[str], tl_attrs_: dict
) -> MetricsOutput:
    """Lay out ``/metrics`` for the run (marking what assumes SGD) and share the open store with its tasks."""
    declare_metrics(gs, metrics_spec(gs, run))
    note_optimizer(gs, run.families, warnings)
    record_tl_attrs(gs, tl_attrs_)  # how TL/NC samples and PCA were chosen, per layer
    gs.ensure_consolidated()  # tasks find their arrays in the consolidated copy
    m = gs.view[L.METRICS]
    run_token = uuid.uuid4().hex
    # threads of this process skip re-opening it (tasks open the store by its absolute path)
    share_with_tasks(task_path(url), run_token, gs.view)
    layer_index = {str(n): j for j, n in enumerate(m["layer"][:])}
    return MetricsOutput(gs, m, ScalarBuffer(m), layer_index, run_token)


def _task_context(
    gs: GramlinStore, run: RunPlan, run_token: str, tl_options: list, report: AnalyzeReport
) -> tuple[TaskContext, str]:
    """What every task gets (the probe's targets, the options), and the probe's fingerprint."""
    targets, probe_fp = probe_targets(gs, run, report)
    tl_lambda, center_features, intercept = tl_options[:3]
    ctx = TaskContext(
        run_token=run_token,
        final_index=run.ok[-1],
        tl_lambda=tl_lambda,
        center_features=center_features,
        intercept=intercept,
        targets=targets,
    )
    return ctx, probe_fp


def _tasks(
    url: str, storage_options: dict | None, run: RunPlan, plan: JobPlan, base: TaskContext
) -> list[tuple]:
    """One task per planned (step, layer), with its step's learning rate and options."""
    prev_ok = run.prev_ok
    tasks = []
    for (i, layer), fams in plan.jobs.items():
        in_task = (i, layer) in plan.in_task
        ctx = dataclasses.replace(
            base,
            gamma=float(run.lr[i]),
            spectrum_k=run.spectrum_k[layer],
            gram_change_in_task=in_task,
            gram_prev_index=prev_ok[i] if in_task else None,
        )
        tasks.append((layer_step_task, url, storage_options, layer, i, fams, ctx))
    return tasks
