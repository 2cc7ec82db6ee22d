"""``--cluster slurm|local --jobs N`` end to end (issue 12, points 1 and 9).

``gramlin-analyze`` runs as a real process. For SLURM, dask-jobqueue's
``SLURMCluster`` submits its job scripts through stand-in ``sbatch`` /
``squeue`` / ``scancel`` commands (``tests/cluster/slurm_shim.py``) first on
``PATH``, which run each job on this machine in a session of its own: real
``dask worker`` processes that connect to the command's scheduler. The store
each command writes is compared, array for array, with a run on the default
scheduler, and after each command no job process is left.
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

import gramlin_analyze as ga
from gramlin_analyze.cli import main
from tests.trajectory import write_trajectory

SHIM = Path(__file__).with_name("slurm_shim.py")
sys.path.insert(0, str(SHIM.parent))
from slurm_shim import session_alive  # noqa: E402

#: the state dict of tests.capture_models.build_mlp (rebuilt with --mlp-activation tanh)
MLP = {
    "0.weight": (7, 5),
    "0.bias": (7,),
    "2.weight": (6, 7),
    "2.bias": (6,),
    "4.weight": (3, 6),
    "4.bias": (3,),
}
STEPS = [0, 10, 20]
HANG_GUARD_S = 240  # only so that a hung command fails the test instead of the session

requires_proc = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="the shim finds job processes in /proc"
)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capture_run(tmp_path_factory):
    """A small MLP run, its probe set, the capture flags, and the reference store
    written and analyzed on the default (threaded) scheduler."""
    d = tmp_path_factory.mktemp("run")
    write_trajectory(d / "run", STEPS, formats=("safetensors",), shapes=MLP)
    rng = np.random.default_rng(12)
    np.savez(
        d / "probe.npz",
        inputs=rng.standard_normal((16, 5)).astype(np.float32),
        labels=np.arange(16) % 3,
    )
    flags = ["--probe", str(d / "probe.npz"), "--mlp-activation", "tanh"]
    ref = d / "ref.zarr"
    assert main(["ingest", str(d / "run"), "--store", str(ref), *flags, "-q"]) == 0
    assert main(["analyze", str(ref), "-q"]) == 0
    return d / "run", flags, ref


@pytest.fixture
def slurm(tmp_path):
    """An environment whose ``sbatch``/``squeue``/``scancel`` are the shim's; its state dir."""
    bin_dir, state = tmp_path / "shim-bin", tmp_path / "shim-state"
    bin_dir.mkdir()
    state.mkdir()
    for command in ("sbatch", "squeue", "scancel"):
        exe = bin_dir / command
        exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SHIM}" {command} "$@"\n')
        exe.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_SHIM_STATE": str(state),
        # No user configuration of dask or dask-jobqueue reaches the test.
        "DASK_CONFIG": str(tmp_path / "dask-config"),
    }
    return env, state


