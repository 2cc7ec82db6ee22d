"""Write small real checkpoint trajectories with the frameworks' own saving code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SHAPES = {"fc1.weight": (6, 5), "fc1.bias": (6,), "fc2.weight": (3, 6), "fc2.bias": (3,)}


def state_dict(
    step: int, *, shapes=None, seed: int = 0, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return {
        k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        for k, s in (shapes or SHAPES).items()
    }


def write_trajectory(
    directory: Path,
    steps,
    *,
    formats=("safetensors", "torch"),
    shapes=None,
    seed: int = 0,
    prefix: str = "",
) -> dict[int, dict[str, np.ndarray]]:
    """Write one checkpoint per step, alternating formats; return the expected arrays."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i, step in enumerate(steps):
        sd = state_dict(step, shapes=shapes, seed=seed)
        fmt = formats[i % len(formats)]
        sd_saved = {prefix + k: v for k, v in sd.items()}
        if fmt == "safetensors":
            save_file(sd_saved, str(directory / f"step_{step:05d}.safetensors"))
        elif fmt == "torch":
            torch.save({"model": sd_saved, "global_step": step}, directory / f"ckpt_{step:06d}.pt")
        else:
            raise ValueError(fmt)
        expected[step] = {
            k: v.to(torch.float32).numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in sd.items()
        }
    return expected
