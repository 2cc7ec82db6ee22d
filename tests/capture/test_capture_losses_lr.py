"""Losses (reductions, one-hot MSE, custom) and learning-rate resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gramlin_analyze.capture import load_lr_schedule, resolve_loss, resolve_lr
from gramlin_analyze.errors import ModelError, ProbeError, UsageError


def test_mse_on_labels_uses_one_hot_and_batches_sum_to_the_full_loss(rng):
    out = torch.from_numpy(rng.normal(size=(10, 4)))
    labels = torch.from_numpy(rng.integers(0, 4, 10))
    onehot = np.eye(4)[labels.numpy()]
    expected = ((out.numpy() - onehot) ** 2).mean()  # torch's mean: over all N * C elements
    loss = resolve_loss("mse", reduction="mean")
    assert loss(out, labels).item() == pytest.approx(expected, rel=1e-12)
    shares = [loss.batch_term(out[a : a + 3], labels[a : a + 3], 10) for a in range(0, 10, 3)]
    assert sum(s.item() for s in shares) == pytest.approx(expected, rel=1e-12)
    total = resolve_loss("mse", reduction="sum")
    assert total(out, labels).item() == pytest.approx(((out.numpy() - onehot) ** 2).sum())


def test_cross_entropy_and_bce(rng):
    out = torch.from_numpy(rng.normal(size=(6, 3)))
    labels = torch.from_numpy(rng.integers(0, 3, 6))
    ce = resolve_loss("cross_entropy")
    torch.testing.assert_close(ce(out, labels), F.cross_entropy(out, labels))
    bce = resolve_loss("bce", reduction="sum")
    ref = F.binary_cross_entropy_with_logits(out, F.one_hot(labels, 3).double(), reduction="sum")
    torch.testing.assert_close(bce(out, labels), ref)
    binary = torch.from_numpy(rng.normal(size=(6, 1)))
    ref = F.binary_cross_entropy_with_logits(binary, (labels % 2).double().unsqueeze(1))
    torch.testing.assert_close(resolve_loss("bce")(binary, labels % 2), ref)
    with pytest.raises(ProbeError, match="targets of the outputs' shape"):
        resolve_loss("mse")(out, torch.ones(6, 2, dtype=torch.float64))


def test_custom_losses(rng):
    out = torch.from_numpy(rng.normal(size=(5, 2)))
    target = torch.from_numpy(rng.normal(size=(5, 2)))
    huber = resolve_loss("torch.nn.functional:huber_loss")
    torch.testing.assert_close(huber(out, target), F.huber_loss(out, target))
    no_reduction = resolve_loss("torch:dist")
    with pytest.raises(ModelError, match="reduction"):
        no_reduction(out, target)
    with pytest.raises(UsageError, match="unknown loss 'hinge'"):
        resolve_loss("hinge")
    with pytest.raises(UsageError, match="could not be imported"):
        resolve_loss("no_such_module_gramlin:fn")
    with pytest.raises(UsageError, match="reduction"):
        resolve_loss("mse", reduction="none")


def test_lr_schedule_csv_and_json(tmp_path):
    csv_path = tmp_path / "lr.csv"
    csv_path.write_text("step,lr\n100,0.05\n0,0.1\n500,0.01\n")
    schedule = load_lr_schedule(csv_path)
    assert schedule.steps == (0, 100, 500)
    assert [schedule.lr_at(s) for s in (0, 99, 100, 499, 500, 10**6)] == [
        0.1,
        0.1,
        0.05,
        0.05,
        0.01,
        0.01,
    ]
    for data in (
        [[10, 0.2], [20, 0.1]],
        [{"step": 10, "lr": 0.2}, {"step": 20, "lr": 0.1}],
        {"10": 0.2, "20": 0.1},
    ):
        path = tmp_path / "lr.json"
        path.write_text(json.dumps(data))
        schedule = load_lr_schedule(path)
        assert schedule(15) == 0.2 and schedule(20) == 0.1
        with pytest.raises(UsageError, match="step 5 precedes the first entry"):
            schedule.lr_at(5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,0.1\n0,0.2\n", "appears twice"),
        ("0,abc\n", "not numeric"),
        ("1.5,0.1\n", "integer"),
        ("0,-1\n", "non-negative"),
        ("0\n", "two columns"),
        ("", "no entries"),
    ],
)
def test_lr_schedule_errors(tmp_path, text, message):
    path = tmp_path / "lr.csv"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_lr_schedule(path)


def test_resolve_lr_priority(tmp_path):
    path = tmp_path / "lr.csv"
    path.write_text("0,0.3\n")
    schedule = load_lr_schedule(path)
    assert resolve_lr(7, meta_lr=0.1, schedule=schedule) == (0.3, f"schedule:{path}")
    assert resolve_lr(7, meta_lr=0.1, constant=0.2) == (0.2, "constant")
    assert resolve_lr(7, meta_lr=0.1) == (0.1, "checkpoint")
    assert resolve_lr(7) == (None, "unknown")
    with pytest.raises(UsageError, match="not both"):
        resolve_lr(7, constant=0.2, schedule=schedule)
