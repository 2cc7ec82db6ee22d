"""Throughput on 1 and 2 worker processes: ingest with capture, and analyze (issue 12, point 8).

Writes a trajectory where compute dominates (``--n`` ``torch.save`` state
dicts of an MLP, default 512 -> 1024 -> 1024 -> 10, ReLU, and a seeded probe
set of ``--probe`` samples), then, for 1 and for 2 workers, alternating the
order each round (``--repeats``; medians):

1. starts a real cluster as a user does: ``dask scheduler`` and ``dask worker
   --nworkers 1 --nthreads 1`` processes on loopback (``OMP_NUM_THREADS=1`` and
   the like in their environment, so that two workers do not oversubscribe two
   cores), imports torch and the package on them, and waits until the
   cluster's processes are idle (a warm, settled cluster: start-up is not
   what is measured; the scheduler's task stream is left off);
2. runs ``gramlin-analyze ingest RUN --store NEW --probe --model --lr
   --scheduler tcp://… --threads-per-task 1`` then ``gramlin-analyze analyze
   NEW --scheduler … --threads-per-task 1`` as
   processes (the command line as users run it) into a fresh store, timing
   each, and reading the driver's CPU time (``wait4``'s rusage of the command)
   and peak memory (its ``VmHWM``), and the workers' CPU time over the command;
3. with ``--api``, the same two calls in this process (``ga.ingest(...,
   client=address)``, ``ga.analyze(...)``): no interpreter start or imports.

Printed (JSON): seconds per command and worker count, the throughput ratio
``speedup = time(1 worker) / time(2 workers)`` (target, issue 12: at least 1.6
for both on these 2-core machines), the driver's CPU seconds and share of the
wall time (a driver near 100% of a core would be the bottleneck), the
workers' utilization (their CPU seconds over wall time x workers), and
whether the 1- and 2-worker stores' ``/layers`` and ``/metrics`` are
identical (the same tasks on other processes): any array that is not
bitwise equal is listed with its largest relative difference.

Run: ``.venv/bin/python benchmarks/scaling.py [--n 12] [--probe 2000]
[--width 1024] [--repeats 3] [--api] [--threads-per-task 1] [--only ingest|analyze]``. Several minutes
per round at the defaults, most of it analyze; size runs so that each command's
work is minutes, or the commands' start (a few seconds of driver CPU) hides
the scaling.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.cluster.dask_procs import dask_processes  # noqa: E402  (the repository's root)

LR = 0.1
TARGET_SPEEDUP = 1.6

#: Runs ``gramlin_analyze.cli.main`` and writes its peak RSS (``VmHWM``) where
#: ``GRAMLIN_BENCH_HWM`` says. ``ru_maxrss`` of a child cannot serve: after a
#: vfork+exec it keeps the parent's peak (this process holds torch), so only the
#: high-water mark of the command's own address space is its memory.
WRAPPER = """
import os, sys
from gramlin_analyze.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    hwm = next((int(l.split()[1]) for l in f if l.startswith("VmHWM")), 0)
with open(os.environ["GRAMLIN_BENCH_HWM"], "w") as f:
    f.write(str(hwm * 1024))
sys.exit(code)
"""

FACTORY = """
import torch
from torch import nn

SIZES = {sizes}


def build():
    torch.manual_seed(0)
    mods = []
    for d_in, d_out in zip(SIZES[:-1], SIZES[1:], strict=False):
        mods += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*mods[:-1])
"""


# -- the command line, measured -------------------------------------------------------------


def run_cli(args: list, *, scratch: Path, env: dict | None = None) -> dict:
    """``gramlin-analyze ARGS`` as a process: wall and CPU seconds, peak RSS in bytes.

    CPU is the process's own rusage from ``wait4`` (user + system over its
    whole life, its threads included), so on a cluster it is the driver's work
    alone: the tasks run in the worker processes. Its output goes to files, so
    that nothing but ``wait4`` reaps it.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    tag = time.time_ns()
    hwm_file, log = scratch / f"hwm-{tag}", scratch / f"log-{tag}"
    env = {**os.environ, **(env or {}), "GRAMLIN_BENCH_HWM": str(hwm_file)}
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, *map(str, args)], stdout=out, stderr=out, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    log.unlink()
    if code != 0:
        raise SystemExit(
            f"gramlin-analyze {' '.join(map(str, args))} exited {code}:\n{text[-3000:]}"
        )
    hwm = int(hwm_file.read_text()) if hwm_file.exists() else 0
    hwm_file.unlink(missing_ok=True)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss": hwm}


