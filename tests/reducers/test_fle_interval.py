"""The per-interval FLE kernels ``analyze`` stores, against explicit float64 NumPy.

References are written out here entry by entry (outer products, ``np.corrcoef``,
sums of squares), on fresh seeded data; the tolerances are float64 round-off.
"""

from __future__ import annotations

import numpy as np
import pytest
from reducer_helpers import close

import gramlin_analyze.reducers as R

B, N, D_OUT, D = 3, 40, 5, 4


def _sym(rng, shape=(B, D, D)):
    a = rng.standard_normal(shape)
    return a + np.swapaxes(a, -1, -2)


def _gram(W):
    """W^T W as a sum of outer products of the rows."""
    out = np.zeros(W.shape[:-2] + (W.shape[-1], W.shape[-1]))
    for idx in np.ndindex(W.shape[:-2]):
        for row in W[idx]:
            out[idx] += np.outer(row, row)
    return out


def _pearson(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def _fro(a):
    return np.sqrt(np.sum(a**2))


def test_interval_vcs_is_the_trapezoid_rule(rng):
    va, vb = _sym(rng), _sym(rng)
    gap = rng.integers(1, 500, B).astype(float)
    ref = np.stack([(gap[k] / 2) * va[k] + (gap[k] / 2) * vb[k] for k in range(B)])
    close(R.interval_vcs_np(va, vb, gap), ref, rtol=1e-14)


def test_accumulate_vcs_chains_to_the_cumulative_trapezoid(rng):
    steps = np.cumsum(rng.integers(1, 50, 6)).astype(float)
    vcs = _sym(rng, (len(steps), D, D))
    ref = np.zeros_like(vcs)
    for t in range(1, len(steps)):  # the area under each entry, interval by interval
        ref[t] = ref[t - 1] + (steps[t] - steps[t - 1]) * (vcs[t - 1] + vcs[t]) / 2
    acc = np.zeros((D, D))
    for t in range(1, len(steps)):
        increment, acc = R.accumulate_vcs_np(acc, vcs[t - 1], vcs[t], steps[t] - steps[t - 1])
        close(increment, ref[t] - ref[t - 1], rtol=1e-12)
        close(acc, ref[t], rtol=1e-13)
    trapezoid = R.accumulate_trapezoid_np(np.moveaxis(vcs, 0, -1), steps)
    close(acc, trapezoid[..., -1], rtol=1e-13)


def test_interval_gradient_recovers_a_constant_gradient(rng):
    W_a = rng.standard_normal((B, D_OUT, D))
    G = rng.standard_normal((B, D_OUT, D))
    gamma, gap = np.array([0.1, 0.05, 0.3]), np.array([1.0, 7.0, 20.0])
    W_b = W_a.copy()
    for k in range(B):
        for _ in range(int(gap[k])):
            W_b[k] = W_b[k] - gamma[k] * G[k]
    close(R.interval_gradient_np(W_a, W_b, gamma, gap), G, rtol=1e-11)


def test_one_gradient_step_obeys_the_fle(rng):
    """dGram = VCS + second-order term exactly for one plain step: the first-order
    residual then equals the relative size of the second-order term."""
    h = rng.standard_normal((N, D))
    dz = rng.standard_normal((N, D_OUT)) / N
    W_a = rng.standard_normal((D_OUT, D))
    gamma = 0.2
    G = sum(np.outer(dz[i], h[i]) for i in range(N))
    W_b = W_a - gamma * G
    g = dz @ W_a  # g_i = W^T dL/dz_i
    hp = h - gamma * g
    vcs_a = sum(np.outer(hp[i], hp[i]) - np.outer(h[i], h[i]) for i in range(N))
    gg = sum(np.outer(g[i], g[i]) for i in range(N))
    dgram = _gram(W_b) - _gram(W_a)
    second = R.second_order_term_np(R.interval_gradient_np(W_a, W_b, gamma, 1), gg, gamma)
    close(dgram, vcs_a + second, rtol=1e-11)
    increment = R.interval_vcs_np(vcs_a, vcs_a, 1)
    res = R.fle_interval_metrics_np(dgram, vcs_a, increment, second, 1)
    ref = _fro(gamma**2 * (G.T @ G - gg)) / _fro(dgram)
    close(res["fle_residual"], ref, rtol=1e-8)
    close(res["fle_second_order"], ref, rtol=1e-10)


def test_interval_metrics_match_explicit_formulas(rng):
    dgram, vcs_a, increment, second = (_sym(rng) for _ in range(4))
    gap = rng.integers(1, 100, B).astype(float)
    res = R.fle_interval_metrics_np(dgram, vcs_a, increment, second, gap)
    assert set(res) == {
        "dgram_vcs_corr",
        "vcs_interval_corr",
        "vcs_interval_ratio",
        "fle_residual",
        "fle_second_order",
    }
    for k in range(B):
        d = dgram[k]
        expected = {
            "dgram_vcs_corr": _pearson(np.diag(d), np.diag(increment[k])),
            "vcs_interval_corr": _pearson(d, increment[k]),
            "vcs_interval_ratio": _fro(increment[k]) / _fro(d),
            "fle_residual": _fro(d - gap[k] * vcs_a[k]) / _fro(d),
            "fle_second_order": _fro(second[k]) / _fro(d),
        }
        for name, value in expected.items():
            close(res[name][k], value, rtol=1e-12)
            one = R.fle_interval_metrics_np(d, vcs_a[k], increment[k], second[k], gap[k])[name]
            assert one.shape == () and one == res[name][k]  # a batch entry is its own matrix


def test_identical_checkpoints_give_nan_relative_norms(rng):
    zero = np.zeros((D, D))
    res = R.fle_interval_metrics_np(zero, _sym(rng, (D, D)), _sym(rng, (D, D)), zero, 5)
    assert np.isnan(res["fle_residual"]) and np.isnan(res["fle_second_order"])


INTERVAL_TERMS = ("dgram_vcs_corr", "vcs_interval_corr", "vcs_interval_ratio")
# kernel -> (argument builder, for each argument the outputs that depend on it)
NONFINITE_CASES = {
    "interval_vcs": (
        R.interval_vcs_np,
        lambda r: [_sym(r), _sym(r), np.array([1.0, 2.0, 3.0])],
        [[0], [0], [0]],
    ),
    "accumulate_vcs": (
        R.accumulate_vcs_np,
        lambda r: [_sym(r), _sym(r), _sym(r), np.array([1.0, 2.0, 3.0])],
        [[1], [0, 1], [0, 1], [0, 1]],
    ),
    "interval_gradient": (
        R.interval_gradient_np,
        lambda r: [
            r.standard_normal((B, D_OUT, D)),
            r.standard_normal((B, D_OUT, D)),
            np.array([0.1, 0.2, 0.3]),
            np.array([1.0, 2.0, 3.0]),
        ],
        [[0], [0], [0], [0]],
    ),
    "fle_interval_metrics": (
        R.fle_interval_metrics_np,
        lambda r: [_sym(r), _sym(r), _sym(r), _sym(r), np.array([1.0, 2.0, 3.0])],
        [
            [*INTERVAL_TERMS, "fle_residual", "fle_second_order"],
            ["fle_residual"],
            list(INTERVAL_TERMS),
            ["fle_second_order"],
            ["fle_residual"],
        ],
    ),
}


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", list(NONFINITE_CASES))
def test_nonfinite_poisons_only_its_entry(name, bad, rng):
    kernel, build, depends = NONFINITE_CASES[name]
    args = build(rng)
    for k in range(len(args)):
        poisoned = [a.copy() for a in args]
        poisoned[k][(1,) + (0,) * (poisoned[k].ndim - 1)] = bad
        result = kernel(*poisoned)
        outs = dict(enumerate(result)) if isinstance(result, tuple) else result
        outs = outs if isinstance(outs, dict) else {0: outs}
        for key, out in outs.items():
            out = np.asarray(out)
            if key in depends[k]:
                assert np.isnan(out[1]).all(), f"argument {k} = {bad} did not make {key} NaN"
            else:
                assert np.isfinite(out[1]).all(), f"{key} does not depend on argument {k}"
            assert np.isfinite(out[[0, 2]]).all(), f"argument {k} reached other entries"
