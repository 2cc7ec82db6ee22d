"""The driver's work and memory as a trajectory grows in steps and layers (issue 12, point 8).

A long run of a many-layer model is many small tasks: ``steps`` ingest tasks
and ``steps x layers`` analyze tasks, each recorded by the driver (the
``gramlin-analyze`` process), which also plans the run, grows the store's
arrays and consolidates its metadata. This benchmark checks that the driver's
cost per step and its peak memory stay flat as both grow, so that a
Pythia-scale run (154 checkpoints x 65 layers) is not limited by the driver.

For each size of a grid (``--steps``, default 30,75,150, times ``--layers``,
default 15,30,60; layers of ``--width`` x ``--width``, default 16, plus a
bias, written with ``safetensors.numpy.save_file``; the runs of fewer steps
are hard links to the first checkpoints of the longest), on one cluster for
the whole grid (a real ``dask scheduler`` and ``--workers`` ``dask worker``
processes, one thread each; see ``benchmarks/scaling.py``):

1. ``gramlin-analyze ingest RUN --store NEW --scheduler …`` (weights only);
2. ``gramlin-analyze analyze NEW --scheduler …`` (what weights alone support:
   Gram and spectrum).

Each command is a process; for it, the wall time, the driver's CPU time
(``wait4``'s rusage: the tasks run in the workers, so this is the driver's
own work) and its peak RSS (``VmHWM``) are printed, per step, per task and in
total. ``flatness`` separates the fixed start of a command from its cost per
task (see :func:`flatness`) and gives the peak memory's spread over the grid.

With ``--threads``, the commands run on their default threads instead (no
cluster): the driver then does the tasks too, and only its memory is
meaningful for this question.

Run: ``.venv/bin/python benchmarks/driver_scale.py [--steps 30,75,150]
[--layers 15,30,60] [--width 16] [--workers 2]``. The full grid is about 27k
analyze tasks: several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from scaling import run_cli, warm  # noqa: E402  (benchmarks/scaling.py)

from tests.cluster.dask_procs import dask_processes  # noqa: E402  (the repository's root)


def write_checkpoints(directory: Path, steps: int, layers: int, width: int) -> list[Path]:
    """``steps`` safetensors checkpoints of ``layers`` square layers with biases."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    rng = np.random.default_rng(layers)
    base = {
        name: rng.standard_normal(shape, dtype=np.float32) / np.sqrt(width)
        for k in range(layers)
        for name, shape in ((f"blocks.{k}.weight", (width, width)), (f"blocks.{k}.bias", (width,)))
    }
    paths = []
    for i in range(steps):
        drift = np.float32(1 + 1e-3 * i)
        paths.append(directory / f"step_{i * 10:06d}.safetensors")
        save_file({k: v * drift for k, v in base.items()}, str(paths[-1]))
    return paths


def run_of(work: Path, pool: list[Path], steps: int, layers: int) -> Path:
    """A run directory of the first ``steps`` checkpoints of ``pool`` (hard links)."""
    run = work / f"run-{steps}x{layers}"
    run.mkdir()
    for src in pool[:steps]:
        os.link(src, run / src.name)
    return run


def measure(work: Path, run: Path, steps: int, layers: int, on: list[str]) -> dict:
    """Ingest then analyze into a new store; the driver's figures per step and per task."""
    store = work / f"store-{steps}x{layers}.zarr"
    row: dict = {"steps": steps, "layers": layers}
    for name, args, tasks in (
        ("ingest", ["ingest", run, "--store", store, *on], steps),
        ("analyze", ["analyze", store, *on], steps * layers),
    ):
        r = run_cli(args, scratch=work / "scratch")
        row[name] = {
            "wall_s": round(r["wall_s"], 3),
            "driver_cpu_s": round(r["cpu_s"], 3),
            "wall_ms_per_step": round(1e3 * r["wall_s"] / steps, 2),
            "driver_cpu_ms_per_step": round(1e3 * r["cpu_s"] / steps, 2),
            "driver_cpu_ms_per_task": round(1e3 * r["cpu_s"] / tasks, 3),
            "driver_peak_MB": round(r["peak_rss"] / 2**20, 1),
        }
    shutil.rmtree(store)
    return row


