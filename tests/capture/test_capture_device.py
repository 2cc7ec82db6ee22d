"""Capture on a device: the model where it is moved, batches following it, the sink's arrays
back on the CPU as NumPy with the same dtypes. On a machine with CUDA the GPU's ``h``, ``g``
and AGOP match the CPU's to float32 tolerance; everywhere, ``cpu`` is the default path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gramlin_analyze.capture import capture_step, make_probe
from gramlin_analyze.capture.device import check_device_name, device_problem
from gramlin_analyze.errors import UsageError

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    ),
]


def _reference(model: nn.Sequential, x: np.ndarray, labels: np.ndarray) -> dict[str, tuple]:
    """``(h, g)`` of both linear layers by hand in float64: ``g = dL/dz W``, mean cross-entropy."""
    w1, b1 = (t.detach().double() for t in (model[0].weight, model[0].bias))
    w2, b2 = (t.detach().double() for t in (model[2].weight, model[2].bias))
    h1 = torch.from_numpy(x).double().requires_grad_(True)  # so that z1 and z2 have grads
    z1 = h1 @ w1.T + b1
    h2 = torch.tanh(z1)
    z2 = h2 @ w2.T + b2
    dz1, dz2 = torch.autograd.grad(F.cross_entropy(z2, torch.from_numpy(labels)), [z1, z2])
    return {"0": (x, (dz1 @ w1).numpy()), "2": (h2.detach().numpy(), (dz2 @ w2).numpy())}


@pytest.mark.parametrize("device", DEVICES)
def test_capture_on_a_device_matches_the_cpu_and_a_float64_reference(device, rng, make_collector):
    n, d, hidden, c = 50, 6, 9, 20  # 20 outputs: AGOP estimated with Rademacher signs
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, c))
    x = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, c, n)
    probe = make_probe(x, labels=labels)
    options = dict(loss="cross_entropy", batch_size=16, capture_agop=True, agop_projections=8)
    on_cpu, there = make_collector(), make_collector()
    cpu = capture_step(copy.deepcopy(model), probe, sink=on_cpu, **options)
    moved = copy.deepcopy(model).to(device)
    res = capture_step(moved, probe, sink=there, **options)
    assert next(moved.parameters()).device.type == device  # it ran there, and stays there
    ref = _reference(model, x, labels)
    for name in ("0", "2"):
        h, g = there.h(name), there.g(name)
        assert isinstance(h, np.ndarray) and h.dtype == np.float32 and g.dtype == np.float32
        np.testing.assert_allclose(h, ref[name][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, ref[name][1], rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(h, on_cpu.h(name), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g, on_cpu.g(name), rtol=1e-4, atol=1e-9)
        agop = res.agop[name]
        assert isinstance(agop, np.ndarray) and agop.dtype == np.float64
        np.testing.assert_allclose(agop, cpu.agop[name], rtol=1e-4, atol=1e-9)
    assert res.agop_method == cpu.agop_method == "rademacher:8"
    assert res.loss == pytest.approx(cpu.loss, rel=1e-5)


def test_device_names_and_a_missing_gpu_are_explained():
    assert check_device_name("cpu") == "cpu" and check_device_name("cuda:1") == "cuda:1"
    for bad in ("gpu", "cuda:", "CPU", "cuda:x"):
        with pytest.raises(UsageError, match="--device must be cpu, cuda or cuda:N"):
            check_device_name(bad)
    assert device_problem("cpu") == ""
    if torch.cuda.is_available():
        beyond = f"cuda:{torch.cuda.device_count()}"
        assert f"so no {beyond}" in device_problem(beyond)
    else:
        assert "torch.cuda.is_available() is False" in device_problem("cuda")
