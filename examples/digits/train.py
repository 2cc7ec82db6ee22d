"""Train the digits MLP (64 -> 4 x 64 GELU -> 10, plain SGD) and save a checkpoint trajectory.

MLP 64 -> 4 x 64 (GELU) -> 10 on scikit-learn's digits (ships with the
package: nothing is downloaded), plain SGD, lr 0.1, batch 64, a checkpoint
every ``every`` optimizer steps. Checkpoints alternate between safetensors
and ``torch.save`` state dicts so the demo exercises two readers. The
training split is also written as the probe set (the paper's choice).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["build", "load_digits_split", "randomize_labels", "train"]

WIDTH = 64
DEPTH = 4


def build(config: dict | None = None) -> nn.Module:
    """The model factory (``--model examples/digits/train.py:build``)."""
    width = (config or {}).get("width", WIDTH)
    depth = (config or {}).get("depth", DEPTH)
    from collections import OrderedDict

    layers: list[tuple[str, nn.Module]] = []
    d = 64
    for k in range(1, depth + 1):
        layers += [(f"fc{k}", nn.Linear(d, width)), (f"act{k}", nn.GELU())]
        d = width
    layers.append(("head", nn.Linear(d, 10)))
    return nn.Sequential(OrderedDict(layers))


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 80/20 split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr].astype(np.int64), x[te], y[te].astype(np.int64)


def randomize_labels(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """``labels`` with ``round(fraction * n)`` of them, chosen at random, replaced by
    uniformly random classes (the paper's random-label experiment)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {fraction}")
    rng = np.random.default_rng([seed, 1])
    out = labels.copy()
    idx = rng.choice(len(out), size=round(fraction * len(out)), replace=False)
    out[idx] = rng.integers(0, 10, size=idx.size)
    return out


def sgd_loop(
    model, opt, loss_fn, data, gen, *, steps: int, every: int, batch_size: int, save
) -> None:
    """Minibatch steps over reshuffled epochs, ``save(step)`` at step 0 and every ``every``."""
    xt, yt = data
    step = 0
    save(0)
    while step < steps:
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
            step += 1
            if step % every == 0:
                save(step)
            if step >= steps:
                return


def train(
    out: str | Path,
    *,
    steps: int = 2900,
    every: int = 100,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    label_noise: float = 0.0,
    record: bool = True,
) -> dict:
    """Train and write ``out/ckpts/`` (checkpoints), ``out/probe_train.npz`` and
    ``out/probe_test.npz``; returns the training log. ``label_noise``: the fraction of
    training labels replaced by uniformly random ones (seeded; the probe set keeps them).
    ``record``: a :class:`gramlin_analyze.record.Recorder` sums every step's VCS, saved
    beside each checkpoint as ``step_NNNNN.gramlin_record.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out)
    ckpts = out / "ckpts"
    ckpts.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    y_tr = randomize_labels(y_tr, label_noise, seed)
    np.savez(out / "probe_train.npz", inputs=x_tr, labels=y_tr)
    np.savez(out / "probe_test.npz", inputs=x_te, labels=y_te)
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = None
    if record:
        from gramlin_analyze.record import Recorder

        rec = Recorder(model, opt)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    log = {"step": [], "train_loss": [], "lr": lr, "batch_size": batch_size, "optimizer": "SGD"}

    def save(step: int) -> None:
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        with torch.no_grad():
            full = loss_fn(model(xt), yt).item()
        log["step"].append(step)
        log["train_loss"].append(full)
        if (step // every) % 2 == 0:
            path = ckpts / f"step_{step:05d}.safetensors"
            save_file(sd, str(path), metadata={"step": str(step)})
        else:
            path = ckpts / f"step_{step:05d}.pt"
            torch.save({"model": sd, "global_step": step, "lr": lr}, path)
        if rec is not None:
            rec.save(path)

    sgd_loop(
        model,
        opt,
        loss_fn,
        (xt, yt),
        gen,
        steps=steps,
        every=every,
        batch_size=batch_size,
        save=save,
    )
    if rec is not None:
        rec.close()
    with torch.no_grad():
        log["test_accuracy"] = float(
            (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
        )
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=2900)
    p.add_argument("--every", type=int, default=100)
    a = p.parse_args()
    res = train(a.out, steps=a.steps, every=a.every)
    print(f"test accuracy {res['test_accuracy']:.3f}")
