"""Pearson (diag/full), cosine and interval consistency against direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from reducer_helpers import close, is_lazy

from gramlin_analyze.reducers import alignment as A
from gramlin_analyze.reducers.vc import accumulated_vcs

STEPS = np.array([0, 10, 30, 35])
SQ = ("step", "in_i", "in_j")


def _sym(rng, shape):
    a = rng.standard_normal(shape)
    return a + np.swapaxes(a, -1, -2)


def test_pearson_and_cosine(make, rng):
    a = _sym(rng, (4, 6, 6))
    b = a + 0.5 * _sym(rng, (4, 6, 6))
    X, Y = make(a, SQ, step=STEPS), make(b, SQ, step=STEPS)
    diag = A.pearson(X, Y)
    full = A.pearson(X, Y, mode="full")
    cos = A.cosine_similarity(X, Y)
    assert diag.dims == ("step",) and is_lazy(diag) == is_lazy(X)
    close(diag, [np.corrcoef(np.diag(a[k]), np.diag(b[k]))[0, 1] for k in range(4)])
    close(full, [np.corrcoef(a[k].ravel(), b[k].ravel())[0, 1] for k in range(4)])
    close(
        cos, [np.sum(a[k] * b[k]) / np.linalg.norm(a[k]) / np.linalg.norm(b[k]) for k in range(4)]
    )


def test_pearson_pairs_steps_and_rejects_modes(rng):
    a = xr.DataArray(_sym(rng, (3, 4, 4)), dims=SQ, coords={"step": [0, 1, 2]})
    b = xr.DataArray(_sym(rng, (2, 4, 4)), dims=SQ, coords={"step": [1, 2]})
    r = A.pearson(a, b, mode="full")
    np.testing.assert_array_equal(r.step, [1, 2])
    close(r, [np.corrcoef(a.values[k + 1].ravel(), b.values[k].ravel())[0, 1] for k in range(2)])
    with pytest.raises(ValueError, match="mode"):
        A.pearson(a, b, mode="upper")


def test_constant_and_nonfinite_give_nan(rng):
    a = np.eye(3)
    assert np.isnan(A.pearson_np(a, 2 * np.eye(3)))  # constant diagonal: 0/0
    b = _sym(rng, (3, 3))
    b[0, 1] = np.nan
    assert np.isnan(A.pearson_np(_sym(rng, (3, 3)), b, mode="full"))
    assert np.isnan(A.cosine_np(np.zeros((3, 3)), b))


def test_interval_consistency(make, rng):
    d = 5
    vcs = _sym(rng, (4, d, d))
    noise = 0.1 * _sym(rng, (4, d, d))
    gram0 = _sym(rng, (d, d)) + 10 * np.eye(d)
    acc = np.zeros_like(vcs)
    for k in range(1, 4):
        acc[k] = acc[k - 1] + (STEPS[k] - STEPS[k - 1]) * (vcs[k - 1] + vcs[k]) / 2
    gram = gram0 + 1.5 * acc + noise
    res = A.vcs_interval_consistency(make(gram, SQ, step=STEPS), make(vcs, SQ, step=STEPS))
    actual = gram[1:] - gram[:-1]
    est = acc[1:] - acc[:-1]
    close(
        res.vcs_interval_corr,
        [np.corrcoef(actual[k].ravel(), est[k].ravel())[0, 1] for k in range(3)],
    )
    close(
        res.vcs_interval_ratio,
        [np.linalg.norm(est[k]) / np.linalg.norm(actual[k]) for k in range(3)],
    )
    np.testing.assert_array_equal(res.step, STEPS[1:])
    np.testing.assert_array_equal(res.step_start, STEPS[:-1])
    assert res.vcs_interval_ratio.attrs["direction"] == "estimate / actual"
    diag = A.vcs_interval_consistency(
        make(gram, SQ, step=STEPS), make(vcs, SQ, step=STEPS), mode="diag"
    )
    close(
        diag.vcs_interval_corr,
        [np.corrcoef(np.diag(actual[k]), np.diag(est[k]))[0, 1] for k in range(3)],
    )


def test_gram_vs_accumulated_vcs_exact(rng):
    # a Gram that moves exactly as the trapezoid VCS says: correlation and ratio 1
    vcs = xr.DataArray(_sym(rng, (4, 4, 4)), dims=SQ, coords={"step": STEPS})
    gram = accumulated_vcs(vcs) + xr.DataArray(np.eye(4) * 3.0, dims=("in_i", "in_j"))
    res = A.vcs_interval_consistency(gram.transpose(*SQ), vcs)
    close(res.vcs_interval_corr, np.ones(3))
    close(res.vcs_interval_ratio, np.ones(3))
    close(
        A.pearson(
            gram.isel(step=-1) - 3 * np.eye(4), accumulated_vcs(vcs).isel(step=-1), mode="full"
        ),
        1.0,
    )
