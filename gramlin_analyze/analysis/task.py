"""Phase 1 of ``analyze``: one (step, layer) from the store, in float64.

Reads the step's weight and streams its activations chunk by chunk along
``sample``, accumulating the sufficient statistics of every requested
family (so memory is one chunk plus d x d matrices, whatever N), then
finishes each family with the reducers' NumPy kernels. Per-step matrices are
written to ``/metrics/<layer>`` (this task's own chunks); scalars go back
to the driver, the only writer of ``/metrics`` scalars.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from gramlin_analyze.reducers import (
    cka_stats_np,
    collapse_from_stats_np,
    collapse_stats_np,
    cosine_np,
    effective_rank_np,
    linear_cka_from_stats_np,
    nc3_np,
    ncc_mismatch_np,
    nfa_correlation_np,
    pearson_np,
    target_linearity_from_stats_np,
    tl_stats_np,
    vc_stats_np,
    vcs_np,
    virtual_covariance_np,
)
from gramlin_analyze.reducers._common import pack
from gramlin_analyze.reducers.surrogate import _surrogate_np
from gramlin_analyze.reducers.target_linearity import _layout as _tl_layout
from gramlin_analyze.store import aligned_empty, put_step, read_step, task_node
from gramlin_analyze.store import layout as L

__all__ = ["layer_step_task", "hold_scratch", "release_scratch"]

#: Most bytes of work arrays a task thread keeps between tasks (and runs);
#: bigger arrays are allocated per task.
_SCRATCH_MAX_BYTES = 64 * 2**20
#: Seconds after the last run before the kept work arrays are dropped.
SCRATCH_IDLE_SECONDS = 30.0
_scratch: dict[int, dict[tuple, np.ndarray]] = {}
_scratch_lock = threading.Lock()
_scratch_timer: threading.Timer | None = None
_scratch_users = 0


def scratch_array(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread, page-aligned work array, reused by the next tasks (same thread, same shape).

    Each task of a layer needs the same few multi-MB arrays (W in float64,
    its Gram, the Gram in the stored dtype). Fresh memory for each meant page
    faults on every first touch (on the development VM the hypervisor backs
    new memory at about 2.5 ms per MB, more than the Gram itself costs), so
    a thread keeps up to 64 MB of them, also across runs: an incremental
    ``analyze`` of one new step has too few tasks per thread to amortize new
    memory. They are dropped :data:`SCRATCH_IDLE_SECONDS` after the last run
    (:func:`release_scratch`). The arrays never leave the task.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    arrays = _scratch.setdefault(threading.get_ident(), {})
    key = (name, tuple(shape), dtype.str)
    a = arrays.get(key)
    if a is None:
        if nbytes > _SCRATCH_MAX_BYTES:
            return np.empty(shape, dtype)
        if nbytes + sum(x.nbytes for x in arrays.values()) > _SCRATCH_MAX_BYTES:
            arrays.clear()  # another layer's shapes: make room
        a = arrays[key] = aligned_empty(shape, dtype)  # page-aligned: direct I/O needs no copy
    return a


def hold_scratch() -> None:
    """A run starts: keep the work arrays (cancel a pending release)."""
    global _scratch_timer, _scratch_users
    with _scratch_lock:
        _scratch_users += 1
        if _scratch_timer is not None:
            _scratch_timer.cancel()
            _scratch_timer = None


def release_scratch(delay: float | None = None) -> None:
    """A run ended: drop the kept work arrays ``delay`` seconds from now
    (default :data:`SCRATCH_IDLE_SECONDS`; 0 drops them at once), unless
    another run starts before."""
    global _scratch_timer, _scratch_users
    with _scratch_lock:
        _scratch_users = max(0, _scratch_users - 1)
        if _scratch_timer is not None:
            _scratch_timer.cancel()
            _scratch_timer = None
        if _scratch_users:
            return
        delay = SCRATCH_IDLE_SECONDS if delay is None else delay
        if delay <= 0:
            _scratch.clear()
            return
        _scratch_timer = threading.Timer(delay, _drop_scratch)
        _scratch_timer.daemon = True
        _scratch_timer.start()


def _drop_scratch() -> None:
    with _scratch_lock:
        if not _scratch_users:
            _scratch.clear()


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when the denominator is 0 (two identical checkpoints)."""
    return float(num / den) if den > 0 else float("nan")


