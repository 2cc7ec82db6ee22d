"""Phase 2 of ``analyze``: interval and accumulated metrics along each layer's ok steps.

A task like the (step, layer) ones, run where they run (a thread, or a Dask
worker): it opens the store by its location, reads the per-step matrices
phase 1 stored (Grams, VCS, ``sum g g^T``) and the weights one step after
the other, writes the accumulated VCS, and returns only scalars. The driver
records them with their provenance. The FLE and VCS arithmetic is the
reducers' (:mod:`gramlin_analyze.reducers.fle`).

A task runs for at most about :data:`SEGMENT_SECONDS`, then returns where it
stopped; the driver starts the rest as another task (the chain restarts from
what the store holds, with the same values), so a stop on a cluster, where a
worker cannot see the driver's signal, waits for one segment at most.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gramlin_analyze.analysis import norms
from gramlin_analyze.analysis.metrics import FAMILIES
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
from gramlin_analyze.store import layout as L
from gramlin_analyze.store import put_step, read_step, task_node

__all__ = ["ChainJob", "ChainResult", "layer_chain_task", "CHAIN_FAMILIES", "SEGMENT_SECONDS"]

#: The families with a phase 2, in the order a layer's task runs their chains.
CHAIN_FAMILIES = ("gram", "vc")
#: About how long one phase-2 task runs before it hands the rest back to the driver.
SEGMENT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class ChainJob:
    """One layer's phase-2 work: from which position of ``ok`` each family's chain restarts.

    ``steps`` and ``lr`` are the step table's columns (rows as in the store).
    """

    run_token: str
    layer: str
    ok: tuple[int, ...]
    steps: np.ndarray
    lr: np.ndarray
    starts: dict[str, int]
    seconds: float = SEGMENT_SECONDS
    #: the layer's stored Grams are current (its ``gram`` family ran): a float64 one is reused
    grams_current: bool = False


@dataclass(frozen=True, slots=True)
class ChainResult:
    """What a phase-2 task did: each family's finished rows (``{row: scalars}``) and
    where the chains it did not finish restart (empty when all are done)."""

    layer: str
    rows: dict[str, dict[int, dict[str, float]]]
    left: dict[str, int]


_Node = Callable[[str], Any]


def layer_chain_task(store_url: str, storage_options: dict | None, job: ChainJob) -> ChainResult:
    """Run the layer's chains from their starts until done, out of time, or stopped.

    Each step is whole or not done: a stop (SIGINT/SIGTERM in this process)
    or the end of the segment returns the steps finished so far.
    """

    def node(path: str) -> Any:
        return task_node(store_url, storage_options, job.run_token, path)

    deadline = time.monotonic() + job.seconds
    rows: dict[str, dict[int, dict[str, float]]] = {}
    left: dict[str, int] = {}
    for fam in CHAIN_FAMILIES:
        if fam not in job.starts:
            continue
        if left or stop_requested():
            left[fam] = job.starts[fam]
            continue
        chain = _gram_chain if fam == "gram" else _vc_chain
        rows[fam] = {}
        end = chain(node, job, job.starts[fam], deadline, rows[fam])
        if end < len(job.ok):
            left[fam] = end
    return ChainResult(job.layer, rows, left)


def _more(k: int, deadline: float) -> bool:
    """Whether to go on after ``k`` steps of this task: always at least one."""
    return k == 0 or not (stop_requested() or time.monotonic() > deadline)


def _gram_chain(node: _Node, job: ChainJob, pos: int, deadline: float, rows: dict) -> int:
    """``gram_change`` from ``ok[pos]`` on; returns the position it stopped at."""
    ok = job.ok
    arr = node(f"{L.METRICS}/{job.layer}/gram")
    # Two work arrays, read into in turn (no fresh multi-MB array per step).
    bufs = [scratch_array(f"phase2_gram_{k}", arr.shape[1:], arr.dtype) for k in (0, 1)]
    G_prev = read_step(arr, ok[pos - 1], bufs[0]) if pos > 0 else None
    norm_prev = None if G_prev is None else norms.gram_norms(G_prev, None)[1]
    spare = bufs[1]
    for k, i in enumerate(ok[pos:]):
        if not _more(k, deadline):
            return pos + k
        # Grams as stored (float32 for float32 weights), differences and
        # sums of squares in float64.
        G = read_step(arr, i, spare)
        change, norm = norms.gram_norms(G, G_prev)
        rows[i] = {"gram_change": np.nan if G_prev is None else norms.ratio(change, norm_prev)}
        spare = G_prev if G_prev is not None else bufs[0]
        G_prev, norm_prev = G, norm
    return len(ok)


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    """One ok step of the VC chain: its row, weight in float64, Gram and VCS."""

    index: int
    W: np.ndarray
    G: np.ndarray
    vcs: np.ndarray


def _vc_chain(node: _Node, job: ChainJob, pos: int, deadline: float, rows: dict) -> int:
    """The accumulated VCS (written) and the interval metrics from ``ok[pos]`` on; returns
    the position it stopped at. A restart reads the accumulated VCS it left."""
    ok, prefix = job.ok, f"{L.METRICS}/{job.layer}"
    vcs_arr, gg_arr, acc_arr = (
        node(f"{prefix}/{name}") for name in ("vcs", "gg", "vcs_accumulated")
    )
    W = node(f"{L.LAYERS}/{job.layer}/weight")
    gram = _stored_grams(node, job)
    # A general product of two reads (not the symmetric update W.T @ W runs
    # as): the arithmetic the stored results have always had.
    G0 = np.asarray(W[ok[0]], dtype=np.float64).T @ np.asarray(W[ok[0]], dtype=np.float64)
    a, acc = None, None
    if pos > 0:
        a = _checkpoint(W, vcs_arr, ok[pos - 1], gram)
        acc = np.asarray(acc_arr[a.index])
    for k, i in enumerate(ok[pos:]):
        if not _more(k, deadline):
            return pos + k
        b = _checkpoint(W, vcs_arr, i, gram)
        if a is None:
            acc = np.zeros_like(b.vcs)
            row = dict.fromkeys(FAMILIES["vc"].phase2_scalars, np.nan)
        else:
            acc, row = _interval(job, a, b, acc, np.asarray(gg_arr[a.index]), G0)
        put_step(acc_arr, i, acc)
        rows[i] = row
        a = b
    return len(ok)


def _stored_grams(node: _Node, job: ChainJob) -> Any:
    """The layer's stored Grams when current and float64 (phase 1 computed them from the
    same float64 weights, as ``W.T @ W``): else None, and the chain computes its own
    (a float32 Gram would lose the small differences between steps)."""
    if not job.grams_current:
        return None
    arr = node(f"{L.METRICS}/{job.layer}/gram")
    return arr if arr.dtype == np.float64 else None


def _checkpoint(W: Any, vcs_arr: Any, i: int, gram: Any) -> _Checkpoint:
    Wi = np.asarray(W[i], dtype=np.float64)
    G = Wi.T @ Wi if gram is None else np.asarray(gram[i])
    return _Checkpoint(i, Wi, G, np.asarray(vcs_arr[i]))


def _interval(
    job: ChainJob, a: _Checkpoint, b: _Checkpoint, acc: Any, gg_a: np.ndarray, G0: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """The accumulated VCS at ``b`` (from ``acc`` at ``a``), and the metrics of the interval."""
    gap = float(job.steps[b.index] - job.steps[a.index])
    gamma = float(job.lr[a.index])
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
