"""Nothing stored is lost to a wrong command.

Every case goes through the real CLI on checkpoints written by torch.save /
safetensors' save_file. A refused command exits 2 with one line naming the
store or the file at fault, and leaves no new store, or an existing one
byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file

from gramlin_analyze.cli import main
from gramlin_analyze.store.core import GramlinStore
from gramlin_analyze.store.validate import validate_store
from tests.trajectory import write_trajectory

STEPS = [0, 100, 200, 300, 400, 500, 600, 700]
#: the state dict of tests.capture_models.build_mlp: Linear(5, 7), Linear(7, 6), Linear(6, 3)
MLP = {
    "0.weight": (7, 5),
    "0.bias": (7,),
    "2.weight": (6, 7),
    "2.bias": (6,),
    "4.weight": (3, 6),
    "4.bias": (3,),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by its SHA-256 (and every folder)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """``gramlin-analyze ARGS -q``: the exit code and the lines it wrote to stderr."""
    capsys.readouterr()
    code = main([*map(str, args), "-q"])
    return code, capsys.readouterr().err.strip().splitlines()


def statuses(store: Path) -> dict[int, str]:
    man = GramlinStore(store).manifest()
    return dict(zip(man["step"].tolist(), man["status"].tolist(), strict=True))


def probe_file(path: Path, *, n: int = 12, labels=None, inputs=None) -> Path:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, 5)).astype(np.float32) if inputs is None else inputs
    y = np.arange(n) % 3 if labels is None else labels
    np.savez(path, inputs=x, labels=y)
    return path


# -- a store holds one run ---------------------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "steps"),
    [
        ({"0.weight": (7, 5), "0.bias": (7,), "2.weight": (3, 7), "2.bias": (3,)}, STEPS),
        ({"fc1.weight": (7, 5), "fc1.bias": (7,), "fc2.weight": (3, 7), "fc2.bias": (3,)}, STEPS),
        ({"0.weight": (7, 5), "0.bias": (7,), "2.weight": (3, 7), "2.bias": (3,)}, [800, 900]),
    ],
    ids=["other-layers", "other-shapes", "other-model-later-steps"],
)
def test_a_directory_of_another_model_is_refused_and_the_store_kept(tmp_path, shapes, steps):
    """`ingest OTHER_DIR --store existing.zarr` turned eight ok steps into failed."""
    run, other, store = tmp_path / "run", tmp_path / "other", tmp_path / "s.zarr"
    expected = write_trajectory(run, STEPS)
    write_trajectory(other, steps, shapes=shapes)
    ok = subprocess.run(
        [sys.executable, "-m", "gramlin_analyze", "ingest", str(run), "--store", str(store), "-q"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    before = snapshot(store)

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gramlin_analyze",
            "ingest",
            str(other),
            "--store",
            str(store),
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    # which store holds which run, and what the other directory holds
    assert str(store) in lines[0] and str(run) in lines[0] and str(other) in lines[0]
    assert "fc1 6x5" in lines[0] and "7x5" in lines[0] and "--store" in lines[0]
    assert snapshot(store) == before
    assert statuses(store) == dict.fromkeys(STEPS, "ok")
    tree = xr.open_datatree(str(store), engine="zarr")
    np.testing.assert_array_equal(
        tree["layers/fc1"]["weight"].sel(step=700).values, expected[700]["fc1.weight"]
    )
    assert validate_store(store) == []


def test_another_run_of_the_same_model_is_refused(tmp_path, monkeypatch, capsys):
    """Same layers and shapes, another directory, other weights at every stored step: another run."""
    monkeypatch.chdir(tmp_path)
    write_trajectory(tmp_path / "run", STEPS[:4])
    assert cli(capsys, "ingest", "run", "--store", "s.zarr") == (0, [])
    store = tmp_path / "s.zarr"
    assert xr.open_datatree(str(store), engine="zarr").attrs["source"] == str(
        tmp_path / "run"
    )  # absolute
    write_trajectory(tmp_path / "seed1", STEPS[:4], seed=1)
    before = snapshot(store)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded source means the same from here
    code, err = cli(capsys, "ingest", tmp_path / "seed1", "--store", store)
    assert code == 2 and len(err) == 1
    assert (
        str(store) in err[0]
        and str(tmp_path / "run") in err[0]
        and str(tmp_path / "seed1") in err[0]
    )
    assert snapshot(store) == before

    # The same run moved, with one checkpoint rewritten: its other checkpoints are the stored ones.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)
    changed = write_trajectory(tmp_path / "tmp", [100], formats=("torch",), seed=3)
    shutil.copy(tmp_path / "tmp" / "ckpt_000100.pt", moved / "ckpt_000100.pt")
    assert cli(capsys, "ingest", moved, "--store", store) == (0, [])
    # A run retrained in place (the store's own directory) replaces its steps.
    retrained = write_trajectory(tmp_path / "run", STEPS[:4], seed=2)
    assert cli(capsys, "ingest", tmp_path / "run", "--store", store) == (0, [])
    tree = xr.open_datatree(str(store), engine="zarr")
    np.testing.assert_array_equal(
        tree["layers/fc2"]["weight"].sel(step=300).values, retrained[300]["fc2.weight"]
    )
    assert not np.array_equal(changed[100]["fc2.weight"], retrained[100]["fc2.weight"])
    assert statuses(store) == dict.fromkeys(STEPS[:4], "ok")


def test_an_ok_step_is_not_given_up_for_a_bad_new_checkpoint(tmp_path, capsys):
    """A stored step whose checkpoint became unreadable or another model's keeps its data, still ok."""
    run, store = tmp_path / "run", tmp_path / "s.zarr"
    expected = write_trajectory(run, [0, 1, 2, 3], formats=("safetensors",))
    assert cli(capsys, "ingest", run, "--store", store) == (0, [])
    good = (run / "step_00001.safetensors").read_bytes()
    (run / "step_00001.safetensors").write_bytes(good[:100])
    odd = {
        "fc1.weight": torch.randn(9, 5),
        "fc1.bias": torch.randn(9),
        "fc2.weight": torch.randn(3, 9),
        "fc2.bias": torch.randn(3),
    }
    save_file(odd, str(run / "step_00002.safetensors"))
    write_trajectory(run, [4], formats=("safetensors",))

    code, err = cli(capsys, "ingest", run, "--store", store)
    assert code == 1 and len(err) == 2
    assert "step_00001.safetensors" in err[0] and "step_00002.safetensors" in err[1]
    assert all(f"{store} keeps step" in line for line in err)
    assert statuses(store) == {0: "ok", 1: "ok", 2: "ok", 3: "ok", 4: "ok"}
    tree = xr.open_datatree(str(store), engine="zarr")
    for step in (1, 2):
        np.testing.assert_array_equal(
            tree["layers/fc1"]["weight"].sel(step=step).values, expected[step]["fc1.weight"]
        )
    assert validate_store(store) == []


