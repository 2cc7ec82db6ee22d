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

#: The sufficient statistics of TL, in the order they are packed. Class labels
#: keep the diagonal of ``Y^T Y`` (``yy_diag``; the one-hot's is diagonal) instead of ``yy``.
STAT_NAMES = ("n", "sum_h", "sum_y", "hh", "hy", "yy")
LABEL_STAT_NAMES = ("n", "sum_h", "sum_y", "hh", "hy", "yy_diag")


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def stat_core(name: str) -> int:
    """Number of core (trailing) axes of a statistic: 2 for the matrices, 1 for the rest."""
    return 2 if name in ("hh", "hy", "yy") else 1


def pca_project(
    hh: FloatArray, sh: FloatArray, hy: FloatArray, n: FloatArray, k: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Features ``H P``: ``P`` = top-``k`` principal axes of the centered features.

    Axes of zero variance (below the ``eigh`` round-off, e.g. beyond the rank of
    duplicated conv patches) are dropped: any basis of that null space is as good as
    another, and each would add an arbitrary constant column ``mean(H) . v``.
    """
    cov = hh - sh[..., :, None] * sh[..., None, :] / n[..., None, None]
    w, vecs = eigh_desc(cov)
    keep = w[..., :k] > default_rtol(cov.shape[-1]) * np.abs(w[..., :1])
    p = vecs[..., :, :k] * keep[..., None, :]
    return sym(_t(p) @ hh @ p), (_t(p) @ sh[..., :, None])[..., 0], _t(p) @ hy


def finite_stats(
    stats: Mapping[str, npt.ArrayLike],
) -> tuple[dict[str, FloatArray], np.ndarray, FloatArray]:
    """The statistics as float64 with zeros for batch entries holding a NaN/Inf (which
    keeps ``eigh`` away from them), those entries' mask, and ``N`` (1 where masked)."""
    names = LABEL_STAT_NAMES if "yy_diag" in stats else STAT_NAMES
    s = {k: as_float64(stats[k]) for k in names}
    lead = s["hh"].shape[:-2]
    bad = np.zeros(lead, dtype=bool)
    for k in names:
        bad = bad | batch_bad(s[k], stat_core(k))
    for k in names:
        s[k] = np.where(bad[(...,) + (None,) * stat_core(k)], 0.0, s[k])
    n = np.where(bad, 1.0, s["n"][..., 0])
    return s, bad, n


def target_trace(s: Mapping[str, FloatArray]) -> FloatArray:
    """``tr(Y^T Y) = ||Y||_F^2`` from ``yy`` or, for class labels, its diagonal."""
    if "yy_diag" in s:
        return np.sum(s["yy_diag"], axis=-1)
    return np.trace(s["yy"], axis1=-2, axis2=-1)


def centered_target_gram_norm(s: Mapping[str, FloatArray], n: FloatArray) -> FloatArray:
    """``||Y_c^T Y_c||_F`` with ``Y_c^T Y_c = Y^T Y - s s^T / N`` (``s`` the column sums).

    For class labels ``Y^T Y = D`` is diagonal, and
    ``||D - s s^T/N||_F^2 = sum D^2 - 2 sum D s^2 / N + (sum s^2)^2 / N^2``:
    no ``C x C`` matrix.
    """
    sy = s["sum_y"]
    if "yy_diag" not in s:
        yc = s["yy"] - sy[..., :, None] * sy[..., None, :] / n[..., None, None]
        return np.sqrt(np.sum(yc * yc, axis=(-2, -1)))
    dg, sq = s["yy_diag"], sy * sy
    total = np.sum(dg * dg, axis=-1) - 2.0 * np.sum(dg * sq, axis=-1) / n
    return np.sqrt(np.maximum(total + np.sum(sq, axis=-1) ** 2 / (n * n), 0.0))


def centered_targets(
    sum_y: FloatArray, raw: FloatArray, sh: FloatArray, hy: FloatArray, n: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """``H^T Y_c`` and ``||Y_c||^2`` by correcting the uncentered sums (``raw`` is
    ``||Y||_F^2``); the latter NaN for targets that are constant up to round-off."""
    mean_y = sum_y / n[..., None]
    b = hy - sh[..., :, None] * mean_y[..., None, :]
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
