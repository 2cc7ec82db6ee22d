"""analyze throughput: Gram vs raw matmul, ingest + analyze vs a user script, TL vs N.

Side by side in this run:

a. Gram over a stored trajectory. Writes 20 safetensors checkpoints of 8
   layers of 1024 x 1024 float32 weights, ingests them (weights only) into a
   new store and times ``gramlin_analyze.analyze(store, metrics=["gram"])``
   (the Gram in float64, stored, its Frobenius norm and the step-to-step
   Gram change); against it, the raw matmul rate on the same 160 matrices:
   NumPy ``W.T @ W`` in float64, the matrices already float64 in memory, on
   NumPy's own threads. ``syrk_one_thread_ms_per_matrix`` is the same kernel
   on one thread, as each of analyze's parallel tasks runs it.
   Target: Gram rate >= 0.6 x matmul rate.
b. ``ingest`` + ``analyze --metrics gram`` vs the script a user would write
   (load each checkpoint with ``safetensors.numpy.load_file``, ``W.T @ W`` per
   layer in float64, ``np.save`` each result), both followed by ``sync``:
   cold (new store, fresh output directory), target ratio <= 1.25; then
   incremental after a 21st checkpoint appears (the user script redoes all
   21, ours reads only the new one), target ratio <= 0.1.

   Cold is measured twice. *first*: the first time this process writes these
   bytes. On the development VM, memory the guest has not touched before (or
   has given back to the hypervisor) costs about 2.5 ms per MB on first
   write, so whichever side writes first into new page cache pays for it
   (about 1.6 s per 640 MB; ingest and analyze each write 640 MB, the user
   script 1.3 GB). *repeat* (``--repeats`` rounds, medians): each side's
   previous output is deleted right before it runs, so both write into
   recycled pages, as on a machine that has been up for a while. Both are
   reported; part a's rate is given for both runs of analyze too, and for
   ``analyze --recompute`` of the same store (every Gram chunk file replaced).
c. TL time vs N: capture a fixed MLP (256 -> 512 -> 512 -> 10) over 4
   checkpoints with probe sets of N = 2000, 4000, 8000, then, in a fresh
   subprocess per store, time ``analyze(metrics=["tl"])`` (median of the
   first run and ``--tl-repeats`` recomputes) and read its peak memory three
   ways: ``ru_maxrss`` of the subprocess (whole process; on Linux it also
   keeps the RSS of the parent it was forked from, so it is only a ceiling),
   the peak RSS the analyze runs add (``VmHWM`` after them minus ``VmRSS``
   before, the high-water mark reset through ``/proc/self/clear_refs``), and
   the tracemalloc peak of one more recompute (Python and NumPy allocations
   only). Target: time linear in N (ratios ~2 and ~4), peak memory
   independent of N.

Run: ``.venv/bin/python benchmarks/reduce.py [--n 20] [--layers 8] [--dim 1024]``
(about 3.5 minutes on 2 cores, two of them the gram analyze of part a).
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
TL_SIZES = (256, 512, 512, 10)


# -- part a/b: a trajectory of square weights -------------------------------------------


def write_checkpoint(path: Path, n_layers: int, dim: int, rng: np.random.Generator) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {
        f"layers.{k}.weight": (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
        for k in range(n_layers)
    }
    save_file(sd, str(path))


def checkpoints(run: Path) -> list[Path]:
    return sorted(
        run.glob("checkpoint-*/model.safetensors"), key=lambda p: int(p.parent.name.split("-")[1])
    )


def user_script(run: Path, out: Path) -> int:
    """What a user writes: load, W.T @ W per layer in float64, np.save; returns matrices done."""
    from safetensors.numpy import load_file

    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for ckpt in checkpoints(run):
        for name, w in load_file(str(ckpt)).items():
            if w.ndim == 2:
                w64 = w.astype(np.float64)
                np.save(out / f"{ckpt.parent.name}.{name}.npy", w64.T @ w64)
                done += 1
    return done


def timed(fn) -> tuple[float, float]:
    """(seconds of the call, seconds of the ``sync`` after it), caches flushed before."""
    os.sync()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    os.sync()
    return t1 - t0, time.perf_counter() - t1


def median_time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def matmul_seconds(mats: list[np.ndarray], repeats: int) -> float:
    def run() -> None:
        for w in mats:
            w.T @ w

    run()  # warm-up
    return median_time(run, repeats)


def syrk_one_thread_ms(mats: list[np.ndarray], sample: int = 8) -> float:
    """Median ms of ``W.T @ W`` on one BLAS thread: the kernel as each analyze task runs it
    (tasks run in parallel, one kernel thread each)."""
    from threadpoolctl import threadpool_limits

    ws = mats[:: max(1, len(mats) // sample)][:sample]
    with threadpool_limits(1):
        ws[0].T @ ws[0]
        return round(1e3 * statistics.median(median_time(lambda w=w: w.T @ w, 1) for w in ws), 2)


def part_ab(work: Path, n: int, n_layers: int, dim: int, repeats: int) -> dict:
    import gramlin_analyze as ga

    rng = np.random.default_rng(0)
    run, spare = work / "run", work / "spare"
    for i in range(n):
        write_checkpoint(
            run / f"checkpoint-{(i + 1) * 100}" / "model.safetensors", n_layers, dim, rng
        )
    extra = spare / f"checkpoint-{(n + 1) * 100}"
    write_checkpoint(extra / "model.safetensors", n_layers, dim, rng)
    extra_cli = spare / f"checkpoint-{(n + 2) * 100}"
    write_checkpoint(extra_cli / "model.safetensors", n_layers, dim, rng)
    store, out = work / "store.zarr", work / "user_out"

    # a. raw matmul rate on the same matrices (float64, in memory, NumPy's threads)
    from safetensors.numpy import load_file

    mats = [
        np.asarray(w, dtype=np.float64)
        for c in checkpoints(run)
        for w in load_file(str(c)).values()
    ]
    n_mats = len(mats)
    t_mm = matmul_seconds(mats, repeats)
    syrk1 = syrk_one_thread_ms(mats)
    del mats

    def ours_cold() -> tuple[tuple[float, float], tuple[float, float]]:
        rep: list = []
        t_i = timed(lambda: ga.ingest(run, store))
        t_a = timed(lambda: rep.append(ga.analyze(store, metrics=["gram"])))
        if rep[0].computed != n_mats:
            raise RuntimeError(
                f"analyze computed {rep[0].computed} (step, layer) pairs, expected {n_mats}"
            )
        return t_i, t_a

    # b (cold, first): the user script into a fresh directory, then ingest + analyze a
    # new store; the first bytes this process writes (see the module docstring).
    t_user_first = timed(lambda: user_script(run, out))
    t_ingest_first, t_analyze_first = ours_cold()
    # b (cold, repeated): each side's previous output deleted right before it runs.
    reps = []
    for _ in range(repeats):
        shutil.rmtree(out)
        t_u = timed(lambda: user_script(run, out))
        shutil.rmtree(store)
        t_i, t_a = ours_cold()
        reps.append((sum(t_u), sum(t_i), sum(t_a), t_a[0]))
    user_rep, ingest_rep, analyze_rep, analyze_call_rep = (
        statistics.median(r[k] for r in reps) for k in range(4)
    )
    # a (recompute): analyze --recompute of the same store; each Gram chunk file
    # replaces the previous one, so its pages are recycled at once.
    recompute = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ga.analyze(store, metrics=["gram"], recompute=True)
        recompute.append(time.perf_counter() - t0)
    analyze_recompute = statistics.median(recompute)

    # b (incremental): one new checkpoint
    shutil.move(str(extra), str(run / extra.name))
    t_user_inc = timed(lambda: user_script(run, out))
    t_ingest_inc = timed(lambda: ga.ingest(run, store))
    rep: list = []
    t_analyze_inc = timed(lambda: rep.append(ga.analyze(store, metrics=["gram"])))
    if rep[0].computed != n_layers:
        raise RuntimeError(
            f"incremental analyze computed {rep[0].computed} pairs, expected {n_layers}"
        )

    # b (incremental, through the CLI as users run it): one more new checkpoint;
    # ``ingest`` and ``analyze`` as two processes, the user script as one, start-up included.
    shutil.move(str(extra_cli), str(run / extra_cli.name))
    cli = [sys.executable, "-m", "gramlin_analyze"]
    script = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import reduce; "
        f"reduce.user_script(__import__('pathlib').Path({str(run)!r}), __import__('pathlib').Path({str(out)!r}))",
    ]
    t_user_cli = timed(lambda: subprocess.run(script, check=True))
    t_ours_cli = timed(
        lambda: (
            subprocess.run([*cli, "ingest", str(run), "--store", str(store), "-q"], check=True),
            subprocess.run([*cli, "analyze", str(store), "--metrics", "gram", "-q"], check=True),
        )
    )

    first_ours = sum(t_ingest_first) + sum(t_analyze_first)
    ours_inc = sum(t_ingest_inc) + sum(t_analyze_inc)
    return {
        "a_gram_vs_matmul": {
            "matrices": n_mats,
            "shape": [dim, dim],
            "matmul_float64_s": round(t_mm, 3),
            "matmul_per_s": round(n_mats / t_mm, 1),
            "syrk_one_thread_ms_per_matrix": syrk1,
            "analyze_gram_first_s": round(t_analyze_first[0], 3),
            "analyze_gram_repeat_s": round(analyze_call_rep, 3),
            "gram_rate_over_matmul_rate_first": round(t_mm / t_analyze_first[0], 3),
            "gram_rate_over_matmul_rate_repeat": round(t_mm / analyze_call_rep, 3),
            "analyze_gram_recompute_s": round(analyze_recompute, 3),
            "gram_rate_over_matmul_rate_recompute": round(t_mm / analyze_recompute, 3),
            "target": 0.6,
        },
        "b_ingest_analyze_vs_user_script": {
            "cold_first_user_s": round(sum(t_user_first), 3),
            "cold_first_ingest_s": round(sum(t_ingest_first), 3),
            "cold_first_analyze_s": round(sum(t_analyze_first), 3),
            "cold_first_ratio": round(first_ours / sum(t_user_first), 3),
            "cold_repeat_user_s": round(user_rep, 3),
            "cold_repeat_ingest_s": round(ingest_rep, 3),
            "cold_repeat_analyze_s": round(analyze_rep, 3),
            "cold_repeat_ratio": round((ingest_rep + analyze_rep) / user_rep, 3),
            "cold_repeat_ratios_all": [round((r[1] + r[2]) / r[0], 3) for r in reps],
            "cold_target": 1.25,
            "incremental_new_checkpoints": 1,
            "incremental_user_s": round(sum(t_user_inc), 3),
            "incremental_ingest_s": round(sum(t_ingest_inc), 3),
            "incremental_analyze_s": round(sum(t_analyze_inc), 3),
            "incremental_ours_s": round(ours_inc, 3),
            "incremental_ratio": round(ours_inc / sum(t_user_inc), 3),
            "incremental_target": 0.1,
            "incremental_cli_user_script_s": round(sum(t_user_cli), 3),
            "incremental_cli_ours_s": round(sum(t_ours_cli), 3),
            "incremental_cli_ratio": round(sum(t_ours_cli) / sum(t_user_cli), 3),
            "incremental_cli_target": 0.15,
            "store_GB": round(du(store) / 1e9, 2),
            "user_out_GB": round(du(out) / 1e9, 2),
        },
    }


# -- part c: TL vs N ---------------------------------------------------------------------


def build_tl_mlp():
    """The part-c MLP (the capture factory)."""
    from torch import nn

    d0, d1, d2, d3 = TL_SIZES
    return nn.Sequential(
        nn.Linear(d0, d1), nn.ReLU(), nn.Linear(d1, d2), nn.ReLU(), nn.Linear(d2, d3)
    )


def write_tl_run(run: Path, n_ckpt: int) -> None:
    import torch

    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_tl_mlp()
    for i in range(n_ckpt):
        torch.save(model.state_dict(), run / f"step_{i * 100:05d}.pt")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-2)


_TL_SCRIPT = """
import json, resource, statistics, sys, time, tracemalloc
import gramlin_analyze as ga

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

