"""Dask workers with and without the allocator setting of gramlin_analyze/allocator.py.

A Dask nanny starts its worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which
turns glibc's dynamic thresholds off, so every large temporary of a task got
fresh, kernel-zeroed pages. ``keep_freed_memory`` raises the thresholds for a
run's tasks; ``GRAMLIN_MALLOPT=0`` in a worker's environment leaves them as the
nanny set them: the baseline.

For each setting, alternating the order each round (``--repeats``), on a
settled one-worker cluster (``dask scheduler`` and ``dask worker --nthreads 1``,
as in benchmarks/scaling.py):

1. ``gramlin-analyze ingest RUN --store NEW --probe --model --lr --scheduler …``
   (capture), timed;
2. ``gramlin-analyze analyze NEW --scheduler …`` (every family), timed.

Printed (JSON): wall seconds per command and setting (medians), the worker's
CPU seconds split into user and system (the kernel's page work is system
time), and ``speedup = baseline / tuned``. The two settings' stores must be
bitwise identical (the setting changes where memory comes from, not values).

Run: ``.venv/bin/python benchmarks/worker_allocator.py [--n 40] [--probe 3000]
[--width 512] [--repeats 1]`` (about 3 minutes per round at the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from scaling import LR, differing, run_cli, settle, warm, write_run  # noqa: E402

from tests.cluster.dask_procs import dask_processes  # noqa: E402


def worker_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the worker process so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user, t.system


def one_setting(work: Path, flags: list, tuned: bool, tag: str) -> tuple[dict, Path]:
    """Ingest and analyze on a fresh one-worker cluster whose worker has ``tuned`` or not."""
    os.environ["GRAMLIN_MALLOPT"] = "1" if tuned else "0"  # the worker inherits it
    store = work / f"store-{tag}.zarr"
    out = {}
    try:
        with dask_processes(work / f"dask-{tag}", 1) as procs:
            (pid,) = procs.wait_for_workers(1, task_stream=False).values()
            warm(procs.address)
            settle(procs.processes())
            on = ["--scheduler", procs.address, "-q", "--threads-per-task", "1"]
            commands = {
                "ingest": ["ingest", work / "run", "--store", store, *flags, "--lr", LR, *on],
                "analyze": ["analyze", store, *on],
            }
            for name, args in commands.items():
                u0, s0 = worker_times(pid)
                r = run_cli(args, scratch=work / "scratch")
                u1, s1 = worker_times(pid)
                out[name] = {
                    "wall_s": r["wall_s"],
                    "worker_user_s": u1 - u0,
                    "worker_sys_s": s1 - s0,
                }
    finally:
        os.environ.pop("GRAMLIN_MALLOPT", None)
    return out, store


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=40, help="checkpoints")
    p.add_argument("--probe", type=int, default=3000, help="probe samples")
    p.add_argument("--width", type=int, default=512, help="hidden width of the MLP")
    p.add_argument("--repeats", type=int, default=1, help="rounds, alternating the order")
    p.add_argument("--work", default=str(HERE / "_work" / "worker_allocator"))
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    flags = write_run(work, a.n, (512, a.width, a.width, 10), a.probe)
    rounds: dict[bool, list[dict]] = {False: [], True: []}
    stores: dict[bool, Path] = {}
    for r in range(a.repeats):
        for tuned in (False, True) if r % 2 == 0 else (True, False):
            res, stores[tuned] = one_setting(work, flags, tuned, f"{int(tuned)}-{r}")
            rounds[tuned].append(res)
            if r < a.repeats - 1:
                shutil.rmtree(stores[tuned])
    summary: dict = {"checkpoints": a.n, "probe": a.probe, "width": a.width, "repeats": a.repeats}
    for cmd in ("ingest", "analyze"):
        row = {}
        for tuned, label in ((False, "baseline"), (True, "tuned")):
            rs = [x[cmd] for x in rounds[tuned]]
            row[label] = {k: round(statistics.median(x[k] for x in rs), 3) for k in rs[0]} | {
                "all_wall_s": [round(x["wall_s"], 3) for x in rs]
            }
        row["speedup"] = round(row["baseline"]["wall_s"] / row["tuned"]["wall_s"], 3)
        summary[cmd] = row
    summary["differing"] = {
        g: differing(stores[False], stores[True], g) for g in ("layers", "metrics")
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
