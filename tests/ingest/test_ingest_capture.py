"""ingest --probe --model: activations and gradients in the store, checked against autograd."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gramlin_analyze.capture.task import CaptureConfig
from gramlin_analyze.cli import main
from gramlin_analyze.errors import ProbeError
from gramlin_analyze.ingest import ingest
from gramlin_analyze.store.validate import validate_store
from tests.capture_models import build_cnn, build_mlp

FACTORY = "tests.capture_models:"


def _probe(path, x, y):
    np.savez(path, inputs=x, labels=y)
    return str(path)


def _trajectory(tmp_path, model, steps, x, y, *, lr=0.05, dtype=torch.float32):
    """Plain full-batch GD, torch.save of the state dict at each step in ``steps``."""
    run = tmp_path / "run"
    run.mkdir()
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x).to(dtype), torch.from_numpy(y)
    saved = {}
    for step in range(max(steps) + 1):
        if step in steps:
            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save(sd, run / f"step_{step:04d}.pt")
            saved[step] = sd
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return run, saved


def _autograd_wgrad(model, sd, x, y, layer_module):
    model.load_state_dict(sd)
    model.zero_grad()
    xt = torch.from_numpy(x).to(next(model.parameters()).dtype)
    nn.functional.cross_entropy(model(xt), torch.from_numpy(y)).backward()
    return layer_module.weight.detach(), layer_module.weight.grad.detach()


def test_mlp_identity_from_store(tmp_path):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    run, saved = _trajectory(tmp_path, build_mlp(), [0, 3, 6], x, y)
    probe = _probe(tmp_path / "probe.npz", x, y)
    code = main(
        [
            "ingest",
            str(run),
            "--store",
            str(tmp_path / "s.zarr"),
            "--probe",
            probe,
            "--model",
            FACTORY + "build_mlp",
            "--batch-size",
            "16",
            "--lr",
            "0.05",
            "-q",
        ]
    )
    assert code == 0
    tree = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr")
    assert sorted(tree["layers"].children) == ["0", "2", "4"]
    ref = build_mlp()
    for step in (0, 3, 6):
        for name, module in (("0", ref[0]), ("2", ref[2]), ("4", ref[4])):
            W, dW = _autograd_wgrad(ref, saved[step], x, y, module)
            ds = tree[f"layers/{name}"].sel(step=step)
            h = ds["input"].values.astype(np.float64)
            g = ds["input_grad"].values.astype(np.float64)
            lhs = g.T @ h  # sum_i g_i h_i^T
            rhs = W.double().numpy().T @ dW.double().numpy()  # W^T dL/dW
            assert np.linalg.norm(lhs - rhs) <= 1e-5 * np.linalg.norm(rhs)
    np.testing.assert_allclose(tree["steps"]["lr"].values, 0.05)
    assert tree["probe"].attrs["loss"] == "cross_entropy"
    np.testing.assert_array_equal(tree["probe"]["labels"].values, y)
    assert validate_store(tmp_path / "s.zarr") == []


def test_cnn_identity_with_im2col(tmp_path):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((10, 2, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 10)
    run, saved = _trajectory(tmp_path, build_cnn(), [0, 2], x, y)
    cfg = CaptureConfig(
        probe=_probe(tmp_path / "p.npz", x, y), model=FACTORY + "build_cnn", batch_size=4
    )
    report = ingest(run, tmp_path / "s.zarr", capture=cfg)
    assert not report.failed
    tree = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr")
    conv = tree["layers/conv"]
    assert conv["input"].shape == (2, 10 * 9, 18)  # 3x3 output positions, 2*3*3 patch
    ref = build_cnn()
    for step in (0, 2):
        W, dW = _autograd_wgrad(ref, saved[step], x, y, ref.conv)
        Wf, dWf = W.reshape(3, -1).double().numpy(), dW.reshape(3, -1).double().numpy()
        np.testing.assert_array_equal(
            conv["weight"].sel(step=step).values, W.reshape(3, -1).numpy()
        )
        h = conv["input"].sel(step=step).values.astype(np.float64)
        g = conv["input_grad"].sel(step=step).values.astype(np.float64)
        assert np.linalg.norm(g.T @ h - Wf.T @ dWf) <= 1e-5 * np.linalg.norm(Wf.T @ dWf)


def test_full_batch_gd_fle_from_store_only(tmp_path):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((30, 5))
    y = rng.integers(0, 3, 30)
    lr = 0.2
    steps = list(range(5))
    run, _ = _trajectory(tmp_path, build_mlp(), steps, x, y, lr=lr, dtype=torch.float64)
    cfg = CaptureConfig(
        probe=_probe(tmp_path / "p.npz", x, y),
        model=FACTORY + "build_mlp64",
        dtype="float64",
        batch_size=7,
    )
    assert not ingest(run, tmp_path / "s.zarr", capture=cfg, lr=lr).failed
    tree = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr")
    gamma = tree["steps"]["lr"].values
    for name in ("0", "2", "4"):
        ds = tree[f"layers/{name}"]
        W = ds["weight"].values
        for t in steps[:-1]:
            h, g, gm = ds["input"].values[t], ds["input_grad"].values[t], gamma[t]
            dgram = W[t + 1].T @ W[t + 1] - W[t].T @ W[t]
            hp = h - gm * g
            vcs = hp.T @ hp - h.T @ h
            G = (W[t] - W[t + 1]) / gm  # plain GD: W+ = W - gamma G
            second = gm**2 * (G.T @ G - g.T @ g)
            assert np.linalg.norm(dgram - vcs - second) <= 1e-10 * np.linalg.norm(dgram)


def test_incremental_capture_and_probe_guard(tmp_path):
    rng = np.random.default_rng(14)
    x = rng.standard_normal((20, 5)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    run, saved = _trajectory(tmp_path, build_mlp(), [0, 1, 2, 3], x, y)
    probe = _probe(tmp_path / "p.npz", x, y)
    (run / "step_0003.pt").rename(tmp_path / "later.pt")
    cfg = CaptureConfig(probe=probe, model=FACTORY + "build_mlp")
    assert ingest(run, tmp_path / "s.zarr", capture=cfg).ingested == [0, 1, 2]
    (tmp_path / "later.pt").rename(run / "step_0003.pt")
    # No capture flags: the store remembers how it was captured.
    rep = ingest(run, tmp_path / "s.zarr")
    assert rep.ingested == [3]
    tree = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr")
    assert np.isfinite(tree["layers/2"]["input_grad"].sel(step=3).values).all()
    other = _probe(tmp_path / "other.npz", x + 1, y)
    with pytest.raises(ProbeError, match="differs"):
        ingest(
            run,
            tmp_path / "s.zarr",
            capture=CaptureConfig(probe=other, model=FACTORY + "build_mlp"),
        )
    assert (
        main(
            [
                "ingest",
                str(run),
                "--store",
                str(tmp_path / "s.zarr"),
                "--probe",
                other,
                "--model",
                FACTORY + "build_mlp",
                "-q",
            ]
        )
        == 2
    )
    assert validate_store(tmp_path / "s.zarr") == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "tests.no_such_module:build"], "no_such_module"),
        (["--model", FACTORY + "not_a_model"], "not_a_model"),
        (["--model", FACTORY + "build_cnn"], "missing"),
        (["--mlp-activation", "tanh", "--extra-layers", "nothing*"], "nothing*"),
    ],
)
def test_bad_capture_setup_is_one_clear_error(tmp_path, capsys, flags, message):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    run, _ = _trajectory(tmp_path, build_mlp(), [0, 1], x, y)
    probe = _probe(tmp_path / "p.npz", x, y)
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(run), "--store", str(store), "-q"]) == 0  # weights land first
    code = main(["ingest", str(run), "--store", str(store), "--probe", probe, *flags, "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    tree = xr.open_datatree(str(store), engine="zarr")
    assert list(tree["steps"]["status"].values) == ["ok", "ok"]  # nothing already stored is lost


def test_wrong_probe_shape_and_nan_weights(tmp_path):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    run, saved = _trajectory(tmp_path, build_mlp(), [0, 1, 2], x, y)
    bad = _probe(tmp_path / "bad.npz", rng.standard_normal((8, 4)).astype(np.float32), y)
    with pytest.raises(ProbeError, match="shape"):
        ingest(
            run, tmp_path / "s.zarr", capture=CaptureConfig(probe=bad, model=FACTORY + "build_mlp")
        )
    sd = {k: v.clone() for k, v in saved[2].items()}
    sd["2.weight"][0, 0] = float("nan")
    torch.save(sd, run / "step_0002.pt")
    good = _probe(tmp_path / "good.npz", x, y)
    rep = ingest(
        run, tmp_path / "s2.zarr", capture=CaptureConfig(probe=good, model=FACTORY + "build_mlp")
    )
    assert rep.ingested == [0, 1] and list(rep.failed) == [2]
    assert "step_0002.pt" in rep.failed[2] and "nan" in rep.failed[2].lower()


def test_external_activations(tmp_path):
    rng = np.random.default_rng(17)
    x = rng.standard_normal((12, 5)).astype(np.float32)
    y = rng.integers(0, 3, 12)
    run, _ = _trajectory(tmp_path, build_mlp(), [0, 4], x, y)
    acts = tmp_path / "acts"
    acts.mkdir()
    expected = {}
    for step in (0, 4):
        arrays = {}
        for name, d in (("0", 5), ("2", 7), ("4", 6)):
            arrays[f"{name}/input"] = rng.standard_normal((12, d)).astype(np.float32)
            arrays[f"{name}/input_grad"] = rng.standard_normal((12, d)).astype(np.float32)
        np.savez(acts / f"step_{step}.npz", **arrays)
        expected[step] = arrays
    probe = _probe(tmp_path / "p.npz", x, y)
    code = main(
        [
            "ingest",
            str(run),
            "--store",
            str(tmp_path / "s.zarr"),
            "--activations",
            str(acts),
            "--probe",
            probe,
            "-q",
        ]
    )
    assert code == 0
    tree = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr")
    for step in (0, 4):
        np.testing.assert_array_equal(
            tree["layers/2"]["input"].sel(step=step).values, expected[step]["2/input"]
        )
        np.testing.assert_array_equal(
            tree["layers/4"]["input_grad"].sel(step=step).values, expected[step]["4/input_grad"]
        )


def test_torchscript_archives_need_the_flag(tmp_path):
    rng = np.random.default_rng(18)
    x = rng.standard_normal((9, 5)).astype(np.float32)
    y = rng.integers(0, 3, 9)
    run = tmp_path / "run"
    run.mkdir()
    model = build_mlp()
    for step in (0, 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        torch.jit.save(torch.jit.script(model), str(run / f"step_{step}.pt"))
    probe = _probe(tmp_path / "p.npz", x, y)
    rep = ingest(run, tmp_path / "refused.zarr")
    assert set(rep.failed) == {0, 1} and "--allow-torchscript-code" in rep.failed[0]
    cfg = CaptureConfig(probe=probe, torchscript=True)
    rep = ingest(run, tmp_path / "s.zarr", capture=cfg, allow_torchscript_code=True)
    assert rep.ingested == [0, 1], rep.failed
    tree = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr")
    np.testing.assert_allclose(
        tree["layers/0"]["weight"].sel(step=1).values, model[0].weight.detach().numpy()
    )
    assert tree["layers/0"]["input"].shape == (2, 9, 5)


def test_a_write_that_fails_after_its_task_returned_fails_the_step(tmp_path):
    """Activation chunks are written behind the task (the next checkpoint's
    capture starts meanwhile); a step is marked ok only after its writes
    finished, and a write that fails then (here: a directory squats the chunk's
    path) fails that step alone, with the error, keeping the others."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((20, 5)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    run, _ = _trajectory(tmp_path, build_mlp(), [0, 1, 2], x, y)
    (run / "step_0002.pt").rename(tmp_path / "later.pt")
    store = tmp_path / "s.zarr"
    cfg = CaptureConfig(probe=_probe(tmp_path / "p.npz", x, y), model=FACTORY + "build_mlp")
    assert ingest(run, store, capture=cfg).ingested == [0, 1]
    (tmp_path / "later.pt").rename(run / "step_0002.pt")
    squat = store / "layers/2/input_grad/c.2.0.0"
    (squat / "x").mkdir(parents=True)  # step 2 lands at index 2
    rep = ingest(run, store)
    assert rep.ingested == [] and list(rep.failed) == [2]
    assert "c.2.0.0" in rep.failed[2]
    tree = xr.open_datatree(str(store), engine="zarr")
    assert list(tree["steps"]["status"].values) == ["ok", "ok", "failed"]
    (squat / "x").rmdir()
    squat.rmdir()
    assert ingest(run, store).ingested == [2]
    tree = xr.open_datatree(str(store), engine="zarr")
    assert np.isfinite(tree["layers/2"]["input_grad"].sel(step=2).values).all()
    assert validate_store(store) == []


