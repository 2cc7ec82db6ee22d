"""The regression behind Target Linearity, solved from its summed statistics.

Stages of :func:`~gramlin_analyze.reducers.target_linearity.target_linearity_from_stats_np`:
clean the statistics, project onto principal axes (an option), center the
targets, set up the (ridge) normal equations, and evaluate the residual.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from gramlin_analyze.reducers._common import (
    EPS,
    FloatArray,
    as_float64,
    batch_bad,
    default_rtol,
    eigh_desc,
    sym,
)

#: The sufficient statistics of TL, in the order they are packed.
STAT_NAMES = ("n", "sum_h", "sum_y", "hh", "hy", "yy")


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def stat_core(name: str) -> int:
    """Number of core (trailing) axes of a statistic: 2 for the matrices, 1 for the rest."""
    return 2 if name in ("hh", "hy", "yy") else 1


def pca_project(
    hh: FloatArray, sh: FloatArray, hy: FloatArray, n: FloatArray, k: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Features ``H P``: ``P`` = top-``k`` principal axes of the centered features."""
    cov = hh - sh[..., :, None] * sh[..., None, :] / n[..., None, None]
    _, vecs = eigh_desc(cov)
    p = vecs[..., :, :k]
    return sym(_t(p) @ hh @ p), (_t(p) @ sh[..., :, None])[..., 0], _t(p) @ hy


def finite_stats(
    stats: Mapping[str, npt.ArrayLike],
) -> tuple[dict[str, FloatArray], np.ndarray, FloatArray]:
    """The statistics as float64 with zeros for batch entries holding a NaN/Inf (which
    keeps ``eigh`` away from them), those entries' mask, and ``N`` (1 where masked)."""
    s = {k: as_float64(stats[k]) for k in STAT_NAMES}
    lead = s["hh"].shape[:-2]
    bad = np.zeros(lead, dtype=bool)
    for k in STAT_NAMES:
        bad = bad | batch_bad(s[k], stat_core(k))
    for k in STAT_NAMES:
        s[k] = np.where(bad[(...,) + (None,) * stat_core(k)], 0.0, s[k])
    n = np.where(bad, 1.0, s["n"][..., 0])
    return s, bad, n


def centered_targets(
    sum_y: FloatArray, yy: FloatArray, sh: FloatArray, hy: FloatArray, n: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """``H^T Y_c`` and ``||Y_c||^2`` by correcting the uncentered sums; the latter NaN
    for targets that are constant up to round-off."""
    mean_y = sum_y / n[..., None]
    b = hy - sh[..., :, None] * mean_y[..., None, :]
    raw = np.trace(yy, axis1=-2, axis2=-1)
    tss = raw - np.sum(sum_y**2, axis=-1) / n
    # centered targets below the round-off of that subtraction are constant: 0/0
    tss = np.where(tss > 10.0 * n * EPS * raw, tss, np.nan)
    return b, tss


def normal_equations(
    hh: FloatArray,
    sh: FloatArray,
    b: FloatArray,
    n: FloatArray,
    *,
    lam: float,
    center_features: bool,
    intercept: bool,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The regression's Gram matrix ``A``, the penalized system ``A + lambda I`` and the
    right-hand side ``B``, after the feature-centering and intercept options."""
    a = hh
    d = a.shape[-1]
    if center_features:
        a = sym(a - sh[..., :, None] * sh[..., None, :] / n[..., None, None])
        sh = np.zeros_like(sh)
    penalty = np.full(d, float(lam))
    if intercept:  # the constant feature is unpenalized
        top = np.concatenate([a, sh[..., :, None]], axis=-1)
        bottom = np.concatenate([sh[..., None, :], n[..., None, None]], axis=-1)
        a = np.concatenate([top, bottom], axis=-2)
        b = np.concatenate([b, np.zeros(b.shape[:-2] + (1, b.shape[-1]))], axis=-2)
        penalty = np.append(penalty, 0.0)
    return a, a + np.diag(penalty), b


def residual_sum_of_squares(
    a: FloatArray, m: FloatArray, b: FloatArray, tss: FloatArray, rcond: float | None
) -> FloatArray:
    """``RSS`` of the coefficients ``m^+ b``, solved Jacobi-scaled by ``eigh`` with a
    relative eigenvalue cutoff (a pseudo-inverse, never a jitter)."""
    diag = np.diagonal(m, axis1=-2, axis2=-1)
    scale = np.sqrt(np.where(diag > 0, diag, 1.0))
    m_s = m / (scale[..., :, None] * scale[..., None, :])
    w, v = eigh_desc(m_s)
    tol = (default_rtol(m.shape[-1]) if rcond is None else rcond) * w[..., :1]
    inv = np.where(w > tol, 1.0 / np.where(w > tol, w, 1.0), 0.0)
    coef = (v @ (inv[..., :, None] * (_t(v) @ (b / scale[..., :, None])))) / scale[..., :, None]
    return tss - 2.0 * np.sum(coef * b, axis=(-2, -1)) + np.sum(coef * (a @ coef), axis=(-2, -1))