store, repeats = sys.argv[1], int(sys.argv[2])
maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = status("VmRSS")
except OSError:
    rss0 = None
times = []
for i in range(1 + repeats):
    t0 = time.perf_counter()
    rep = ga.analyze(store, metrics=["tl"], recompute=i > 0)
    times.append(time.perf_counter() - t0)
hwm = status("VmHWM") if rss0 is not None else None
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
ga.analyze(store, metrics=["tl"], recompute=True)
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print(json.dumps({"times": times, "computed": rep.computed, "maxrss0_kb": maxrss0, "maxrss_kb": maxrss,
                  "rss0_kb": rss0, "hwm_kb": hwm, "tracemalloc_peak": peak}))
"""


def part_c(work: Path, sizes: list[int], n_ckpt: int, repeats: int, batch_size: int) -> dict:
    import torch

    import gramlin_analyze as ga
    from gramlin_analyze.capture.task import CaptureConfig

    run = work / "tl_run"
    write_tl_run(run, n_ckpt)
    factory = f"{Path(__file__).resolve()}:build_tl_mlp"
    rows = {}
    for n in sizes:
        rng = np.random.default_rng(n)
        probe = work / f"probe_{n}.npz"
        np.savez(
            probe,
            inputs=rng.standard_normal((n, TL_SIZES[0]), dtype=np.float32),
            labels=rng.integers(0, TL_SIZES[-1], n),
        )
        store = work / f"tl_{n}.zarr"
        cfg = CaptureConfig(probe=str(probe), model=factory, batch_size=batch_size)
        t0 = time.perf_counter()
        report = ga.ingest(run, store, capture=cfg, lr=0.1)
        t_cap = time.perf_counter() - t0
        if report.failed:
            raise RuntimeError(f"capture for N={n} failed: {report.failed}")
        os.sync()
        out = subprocess.run(
            [sys.executable, "-c", _TL_SCRIPT, str(store), str(repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows[n] = {
            "capture_ingest_s": round(t_cap, 3),
            "analyze_tl_s": round(statistics.median(r["times"]), 3),
            "analyze_tl_all_s": [round(t, 3) for t in r["times"]],
            "pairs": r["computed"],
            "ru_maxrss_MB": round(r["maxrss_kb"] / 1024, 1),
            "ru_maxrss_after_imports_MB": round(r["maxrss0_kb"] / 1024, 1),
            "rss_before_analyze_MB": mb(r["rss0_kb"]),
            "peak_rss_during_analyze_MB": mb(r["hwm_kb"]),
            "peak_rss_added_by_analyze_MB": mb(r["hwm_kb"] - r["rss0_kb"] if r["hwm_kb"] else None),
            "tracemalloc_peak_MB": round(r["tracemalloc_peak"] / 2**20, 2),
            "activations_MB": round(n * n_ckpt * sum(TL_SIZES[:-1]) * 4 / 2**20, 1),
        }
        shutil.rmtree(store)
    base = sizes[0]
    t = {n: rows[n]["analyze_tl_s"] for n in sizes}
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray([t[n] for n in sizes]), 1)
    return {
        "model": "x".join(map(str, TL_SIZES)),
        "checkpoints": n_ckpt,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "by_N": {str(n): rows[n] for n in sizes},
        "time_ratios": {f"t({n // base}N)/t(N)": round(t[n] / t[base], 3) for n in sizes[1:]},
        "time_ratio_targets": {f"t({n // base}N)/t(N)": n / base for n in sizes[1:]},
        "linear_fit_s": {"per_1000_samples": round(1e3 * slope, 4), "fixed": round(intercept, 3)},
        "ru_maxrss_ratio_max_over_min": ratio_max_min(rows, "ru_maxrss_MB"),
        "peak_rss_added_ratio_max_over_min": ratio_max_min(rows, "peak_rss_added_by_analyze_MB"),
        "tracemalloc_peak_ratio_max_over_min": ratio_max_min(rows, "tracemalloc_peak_MB"),
        "memory_note": "one subprocess per N. ru_maxrss: the process's peak RSS, imports "
        "included; Linux carries the forking parent's RSS across exec, hence "
        "ru_maxrss_after_imports already grows with this script's size; peak_rss_added_by_analyze: VmHWM after "
        "the analyze runs minus VmRSS before them, the high-water mark reset via "
        "/proc/self/clear_refs; tracemalloc_peak: Python/NumPy allocations of one more recompute",
    }


def mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def ratio_max_min(rows: dict, key: str) -> float | None:
    vals = [r[key] for r in rows.values()]
    if any(v is None for v in vals) or min(vals) <= 0:
        return None
    return round(max(vals) / min(vals), 3)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=20, help="checkpoints in parts a/b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="repeats of the cheap timings")
    p.add_argument("--tl-sizes", default="2000,4000,8000")
    p.add_argument("--tl-checkpoints", type=int, default=4)
    p.add_argument(
        "--tl-repeats", type=int, default=2, help="recomputes timed after the first TL run"
    )
    p.add_argument("--tl-batch-size", type=int, default=500)
    p.add_argument("--skip-ab", action="store_true")
    p.add_argument("--skip-c", action="store_true")
    p.add_argument("--work", default=str(HERE / "_work" / "reduce"))
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    res: dict = {"cpu_count": os.cpu_count()}
    try:
        if not a.skip_ab:
            res.update(part_ab(work / "ab", a.n, a.layers, a.dim, a.repeats))
            shutil.rmtree(work / "ab")
        if not a.skip_c:
            sizes = [int(s) for s in a.tl_sizes.split(",")]
            res["c_tl_vs_N"] = part_c(
                work / "c", sizes, a.tl_checkpoints, a.tl_repeats, a.tl_batch_size
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if work.parent.name == "_work" and work.parent.exists() and not any(work.parent.iterdir()):
            work.parent.rmdir()
    res["benchmark_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