# -- usage errors are found before the store is created or changed ----------------------


def _capture_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_trajectory(run, [0, 1, 2], formats=("safetensors",), shapes=MLP)
    return run


def _case(name: str, tmp_path: Path) -> tuple[list, str, list | None]:
    """(flags, text the error line names, the corrected flags or None) of one usage error."""
    good = str(probe_file(tmp_path / "good.npz"))
    mlp = ["--mlp-activation", "tanh"]
    if name == "missing-probe":
        return ["--probe", tmp_path / "missing.npz", *mlp], "missing.npz", ["--probe", good, *mlp]
    if name == "nan-probe":
        x = np.random.default_rng(1).standard_normal((12, 5)).astype(np.float32)
        x[3, 2] = np.nan
        return (
            ["--probe", probe_file(tmp_path / "nan.npz", inputs=x), *mlp],
            "nan.npz",
            ["--probe", good, *mlp],
        )
    if name == "probe-of-other-inputs":
        x = np.zeros((12, 4), np.float32)
        return (
            ["--probe", probe_file(tmp_path / "four.npz", inputs=x), *mlp],
            "four.npz",
            ["--probe", good, *mlp],
        )
    if name == "labels-beyond-outputs":
        bad = probe_file(tmp_path / "labels.npz", labels=np.arange(12) % 5)
        return ["--probe", bad, *mlp], "labels.npz", ["--probe", good, *mlp]
    if name == "unknown-loss":
        return (
            ["--probe", good, *mlp, "--loss", "no_such_loss"],
            "no_such_loss",
            ["--probe", good, *mlp, "--loss", "mse"],
        )
    if name == "loss-that-does-not-import":
        return (
            ["--probe", good, *mlp, "--loss", "tests.no_such_module:loss"],
            "no_such_module",
            None,
        )
    if name == "factory-that-does-not-import":
        return (
            ["--probe", good, "--model", "tests.no_such_module:build"],
            "no_such_module",
            ["--probe", good, "--model", "tests.capture_models:build_mlp"],
        )
    if name == "layers-matching-nothing":
        return ["--layers", "nothing*"], "nothing*", ["--layers", "2", "4"]
    if name == "activations-of-other-layers":
        (tmp_path / "acts").mkdir()
        h = np.zeros((12, 5), np.float32)
        np.savez(tmp_path / "acts" / "step_0.npz", **{"zz/input": h, "zz/input_grad": h})
        return ["--activations", tmp_path / "acts", "--probe", good], "step_0.npz", None
    raise AssertionError(name)


