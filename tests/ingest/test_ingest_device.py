"""``--device`` and ``--threads-per-task``: where capture runs and how many kernel threads a task
gets change no stored byte; a GPU that is not there is one line before any store exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from gramlin_analyze.capture.task import CaptureConfig
from gramlin_analyze.cli import main
from gramlin_analyze.errors import UsageError
from gramlin_analyze.ingest import ingest
from tests.capture_models import build_mlp

FACTORY = "tests.capture_models:build_mlp"


def _run(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, str]:
    """Three checkpoints of the test MLP (random weights) and a probe set."""
    run = tmp_path / "run"
    run.mkdir()
    model = build_mlp()
    for step in (0, 5, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)) * 0.3)
        torch.save(model.state_dict(), run / f"step_{step:04d}.pt")
    probe = tmp_path / "probe.npz"
    np.savez(
        probe,
        inputs=rng.standard_normal((30, 5)).astype(np.float32),
        labels=rng.integers(0, 3, 30),
    )
    return run, str(probe)


def _array_files(store: Path) -> dict[str, bytes]:
    """Every file of the store's layers and probe (chunks and their metadata)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for group in ("layers", "probe")
        for p in sorted((store / group).rglob("*"))
        if p.is_file()
    }


def _cli(run: Path, store: Path, probe: str, *flags: str) -> int:
    args = ["ingest", str(run), "--store", str(store), "--probe", probe, "--model", FACTORY]
    return main([*args, "--batch-size", "8", "--lr", "0.1", "-q", *flags])


def test_device_cpu_and_threads_per_task_store_the_same_bytes(tmp_path):
    rng = np.random.default_rng(21)
    run, probe = _run(tmp_path, rng)
    assert _cli(run, tmp_path / "default.zarr", probe) == 0
    assert _cli(run, tmp_path / "cpu.zarr", probe, "--device", "cpu") == 0
    assert _cli(run, tmp_path / "two.zarr", probe, "--threads-per-task", "2", "--threads", "1") == 0
    default = _array_files(tmp_path / "default.zarr")
    assert any(name.startswith("layers/0/input/") for name in default)  # activations stored
    assert _array_files(tmp_path / "cpu.zarr") == default
    assert _array_files(tmp_path / "two.zarr") == default
    tree = xr.open_datatree(str(tmp_path / "cpu.zarr"), engine="zarr")
    assert list(tree["steps"]["status"].values) == ["ok"] * 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line_and_no_store(tmp_path, capsys):
    run, probe = _run(tmp_path, np.random.default_rng(22))
    assert _cli(run, tmp_path / "s.zarr", probe, "--device", "cuda") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device on this machine" in err[0]
    assert "torch.cuda.is_available() is False" in err[0] and "--device cuda" in err[0]
    assert not (tmp_path / "s.zarr").exists()


def test_bad_device_or_thread_flags_exit_2(tmp_path, capsys):
    run, probe = _run(tmp_path, np.random.default_rng(23))
    assert _cli(run, tmp_path / "s.zarr", probe, "--device", "tpu") == 2
    assert "--device must be cpu, cuda or cuda:N, not 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse's own usage error
        _cli(run, tmp_path / "s.zarr", probe, "--threads-per-task", "0")
    assert info.value.code == 2
    assert "--threads-per-task: must be above 0" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_device_without_capture_and_bad_thread_counts_are_refused(tmp_path):
    run, probe = _run(tmp_path, np.random.default_rng(24))
    with pytest.raises(UsageError, match="--device cuda is where capture runs"):
        ingest(run, tmp_path / "s.zarr", device="cuda")
    config = CaptureConfig(probe=probe, model=FACTORY)
    with pytest.raises(UsageError, match="--threads-per-task must be at least 1, got 0"):
        ingest(run, tmp_path / "s.zarr", capture=config, threads_per_task=0)
    assert not (tmp_path / "s.zarr").exists()
