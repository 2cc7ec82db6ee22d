"""The paper's findings, in shape, on the digits trajectory (examples/digits).

Probe = the training set, as in the paper. Checked from the store's
``/metrics`` only, as a user's notebook would.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from examples.digits.run import LAYERS, run_pipeline  # noqa: E402

HIDDEN = ["fc2", "fc3", "fc4", "head"]  # inputs of these are the 4 hidden representations


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return run_pipeline(tmp_path_factory.mktemp("digits"), heldout=False)


def test_tl_rises_with_depth_and_beats_null(digits):
    tl = [digits["layers"][name]["tl"] for name in HIDDEN]
    assert all(b > a for a, b in zip(tl, tl[1:], strict=False)), tl
    for name in HIDDEN:
        r = digits["layers"][name]
        assert r["tl"] > 5 * r["tl_null"]


def test_last_hidden_tl_rises_over_training(digits):
    r = digits["layers"]["head"]
    assert r["tl"] > r["tl_first"] + 0.1


def test_interval_consistency_early(digits):
    for name in ("fc1", "fc2"):
        r = digits["layers"][name]
        assert r["interval_corr_early_min"] >= 0.9, (name, r)
    # Once the loss moves, minibatch noise (second order) dominates the Gram change.
    assert np.median([digits["layers"][n]["interval_corr_late"] for n in LAYERS]) < 0.9


def test_training_worked(digits):
    assert digits["test_accuracy"] > 0.9
    assert digits["train_loss"][-1] < 0.1 * digits["train_loss"][0]