def cli(args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    """``gramlin-analyze ARGS`` as a process (its output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "gramlin_analyze", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_GUARD_S,
    )


def job_ids(state: Path, name: str) -> list[int]:
    f = state / name
    return sorted(map(int, f.read_text().split())) if f.exists() else []


def assert_jobs_gone(state: Path, n: int) -> None:
    """``n`` jobs were submitted, every one cancelled, and none has a process left."""
    started = job_ids(state, "started")
    assert len(started) == n, started
    assert set(job_ids(state, "cancelled")) == set(started), "a job was never scancel'ed"
    assert not [j for j in started if session_alive(j)], "job processes outlived the command"


def _root(store: Path):
    import zarr

    return zarr.open_group(str(store), mode="r")


def assert_arrays_equal(t, r, path: str) -> None:
    """Every array under zarr group ``r`` (recursively) identical in ``t``."""
    assert sorted(t.array_keys()) == sorted(r.array_keys()), path
    assert sorted(t.group_keys()) == sorted(r.group_keys()), path
    for var in r.array_keys():
        np.testing.assert_array_equal(t[var][:], r[var][:], err_msg=f"{path}/{var}")
    for sub in r.group_keys():
        assert_arrays_equal(t[sub], r[sub], f"{path}/{sub}")


def assert_store_matches(store: Path, ref: Path, groups: tuple[str, ...]) -> None:
    """The manifest and every array of ``groups`` equal to the reference store's."""
    t, r = _root(store), _root(ref)
    for col in ("step", "status", "fingerprint", "nonfinite"):
        np.testing.assert_array_equal(t["steps"][col][:], r["steps"][col][:], err_msg=col)
    for group in groups:
        assert_arrays_equal(t[group], r[group], group)


# -- end to end ---------------------------------------------------------------------------


@pytest.mark.slow
@requires_proc
def test_ingest_and_analyze_on_slurm_jobs_match_a_local_run(capture_run, slurm, tmp_path):
    run, flags, ref = capture_run
    env, state = slurm
    store = tmp_path / "s.zarr"
    ingest = cli(
        [
            "ingest", run, "--store", store, *flags,
            "--cluster", "slurm", "--jobs", "2",
            "--cluster-option", "cores=1", "--cluster-option", "memory=2GB",
        ],
        env,
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    assert "waiting for 2 workers: 2/2 up" in ingest.stderr
    assert_jobs_gone(state, 2)
    assert_store_matches(store, ref, ("layers",))

    # Settings from dask's configuration (here its environment variables) work as well.
    env = {**env, "DASK_JOBQUEUE__SLURM__CORES": "1", "DASK_JOBQUEUE__SLURM__MEMORY": "2GB"}
    analyze = cli(["analyze", store, "--cluster", "slurm", "--jobs", "2", "-q"], env)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    assert analyze.stderr == ""  # -q: not a line, not even the progress of the workers
    assert_jobs_gone(state, 4)
    assert_store_matches(store, ref, ("layers", "metrics"))
    assert main(["validate", str(store), "-q"]) == 0


@pytest.mark.slow
def test_ingest_and_analyze_on_a_local_cluster_match_a_local_run(capture_run, tmp_path):
    run, flags, ref = capture_run
    store = tmp_path / "s.zarr"
    for args in (
        ["ingest", run, "--store", store, *flags, "--cluster", "local", "--jobs", "2", "-q"],
        # (one thread per task, as the two workers on this machine's cores get anyway)
        ["analyze", store, "--cluster", "local", "--jobs", "2", "--threads-per-task", "1", "-q"],
    ):
        proc = cli(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_store_matches(store, ref, ("layers", "metrics"))


# -- jobs that never start ------------------------------------------------------------------


@pytest.mark.slow
@requires_proc
def test_jobs_that_never_start_time_out_with_one_line_and_no_store(capture_run, slurm, tmp_path):
    run, _, _ = capture_run
    env, state = slurm
    env = {**env, "SLURM_SHIM_NEVER_START": "1"}
    store = tmp_path / "s.zarr"
    args = ["ingest", run, "--store", store, "--cluster", "slurm", "--jobs", "2"]
    args += ["--cluster-option", "cores=1", "--cluster-option", "memory=2GB"]
    t0 = time.monotonic()
    proc = cli([*args, "--cluster-timeout", "3", "-q"], env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    ids = job_ids(state, "started")
    assert len(ids) == 2
    assert lines[0].startswith("error: slurm: 0/2 workers up after 3 s"), lines[0]
    assert all(str(j) in lines[0] for j in ids) and "squeue" in lines[0], lines[0]
    assert set(job_ids(state, "cancelled")) == set(ids)
    assert not store.exists()
    assert elapsed < 3 + 30, elapsed  # start-up and shutdown, not a second timeout


@pytest.mark.slow
@requires_proc
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_waiting_for_workers_cancels_the_jobs(capture_run, slurm, tmp_path, signum):
    run, _, _ = capture_run
    env, state = slurm
    env = {**env, "SLURM_SHIM_NEVER_START": "1"}
    store = tmp_path / "s.zarr"
    args = ["ingest", run, "--store", store, "--cluster", "slurm", "--jobs", "2"]
    args += ["--cluster-option", "cores=1", "--cluster-option", "memory=2GB"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gramlin_analyze", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr.readline().startswith("waiting for 2 workers: 0/2 up")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert "run the same command again" in err
    assert len(job_ids(state, "started")) == 2
    assert set(job_ids(state, "cancelled")) == set(job_ids(state, "started"))
    assert not store.exists()


# -- usage --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--cluster", "local", "--workers", "2"],
        ["--cluster", "slurm", "--scheduler", "tcp://127.0.0.1:8786"],
        ["--jobs", "2"],
        ["--cluster-option", "cores=2"],
        ["--cluster", "slurm", "--jobs", "0"],
        ["--cluster", "nowhere"],
    ],
)
def test_cluster_usage_errors_exit_2_before_any_store(tmp_path, flags):
    write_trajectory(tmp_path / "run", [0], formats=("safetensors",))
    assert ga.ingest(tmp_path / "run", tmp_path / "a.zarr").ingested == [0]
    store = tmp_path / "s.zarr"
    for args in (
        ["ingest", str(tmp_path / "run"), "--store", str(store)],
        ["analyze", str(tmp_path / "a.zarr"), "--metrics", "gram"],
    ):
        try:
            code = main([*args, *flags, "-q"])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        assert code == 2, args
    assert not store.exists()
    assert "metrics" not in _root(tmp_path / "a.zarr")


def test_cluster_options_parse_as_json_where_they_parse():
    from gramlin_analyze.cli.app import build_parser

    argv = ["analyze", "s.zarr", "--cluster", "slurm", "--jobs", "3"]
    for opt in ("cores=8", "memory=32GB", "walltime=01:00:00", "account=abc", "processes=2"):
        argv += ["--cluster-option", opt]
    args = build_parser().parse_args(argv)
    assert (args.cluster, args.jobs, args.cluster_timeout) == ("slurm", 3, 300.0)
    assert args.cluster_options == {
        "cores": 8,
        "memory": "32GB",
        "walltime": "01:00:00",
        "account": "abc",
        "processes": 2,
    }


def test_without_dask_jobqueue_one_line_says_what_to_install(monkeypatch):
    from gramlin_analyze.cluster import ClusterRequest, cluster_address
    from gramlin_analyze.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'gramlin-analyze\[cluster\]'"):
        with cluster_address(ClusterRequest("slurm", 2)):
            pass


def test_settings_a_batch_system_refuses_are_one_line(monkeypatch):
    pytest.importorskip("dask_jobqueue")
    from gramlin_analyze.cluster import ClusterError, ClusterRequest, cluster_address

    with pytest.raises(ClusterError, match=r"^slurm: cannot start the cluster: .*no_such_setting"):
        with cluster_address(
            ClusterRequest("slurm", 1, {"cores": 1, "memory": "1GB", "no_such_setting": 1})
        ):
            pass


def test_a_batch_system_without_cores_or_memory_says_where_to_set_them():
    pytest.importorskip("dask_jobqueue")
    import dask

    from gramlin_analyze.cluster import ClusterError, ClusterRequest, cluster_address

    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ClusterError) as info:
            with cluster_address(ClusterRequest("slurm", 1)):
                pass
    msg = str(info.value)
    assert "\n" not in msg and "cores and memory" in msg, msg
    assert "jobqueue.slurm" in msg and "--cluster-option" in msg, msg
