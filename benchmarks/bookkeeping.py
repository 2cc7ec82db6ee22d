"""The store's bookkeeping, this checkout against another, in alternating rounds.

Times the rows where the store's bookkeeping (metadata, small arrays, resizes)
dominates, for this checkout and for ``--baseline DIR`` (another checkout,
e.g. ``git worktree add /tmp/base 7c635c3``, the last commit with shortcuts
through zarr's internals), medians of alternating rounds:

- *incremental*: 20 checkpoints stored and analyzed (``--metrics gram``), a
  21st appears; ``ingest`` + ``analyze`` of it, in process;
- *incremental CLI*: the same as two ``gramlin-analyze`` processes (start-up
  included), as users run it;
- *cold*: ``ingest`` + ``analyze --metrics gram`` of the 20 into a new store.

Prints each mode's time and its ratio to the baseline (> 1: this checkout is slower).
Run: ``.venv/bin/python benchmarks/bookkeeping.py --baseline DIR [--n 20] [--layers 8] [--dim 256] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# The work alone: the modules both need are imported before the clock starts
# (this package imports them on first use, the commit before this work at once).
IN_PROCESS = r"""
import json, sys, time
import xarray, zarr
from gramlin_analyze.ingest import ingest
from gramlin_analyze.analysis import analyze
import gramlin_analyze.io.safetensors, gramlin_analyze.reducers
store, run = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
ingest(run, store)
analyze(store, metrics=["gram"])
print(json.dumps(time.perf_counter() - t0))
"""


def write_checkpoint(directory: Path, step: int, layers: int, dim: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(step)
    save_file(
        {
            f"layer{i}.weight": rng.standard_normal((dim, dim)).astype(np.float32)
            for i in range(layers)
        },
        str(directory / f"step_{step:06d}.safetensors"),
    )


BASELINE: Path = REPO  # --baseline: another checkout, run as mode "baseline"


def _repo(mode: str) -> Path:
    return BASELINE if mode == "baseline" else REPO


def _env(mode: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(_repo(mode))}


def _cli(args: list[str], mode: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "gramlin_analyze", *args, "--quiet"],
        cwd=_repo(mode),
        env=_env(mode),
        check=True,
    )


def one_round(work: Path, run: Path, n: int, layers: int, dim: int, mode: str) -> dict[str, float]:
    """Cold, incremental (in process) and incremental CLI times for one mode."""
    store = work / f"{mode}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    last = run / f"step_{n:06d}.safetensors"
    last.unlink(missing_ok=True)
    t0 = time.perf_counter()
    _cli(["ingest", str(run), "--store", str(store)], mode)
    _cli(["analyze", str(store), "--metrics", "gram"], mode)
    cold = time.perf_counter() - t0
    write_checkpoint(run, n, layers, dim)
    out = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(store), str(run)],
        cwd=_repo(mode),
        env=_env(mode),
        check=True,
        capture_output=True,
        text=True,
    )
    # the in-process figure excludes the interpreter's start and imports
    incremental = json.loads(out.stdout.strip().splitlines()[-1])
    write_checkpoint(run, n + 1, layers, dim)
    t0 = time.perf_counter()
    _cli(["ingest", str(run), "--store", str(store)], mode)
    _cli(["analyze", str(store), "--metrics", "gram"], mode)
    incremental_cli = time.perf_counter() - t0
    (run / f"step_{n + 1:06d}.safetensors").unlink()
    last.unlink()
    shutil.rmtree(store)
    return {"cold_cli_s": cold, "incremental_s": incremental, "incremental_cli_s": incremental_cli}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default=str(HERE / "_work" / "bookkeeping"))
    p.add_argument("--baseline", required=True, help="another checkout to time beside this one")
    args = p.parse_args()
    global BASELINE
    BASELINE = Path(args.baseline).resolve()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    run = work / "run"
    run.mkdir(parents=True)
    for step in range(args.n):
        write_checkpoint(run, step, args.layers, args.dim)
    modes = ["this", "baseline"]
    times: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    for _ in range(args.repeats):
        for mode in modes:  # alternating: each round runs every mode once
            for row, t in one_round(work, run, args.n, args.layers, args.dim, mode).items():
                times[mode].setdefault(row, []).append(t)
    med = {m: {row: statistics.median(ts) for row, ts in rows.items()} for m, rows in times.items()}
    base = med["baseline"]
    print(f"{'mode':26s} " + " ".join(f"{row:>20s}" for row in base))
    for mode in modes:
        cells = " ".join(
            f"{med[mode][row]:8.3f}s ({med[mode][row] / base[row]:5.2f}x)" for row in base
        )
        print(f"{mode:26s} {cells}")
    print(json.dumps({"medians": med, "all": times}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
