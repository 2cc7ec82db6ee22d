"""A full disk, permission denied and an unreachable remote store: one line naming
the store, exit 2, nothing blamed on the checkpoints, and a store the next run finishes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gramlin_analyze.store import GramlinStore
from gramlin_analyze.store.validate import validate_store
from tests.trajectory import write_trajectory

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"fc1.weight": (400, 500), "fc1.bias": (400,), "fc2.weight": (3, 400)}


def _cli(
    *args: str, env: dict | None = None, user: list[str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [*(user or []), sys.executable, "-m", "gramlin_analyze", *args, "--quiet"]
    return subprocess.run(
        cmd, cwd=REPO, env=env or os.environ.copy(), capture_output=True, text=True, timeout=300
    )


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a real file system that fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_stops_the_run_with_one_line_and_the_next_run_finishes(tmp_path, small_disk):
    run = tmp_path / "run"
    # 6 checkpoints of about 0.8 MB of weights each: the third or so fills the disk.
    expected = write_trajectory(run, [0, 1, 2, 3, 4, 5], formats=("safetensors",), shapes=SHAPES)
    store = small_disk / "s.zarr"
    full = _cli("ingest", str(run), "--store", str(store))
    assert full.returncode == 2, full.stderr
    line = _one_line(full.stderr)
    assert str(store) in line and "no space left" in line and "run the same command again" in line
    assert "step_" not in line  # the checkpoints are not blamed
    man = GramlinStore(store).manifest()
    assert "failed" not in set(man["status"])
    assert validate_store(store) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = _cli("ingest", str(run), "--store", str(store))
    assert again.returncode == 0, again.stderr
    man = GramlinStore(store).manifest()
    assert list(man["step"]) == sorted(expected) and set(man["status"]) == {"ok"}
    import xarray as xr

    tree = xr.open_datatree(str(store), engine="zarr")
    for step, arrays in expected.items():
        np.testing.assert_array_equal(
            tree["layers/fc1"]["weight"].sel(step=step).values, arrays["fc1.weight"]
        )
    assert validate_store(store) == []


def test_permission_denied_names_the_store():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the command as another user")
    import tempfile

    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*nobody, sys.executable, "-c", "import gramlin_analyze"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(
            f"this interpreter cannot run as another user here: {probe.stderr.strip()[-200:]}"
        )
    base = Path(tempfile.mkdtemp(prefix="gramlin-perm-"))  # pytest's own tmp is private to root
    try:
        base.chmod(0o755)
        run = base / "run"
        write_trajectory(run, [0, 1], formats=("safetensors",))
        store = base / "s.zarr"
        assert _cli("ingest", str(run), "--store", str(store)).returncode == 0
        write_trajectory(run, [2], formats=("safetensors",), seed=2)
        for p in [run, *run.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
        env = {**os.environ, "HOME": str(base), "PYTHONDONTWRITEBYTECODE": "1"}
        denied = _cli("ingest", str(run), "--store", str(store), env=env, user=nobody)
        assert denied.returncode == 2, denied.stderr
        line = _one_line(denied.stderr)
        assert str(store) in line and "permission denied" in line
        assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    finally:
        shutil.rmtree(base)


def test_an_unreachable_remote_store_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    write_trajectory(run, [0], formats=("safetensors",))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    url = "s3://bucket/run.zarr"
    opts = [
        "--storage-option",
        f'client_kwargs={{"endpoint_url": "http://127.0.0.1:{port}"}}',
        "--storage-option",
        'config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}}',
    ]
    for args in (
        ["validate", url, *opts],
        ["analyze", url, *opts],
        ["ingest", str(run), "--store", url, *opts],
    ):
        done = _cli(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        line = _one_line(done.stderr)
        assert url in line and "Traceback" not in done.stderr, line


@pytest.fixture
def s3_behind_proxy():
    """A real S3 server (moto's) reached through a loopback proxy that can be cut."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    from tests.tcp_proxy import TcpProxy

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = TcpProxy((host, port))
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="lost")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        **creds,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    try:
        yield proxy, client, env
    finally:
        proxy.close()
        server.stop()


@pytest.mark.parametrize("cut_after", [30_000, 600_000])
def test_an_endpoint_lost_mid_run_is_one_line_and_the_next_run_finishes(
    tmp_path, s3_behind_proxy, cut_after
):
    """The connection to S3 is cut after ``cut_after`` bytes of requests: early in the
    store's first structural writes, in the first steps, and later."""
    proxy, client, env = s3_behind_proxy
    run = tmp_path / "run"
    expected = write_trajectory(run, list(range(6)), formats=("safetensors",), shapes=SHAPES)
    url = f"s3://lost/cut{cut_after}.zarr"
    opts = [
        "--storage-option",
        f'client_kwargs={{"endpoint_url": "{proxy.url}", "region_name": "us-east-1"}}',
        "--storage-option",
        'config_kwargs={"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}}',
    ]
    proxy.cut_after(cut_after)
    lost = _cli("ingest", str(run), "--store", url, *opts, env=env)
    assert lost.returncode == 2, lost.stderr
    line = _one_line(lost.stderr)
    assert url in line and "Traceback" not in lost.stderr, line
    assert "step_" not in line  # the checkpoints are not blamed
    proxy.restore()

    again = _cli("ingest", str(run), "--store", url, *opts, env=env)
    if again.returncode != 0 and "--break-lock" in line:  # the lost writer said so
        again = _cli("ingest", str(run), "--store", url, *opts, "--break-lock", env=env)
    assert again.returncode == 0, again.stderr
    assert validate_store(url, storage_options=_options(proxy)) == []
    import xarray as xr

    tree = xr.open_datatree(url, engine="zarr", storage_options=_options(proxy))
    assert list(tree["steps"]["step"].values) == sorted(expected)
    assert set(tree["steps"]["status"].values) == {"ok"}
    for step, arrays in expected.items():
        np.testing.assert_array_equal(
            tree["layers/fc1"]["weight"].sel(step=step).values, arrays["fc1.weight"]
        )
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="lost").get("Contents", [])}
    assert f"cut{cut_after}.zarr.lock" not in keys


def _options(proxy) -> dict:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"},
    }
