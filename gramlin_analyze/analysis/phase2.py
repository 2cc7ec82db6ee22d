"""Phase 2 of ``analyze``: interval and accumulated metrics along each layer's ok steps.

Reads the per-step matrices phase 1 stored (Grams, VCS, ``sum g g^T``) and
the weights, one step after the other, from the first step whose chain of
inputs changed. The FLE and VCS arithmetic is the reducers'
(:mod:`gramlin_analyze.reducers.fle`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from gramlin_analyze.analysis import norms
from gramlin_analyze.analysis.metrics import FAMILIES
from gramlin_analyze.analysis.output import MetricsOutput
from gramlin_analyze.analysis.plan import RunPlan, chain_hashes
from gramlin_analyze.analysis.scratch import scratch_array
from gramlin_analyze.reducers import (
    accumulate_vcs_np,
    cosine_np,
    fle_interval_metrics_np,
    interval_gradient_np,
    pearson_np,
    second_order_term_np,
)
from gramlin_analyze.scheduling import stop_requested
from gramlin_analyze.store import INPUTS, read_step

__all__ = ["LayerChain", "layer_phase2", "phase2_pool", "PHASE2_THREAD_PREFIX"]

#: Name prefix of the threads phase 2 runs on.
PHASE2_THREAD_PREFIX = "gramlin-phase2"


@dataclass(frozen=True, slots=True)
class LayerChain:
    """One layer's phase 2: where its results go, and the run's ok steps."""

    out: MetricsOutput
    run: RunPlan
    layer: str
    recompute: bool

    @property
    def column(self) -> int:
        return self.out.layer_index[self.layer]

    def set(self, name: str, i: int, value: Any) -> None:
        self.out.buf.set(name, i, self.column, value)


def layer_phase2(chain: LayerChain) -> None:
    """Interval and accumulated metrics along ok steps, from stored per-step matrices.

    Each family's chain restarts at its first step whose provenance hash is
    stale; a stop (SIGINT/SIGTERM) keeps the steps done so far.
    """
    for fam, run_chain in (("gram", _gram_chain), ("vc", _vc_chain)):
        if fam not in chain.run.layer_fams[chain.layer]:
            continue
        hashes = chain_hashes(fam, chain.run.ok, chain.run.fps, chain.run.lr)
        prov = chain.out.buf.get(f"{INPUTS}/{fam}_phase2")[:, chain.column]
        ok = chain.run.ok
        start = next((i for i in ok if chain.recompute or prov[i] != hashes[i]), None)
        if start is not None and not run_chain(chain, ok.index(start), hashes):
            return


def _gram_chain(chain: LayerChain, pos: int, hashes: dict[int, str]) -> bool:
    """``gram_change`` from ``ok[pos]`` on; False when stopped."""
    ok = chain.run.ok
    arr = chain.out.metrics[chain.layer]["gram"]
    # Two work arrays, read into in turn (no fresh multi-MB array per step).
    bufs = [scratch_array(f"phase2_gram_{k}", arr.shape[1:], arr.dtype) for k in (0, 1)]
    G_prev = read_step(arr, ok[pos - 1], bufs[0]) if pos > 0 else None
    norm_prev = None if G_prev is None else norms.gram_norms(G_prev, None)[1]
    spare = bufs[1]
    for i in ok[pos:]:
        if stop_requested():
            return False
        # Grams as stored (float32 for float32 weights), differences and
        # sums of squares in float64.
        G = read_step(arr, i, spare)
        change, norm = norms.gram_norms(G, G_prev)
        chain.set("gram_change", i, np.nan if G_prev is None else norms.ratio(change, norm_prev))
        spare = G_prev if G_prev is not None else bufs[0]
        G_prev, norm_prev = G, norm
        chain.set(f"{INPUTS}/gram_phase2", i, hashes[i])
    return True


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    """One ok step of the VC chain: its row, weight in float64, Gram and VCS."""

    index: int
    W: np.ndarray
    G: np.ndarray
    vcs: np.ndarray


def _vc_chain(chain: LayerChain, pos: int, hashes: dict[int, str]) -> bool:
    """The accumulated VCS and the interval metrics from ``ok[pos]`` on; False when stopped."""
    ok, lg = chain.run.ok, chain.out.metrics[chain.layer]
    vcs_arr, gg_arr, acc_arr = lg["vcs"], lg["gg"], lg["vcs_accumulated"]
    W = chain.out.gs.layer(chain.layer)["weight"]
    # A general product of two reads (not the symmetric update W.T @ W runs
    # as): the arithmetic the stored results have always had.
    G0 = np.asarray(W[ok[0]], dtype=np.float64).T @ np.asarray(W[ok[0]], dtype=np.float64)
    a, acc = None, None
    if pos > 0:
        a = _checkpoint(W, vcs_arr, ok[pos - 1])
        acc = np.asarray(acc_arr[a.index])
    for i in ok[pos:]:
        if stop_requested():
            return False
        b = _checkpoint(W, vcs_arr, i)
        if a is None:
            acc = np.zeros_like(b.vcs)
            row = dict.fromkeys(FAMILIES["vc"].phase2_scalars, np.nan)
        else:
            acc, row = _interval(chain.run, a, b, acc, np.asarray(gg_arr[a.index]), G0)
        acc_arr[i] = acc
        for name, value in row.items():
            chain.set(name, i, value)
        chain.set(f"{INPUTS}/vc_phase2", i, hashes[i])
        a = b
    return True


def _checkpoint(W: Any, vcs_arr: Any, i: int) -> _Checkpoint:
    Wi = np.asarray(W[i], dtype=np.float64)
    return _Checkpoint(i, Wi, Wi.T @ Wi, np.asarray(vcs_arr[i]))


def _interval(
    run: RunPlan, a: _Checkpoint, b: _Checkpoint, acc: Any, gg_a: np.ndarray, G0: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """The accumulated VCS at ``b`` (from ``acc`` at ``a``), and the metrics of the interval."""
    gap = float(run.steps[b.index] - run.steps[a.index])
    gamma = float(run.lr[a.index])
    increment, accumulated = accumulate_vcs_np(acc, a.vcs, b.vcs, gap)
    second = second_order_term_np(interval_gradient_np(a.W, b.W, gamma, gap), gg_a, gamma)
    terms = fle_interval_metrics_np(b.G - a.G, a.vcs, increment, second, gap)
    row = {name: float(value) for name, value in terms.items()}
    total = b.G - G0
    row.update(
        gram_vcs_acc_corr=float(pearson_np(total, accumulated, mode="diag")),
        gram_vcs_acc_corr_full=float(pearson_np(total, accumulated, mode="full")),
        gram_vcs_acc_cos=float(cosine_np(total, accumulated)),
    )
    return accumulated, row


_pools: dict[int, ThreadPoolExecutor] = {}


def phase2_pool(n: int) -> ThreadPoolExecutor:
    """Phase 2's threads, kept across runs: their work arrays (``scratch_array``,
    per thread) are then reused by the next run instead of allocated anew."""
    pool = _pools.get(n)
    if pool is None:
        pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix=PHASE2_THREAD_PREFIX)
    return pool
