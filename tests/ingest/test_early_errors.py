"""One early error: a probe or loss that does not fit the model is refused once, before any step
runs (exit 2, one line naming the file), and no /steps row is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from gramlin_analyze.cli import main
from tests.capture_models import build_mlp

FACTORY = "tests.capture_models:build_mlp"
N = 12


def _run(tmp_path, steps=(0, 1, 2)):
    run = tmp_path / "run"
    run.mkdir()
    model = build_mlp()
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * s)
        torch.save(model.state_dict(), run / f"step_{s}.pt")
    return run


def _x(rng, d=5):
    return rng.standard_normal((N, d)).astype(np.float32)


CASES = {
    # labels beyond the 3 outputs: found by one forward pass on the bounding samples
    "label-range": (lambda r: {"inputs": _x(r), "labels": r.integers(0, 9, N)}, [], "3 outputs"),
    "negative-labels": (
        lambda r: {"inputs": _x(r), "labels": r.integers(-2, 3, N)},
        [],
        "negative",
    ),
    "float-labels": (
        lambda r: {"inputs": _x(r), "labels": r.standard_normal(N)},
        [],
        "integer class indices",
    ),
    "unknown-keys": (
        lambda r: {"x": _x(r), "y": r.integers(0, 3, N)},
        [],
        "unknown arrays 'x', 'y' (probably 'x' -> 'inputs', 'y' -> 'labels')",
    ),
    "short-labels": (
        lambda r: {"inputs": _x(r), "labels": r.integers(0, 3, N - 1)},
        [],
        f"'labels' has {N - 1}",
    ),
    "input-width": (
        lambda r: {"inputs": _x(r, 4), "labels": r.integers(0, 3, N)},
        [],
        "in_features=5",
    ),
    "mse-target-shape": (
        lambda r: {"inputs": _x(r), "targets": r.standard_normal((N, 4))},
        ["--loss", "mse"],
        "mse needs targets of the outputs' shape",
    ),
    "ce-targets-1d": (
        lambda r: {"inputs": _x(r), "targets": r.standard_normal(N)},
        [],
        "store class indices as integer 'labels'",
    ),
    "loss-name": (
        lambda r: {"inputs": _x(r), "labels": r.integers(0, 3, N)},
        ["--loss", "cross_entropyy"],
        "unknown loss 'cross_entropyy'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_early_error_and_nothing_written(tmp_path, capsys, case):
    make, flags, message = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    run = _run(tmp_path)
    probe = tmp_path / "probe.npz"
    np.savez(probe, **make(rng))
    fresh = tmp_path / "fresh.zarr"
    capture = ["--probe", str(probe), "--model", FACTORY, *flags, "-q"]

    assert main(["ingest", str(run), "--store", str(fresh), *capture]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "Traceback" not in err[0] and "n_samples: 0" not in err[0]
    assert not fresh.exists()  # no store, so no /steps row
    if case not in ("label-range", "unknown-keys", "loss-name"):
        return
    # An existing store: its rows stay as they were, and no step is read again.
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(run), "--store", str(store), "-q"]) == 0
    before = xr.open_datatree(str(store), engine="zarr")["steps"].to_dataset().load()
    (run / "step_3.pt").write_bytes((run / "step_2.pt").read_bytes())
    assert main(["ingest", str(run), "--store", str(store), *capture]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    tree = xr.open_datatree(str(store), engine="zarr")
    after = tree["steps"].to_dataset()
    assert list(after["step"].values) == [0, 1, 2]
    assert list(after["status"].values) == ["ok"] * 3
    np.testing.assert_array_equal(after["fingerprint"].values, before["fingerprint"].values)
    assert "probe" not in tree.children
    assert all("input" not in tree["layers"][name] for name in tree["layers"].children)
