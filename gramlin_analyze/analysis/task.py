"""Phase 1 of ``analyze``: one (step, layer) from the store, in float64.

Reads the step's weight and streams its activations chunk by chunk along
``sample``, accumulating the sufficient statistics of every requested
family (so memory is one chunk plus d x d matrices, whatever N), then
finishes each family with the reducers' NumPy kernels. Per-step matrices are
written to ``/metrics/<layer>`` (this task's own chunks); scalars go back
to the driver, the only writer of ``/metrics`` scalars.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gramlin_analyze.analysis import norms
from gramlin_analyze.analysis.scratch import scratch_array
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
from gramlin_analyze.reducers.surrogate import surrogate_from_stats_np
from gramlin_analyze.reducers.target_linearity import tl_label_stats_np
from gramlin_analyze.store import layout as L
from gramlin_analyze.store import put_step, read_step, task_node

__all__ = ["layer_step_task", "TaskContext", "ProbeTargets", "TaskResult", "TLSetup"]

#: The families that stream the layer's captured inputs.
ACTIVATION_FAMILIES = frozenset({"vc", "tl", "nc", "cka"})


@dataclass(frozen=True, slots=True)
class ProbeTargets:
    """The probe set's targets, as every task of a run pairs them with samples.

    ``labels`` holds the N class indices (of ``n_classes``): the one-hot
    targets of TL and NC are never built. ``Y`` holds N x C real-valued
    targets (regression; None with labels). ``labels_per_example`` is 1 for
    one label per example, else the number of positions it labels.
    """

    Y: np.ndarray | None = None
    labels: np.ndarray | None = None
    n_classes: int | None = None
    labels_per_example: int = 1


@dataclass(frozen=True, slots=True)
class TLSetup:
    """How a layer's rows become TL/NC samples, and whether PCA applies (plan decides).

    ``samples``: ``example`` (one row per example), ``position`` (one per
    (example, position)), ``image`` (an example's ``positions`` rows flattened into
    one sample, the paper's conv convention) or ``mean`` (their mean).
    ``features``: width of a sample; ``pca_components`` / ``surrogate_pca``:
    principal axes kept for TL's ``H`` / the surrogate's ``Z`` (None: no PCA).
    """

    samples: str = "example"
    positions: int = 1
    features: int = 0
    pca_components: int | None = None
    surrogate_pca: int | None = None

    @property
    def grouped(self) -> bool:
        """Whether an example's positions make one sample (``image`` or ``mean``)."""
        return self.samples in ("image", "mean")

    def view(self, h: np.ndarray) -> np.ndarray:
        """Rows of whole examples (example-major) as this layer's TL/NC samples."""
        if self.samples == "image":
            return h.reshape(-1, self.positions * h.shape[1])
        if self.samples == "mean":
            return h.reshape(-1, self.positions, h.shape[1]).mean(axis=1)
        return h


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a (step, layer) task needs besides its store: the run's options and its step's.

    ``final_index`` is the row of the last ok step (CKA's reference);
    ``gamma`` the learning rate at the step. With ``gram_change_in_task``
    the task also computes the Gram change from the stored Gram of row
    ``gram_prev_index`` (None: the first ok step, whose change is NaN).
    """

    run_token: str
    final_index: int
    tl_lambda: float
    center_features: bool
    intercept: bool
    targets: ProbeTargets = field(default_factory=ProbeTargets)
    gamma: float = float("nan")
    spectrum_k: int = 0
    gram_change_in_task: bool = False
    gram_prev_index: int | None = None
    tl_setup: dict[str, TLSetup] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One task's scalars for the driver to record, and whether an input was non-finite."""

    layer: str
    index: int
    scalars: dict[str, float]
    nonfinite: bool


@dataclass(frozen=True, slots=True)
class _Weights:
    """The step's weight in float64 (a work array), its bias and its Gram ``W^T W``."""

    W: np.ndarray
    b: np.ndarray | None
    G: np.ndarray
    w_nonfinite: bool
    nonfinite: bool  # weight or bias


@dataclass(slots=True)
class _Sums:
    """Sufficient statistics of the activation families, summed over sample chunks."""

    vc: dict | None = None
    tl: dict | None = None
    nc: dict | None = None
    cka: dict | None = None
    nonfinite: bool = False


def layer_step_task(
    store_url: str,
    storage_options: dict | None,
    layer: str,
    index: int,
    families: list[str],
    ctx: TaskContext,
) -> TaskResult:
    """Compute ``families`` for one (step, layer): matrices into the store, scalars returned.

    Any non-finite input makes every scalar NaN (the Gram change excepted:
    it depends on the two stored Grams only) and flags the result.
    """

    def node(path: str):
        return task_node(store_url, storage_options, ctx.run_token, path)

    grp = node(f"{L.LAYERS}/{layer}")
    mgrp = node(f"{L.METRICS}/{layer}")
    w = _read_weights(grp, node(f"{L.LAYERS}/{layer}/weight"), index)
    nonfinite = w.nonfinite
    out: dict[str, float] = {}
    gram_change = float("nan")
    if "gram" in families:
        gram_change = _gram(node(f"{L.METRICS}/{layer}/gram"), index, w, ctx, out)
    if "spectrum" in families:
        out.update(_spectrum(mgrp["spectrum"], index, w, ctx.spectrum_k))
    if "nfa" in families:
        agop = np.asarray(grp["agop"][index], dtype=np.float64)
        nonfinite |= not np.isfinite(agop).all()
        out.update(_nfa(w.W, agop))
    # No learning rate for this step: the VC family comes out NaN (flagged below).
    lr_missing = "vc" in families and not np.isfinite(ctx.gamma)
    act_fams = ACTIVATION_FAMILIES & set(families)
    if act_fams:
        H_arr = grp["input"]
        setup = ctx.tl_setup.get(layer) or TLSetup(features=H_arr.shape[2])
        sums = _stream_activations(H_arr, grp, index, act_fams, ctx, setup)
        nonfinite |= sums.nonfinite
        out.update(_finish_activations(H_arr, mgrp, index, w, sums, ctx, setup))
    if nonfinite:
        out = {k: float("nan") for k in out}
    if ctx.gram_change_in_task:
        out["gram_change"] = gram_change
    return TaskResult(layer, index, out, bool(nonfinite or lr_missing))


def _read_weights(grp: Any, warr: Any, index: int) -> _Weights:
    w = read_step(warr, index, scratch_array("w_stored", warr.shape[1:], warr.dtype))
    W = scratch_array("W", w.shape, np.float64)
    np.copyto(W, w)
    has_bias = grp.attrs.get("has_bias")
    if has_bias is None:
        has_bias = "bias" in grp
    b = np.asarray(grp["bias"][index], dtype=np.float64) if has_bias else None
    w_nonfinite = not np.isfinite(np.add.reduce(W, axis=None))
    # NumPy runs W.T @ W as one symmetric rank-k update (syrk): exactly
    # symmetric already, so the reducer's symmetrization pass is skipped here.
    G = np.matmul(W.T, W, out=scratch_array("G", (W.shape[1], W.shape[1]), np.float64))
    b_nonfinite = b is not None and not np.isfinite(b).all()
    return _Weights(W, b, G, w_nonfinite, w_nonfinite or b_nonfinite)


def _gram(gram: Any, index: int, w: _Weights, ctx: TaskContext, out: dict) -> float:
    """Store the Gram (in the array's dtype), add ``fro_norm``; return the in-task Gram change."""
    G = w.G
    stored = G
    if gram.dtype != G.dtype:
        stored = scratch_array("G_stored", G.shape, gram.dtype)
        np.copyto(stored, G, casting="same_kind")
    put_step(gram, index, stored)
    # ||W||_F^2 = tr(W^T W): no second pass over W.
    out["fro_norm"] = float("nan") if w.w_nonfinite else float(np.sqrt(np.trace(G)))
    prev = ctx.gram_prev_index
    if not ctx.gram_change_in_task or prev is None:
        return float("nan")
    # The relative change from the previous ok step's stored Gram, as phase 2
    # computes it (same arrays, same arithmetic; non-finite weights give NaN
    # through it, and nothing else of the step enters).
    G_prev = read_step(gram, prev, scratch_array("G_prev", stored.shape, gram.dtype))
    change, _ = norms.gram_norms(stored, G_prev)
    return norms.ratio(change, norms.gram_norms(G_prev, None)[1])


def _spectrum(arr: Any, index: int, w: _Weights, k: int) -> dict[str, float]:
    """Store the Gram's top ``k`` eigenvalues; return the spectral scalars."""
    W, G = w.W, w.G
    # One symmetric eigendecomposition of the smaller Gram gives every
    # spectral quantity; two SVDs of W cost 5x more.
    small = G if W.shape[1] <= W.shape[0] else W @ W.T
    if w.nonfinite:  # NaN results, flagged by the caller; LAPACK refuses non-finite input
        ev = np.full(min(W.shape), np.nan)
    else:
        ev = np.clip(np.linalg.eigvalsh(small)[::-1], 0.0, None)
    spec = np.full(k, np.nan)
    spec[: min(len(ev), len(spec))] = ev[: len(spec)]
    arr[index] = spec
    top = ev[0] if len(ev) else np.nan
    return {
        "effective_rank": float(effective_rank_np(spec)),
        "stable_rank": float(ev.sum() / top) if top > 0 else float("nan"),
        "spectral_norm": float(np.sqrt(top)),
    }


def _nfa(W: np.ndarray, agop: np.ndarray) -> dict[str, float]:
    return {
        "nfa_corr": float(nfa_correlation_np(W, agop, mode="full")),
        "nfa_corr_diag": float(nfa_correlation_np(W, agop, mode="diag")),
        "nfa_sqrt_corr": float(nfa_correlation_np(W, agop, mode="full", sqrt=True)),
        "nfa_sqrt_corr_diag": float(nfa_correlation_np(W, agop, mode="diag", sqrt=True)),
    }


def _add(acc: dict | None, part: dict) -> dict:
    if acc is None:
        return {k: np.array(v, dtype=np.float64) for k, v in part.items()}
    for k, v in part.items():
        acc[k] += v
    return acc


def _stream_activations(
    H_arr: Any, grp: Any, index: int, fams: AbstractSet[str], ctx: TaskContext, setup: TLSetup
) -> _Sums:
    """One pass over the step's sample chunks, summing every family's statistics.

    (n,) labels go with every position of an example; (n, T) token labels
    with their own row (example-major, like the activations). With grouped TL
    samples (``image``/``mean``) blocks hold whole examples.
    """
    G_arr = grp["input_grad"]
    n = H_arr.shape[1]
    per = int(grp.attrs.get("samples_per_example", 1))
    rows = H_arr.chunks[1]
    if setup.grouped:
        rows = max(1, rows // per) * per
    t = ctx.targets
    sums = _Sums()
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        h = np.asarray(H_arr[index, start:stop], dtype=np.float64)
        rows_ = np.arange(start, stop)
        ex = rows_ if t.labels_per_example == per and per > 1 else rows_ // per
        if not np.isfinite(np.add.reduce(h, axis=None)):
            sums.nonfinite = True
        # sum h h^T of the block, once for every family that needs it (NumPy's
        # syrk: exactly symmetric, so each family's sym() would be a no-op).
        hh = h.T @ h
        if "vc" in fams:
            g = np.asarray(G_arr[index, start:stop], dtype=np.float64)
            if not np.isfinite(np.add.reduce(g, axis=None)):
                sums.nonfinite = True
            stats = dict(zip(("hh", "gh", "gg"), vc_stats_np(h, g, hh=hh), strict=True))
            sums.vc = _add(sums.vc, stats)
        if "tl" in fams or "nc" in fams:
            hs, exs = (setup.view(h), ex[::per]) if setup.grouped else (h, ex)
            _add_labelled(sums, fams, hs, exs, t, None if setup.grouped else hh)
        if "cka" in fams:
            hf = np.asarray(H_arr[ctx.final_index, start:stop], dtype=np.float64)
            sums.cka = _add(sums.cka, cka_stats_np(h, hf, xx=hh))
    return sums


def _add_labelled(
    sums: _Sums,
    fams: AbstractSet[str],
    h: np.ndarray,
    ex: np.ndarray,
    t: ProbeTargets,
    hh: np.ndarray | None,
) -> None:
    """Add one block's TL and NC statistics (samples ``h`` of examples ``ex``, ``hh``
    their ``h^T h`` when known); with labels, NC's sums are TL's (the same products)."""
    if hh is None:
        hh = h.T @ h
    tl = None
    if "tl" in fams:
        tl = (
            tl_stats_np(h, t.Y[ex], hh=hh)
            if t.labels is None
            else tl_label_stats_np(h, t.labels[ex], t.n_classes, hh=hh)
        )
        sums.tl = _add(sums.tl, tl)
    if "nc" in fams:
        if tl is not None and t.labels is not None:
            nc = {"counts": tl["sum_y"], "class_sums": tl["hy"].T, "scatter": tl["hh"]}
        else:
            nc = collapse_stats_np(h, t.labels[ex], t.n_classes, hh=hh)
        sums.nc = _add(sums.nc, nc)


def _finish_activations(
    H_arr: Any,
    mgrp: Any,
    index: int,
    w: _Weights,
    sums: _Sums,
    ctx: TaskContext,
    setup: TLSetup,
) -> dict[str, float]:
    """Each activation family's results from its summed statistics."""
    out: dict[str, float] = {}
    if sums.vc is not None:
        out.update(_finish_vc(mgrp, index, sums.vc, w.G, ctx.gamma))
    if sums.tl is not None:
        out.update(_finish_tl(sums.tl, w.W, ctx, setup))
    if sums.nc is not None:
        out.update(_finish_nc(sums.nc, w, H_arr, index, ctx.targets.n_classes, setup))
    if sums.cka is not None:
        out["cka_to_final"] = float(linear_cka_from_stats_np(sums.cka))
    return out


def _finish_vc(mgrp: Any, index: int, vc: dict, G: np.ndarray, gamma: float) -> dict[str, float]:
    """Store VC, VCS and ``sum g g^T`` (phase 2 reads them); return the Gram-VC alignment."""
    VC = virtual_covariance_np(vc["hh"], vc["gh"], vc["gg"], gamma)
    VCS = vcs_np(vc["gh"], vc["gg"], gamma)
    put_step(mgrp["vc"], index, VC)
    put_step(mgrp["vcs"], index, VCS)
    put_step(mgrp["gg"], index, vc["gg"])
    return {
        "gram_vc_corr": float(pearson_np(G, VC, mode="diag")),
        "gram_vc_corr_full": float(pearson_np(G, VC, mode="full")),
        "gram_vc_cos": float(cosine_np(G, VC)),
    }


def _finish_tl(tl: dict, W: np.ndarray, ctx: TaskContext, setup: TLSetup) -> dict[str, float]:
    """TL (after the layer's PCA, if any), its null baseline, and the surrogate."""
    n, d = float(tl["n"][0]), tl["sum_h"].shape[-1]
    k = setup.pca_components
    out = {
        "target_linearity": float(
            target_linearity_from_stats_np(
                tl,
                lam=ctx.tl_lambda,
                center_features=ctx.center_features,
                intercept=ctx.intercept,
                pca_components=k,
            )
        ),
        "tl_null": min(1.0, (d if k is None else min(k, d)) / n),
    }
    positions = setup.positions if setup.samples == "image" else 1
    s, kta = surrogate_from_stats_np(tl, W, positions=positions, pca_components=setup.surrogate_pca)
    out.update(tl_surrogate=float(s), kta=float(kta))
    return out


def _finish_nc(
    nc: dict, w: _Weights, H_arr: Any, index: int, n_classes: int | None, setup: TLSetup
) -> dict[str, float]:
    """NC1 and NC2 from the class statistics; NC3 and NC4 for a readout (d_out = C)
    whose samples are its rows (not grouped positions)."""
    out = {k: float(v) for k, v in collapse_from_stats_np(nc).items()}
    W = w.W
    if W.shape[0] != n_classes or setup.grouped:
        out["nc3"] = out["nc4"] = float("nan")
        return out
    counts, sums = nc["counts"], nc["class_sums"]
    with np.errstate(invalid="ignore", divide="ignore"):  # a class no probe sample has: NaN
        mu = sums / counts[:, None]
        mu_g = sums.sum(axis=0) / counts.sum()
    out["nc3"] = float(nc3_np(W, mu, mu_g))
    # NC4 compares each sample with the class means: a second pass over the chunks.
    n, rows = H_arr.shape[1], H_arr.chunks[1]
    wrong = 0.0
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        h = np.asarray(H_arr[index, start:stop], dtype=np.float64)
        wrong += float(ncc_mismatch_np(h, mu, W, w.b)) * (stop - start)
    out["nc4"] = wrong / n
    return out
