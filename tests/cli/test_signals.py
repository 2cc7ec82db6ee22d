"""SIGINT and SIGTERM stop ``ingest`` and ``analyze`` cleanly (issue 11, point 7).

Real ``gramlin-analyze`` processes, signalled early (as soon as their handlers
are in place, before any task) or in the middle of their tasks: each must exit
130 (SIGINT) or 143 (SIGTERM) with one line saying how to resume, leave every
step it marked ``ok`` (every result it recorded) identical to an uninterrupted
run's, leave work undone (it stopped), and a store that opens, validates, and
that the same command re-run completes to the uninterrupted run's bytes.

Nothing here measures time: the points are found from the process itself
(its signal mask in ``/proc``, the chunk files it has written).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gramlin_analyze as ga
from gramlin_analyze.cli import main
from tests.trajectory import write_trajectory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path("/proc/self/status").exists(), reason="finds the signal handlers in /proc"
    ),
]

#: Many small layers: each step is many small writes, so a one-thread ingest
#: takes a few seconds and a signal lands with most steps still to do.
N_STEPS, N_LAYERS = 32, 32
INGEST_SHAPES = {f"blocks.{k}.weight": (32, 24) for k in range(N_LAYERS)} | {"blocks.0.bias": (32,)}
#: Few bigger layers for analyze: a Gram per (step, layer) task.
ANALYZE_SHAPES = {"fc1.weight": (256, 192), "fc1.bias": (256,), "fc2.weight": (192, 256)}
HANG_GUARD_S = 300  # only so that a hung process fails the test instead of the session


# -- running and signalling the command line ----------------------------------------------


def start(
    args: list[str], *, ignore_sigint: bool = False, own_group: bool = False
) -> subprocess.Popen:
    """``gramlin-analyze ARGS`` as its own process (stdout/stderr captured); with
    ``own_group``, in a process group of its own, as a terminal's foreground job."""
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen(
        [sys.executable, "-m", "gramlin_analyze", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
        start_new_session=own_group,
    )


def _catches(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def wait_until(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.002)


def wait_for_handlers(proc: subprocess.Popen) -> None:
    """Until the command's handlers are installed (Python alone does not catch SIGTERM)."""
    wait_until(
        proc, lambda: _catches(proc.pid, signal.SIGTERM), "its signal handlers were installed"
    )


def data_files(directory: Path) -> int:
    """Chunk files under ``directory`` (metadata files aside)."""
    return sum(1 for _, _, files in os.walk(directory) for f in files if f != "zarr.json")


def stop(proc: subprocess.Popen, signum: int, *, group: bool = False) -> str:
    """Send ``signum`` (to the process group, as Ctrl-C at a terminal does, with
    ``group``); assert the exit code and the one resume line; return that line."""
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + signum, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    resume = [line for line in err.splitlines() if "run the same command again" in line]
    assert len(resume) == 1, err
    return resume[0]


def run_cli(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gramlin_analyze", *args], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]


# -- comparing stores (read with zarr alone: the store's documented layout) ----------------


def _root(store: Path):
    import zarr

    return zarr.open_group(str(store), mode="r")


def ok_steps(store: Path) -> np.ndarray:
    steps = _root(store)["steps"]
    return np.flatnonzero(steps["status"][:] == "ok")


def assert_layers_match(store: Path, ref: Path, rows) -> None:
    """Every layer array's ``rows`` identical (bit for bit) to the reference store's."""
    np.testing.assert_array_equal(_root(store)["steps/step"][:], _root(ref)["steps/step"][:])
    t, r = _root(store)["layers"], _root(ref)["layers"]
    assert sorted(t.group_keys()) == sorted(r.group_keys())
    for name in r.group_keys():
        for var in r[name].array_keys():
            got, want = t[name][var].oindex[rows], r[name][var].oindex[rows]
            np.testing.assert_array_equal(got, want, err_msg=f"{name}/{var}")


def assert_arrays_match(t, r, path: str) -> None:
    """Every array under zarr group ``r`` (recursively) identical in ``t``."""
    assert sorted(t.array_keys()) == sorted(r.array_keys()), path
    assert sorted(t.group_keys()) == sorted(r.group_keys()), path
    for var in r.array_keys():
        got, want = t[var][:], r[var][:]
        if path.startswith("metrics") and want.dtype.kind == "f":
            # computed in float64 with BLAS, whose thread count (and so its last bit)
            # follows the number of tasks running: equal to rounding, not bit for bit
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=f"{path}/{var}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{path}/{var}")
    for sub in r.group_keys():
        assert_arrays_match(t[sub], r[sub], f"{path}/{sub}")


def assert_store_matches(store: Path, ref: Path) -> None:
    """The whole store equal to the reference: steps, manifest, every array, /metrics if any."""
    assert main(["validate", str(store), "-q"]) == 0
    t, r = _root(store), _root(ref)
    for col in ("step", "status", "fingerprint", "nonfinite"):
        np.testing.assert_array_equal(t["steps"][col][:], r["steps"][col][:], err_msg=col)
    for group in ("layers", "metrics"):
        if group in r:
            assert_arrays_match(t[group], r[group], group)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_run(tmp_path_factory):
    """A run of N_STEPS checkpoints of N_LAYERS layers, and its uninterrupted store."""
    d = tmp_path_factory.mktemp("ingest")
    write_trajectory(
        d / "run", range(0, 10 * N_STEPS, 10), formats=("safetensors",), shapes=INGEST_SHAPES
    )
    assert len(ga.ingest(d / "run", d / "ref.zarr").ingested) == N_STEPS
    return d / "run", d / "ref.zarr"


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """An ingested store, and a copy analyzed without interruption (``--metrics gram``)."""
    d = tmp_path_factory.mktemp("analyze")
    write_trajectory(
        d / "run", range(0, 10 * N_STEPS, 10), formats=("safetensors",), shapes=ANALYZE_SHAPES
    )
    ga.ingest(d / "run", d / "base.zarr")
    shutil.copytree(d / "base.zarr", d / "ref.zarr")
    # One task at a time as in the tests: the task count sets the BLAS threads, and
    # with them the last bits of float64 sums (gram_change).
    ga.analyze(d / "ref.zarr", metrics=["gram"], threads=1)
    return d / "base.zarr", d / "ref.zarr"


# -- ingest -------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point", ["early", "middle"])
def test_a_signal_stops_ingest_and_the_same_command_finishes_it(
    weights_run, tmp_path, signum, point
):
    run, ref = weights_run
    store = tmp_path / "s.zarr"
    args = ["ingest", str(run), "--store", str(store), "--threads", "1", "-q"]
    proc = start(args)
    wait_for_handlers(proc)
    if point == "middle":  # a few steps written, most to do
        wait_until(
            proc, lambda: data_files(store / "layers") >= 3 * N_LAYERS, "three steps were written"
        )
    line = stop(proc, signum)
    assert "gramlin-analyze " + " ".join(args) in line

    done = ok_steps(store)
    assert len(done) < N_STEPS, "the run went on to the end"
    assert_layers_match(store, ref, done)
    assert main(["validate", str(store), "-q"]) == 0
    if point == "middle":
        ga.open(store)  # opens as a DataTree

    run_cli(args)
    assert_store_matches(store, ref)


def test_sigint_stops_an_ingest_started_with_sigint_ignored(weights_run, tmp_path):
    """``cmd &`` from a script starts it with SIGINT ignored; ``kill -INT`` still stops it."""
    run, ref = weights_run
    store = tmp_path / "s.zarr"
    args = ["ingest", str(run), "--store", str(store), "--threads", "1", "-q"]
    proc = start(args, ignore_sigint=True)
    wait_for_handlers(proc)
    wait_until(proc, lambda: data_files(store / "layers") >= 2 * N_LAYERS, "two steps were written")
    stop(proc, signal.SIGINT)
    assert len(ok_steps(store)) < N_STEPS
    run_cli(args)
    assert_store_matches(store, ref)


def test_a_second_sigint_stops_at_once_and_the_next_run_repairs(weights_run, tmp_path):
    """The first signal asks to stop after the running task; a second ends the process
    then and there (as a kill would), and the next run finishes the store."""
    run, ref = weights_run
    store = tmp_path / "s.zarr"
    args = ["ingest", str(run), "--store", str(store), "--threads", "1", "-q"]
    proc = start(args)
    wait_for_handlers(proc)
    wait_until(proc, lambda: data_files(store / "layers") >= 2 * N_LAYERS, "two steps were written")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode in (-signal.SIGINT, 130)  # killed by the second, or done with the first
    run_cli(args)
    assert_store_matches(store, ref)


def test_ctrl_c_stops_an_ingest_on_a_local_cluster_whose_workers_it_reaches_too(
    weights_run, tmp_path
):
    """Ctrl-C at a terminal signals the whole process group, the cluster's workers
    included: they ignore it, finish their tasks, and the driver stops cleanly."""
    run, ref = weights_run
    store = tmp_path / "s.zarr"
    args = ["ingest", str(run), "--store", str(store), "--workers", "2", "-q"]
    proc = start(args, own_group=True)
    wait_for_handlers(proc)
    wait_until(proc, lambda: data_files(store / "layers") >= 2 * N_LAYERS, "two steps were written")
    stop(proc, signal.SIGINT, group=True)
    done = ok_steps(store)
    assert len(done) < N_STEPS
    assert_layers_match(store, ref, done)
    run_cli(args)
    assert_store_matches(store, ref)


# -- analyze ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_analyze_and_the_same_command_finishes_it(analyzed, tmp_path, signum):
    base, ref = analyzed
    store = tmp_path / "s.zarr"
    shutil.copytree(base, store)
    args = ["analyze", str(store), "--metrics", "gram", "--threads", "1", "-q"]
    proc = start(args)
    wait_for_handlers(proc)
    wait_until(proc, lambda: data_files(store / "metrics") >= 12, "a few Grams were written")
    assert "gramlin-analyze " + " ".join(args) in stop(proc, signum)

    # What it recorded as done (its inputs' hash) is identical to the uninterrupted run's.
    t, r = _root(store)["metrics"], _root(ref)["metrics"]
    mine = t["_inputs/gram"][:]
    done = mine == r["_inputs/gram"][:]
    assert done.any() and not done.all(), "it stopped before any result, or went on to the end"
    assert set(mine[~done].tolist()) <= {""}, "a result recorded with other inputs"
    for j, layer in enumerate(r["layer"][:].tolist()):
        rows = np.flatnonzero(done[:, j])
        np.testing.assert_array_equal(
            t[f"{layer}/gram"][:][rows], r[f"{layer}/gram"][:][rows], err_msg=layer
        )
    for var in r.array_keys():
        if r[var].ndim == 2 and var != "gram_change":  # (step, layer) scalars of the tasks
            np.testing.assert_array_equal(t[var][:][done], r[var][:][done], err_msg=var)
    ga.open(store)  # opens as a DataTree (every group aligned with its parents)
    assert main(["validate", str(store), "-q"]) == 0

    run_cli(args)
    assert_store_matches(store, ref)
