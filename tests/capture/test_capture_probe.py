"""Probe files: .npz, .safetensors and .pt read the same; malformed ones say what to fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from gramlin_analyze.capture import load_probe, make_probe, probe_summary
from gramlin_analyze.errors import ProbeError, UnsafeCheckpointError


def _arrays(rng, n=12):
    return {
        "inputs": rng.normal(size=(n, 3, 4)).astype(np.float32),
        "labels": rng.integers(0, 5, n).astype(np.int64),
        "sample_id": np.arange(100, 100 + n, dtype=np.int64),
    }


def _save(fmt, path, arrays):
    if fmt == "npz":
        np.savez(path, **arrays)
    elif fmt == "safetensors":
        save_numpy(arrays, str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pt"])
def test_load_probe_each_format(rng, tmp_path, fmt):
    arrays = _arrays(rng)
    path = tmp_path / f"probe.{fmt}"
    _save(fmt, path, arrays)
    probe = load_probe(path)
    np.testing.assert_array_equal(probe.inputs, arrays["inputs"])
    np.testing.assert_array_equal(probe.labels, arrays["labels"])
    np.testing.assert_array_equal(probe.sample_id, arrays["sample_id"])
    assert probe.targets is None and probe.n_samples == 12 and probe.path == path
    assert probe.target_kind == "labels" and probe.y is probe.labels
    # Same data, same fingerprint, whatever the file format.
    assert probe.fingerprint == make_probe(**{k: v for k, v in arrays.items()}).fingerprint


def test_regression_targets_and_bfloat16(rng, tmp_path):
    inputs = torch.from_numpy(rng.normal(size=(6, 4))).to(torch.bfloat16)
    targets = torch.from_numpy(rng.normal(size=(6, 2)).astype(np.float32))
    path = tmp_path / "probe.safetensors"
    save_torch({"inputs": inputs, "targets": targets}, str(path))
    probe = load_probe(path)
    assert probe.inputs.dtype == np.float32 and probe.labels is None
    np.testing.assert_array_equal(probe.inputs, inputs.float().numpy())
    assert probe.target_kind == "targets"


def test_fingerprint_changes_with_data(rng):
    arrays = _arrays(rng)
    a = make_probe(**arrays)
    arrays["labels"] = arrays["labels"].copy()
    arrays["labels"][0] = (arrays["labels"][0] + 1) % 5
    assert make_probe(**arrays).fingerprint != a.fingerprint


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("labels"), "exactly one of 'labels'"),
        (lambda a: a.update(targets=np.ones((12, 1), np.float32)), "exactly one of 'labels'"),
        (lambda a: a.update(labels=a["labels"][:10]), "'labels' has 10"),
        (lambda a: a.update(sample_id=np.arange(11)), "'sample_id' has 11"),
        (lambda a: a.pop("inputs"), "store the model inputs under the name 'inputs'"),
        (lambda a: a.update(label=a["labels"]), "rename or drop the others"),
        (lambda a: a.update(labels=a["labels"].astype(np.float32)), "integer class indices"),
        (lambda a: a.update(inputs=np.ones(12, np.float32)), "at least one feature axis"),
    ],
    ids=[
        "no-labels",
        "both",
        "short-labels",
        "short-ids",
        "no-inputs",
        "typo",
        "float-labels",
        "1d-inputs",
    ],
)
def test_malformed_probe_files(rng, tmp_path, change, message):
    arrays = _arrays(rng)
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ProbeError) as err:
        load_probe(path)
    assert "bad.npz" in str(err.value)
    assert message in str(err.value)


def test_bad_values_and_files(rng, tmp_path):
    arrays = _arrays(rng)
    arrays["inputs"][3, 0, 0] = np.nan
    with pytest.raises(ProbeError, match="NaN or infinite"):
        make_probe(**arrays)
    arrays = _arrays(rng)
    arrays["labels"][0] = -1
    with pytest.raises(ProbeError, match="negative"):
        make_probe(**arrays)
    with pytest.raises(ProbeError, match="does not exist"):
        load_probe(tmp_path / "missing.npz")
    with pytest.raises(ProbeError, match="unsupported suffix '.csv'"):
        load_probe(tmp_path / "probe.csv")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ProbeError, match="junk.npz"):
        load_probe(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", inputs=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ProbeError, match="without pickle"):
        load_probe(tmp_path / "obj.npz")


class _Custom:
    pass


def test_pt_needing_unpickling_is_refused(tmp_path):
    path = tmp_path / "probe.pt"
    torch.save(
        {"inputs": torch.ones(2, 2), "labels": torch.zeros(2, dtype=torch.long), "x": _Custom()},
        path,
    )
    with pytest.raises(UnsafeCheckpointError, match="probe.pt"):
        load_probe(path)


def test_summary_shape():
    summary = probe_summary({"inputs": np.ones((3, 2)), "sample_id": np.array(["a", "b", "c"])})
    assert summary == {
        "keys": ["inputs", "sample_id"],
        "shapes": {"inputs": [3, 2], "sample_id": [3]},
        "dtypes": {"inputs": "float64", "sample_id": "str"},
        "n_samples": 3,
    }