def _norms(G: np.ndarray, G_prev: np.ndarray | None, rows: int = 64) -> tuple[float, float]:
    """``(||G - G_prev||_F, ||G||_F)`` summed in float64 whatever the stored dtype.

    One pass over row blocks: float64 temporaries of a block, not of the
    whole matrix (fresh multi-MB buffers cost page faults on every call).
    """
    sq_diff = sq = 0.0
    for r in range(0, G.shape[0], rows):
        g = np.asarray(G[r : r + rows], dtype=np.float64)
        sq += float(np.vdot(g, g))
        if G_prev is not None:
            d = np.subtract(g, G_prev[r : r + rows], dtype=np.float64)
            sq_diff += float(np.vdot(d, d))
    return (float(np.sqrt(sq_diff)) if G_prev is not None else float("nan")), float(np.sqrt(sq))


def _add(acc: dict | None, part: dict) -> dict:
    if acc is None:
        return {k: np.array(v, dtype=np.float64) for k, v in part.items()}
    for k, v in part.items():
        acc[k] += v
    return acc


def layer_step_task(
    store_url: str,
    storage_options: dict | None,
    layer: str,
    index: int,
    families: list[str],
    ctx: dict[str, Any],
) -> dict[str, Any]:
    """Compute ``families`` for one (step, layer); return scalars and flags.

    ``ctx`` holds: ``gamma`` (lr at the step), ``Y`` (N x C float targets,
    one-hot for labels) and ``labels`` (N ints or None), ``final_index``
    (row of the last ok step, for CKA), ``tl_lambda``, ``center_features``,
    ``intercept``, ``spectrum_k``.
    """

    def node(path: str):
        return task_node(store_url, storage_options, ctx["run_token"], path)

    grp = node(f"{L.LAYERS}/{layer}")
    mgrp = node(f"{L.METRICS}/{layer}")
    out: dict[str, float] = {}
    gram_change = float("nan")
    warr = node(f"{L.LAYERS}/{layer}/weight")
    w = read_step(warr, index, scratch_array("w_stored", warr.shape[1:], warr.dtype))
    W = scratch_array("W", w.shape, np.float64)
    np.copyto(W, w)
    del w
    has_bias = grp.attrs.get("has_bias")
    if has_bias is None:
        has_bias = "bias" in grp
    b = np.asarray(grp["bias"][index], dtype=np.float64) if has_bias else None
    w_nonfinite = not np.isfinite(np.add.reduce(W, axis=None))
    nonfinite = w_nonfinite or (b is not None and not np.isfinite(b).all())
    # NumPy runs W.T @ W as one symmetric rank-k update (syrk): exactly
    # symmetric already, so the reducer's symmetrization pass is skipped here.
    G = np.matmul(W.T, W, out=scratch_array("G", (W.shape[1], W.shape[1]), np.float64))

    if "gram" in families:
        gram = node(f"{L.METRICS}/{layer}/gram")
        stored = G
        if gram.dtype != G.dtype:
            stored = scratch_array("G_stored", G.shape, gram.dtype)
            np.copyto(stored, G, casting="same_kind")
        put_step(gram, index, stored)
        # ||W||_F^2 = tr(W^T W): no second pass over W.
        out["fro_norm"] = float("nan") if w_nonfinite else float(np.sqrt(np.trace(G)))
        if "gram_prev_index" in ctx:
            # The relative change from the previous ok step's stored Gram, as
            # phase 2 computes it (same arrays, same arithmetic; non-finite
            # weights give NaN through it, and nothing else of the step enters).
            prev = ctx["gram_prev_index"]
            if prev is not None:
                G_prev = read_step(gram, prev, scratch_array("G_prev", stored.shape, gram.dtype))
                change, _ = _norms(stored, G_prev)
                gram_change = _ratio(change, _norms(G_prev, None)[1])
    if "spectrum" in families:
        # One symmetric eigendecomposition of the smaller Gram gives every
        # spectral quantity; two SVDs of W cost 5x more.
        small = G if W.shape[1] <= W.shape[0] else W @ W.T
        if nonfinite:  # NaN results, flagged below; LAPACK refuses non-finite input
            ev = np.full(min(W.shape), np.nan)
        else:
            ev = np.clip(np.linalg.eigvalsh(small)[::-1], 0.0, None)
        spec = np.full(ctx["spectrum_k"], np.nan)
        spec[: min(len(ev), len(spec))] = ev[: len(spec)]
        mgrp["spectrum"][index] = spec
        top = ev[0] if len(ev) else np.nan
        out.update(
            effective_rank=float(effective_rank_np(spec)),
            stable_rank=float(ev.sum() / top) if top > 0 else float("nan"),
            spectral_norm=float(np.sqrt(top)),
        )
    if "nfa" in families:
        agop = np.asarray(grp["agop"][index], dtype=np.float64)
        nonfinite |= not np.isfinite(agop).all()
        out.update(
            nfa_corr=float(nfa_correlation_np(W, agop, mode="full")),
            nfa_corr_diag=float(nfa_correlation_np(W, agop, mode="diag")),
            nfa_sqrt_corr=float(nfa_correlation_np(W, agop, mode="full", sqrt=True)),
            nfa_sqrt_corr_diag=float(nfa_correlation_np(W, agop, mode="diag", sqrt=True)),
        )

    # No learning rate for this step: the VC family comes out NaN (flagged below).
    lr_missing = "vc" in families and not np.isfinite(ctx["gamma"])
    act_fams = {"vc", "tl", "nc", "cka"} & set(families)
    if act_fams:
        H_arr = grp["input"]
        G_arr = grp["input_grad"]
        n, d = H_arr.shape[1], H_arr.shape[2]
        per = int(grp.attrs.get("samples_per_example", 1))
        rows = H_arr.chunks[1]
        Y = ctx.get("Y")
        labels = ctx.get("labels")
        n_classes = ctx.get("n_classes")
        fin = ctx.get("final_index")
        vc = tl = nc = cka = None
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            h = np.asarray(H_arr[index, start:stop], dtype=np.float64)
            rows_ = np.arange(start, stop)
            ex = rows_ if ctx.get("labels_per_example", 1) == per and per > 1 else rows_ // per
            if not np.isfinite(np.add.reduce(h, axis=None)):
                nonfinite = True
            if "vc" in act_fams:
                g = np.asarray(G_arr[index, start:stop], dtype=np.float64)
                if not np.isfinite(np.add.reduce(g, axis=None)):
                    nonfinite = True
                vc = _add(vc, dict(zip(("hh", "gh", "gg"), vc_stats_np(h, g), strict=True)))
            if "tl" in act_fams:
                tl = _add(tl, tl_stats_np(h, Y[ex]))
            if "nc" in act_fams:
                nc = _add(nc, collapse_stats_np(h, labels[ex], n_classes))
            if "cka" in act_fams:
                hf = np.asarray(H_arr[fin, start:stop], dtype=np.float64)
                cka = _add(cka, cka_stats_np(h, hf))
        if vc is not None:
            gamma = ctx["gamma"]
            VC = virtual_covariance_np(vc["hh"], vc["gh"], vc["gg"], gamma)
            VCS = vcs_np(vc["gh"], vc["gg"], gamma)
            put_step(mgrp["vc"], index, VC)
            put_step(mgrp["vcs"], index, VCS)
            put_step(mgrp["gg"], index, vc["gg"])
            out.update(
                gram_vc_corr=float(pearson_np(G, VC, mode="diag")),
                gram_vc_corr_full=float(pearson_np(G, VC, mode="full")),
                gram_vc_cos=float(cosine_np(G, VC)),
            )
        if tl is not None:
            out["target_linearity"] = float(
                target_linearity_from_stats_np(
                    tl,
                    lam=ctx["tl_lambda"],
                    center_features=ctx["center_features"],
                    intercept=ctx["intercept"],
                )
            )
            out["tl_null"] = min(1.0, d / n)
            layout = _tl_layout(d, Y.shape[1])
            s, kta = _surrogate_np(pack(tl, layout, ()), W, layout)
            out.update(tl_surrogate=float(s), kta=float(kta))
        if nc is not None:
            res = collapse_from_stats_np(nc)
            out.update({k: float(v) for k, v in res.items()})
            if W.shape[0] == n_classes:
                counts, sums = nc["counts"], nc["class_sums"]
                mu = sums / counts[:, None]
                mu_g = sums.sum(axis=0) / counts.sum()
                out["nc3"] = float(nc3_np(W, mu, mu_g))
                wrong = 0.0
                for start in range(0, n, rows):
                    stop = min(n, start + rows)
                    h = np.asarray(H_arr[index, start:stop], dtype=np.float64)
                    wrong += float(ncc_mismatch_np(h, mu, W, b)) * (stop - start)
                out["nc4"] = wrong / n
            else:
                out["nc3"] = out["nc4"] = float("nan")
        if cka is not None:
            out["cka_to_final"] = float(linear_cka_from_stats_np(cka))
    if nonfinite:
        out = {k: float("nan") for k in out}
    if "gram_prev_index" in ctx:
        out["gram_change"] = gram_change
    return {
        "layer": layer,
        "index": index,
        "scalars": out,
        "nonfinite": bool(nonfinite or lr_missing),
    }
