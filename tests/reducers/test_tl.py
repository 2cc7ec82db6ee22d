"""Target linearity, its null baseline and surrogate against full-matrix least squares."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import xarray as xr
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reducer_helpers import close, is_lazy

from gramlin_analyze.reducers.surrogate import tl_surrogate

# the package re-exports the function `target_linearity`, which shadows the module
T = importlib.import_module("gramlin_analyze.reducers.target_linearity")

STEPS = np.array([0, 100, 300])
N_STEPS = len(STEPS)
N, D, C = 120, 8, 4


def ref_tl(h, y, *, lam=0.0, center=False, intercept=False, penalize_intercept=False):
    """Textbook TL on the full matrices: explicit residuals of a least-squares fit."""
    yc = y - y.mean(axis=0)
    x = h - h.mean(axis=0) if center else h
    if intercept:
        x = np.hstack([x, np.ones((len(x), 1))])
    if lam == 0:
        coef = np.linalg.lstsq(x, yc, rcond=None)[0]
    else:
        pen = np.full(x.shape[1], lam)
        if intercept and not penalize_intercept:
            pen[-1] = 0.0
        coef = np.linalg.solve(x.T @ x + np.diag(pen), x.T @ yc)
    return 1.0 - np.sum((yc - x @ coef) ** 2) / np.sum(yc**2)


def _features(rng, steps=N_STEPS, n=N, d=D, labels=None):
    h = rng.standard_normal((steps, n, d)) + rng.uniform(-1, 1, d)
    if labels is not None:  # make the features informative so TL is far from the null
        h[..., :C] += 1.5 * np.eye(C)[labels]
    return h


def test_tl_labels(make, rng):
    labels = rng.integers(0, C, N)
    h = _features(rng, labels=labels)
    H = make(h, ("step", "sample", "in"), step=STEPS)
    Y = make(labels, ("sample",))
    tl = T.target_linearity(H, labels=Y, n_classes=C)
    assert tl.dims == ("step",) and is_lazy(tl) == is_lazy(H)
    onehot = np.eye(C)[labels]
    ref = [ref_tl(h[k], onehot) for k in range(len(STEPS))]
    close(tl, ref)
    assert 0.2 < min(ref)
    assert tl.attrs["tl_null"] == D / N
    # n_classes inferred from the labels
    close(T.target_linearity(H, labels=Y), ref)


@pytest.mark.parametrize(
    "options",
    [
        {"lam": 0.7},
        {"center_features": True},
        {"intercept": True},
        {"lam": 2.5, "center_features": True},
        {"lam": 1.3, "intercept": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_tl_options(make, rng, options):
    y = rng.standard_normal((N, 3)) + 5.0
    h = _features(rng)
    h[..., 0] += y[:, 0]
    H = make(h, ("step", "sample", "in"), step=STEPS)
    Y = make(y, ("sample", "target"))
    ref = [
        ref_tl(
            h[k],
            y,
            lam=options.get("lam", 0.0),
            center=options.get("center_features", False),
            intercept=options.get("intercept", False),
        )
        for k in range(len(STEPS))
    ]
    close(T.target_linearity(H, targets=Y, **options), ref)


def test_intercept_equals_centering(rng):
    h = rng.standard_normal((60, 5)) + 3.0
    y = rng.standard_normal((60, 2))
    a = T.target_linearity_np(h, y, intercept=True, lam=0.4)
    b = T.target_linearity_np(h, y, center_features=True, lam=0.4)
    close(a, b)


def test_regression_target_1d(make, rng):
    h = _features(rng, steps=1)[0]
    y = h @ rng.standard_normal(D) + rng.standard_normal(N)
    tl = T.target_linearity(make(h, ("sample", "in")), targets=make(y, ("sample",)))
    close(tl, ref_tl(h, y[:, None]))


def test_rank_deficient_features(make, rng):
    labels = rng.integers(0, C, N)
    h = _features(rng, labels=labels)
    mix = rng.standard_normal((D, 5))
    wide = np.concatenate([h, h @ mix, h[..., :2]], axis=-1)  # rank stays D
    H = make(wide, ("step", "sample", "in"), step=STEPS)
    tl = T.target_linearity(H, labels=make(labels, ("sample",)), n_classes=C)
    ref = [ref_tl(h[k], np.eye(C)[labels]) for k in range(len(STEPS))]
    close(tl, ref, rtol=1e-9)
    assert tl.attrs["n_features"] == D + 7


@pytest.mark.parametrize("d", [N, N + 30])
def test_d_at_least_n_is_one(rng, d):
    h = rng.standard_normal((N, d))
    labels = rng.integers(0, C, N)
    tl = T.target_linearity(
        xr.DataArray(h, dims=("sample", "in")), labels=xr.DataArray(labels, dims="sample")
    )
    close(tl, 1.0, rtol=1e-7)
    assert float(T.tl_null(xr.DataArray(h, dims=("sample", "in")))) == 1.0


def test_constant_and_nonfinite(make, rng):
    h = _features(rng)
    h[1, 3, 0] = np.nan
    y = rng.standard_normal((N, 2))
    tl = T.target_linearity(
        make(h, ("step", "sample", "in"), step=STEPS), targets=make(y, ("sample", "target"))
    ).values
    assert np.isnan(tl[1]) and np.isfinite(tl[[0, 2]]).all()
    const = T.target_linearity_np(h[0], np.ones((N, 2)))
    assert np.isnan(const)
    labels = rng.integers(0, C, N)
    labels[5] = C + 3  # out of range: NaN, never a silently dropped sample
    tl = T.target_linearity(
        make(h[[0]], ("step", "sample", "in")), labels=make(labels, ("sample",)), n_classes=C
    )
    assert np.isnan(tl.values).all()


def test_pca_option(rng):
    n, d, k = 200, 30, 6
    h = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 2.0
    labels = rng.integers(0, 3, n)
    onehot = np.eye(3)[labels]
    hc = h - h.mean(0)
    _, _, vt = np.linalg.svd(hc, full_matrices=False)
    ref = ref_tl(h @ vt[:k].T, onehot)
    H = xr.DataArray(h, dims=("sample", "in"))
    Y = xr.DataArray(labels, dims="sample")
    tl = T.target_linearity(H, labels=Y, pca=True, pca_components=k, pca_cap=20)
    close(tl, ref)
    assert tl.attrs["pca_applied"] == 1 and tl.attrs["tl_null"] == k / n
    off = T.target_linearity(H, labels=Y, pca=True, pca_components=k, pca_cap=d)
    close(off, ref_tl(h, onehot))
    assert off.attrs["pca_applied"] == 0


def test_surrogate_and_alignment(make, rng):
    labels = rng.integers(0, C, N)
    h = _features(rng, labels=labels)
    w = rng.standard_normal((len(STEPS), 5, D))
    H = make(h, ("step", "sample", "in"), step=STEPS)
    W = make(w, ("step", "out", "in"), step=STEPS)
    res = tl_surrogate(H, W, labels=make(labels, ("sample",)), n_classes=C)
    yc = np.eye(C)[labels] - np.eye(C)[labels].mean(0)
    s_ref, kta_ref = [], []
    for k in range(len(STEPS)):
        z = h[k] @ w[k].T
        kern, lab = z @ z.T, yc @ yc.T  # N x N kernels: fine in a test
        s_ref.append(np.sum((z.T @ yc) ** 2) / C)
        kta_ref.append(np.sum(kern * lab) / (np.linalg.norm(kern) * np.linalg.norm(lab)))
    close(res.tl_surrogate, s_ref)
    close(res.kernel_target_alignment, kta_ref)


def test_argument_errors(rng):
    H = xr.DataArray(rng.standard_normal((5, 2)), dims=("sample", "in"))
    with pytest.raises(ValueError, match="exactly one"):
        T.target_linearity(H)
    with pytest.raises(ValueError, match="lam"):
        T.target_linearity(H, targets=xr.DataArray(np.arange(5.0), dims="sample"), lam=-1)


@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(3, 40))
    d = draw(st.integers(1, 12))
    c = draw(st.integers(1, 4))
    r = np.random.default_rng(seed)
    scale = 10.0 ** draw(st.integers(-3, 3))
    h = r.standard_normal((n, d)) * scale + draw(st.floats(-5, 5))
    y = r.standard_normal((n, c))
    return h, y


def accuracy(h):
    """TL comes from the normal equations: its round-off grows like cond(H)^2 eps."""
    return 1e-10 + 1e-14 * np.linalg.cond(h) ** 2


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from([0.0, 0.1, 10.0]))
def test_tl_in_unit_interval(problem, lam):
    h, y = problem
    tl = float(T.target_linearity_np(h, y, lam=lam))
    tol = accuracy(h)
    assert -tol <= tl <= 1 + tol


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_tl_unchanged_by_linear_combinations(problem, extra, seed):
    h, y = problem
    n, d = h.shape
    assume(d < n)
    assume(np.linalg.matrix_rank(h) == d and np.linalg.cond(h) < 1e6)
    mix = np.random.default_rng(seed).standard_normal((d, extra))
    wide = np.hstack([h, h @ mix])
    tol = accuracy(h)
    assert abs(T.target_linearity_np(wide, y) - T.target_linearity_np(h, y)) <= tol
    assert abs(T.target_linearity_np(h, y) - ref_tl(h, y)) <= tol


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 50), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_chunking_never_changes_tl(sample_chunk, step_chunk, seed):
    r = np.random.default_rng(seed)
    h = xr.DataArray(r.standard_normal((3, 50, 6)) + 1.0, dims=("step", "sample", "in"))
    labels = xr.DataArray(r.integers(0, 3, 50), dims="sample")
    ref = T.target_linearity(h, labels=labels, n_classes=3).values
    lazy = T.target_linearity(
        h.chunk({"sample": sample_chunk, "step": step_chunk}),
        labels=labels.chunk({"sample": sample_chunk + 1}),
        n_classes=3,
    )
    close(lazy, ref, rtol=1e-12)


def test_sample_count_mismatch_is_explained(rng):
    h = xr.DataArray(rng.standard_normal((12, 3)), dims=("sample", "in"), name="input")
    labels = xr.DataArray(np.arange(4) % 2, dims="sample", name="labels")
    with pytest.raises(ValueError, match="samples_per_example"):
        T.target_linearity(h, labels=labels)
