"""The Feature Learning Equation on captured data: sum_i g_i h_i^T = W^T dL/dW.

The reference is autograd's ``weight.grad`` of the full-probe-set loss,
computed here in one pass over all samples; capture runs in batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gramlin_analyze.capture import (
    capture_step,
    load_torchscript,
    make_probe,
    resolve_loss,
    sample_counts,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]


def _mlp(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4)
    ).to(dtype)


class SmallCNN(nn.Module):
    """Input (2, 8, 8): conv1 -> (3, 4, 4), conv2 -> (4, 4, 2), head on 32 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 4, kernel_size=(2, 3), padding=(1, 0), dilation=(2, 1))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x), inplace=True)
        x = torch.tanh(self.conv2(x))
        return self.head(x.flatten(1))


def _fle_check(
    model, modules, probe, collector, reduction, dtype, *, batch_size, loss="cross_entropy"
):
    result = capture_step(
        model,
        probe,
        loss=resolve_loss(loss, reduction=reduction),
        sink=collector,
        batch_size=batch_size,
        dtype=np.float64,
    )
    # Independent reference: one full-batch autograd pass.
    model.zero_grad()
    out = model(torch.from_numpy(probe.inputs).to(dtype))
    y = torch.from_numpy(probe.y)
    if loss == "cross_entropy":
        logits = out.movedim(-1, 1) if out.dim() > 2 else out  # classes on axis 1
        ref_loss = F.cross_entropy(logits, y, reduction=reduction)
    else:
        ref_loss = F.mse_loss(out, y.to(dtype), reduction=reduction)
    ref_loss.backward()
    assert result.loss == pytest.approx(ref_loss.item(), rel=TOL[dtype])
    for name, module in modules.items():
        w = module.weight.detach().double().reshape(module.weight.shape[0], -1).numpy()
        dw = module.weight.grad.double().reshape(w.shape).numpy()
        h, g = collector.h(name), collector.g(name)
        assert result.n_samples[name] == len(h)
        lhs = g.T @ h
        rhs = w.T @ dw
        err = np.linalg.norm(lhs - rhs) / np.linalg.norm(rhs)
        assert err < TOL[dtype], f"{name}: relative error {err:.3g}"
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fle_identity_mlp(rng, collector, dtype, reduction):
    model = _mlp(dtype)
    probe = make_probe(rng.normal(size=(23, 6)), labels=rng.integers(0, 4, 23))
    modules = {"0": model[0], "2": model[2], "4": model[4]}
    result = _fle_check(model, modules, probe, collector, reduction, dtype, batch_size=5)
    assert [layer.name for layer in result.layers] == ["0", "2", "4"]
    assert len(collector.parts["0"]) == 5  # 23 samples in batches of 5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fle_identity_cnn(rng, collector, dtype, reduction):
    model = SmallCNN().to(dtype)
    probe = make_probe(rng.normal(size=(11, 2, 8, 8)), labels=rng.integers(0, 3, 11))
    modules = {"conv1": model.conv1, "conv2": model.conv2, "head": model.head}
    result = _fle_check(model, modules, probe, collector, reduction, dtype, batch_size=4)
    # One sample per (image, output position); h is the unfolded patch.
    assert result.n_samples == {"conv1": 11 * 16, "conv2": 11 * 8, "head": 11}
    assert result.d_in == {"conv1": 2 * 9, "conv2": 3 * 6, "head": 32}
    assert sample_counts(model, probe) == {
        k: (v, result.d_in[k]) for k, v in result.n_samples.items()
    }