# -- the trajectory -------------------------------------------------------------------------


def write_run(work: Path, n: int, sizes: tuple[int, ...], probe: int, seed: int = 0) -> list:
    """``n`` checkpoints of a drifting MLP, its factory file and a probe set; return the flags."""
    import torch

    (work / "factory.py").write_text(FACTORY.format(sizes=tuple(sizes)))
    exec(FACTORY.format(sizes=tuple(sizes)), ns := {})
    model = ns["build"]()
    run = work / "run"
    run.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(n):
        torch.save(model.state_dict(), run / f"step_{i * 100:05d}.pt")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    rng = np.random.default_rng(seed)
    np.savez(
        work / "probe.npz",
        inputs=rng.standard_normal((probe, sizes[0]), dtype=np.float32),
        labels=rng.integers(0, sizes[-1], probe),
    )
    return ["--probe", work / "probe.npz", "--model", f"{work / 'factory.py'}:build"]


def capture_gflop(sizes: tuple[int, ...], probe: int) -> float:
    """Capture's arithmetic per checkpoint: forward, and backward to the inputs' gradients.

    2 FLOP per weight per sample each way (``dL/dW`` is never formed; backward's
    input gradient is each layer's ``g``, the first layer's ``g = dz @ W`` its
    own product): 4 x weights x samples, the matmuls only.
    """
    weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))
    return 4 * weights * probe / 1e9


# -- one cluster size -----------------------------------------------------------------------


#: run on each worker before timing: the imports a first task pays once per process
WARM = "import torch, zarr, gramlin_analyze.capture.task, gramlin_analyze.ingest.task, gramlin_analyze.analysis.task"


def warm(address: str) -> None:
    """Import torch and the package on every worker, so the first timed task does not pay it."""
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as client:
        client.run(exec, WARM)


def settle(
    pids: list[int], *, quiet: float = 0.05, window: float = 1.0, limit: float = 60.0
) -> float:
    """Wait until the cluster's processes together use under ``quiet`` of a core; return the wait.

    A cluster just started keeps its scheduler and nannies busy for seconds
    (1.1 s of the scheduler's CPU in its first 10 s, measured idle); a
    long-lived cluster, which this benchmark stands for, has settled. With one
    worker that start-up tail runs on the idle core; with two it would slow
    the tasks. Gives up after ``limit`` seconds and times all the same.
    """
    import psutil

    procs = [psutil.Process(p) for p in pids]
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        c0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        time.sleep(window)
        if sum(sum(p.cpu_times()[:2]) for p in procs) - c0 < quiet * window:
            break
    return time.monotonic() - t0


