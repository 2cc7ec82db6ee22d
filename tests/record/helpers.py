"""Tiny models, seeded data and the float64 autograd reference the recorder tests compare with."""

from __future__ import annotations

import torch
from torch import nn


def mlp(widths: tuple[int, ...], *, seed: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Linear layers with GELU between them, named ``0``, ``2``, ... (the store's names)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.GELU())
    return nn.Sequential(*mods).to(dtype)


def batches(n: int, size: int, d_in: int, classes: int, *, seed: int, dtype=torch.float64):
    """``n`` seeded batches of inputs and integer labels."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, d_in, generator=gen, dtype=dtype),
            torch.randint(classes, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def reference_step(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, lr: float, *, sgd: bool = False
) -> dict:
    """One step's VCS parts per layer from explicit per-sample gradients (float64 autograd).

    The network is re-run functionally from its parameters (no hooks): ``z_k = h_k W_k^T + b_k``;
    ``dL/dz_k`` of the mean cross-entropy comes from ``torch.autograd.grad``, and
    ``g_i = W^T dL/dz_i`` row by row. With ``sgd``, also ``sgd_second = lr^2 G^T G`` from
    ``G = sum_i dL/dz_i h_i^T``.
    """
    linears = [(str(i), m) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    h = x.double()
    hs, zs = [], []
    for k, (_, m) in enumerate(linears):
        hs.append(h)
        z = h @ m.weight.double().t() + m.bias.double()
        zs.append(z)
        h = torch.nn.functional.gelu(z) if k < len(linears) - 1 else z
    loss = torch.nn.functional.cross_entropy(h, y)
    dzs = torch.autograd.grad(loss, zs)
    out = {}
    for (name, m), hk, dz in zip(linears, hs, dzs, strict=True):
        W = m.weight.detach().double()
        hk = hk.detach()
        first = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64)
        second = torch.zeros_like(first)
        for i in range(hk.shape[0]):
            g = W.t() @ dz[i]
            first -= lr * (torch.outer(g, hk[i]) + torch.outer(hk[i], g))
            second += lr**2 * torch.outer(g, g)
        out[name] = {"vcs_first": first, "vcs_second": second, "vcs": first + second}
        if sgd:
            G = dz.t() @ hk
            out[name]["sgd_second"] = lr**2 * G.t() @ G
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())