def test_conv_patches_are_image_major(rng, collector):
    """Row i * P + p of conv1 is image i's patch at output position p (row-major grid)."""
    model = SmallCNN().double()
    x = rng.normal(size=(3, 2, 8, 8))
    probe = make_probe(x, labels=rng.integers(0, 3, 3))
    capture_step(model, probe, loss="cross_entropy", sink=collector, batch_size=2, dtype=np.float64)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h = collector.h("conv1")
    for i, r, c in [(0, 0, 0), (1, 2, 3), (2, 3, 1)]:
        patch = padded[i, :, 2 * r : 2 * r + 3, 2 * c : 2 * c + 3].reshape(-1)
        np.testing.assert_allclose(h[i * 16 + r * 4 + c], patch, rtol=0, atol=1e-15)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, kernel_size=3, stride=2, padding=2, padding_mode="circular")
        self.fc = nn.Linear(4 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


def test_fle_identity_conv1d_circular_padding_mse(rng, collector):
    model = Conv1dNet().double()
    probe = make_probe(rng.normal(size=(9, 3, 10)), targets=rng.normal(size=(9, 2)))
    modules = {"conv": model.conv, "fc": model.fc}
    result = _fle_check(
        model, modules, probe, collector, "mean", torch.float64, batch_size=4, loss="mse"
    )
    assert result.n_samples["conv"] == 9 * 6


class TokenNet(nn.Module):
    """(batch, seq, d) inputs: one sample per (sequence, position) in both linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)))


def test_fle_identity_tokens_and_pooling(rng, collector, make_collector):
    model = TokenNet().double()
    probe = make_probe(rng.normal(size=(7, 4, 5)), labels=rng.integers(0, 3, (7, 4)))
    modules = {"proj": model.proj, "out": model.out}
    result = _fle_check(model, modules, probe, collector, "mean", torch.float64, batch_size=3)
    assert result.n_samples == {"proj": 28, "out": 28}
    assert sample_counts(model, probe) == {"proj": (28, 5), "out": (28, 6)}

    pooled = make_collector()
    res = capture_step(
        model, probe, loss="cross_entropy", sink=pooled, batch_size=3, dtype=np.float64, pool="mean"
    )
    assert res.n_samples == {"proj": 7, "out": 7}
    np.testing.assert_allclose(pooled.h("proj"), probe.inputs.mean(axis=1), atol=1e-14)
    g_tokens = collector.g("proj").reshape(7, 4, 5)
    np.testing.assert_allclose(pooled.g("proj"), g_tokens.mean(axis=1), atol=1e-14)
    last = make_collector()
    capture_step(model, probe, loss="cross_entropy", sink=last, dtype=np.float64, pool="last")
    np.testing.assert_allclose(last.h("proj"), probe.inputs[:, -1], atol=1e-14)
    assert sample_counts(model, probe, pool="last") == {"proj": (7, 5), "out": (7, 6)}


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_fle_identity_torchscript(rng, collector, tmp_path, how):
    model = SmallCNN().double()
    x = rng.normal(size=(10, 2, 8, 8))
    probe = make_probe(x, labels=rng.integers(0, 3, 10))
    example = torch.from_numpy(x[:2])
    archive = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example)
    archive.save(str(tmp_path / "model.pt"))
    loaded = load_torchscript(tmp_path / "model.pt", allow_code=True)
    result = capture_step(
        loaded, probe, loss="cross_entropy", sink=collector, batch_size=3, dtype=np.float64
    )
    assert [layer.name for layer in result.layers] == ["conv1", "conv2", "head"]
    model.zero_grad()
    F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(probe.labels)).backward()
    for name in ("conv1", "conv2", "head"):
        module = getattr(model, name)
        w = module.weight.detach().reshape(module.weight.shape[0], -1).numpy()
        dw = module.weight.grad.reshape(w.shape).numpy()
        lhs, rhs = collector.g(name).T @ collector.h(name), w.T @ dw
        assert np.linalg.norm(lhs - rhs) / np.linalg.norm(rhs) < 1e-10
    assert sample_counts(loaded, probe)["conv1"] == (160, 18)


def test_float32_sink_dtype_and_float64_model(rng, collector):
    model = _mlp(torch.float64)
    probe = make_probe(rng.normal(size=(8, 6)).astype(np.float32), labels=rng.integers(0, 4, 8))
    result = capture_step(model, probe, loss="cross_entropy", sink=collector)
    assert result.model_dtype == "float64" and result.dtype == np.float32
    assert collector.h("0").dtype == np.float32 and collector.g("0").dtype == np.float32
    # Layers in selection order within each batch.
    assert collector.calls == ["0", "2", "4"]
    # Eval mode is restored and no parameter gradient is left behind.
    assert model.training and all(p.grad is None for p in model.parameters())


class PaddedNet(nn.Module):
    """String and non-zero paddings: 'same' with an even kernel pads asymmetrically."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(2, 3, kernel_size=(2, 3), padding="same", dilation=(1, 2))
        self.reflect = nn.Conv2d(3, 2, kernel_size=3, padding=1, padding_mode="reflect")
        self.valid = nn.Conv2d(2, 2, kernel_size=2, stride=2, padding="valid")
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.same(x))
        x = torch.tanh(self.reflect(x))
        return self.head(self.valid(x).flatten(1))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize("source", ["eager", "script"])
def test_fle_identity_string_and_reflect_padding(rng, collector, tmp_path, source):
    model = PaddedNet().double()
    probe = make_probe(rng.normal(size=(7, 2, 6, 7)), labels=rng.integers(0, 3, 7))
    modules = {name: getattr(model, name) for name in ("same", "reflect", "valid", "head")}
    captured = model
    if source == "script":
        torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
        captured = load_torchscript(tmp_path / "m.pt", allow_code=True)
    result = capture_step(
        captured, probe, loss="cross_entropy", sink=collector, batch_size=3, dtype=np.float64
    )
    assert result.n_samples == {"same": 7 * 42, "reflect": 7 * 42, "valid": 7 * 9, "head": 7}
    model.zero_grad()
    F.cross_entropy(
        model(torch.from_numpy(probe.inputs)), torch.from_numpy(probe.labels)
    ).backward()
    for name, module in modules.items():
        w = module.weight.detach().reshape(module.weight.shape[0], -1).numpy()
        dw = module.weight.grad.reshape(w.shape).numpy()
        lhs, rhs = collector.g(name).T @ collector.h(name), w.T @ dw
        assert np.linalg.norm(lhs - rhs) / np.linalg.norm(rhs) < 1e-10, name


class DataParallelLike(nn.Module):
    """Wraps a model as ``module``, as DataParallel/DDP do: every key gains ``module.``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_layer_names_drop_wrapper_prefixes(rng, collector):
    model = DataParallelLike(_mlp(torch.float64))
    probe = make_probe(rng.normal(size=(5, 6)), labels=rng.integers(0, 4, 5))
    result = capture_step(model, probe, loss="cross_entropy", sink=collector)
    assert [layer.name for layer in result.layers] == ["0", "2", "4"]
    assert [layer.param_name for layer in result.layers] == [
        "module.0.weight",
        "module.2.weight",
        "module.4.weight",
    ]


def test_keyword_input_and_integer_token_inputs(rng, collector):
    class Embedded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.fc(input=self.embed(tokens)).mean(dim=1)

    model = Embedded().double()
    probe = make_probe(rng.integers(0, 11, (6, 5)), labels=rng.integers(0, 3, 6))
    result = capture_step(model, probe, loss="cross_entropy", sink=collector, dtype=np.float64)
    assert result.n_samples == {"fc": 30}
    np.testing.assert_allclose(
        collector.h("fc"), model.embed.weight.detach().numpy()[probe.inputs.reshape(-1)], atol=0
    )
