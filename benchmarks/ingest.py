"""Ingest throughput vs ``cp -r``, and peak memory vs trajectory length.

Writes a synthetic trajectory of safetensors checkpoints (default 20 x 100 MB),
then, side by side in this run:

1. ``cp -r`` of the directory to the same disk, then ``sync``;
2. ``gramlin-analyze ingest`` of it (default threaded scheduler), then ``sync``;
3. peak RSS of an ingest subprocess for 10 and for 40 checkpoints.

Targets (issue #2): ingest <= 2x the copy time; peak RSS for 40 within 1.1x of 10.
Run: ``.venv/bin/python benchmarks/ingest.py [--mb 100] [--n 20]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_run(directory: Path, n: int, mb: int, seed: int = 0) -> int:
    """n checkpoints of about mb MB each: 1024 x d float32 layers."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_layers = 6
    d = int(np.sqrt(mb * 2**20 / 4 / n_layers))
    total = 0
    for i in range(n):
        sd = {}
        for k in range(n_layers):
            sd[f"blocks.{k}.fc.weight"] = rng.standard_normal((d, d), dtype=np.float32)
            sd[f"blocks.{k}.fc.bias"] = rng.standard_normal(d, dtype=np.float32)
        path = directory / f"checkpoint-{(i + 1) * 100}" / "model.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file(sd, str(path))
        total += path.stat().st_size
    return total


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    os.sync()
    return time.perf_counter() - t0


_RSS_SCRIPT = """
import resource, sys
from gramlin_analyze.ingest import ingest
ingest(sys.argv[1], sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(run: Path, store: Path) -> float:
    shutil.rmtree(store, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(run), str(store)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--rss-mb", type=int, default=25, help="checkpoint size for the RSS runs")
    p.add_argument("--work", default=str(HERE / "_work"))
    a = p.parse_args()
    from gramlin_analyze.ingest import ingest

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    run = work / "run"
    nbytes = write_run(run, a.n, a.mb)
    os.sync()
    t_cp = timed(lambda: subprocess.run(["cp", "-r", str(run), str(work / "copy")], check=True))
    t_ingest = timed(lambda: ingest(run, work / "store.zarr"))
    t_again = timed(lambda: ingest(run, work / "store.zarr"))
    # The same through the CLI as users run it (process start included), beside a second copy.
    shutil.rmtree(work / "store.zarr")
    shutil.rmtree(work / "copy")
    t_cp2 = timed(lambda: subprocess.run(["cp", "-r", str(run), str(work / "copy")], check=True))
    cli = [
        sys.executable,
        "-m",
        "gramlin_analyze",
        "ingest",
        str(run),
        "--store",
        str(work / "store.zarr"),
        "-q",
    ]
    t_cli = timed(lambda: subprocess.run(cli, check=True))
    res = {
        "checkpoints": a.n,
        "total_GB": round(nbytes / 1e9, 2),
        "cp_r_s": round(t_cp, 2),
        "ingest_s": round(t_ingest, 2),
        "ingest_over_cp": round(t_ingest / t_cp, 2),
        "ingest_GB_per_s": round(nbytes / 1e9 / t_ingest, 2),
        "reingest_unchanged_s": round(t_again, 2),
        "cli_cp_r_s": round(t_cp2, 2),
        "cli_ingest_s": round(t_cli, 2),
        "cli_ingest_over_cp": round(t_cli / t_cp2, 2),
        "cli_target": 1.5,
    }
    shutil.rmtree(work / "copy")
    shutil.rmtree(work / "store.zarr")
    shutil.rmtree(run)
    r10, r40 = work / "r10", work / "r40"
    write_run(r10, 10, a.rss_mb)
    write_run(r40, 40, a.rss_mb)
    rss10 = peak_rss_mb(r10, work / "s10.zarr")
    rss40 = peak_rss_mb(r40, work / "s40.zarr")
    res.update(
        {
            "rss_ckpt_MB": a.rss_mb,
            "peak_rss_10_MB": round(rss10),
            "peak_rss_40_MB": round(rss40),
            "rss_40_over_10": round(rss40 / rss10, 3),
        }
    )
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
