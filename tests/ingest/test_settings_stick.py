"""Capture settings that stick: stored resolved, the same file in any spelling is the same setting,
a later ingest needs no capture flags, and a flag that would change the capture is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gramlin_analyze.cli import main

MODEL_PY = """
import torch
from torch import nn


def build(config=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
"""


def _build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.fixture
def setup(tmp_path):
    """A project dir with model.py and probe.npz, a run with steps 0 and 1, and a store path."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "model.py").write_text(MODEL_PY)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    y = rng.integers(0, 3, 10)
    np.savez(proj / "probe.npz", inputs=x, labels=y)
    run = tmp_path / "run"
    run.mkdir()
    model = _build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for _ in range(4):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    for step in (0, 1):
        torch.save(states[step], run / f"step_{step}.pt")
    return proj, run, tmp_path / "s.zarr", x, y, states


def _add_step(run, states, step):
    torch.save(states[step], run / f"step_{step}.pt")


def _hidden_input(state, x):
    """Layer 2's input tanh(x W0^T + b0), in float64 NumPy."""
    w0 = state["0.weight"].double().numpy()
    b0 = state["0.bias"].double().numpy()
    return np.tanh(x.astype(np.float64) @ w0.T + b0)


def _check_captured(store, states, x, steps):
    tree = xr.open_datatree(str(store), engine="zarr")
    assert list(tree["steps"]["status"].values) == ["ok"] * len(steps)
    h0 = tree["layers"]["0"]["input"].values
    h2 = tree["layers"]["2"]["input"].values
    for i, s in enumerate(steps):
        np.testing.assert_array_equal(h0[i], x)
        np.testing.assert_allclose(h2[i], _hidden_input(states[s], x), rtol=1e-5, atol=1e-6)


def test_relative_setup_sticks_from_another_directory(setup, tmp_path, monkeypatch, capsys):
    proj, run, store, x, y, states = setup
    monkeypatch.chdir(proj)
    flags = ["--probe", "probe.npz", "--model", "model.py:build", "-q"]
    assert main(["ingest", str(run), "--store", str(store), *flags]) == 0
    config = json.loads(
        xr.open_datatree(str(store), engine="zarr")["probe"].attrs["capture_config"]
    )
    assert config["probe"] == str(proj / "probe.npz")
    assert config["model"] == f"{proj / 'model.py'}:build"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _add_step(run, states, 2)
    assert main(["ingest", str(run), "--store", str(store), "-q"]) == 0  # no capture flags
    # the same files spelled absolutely are the same setting
    _add_step(run, states, 3)
    absolute = ["--probe", str(proj / "probe.npz"), "--model", f"{proj}/./model.py:build", "-q"]
    assert main(["ingest", str(run), "--store", str(store), *absolute]) == 0
    assert capsys.readouterr().err == ""
    _check_captured(store, states, x, [0, 1, 2, 3])


def test_model_alone_reuses_the_stored_probe(setup, capsys):
    proj, run, store, x, y, states = setup
    model = ["--model", f"{proj}/model.py:build", "-q"]
    assert main(["ingest", str(run), "--store", str(store), *model]) == 2  # no probe anywhere
    assert "needs a probe set: pass --probe FILE" in capsys.readouterr().err
    assert not store.exists()
    assert (
        main(
            ["ingest", str(run), "--store", str(store), "--probe", str(proj / "probe.npz"), *model]
        )
        == 0
    )
    _add_step(run, states, 2)
    assert main(["ingest", str(run), "--store", str(store), *model]) == 0
    _check_captured(store, states, x, [0, 1, 2])


# zarr warns about a file in the store that is not a zarr node (the probe): harmless here
@pytest.mark.filterwarnings("ignore:Object at probe.npz is not recognized")
def test_probe_inside_the_store_moves_with_it(setup, tmp_path):
    proj, run, store, x, y, states = setup
    store.mkdir()
    shutil.copy(proj / "probe.npz", store / "probe.npz")
    flags = ["--probe", str(store / "probe.npz"), "--model", f"{proj}/model.py:build", "-q"]
    assert main(["ingest", str(run), "--store", str(store), *flags]) == 0
    config = json.loads(
        xr.open_datatree(str(store), engine="zarr")["probe"].attrs["capture_config"]
    )
    assert config["probe"] == "<store>/probe.npz"
    moved = tmp_path / "moved.zarr"
    shutil.move(store, moved)
    _add_step(run, states, 2)
    assert main(["ingest", str(run), "--store", str(moved), "-q"]) == 0
    _check_captured(moved, states, x, [0, 1, 2])


def test_capture_agop_on_a_store_without_it_is_refused(setup, capsys):
    proj, run, store, x, y, states = setup
    flags = ["--probe", str(proj / "probe.npz"), "--model", f"{proj}/model.py:build", "-q"]
    assert main(["ingest", str(run), "--store", str(store), *flags]) == 0
    before = xr.open_datatree(str(store), engine="zarr")["steps"]["fingerprint"].values
    _add_step(run, states, 2)
    assert main(["ingest", str(run), "--store", str(store), *flags, "--capture-agop"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without --capture-agop" in err[0] and "new store" in err[0]
    tree = xr.open_datatree(str(store), engine="zarr")
    np.testing.assert_array_equal(tree["steps"]["fingerprint"].values, before)  # step 2 not added
    assert "agop" not in tree["layers"]["0"]
    # analyze's hint says what works: a new store (or a weights-only one)
    assert main(["analyze", str(store), "--metrics", "nfa", "-q"]) == 2
    assert "into a new store" in capsys.readouterr().err
    # a weights-only store takes --capture-agop with its first capture
    weights = store.parent / "w.zarr"
    assert main(["ingest", str(run), "--store", str(weights), "-q"]) == 0
    assert main(["ingest", str(run), "--store", str(weights), *flags, "--capture-agop"]) == 0
    assert "agop" in xr.open_datatree(str(weights), engine="zarr")["layers"]["0"]
