"""Training steps per second with and without ``gramlin_analyze.record``, side by side.

Two models (an MLP 784-1024-1024-10 at batch 128 and a small ``nn.TransformerEncoder``),
each trained bare, with a ``diag`` recorder and with a ``full`` recorder: copies of the
same model in one process (the recorder is a training-time library: in-process is the
user's path). Rounds interleave the copies, in a rotating order, and every ratio is the
median over rounds of the ratio within a round, so machine load hits every column alike;
``best x`` is the ratio of each copy's best round (the least disturbed on a shared machine).

``floor x`` is a bare step plus the matrix products the exact sums need by the recorder's
plan for that layer (``g = dz W`` where backward does not deliver ``g``, ``sum g g^T``,
``sum g h^T`` or ``W^T G``, ``W^T D W``), run as plain ``torch.mm`` on kept buffers in the
same rounds: what is left between ``x`` and ``floor x`` is the recorder's own overhead.
The row ``free g`` records only the layers whose input needs a gradient (``layers=``).
Targets (issue 14): ``diag`` at most 1.10x a bare step, ``full`` at most 2x.

``--processes N`` instead runs bare, ``diag`` and ``full`` as separate ``python`` processes
training N steps each (imports and process start included: the user's path through a
script), interleaved in rounds, ratios to bare.

    python benchmarks/record_overhead.py [--steps 20] [--rounds 5] [--threads N] [--cpu]
                                         [--processes N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from gramlin_analyze.record import Recorder
from gramlin_analyze.record.terms import SYM_MIN, LayerSums

MODES = ("diag", "full")
COPIES = ("bare", *(f"{m}{kind}" for m in MODES for kind in ("", " floor")))


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


MODELS = {"mlp": mlp, "transformer": transformer}


def _sym(d: int, k: int) -> list[tuple[int, int, int]]:
    """A symmetric ``d x d`` product over ``k`` as the recorder forms it (3/4 from ``SYM_MIN``)."""
    if d < SYM_MIN:
        return [(d, k, d)]
    h = d // 2
    return [(h, k, d), (d - h, k, d - h)]


def products(sums: LayerSums) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of each matrix product one step of this layer's plan needs."""
    o, i = sums.layer.d_out, sums.layer.d_in
    b = sums.samples // max(sums.steps, 1)
    out = []
    if sums.second == "dz":  # D = dz^T dz, D W, and W^T (D W) in full mode
        out += [(o, b, o), (o, o, i), *([] if sums.diag else _sym(i, o))]
    elif not sums.free_g:  # g = dz W
        out.append((b, o, i))
    if not sums.diag:
        out += [] if sums.second == "dz" else _sym(i, b)  # sum_i g_i g_i^T
        out.append((i, b, i) if sums.route == "gh" else (i, o, i))  # A
        out += _sym(i, o) if sums.sgd else []  # G^T G
    return out


def trainer(build: Callable, copy: str, layers: list[str] | None) -> Callable[[], None]:
    """One plain SGD step of a fresh copy of the model, as ``copy`` says (see COPIES)."""
    torch.manual_seed(0)
    model, x, y = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mode, _, floor = copy.partition(" ")
    extra: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if mode != "bare":
        rec = Recorder(model, opt, mode=mode, layers=layers)  # hooks live as long as the model

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for a, b, c in extra:
            torch.mm(a, b, out=c)

    for _ in range(3):  # warm-up: allocator, routes chosen at the first forward
        step()
    if floor:  # keep the plan's shapes, then train bare beside those products
        plan = [p for s in rec.core.sums.values() for p in products(s)]
        rec.close()
        gen = torch.Generator().manual_seed(1)
        for m, k, n in plan:
            a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
            extra.append((a, b, torch.empty(m, n)))
        for _ in range(3):
            step()
    return step


CLOCK = time.perf_counter


def timed(step: Callable[[], None], steps: int) -> float:
    """Seconds per step (wall, or this process's CPU time with ``--cpu``)."""
    start = CLOCK()
    for _ in range(steps):
        step()
    return (CLOCK() - start) / steps


