"""Training steps per second with and without ``gramlin_analyze.record``, side by side.

Two models, each timed bare, with a ``diag`` recorder and with a ``full`` recorder, in
interleaved rounds (the median of rounds is reported, so machine load hits every column
alike). Targets: ``diag`` at most 1.10x a bare step, ``full`` at most 2x.

    python benchmarks/record_overhead.py [--steps 20] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gramlin_analyze.record import Recorder


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


def steps_per_second(build, mode: str | None, steps: int) -> float:
    """Plain SGD steps per second of a fresh model, recorder in ``mode`` (None: bare)."""
    torch.manual_seed(0)
    model, x, y = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = None if mode is None else Recorder(model, opt, mode=mode)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    if rec is not None:
        rec.close()
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds"
    )
    print(
        f"{'model':<12} {'bare steps/s':>12} {'diag steps/s':>12} {'diag x':>7} {'full steps/s':>12} {'full x':>7}"
    )
    for label, build in (("mlp", mlp), ("transformer", transformer)):
        runs: dict[str | None, list[float]] = {None: [], "diag": [], "full": []}
        for _ in range(args.rounds):
            for mode in runs:
                runs[mode].append(steps_per_second(build, mode, args.steps))
        rate = {mode: statistics.median(v) for mode, v in runs.items()}
        print(
            f"{label:<12} {rate[None]:>12.2f} {rate['diag']:>12.2f} {rate[None] / rate['diag']:>6.2f}x"
            f" {rate['full']:>12.2f} {rate[None] / rate['full']:>6.2f}x"
        )


if __name__ == "__main__":
    main()
