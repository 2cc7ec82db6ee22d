"""The paper's random-label experiment, offline: last-hidden-layer TL falls as labels turn random.

The digits MLP (``examples/digits/train.py``) is trained five times, with a fraction
``p`` in {0, 0.25, 0.5, 0.75, 1} of its training labels replaced by random classes
(seeded). Each run is ingested with capture (probe: the training set with the labels
the run was trained on, the paper's choice) into its own store, with ``label_noise``
recorded as a run attribute, and analyzed; then one comparison report of the five
stores is written, and a table of each run's final TL of the head's input (the last
hidden layer) against ``p``, beside the paper's values.

Run: ``python -m examples.random_labels [--out random-labels-output]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parent.parent / "digits"
NOISE = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The paper's last-layer TL at each ``p`` (read off its random-label figure: "about").
PAPER_TL = {0.0: 0.45, 0.5: 0.30, 0.75: 0.25, 1.0: 0.25}
LAST_HIDDEN = "head"  # TL of a layer is TL of its input: the head's input is the last hidden layer

__all__ = ["NOISE", "PAPER_TL", "final_tl", "format_table", "main", "run_experiment"]


def _say(show: bool, text: str) -> None:
    if show:
        print(text, file=sys.stderr, flush=True)


def _one_run(out: Path, p: float, *, steps: int, every: int, seed: int) -> tuple[Path, dict]:
    """Train with label noise ``p``, ingest with capture into ``out/p<p>.zarr``, analyze TL."""
    import torch

    import gramlin_analyze as ga
    from examples.digits.train import train
    from gramlin_analyze.capture.task import CaptureConfig

    run_dir = out / f"p{p:g}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP: more threads only contend (7x slower on 2 cores)
    try:
        log = train(run_dir, steps=steps, every=every, seed=seed, label_noise=p)
    finally:
        torch.set_num_threads(threads)
    store = out / f"p{p:g}.zarr"
    config = CaptureConfig(
        probe=str(run_dir / "probe_train.npz"), model=f"{DIGITS / 'train.py'}:build", batch_size=512
    )
    report = ga.ingest(
        run_dir / "ckpts",
        store,
        capture=config,
        lr=log["lr"],
        run_name=f"p{p:g}",
        run_attrs={"label_noise": p, "seed": seed, "steps": steps},
    )
    if report.failed:
        raise RuntimeError(f"{store}: ingest failed: {report.failed}")
    ga.analyze(store, metrics=["tl"])
    return store, log


def final_tl(stores: Sequence[str | Path], layer: str = LAST_HIDDEN) -> dict[float, float]:
    """Each run's TL of ``layer`` at its last ok step, keyed by its ``label_noise``."""
    import gramlin_analyze as ga

    ds = ga.open_runs(list(stores))["metrics"].to_dataset()
    tl = ds["target_linearity"].sel(layer=layer).where(ds["ok"]).compute()
    out = {}
    for run in ds["run"].values:
        values = tl.sel(run=run).dropna("step").values
        out[float(ds["label_noise"].sel(run=run))] = float(values[-1]) if values.size else np.nan
    return out


def format_table(tl: dict[float, float], logs: dict[float, dict] | None = None) -> str:
    """A Markdown table: p, measured final TL of the last hidden layer, the paper's, and
    (with the training logs) the final training loss and test accuracy."""
    head = "| p (label noise) | TL last hidden layer | paper | train loss | test accuracy |"
    rows = [head, "|---|---|---|---|---|"]
    for p, value in sorted(tl.items()):
        paper = f"about {PAPER_TL[p]:.2f}" if p in PAPER_TL else "-"
        log = (logs or {}).get(p)
        loss = f"{log['train_loss'][-1]:.3f}" if log else "-"
        acc = f"{log['test_accuracy']:.3f}" if log else "-"
        rows.append(f"| {p:g} | {value:.3f} | {paper} | {loss} | {acc} |")
    return "\n".join(rows)


def run_experiment(
    out: str | Path,
    *,
    noise: Sequence[float] = NOISE,
    steps: int = 3000,
    every: int = 300,
    seed: int = 0,
    report: bool = True,
    progress: bool = False,
) -> dict:
    """Train, ingest and analyze one store per noise level, then write the comparison report.

    Returns ``{"stores", "tl" (p -> final TL), "logs" (p -> training log), "report"
    (the HTML page or None), "table"}``.
    """
    from gramlin_analyze.report.compare import build_comparison_report

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stores, logs = [], {}
    for i, p in enumerate(noise):
        t0 = time.perf_counter()
        _say(
            progress,
            f"[{i + 1}/{len(noise)}] label noise {p:g}: train {steps} steps, ingest, analyze",
        )
        store, logs[p] = _one_run(out, p, steps=steps, every=every, seed=seed)
        stores.append(store)
        _say(progress, f"      {store.name} in {time.perf_counter() - t0:.0f} s")
    tl = final_tl(stores)
    html = None
    if report:
        _say(progress, "comparison report")
        html = build_comparison_report(
            stores, out / "random_labels.report.html", by="label_noise"
        ).html
    return {
        "stores": stores,
        "tl": tl,
        "logs": logs,
        "report": html,
        "table": format_table(tl, logs),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="random-labels-output", help="output folder (replaced)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps of each run")
    p.add_argument("--every", type=int, default=300, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run_experiment(a.out, steps=a.steps, every=a.every, seed=a.seed, progress=True)
    print(res["table"])
    print()
    print(f"report: {res['report']}  ({time.perf_counter() - t0:.0f} s in all)")
