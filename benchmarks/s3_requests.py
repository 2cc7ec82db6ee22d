"""Requests an ``ingest`` makes on S3, and what adding one checkpoint costs (issue 12, point 7).

Each request to an object store is a round trip (tens of ms on a real
endpoint), so requests, not bytes, set a remote store's speed for small and
medium models. This starts a real S3 server (moto's) on loopback behind a
request-counting middleware (``tests/store/s3_counter.py``), writes an MLP
trajectory of safetensors checkpoints with ``--layers`` layers, and for each
code tree (this checkout, and ``--baseline DIR`` when given), side by side in
this run, through the CLI:

1. ``ingest`` of ``--steps`` checkpoints into ``s3://…/run.zarr``;
2. one more checkpoint written, and ``ingest`` again: requests per added step;
3. the same two commands into a local store, for the S3 vs local time.

Requests are counted by method and key: the root ``zarr.json`` (which holds
the consolidated metadata), other ``zarr.json`` documents, chunks, the lock
object and listings.

Run: ``.venv/bin/python benchmarks/s3_requests.py [--layers 2 8] [--baseline /tmp/base-s3]``
(a baseline is a git worktree of other code: ``git worktree add /tmp/base-s3 HEAD``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.store.s3_counter import CountingS3, counting_s3, tally  # noqa: E402

KINDS = ("root", "zarr.json", "chunk", "lock", "list", "delete")


def write_checkpoint(directory: Path, step: int, layers: int, width: int) -> None:
    """One safetensors checkpoint of a ``layers``-layer MLP, ``width`` wide."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(step)
    sd = {}
    for k in range(layers):
        sd[f"net.{k}.weight"] = rng.standard_normal((width, width), dtype=np.float32)
        sd[f"net.{k}.bias"] = rng.standard_normal(width, dtype=np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / f"step_{step:06d}.safetensors"))


def run_cli(tree: Path, args: list[str], env: dict[str, str]) -> float:
    """``gramlin-analyze ARGS`` with the code of ``tree``; seconds, process start included."""
    code = "import sys; from gramlin_analyze.cli import main; sys.exit(main(sys.argv[1:]))"
    full_env = {**os.environ, **env, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tree, env=full_env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: gramlin-analyze {' '.join(args)} failed:\n{proc.stderr}")
    return seconds


def storage_args(s3: CountingS3) -> list[str]:
    endpoint = json.dumps({"endpoint_url": s3.endpoint, "region_name": "us-east-1"})
    return [
        "--storage-option", "key=testing",
        "--storage-option", "secret=testing",
        "--storage-option", f"client_kwargs={endpoint}",
    ]  # fmt: skip


def measure(s3: CountingS3, tree: Path, name: str, work: Path, a: argparse.Namespace) -> dict:
    """First ingest and one added step of one tree, on S3 (requests, time) and locally (time)."""
    run = work / name / "run"
    for i in range(a.steps):
        write_checkpoint(run, 100 * i, a.layers, a.width)
    url = f"s3://{s3.bucket}/{name}/run.zarr"
    local = str(work / name / "local.zarr")
    ingest = ["ingest", str(run), "-q"]
    out: dict = {}
    mark = s3.log.mark()
    out["first_s3_s"] = run_cli(tree, [*ingest, "--store", url, *storage_args(s3)], s3.env)
    out["first"] = tally(s3.log.since(mark))
    out["first_local_s"] = run_cli(tree, [*ingest, "--store", local], s3.env)
    write_checkpoint(run, 100 * a.steps, a.layers, a.width)
    mark = s3.log.mark()
    out["added_s3_s"] = run_cli(tree, [*ingest, "--store", url, *storage_args(s3)], s3.env)
    out["added"] = tally(s3.log.since(mark))
    out["added_local_s"] = run_cli(tree, [*ingest, "--store", local], s3.env)
    run_cli(tree, ["validate", url, *storage_args(s3)], s3.env)
    return out


def row(label: str, counts: Counter) -> str:
    total = sum(counts.values())
    cells = []
    for method in ("PUT", "GET", "HEAD", "DELETE", "POST"):
        by_kind = {k: counts[(method, k)] for k in KINDS if counts[(method, k)]}
        if by_kind:
            n = sum(by_kind.values())
            cells.append(
                f"{method} {n} (" + ", ".join(f"{k} {v}" for k, v in by_kind.items()) + ")"
            )
    return f"  {label:<34} {total:>5} requests: " + "; ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8], help="layer counts to run")
    p.add_argument("--steps", type=int, default=3, help="checkpoints in the first ingest")
    p.add_argument("--width", type=int, default=64, help="each layer is width x width")
    p.add_argument("--baseline", type=Path, help="a checkout of other code to compare with")
    args = p.parse_args()
    trees = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results: dict[tuple[str, int], dict] = {}
    with counting_s3() as s3, tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            a = argparse.Namespace(**{**vars(args), "layers": layers})
            for name, tree in trees.items():
                results[(name, layers)] = measure(s3, tree, f"{name}-{layers}", Path(tmp), a)
    for layers in args.layers:
        print(f"\n{layers} layers ({args.width}x{args.width}), {args.steps} steps, then one more:")
        for name in trees:
            r = results[(name, layers)]
            print(row(f"{name}: first ingest ({args.steps} steps)", r["first"]))
            print(row(f"{name}: one added step", r["added"]))
            print(
                f"  {'':<34} time S3 / local: first {r['first_s3_s']:.2f} / "
                f"{r['first_local_s']:.2f} s, added {r['added_s3_s']:.2f} / {r['added_local_s']:.2f} s"
            )
        if "baseline" in trees:
            new = sum(results[("this", layers)]["added"].values())
            old = sum(results[("baseline", layers)]["added"].values())
            print(f"  requests per added step: {new} vs baseline {old}: {new / old:.2f}x")


if __name__ == "__main__":
    main()
