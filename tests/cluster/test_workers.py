"""A worker that dies mid-ingest on a cluster started by hand (issue 12, point 9).

The cluster is what a user starts in terminals: ``dask scheduler`` and two
``dask worker`` processes on loopback (``tests/cluster/dask_procs.py``), and
``gramlin-analyze ingest --scheduler tcp://…`` runs as a process of its own,
capturing a model's activations (``--model file.py:build --probe``). Once the
scheduler has seen a task finish and one is running, the worker running it is
killed with SIGKILL, nanny and all (a machine that died). Dask gives that task
to the other worker; should the command fail anyway, running it again must
finish the run. Either way the store must equal, array for array, a threaded
ingest of the same checkpoints in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gramlin_analyze.cli import main
from tests.cluster.dask_procs import dask_processes, group_alive

pytest.importorskip("distributed")

STEPS = list(range(0, 160, 10))  # 16 checkpoints: enough tasks that one is running at the kill
WIDTH, N_IN, N_OUT, PROBE = 256, 64, 8, 2048  # a task of ~0.1-0.3 s: long enough to be caught
CLI_TIMEOUT_S = 150  # hang guards only: a loaded machine took 60 s to the first task
KILL_WITHIN_S = 120

FACTORY = f"""
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear({N_IN}, {WIDTH}), nn.ReLU(), nn.Linear({WIDTH}, {WIDTH}), nn.ReLU(),
        nn.Linear({WIDTH}, {N_OUT}),
    )
"""


def _capture_run(root: Path) -> list[str]:
    """Checkpoints, a probe set and a model file under ``root``; return the capture flags."""
    import torch

    (root / "factory.py").write_text(FACTORY)
    exec(FACTORY, ns := {})
    model = ns["build"]()
    run = root / "run"
    run.mkdir()
    gen = torch.Generator().manual_seed(1)
    for step in STEPS:
        torch.save(model.state_dict(), run / f"step_{step:05d}.pt")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    rng = np.random.default_rng(7)
    np.savez(
        root / "probe.npz",
        inputs=rng.standard_normal((PROBE, N_IN)).astype(np.float32),
        labels=rng.integers(0, N_OUT, PROBE),
    )
    model_flag = f"{root / 'factory.py'}:build"
    return ["--probe", str(root / "probe.npz"), "--model", model_flag, "--lr", "0.1"]


def _cli(args: list) -> subprocess.Popen:
    """``gramlin-analyze ARGS`` as a process of its own, as a user runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "gramlin_analyze", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finished(client) -> int:
    """Our tasks (``_limited-…`` keys) the scheduler's task stream has seen finish."""
    return sum(str(t.get("key", "")).startswith("_limited") for t in client.get_task_stream())


def _kill_a_busy_worker(procs, command: subprocess.Popen, pids: dict[str, int]) -> int:
    """Once a task finished and another runs, SIGKILL the group of a worker running one.

    Returns the killed group's id. The scheduler is asked rather than the store
    watched: it knows which worker holds a running task, so the kill always
    loses work in flight (the case that needs rescheduling).
    """
    from distributed import Client

    deadline = time.monotonic() + KILL_WITHIN_S
    with Client(procs.address, timeout=30, set_as_default=False) as client:
        while time.monotonic() < deadline:
            assert command.poll() is None, "the ingest ended before a worker could be killed"
            running = [addr for addr, keys in sorted(client.processing().items()) if keys]
            if running and _finished(client) >= 1:
                pgid = os.getpgid(pids[running[0]])
                assert pgid in {w.pid for w in procs.workers}, "not a worker we started"
                os.killpg(pgid, signal.SIGKILL)
                return pgid
            time.sleep(0.02)
    raise AssertionError(f"no task finished within {KILL_WITHIN_S} s")


def _arrays(group, path: str = "") -> dict[str, np.ndarray]:
    """Every array of a zarr group, recursively, by path."""
    out = {f"{path}/{k}": a[...] for k, a in group.arrays()}
    for k, sub in group.groups():
        out.update(_arrays(sub, f"{path}/{k}"))
    return out


def _assert_same_store(store: Path, ref: Path) -> None:
    """The same arrays with the same values and dtypes, and every step ok."""
    import zarr

    got = _arrays(zarr.open_group(str(store), mode="r"))
    want = _arrays(zarr.open_group(str(ref), mode="r"))
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert set(got["/steps/status"].tolist()) == {"ok"}
    assert got["/steps/step"].tolist() == STEPS


@pytest.mark.slow
def test_a_worker_killed_mid_ingest_loses_nothing(tmp_path):
    """SIGKILL of a busy worker: the run completes (or its re-run does), equal to a local run."""
    flags = _capture_run(tmp_path)
    run, store, ref = tmp_path / "run", tmp_path / "s.zarr", tmp_path / "ref.zarr"
    assert main(["ingest", str(run), "--store", str(ref), *flags, "-q"]) == 0
    with dask_processes(tmp_path / "dask", 2) as procs:
        pids = procs.wait_for_workers(2)
        args = ["ingest", run, "--store", store, *flags, "--scheduler", procs.address, "-q"]
        command = _cli(args)
        try:
            killed = _kill_a_busy_worker(procs, command, pids)
            out, err = command.communicate(timeout=CLI_TIMEOUT_S)
        finally:
            command.kill()
        deadline = time.monotonic() + 10
        while group_alive(killed) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(killed)
        if command.returncode != 0:  # the run may fail on the lost task; the next one finishes it
            again = _cli(args)
            try:
                out, err = again.communicate(timeout=CLI_TIMEOUT_S)
            finally:
                again.kill()
            assert again.returncode == 0, err[-3000:]
        assert len(procs.wait_for_workers(1)) == 1  # the survivor did the rest
    _assert_same_store(store, ref)
