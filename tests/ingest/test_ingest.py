"""ingest: real checkpoints -> real Zarr store; incremental, resumable, one writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file

from gramlin_analyze.cli import main
from gramlin_analyze.errors import StoreLockedError
from gramlin_analyze.ingest import ingest
from gramlin_analyze.store import GramlinStore
from gramlin_analyze.store.validate import validate_store
from tests.trajectory import write_trajectory


def open_tree(store) -> xr.DataTree:
    """Open as a notebook user would: no gramlin import needed, and no warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_datatree(str(store), engine="zarr")


def assert_store_matches(store, expected: dict[int, dict[str, np.ndarray]]):
    tree = open_tree(store)
    steps = tree["steps"]
    assert list(steps["step"].values) == sorted(expected)
    assert set(steps["status"].values) == {"ok"}
    for layer in ("fc1", "fc2"):
        ds = tree[f"layers/{layer}"]
        assert ds["weight"].dims == ("step", "out", "in")
        for step, arrays in expected.items():
            np.testing.assert_array_equal(
                ds["weight"].sel(step=step).values, arrays[f"{layer}.weight"]
            )
            np.testing.assert_array_equal(ds["bias"].sel(step=step).values, arrays[f"{layer}.bias"])


def test_ingest_two_formats_opens_without_gramlin(tmp_path):
    expected = write_trajectory(tmp_path / "run", [0, 10, 20, 30])
    report = ingest(tmp_path / "run", tmp_path / "s.zarr")
    assert report.ingested == [0, 10, 20, 30] and not report.failed
    assert_store_matches(tmp_path / "s.zarr", expected)
    tree = open_tree(tmp_path / "s.zarr")
    assert tree.attrs["gramlin_schema_version"] == "1.0"
    assert set(tree["steps"]["format"].values) == {"safetensors", "torch"}
    assert validate_store(tmp_path / "s.zarr") == []


def test_incremental_only_new_and_changed(tmp_path):
    run = tmp_path / "run"
    expected = write_trajectory(run, [0, 20, 40])
    ingest(run, tmp_path / "s.zarr")
    again = ingest(run, tmp_path / "s.zarr")
    assert again.ingested == [] and again.skipped == [0, 20, 40]
    # A step in the middle and one at the end: step stays sorted and unique.
    expected |= write_trajectory(run, [10, 50], formats=("safetensors",), seed=0)
    rep = ingest(run, tmp_path / "s.zarr")
    assert rep.ingested == [10, 50]
    assert_store_matches(tmp_path / "s.zarr", expected)
    # A changed checkpoint (same name, new content) is re-read.
    changed = write_trajectory(tmp_path / "other", [0, 20], seed=7)
    (run / "ckpt_000020.pt").write_bytes((tmp_path / "other" / "ckpt_000020.pt").read_bytes())
    expected[20] = changed[20]
    rep = ingest(run, tmp_path / "s.zarr")
    assert rep.ingested == [20]
    assert_store_matches(tmp_path / "s.zarr", expected)
    assert validate_store(tmp_path / "s.zarr") == []


def test_second_writer_is_refused(tmp_path):
    write_trajectory(tmp_path / "run", [0, 1])
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    holder = GramlinStore(store, mode="a").lock().acquire()
    try:
        with pytest.raises(StoreLockedError, match="another ingest"):
            ingest(tmp_path / "run", store)
        assert main(["ingest", str(tmp_path / "run"), "--store", str(store), "-q"]) == 2
    finally:
        holder.release()
    assert_store_matches(store, write_trajectory(tmp_path / "again", [0, 1]))


