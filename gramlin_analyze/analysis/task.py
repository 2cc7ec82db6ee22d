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
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.core import aligned_empty, put_step, read_step, task_node

__all__ = ["layer_step_task", "release_scratch"]

#: Largest scratch array a task thread keeps between tasks, and the most it
#: keeps in all; bigger ones are allocated per task as before.
_SCRATCH_MAX_BYTES = 64 * 2**20
_scratch: dict[tuple[str, int], dict[tuple, np.ndarray]] = {}


def _scratch_array(token: str, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread work array reused by the tasks of one run (same thread, same shape).

    Each task of a layer needs the same few multi-MB arrays (W in float64,
    its Gram, the Gram in the stored dtype); fresh ones every task meant
    page faults on every touch of new memory (on a VM, the hypervisor
    backing it too), about a tenth of ``analyze --metrics gram``. The arrays
    never leave the task; the driver drops a run's arrays when it ends
    (:func:`release_scratch`).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    ident = threading.get_ident()
    arrays = _scratch.get((token, ident))
    if arrays is None:
        # A new run on this thread: drop what an earlier run left here (a worker
        # process of a long-lived scheduler never sees the driver's release).
        for key in list(_scratch):
            if key[1] == ident:
                _scratch.pop(key, None)
        arrays = _scratch[(token, ident)] = {}
    key = (name, tuple(shape), dtype.str)
    a = arrays.get(key)
    if a is None:
        if nbytes > _SCRATCH_MAX_BYTES or nbytes + sum(x.nbytes for x in arrays.values()) > _SCRATCH_MAX_BYTES:
            return np.empty(shape, dtype)
        a = arrays[key] = aligned_empty(shape, dtype)  # page-aligned: direct I/O needs no copy
    return a


def release_scratch(token: str) -> None:
    """Drop the work arrays the tasks of run ``token`` kept in this process."""
    for key in list(_scratch):  # a snapshot: task threads of other runs may add keys
        if key[0] == token:
            _scratch.pop(key, None)


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
    token = ctx["run_token"]
    warr = node(f"{L.LAYERS}/{layer}/weight")
    w = read_step(warr, index, _scratch_array(token, "w_stored", warr.shape[1:], warr.dtype))
    W = _scratch_array(token, "W", w.shape, np.float64)
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
    G = np.matmul(W.T, W, out=_scratch_array(token, "G", (W.shape[1], W.shape[1]), np.float64))

    if "gram" in families:
        gram = node(f"{L.METRICS}/{layer}/gram")
        stored = G
        if gram.dtype != G.dtype:
            stored = _scratch_array(token, "G_stored", G.shape, gram.dtype)
            np.copyto(stored, G, casting="same_kind")
        put_step(gram, index, stored)
        # ||W||_F^2 = tr(W^T W): no second pass over W.
        out["fro_norm"] = float("nan") if w_nonfinite else float(np.sqrt(np.trace(G)))
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
                    tl, lam=ctx["tl_lambda"], center_features=ctx["center_features"], intercept=ctx["intercept"]
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
    return {"layer": layer, "index": index, "scalars": out, "nonfinite": bool(nonfinite or lr_missing)}
