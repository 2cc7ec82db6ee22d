"""Small real stores for the plot, report and notebook tests: trained, ingested with
capture and analyzed through the public API, as a user's run would be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import gramlin_analyze as ga
from gramlin_analyze.capture.task import CaptureConfig

LR = 0.1
#: The tiny BERT's layers in the order data flows through them.
BERT_ORDER = [
    "bert.embeddings.word_embeddings",
    "bert.embeddings.position_embeddings",
    "bert.embeddings.token_type_embeddings",
    *[
        f"bert.encoder.layer.{i}.{part}"
        for i in (0, 1)
        for part in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ],
    "bert.pooler.dense",
    "classifier",
]


def _train(model: nn.Module, x, y, run: Path, steps: list[int]) -> None:
    """Full-batch SGD, a ``torch.save`` state dict at each of ``steps``."""
    run.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(max(steps) + 1):
        if step in steps:
            torch.save(model.state_dict(), run / f"step_{step:04d}.pt")
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()


def _ingest_analyze(tmp: Path, factory: str, *, agop: bool) -> Path:
    store = tmp / "s.zarr"
    cfg = CaptureConfig(probe=str(tmp / "probe.npz"), model=factory, batch_size=64, agop=agop)
    report = ga.ingest(tmp / "run", store, capture=cfg, lr=LR)
    assert not report.failed, report.failed
    ga.analyze(store)
    return store


def mlp_store(tmp: Path, *, steps=(0, 3, 8), n: int = 60, seed: int = 0) -> Path:
    """The MLP 5 -> 7 -> 6 -> 3 of ``tests/capture_models.py`` (layers ``0``, ``2``, ``4``)."""
    from tests.capture_models import build_mlp

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    np.savez(tmp / "probe.npz", inputs=x, labels=y)
    _train(build_mlp(), x, y, tmp / "run", list(steps))
    return _ingest_analyze(tmp, "tests.capture_models:build_mlp", agop=True)


def bert_store(tmp: Path, *, steps=(0, 4, 9), n: int = 32, seed: int = 0) -> Path:
    """The tiny BERT of ``tests/plot/models.py``: 17 layers, per-token rows."""
    from tests.plot.models import CLASSES, SEQ, VOCAB, build_tiny_bert

    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64)
    y = (x[:, 1] % CLASSES).astype(np.int64)
    np.savez(tmp / "probe.npz", inputs=x, labels=y)
    _train(build_tiny_bert(), x, y, tmp / "run", list(steps))
    return _ingest_analyze(tmp, "tests.plot.models:build_tiny_bert", agop=False)


def cached_store(tmp_path_factory, name: str) -> Path:
    """One store per test session, shared by tests/plot and tests/report (built on first use)."""
    base = tmp_path_factory.getbasetemp() / "gramlin-plot-stores" / name
    store = base / "s.zarr"
    if not (store / "zarr.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        {"mlp": mlp_store, "bert": bert_store}[name](base)
    return store
