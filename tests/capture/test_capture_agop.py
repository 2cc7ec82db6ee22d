"""AGOP = (1/N) sum_i J_i^T J_i against explicit per-sample Jacobians of the network output."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.autograd.functional import jacobian

from gramlin_analyze.capture import capture_step, make_probe


def _reference_agop(model: nn.Sequential, x: np.ndarray) -> dict[str, np.ndarray]:
    """For each Linear at index k: J_i = d model[k:](h_i) / d h_i, h_i = model[:k](x_i)."""
    out = {}
    xt = torch.from_numpy(x)
    for k, module in enumerate(model):
        if not isinstance(module, nn.Linear):
            continue
        head, tail = model[:k], model[k:]
        acc = 0
        with torch.no_grad():
            hs = head(xt) if k else xt
        for h in hs:
            j = jacobian(tail, h)  # (C, d_in)
            acc = acc + j.T @ j
        out[str(k)] = (acc / len(x)).numpy()
    return out


def test_agop_exact_matches_per_sample_jacobians(rng):
    model = nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(), nn.Linear(6, 4)
    ).double()
    x = rng.normal(size=(17, 5))
    probe = make_probe(x, labels=rng.integers(0, 4, 17))
    result = capture_step(
        model, probe, loss="cross_entropy", sink=None, batch_size=5, capture_agop=True
    )
    assert result.agop_method == "exact"
    reference = _reference_agop(model, x)
    assert set(result.agop) == set(reference) == {"0", "2", "4"}
    for name, ref in reference.items():
        got = result.agop[name]
        assert got.dtype == np.float64 and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)


def test_agop_projection_estimate_is_close_for_many_projections(rng):
    n_out = 20  # above the exact limit of 16 outputs
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, n_out)).double()
    x = rng.normal(size=(24, 4))
    probe = make_probe(x, labels=rng.integers(0, n_out, 24))
    kwargs = dict(loss="cross_entropy", sink=None, batch_size=10, capture_agop=True)
    est = capture_step(model, probe, agop_projections=400, agop_seed=3, **kwargs)
    assert est.agop_method == "rademacher:400"
    reference = _reference_agop(model, x)
    for name, ref in reference.items():
        err = np.linalg.norm(est.agop[name] - ref) / np.linalg.norm(ref)
        assert err < 0.1, f"{name}: relative error {err:.3g}"
        np.testing.assert_allclose(est.agop[name], est.agop[name].T, atol=1e-12)
    again = capture_step(model, probe, agop_projections=400, agop_seed=3, **kwargs)
    other = capture_step(model, probe, agop_projections=400, agop_seed=4, **kwargs)
    np.testing.assert_array_equal(again.agop["0"], est.agop["0"])
    assert not np.array_equal(other.agop["0"], est.agop["0"])
