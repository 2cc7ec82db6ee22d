"""The Python API on real Dask clients: a LocalCluster of worker processes on loopback.

Tasks are counted on the scheduler (its transition log), stores compared array by
array with a run on this process's threads.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import gramlin_analyze as ga
from gramlin_analyze.capture.task import CaptureConfig
from gramlin_analyze.cli import main
from gramlin_analyze.errors import UsageError
from gramlin_analyze.scheduling import (
    SchedulerUnreachableError,
    WorkerSetupError,
    make_runner,
    task_threads,
    worker_budgets,
)
from tests.trajectory import write_trajectory

distributed = pytest.importorskip("distributed")

STEPS = [0, 10, 20, 30, 40, 50]
BIG = {"fc1.weight": (96, 64), "fc1.bias": (96,), "fc2.weight": (32, 96), "fc2.bias": (32,)}

FACTORY = """
import torch
from torch import nn


def build(config=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
"""


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        yield c


def _tasks_seen(client) -> int:
    """Tasks of our runner (``_limited-…`` keys) the scheduler has seen so far."""

    def count(dask_scheduler):
        return len(
            {str(t[0]) for t in dask_scheduler.transition_log if str(t[0]).startswith("_limited")}
        )

    return client.run_on_scheduler(count)


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _assert_same_store(a: Path, b: Path) -> None:
    """Every layer array equal, every step ok in both."""
    ta = xr.open_datatree(str(a), engine="zarr")
    tb = xr.open_datatree(str(b), engine="zarr")
    assert sorted(ta["layers"].children) == sorted(tb["layers"].children)
    for name in ta["layers"].children:
        da, db = ta[f"layers/{name}"].to_dataset(), tb[f"layers/{name}"].to_dataset()
        assert sorted(da.data_vars) == sorted(db.data_vars)
        for var in da.data_vars:
            np.testing.assert_array_equal(da[var].values, db[var].values, err_msg=f"{name}/{var}")
    for var in ("step", "status", "fingerprint"):
        np.testing.assert_array_equal(ta["steps"][var].values, tb["steps"][var].values)
    assert set(ta["steps"]["status"].values.tolist()) == {"ok"}


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _capture_run(tmp_path: Path) -> None:
    """A run directory, a probe and a ``factory.py`` under ``tmp_path``, for relative paths."""
    import torch

    exec(FACTORY, ns := {})
    model = ns["build"]()
    run = tmp_path / "run"
    run.mkdir()
    for step in (0, 1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        torch.save(model.state_dict(), run / f"step_{step:04d}.pt")
    rng = np.random.default_rng(3)
    np.savez(
        tmp_path / "probe.npz",
        inputs=rng.standard_normal((24, 5)).astype(np.float32),
        labels=rng.integers(0, 3, 24),
    )
    (tmp_path / "factory.py").write_text(FACTORY)


# -- refused before the store is touched (no cluster needed) ------------------------------


def test_unreachable_address_fails_fast_before_the_store_exists(tmp_path):
    write_trajectory(tmp_path / "run", STEPS[:2])
    address = _free_address()
    t0 = time.monotonic()
    with pytest.raises(SchedulerUnreachableError, match=address.replace(".", r"\.")):
        ga.ingest(tmp_path / "run", tmp_path / "s.zarr", client=address, connect_timeout=1)
    assert time.monotonic() - t0 < 8
    assert not (tmp_path / "s.zarr").exists()


def test_unreachable_address_leaves_an_existing_store_unchanged(tmp_path, capsys):
    import dask

    write_trajectory(tmp_path / "run", STEPS[:2])
    ga.ingest(tmp_path / "run", tmp_path / "s.zarr")
    write_trajectory(tmp_path / "run", STEPS[2:3])  # a new step that would be written
    before = _snapshot(tmp_path / "s.zarr")
    address = _free_address()
    with pytest.raises(SchedulerUnreachableError):
        ga.analyze(tmp_path / "s.zarr", scheduler=address, connect_timeout=1)
    capsys.readouterr()
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code = main(
            [
                "ingest",
                str(tmp_path / "run"),
                "--store",
                str(tmp_path / "s.zarr"),
                "--scheduler",
                address,
                "-q",
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and address in err[0] and "dask scheduler" in err[0]
    assert _snapshot(tmp_path / "s.zarr") == before


def test_client_and_scheduler_together_are_refused(tmp_path):
    write_trajectory(tmp_path / "run", STEPS[:1])
    with pytest.raises(UsageError, match="not both"):
        ga.ingest(tmp_path / "run", tmp_path / "s.zarr", client="tcp://a:1", scheduler="tcp://a:1")
    assert not (tmp_path / "s.zarr").exists()


# -- on a real cluster ------------------------------------------------------------------------


@pytest.mark.slow
def test_client_object_cluster_and_active_client_run_on_the_cluster(tmp_path, cluster):
    write_trajectory(tmp_path / "run", STEPS, shapes=BIG)
    ga.ingest(tmp_path / "run", tmp_path / "local.zarr")
    with distributed.Client(cluster, set_as_default=False) as client:
        seen = _tasks_seen(client)
        report = ga.ingest(tmp_path / "run", tmp_path / "a.zarr", client=client)
        assert report.ingested == STEPS and report.ran_on.startswith("on the Dask client at tcp://")
        assert _tasks_seen(client) - seen == len(STEPS)
        assert client.status == "running"  # the caller's client is left open
        seen = _tasks_seen(client)
        ga.ingest(tmp_path / "run", tmp_path / "b.zarr", client=cluster)  # a cluster object
        assert _tasks_seen(client) - seen == len(STEPS)
    _assert_same_store(tmp_path / "local.zarr", tmp_path / "a.zarr")
    _assert_same_store(tmp_path / "local.zarr", tmp_path / "b.zarr")
    with distributed.Client(cluster) as active:
        seen = _tasks_seen(active)
        report = ga.ingest(tmp_path / "run", tmp_path / "c.zarr")
        assert report.ran_on == f"on the active Dask client at {cluster.scheduler_address}"
        assert _tasks_seen(active) - seen == len(STEPS)
        seen = _tasks_seen(active)
        analyzed = ga.analyze(tmp_path / "c.zarr", metrics=["gram"])
        # one per (step, layer), and one per layer's phase 2
        assert _tasks_seen(active) - seen == len(STEPS) * 2 + analyzed.phase2_tasks
    _assert_same_store(tmp_path / "local.zarr", tmp_path / "c.zarr")


@pytest.mark.slow
def test_relative_paths_from_another_directory(tmp_path, cluster, monkeypatch):
    """The workers run in this process's first directory; the driver in another."""
    _capture_run(tmp_path)
    options = dict(
        capture=CaptureConfig(probe="probe.npz", model="factory.py:build", batch_size=8),
        lr=0.1,
    )
    workers_cwd = Path.cwd()
    monkeypatch.chdir(tmp_path)
    ga.ingest("run", "local.zarr", **options)
    report = ga.ingest("run", "s.zarr", client=cluster.scheduler_address, **options)
    assert report.ingested == [0, 1, 2] and not report.failed
    assert not (workers_cwd / "s.zarr").exists() and not (workers_cwd / "run").exists()
    _assert_same_store(tmp_path / "local.zarr", tmp_path / "s.zarr")
    tree = xr.open_datatree("s.zarr", engine="zarr")
    np.testing.assert_array_equal(
        tree["layers/0"]["input"].values,
        xr.open_datatree("local.zarr", engine="zarr")["layers/0"]["input"].values,
    )


@pytest.mark.slow
def test_a_model_the_workers_cannot_import_is_one_error(tmp_path, cluster, monkeypatch):
    _capture_run(tmp_path)
    (tmp_path / "only_here").mkdir()
    (tmp_path / "only_here" / "driver_only_model.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path / "only_here"))  # the driver's path, not the workers'
    config = CaptureConfig(
        probe=str(tmp_path / "probe.npz"), model="driver_only_model:build", batch_size=8
    )
    with pytest.raises(WorkerSetupError) as info:
        ga.ingest(
            tmp_path / "run",
            tmp_path / "s.zarr",
            capture=config,
            lr=0.1,
            client=cluster.scheduler_address,
        )
    msg = str(info.value)
    assert msg.startswith("driver_only_model:build cannot be imported on worker tcp://")
    assert "ModuleNotFoundError" in msg and "install it on the workers" in msg
    assert not (tmp_path / "s.zarr").exists()  # found before the store was created
    sys.modules.pop("driver_only_model", None)


BUILT_HERE = """
import os
from pathlib import Path

import torch
from torch import nn


def build(config=None):
    Path(__file__).with_name("built").joinpath(str(os.getpid())).touch()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
"""


@pytest.mark.slow
def test_the_driver_never_builds_the_model(tmp_path, cluster):
    """Each build leaves a file named after its process: none is the driver's."""
    _capture_run(tmp_path)
    (tmp_path / "factory.py").write_text(BUILT_HERE)
    (tmp_path / "built").mkdir()
    config = CaptureConfig(
        probe=str(tmp_path / "probe.npz"), model=str(tmp_path / "factory.py:build"), batch_size=8
    )
    with distributed.Client(cluster, set_as_default=False) as client:
        workers = set(client.run(os.getpid).values())
        report = ga.ingest(tmp_path / "run", tmp_path / "s.zarr", capture=config, client=client)
    assert report.ingested == [0, 1, 2] and not report.failed
    built = {int(p.name) for p in (tmp_path / "built").iterdir()}
    assert built and built <= workers and os.getpid() not in built


@pytest.mark.slow
@pytest.mark.skipif(_cuda_here(), reason="checks the error of workers without a GPU")
def test_device_cuda_on_workers_without_a_gpu_is_one_error_before_the_store(tmp_path, cluster):
    _capture_run(tmp_path)
    config = CaptureConfig(
        probe=str(tmp_path / "probe.npz"), model=str(tmp_path / "factory.py:build"), batch_size=8
    )
    with pytest.raises(WorkerSetupError) as info:
        ga.ingest(
            tmp_path / "run",
            tmp_path / "s.zarr",
            capture=config,
            device="cuda",
            client=cluster.scheduler_address,
        )
    msg = str(info.value)
    assert msg.startswith("no CUDA device on worker tcp://")
    assert "torch.cuda.is_available() is False" in msg and "run without --device cuda" in msg
    assert not (tmp_path / "s.zarr").exists()


def _kernel_threads() -> tuple[int, list[int]]:
    """torch's threads and every BLAS pool's, as the task sees them."""
    import torch
    from threadpoolctl import threadpool_info

    return torch.get_num_threads(), sorted({i["num_threads"] for i in threadpool_info()})


@pytest.mark.parametrize(("threads", "fixed"), [(1, None), (2, None), (1, 1), (2, 2)])
def test_threads_of_this_process_get_the_cores_over_the_tasks_or_the_number_given(threads, fixed):
    """Twice, so that the second run's task threads are the first run's, kept in their pool."""
    import torch

    cores = os.cpu_count() or 1
    expected = fixed or max(1, cores // threads)
    before = torch.get_num_threads()
    for _ in range(2):
        seen: list = []
        make_runner(None, None, threads, threads_per_task=fixed)(
            [(_kernel_threads,)] * 4, seen.append
        )
        assert seen == [(expected, [expected])] * 4
    assert torch.get_num_threads() == before  # the driver's own threads are as they were


@pytest.mark.slow
@pytest.mark.parametrize(("n_workers", "fixed"), [(1, None), (2, None), (1, 1)])
def test_tasks_get_their_machines_cores_over_its_task_slots(n_workers, fixed):
    """A nanny starts workers with OMP_NUM_THREADS=1: tasks get their share all the same."""
    cores = len(os.sched_getaffinity(0))
    expected = fixed or max(1, cores // n_workers)
    with (
        distributed.LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c,
        distributed.Client(c, set_as_default=False) as client,
    ):
        assert set(worker_budgets(client).values()) == {max(1, cores // n_workers)}
        seen: list = []
        run = make_runner(None, client, None, threads_per_task=fixed, preload=("torch",))
        run([(_kernel_threads,)] * 4, seen.append)
        with task_threads(fixed):  # the same, for callers that cannot pass it down
            run = make_runner(None, client, None, preload=("torch",))
            run([(_kernel_threads,)] * 4, seen.append)
    assert seen == [(expected, [expected])] * 8


@pytest.mark.slow
def test_a_worker_killed_mid_run(tmp_path, cluster):
    """SIGKILL of a worker after the first task finished: the store equals an uninterrupted run."""
    steps = list(range(0, 160, 10))
    write_trajectory(tmp_path / "run", steps, shapes=BIG)
    ga.ingest(tmp_path / "run", tmp_path / "local.zarr")
    with distributed.Client(cluster, set_as_default=False) as client:
        pids = client.run(os.getpid)
        killed = []

        def progress(done, total, _bytes):
            if done >= 1 and not killed:
                killed.append(pids[sorted(pids)[0]])
                os.kill(killed[0], signal.SIGKILL)

        try:
            report = ga.ingest(
                tmp_path / "run", tmp_path / "s.zarr", client=client, progress=progress
            )
        except Exception:  # noqa: BLE001 - the re-run below must finish it
            report = None
        assert killed
        if report is None or report.failed or report.ingested != steps:
            client.wait_for_workers(1, timeout=30)
            report = ga.ingest(tmp_path / "run", tmp_path / "s.zarr", client=client)
            assert not report.failed
    _assert_same_store(tmp_path / "local.zarr", tmp_path / "s.zarr")
