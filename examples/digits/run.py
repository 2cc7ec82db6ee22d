"""The whole pipeline on scikit-learn's digits (``make demo``).

1. Train the digits MLP the paper-style analysis uses (64 -> 4 x 64 GELU -> 10, plain SGD, lr 0.1,
   batch 64) and save 30 checkpoints, alternating safetensors and
   ``torch.save`` files, each with the training-time record of the VCS beside it
   (``gramlin_analyze.record``).
2. ``ingest`` them with capture: probe = the training set (the paper's
   choice, needed for the accumulated VCS), model = this file's factory.
   A second store captures the held-out split, for TL on unseen data.
3. ``analyze`` both stores.
4. Write the report of the training store (``digits-train.report.html``) and print
   its path and the per-layer table (``gramlin-analyze summary``, with the held-out
   TL and the early/late interval consistency beside it).

Each stage prints a line as it starts, and ingest and analyze show a progress bar.
Run: ``python -m examples.digits.run --out demo-output``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LAYERS = ["fc1", "fc2", "fc3", "fc4", "head"]


def _stage(show: bool, text: str) -> None:
    if show:
        print(text, file=sys.stderr, flush=True)


def _bar(show: bool, label: str):
    """A progress bar (the command line's) while ``show``, else nothing."""
    if not show:
        return nullcontext(None)
    from gramlin_analyze.cli.output import ProgressBar

    return ProgressBar(False, label)


def _train(out: Path, steps: int, every: int, progress: bool) -> dict:
    from examples.digits.train import train

    t0 = time.perf_counter()
    _stage(
        progress, f"[1/3] training the digits MLP for {steps} steps (a checkpoint every {every})"
    )
    log = train(out, steps=steps, every=every)
    _stage(
        progress,
        f"      trained in {time.perf_counter() - t0:.0f} s, test accuracy {log['test_accuracy']:.3f}",
    )
    return log


def _capture_stores(out: Path, lr: float, heldout: bool, progress: bool) -> dict[str, Path]:
    """Ingest with capture and analyze: probe = the training set, and the held-out split."""
    import gramlin_analyze as ga
    from gramlin_analyze.capture.task import CaptureConfig

    factory = f"{HERE / 'train.py'}:build"
    stores = {}
    probes = [("train", out / "probe_train.npz")] + (
        [("heldout", out / "probe_test.npz")] if heldout else []
    )
    for i, (name, probe) in enumerate(probes):
        store = out / f"digits-{name}.zarr"
        cfg = CaptureConfig(probe=str(probe), model=factory, batch_size=512, agop=name == "train")
        _stage(progress, f"[{2 + i}/3] ingest and analyze {store.name} (probe: {probe.name})")
        with _bar(progress, "ingest") as bar:
            report = ga.ingest(out / "ckpts", store, capture=cfg, lr=lr, progress=bar)
        if report.failed:
            raise RuntimeError(f"ingest failed: {report.failed}")
        with _bar(progress, "analyze") as bar:
            ga.analyze(store, metrics=None if name == "train" else ["tl"], progress=bar)
        stores[name] = store
    return stores


def run_pipeline(
    out: str | Path,
    *,
    steps: int = 2900,
    every: int = 100,
    heldout: bool = True,
    progress: bool = False,
) -> dict:
    """Train, ingest (with capture), analyze; return the numbers the demo prints.

    ``progress`` prints a line per stage and progress bars (on stderr).
    """
    import gramlin_analyze as ga
    from gramlin_analyze.store.info import store_info

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    log = _train(out, steps, every, progress)
    stores = _capture_stores(out, log["lr"], heldout, progress)
    tree = ga.open(stores["train"])
    m = tree["metrics"].to_dataset().load()
    mh = ga.open(stores["heldout"])["metrics"].to_dataset().load() if heldout else None
    steps_arr = m["step"].values
    loss = np.asarray(log["train_loss"])
    # The loss sits near ln(10) at first; "early" intervals end before it starts to fall.
    moving = int(np.argmax(loss < 0.9 * loss[0]))
    early_end = int(steps_arr[max(moving - 1, 1)])
    last = m.isel(step=-1)
    result = {
        "steps": steps_arr.tolist(),
        "train_loss": loss.tolist(),
        "test_accuracy": log["test_accuracy"],
        "early_end_step": early_end,
        "layers": {},
    }
    for layer in LAYERS:
        col = m.sel(layer=layer)
        early = col["vcs_interval_corr"].sel(step=slice(steps_arr[1], early_end)).values
        late = col["vcs_interval_corr"].sel(step=slice(early_end + 1, None)).values
        result["layers"][layer] = {
            "tl": float(last["target_linearity"].sel(layer=layer)),
            "tl_null": float(last["tl_null"].sel(layer=layer)),
            "tl_heldout": float(mh["target_linearity"].sel(layer=layer).isel(step=-1))
            if heldout
            else float("nan"),
            "tl_first": float(col["target_linearity"].isel(step=0)),
            "gram_vc_corr": float(last["gram_vc_corr"].sel(layer=layer)),
            "gram_vcs_acc_corr": float(last["gram_vcs_acc_corr"].sel(layer=layer)),
            "gram_vcs_recorded_corr": float(last["gram_vcs_recorded_corr"].sel(layer=layer)),
            "dgram_vcs_recorded_corr": float(last["dgram_vcs_recorded_corr"].sel(layer=layer)),
            "nfa_corr": float(last["nfa_corr"].sel(layer=layer)),
            "interval_corr_early": float(np.nanmedian(early)),
            "interval_corr_early_min": float(np.nanmin(early)),
            "interval_corr_late": float(np.nanmedian(late)),
            "interval_ratio_late": float(
                np.nanmedian(col["vcs_interval_ratio"].sel(step=slice(early_end + 1, None)).values)
            ),
            "effective_rank": float(last["effective_rank"].sel(layer=layer)),
        }
    result["info"] = store_info(stores["train"])
    (out / "summary.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "info"}, indent=1)
    )
    return result


def demo_table(res: dict, store: str | Path) -> str:
    """``gramlin-analyze summary`` of the training store at the last step, with the demo's
    own columns beside it: TL on the held-out split, interval consistency before and after
    the loss starts to fall."""
    import gramlin_analyze.plot as gp
    from gramlin_analyze.report import format_table, summary_frame

    df = summary_frame(gp.load(store))
    layers = list(df.index)
    df.insert(2, "TL test", [res["layers"][n]["tl_heldout"] for n in layers])
    df["interval early"] = [res["layers"][n]["interval_corr_early"] for n in layers]
    df["late"] = [res["layers"][n]["interval_corr_late"] for n in layers]
    meanings = dict(df.attrs["meanings"])
    meanings["TL test"] = "TL of the layer's input on the held-out split"
    meanings["interval early / late"] = (
        "median interval consistency before / after the loss starts to fall"
    )
    return "\n".join(
        [
            format_table(df, formats={"TL test": ".3f", "interval early": ".3f", "late": ".3f"}),
            "",
            f"last step {res['steps'][-1]}; test accuracy {res['test_accuracy']:.3f}; 'early' intervals "
            f"end at step {res['early_end_step']} (the loss still sits near ln 10 = 2.303)",
            "; ".join(f"{k}: {v}" for k, v in meanings.items()),
            _recorded_line(res),
        ]
    )


def _recorded_line(res: dict) -> str:
    """The recorded correlation of every layer beside the trapezoid estimate (issue 14:
    at least 0.9 for every layer)."""
    rec = [res["layers"][n]["gram_vcs_recorded_corr"] for n in LAYERS]
    trap = [res["layers"][n]["gram_vcs_acc_corr"] for n in LAYERS]
    ok = "yes" if all(r >= 0.9 for r in rec) else "NO"
    return (
        "diag Pearson of W^T W and the VCS summed over every training step (recorded): "
        + " / ".join(f"{r:.3f}" for r in rec)
        + f" (>= 0.9 every layer: {ok}); trapezoid estimate from checkpoints (W^T W - W_0^T W_0): "
        + " / ".join(f"{t:.3f}" for t in trap)
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="demo-output")
    a = p.parse_args()
    res = run_pipeline(a.out, progress=True)
    from gramlin_analyze.report import build_report

    store = Path(a.out) / "digits-train.zarr"
    _stage(True, f"report of {store.name}")
    report = build_report(store, png_dir=Path(a.out) / "figures")
    print(res["info"])
    print()
    print(demo_table(res, store))
    print()
    print(f"report: {report.html} (figures: {Path(a.out) / 'figures'})")


if __name__ == "__main__":
    main()