def tasks_of(row: dict, cmd: str) -> int:
    """Tasks of a command: one per checkpoint for ingest, per (step, layer) for analyze."""
    return row["steps"] * (row["layers"] if cmd == "analyze" else 1)


def flatness(rows: list[dict], steps: list[int], layers: list[int]) -> dict:
    """Whether the driver's cost per task and its memory stay flat as the trajectory grows.

    Every command pays a fixed start (imports, connecting to the scheduler,
    opening the store) that dwarfs small runs, so the figures are the
    *marginal* cost: the least-squares line ``cpu = fixed + per_task x tasks``
    over the whole grid, and, along the steps axis at each layer count, the
    CPU added per task added between consecutive lengths (flat: about the same
    from 75 to 150 steps as from 30 to 75; a cost growing with the trajectory
    shows as increments that grow). Peak memory: largest over smallest.
    """
    out: dict = {}
    for cmd in ("ingest", "analyze"):
        tasks = np.array([tasks_of(r, cmd) for r in rows], dtype=float)
        cpu = np.array([r[cmd]["driver_cpu_s"] for r in rows])
        (per_task, fixed), *_ = np.linalg.lstsq(np.c_[tasks, np.ones_like(tasks)], cpu, rcond=None)
        at = {(r["steps"], r["layers"]): r for r in rows}
        increments = {}
        for n in layers:
            inc = []
            for s0, s1 in zip(steps[:-1], steps[1:], strict=True):
                a, b = at[(s0, n)], at[(s1, n)]
                dt = b[cmd]["driver_cpu_s"] - a[cmd]["driver_cpu_s"]
                inc.append(round(1e3 * dt / (tasks_of(b, cmd) - tasks_of(a, cmd)), 3))
            increments[f"{n} layers"] = inc
        peaks = [r[cmd]["driver_peak_MB"] for r in rows]
        out[cmd] = {
            "fit_fixed_cpu_s": round(float(fixed), 3),
            "fit_cpu_ms_per_task": round(1e3 * float(per_task), 3),
            "marginal_cpu_ms_per_task_along_steps": increments,
            "peak_MB_largest_over_smallest": round(max(peaks) / min(peaks), 3),
            "peak_MB_range": [min(peaks), max(peaks)],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", default="30,75,150", help="trajectory lengths, increasing")
    p.add_argument("--layers", default="15,30,60", help="layer counts, increasing")
    p.add_argument("--width", type=int, default=16, help="each layer is width x width")
    p.add_argument("--workers", type=int, default=2, help="dask worker processes")
    p.add_argument("--threads", action="store_true", help="default threads, no cluster")
    p.add_argument("--work", default=str(HERE / "_work" / "driver_scale"))
    a = p.parse_args()
    steps = sorted(int(s) for s in a.steps.split(","))
    layers = sorted(int(n) for n in a.layers.split(","))
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pools = {n: write_checkpoints(work / f"pool-{n}", steps[-1], n, a.width) for n in layers}
    rows = []

    def grid(on: list[str]) -> None:
        for n in layers:
            for s in steps:
                rows.append(measure(work, run_of(work, pools[n], s, n), s, n, on))

    if a.threads:
        grid(["-q"])
    else:
        with dask_processes(work / "dask", a.workers) as procs:
            warm(procs.address)  # the workers' imports: paid once, not by the first size
            grid(["--scheduler", procs.address, "-q"])
    res = {
        "width": a.width,
        "workers": 0 if a.threads else a.workers,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "flatness": flatness(rows, steps, layers),
    }
    shutil.rmtree(work, ignore_errors=True)
    if work.parent.name == "_work" and work.parent.exists() and not any(work.parent.iterdir()):
        work.parent.rmdir()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
