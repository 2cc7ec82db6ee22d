"""Training steps per second with and without ``gramlin_analyze.record``, side by side.

Two models (an MLP 784-1024-1024-10 at batch 128 and a small ``nn.TransformerEncoder``),
each trained bare, with a ``diag`` recorder and with a ``full`` recorder: three copies of
the same model in one process (the recorder is a training-time library: in-process is the
user's path). Rounds interleave the three, in a rotating order, and every ratio is the
median over rounds of the ratio within a round, so machine load hits every column alike.
Two ratios per recorder mode: the median of the within-round ratios, and the ratio of each
mode's best round (the least disturbed on a shared machine). Targets: ``diag`` at most 1.10x a bare step, ``full`` at most 2x.

    python benchmarks/record_overhead.py [--steps 20] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gramlin_analyze.record import Recorder

MODES = ("bare", "diag", "full")


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """784-1024-1024-10 ReLU MLP, batch 128."""
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    return model, torch.randn(128, 784), torch.randint(10, (128,))


class Encoder(nn.Module):
    """2-layer ``nn.TransformerEncoder`` (d_model 256, ff 1024) over 64 tokens, batch 16."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(32, 256)
        layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x))).mean(1)


def transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return Encoder(), torch.randn(16, 64, 32), torch.randint(10, (16,))


def trainer(build: Callable, mode: str) -> Callable[[], None]:
    """One plain SGD step of a fresh copy of the model, recorded in ``mode`` unless ``bare``."""
    torch.manual_seed(0)
    model, x, y = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if mode != "bare":
        Recorder(model, opt, mode=mode)  # its hooks live as long as the model

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):  # warm-up: allocator, routes chosen at the first forward
        step()
    return step


def timed(step: Callable[[], None], steps: int) -> float:
    """Wall seconds per step."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(build: Callable, steps: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per mode: median steps/s, median within-round ratio to bare, ratio of best rounds."""
    steppers = {mode: trainer(build, mode) for mode in MODES}
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES[r % 3 :] + MODES[: r % 3]:
            wall[mode].append(timed(steppers[mode], steps))
    return {
        mode: {
            "rate": 1.0 / statistics.median(wall[mode]),
            "median_x": statistics.median(
                a / b for a, b in zip(wall[mode], wall["bare"], strict=True)
            ),
            "best_x": min(wall[mode]) / min(wall["bare"]),
        }
        for mode in MODES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{args.steps} steps x {args.rounds} rounds, loadavg(1 min) {load:.2f} at start"
    )
    print(
        f"{'model':<12}{'bare steps/s':>13}"
        + "".join(f"{m + ' steps/s':>13}{m + ' x':>9}{'best x':>8}" for m in MODES[1:])
    )
    for label, build in (("mlp", mlp), ("transformer", transformer)):
        r = measure(build, args.steps, args.rounds)
        print(
            f"{label:<12}{r['bare']['rate']:>13.2f}"
            + "".join(
                f"{r[m]['rate']:>13.2f}{r[m]['median_x']:>8.2f}x{r[m]['best_x']:>7.2f}x"
                for m in MODES[1:]
            )
        )
    print(f"loadavg(1 min) {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