def test_bad_inputs_fail_alone(tmp_path, capsys):
    run = tmp_path / "run"
    expected = write_trajectory(run, [0, 1, 2])
    (run / "step_00003.safetensors").write_bytes(
        (run / "step_00000.safetensors").read_bytes()[:100]
    )
    (run / "step_00004.safetensors").write_bytes(np.random.default_rng(1).bytes(5000))
    (run / "step_00005.pt").write_bytes(b"")
    odd = {
        "fc1.weight": torch.randn(7, 5),
        "fc1.bias": torch.randn(7),
        "fc2.weight": torch.randn(3, 7),
        "fc2.bias": torch.randn(3),
    }
    save_file(odd, str(run / "step_00006.safetensors"))
    nan = write_trajectory(tmp_path / "n", [7], formats=("safetensors",))[7]
    nan_t = {k: torch.from_numpy(v.copy()) for k, v in nan.items()}
    nan_t["fc1.weight"][0, 0] = float("nan")
    nan_t["fc2.weight"][1, 2] = float("inf")
    save_file(nan_t, str(run / "step_00007.safetensors"))

    code = main(["ingest", str(run), "--store", str(tmp_path / "s.zarr"), "-q"])
    assert code == 1
    err = capsys.readouterr().err
    for name in ("step_00003", "step_00004", "step_00005", "step_00006"):
        assert name in err
    assert "shape" in err
    tree = open_tree(tmp_path / "s.zarr")
    st = tree["steps"].to_dataset()
    status = dict(zip(st["step"].values.tolist(), st["status"].values.tolist(), strict=True))
    assert status == {
        0: "ok",
        1: "ok",
        2: "ok",
        3: "failed",
        4: "failed",
        5: "failed",
        6: "failed",
        7: "ok",
    }
    for s in (3, 4, 5, 6):
        assert str(st["error"].sel(step=s).values)
    assert int(st["nonfinite"].sel(step=7)) == 2
    for layer in ("fc1", "fc2"):  # per layer: one NaN/Inf each at step 7, none before
        counts = tree[f"layers/{layer}"]["nonfinite"]
        assert int(counts.sel(step=7)) == 1 and [int(counts.sel(step=s)) for s in (0, 1, 2)] == [
            0,
            0,
            0,
        ]
    w = tree["layers/fc1"]["weight"].sel(step=7).values
    assert np.isnan(w[0, 0]) and np.isfinite(w[1:]).all()
    for s in (0, 1, 2):
        np.testing.assert_array_equal(
            tree["layers/fc2"]["weight"].sel(step=s).values, expected[s]["fc2.weight"]
        )
    assert validate_store(tmp_path / "s.zarr") == []


def test_hostile_pickle_executes_nothing(tmp_path):
    run = tmp_path / "run"
    write_trajectory(run, [0])
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"fc1.weight": Payload()}}, run / "step_00001.pt")
    report = ingest(run, tmp_path / "s.zarr")
    assert 1 in report.failed and "step_00001.pt" in report.failed[1]
    assert not marker.exists()


def test_layer_globs_and_wrapper_prefix(tmp_path):
    expected = write_trajectory(tmp_path / "run", [0, 5], prefix="module.")
    ingest(tmp_path / "run", tmp_path / "s.zarr", layers=["fc*"], exclude=["fc2"])
    tree = open_tree(tmp_path / "s.zarr")
    assert list(tree["layers"].children) == ["fc1"]
    np.testing.assert_array_equal(
        tree["layers/fc1"]["weight"].sel(step=5).values, expected[5]["fc1.weight"]
    )
    assert tree["layers/fc1"].attrs["param_name"] == "module.fc1.weight"


def test_conv_bf16_and_processes(tmp_path):
    run = tmp_path / "run"
    shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "head.weight": (2, 16)}
    expected = write_trajectory(run, [0, 1, 2], formats=("safetensors",), shapes=shapes)
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in expected[2].items()}
    save_file(sd, str(run / "step_00002.safetensors"))
    ingest(run, tmp_path / "s.zarr", workers=2)
    tree = open_tree(tmp_path / "s.zarr")
    conv = tree["layers/conv"]
    assert conv["weight"].shape == (3, 4, 27)
    assert conv.attrs["kind"] == "conv" and conv.attrs["kernel_shape"] == [3, 3, 3]
    np.testing.assert_array_equal(
        conv["weight"].sel(step=1).values.reshape(4, 3, 3, 3), expected[1]["conv.weight"]
    )
    bf = torch.from_numpy(expected[2]["conv.weight"]).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(conv["weight"].sel(step=2).values.reshape(4, 3, 3, 3), bf)
    assert conv["weight"].dtype == np.float32


