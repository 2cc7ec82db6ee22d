"""``gramlin-analyze report`` on a long, wide run: 1,000 steps x 50 layers of ``/metrics``.

Builds a synthetic store with xarray's ``to_zarr`` in the store's layout (root
attributes, ``/steps``, every ``/metrics`` scalar of ``analyze``, and per-layer
``gram``, ``vcs_accumulated`` and ``spectrum`` of ``--width`` inputs; those
matrices are chunked 100 steps at a time instead of one, to keep the store to
a few thousand files: the report reads two steps of them). Values are smooth
curves with noise, so every figure has data. Then times the report, as a
subprocess of the console script (process start included) and in this process
with one and with two drawing processes, beside a baseline process that starts,
imports and reads what a report reads but draws nothing; ``--repeats`` runs,
median wall and CPU (user + system, the helper process included; the steadier on a
busy machine) time, and each wall time as a ratio of the baseline's.

Target (issue 13): at most 10 s for 1,000 steps x 50 layers.

Run: ``.venv/bin/python benchmarks/report.py [--steps 1000] [--layers 50] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_S = 10.0


def _manifest(steps: np.ndarray):
    import xarray as xr

    n = steps.size
    text = lambda v: np.array([v] * n, dtype=object)  # noqa: E731
    return xr.Dataset(
        {
            "status": ("step", text("ok")),
            "format": ("step", text("safetensors")),
            "optimizer": ("step", text("SGD")),
            "lr": ("step", np.full(n, 0.1)),
            "lr_source": ("step", text("constant")),
            "error": ("step", text("")),
            "nonfinite": ("step", np.zeros(n, np.int64)),
            "epoch": ("step", np.full(n, np.nan)),
            "source_path": (
                "step",
                np.array([f"ckpts/step_{s}.safetensors" for s in steps], object),
            ),
        },
        coords={"step": ("step", steps, {"long_name": "optimizer step", "units": "steps"})},
    )


def _scalars(steps: np.ndarray, layers: list[str], rng) -> dict[str, np.ndarray]:
    """Every scalar metric of ``analyze``: smooth in step and depth, plus noise."""
    from gramlin_analyze.analysis.metrics import FAMILIES

    t = (steps / max(steps[-1], 1))[:, None]
    depth = np.linspace(0, 1, len(layers))[None, :]
    out = {}
    for fam in FAMILIES.values():
        for name in fam.scalars + fam.phase2_scalars:
            base = 0.2 + 0.5 * depth + 0.25 * (1 - np.exp(-5 * t))
            out[name] = np.clip(base + 0.02 * rng.standard_normal(base.shape), 0, 1)
    out["tl_null"] = np.broadcast_to(np.where(depth > 0.5, 0.08, 0.04), out["tl_null"].shape).copy()
    out["effective_rank"] = 40 - 20 * out["effective_rank"]
    out["nc1"] = 10 * np.exp(-3 * out["nc1"])
    for name in ("gram_change", "vcs_interval_corr", "vcs_interval_ratio", "fle_residual"):
        out[name][0] = np.nan  # interval quantities have no first step
    return out


def build_store(path: Path, n_steps: int, n_layers: int, width: int, seed: int = 0) -> Path:
    """The synthetic store at ``path`` (written with xarray, in the store's layout)."""
    import xarray as xr

    from gramlin_analyze.analysis.metrics import METRIC_DOCS

    rng = np.random.default_rng(seed)
    steps = np.arange(n_steps, dtype=np.int64) * 10
    layers = [
        f"encoder.layer.{i // 5}.{('query', 'key', 'value', 'output', 'mlp')[i % 5]}"
        for i in range(n_layers)
    ]
    values = _scalars(steps, layers, rng)
    metrics = xr.Dataset(
        {
            k: (("step", "layer"), v, {"long_name": METRIC_DOCS.get(k, k)})
            for k, v in values.items()
        },
        coords={
            "step": ("step", steps, {"long_name": "optimizer step", "units": "steps"}),
            "layer": ("layer", np.array(layers, object)),
        },
    )
    tree = {
        "/": xr.Dataset(
            attrs={
                "gramlin_schema_version": "1.0",
                "creation_library": "gramlin-analyze",
                "creation_library_version": "benchmark",
                "run_name": "synthetic",
                "source": "benchmarks/report.py",
                "created_at": "2026-01-01T00:00:00+00:00",
            }
        ),
        "/steps": _manifest(steps),
        "/metrics": metrics,
    }
    base = rng.standard_normal((width, width))
    for layer in layers:
        gram = np.einsum("ij,kj->ik", base, base)[None] * (1 + 0.001 * steps[:, None, None])
        acc = (gram - gram[:1]) * (1 + 0.05 * rng.standard_normal((1, width, width)))
        spectrum = np.sort(np.abs(rng.standard_normal((n_steps, width))), axis=1)[:, ::-1]
        tree[f"/metrics/{layer}"] = xr.Dataset(
            {
                "gram": (("step", "in_i", "in_j"), gram.astype(np.float32)),
                "vcs_accumulated": (("step", "in_i", "in_j"), acc),
                "spectrum": (("step", "k"), spectrum),
            }
        ).chunk({"step": 100})
    xr.DataTree.from_dict(tree).to_zarr(path, mode="w", consolidated=True, zarr_format=3)
    return path


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("gramlin-analyze")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gramlin_analyze"]


#: The baseline: a process that starts, imports what a report imports and reads what it
#: reads (``/metrics``, ``/steps``, attributes), and draws nothing.
BASELINE = (
    "import sys, matplotlib.pyplot\n"
    "from gramlin_analyze.plot._source import load\n"
    "load(sys.argv[1])\n"
)


def _timed_subprocess(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system, the helper process included) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def time_cli(store: Path, out: Path) -> tuple[float, float]:
    return _timed_subprocess([*cli(), "report", str(store), "-o", str(out), "--quiet"])


def time_baseline(store: Path, out: Path) -> tuple[float, float]:
    return _timed_subprocess([sys.executable, "-c", BASELINE, str(store)])


def time_one_process(store: Path, out: Path) -> tuple[float, float]:
    """The CLI's work in a fresh process, drawing every figure itself (no helper)."""
    code = (
        "import sys\nfrom gramlin_analyze.report.build import build_report\n"
        "build_report(sys.argv[1], sys.argv[2], processes=1)\n"
    )
    return _timed_subprocess([sys.executable, "-c", code, str(store), str(out)])


def in_process(processes: int):
    def timer(store: Path, out: Path) -> tuple[float, float]:
        from gramlin_analyze.report.build import build_report

        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        c0, t0 = time.process_time(), time.perf_counter()
        build_report(store, out, processes=processes)
        done = resource.getrusage(resource.RUSAGE_CHILDREN)
        helper = (done.ru_utime - child.ru_utime) + (done.ru_stime - child.ru_stime)
        return time.perf_counter() - t0, time.process_time() - c0 + helper

    return timer


def _rows(store: Path, out: Path, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) of each way of running, interleaved so load drifts hit all alike."""
    timers = {
        "baseline: start, import, read /metrics (CLI-like subprocess)": time_baseline,
        "report, CLI (process start included)": time_cli,
        "report, fresh process, 1 process (no helper)": time_one_process,
        "report, in process, 1 process": in_process(1),
        "report, in process, 2 processes": in_process(2),
    }
    runs: dict[str, list] = {k: [] for k in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            runs[name].append(timer(store, out))
    return {
        k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
        for k, v in runs.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--layers", type=int, default=50)
    p.add_argument(
        "--width", type=int, default=16, help="inputs per layer of the per-layer matrices"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", metavar="DIR", help="build the store in DIR and keep it")
    a = p.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gramlin-bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store = work / "synthetic.zarr"
        t0 = time.perf_counter()
        if not (store / "zarr.json").exists():
            build_store(store, a.steps, a.layers, a.width)
        print(
            f"store: {a.steps} steps x {a.layers} layers ({time.perf_counter() - t0:.1f} s; {store})"
        )
        rows = _rows(store, work / "report.html", a.repeats)
        base_wall = next(iter(rows.values()))[0]
        print(f"{'median of ' + str(a.repeats):<62} {'wall s':>7} {'CPU s':>7} {'x base':>7}")
        for name, (wall, cpu) in rows.items():
            print(f"{name:<62} {wall:7.2f} {cpu:7.2f} {wall / base_wall:7.2f}")
        cli_wall = rows["report, CLI (process start included)"][0]
        print(
            f"target: CLI report <= {TARGET_S:.0f} s: {'met' if cli_wall <= TARGET_S else 'not met'}"
        )
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    main()