def ratios(wall: dict[str, list[float]], per: float = 1.0) -> dict[str, dict[str, float]]:
    """Per copy: median rate (``per`` units per wall second), median within-round and best ratio."""
    return {
        c: {
            "rate": per / statistics.median(w),
            "median_x": statistics.median(a / b for a, b in zip(w, wall["bare"], strict=True)),
            "best_x": min(w) / min(wall["bare"]),
        }
        for c, w in wall.items()
    }


def measure(build: Callable, steps: int, rounds: int, layers: list[str] | None) -> dict:
    """Every copy of COPIES timed in the same rounds, rotating order."""
    steppers = {c: trainer(build, c, layers) for c in COPIES}
    wall: dict[str, list[float]] = {c: [] for c in COPIES}
    for r in range(rounds):
        for c in COPIES[r % len(COPIES) :] + COPIES[: r % len(COPIES)]:
            wall[c].append(timed(steppers[c], steps))
    return ratios(wall)


def free_g_layers(build: Callable) -> list[str]:
    """The layers whose input needs a gradient, so backward delivers ``g`` at no cost."""
    torch.manual_seed(0)
    model, x, y = build()
    with Recorder(model, mode="diag") as rec:
        nn.functional.cross_entropy(model(x), y).backward()
        return [name for name, s in rec.core.sums.items() if s.free_g]


def in_process(args: argparse.Namespace) -> None:
    print(
        f"{'model':<24}{'bare steps/s':>13}"
        + "".join(f"{m + ' steps/s':>13}{'x':>7}{'best x':>8}{'floor x':>8}" for m in MODES)
    )
    for label, build in MODELS.items():
        free = free_g_layers(build)
        for row, layers in ((label, None), (f"{label}, free g ({len(free)})", free)):
            r = measure(build, args.steps, args.rounds, layers)
            print(
                f"{row:<24}{r['bare']['rate']:>13.2f}"
                + "".join(
                    f"{r[m]['rate']:>13.2f}{r[m]['median_x']:>6.2f}x{r[m]['best_x']:>7.2f}x"
                    f"{r[m + ' floor']['median_x']:>7.2f}x"
                    for m in MODES
                )
            )


def child(model: str, mode: str, steps: int) -> None:
    """The ``--processes`` worker: train ``steps`` steps of ``model``, recorded in ``mode``."""
    step = trainer(MODELS[model], mode, None)
    for _ in range(steps):
        step()


def processes(args: argparse.Namespace) -> None:
    """Bare, diag and full each as its own ``python`` process, process start included."""
    copies = ("bare", *MODES)
    print(f"separate processes, {args.processes} steps each (+3 warm-up), start included")
    print(
        f"{'model':<24}{'bare s':>9}"
        + "".join(f"{m + ' s':>9}{'x':>7}{'best x':>8}" for m in MODES)
    )
    for label in MODELS:
        wall: dict[str, list[float]] = {c: [] for c in copies}
        for r in range(args.rounds):
            for c in copies[r % 3 :] + copies[: r % 3]:
                cmd = [sys.executable, __file__, "--child", label, c, str(args.processes)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                start = time.perf_counter()
                subprocess.run(cmd, check=True)
                wall[c].append(time.perf_counter() - start)
        r = ratios(wall)
        print(
            f"{label:<24}{1 / r['bare']['rate']:>9.2f}"
            + "".join(
                f"{1 / r[m]['rate']:>9.2f}{r[m]['median_x']:>6.2f}x{r[m]['best_x']:>7.2f}x"
                for m in MODES
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--processes", type=int, default=0, metavar="N")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time in-process steps by this process's CPU time (steadier than wall time on a "
        "shared machine; with --threads 1, so that idle OpenMP threads spinning do not count)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu:
        global CLOCK
        CLOCK = time.process_time
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    timing = "processes" if args.processes else f"{args.steps} steps"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{timing} x {args.rounds} rounds, {'CPU' if args.cpu else 'wall'} time, "
        f"loadavg(1 min) {os.getloadavg()[0]:.2f}"
    )
    if args.processes:
        processes(args)
    else:
        in_process(args)
    print(f"loadavg(1 min) {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
