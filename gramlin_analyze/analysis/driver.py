"""``analyze``: one Dask graph over (step, layer), written to ``/metrics``.

Incremental: every (step, layer, family) records a provenance hash of its
inputs (the step's fingerprint, the probe's, the learning rate, the
options) in ``/metrics/_inputs``; only pairs whose hash is missing or
different are computed (``recompute=True`` forces all). Steps that are not
``ok`` are skipped and listed: their rows are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gramlin_analyze.analysis.metrics import FAMILIES, METRIC_DOCS, resolve_families
from gramlin_analyze.analysis.task import (
    _norms,
    _ratio,
    hold_scratch,
    layer_step_task,
    release_scratch,
    scratch_array,
)
from gramlin_analyze.errors import MissingDataError, UsageError
from gramlin_analyze.io.names import select_layers
from gramlin_analyze.reducers.alignment import cosine_np, norm_ratio_np, pearson_np
from gramlin_analyze.scheduling import kernel_threads, make_runner, stop_requested
from gramlin_analyze.store import (
    INPUTS,
    GramlinStore,
    MatrixSpec,
    MetricsSpec,
    WriteSession,
    declare_metrics,
    read_all,
    read_step,
    share_with_tasks,
    write_all,
)
from gramlin_analyze.store import layout as L

__all__ = ["analyze", "AnalyzeReport"]


@dataclass
class AnalyzeReport:
    store: str
    families: list[str] = field(default_factory=list)
    computed: int = 0
    up_to_date: int = 0
    skipped_steps: dict[int, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    partial: dict[str, list[str]] = field(default_factory=dict)
    nonfinite: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0


def _hash(*parts: Any) -> str:
    return hashlib.blake2b(
        json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12
    ).hexdigest()


def _how_to_add(piece: str, url: str) -> str:
    return {
        "activations": (
            f"the store has no captured activations (/layers/<name>/input); add them with "
            f"`gramlin-analyze ingest RUN_DIR --store {url} --probe PROBE.npz --model pkg.module:build` "
            "(or --mlp-activation NAME, or --activations DIR)"
        ),
        "targets": (
            f"the store has no probe labels or targets (/probe); ingest with "
            f"`--probe PROBE.npz` into {url}"
        ),
        "labels": (
            f"neural collapse needs class labels; the probe set of {url} has none (regression targets "
            "or no /probe): ingest with a probe file holding `labels`"
        ),
        "lr": (
            f"the virtual covariance needs the learning rate at each step, and {url} records none; "
            "re-ingest with --lr RATE or --lr-schedule FILE (checkpoints that record it need nothing)"
        ),
        "agop": f"the store has no AGOP; ingest with --capture-agop into {url}",
        "weight": f"{url} holds no layers yet; run `gramlin-analyze ingest RUN_DIR --store {url}`",
    }[piece]


class _Scalars:
    """In-memory copies of the small (step, layer) arrays, flushed whole.

    One writer (the driver) updates values cell by cell; writing each cell
    would rewrite a chunk per cell. Values are flushed before their
    provenance hashes, so a kill loses at most work that is then redone.
    """

    def __init__(self, m):
        self.m = m
        self.cache: dict[str, np.ndarray] = {}
        self.dirty: set[str] = set()
        self.last = time.monotonic()
        self.lock = threading.RLock()
        self.autoflush = True

    def _get(self, path: str) -> np.ndarray:
        with self.lock:
            return self._load(path)

    def _load(self, path: str) -> np.ndarray:
        if path not in self.cache:
            arr = read_all([self.m[path]])[0]
            self.cache[path] = (
                np.asarray(arr, dtype=object) if arr.dtype.kind in "OTU" else np.array(arr)
            )
        return self.cache[path]

    def get(self, path: str) -> np.ndarray:
        return self._get(path)

    def set(self, path: str, i: int, j: int, value) -> None:
        with self.lock:
            self._load(path)[i, j] = value
            self.dirty.add(path)
            if self.autoflush and time.monotonic() - self.last > 5.0:
                self.flush()

    def flush(self) -> None:
        with self.lock:
            # Values (together), then their provenance hashes (together).
            for hashes in (False, True):
                write_all(
                    [
                        (self.m[p], self.cache[p])
                        for p in sorted(self.dirty)
                        if p.startswith(INPUTS) == hashes
                    ]
                )
            self.dirty.clear()
            self.last = time.monotonic()


def _available(gs: GramlinStore, layers: list[str], lr: np.ndarray) -> dict[str, dict[str, bool]]:
    """What each layer has: ``{layer: {piece: bool}}`` for every piece a family needs."""
    root = gs.view
    probe = root[L.PROBE] if L.PROBE in root else None
    shared = {
        "weight": True,
        "targets": probe is not None and ("labels" in probe or "targets" in probe),
        "labels": probe is not None and "labels" in probe,
        "lr": bool(np.isfinite(lr).any()),
    }
    out = {}
    for n in layers:
        grp = gs.layer(n)
        out[n] = dict(shared, activations="input" in grp, agop="agop" in grp)
    return out


def _metrics_spec(
    gs: GramlinStore, layers: list[str], families: list[str], spectrum_k: dict
) -> MetricsSpec:
    """What these families write for these layers (the store lays it out)."""
    scalars: dict[str, dict[str, Any]] = {}
    inputs: list[str] = []
    matrices: dict[str, dict[str, MatrixSpec]] = {layer: {} for layer in layers}
    for fam in families:
        f = FAMILIES[fam]
        for name in f.scalars + f.phase2_scalars:
            scalars[name] = {"long_name": METRIC_DOCS[name], "family": fam}
        inputs += [fam, fam + "_phase2"] if (f.phase2_scalars or f.phase2_matrices) else [fam]
        for layer in layers:
            weight = gs.layer(layer)["weight"]
            d = weight.shape[2]
            for name in f.matrices + f.phase2_matrices:
                if name == "spectrum":
                    shape, dims = (spectrum_k[layer],), ("k",)
                else:
                    shape, dims = (d, d), ("in_i", "in_j")
                # The Gram is stored in its weight's dtype: computed in float64, but
                # its precision is that of W, and float64 doubled the bytes written
                # (the cost of --metrics gram). VC/VCS are sums over samples and
                # steps and stay float64.
                dtype = (
                    np.promote_types(weight.dtype, np.float32)
                    if name == "gram"
                    else np.dtype("float64")
                )
                attrs = {"long_name": METRIC_DOCS[name], "family": fam, "computed_in": "float64"}
                matrices[layer][name] = MatrixSpec(shape, dims, np.dtype(dtype), attrs)
    return MetricsSpec(scalars=scalars, inputs=tuple(inputs), matrices=matrices)


def analyze(
    store: str | os.PathLike,
    *,
    metrics: list[str] | None = None,
    layers: list[str] | None = None,
    recompute: bool = False,
    tl_lambda: float = 0.0,
    center_features: bool = False,
    intercept: bool = False,
    workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
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
    workers, threads, scheduler
        As for :func:`gramlin_analyze.ingest`.

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
    GramlinStore(
        url, mode="r", storage_options=storage_options
    )  # a mistyped path is an error, not a new store
    report = AnalyzeReport(store=url)
    with WriteSession(url, storage_options=storage_options, break_lock=break_lock) as gs:
        run = _select(gs, url, layers, requested, report)
        if run is not None:
            declare_metrics(gs, _metrics_spec(gs, run.layers, run.families, run.spectrum_k))
            gs.ensure_consolidated()  # tasks find their arrays in the consolidated copy
            m = gs.view[L.METRICS]
            run_token = uuid.uuid4().hex
            share_with_tasks(url, run_token, gs.view)  # threads of this process skip re-opening it
            layer_index = {str(n): j for j, n in enumerate(m["layer"][:])}
            ctx_base, probe_fp = _task_context(
                gs,
                run,
                report,
                run_token,
                tl_lambda=tl_lambda,
                center_features=center_features,
                intercept=intercept,
            )
            buf = _Scalars(m)
            options = {"tl": [tl_lambda, center_features, intercept]}
            jobs, wanted = _plan_jobs(buf, run, layer_index, probe_fp, options, recompute, report)
            in_task = _gram_change_in_task(buf, run, layer_index, jobs, recompute)
            tasks = []
            for (i, layer), fams in jobs.items():
                ctx = dict(ctx_base, gamma=float(run.lr[i]), spectrum_k=run.spectrum_k[layer])
                if (i, layer) in in_task:
                    ctx["gram_prev_index"] = run.prev_ok[i]
                tasks.append((layer_step_task, url, storage_options, layer, i, fams, ctx))
            _Execution(
                gs, m, buf, run, layer_index, jobs, wanted, in_task, report, progress, recompute
            ).run(tasks, workers=workers, scheduler=scheduler, threads=threads)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass(frozen=True)
class _Run:
    """What one ``analyze`` computes, decided before anything is written."""

    layers: list[str]
    families: list[str]
    layer_fams: dict[str, list[str]]
    ok: list[int]
    steps: np.ndarray
    fps: np.ndarray
    lr: np.ndarray
    spectrum_k: dict[str, int]

    @property
    def prev_ok(self) -> dict[int, int | None]:
        return dict(zip(self.ok, [None, *self.ok[:-1]], strict=True))


def _select(
    gs: GramlinStore,
    url: str,
    layers: list[str] | None,
    requested: list[str] | None,
    report: AnalyzeReport,
) -> _Run | None:
    """The layers, families and ok steps to compute; None when there is nothing to do.

    A family runs on the layers that have its data (an embedding without
    captured inputs does not stop TL on the others); it is reported as
    unavailable only when no chosen layer has the data.
    """
    all_layers = gs.layer_names()
    chosen = select_layers(all_layers, layers, None)
    if layers and not chosen:
        raise UsageError(
            f"--layers {layers} matches no layer of {url}; layers: {', '.join(all_layers)}"
        )
    man = gs.manifest()
    steps, status, fps = man["step"], man["status"], man["fingerprint"]
    lr = np.asarray(man["lr"], dtype=np.float64)
    ok = [i for i, s in enumerate(status) if s == "ok"]
    report.skipped_steps = {
        int(steps[i]): str(status[i]) for i in range(len(steps)) if status[i] != "ok"
    }
    avail = _available(gs, chosen, lr)
    layer_fams: dict[str, list[str]] = {n: [] for n in chosen}
    families = []
    for fam in requested or list(FAMILIES):
        ready = [n for n in chosen if all(avail[n][p] for p in FAMILIES[fam].needs)]
        if not ready:
            missing = next(p for p in FAMILIES[fam].needs if not any(avail[n][p] for n in chosen))
            if requested:
                raise MissingDataError(f"{fam}: {_how_to_add(missing, url)}")
            report.unavailable[fam] = _how_to_add(missing, url)
            continue
        families.append(fam)
        for n in ready:
            layer_fams[n].append(fam)
        skipped = [n for n in chosen if n not in ready]
        if skipped:
            report.partial[fam] = skipped
    report.families = families
    if not families or not ok or not chosen:
        return None
    spectrum_k = {n: int(min(gs.layer(n)["weight"].shape[1:])) for n in chosen}
    return _Run(chosen, families, layer_fams, ok, steps, fps, lr, spectrum_k)


def _task_context(
    gs: GramlinStore,
    run: _Run,
    report: AnalyzeReport,
    run_token: str,
    *,
    tl_lambda: float,
    center_features: bool,
    intercept: bool,
) -> tuple[dict[str, Any], str]:
    """What every task gets (targets from the probe set), and the probe's fingerprint.

    (n,) labels go with every position of an example; (n, T) token labels go
    with their own row (example-major, like the activations). A layer whose
    samples per example match neither loses TL and NC, with a note.
    """
    ctx: dict[str, Any] = {
        "tl_lambda": tl_lambda,
        "center_features": center_features,
        "intercept": intercept,
        "final_index": run.ok[-1],
        "run_token": run_token,
    }
    if L.PROBE not in gs.view:
        return ctx, ""
    pg = gs.view[L.PROBE]
    if "labels" in pg:
        raw = np.asarray(pg["labels"][:], dtype=np.int64)
        labels = raw.reshape(-1)
        c = int(pg.attrs.get("n_classes", labels.max() + 1))
        per_label = int(np.prod(raw.shape[1:], dtype=np.int64)) if raw.ndim > 1 else 1
        ctx.update(labels=labels, n_classes=c, Y=np.eye(c)[labels], labels_per_example=per_label)
        for n in run.layers:
            per = int(gs.layer(n).attrs.get("samples_per_example", 1))
            if per_label not in (1, per):
                for fam in ("tl", "nc"):
                    if fam in run.layer_fams[n]:
                        run.layer_fams[n].remove(fam)
                        report.partial.setdefault(fam, []).append(n)
                report.unavailable[f"tl/nc for {n}"] = (
                    f"the probe has {per_label} labels per example but layer {n} has {per} samples "
                    "per example; give one label per example or per position"
                )
    elif "targets" in pg:
        ctx["Y"] = np.asarray(pg["targets"][:], dtype=np.float64)
    return ctx, str(pg.attrs.get("fingerprint", ""))


def _plan_jobs(
    buf: _Scalars,
    run: _Run,
    layer_index: dict[str, int],
    probe_fp: str,
    options: dict,
    recompute: bool,
    report: AnalyzeReport,
):
    """Which (step, layer) compute which families, and the input hash each result will carry.

    Layer-major: a layer's tasks finish together, and its phase 2 starts while
    the next layers' tasks still run.
    """
    inputs = {fam: buf.get(f"{INPUTS}/{fam}") for fam in run.families}
    jobs: dict[tuple[int, str], list[str]] = {}
    wanted: dict[tuple[int, str, str], str] = {}
    for layer in run.layers:
        j = layer_index[layer]
        for i in run.ok:
            for fam in run.layer_fams[layer]:
                parts = [run.fps[i], options.get(fam)]
                if fam in ("vc", "tl", "nc", "cka"):
                    parts.append(probe_fp)
                if fam == "vc":
                    parts.append(float(run.lr[i]))
                if fam == "cka":
                    parts.append(run.fps[run.ok[-1]])
                h = _hash(fam, *parts)
                if recompute or inputs[fam][i, j] != h:
                    jobs.setdefault((i, layer), []).append(fam)
                    wanted[(i, layer, fam)] = h
                else:
                    report.up_to_date += 1
    return jobs, wanted


def _gram_change_in_task(
    buf: _Scalars, run: _Run, layer_index: dict[str, int], jobs: dict, recompute: bool
) -> dict[tuple[int, str], str]:
    """New steps whose previous ok step's Gram is stored and current (an incremental
    run): each gets its Gram change in its own task, from the Gram it has in memory,
    and phase 2 has nothing left to do for it."""
    in_task: dict[tuple[int, str], str] = {}
    if "gram" not in run.families or recompute:
        return in_task
    prov_all = buf.get(f"{INPUTS}/gram_phase2")
    prev_ok = run.prev_ok
    hashes = _chain_hashes("gram", run.ok, run.fps, run.lr)  # the same chain for every layer
    for layer in run.layers:
        if "gram" not in run.layer_fams[layer]:
            continue
        prov = prov_all[:, layer_index[layer]]
        for i in run.ok:
            p = prev_ok[i]
            if "gram" in jobs.get((i, layer), ()) and (
                p is None or ("gram" not in jobs.get((p, layer), ()) and prov[p] == hashes[p])
            ):
                in_task[(i, layer)] = hashes[i]
    return in_task


class _Execution:
    """The tasks of one run, and each layer's phase 2 once its last task is done.

    Phase 2 of a layer reads only that layer's phase-1 results, so it runs (in
    the driver, on its own threads) while the tasks of the layers after it do.
    NumPy and zarr release the GIL; the buffer's lock serializes the bookkeeping.
    """

    def __init__(
        self, gs, m, buf, run: _Run, layer_index, jobs, wanted, in_task, report, progress, recompute
    ):
        self.gs, self.m, self.buf, self.run_, self.layer_index = gs, m, buf, run, layer_index
        self.jobs, self.wanted, self.in_task, self.report = jobs, wanted, in_task, report
        self.progress, self.recompute = progress, recompute
        self.left = {layer: 0 for layer in run.layers}
        for _, layer in jobs:
            self.left[layer] += 1
        self.done = 0
        self.total = 0
        self.phase2: list = []
        self.pool: ThreadPoolExecutor | None = None

    def start_phase2(self, layer: str) -> None:
        r = self.run_
        self.phase2.append(
            self.pool.submit(
                _phase2,
                self.gs,
                self.m,
                self.buf,
                layer,
                self.layer_index[layer],
                r.ok,
                r.steps,
                r.fps,
                r.lr,
                r.layer_fams[layer],
                self.recompute,
            )
        )

    def on_done(self, res: dict) -> None:
        self.done += 1
        i, layer = res["index"], res["layer"]
        j = self.layer_index[layer]
        for name, value in res["scalars"].items():
            self.buf.set(name, i, j, value)
        for fam in self.jobs[(i, layer)]:
            self.buf.set(f"{INPUTS}/{fam}", i, j, self.wanted[(i, layer, fam)])
            self.report.computed += 1
        if (i, layer) in self.in_task:  # its Gram change came with it
            self.buf.set(f"{INPUTS}/gram_phase2", i, j, self.in_task[(i, layer)])
        if res["nonfinite"]:
            self.report.nonfinite.append((int(self.run_.steps[i]), layer))
        self.left[layer] -= 1
        if self.left[layer] == 0:
            self.start_phase2(layer)
        if self.progress:
            self.progress(self.done, self.total, 0)

    def run(self, tasks: list, *, workers, scheduler, threads) -> None:
        """Every task and phase 2; what finished is kept even when one failed."""
        cores = os.cpu_count() or 1
        self.total = len(tasks)
        self.pool = _phase2_pool(max(1, min(threads or 2 * cores, len(self.run_.layers))))
        if self.progress:
            self.progress(0, len(tasks), 0)
        # The BLAS thread limit is process-wide: set it here to what the threaded
        # runner sets for its tasks, so it does not change under a running phase 2.
        n_run = max(1, min(threads or 2 * cores, len(tasks) or 1))
        hold_scratch()
        try:
            with kernel_threads(max(1, cores // n_run)):
                for layer in (
                    self.run_.layers
                ):  # nothing new to compute here; its chain may still need phase 2
                    if self.left[layer] == 0:
                        self.start_phase2(layer)
                if tasks:
                    make_runner(workers, scheduler, threads)(tasks, self.on_done)
                for fut in self.phase2:
                    fut.result()
        finally:
            for fut in self.phase2:  # after an error: what has not started never will
                fut.cancel()
            wait_futures(self.phase2)
            release_scratch()  # dropped after a while unless another run starts
            self.buf.flush()


_phase2_pools: dict[int, ThreadPoolExecutor] = {}


def _phase2_pool(n: int) -> ThreadPoolExecutor:
    """Phase 2's threads, kept across runs: their work arrays (``scratch_array``,
    per thread) are then reused by the next run instead of allocated anew."""
    pool = _phase2_pools.get(n)
    if pool is None:
        pool = _phase2_pools[n] = ThreadPoolExecutor(n, thread_name_prefix="gramlin-phase2")
    return pool


def _chain_hashes(fam: str, ok: list[int], fps, lr) -> dict[int, str]:
    """Provenance of each ok step's phase-2 results: every ok step up to it
    (fingerprints, and learning rates for VC), as a chain."""
    key = fam + "_phase2"
    chain: list = []
    hashes = {}
    for i in ok:
        chain.append(fps[i])
        if fam == "vc":
            chain.append(float(lr[i]))
        hashes[i] = _hash(key, chain)
    return hashes


def _phase2(gs, m, buf, layer, j, ok, steps, fps, lr, families, recompute) -> None:
    """Interval and accumulated metrics along ok steps, from stored per-step matrices."""
    lg = m[layer]
    for fam in ("gram", "vc"):
        if fam not in families:
            continue
        key = fam + "_phase2"
        prov = buf.get(f"{INPUTS}/{key}")[:, j]
        hashes = _chain_hashes(fam, ok, fps, lr)
        start = next((i for i in ok if recompute or prov[i] != hashes[i]), None)
        if start is None:
            continue
        pos = ok.index(start)
        prev = ok[pos - 1] if pos > 0 else None
        # Each group lookup reads a zarr.json: look the arrays up once, not per step.
        arrs = {
            name: lg[name]
            for name in (("gram",) if fam == "gram" else ("vcs", "gg", "vcs_accumulated"))
        }
        G_prev = None
        if fam == "gram":  # two work arrays, read into in turn (no fresh multi-MB array per step)
            bufs = [
                scratch_array(f"phase2_gram_{k}", arrs["gram"].shape[1:], arrs["gram"].dtype)
                for k in (0, 1)
            ]
            if prev is not None:
                G_prev = read_step(arrs["gram"], prev, bufs[0])
        W = gs.layer(layer)["weight"]
        first = ok[0]
        if fam == "vc":
            G0 = np.asarray(W[first], dtype=np.float64).T @ np.asarray(W[first], dtype=np.float64)
            acc = np.asarray(arrs["vcs_accumulated"][prev]) if prev is not None else None
            vcs_prev = np.asarray(arrs["vcs"][prev]) if prev is not None else None
        norm_prev = None if G_prev is None else _norms(G_prev, None)[1]
        if fam == "gram":
            spare = bufs[1]
        for i in ok[pos:]:
            if stop_requested():  # a stop (SIGINT/SIGTERM): the steps done so far are recorded
                return
            if fam == "gram":
                # Grams as stored (float32 for float32 weights), differences and
                # sums of squares in float64.
                G = read_step(arrs["gram"], i, spare)
                change, norm = _norms(G, G_prev)
                buf.set(
                    "gram_change", i, j, np.nan if G_prev is None else _ratio(change, norm_prev)
                )
                spare = G_prev if G_prev is not None else bufs[0]
                G_prev, norm_prev = G, norm
            else:
                Wi = np.asarray(W[i], dtype=np.float64)
                Gi = Wi.T @ Wi
                vcs = np.asarray(arrs["vcs"][i])
                if acc is None:
                    acc = np.zeros_like(vcs)
                    row = dict.fromkeys(FAMILIES["vc"].phase2_scalars, np.nan)
                else:
                    a = ok[ok.index(i) - 1]
                    gap = float(steps[i] - steps[a])
                    pred = gap * (vcs_prev + vcs) / 2
                    acc = acc + pred
                    Wa = np.asarray(W[a], dtype=np.float64)
                    Ga = Wa.T @ Wa
                    dG = Gi - Ga
                    ndg = np.linalg.norm(dG)
                    gamma = float(lr[a])
                    Gw = (Wa - Wi) / (gamma * gap)
                    second = gamma**2 * (Gw.T @ Gw - np.asarray(arrs["gg"][a]))
                    row = {
                        "dgram_vcs_corr": float(pearson_np(dG, pred, mode="diag")),
                        "vcs_interval_corr": float(pearson_np(dG, pred, mode="full")),
                        "vcs_interval_ratio": float(norm_ratio_np(pred, dG)),
                        "fle_residual": _ratio(np.linalg.norm(dG - gap * vcs_prev), ndg),
                        "fle_second_order": _ratio(np.linalg.norm(second), ndg),
                    }
                    total = Gi - G0
                    row.update(
                        gram_vcs_acc_corr=float(pearson_np(total, acc, mode="diag")),
                        gram_vcs_acc_corr_full=float(pearson_np(total, acc, mode="full")),
                        gram_vcs_acc_cos=float(cosine_np(total, acc)),
                    )
                arrs["vcs_accumulated"][i] = acc
                for name, value in row.items():
                    buf.set(name, i, j, value)
                vcs_prev = vcs
            buf.set(f"{INPUTS}/{key}", i, j, hashes[i])
