"""The paper's Fig. 7 on scikit-learn's digits, offline.

A 2-layer MLP (64 -> 256 GELU -> 10: two weight layers) trained with plain SGD, lr 0.05,
batch 64, recorded by :class:`gramlin_analyze.record.Recorder` (every optimizer step's VCS
summed in float64) and checkpointed every ``every`` steps. The run is ingested with capture
(probe = the training set, with the AGOP) and analyzed; the table compares the diagonal
Pearson correlation of the first layer's final ``W^T W`` with

- the recorded VCS sum (the paper's measurement; it reports about 0.985 on CIFAR-10),
- the AGOP of the network at the end (Neural Feature Ansatz; the paper: about 0.72),
- the trapezoid estimate of the VCS sum from the checkpoints (what a run without a record
  allows),

and the same for the Gram change ``W^T W - W_0^T W_0``.
Run: ``python -m examples.fig7 --out fig7-output``.
"""

from __future__ import annotations

import argparse
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["build", "train", "run", "fig7_table"]

HERE = Path(__file__).resolve().parent
WIDTH = 256
LR = 0.05
BATCH = 64


def build(config: dict | None = None) -> nn.Module:
    """The model factory (``--model examples/fig7/run.py:build``)."""
    width = (config or {}).get("width", WIDTH)
    return nn.Sequential(
        OrderedDict(
            [("fc1", nn.Linear(64, width)), ("act1", nn.GELU()), ("fc2", nn.Linear(width, 10))]
        )
    )


def train(out: str | Path, *, steps: int = 3000, every: int = 100, seed: int = 0) -> Path:
    """Train with the recorder; write ``out/ckpts`` (checkpoints and their records) and
    ``out/probe_train.npz``; returns the checkpoint directory."""
    from safetensors.torch import save_file

    from examples.digits.train import load_digits_split, sgd_loop
    from gramlin_analyze.record import Recorder

    out = Path(out)
    ckpts = out / "ckpts"
    ckpts.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, _, _ = load_digits_split(seed)
    np.savez(out / "probe_train.npz", inputs=x_tr, labels=y_tr)
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = Recorder(model, opt, mode="full")
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)

    def save(step: int) -> None:
        path = ckpts / f"step_{step:05d}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        rec.save(path)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-256-10 step is too small to gain from threads
    try:
        sgd_loop(
            model,
            opt,
            loss_fn,
            (xt, yt),
            gen,
            steps=steps,
            every=every,
            batch_size=BATCH,
            save=save,
        )
    finally:
        torch.set_num_threads(threads)
    rec.close()
    return ckpts


def run(out: str | Path, *, steps: int = 3000, every: int = 100, seed: int = 0) -> dict:
    """Train, ingest with capture (AGOP on), analyze; the first layer's correlations."""
    import gramlin_analyze as ga
    from gramlin_analyze.capture.task import CaptureConfig

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    ckpts = train(out, steps=steps, every=every, seed=seed)
    store = out / "fig7.zarr"
    cfg = CaptureConfig(
        probe=str(out / "probe_train.npz"), model=f"{HERE / 'run.py'}:build", agop=True
    )
    report = ga.ingest(ckpts, store, capture=cfg, lr=LR)
    if report.failed:
        raise RuntimeError(f"ingest failed: {report.failed}")
    ga.analyze(store)
    return fig7_numbers(store, "fc1")


def fig7_numbers(store: str | Path, layer: str) -> dict:
    """Diag Pearson of the last step's Gram (and Gram change) with each VCS source and the AGOP."""
    import gramlin_analyze as ga
    from gramlin_analyze.reducers.alignment import pearson_np

    tree = ga.open(store)
    m = tree["metrics"].to_dataset().isel(step=-1).sel(layer=layer).load()
    mats = tree[f"metrics/{layer}"].to_dataset()
    gram = mats["gram"].isel(step=-1).values
    acc = mats["vcs_accumulated"].isel(step=-1).values
    return {
        "step": int(m["step"]),
        "recorded": (float(m["gram_vcs_recorded_corr"]), float(m["dgram_vcs_recorded_corr"])),
        "agop": (float(m["nfa_corr_diag"]), float("nan")),
        "trapezoid": (float(pearson_np(gram, acc, mode="diag")), float(m["gram_vcs_acc_corr"])),
    }


def fig7_table(res: dict) -> str:
    """The numbers as a table, the paper's beside them."""
    rows = [
        ("recorded VCS sum (every step)", *res["recorded"], "0.985"),
        ("AGOP (final weights)", *res["agop"], "0.72"),
        ("trapezoid VCS estimate (checkpoints)", *res["trapezoid"], "-"),
    ]
    lines = [
        f"first layer at step {res['step']}: diag Pearson with {'W^T W':>8} {'W^T W - W0^T W0':>16}"
        f" {'paper (CIFAR-10)':>17}"
    ]
    lines += [f"{name:<44} {a:8.3f} {b:16.3f} {p:>17}" for name, a, b, p in rows]
    return "\n".join(lines).replace("     nan", "       -")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="fig7-output")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=100)
    a = p.parse_args()
    print(fig7_table(run(a.out, steps=a.steps, every=a.every)))


if __name__ == "__main__":
    main()