_KILL_SCRIPT = """
import sys, time
from gramlin_analyze.ingest import driver
orig = driver.ingest_one
def slow(*a, **k):
    time.sleep(0.15)
    return orig(*a, **k)
driver.ingest_one = slow
from gramlin_analyze.cli import main
sys.exit(main(["ingest", sys.argv[1], "--store", sys.argv[2], "--threads", "1", "-q"]))
"""


def test_kill_9_then_resume_gives_identical_arrays(tmp_path):
    run = tmp_path / "run"
    expected = write_trajectory(run, list(range(0, 24)))
    store = tmp_path / "s.zarr"
    rng = np.random.default_rng(3)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(run), str(store)], env=env)
        time.sleep(float(rng.uniform(2.0, 6.0)))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() in (0, -signal.SIGKILL)  # killed, or done by then: never an error
        if (store / "zarr.json").exists():
            if "consolidated_metadata" in (store / "zarr.json").read_text():
                open_tree(store)  # opens at any moment, without a warning
            else:  # killed while creating the store: it opens (zarr warns: not consolidated)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    xr.open_datatree(str(store), engine="zarr")
            assert validate_store(store) == []
    report = ingest(run, store)
    assert not report.failed
    assert_store_matches(store, expected)
    assert validate_store(store) == []


def test_unchanged_checkpoints_are_not_hashed_again(tmp_path, monkeypatch):
    """The manifest keeps each checkpoint's file stats with its fingerprint: an
    ingest hashes only files whose size, mtime or inode changed. A checkpoint
    rewritten in place (same size, new content) is hashed and re-read; a copied
    run is hashed once, found unchanged, and its new paths are remembered."""
    import shutil

    from gramlin_analyze.io import discovery

    hashed: list[str] = []
    real = discovery.fingerprint_files

    def counting(files, root=None):
        hashed.extend(f.name for f in files)
        return real(files, root)

    monkeypatch.setattr(discovery, "fingerprint_files", counting)
    run, store = tmp_path / "run", tmp_path / "s.zarr"
    expected = write_trajectory(run, [0, 10, 20], formats=("safetensors",))
    assert ingest(run, store).ingested == [0, 10, 20]
    assert len(hashed) == 3
    hashed.clear()
    assert ingest(run, store).skipped == [0, 10, 20]
    assert hashed == []

    # Same size, new values: the stats change, so it is hashed and re-read.
    new = {k: v + 1 for k, v in expected[10].items()}
    time.sleep(0.01)
    save_file({k: torch.from_numpy(v) for k, v in new.items()}, str(run / "step_00010.safetensors"))
    rep = ingest(run, store)
    assert hashed == ["step_00010.safetensors"] and rep.ingested == [10]
    w = xr.open_datatree(str(store), engine="zarr")["layers/fc1"]["weight"].sel(step=10).values
    np.testing.assert_array_equal(w, new["fc1.weight"])

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    hashed.clear()
    assert ingest(copy, store).skipped == [0, 10, 20]  # same content: nothing re-read
    assert len(hashed) == 3
    hashed.clear()
    assert ingest(copy, store).skipped == [0, 10, 20]
    assert hashed == []
    paths = GramlinStore(store).manifest()["source_path"]
    assert all(str(copy) in p for p in paths)
    assert validate_store(store) == []


def test_a_store_from_before_stat_key_gains_the_column(tmp_path):
    """Stores written before a manifest field existed get it on the next ingest
    (their rows keep their data; the new column starts empty, then fills)."""
    import shutil

    run, store = tmp_path / "run", tmp_path / "s.zarr"
    write_trajectory(run, [0, 10])
    ingest(run, store)
    shutil.rmtree(store / "steps" / "stat_key")  # as an older version left it
    GramlinStore(store, mode="a").consolidate()
    assert "stat_key" not in GramlinStore(store).manifest()
    rep = ingest(run, store)
    assert rep.skipped == [0, 10] and rep.ingested == []
    man = GramlinStore(store).manifest()
    assert all(len(k) == 24 for k in man["stat_key"])  # filled for the unchanged rows
    assert validate_store(store) == []