def workers_cpu(pids: dict[str, int]) -> float:
    """CPU seconds (user + system) the worker processes have used so far."""
    import psutil

    total = 0.0
    for pid in pids.values():
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def timed_api(fn) -> dict:
    """Wall and CPU seconds of ``fn()`` in this process (CPU of all its threads: the driver's)."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)}


def measure(
    n_workers: int,
    work: Path,
    flags: list,
    tag: str,
    api: bool,
    per_task: int,
    only: tuple[str, ...] = ("ingest", "analyze"),
) -> tuple[dict, Path]:
    """Start the cluster, time ingest + analyze by CLI (and by API), end it; return the store.

    ``per_task`` (kernel threads per task; 0: the package's default) is passed
    to both commands: by default a lone worker on a 2-core machine gives its
    task both cores' BLAS threads, which is not the one-core-per-worker
    comparison this benchmark makes.
    """
    import gramlin_analyze as ga
    from gramlin_analyze.capture.config import CaptureConfig

    store = work / f"store-{n_workers}w-{tag}.zarr"
    out: dict[str, dict] = {}
    with dask_processes(work / f"dask-{n_workers}w-{tag}", n_workers) as procs:
        pids = procs.wait_for_workers(n_workers, task_stream=False)
        warm(procs.address)
        settle(procs.processes())
        on = ["--scheduler", procs.address, "-q"]
        on += ["--threads-per-task", str(per_task)] if per_task else []
        kw = {"threads_per_task": per_task} if per_task else {}
        # the Python API may take it on one call only (both, once the package has it)
        ikw, akw = (
            {k: v for k, v in kw.items() if k in inspect.signature(f).parameters}
            for f in (ga.ingest, ga.analyze)
        )
        commands = {
            "ingest": ["ingest", work / "run", "--store", store, *flags, "--lr", LR, *on],
            "analyze": ["analyze", store, *on],
        }
        for name, args in commands.items():
            if name not in only:  # analyze needs the store: its ingest runs, untimed
                if name == "ingest":
                    run_cli(args, scratch=work / "scratch")
                continue
            c0 = workers_cpu(pids)
            out[f"cli_{name}"] = run_cli(args, scratch=work / "scratch")
            out[f"cli_{name}"]["workers_cpu_s"] = workers_cpu(pids) - c0
        if api:
            api_store = work / f"api-{n_workers}w-{tag}.zarr"
            cfg = CaptureConfig(probe=str(flags[1]), model=str(flags[3]))
            calls = {
                "ingest": lambda: ga.ingest(
                    work / "run", api_store, capture=cfg, lr=LR, client=procs.address, **ikw
                ),
                "analyze": lambda: ga.analyze(api_store, client=procs.address, **akw),
            }
            for name, fn in calls.items():
                if name not in only:
                    if name == "ingest":
                        fn()
                    continue
                c0 = workers_cpu(pids)
                out[f"api_{name}"] = timed_api(fn)
                out[f"api_{name}"]["workers_cpu_s"] = workers_cpu(pids) - c0
            shutil.rmtree(api_store)
    return out, store


# -- checks and summary ---------------------------------------------------------------------


def arrays(group, path: str = "") -> dict[str, np.ndarray]:
    """Every array under a zarr group by path: the stores are compared array by array."""
    out = {f"{path}/{k}": a[...] for k, a in group.arrays()}
    for k, sub in group.groups():
        out.update(arrays(sub, f"{path}/{k}"))
    return out


def differing(a: Path, b: Path, group: str) -> dict[str, float | str]:
    """The arrays under ``group`` that are not bitwise equal between two stores, and by how much.

    Each differing array maps to its largest relative difference (to the
    larger magnitude of the two stores' values; NaNs must sit in the same
    places), or to a reason when dtypes, shapes or non-float values differ.
    The same tasks on other processes should give the same bits; when they do
    not, the size tells rounding (about 1e-16) from a real difference.
    """
    import zarr

    x = arrays(zarr.open_group(str(a), mode="r")[group], f"/{group}")
    y = arrays(zarr.open_group(str(b), mode="r")[group], f"/{group}")
    out: dict[str, float | str] = {k: "in one store only" for k in sorted(set(x) ^ set(y))}
    for k in sorted(set(x) & set(y)):
        u, v = x[k], y[k]
        if u.dtype != v.dtype or u.shape != v.shape:
            out[k] = f"{u.dtype}{u.shape} vs {v.dtype}{v.shape}"
        elif u.dtype.kind != "f":
            if not np.array_equal(u, v):
                out[k] = "values differ"
        elif not np.array_equal(u, v, equal_nan=True):
            if not np.array_equal(np.isnan(u), np.isnan(v)):
                out[k] = "NaNs differ"
                continue
            u, v = np.nan_to_num(u.astype(np.float64)), np.nan_to_num(v.astype(np.float64))
            scale = np.maximum(np.abs(u), np.abs(v))
            rel = np.abs(u - v) / np.where(scale > 0, scale, 1)
            out[k] = float(f"{rel.max():.3g}")
    return out


def store_files(store: Path) -> dict[str, dict[str, int]]:
    """Files and bytes per top-level group: what an object store would take as PUTs."""
    out: dict[str, dict[str, int]] = {}
    for f in store.rglob("*"):
        if f.is_file():
            rel = f.relative_to(store).parts
            key = rel[0] if len(rel) > 1 else "/"
            entry = out.setdefault(key, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += f.stat().st_size
    return out


def work_rates(rounds: list[dict], n: int, sizes: tuple[int, ...], probe: int) -> dict:
    """The workers' CPU cost per unit of work, from the 1-worker runs (what docs/scaling.md scales).

    Capture: matmul GFLOP per worker CPU second. Analyze: worker CPU
    nanoseconds per sample x input width squared (its products ``H^T H``,
    ``G^T G``, ``(H - gamma G)^T (H - gamma G)`` are each ``N d^2``), summed
    over the layers. Worker CPU time, not wall time: no driver start in it.
    """
    out = {}
    if "cli_ingest" in rounds[0]:
        ingest = statistics.median(r["cli_ingest"]["workers_cpu_s"] for r in rounds)
        out["capture_worker_gflop_per_cpu_s"] = round(n * capture_gflop(sizes, probe) / ingest, 2)
    if "cli_analyze" in rounds[0]:
        analyze = statistics.median(r["cli_analyze"]["workers_cpu_s"] for r in rounds)
        units = n * probe * sum(d * d for d in sizes[:-1])
        out["analyze_worker_ns_per_sample_in2"] = round(1e9 * analyze / units, 4)
    return out


def summarize(rounds: dict[int, list[dict]], workers: tuple[int, ...]) -> dict:
    """Medians per worker count and command, and the speedups of the largest over 1 worker."""
    res: dict = {}
    for key in rounds[workers[0]][0]:
        per = {}
        for n in workers:
            rs = rounds[n]
            wall = statistics.median(r[key]["wall_s"] for r in rs)
            per[f"{n}w"] = {
                "wall_s": round(wall, 3),
                "all_wall_s": [round(r[key]["wall_s"], 3) for r in rs],
                "driver_cpu_s": round(statistics.median(r[key]["cpu_s"] for r in rs), 3),
                "driver_cpu_share": round(
                    statistics.median(r[key]["cpu_s"] / r[key]["wall_s"] for r in rs), 3
                ),
                "workers_utilization": round(
                    statistics.median(r[key]["workers_cpu_s"] / (r[key]["wall_s"] * n) for r in rs),
                    3,
                ),
            }
            if "peak_rss" in rs[0][key]:
                per[f"{n}w"]["driver_peak_MB"] = round(
                    max(r[key]["peak_rss"] for r in rs) / 2**20, 1
                )
        top = workers[-1]
        per[f"speedup_{top}w_over_1w"] = round(per["1w"]["wall_s"] / per[f"{top}w"]["wall_s"], 3)
        per["target_speedup"] = TARGET_SPEEDUP
        res[key] = per
    return res


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=12, help="checkpoints")
    p.add_argument("--probe", type=int, default=2000, help="probe samples")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    p.add_argument("--input", type=int, default=512, help="input width of the MLP")
    p.add_argument("--hidden-layers", type=int, default=2)
    p.add_argument("--workers", default="1,2", help="worker counts to compare, 1 first")
    p.add_argument("--repeats", type=int, default=1, help="rounds, alternating the order")
    p.add_argument("--api", action="store_true", help="also time the Python API in process")
    p.add_argument(
        "--threads-per-task",
        type=int,
        default=1,
        help="kernel threads per task, passed to both commands (0: the package's default)",
    )
    p.add_argument(
        "--only",
        choices=("ingest", "analyze"),
        help="time one command (analyze still needs its store ingested, untimed)",
    )
    p.add_argument("--work", default=str(HERE / "_work" / "scaling"))
    a = p.parse_args()
    sizes = (a.input, *[a.width] * a.hidden_layers, 10)
    workers = tuple(int(w) for w in a.workers.split(","))
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    flags = write_run(work, a.n, sizes, a.probe)
    rounds: dict[int, list[dict]] = {n: [] for n in workers}
    only = (a.only,) if a.only else ("ingest", "analyze")
    stores: dict[int, Path] = {}
    for k in range(a.repeats):
        for n in workers if k % 2 == 0 else workers[::-1]:
            result, store = measure(n, work, flags, str(k), a.api, a.threads_per_task, only)
            rounds[n].append(result)
            if n in stores:
                shutil.rmtree(store)
            else:
                stores[n] = store
    first = stores[workers[0]]
    gflop = capture_gflop(sizes, a.probe)
    res = {
        "checkpoints": a.n,
        "probe_samples": a.probe,
        "model": "x".join(map(str, sizes)),
        "cpu_count": os.cpu_count(),
        "repeats": a.repeats,
        "threads_per_task": a.threads_per_task,
        "capture_gflop_per_checkpoint": round(gflop, 2),
        **summarize(rounds, workers),
        "store_files": store_files(first),
        # arrays not bitwise equal to the 1-worker store's, with the largest relative difference
        "metrics_differing": {
            f"{n}w": differing(first, stores[n], "metrics")
            for n in workers[1:]
            if a.only != "ingest"
        },
        "layers_differing": {f"{n}w": differing(first, stores[n], "layers") for n in workers[1:]},
    }
    res.update(work_rates(rounds[workers[0]], a.n, sizes, a.probe))
    shutil.rmtree(work, ignore_errors=True)
    if work.parent.name == "_work" and work.parent.exists() and not any(work.parent.iterdir()):
        work.parent.rmdir()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
