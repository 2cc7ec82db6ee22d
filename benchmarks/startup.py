"""Start-up of the command line: small commands against the cost of importing the stack.

Builds a small run (``--n`` safetensors checkpoints of about 1 MB, with
:func:`benchmarks.ingest.write_run`) and its store (``gramlin-analyze ingest``
then ``analyze``), then times, as subprocesses (process start included),
alternating the commands ``--repeats`` times and taking medians:

- ``gramlin-analyze --version``, ``--help`` and ``ingest --help``;
- a no-op ``ingest`` (every checkpoint already stored) and a no-op ``analyze``
  (every metric up to date);
- in the same run, two baselines: ``python -c pass`` (the interpreter alone)
  and ``python -c "import xarray, dask.array, zarr"`` (what every command paid
  before imports were deferred, about 1.1 s on a quiet machine); and, for
  scale, ``python -c "import zarr"``, which a command that reads the manifest
  cannot do without.

Each row gives the wall-clock median and the median CPU time (user + system)
of the process; on a busy machine the CPU times are the steadier. Bytecode is
cached (in a folder of the scratch directory) as for an installed package.

Targets (issue 11, point 11): ``--version``/``--help`` under 0.15 s and the
no-ops under 0.4 s on a quiet machine, where the stack import takes about
1.1 s; as ratios to it in one run, under 0.14 and 0.36. A busy machine
stretches every row; the ratios are what to compare.

Run: ``.venv/bin/python benchmarks/startup.py [--repeats 7] [--n 20]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ingest import write_run  # noqa: E402  (benchmarks/ingest.py)

#: the stack import every command paid before, on a quiet machine (issue 11)
STACK_IMPORT_S = 1.1
TARGETS_S = {
    "--version": 0.15,
    "--help": 0.15,
    "ingest --help": 0.15,
    "ingest (no-op)": 0.4,
    "analyze (no-op)": 0.4,
}


def cli() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m gramlin_analyze``."""
    script = Path(sys.executable).parent / "gramlin-analyze"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gramlin_analyze"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall-clock and CPU (user + system) seconds of one run of ``cmd``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-2000:]}")
    return dt, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--n", type=int, default=20, help="checkpoints in the small run")
    p.add_argument("--work", help="scratch directory (default: a temporary one)")
    a = p.parse_args()

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gramlin-startup-"))
    shutil.rmtree(work, ignore_errors=True)
    run, store = work / "run", work / "run.zarr"
    write_run(run, a.n, mb=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")  # cached bytecode, outside the source tree
    g = cli()
    for cmd in (["ingest", str(run), "--store", str(store), "-q"], ["analyze", str(store), "-q"]):
        subprocess.run(g + cmd, check=True, env=env)

    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import xarray, dask.array, zarr": [
            sys.executable,
            "-c",
            "import xarray, dask.array, zarr",
        ],
        "import zarr": [sys.executable, "-c", "import zarr"],
        "--version": g + ["--version"],
        "--help": g + ["--help"],
        "ingest --help": g + ["ingest", "--help"],
        "ingest (no-op)": g + ["ingest", str(run), "--store", str(store), "-q"],
        "analyze (no-op)": g + ["analyze", str(store), "-q"],
    }
    for cmd in commands.values():  # warm the page cache and write the bytecode
        timed(cmd, env)
    wall: dict[str, list[float]] = {k: [] for k in commands}
    cpu: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(a.repeats):  # alternating, so that a busy moment hits every row alike
        for name, cmd in commands.items():
            w, c = timed(cmd, env)
            wall[name].append(w)
            cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    stack, stack_cpu = (
        med["import xarray, dask.array, zarr"],
        med_cpu["import xarray, dask.array, zarr"],
    )

    print(
        f"{a.repeats} runs each, medians; importing xarray, dask.array and zarr took {stack:.3f} s "
        f"({stack_cpu:.3f} s CPU) here, against {STACK_IMPORT_S} s on a quiet machine"
    )
    head = ("command", "wall s", "/ stack", "CPU s", "/ stack", "target")
    print(f"{head[0]:32s} {head[1]:>7s} {head[2]:>8s} {head[3]:>7s} {head[4]:>8s} {head[5]:>8s}")
    rows = []
    for name in commands:
        ratio, ratio_cpu = med[name] / stack, med_cpu[name] / stack_cpu
        target = TARGETS_S.get(name)
        tr = f"<= {target / STACK_IMPORT_S:.2f}" if target else ""
        verdict = (
            "" if target is None else ("  ok" if ratio <= target / STACK_IMPORT_S else "  missed")
        )
        print(
            f"{name:32s} {med[name]:7.3f} {ratio:8.3f} {med_cpu[name]:7.3f} {ratio_cpu:8.3f} {tr:>8s}{verdict}"
        )
        row = {
            "command": name,
            "wall_median_s": round(med[name], 4),
            "wall_min_s": round(min(wall[name]), 4),
            "cpu_median_s": round(med_cpu[name], 4),
            "wall_over_stack_import": round(ratio, 3),
            "cpu_over_stack_import": round(ratio_cpu, 3),
        }
        if target:
            row.update(
                target_ratio=round(target / STACK_IMPORT_S, 3), target_s_quiet_machine=target
            )
        rows.append(row)
    print(json.dumps({"repeats": a.repeats, "checkpoints": a.n, "rows": rows}, indent=1))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
