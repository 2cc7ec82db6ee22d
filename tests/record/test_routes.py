"""The recorder's cheaper routes (chosen per layer by cost) against the float64 autograd reference."""

from __future__ import annotations

import pytest
import torch

from gramlin_analyze.record import Recorder
from gramlin_analyze.record.terms import FLUSH_EVERY, SYM_MIN
from tests.record.helpers import batches, mlp, reference_step, rel


def _record(model, data, lr, **options):
    """Train with plain SGD; return the recorder and the summed reference terms (full matrices)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = Recorder(model, opt, **options)
    expected: dict[str, dict[str, torch.Tensor]] = {}
    sgd = bool(options.get("sgd_terms"))
    for x, y in data:
        for name, terms in reference_step(model, x, y, lr, sgd=sgd).items():
            for q, t in terms.items():
                expected.setdefault(name, {}).setdefault(q, torch.zeros_like(t)).add_(t)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return rec, expected


@pytest.mark.parametrize("mode", ["full", "diag"])
def test_narrow_outputs_take_the_dz_route(mode):
    """``W^T (sum_i dz_i dz_i^T) W`` where outputs are few, with and without a free ``g``."""
    widths = (20, 3, 16, 2)
    model = mlp(widths, seed=31)
    rec, expected = _record(model, batches(3, 32, widths[0], widths[-1], seed=32), 0.2, mode=mode)
    routes = {name: (s.second, s.route) for name, s in rec.core.sums.items()}
    assert routes == {"0": ("dz", "wg"), "2": ("g", "wg"), "4": ("dz", "wg")}
    got = rec.sums()
    for name, terms in expected.items():
        for q, t in terms.items():
            t = t if mode == "full" else torch.diagonal(t)
            assert rel(got[name][q], t) < 1e-10, (name, q)


def test_wide_symmetric_products_are_formed_by_halves():
    """Layers from ``SYM_MIN`` inputs on: 3/4 of each symmetric product, read back whole."""
    widths = (SYM_MIN + 44, SYM_MIN + 4, 4)
    model = mlp(widths, seed=33)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_children() if hasattr(m, "weight")}
    data = batches(2, 8, widths[0], widths[-1], seed=34)
    rec, expected = _record(model, data, 0.1, mode="full", sgd_terms=True)
    assert {n: s.second for n, s in rec.core.sums.items()} == {"0": "g", "2": "dz"}
    got = rec.sums()
    for name, terms in expected.items():
        for q in ("vcs_first", "vcs_second", "vcs"):
            assert rel(got[name][q], terms[q]) < 1e-10, (name, q)
        second, h = got[name]["vcs_second"], widths[int(name) // 2] // 2
        assert torch.equal(second[h:, :h], second[:h, h:].t())  # filled from the top right
        W = model.get_submodule(name).weight.detach()
        actual = W.t() @ W - w0[name].t() @ w0[name]
        assert rel(got[name]["vcs_first"] + got[name]["sgd_second"], actual) < 1e-8


@pytest.mark.parametrize("mode", ["full", "diag"])
def test_float32_steps_summed_before_float64_stay_accurate(mode):
    """float32 models: steps pile up in float32 for ``FLUSH_EVERY`` steps, then go to float64.

    (diag: ``diag(G^T G)`` and ``diag(W^T G)`` pile up elementwise, summed over outputs at
    the flush; full: ``W^T G`` and ``G^T G`` are multiplied straight into the pending sums.)
    """
    widths = (6, 16, 12, 3)
    steps = FLUSH_EVERY + 5
    model = mlp(widths, seed=35, dtype=torch.float32)
    data = batches(steps, 8, widths[0], widths[-1], seed=36, dtype=torch.float32)
    rec, expected = _record(model, data[:-3], 0.1, mode=mode, sgd_terms=True)
    assert rec.core.sums["4"].route == "wg"
    assert all(s.pending_steps == steps - 3 - FLUSH_EVERY for s in rec.core.sums.values())
    mid = rec.sums()  # reading flushes; the sums go on from there
    assert all(s.pending_steps == 0 for s in rec.core.sums.values())
    opt = rec.core.optimizers[0]
    for x, y in data[-3:]:
        for name, terms in reference_step(model, x, y, 0.1, sgd=True).items():
            for q, t in terms.items():
                expected[name][q] += t
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    got = rec.sums()
    for name, terms in expected.items():
        assert got[name]["vcs"].dtype == torch.float64 and not torch.equal(
            mid[name]["vcs"], got[name]["vcs"]
        )
        for q, t in terms.items():
            t = t if mode == "full" else torch.diagonal(t)
            assert rel(got[name][q], t) < 1e-5, (name, q)
