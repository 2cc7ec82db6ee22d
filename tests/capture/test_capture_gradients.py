"""What g is: W^T dL/dz through the layer only (not h.grad), and one exact GD step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gramlin_analyze.capture import capture_step, load_state_dict_strict, make_probe, resolve_loss


class SkipNet(nn.Module):
    """y = x + fc(x), then out = head(tanh(y)): x reaches y by two paths."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x + self.fc(x)))


def test_skip_connection_g_is_through_the_layer(rng, collector):
    n, d, c = 10, 5, 3
    model = SkipNet(d, c).double()
    x = rng.normal(size=(n, d))
    labels = rng.integers(0, c, n)
    probe = make_probe(x, labels=labels)
    capture_step(model, probe, loss="cross_entropy", sink=collector, batch_size=4, dtype=np.float64)

    # By hand, for the mean cross-entropy: dL/dout = (softmax - onehot) / n,
    # dL/dy = (dL/dout W_head) * tanh'(y), and dL/dz_fc = dL/dy since y = x + z_fc.
    w_fc = model.fc.weight.detach().numpy()
    b_fc = model.fc.bias.detach().numpy()
    w_head = model.head.weight.detach().numpy()
    b_head = model.head.bias.detach().numpy()
    y = x + x @ w_fc.T + b_fc
    a = np.tanh(y)
    logits = a @ w_head.T + b_head
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d_out = (p - np.eye(c)[labels]) / n
    d_y = (d_out @ w_head) * (1 - a**2)
    g_ref = d_y @ w_fc
    np.testing.assert_allclose(collector.h("fc"), x, rtol=0, atol=1e-14)
    np.testing.assert_allclose(collector.g("fc"), g_ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(collector.g("head"), d_out @ w_head, rtol=1e-10, atol=1e-14)

    # h.grad holds the skip path too (dL/dx = dL/dy + g), so it is not g.
    xt = torch.from_numpy(x).requires_grad_(True)
    F.cross_entropy(model(xt), torch.from_numpy(labels)).backward()
    np.testing.assert_allclose(xt.grad.numpy(), d_y + g_ref, rtol=1e-10, atol=1e-14)
    assert np.linalg.norm(xt.grad.numpy() - collector.g("fc")) > 0.1 * np.linalg.norm(g_ref)


def test_gradient_descent_gram_change_equals_vcs_plus_second_order(rng, make_collector):
    """W_{t+1}^T W_{t+1} - W_t^T W_t = VCS_t + gamma^2 (G^T G - sum g g^T), from checkpoints."""
    n, gamma, steps = 40, 0.3, 4
    torch.manual_seed(int(rng.integers(2**31)))
    model = nn.Sequential(
        nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    x = rng.normal(size=(n, 5))
    labels = rng.integers(0, 3, n)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    checkpoints = [copy.deepcopy(model.state_dict())]
    opt = torch.optim.SGD(model.parameters(), lr=gamma)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
        checkpoints.append(copy.deepcopy(model.state_dict()))

    probe = make_probe(x, labels=labels)  # the whole training set
    loss = resolve_loss("cross_entropy", reduction="mean")
    fresh = nn.Sequential(
        nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    for t in range(steps):
        load_state_dict_strict(fresh, checkpoints[t])
        sink = make_collector()
        capture_step(fresh, probe, loss=loss, sink=sink, batch_size=16, dtype=np.float64)
        for layer in ("0", "2", "4"):
            w0 = checkpoints[t][f"{layer}.weight"].numpy()
            w1 = checkpoints[t + 1][f"{layer}.weight"].numpy()
            grad = (w0 - w1) / gamma  # exact for plain GD
            h, g = sink.h(layer), sink.g(layer)
            d_gram = w1.T @ w1 - w0.T @ w0
            hp = h - gamma * g
            vcs = hp.T @ hp - h.T @ h  # sum_i [(h_i - gamma g_i)(...)^T - h_i h_i^T]
            second = gamma**2 * (grad.T @ grad - g.T @ g)
            err = np.linalg.norm(d_gram - (vcs + second)) / np.linalg.norm(d_gram)
            assert err < 1e-10, f"step {t} layer {layer}: relative residual {err:.3g}"
            # The VCS alone misses exactly the second-order term.
            assert np.linalg.norm(d_gram - vcs) > 1e3 * err * np.linalg.norm(d_gram)


class MatmulFlops:
    """Counts the FLOPs of matrix products as torch dispatches them.

    Not torch's ``FlopCounterMode``: that registers global module hooks, and
    capture (rightly) stops taking ``g`` from backward when a module has
    hooks other than its own.
    """

    def __init__(self) -> None:
        self.flops = 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                packet = func.overloadpacket
                if packet in (torch.ops.aten.mm, torch.ops.aten.addmm):
                    a, b = args[-2], args[-1]
                    counter.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
                elif packet in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
                    a, b = args[-2], args[-1]
                    counter.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def test_capture_skips_the_weight_gradients():
    """Capture needs dL/dz at each layer, not dL/dW: its backward asks for the
    biases, so autograd never forms dz^T h. And the input gradients that
    backward computes anyway (all but the first layer) are those layers' g:
    only the first layer's g = dz W is computed on top. Counted in matmul
    FLOPs: forward (all layers), the backward's input gradients (all but the
    first layer) and the first layer's g; a full backward would add
    2 n d_in d_out per layer, computing g apart another 2 n d_in d_out per
    layer but the first."""
    n, dims = 64, (12, 16, 8, 3)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(dims[0], dims[1]),
        nn.ReLU(),
        nn.Linear(dims[1], dims[2]),
        nn.Tanh(),
        nn.Linear(dims[2], dims[3]),
    )
    rng = np.random.default_rng(0)
    probe = make_probe(
        rng.standard_normal((n, dims[0])).astype(np.float32), labels=rng.integers(0, dims[3], n)
    )
    with MatmulFlops() as counter:
        capture_step(model, probe, loss="cross_entropy", sink=None, batch_size=n)
    per_layer = [2 * n * a * b for a, b in zip(dims[:-1], dims[1:], strict=True)]
    expected = sum(per_layer) + sum(per_layer[1:]) + per_layer[0]
    assert counter.flops == expected
    for p in model.parameters():
        assert p.grad is None  # nothing accumulated into the model


def _softmax_grad(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """d(mean cross-entropy)/d(logits), float64."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return (p - np.eye(logits.shape[1])[labels]) / len(labels)


class DeepSkipNet(nn.Module):
    """a = tanh(pre(x)); y = a + fc(a); out = head(tanh(y)): the skip is around a
    layer whose input needs a gradient, so backward computes dL/da itself."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.pre = nn.Linear(d, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.pre(x))
        return self.head(torch.tanh(a + self.fc(a)))


def test_g_from_backward_excludes_the_skip_path(rng, collector):
    """g of a Linear layer below others comes from backward's own input gradient
    (no second dz W product, checked in FLOPs), and is still the gradient through
    that layer only: not dL/da, which also holds the skip path."""
    n, d, c = 12, 6, 4
    model = DeepSkipNet(d, c).double()
    x = rng.normal(size=(n, d))
    labels = rng.integers(0, c, n)
    probe = make_probe(x, labels=labels)
    with MatmulFlops() as counter:
        capture_step(
            model, probe, loss="cross_entropy", sink=collector, batch_size=n, dtype=np.float64
        )
    # forward: pre, fc, head; backward's input gradients: head, fc; on top: pre's g only
    assert counter.flops == 2 * n * (2 * d * d + d * c) + 2 * n * (d * c + d * d) + 2 * n * d * d

    w_pre, b_pre = model.pre.weight.detach().numpy(), model.pre.bias.detach().numpy()
    w_fc, b_fc = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    w_head, b_head = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    a = np.tanh(x @ w_pre.T + b_pre)
    t = np.tanh(a + a @ w_fc.T + b_fc)
    d_out = _softmax_grad(t @ w_head.T + b_head, labels)
    d_y = (d_out @ w_head) * (1 - t**2)  # = dL/dz_fc
    g_fc = d_y @ w_fc
    d_a = d_y + g_fc  # both paths
    g_pre = (d_a * (1 - a**2)) @ w_pre
    np.testing.assert_allclose(collector.h("fc"), a, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(collector.g("head"), d_out @ w_head, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(collector.g("fc"), g_fc, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(collector.g("pre"), g_pre, rtol=1e-10, atol=1e-14)
    assert np.linalg.norm(d_a - collector.g("fc")) > 0.1 * np.linalg.norm(g_fc)


class LowRankAdapter(nn.Linear):
    """A Linear subclass whose forward uses its input twice (base + low-rank path)."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__(d_in, d_out)
        self.down = nn.Parameter(torch.randn(rank, d_in))
        self.up = nn.Parameter(torch.randn(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + (x @ self.down.T) @ self.up.T


def test_linear_subclass_with_own_forward_gets_w_transpose_dz(rng, collector):
    """A Linear subclass may use its input on other paths: its g is W^T dz with its
    own weight, never the input gradient through the whole module."""
    n, d, c = 10, 5, 3
    torch.manual_seed(int(rng.integers(2**31)))
    model = nn.Sequential(
        nn.Linear(d, d), nn.Tanh(), LowRankAdapter(d, d, 2), nn.Tanh(), nn.Linear(d, c)
    ).double()
    x = rng.normal(size=(n, d))
    labels = rng.integers(0, c, n)
    capture_step(
        model,
        make_probe(x, labels=labels),
        loss="cross_entropy",
        sink=collector,
        batch_size=4,
        dtype=np.float64,
    )

    (w0, b0), (w2, b2), (w4, b4) = (
        (m.weight.detach().numpy(), m.bias.detach().numpy()) for m in (model[0], model[2], model[4])
    )
    low_rank = model[2].up.detach().numpy() @ model[2].down.detach().numpy()
    a1 = np.tanh(x @ w0.T + b0)
    a2 = np.tanh(a1 @ (w2 + low_rank).T + b2)
    d_out = _softmax_grad(a2 @ w4.T + b4, labels)
    dz2 = (d_out @ w4) * (1 - a2**2)
    np.testing.assert_allclose(collector.g("2"), dz2 @ w2, rtol=1e-10, atol=1e-14)
    through_module = dz2 @ (w2 + low_rank)
    assert np.linalg.norm(through_module - collector.g("2")) > 0.1 * np.linalg.norm(dz2 @ w2)
    dz0 = through_module * (1 - a1**2)
    np.testing.assert_allclose(collector.g("0"), dz0 @ w0, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("selected", [["4"], ["2"], ["2", "4"], ["0", "4"]])
def test_g_of_a_layer_selection(rng, make_collector, selected):
    """With some layers left out, backward may stop short of a selected layer's
    input (nothing below it is asked for): its g is then W^T dz. Either way the
    values are the reference's."""
    n, dims = 14, (5, 7, 6, 3)
    torch.manual_seed(int(rng.integers(2**31)))
    model = nn.Sequential(
        nn.Linear(dims[0], dims[1]),
        nn.Tanh(),
        nn.Linear(dims[1], dims[2]),
        nn.Tanh(),
        nn.Linear(dims[2], dims[3]),
    ).double()
    x = rng.normal(size=(n, dims[0]))
    labels = rng.integers(0, dims[3], n)
    sink = make_collector()
    capture_step(
        model,
        make_probe(x, labels=labels),
        loss="cross_entropy",
        sink=sink,
        layers=selected,
        batch_size=5,
        dtype=np.float64,
    )
    assert sorted(sink.parts) == sorted(selected)
    ws = {
        k: (model[int(k)].weight.detach().numpy(), model[int(k)].bias.detach().numpy())
        for k in ("0", "2", "4")
    }
    h = {"0": x}
    h["2"] = np.tanh(x @ ws["0"][0].T + ws["0"][1])
    h["4"] = np.tanh(h["2"] @ ws["2"][0].T + ws["2"][1])
    dz = {"4": _softmax_grad(h["4"] @ ws["4"][0].T + ws["4"][1], labels)}
    dz["2"] = (dz["4"] @ ws["4"][0]) * (1 - h["4"] ** 2)
    dz["0"] = (dz["2"] @ ws["2"][0]) * (1 - h["2"] ** 2)
    for k in selected:
        np.testing.assert_allclose(sink.h(k), h[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(sink.g(k), dz[k] @ ws[k][0], rtol=1e-10, atol=1e-14)
    for p in model.parameters():
        assert p.requires_grad and p.grad is None  # requires_grad restored, nothing accumulated


def _foreign_forward_hook(model):
    # an adapter/steering hook: a second path from the layer's input to its output
    model[2].register_forward_hook(lambda mod, args, out: out + 0.5 * args[0])


def _instance_forward(model):
    fc = model[2]
    fc.forward = lambda inp: (
        F.linear(inp, fc.weight, fc.bias) + 0.5 * inp
    )  # a wrapper's replacement


def _foreign_backward_hook(model):
    model[2].register_full_backward_hook(lambda mod, grad_in, grad_out: (grad_in[0] * 2.0,))


@pytest.mark.parametrize(
    "foreign", [_foreign_forward_hook, _instance_forward, _foreign_backward_hook]
)
def test_layers_with_foreign_hooks_get_w_transpose_dz(rng, collector, foreign):
    """A Linear whose call holds more than F.linear (someone else's hook, a forward
    replaced on the instance) may route its input elsewhere or change its input's
    gradient: its g is W^T dz, dz from autograd with the model as it is."""
    n, d, c = 9, 6, 3
    torch.manual_seed(int(rng.integers(2**31)))
    model = nn.Sequential(
        nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh(), nn.Linear(d, c)
    ).double()
    foreign(model)
    x = rng.normal(size=(n, d))
    labels = rng.integers(0, c, n)
    capture_step(
        model,
        make_probe(x, labels=labels),
        loss="cross_entropy",
        sink=collector,
        batch_size=n,
        dtype=np.float64,
    )

    outputs = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            outputs[name] = out

        return hook

    handles = [model[i].register_forward_hook(keep(str(i))) for i in (0, 2, 4)]
    F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
    for h in handles:
        h.remove()
    for name in ("0", "2", "4"):
        w = model[int(name)].weight.detach().numpy()
        np.testing.assert_allclose(
            collector.g(name), outputs[name].grad.numpy() @ w, rtol=1e-10, atol=1e-14
        )
