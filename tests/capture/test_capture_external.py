"""Activation files written by other frameworks: layout, discovery and errors."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from gramlin_analyze.capture import discover_activation_files, read_activation_file
from gramlin_analyze.errors import CheckpointFormatError, StepDiscoveryError, UsageError


def _layers(rng):
    return {
        "encoder.fc1": (rng.normal(size=(10, 4)), rng.normal(size=(10, 4))),
        "block1/dense": (
            rng.normal(size=(10, 3)).astype(np.float32),
            rng.normal(size=(10, 3)).astype(np.float32),
        ),
    }


def _arrays(layers):
    out = {}
    for name, (h, g) in layers.items():
        out[f"{name}/input"] = h
        out[f"{name}/input_grad"] = g
    return out


def test_discover_and_read(rng, tmp_path):
    layers = _layers(rng)
    np.savez(tmp_path / "step_000100.npz", **_arrays(layers))
    save_file(_arrays(layers), str(tmp_path / "step_20.safetensors"))
    (tmp_path / "README.txt").write_text("ignored")
    (tmp_path / "step_7.h5").write_bytes(b"ignored")
    found = discover_activation_files(tmp_path)
    assert list(found) == [20, 100]
    for path in found.values():
        data = read_activation_file(path)
        assert set(data) == {"encoder.fc1", "block1.dense"}  # '/' inside a layer name reads as '.'
        np.testing.assert_array_equal(data["encoder.fc1"]["input"], layers["encoder.fc1"][0])
        np.testing.assert_array_equal(data["block1.dense"]["input_grad"], layers["block1/dense"][1])


def test_discovery_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        discover_activation_files(tmp_path / "nope")
    with pytest.raises(StepDiscoveryError, match="no step_<int>.npz"):
        discover_activation_files(tmp_path)
    np.savez(tmp_path / "step_5.npz", a=np.ones(1))
    np.savez(tmp_path / "step_005.npz", a=np.ones(1))
    with pytest.raises(StepDiscoveryError, match="two files for step 5"):
        discover_activation_files(tmp_path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"fc/input": np.ones((3, 2))}, "no 'input_grad' array"),
        (
            {"fc/input": np.ones((3, 2)), "fc/input_grad": np.ones((3, 4))},
            "input_grad of shape (3, 4)",
        ),
        (
            {"fc/input": np.ones((3, 2), int), "fc/input_grad": np.ones((3, 2))},
            "must be floating point",
        ),
        ({"fc/input": np.ones((3, 2)), "fc/grad": np.ones((3, 2))}, "'fc/grad' is not named"),
        (
            {"fc/input": np.ones((3, 2, 2)), "fc/input_grad": np.ones((3, 2, 2))},
            "one row per sample",
        ),
    ],
    ids=["missing-half", "shape", "non-numeric", "bad-role", "rank"],
)
def test_read_errors(tmp_path, arrays, message):
    path = tmp_path / "step_1.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointFormatError) as err:
        read_activation_file(path)
    assert "step_1.npz" in str(err.value) and message in str(err.value)
