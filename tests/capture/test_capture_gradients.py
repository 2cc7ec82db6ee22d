"""What g is: W^T dL/dz through the layer only (not h.grad), and one exact GD step."""

from __future__ import annotations

import copy

import numpy as np
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


def test_capture_skips_the_weight_gradients():
    """Capture needs dL/dz at each layer, not dL/dW: its backward asks for the
    biases, so autograd never forms dz^T h. Counted in matmul FLOPs: forward
    (all layers), the backward's input gradients (all but the first layer) and
    g = dz W (all layers); a full backward would add 2 n d_in d_out per layer."""
    from torch.utils.flop_counter import FlopCounterMode

    n, dims = 64, (12, 16, 8, 3)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(dims[0], dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2]), nn.Tanh(), nn.Linear(dims[2], dims[3])
    )
    rng = np.random.default_rng(0)
    probe = make_probe(rng.standard_normal((n, dims[0])).astype(np.float32), labels=rng.integers(0, dims[3], n))
    with FlopCounterMode(display=False) as counter:
        capture_step(model, probe, loss="cross_entropy", sink=None, batch_size=n)
    per_layer = [2 * n * a * b for a, b in zip(dims[:-1], dims[1:], strict=True)]
    expected = sum(per_layer) + sum(per_layer[1:]) + sum(per_layer)
    assert counter.get_total_flops() == expected
    for p in model.parameters():
        assert p.grad is None  # nothing accumulated into the model
