"""TL, its surrogate and neural collapse from class indices: the one-hot matrix is never built.

References here build the one-hot ``N x C`` matrix explicitly (float64 NumPy);
the code under test must agree with them to float tolerance while its memory
stays far below that matrix for many classes.
"""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import pytest
import xarray as xr

from gramlin_analyze.reducers.collapse import collapse_stats_np
from gramlin_analyze.reducers.surrogate import tl_surrogate

T = importlib.import_module("gramlin_analyze.reducers.target_linearity")


def one_hot(labels: np.ndarray, c: int) -> np.ndarray:
    out = np.zeros((len(labels), c))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def ref_tl(h, y, *, lam=0.0, center=False, intercept=False):
    """Textbook ridge TL on full matrices (features of full column rank)."""
    yc = y - y.mean(axis=0)
    x = h - h.mean(axis=0) if center else h
    pen = np.full(x.shape[1], lam)
    if intercept:
        x = np.hstack([x, np.ones((len(x), 1))])
        pen = np.append(pen, 0.0)
    coef = np.linalg.solve(x.T @ x + np.diag(pen), x.T @ yc)
    return 1.0 - np.sum((yc - x @ coef) ** 2) / np.sum(yc**2)


@pytest.mark.parametrize(
    "options",
    [{}, {"lam": 0.7}, {"center_features": True}, {"intercept": True, "lam": 0.3}],
    ids=["plain", "ridge", "centered", "intercept"],
)
def test_label_statistics_give_the_one_hot_tl(rng, options):
    steps, n, d, c = 3, 90, 6, 5
    labels = rng.integers(0, c, n)
    h = rng.standard_normal((steps, n, d)) + rng.uniform(-1, 1, d)
    h[..., :c] += 3.0 * one_hot(labels, c)[:, :d]
    stats = T.tl_label_stats_np(h, labels, c)
    assert "yy" not in stats and stats["hy"].shape == (steps, d, c)
    got = T.target_linearity_from_stats_np(stats, **options)
    ref_opts = {
        "lam": options.get("lam", 0.0),
        "center": options.get("center_features", False),
        "intercept": options.get("intercept", False),
    }
    ref = [ref_tl(h[k], one_hot(labels, c), **ref_opts) for k in range(steps)]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert min(ref) > 0.2  # informative features: far from the null


def test_label_statistics_add_over_sample_blocks(rng):
    n, d, c = 70, 4, 6
    labels, h = rng.integers(0, c, n), rng.standard_normal((n, d))
    whole = T.tl_label_stats_np(h, labels, c)
    parts = [T.tl_label_stats_np(h[a:b], labels[a:b], c) for a, b in ((0, 13), (13, 50), (50, n))]
    for name, value in whole.items():
        np.testing.assert_allclose(sum(p[name] for p in parts), value, rtol=1e-12, err_msg=name)
    Y = one_hot(labels, c)
    np.testing.assert_allclose(whole["hy"], h.T @ Y, rtol=1e-12)
    np.testing.assert_array_equal(whole["yy_diag"], np.diag(Y.T @ Y))
    np.testing.assert_array_equal(whole["sum_y"], Y.sum(axis=0))


def test_an_invalid_label_makes_its_entry_nan(rng):
    h = rng.standard_normal((2, 10, 3))
    labels = np.array([[0, 1, 2, 1, 0, 2, 1, 0, 2, 1], [0, 1, 2, 1, 0, 2, 1, 0, 2, 7]])
    tl = T.target_linearity_from_stats_np(T.tl_label_stats_np(h, labels, 3))
    assert np.isfinite(tl[0]) and np.isnan(tl[1])


def test_surrogate_from_labels_matches_the_one_hot(make, rng):
    n, d, out, c = 80, 5, 4, 7
    labels = rng.integers(0, c, n)
    h, W = rng.standard_normal((n, d)), rng.standard_normal((out, d))
    res = tl_surrogate(
        make(h, ("sample", "in")), make(W, ("out", "in")), labels=make(labels, ("sample",))
    )
    Yc = one_hot(labels, c) - one_hot(labels, c).mean(axis=0)
    Z = h @ W.T
    zy = np.sum((Z.T @ Yc) ** 2)
    np.testing.assert_allclose(float(res.tl_surrogate), zy / c, rtol=1e-10)
    kta = zy / (np.linalg.norm(Z.T @ Z) * np.linalg.norm(Yc.T @ Yc))
    np.testing.assert_allclose(float(res.kernel_target_alignment), kta, rtol=1e-10)


def test_collapse_statistics_are_the_one_hot_products(rng):
    n, d, c = 50, 4, 6
    labels, h = rng.integers(0, c, n), rng.standard_normal((3, n, d))
    s = collapse_stats_np(h, labels, c)
    Y = one_hot(labels, c)
    np.testing.assert_allclose(s["class_sums"], Y.T @ h, rtol=1e-12)
    np.testing.assert_array_equal(s["counts"], np.broadcast_to(Y.sum(axis=0), (3, c)))
    assert np.isnan(collapse_stats_np(h[0], np.append(labels[:-1], -1), c)["counts"]).all()


def _peak(fn) -> int:
    """Peak bytes traced while ``fn`` runs (NumPy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_many_classes_never_build_the_one_hot(rng):
    """5000 classes, 400 samples: the one-hot is 16 MB; TL (through the xarray API),
    its statistics and NC's stay below a quarter of that, and TL matches the
    one-hot reference."""
    n, d, c = 400, 4, 5000
    labels = rng.integers(0, c, n)
    h = rng.standard_normal((n, d))
    one_hot_bytes = n * c * 8
    H, L = xr.DataArray(h, dims=("sample", "in")), xr.DataArray(labels, dims="sample")
    result = {}

    def tl():
        result["tl"] = float(T.target_linearity(H, labels=L, n_classes=c))

    assert _peak(tl) < one_hot_bytes / 4
    assert _peak(lambda: collapse_stats_np(h, labels, c)) < one_hot_bytes / 4
    np.testing.assert_allclose(result["tl"], ref_tl(h, one_hot(labels, c)), rtol=1e-9)


@pytest.mark.parametrize("c", [3, 700])  # the one-hot product (few classes) and the scatter
def test_class_sums_both_routes_match_the_one_hot(rng, c):
    from gramlin_analyze.reducers import _labels

    n, d = _labels.ONEHOT_ROWS + 37, 5  # more rows than one block of the one-hot
    labels, h = rng.integers(0, c, n), rng.standard_normal((n, d))
    got = _labels.class_sums_np(h, labels, c)
    np.testing.assert_allclose(got, one_hot(labels, c).T @ h, rtol=1e-12, atol=1e-12)