NEW_STORE_CASES = [
    "missing-probe",
    "nan-probe",
    "probe-of-other-inputs",
    "labels-beyond-outputs",
    "unknown-loss",
    "loss-that-does-not-import",
    "factory-that-does-not-import",
    "layers-matching-nothing",
    "activations-of-other-layers",
]


@pytest.mark.parametrize("name", NEW_STORE_CASES)
def test_a_usage_error_leaves_no_new_store(tmp_path, capsys, name):
    run, store = _capture_run(tmp_path), tmp_path / "s.zarr"
    flags, names, corrected = _case(name, tmp_path)
    code, err = cli(capsys, "ingest", run, "--store", store, *flags)
    assert code == 2
    assert len(err) == 1 and names in err[0], err
    assert not store.exists()
    if corrected is not None:  # nothing of the wrong command is remembered
        assert cli(capsys, "ingest", run, "--store", store, *corrected) == (0, [])
        assert statuses(store) == {0: "ok", 1: "ok", 2: "ok"}


def test_checkpoints_without_a_matrix_leave_no_new_store(tmp_path, capsys):
    run, store = tmp_path / "vectors", tmp_path / "s.zarr"
    write_trajectory(
        run,
        [0, 1],
        formats=("safetensors", "torch"),
        shapes={"norm.weight": (6,), "norm.bias": (6,)},
    )
    code, err = cli(capsys, "ingest", run, "--store", store)
    assert code == 2 and len(err) == 1 and str(run) in err[0] and "two or more dimensions" in err[0]
    assert not store.exists()


@pytest.mark.parametrize("name", ["labels-beyond-outputs", "unknown-loss"])
def test_a_usage_error_leaves_an_existing_store_byte_identical(tmp_path, capsys, name):
    """Adding capture to a weights store with a wrong setup changed nothing, and the
    corrected command is not refused for settings the wrong one left behind."""
    run, store = _capture_run(tmp_path), tmp_path / "s.zarr"
    assert cli(capsys, "ingest", run, "--store", store) == (0, [])
    before = snapshot(store)
    flags, names, corrected = _case(name, tmp_path)
    code, err = cli(capsys, "ingest", run, "--store", store, *flags)
    assert code == 2 and len(err) == 1 and names in err[0], err
    assert snapshot(store) == before
    assert cli(capsys, "ingest", run, "--store", store, *corrected) == (0, [])
    tree = xr.open_datatree(str(store), engine="zarr")
    assert tree["layers/2"]["input"].shape == (3, 12, 7)
    assert np.isfinite(tree["layers/2"]["input_grad"].values).all()
    assert statuses(store) == {0: "ok", 1: "ok", 2: "ok"}
    assert validate_store(store) == []


def test_refusals_name_the_store_through_a_relative_path(tmp_path, monkeypatch, capsys):
    """A store made with relative paths records where its run is, so the refusal
    names real directories from anywhere."""
    monkeypatch.chdir(tmp_path)
    write_trajectory(Path("run"), [0, 1])
    write_trajectory(Path("other"), [0, 1], shapes={"w.weight": (2, 2)})
    assert cli(capsys, "ingest", "run", "--store", "s.zarr") == (0, [])
    before = snapshot(tmp_path / "s.zarr")
    code, err = cli(
        capsys, "ingest", "other", "--store", os.path.join("..", tmp_path.name, "s.zarr")
    )
    assert code == 2 and len(err) == 1
    assert f"from {tmp_path / 'run'} (2 layers: fc1 6x5, fc2 3x6)" in err[0] and "w 2x2" in err[0]
    assert snapshot(tmp_path / "s.zarr") == before