def test_a_capture_that_cannot_start_gives_its_write_behind_slot_back(tmp_path):
    """Write-behind slots bound the steps whose writes are still running; a
    capture that fails before it starts (here its arrays are missing) must not
    keep one, or a long-lived process would run out and hang."""
    import zarr

    from gramlin_analyze.ingest import task as T

    np.savez(tmp_path / "p.npz", inputs=np.zeros((4, 5), np.float32), labels=np.zeros(4, np.int64))
    cfg = CaptureConfig(probe=str(tmp_path / "p.npz"), model=FACTORY + "build_mlp")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    root.create_group("layers")
    ctx = T.TaskContext(
        store_url=str(tmp_path / "s.zarr"),
        storage_options=None,
        run_token="",
        template={},
        stored_dtypes={},
        reader_options={},
        capture=cfg.to_json(),
        activation_layers=["0"],
        external_dir=None,
        write_behind=True,
    )
    job = T.CheckpointJob(index=0, step=0, path="", format="", files=(), external=None)
    before = T._write_behind_slots._value
    for _ in range(before + 1):  # one more than there are slots: hangs if each failure kept one
        with pytest.raises(KeyError):
            T._capture(ctx, job, None, root)
    assert T._write_behind_slots._value == before


def test_the_driver_side_of_capture_never_imports_torch(tmp_path):
    """Planning, checking and recording capture (the driver's part on a cluster) run
    without torch: the config, the probe and the checks sent to the workers."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "probe.npz", inputs=rng.standard_normal((8, 3)), labels=np.arange(8) % 2)
    script = f"""
import sys
import gramlin_analyze.cli.ingest, gramlin_analyze.ingest.driver, gramlin_analyze.ingest.plan
from gramlin_analyze.capture.config import CaptureConfig
from gramlin_analyze.capture.probe import cached_probe
from gramlin_analyze.capture.remote import check_setup, conv1d_layers
cfg = CaptureConfig.from_json(CaptureConfig(probe="p.npz", model="m.py:build").to_json())
assert cfg.for_tasks().model.endswith("m.py:build")
assert cached_probe({str(tmp_path / "probe.npz")!r}).inputs.shape == (8, 3)
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
