"""Neural collapse NC1-NC4 against direct formulas on the full feature matrix."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from reducer_helpers import close, is_lazy

from gramlin_analyze.reducers import collapse as NC

STEPS = np.array([0, 50, 90])
N, D, C = 90, 6, 4


def ref_nc(h, labels, w=None, b=None):
    classes = np.arange(C)
    mu = np.stack([h[labels == c].mean(axis=0) for c in classes])
    mu_g = h.mean(axis=0)
    centered = h - mu[labels]
    sigma_w = centered.T @ centered / len(h)
    m = mu - mu_g
    sigma_b = sum(np.outer(x, x) for x in m) / C
    out = {"nc1": np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10)) / C}
    norms = np.linalg.norm(m, axis=1)
    out["nc2_equinorm"] = np.std(norms) / np.mean(norms)
    pairs = [(a, c) for a in classes for c in classes if a < c]
    out["nc2_equiangularity"] = np.mean(
        [abs(m[a] @ m[c] / norms[a] / norms[c] + 1 / (C - 1)) for a, c in pairs]
    )
    if w is not None:
        big_m = m.T  # (d, C)
        out["nc3"] = np.linalg.norm(w.T / np.linalg.norm(w) - big_m / np.linalg.norm(big_m)) ** 2
        pred = np.argmax(h @ w.T + b, axis=1)
        ncc = np.array([np.argmin([np.linalg.norm(x - mu[c]) for c in classes]) for x in h])
        out["nc4"] = np.mean(pred != ncc)
    return out


def _data(rng):
    labels = rng.integers(0, C, N)
    labels[:C] = np.arange(C)  # every class present
    centers = 2.0 * rng.standard_normal((C, D))
    h = centers[labels] + rng.standard_normal((len(STEPS), N, D))
    return h, labels


def test_neural_collapse(make, rng):
    h, labels = _data(rng)
    w = rng.standard_normal((len(STEPS), C, D))
    b = rng.standard_normal((len(STEPS), C))
    H = make(h, ("step", "sample", "in"), step=STEPS)
    res = NC.neural_collapse(
        H,
        make(labels, ("sample",)),
        W=make(w, ("step", "out", "in"), step=STEPS),
        b=make(b, ("step", "out"), step=STEPS),
    )
    assert is_lazy(res.nc1) == is_lazy(H)
    for k in range(len(STEPS)):
        ref = ref_nc(h[k], labels, w[k], b[k])
        for name, value in ref.items():
            close(res[name][k], value)
    assert 0 < res.nc4.min() < 1  # random readout: a real mix of agreements


def test_without_readout_and_class_means(make, rng):
    h, labels = _data(rng)
    H = make(h, ("step", "sample", "in"), step=STEPS)
    L = make(labels, ("sample",))
    res = NC.neural_collapse(H, L)
    assert set(res.data_vars) == {"nc1", "nc2_equinorm", "nc2_equiangularity"}
    means = NC.class_means(H, L)
    assert means.class_mean.dims == ("step", "class", "in")
    for k in range(len(STEPS)):
        close(means.class_mean[k], np.stack([h[k][labels == c].mean(0) for c in range(C)]))
        close(means.global_mean[k], h[k].mean(0))
        close(res.nc1[k], ref_nc(h[k], labels)["nc1"])


def test_trained_readout_agrees_with_ncc(rng):
    # readout built from the class means (W = M^T, b = -||mu_c||^2/2): NC4 = 0
    h, labels = _data(rng)
    h = h[0]
    mu = np.stack([h[labels == c].mean(0) for c in range(C)])
    W = xr.DataArray(mu, dims=("out", "in"))
    b = xr.DataArray(-0.5 * np.sum(mu**2, axis=1), dims="out")
    res = NC.neural_collapse(
        xr.DataArray(h, dims=("sample", "in")), xr.DataArray(labels, dims="sample"), W=W, b=b
    )
    assert float(res.nc4) == 0.0


def test_readout_shape_checked(rng):
    h, labels = _data(rng)
    with pytest.raises(ValueError, match="classes"):
        NC.neural_collapse(
            xr.DataArray(h[0], dims=("sample", "in")),
            xr.DataArray(labels, dims="sample"),
            W=xr.DataArray(np.ones((C + 1, D)), dims=("out", "in")),
        )


def test_missing_class_and_nonfinite_give_nan(rng):
    h, labels = _data(rng)
    res = NC.neural_collapse(
        xr.DataArray(h[0], dims=("sample", "in")),
        xr.DataArray(labels, dims="sample"),
        n_classes=C + 1,
    )
    assert np.isnan(res.nc1)
    h[1, 5, 2] = np.inf
    res = NC.neural_collapse(
        xr.DataArray(h, dims=("step", "sample", "in")).chunk({"sample": 10}),
        xr.DataArray(labels, dims="sample"),
        W=xr.DataArray(np.ones((C, D)), dims=("out", "in")),
    )
    for name in res.data_vars:  # nc3 too: it depends on the class means
        assert np.isnan(res[name].values[1]), name
        assert np.isfinite(res[name].values[0]), name


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_nc1_zero_for_collapsed_features(c, d, seed):
    r = np.random.default_rng(seed)
    means = 3.0 * r.standard_normal((c, d)) + r.standard_normal(d)
    labels = np.concatenate([np.arange(c), r.integers(0, c, 30)])
    h = means[labels]
    stats = NC.collapse_stats_np(h, labels, c)
    nc1 = float(NC.collapse_from_stats_np(stats)["nc1"])
    assert abs(nc1) < 1e-9
