"""Latency of ``ingest --watch``: from a checkpoint's completion to its metrics in the store.

A writer process trains nothing but saves an MLP's checkpoints (random weights, atomically:
``.tmp`` then rename) every ``--interval`` seconds and prints the time each rename
finished. ``gramlin-analyze ingest DIR --watch --analyze --pid WRITER`` runs in another
process; each pass prints a line once its metrics are written, timestamped here on
arrival. Per checkpoint: latency = line arrival - completion, beside the time the watcher
spent ingesting and analyzing it (from the same line), and, measured apart in this process
afterwards, the ingest + analyze of one checkpoint added to the finished store's run.

Target (issue 15): latency <= ingest + analyze of that checkpoint + 2 s.
Run: ``.venv/bin/python benchmarks/watch_latency.py [--n 6] [--width 1024] [--interval 4]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

WRITER = r"""
import os, sys, time
import numpy as np
import torch
run, n, width, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
go = sys.argv[5]
rng = np.random.default_rng(0)
for k in range(n):
    if k == 1:  # step 0 warms the watcher up; the timed ones wait until it has run once
        while not os.path.exists(go):
            time.sleep(0.01)
        time.sleep(interval)
    sd = {f"fc{i}.weight": torch.from_numpy(rng.standard_normal((width, width), dtype=np.float32))
          for i in range(4)}
    path = os.path.join(run, f"step_{100 * k:06d}.pt")
    torch.save(sd, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"saved {100 * k} {time.time():.6f}", flush=True)
    time.sleep(interval)
"""

PASS = re.compile(
    r"watch pass \d+: steps ([\d, ]+) ingested \(([\d.]+) s\); .* analyzed \(([\d.]+) s\)"
)


def run_watch(work: Path, n: int, width: int, interval: float, settle: float, poll: float):
    """Completion times, and per step (arrival time, watcher's ingest s, analyze s)."""
    run, store = work / "run", work / "live.zarr"
    run.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            str(run),
            str(n),
            str(width),
            str(interval),
            str(work / "go"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    cmd = [sys.executable, "-m", "gramlin_analyze", "ingest", str(run), "--store", str(store)]
    cmd += ["--watch", "--analyze", "--settle", str(settle), "--poll", str(poll)]
    watcher = subprocess.Popen(
        [*cmd, "--pid", str(writer.pid)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    done: dict[int, float] = {}
    arrived: dict[int, tuple[float, float, float]] = {}

    def read_writer() -> None:
        for line in writer.stdout:
            _, step, t = line.split()
            done[int(step)] = float(t)

    reader = threading.Thread(target=read_writer)
    reader.start()
    for line in watcher.stdout:
        now = time.time()
        print("  watcher:", line.rstrip())
        m = PASS.search(line)
        if m and not (work / "go").exists():
            (work / "go").touch()  # the watcher is up: start the timed checkpoints
        elif m:
            for step in m.group(1).split(", "):
                arrived[int(step)] = (now, float(m.group(2)), float(m.group(3)))
    watcher.wait()
    reader.join()
    writer.wait()
    return run, store, done, arrived


def one_checkpoint_cost(run: Path, work: Path) -> float:
    """Ingest + analyze of the run's last checkpoint added to a store of the others (s)."""
    import gramlin_analyze as ga

    part = work / "part"
    shutil.copytree(run, part)
    last = sorted(part.glob("step_*.pt"))[-1]
    aside = work / last.name
    last.rename(aside)
    store = work / "cost.zarr"
    ga.ingest(part, store)
    ga.analyze(store)
    aside.rename(part / aside.name)
    t0 = time.perf_counter()
    ga.ingest(part, store)
    ga.analyze(store)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=7, help="checkpoints (the first one warms up)")
    ap.add_argument("--width", type=int, default=1024, help="4 layers of width x width")
    ap.add_argument("--interval", type=float, default=4.0, help="seconds between checkpoints")
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--poll", type=float, default=0.25)
    args = ap.parse_args()
    work = HERE / "_work" / "watch_latency"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mb = 4 * args.width**2 * 4 / 2**20
    print(f"{args.n} checkpoints of {mb:.0f} MB every {args.interval} s, --settle {args.settle}")
    run, store, done, arrived = run_watch(
        work, args.n, args.width, args.interval, args.settle, args.poll
    )
    print(f"{'step':>6} {'latency s':>10} {'ingest+analyze s':>17} {'overhead s':>11} {'ratio':>6}")
    over = []
    for step in sorted(done)[1:]:  # step 0: the warm-up
        t, ing, ana = arrived[step]
        latency, cost = t - done[step], ing + ana
        over.append(latency - cost)
        print(
            f"{step:>6} {latency:>10.2f} {cost:>17.2f} {latency - cost:>11.2f} {latency / cost:>6.2f}"
        )
    apart = one_checkpoint_cost(run, work)
    print(
        f"median overhead {statistics.median(over):.2f} s, max {max(over):.2f} s (target <= 2 s); "
        f"ingest + analyze of one checkpoint measured apart: {apart:.2f} s"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
