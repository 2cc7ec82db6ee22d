"""AGOP of the network output through each captured layer, summed batch by batch.

``sum_i J_i^T J_i`` over a layer's samples, ``J_i^T = W^T df/dz_i`` (see
:mod:`gramlin_analyze.capture.engine`): exact with one backward per output
for a few outputs, else an unbiased Rademacher estimate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from gramlin_analyze.capture.layers import CaptureLayer, pool_samples

if TYPE_CHECKING:
    from gramlin_analyze.capture.hooks import EagerRunner
    from gramlin_analyze.capture.script import ScriptRunner

__all__ = ["AGOP_EXACT_MAX_OUTPUTS", "accumulate_agop", "agop_sums"]

#: Outputs up to which AGOP is exact (one backward per output).
AGOP_EXACT_MAX_OUTPUTS = 16


def agop_sums(
    layers: Iterable[CaptureLayer], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """A float64 ``(d_in, d_in)`` zero sum per layer, on the device capture runs on."""
    return {
        layer.name: torch.zeros(layer.d_in, layer.d_in, dtype=torch.float64, device=device)
        for layer in layers
    }


def accumulate_agop(
    runner: EagerRunner | ScriptRunner,
    out: torch.Tensor,
    agop: dict[str, torch.Tensor],
    n_ex: int,
    pool: str | None,
    projections: int,
    generator: torch.Generator,
) -> str:
    """Add this batch's ``sum_i J_i^T J_i`` (exact or estimated) to ``agop``."""
    f = out.reshape(out.shape[0], -1)
    n_out = f.shape[1]
    exact = n_out <= AGOP_EXACT_MAX_OUTPUTS
    passes = n_out if exact else projections
    for k in range(passes):
        if exact:
            objective = f[:, k].sum()
        else:
            # drawn on the CPU whatever the device: the same signs, so the same estimate
            signs = torch.randint(0, 2, f.shape, generator=generator).to(f.device, f.dtype) * 2 - 1
            objective = (f * signs).sum()
        gs = runner.input_grads(objective, retain_graph=k < passes - 1)
        for layer in runner.layers:
            jt = pool_samples(gs[layer.name], n_ex, pool).to(torch.float64)
            contribution = jt.T @ jt
            agop[layer.name] += contribution if exact else contribution / projections
    return "exact" if exact else f"rademacher:{projections}"
