"""A NaN or Inf in one batch entry makes exactly that entry's results NaN, in every kernel."""

from __future__ import annotations

import numpy as np
import pytest

import gramlin_analyze.reducers as R

B, N, D, C = 2, 12, 4, 3


def _sq(rng):
    a = rng.standard_normal((B, D, D))
    return a @ np.swapaxes(a, -1, -2) + np.eye(D)


def _labels(rng):
    return np.concatenate([np.arange(C), rng.integers(0, C, N - C)])


TL_STATS = ("n", "sum_h", "sum_y", "hh", "hy", "yy")


def _tl_stats(rng):
    return R.tl_stats_np(rng.standard_normal((B, N, D)), rng.standard_normal((B, N, C)))


# name -> (kernel, builder of its arguments; every float ndarray argument with a
# leading batch axis of size B is poisoned in turn)
CASES = {
    "gram": (R.gram_np, lambda r: [r.standard_normal((B, 5, D))]),
    "gram_spectrum": (R.gram_spectrum_np, lambda r: [r.standard_normal((B, 5, D))]),
    "effective_rank": (R.effective_rank_np, lambda r: [r.uniform(0.1, 1, (B, D))]),
    "stable_rank": (R.stable_rank_np, lambda r: [r.standard_normal((B, 5, D))]),
    "frobenius_norm": (R.frobenius_norm_np, lambda r: [r.standard_normal((B, 5, D))]),
    "spectral_norm": (R.spectral_norm_np, lambda r: [r.standard_normal((B, 5, D))]),
    "vc_stats": (
        R.vc_stats_np,
        lambda r: [r.standard_normal((B, N, D)), r.standard_normal((B, N, D))],
    ),
    "virtual_covariance": (
        R.virtual_covariance_np,
        lambda r: [_sq(r), r.standard_normal((B, D, D)), _sq(r), np.array([0.1, 0.2])],
    ),
    "vcs": (R.vcs_np, lambda r: [r.standard_normal((B, D, D)), _sq(r), np.array([0.1, 0.2])]),
    "weight_gradient": (
        R.weight_gradient_np,
        lambda r: [r.standard_normal((B, N, 3)), r.standard_normal((B, N, D))],
    ),
    "second_order_term": (
        R.second_order_term_np,
        lambda r: [r.standard_normal((B, 3, D)), _sq(r), np.array([0.1, 0.2])],
    ),
    "fle_residual": (R.fle_residual_np, lambda r: [_sq(r), _sq(r)]),
    "pearson_diag": (R.pearson_np, lambda r: [_sq(r), _sq(r)]),
    "pearson_full": (lambda a, b: R.pearson_np(a, b, mode="full"), lambda r: [_sq(r), _sq(r)]),
    "cosine": (R.cosine_np, lambda r: [_sq(r), _sq(r)]),
    "norm_ratio": (R.norm_ratio_np, lambda r: [_sq(r), _sq(r)]),
    "tl_stats": (
        R.tl_stats_np,
        lambda r: [r.standard_normal((B, N, D)), r.standard_normal((B, N, C))],
    ),
    "target_linearity": (
        R.target_linearity_np,
        lambda r: [r.standard_normal((B, N, D)), r.standard_normal((B, N, C))],
    ),
    "target_linearity_from_stats": (
        lambda *parts: R.target_linearity_from_stats_np(dict(zip(TL_STATS, parts, strict=True))),
        lambda r: list(_tl_stats(r).values()),
    ),
    "agop": (R.agop_np, lambda r: [r.standard_normal((B, N, C, D))]),
    "psd_sqrt": (R.psd_sqrt_np, lambda r: [_sq(r)]),
    "nfa_correlation": (
        lambda w, a: R.nfa_correlation_np(w, a, sqrt=True),
        lambda r: [r.standard_normal((B, 5, D)), _sq(r)],
    ),
    "collapse_stats": (
        lambda h: R.collapse_stats_np(h, _labels(np.random.default_rng(0)), C),
        lambda r: [r.standard_normal((B, N, D))],
    ),
    "collapse": (
        lambda h: R.collapse_from_stats_np(
            R.collapse_stats_np(h, _labels(np.random.default_rng(0)), C)
        ),
        lambda r: [r.standard_normal((B, N, D))],
    ),
    "nc3": (
        R.nc3_np,
        lambda r: [
            r.standard_normal((B, C, D)),
            r.standard_normal((B, C, D)),
            r.standard_normal((B, D)),
        ],
    ),
    "ncc_mismatch": (
        R.ncc_mismatch_np,
        lambda r: [
            r.standard_normal((B, N, D)),
            r.standard_normal((B, C, D)),
            r.standard_normal((B, C, D)),
            r.standard_normal((B, C)),
        ],
    ),
    "cka_stats": (
        R.cka_stats_np,
        lambda r: [r.standard_normal((B, N, D)), r.standard_normal((B, N, 2))],
    ),
    "linear_cka": (
        R.linear_cka_np,
        lambda r: [r.standard_normal((B, N, D)), r.standard_normal((B, N, 2))],
    ),
}


def _outputs(result):
    if isinstance(result, dict):
        return list(result.values())
    if isinstance(result, tuple):
        return list(result)
    return [result]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(CASES))
def test_nonfinite_poisons_only_its_entry(name, bad, rng):
    kernel, build = CASES[name]
    args = build(rng)
    clean = _outputs(kernel(*args))
    for out in clean:
        assert np.isfinite(out).all(), f"{name}: clean input gave non-finite output"
    for k, arg in enumerate(args):
        poisoned = [a.copy() for a in args]
        poisoned[k][(1,) + (0,) * (arg.ndim - 1)] = bad
        for out in _outputs(kernel(*poisoned)):
            out = np.asarray(out)
            assert np.isnan(out[1]).all(), (
                f"{name}: argument {k} = {bad} at entry 1 did not give NaN"
            )
            assert np.isfinite(out[0]).all(), f"{name}: entry 0 was affected"


def test_one_hot_invalid_labels():
    out = R.one_hot_np(np.array([0.0, 1.5, np.nan, -1.0, 2.0]), 3)
    assert np.isnan(out[1:4]).all() and np.isfinite(out[[0, 4]]).all()


def test_trapezoid_nonfinite_poisons_the_rest():
    y = np.array([[1.0, 2.0, np.inf, 1.0], [1.0, 2.0, 3.0, 4.0]])
    out = R.accumulate_trapezoid_np(y, [0, 1, 2, 3])
    assert np.isfinite(out[0, :2]).all() and np.isnan(out[0, 2:]).all()
    assert np.isfinite(out[1]).all()
