"""Checkpoints and probe sets behind fsspec URLs: ``memory://`` and a real S3 server.

The S3 server is moto's, run in-process as a real HTTP server on loopback
(as in tests/ingest/test_s3.py); s3fs and boto3 talk to it over sockets.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import xarray as xr

from gramlin_analyze.capture.probe import load_probe
from gramlin_analyze.cli import main
from gramlin_analyze.ingest import ingest
from gramlin_analyze.io.discovery import scan
from gramlin_analyze.io.registry import reader_for
from tests.trajectory import SHAPES, write_trajectory

BUCKET = "gramlin-remote-ckpts"
STEPS = [0, 10, 20, 30]


def _write_run(run: Path) -> None:
    """Safetensors and torch checkpoints (alternating), and one ``.npz``."""
    expected = write_trajectory(run, STEPS, formats=("safetensors", "torch"))
    np.savez(run / "step_40.npz", **expected[STEPS[-1]])
    (run / "notes.txt").write_text("not a checkpoint")


def _upload(run: Path, put) -> None:
    for f in sorted(run.iterdir()):
        put(f.name, f.read_bytes())


def _summary(sources) -> list[tuple]:
    return [(s.step, s.format, s.bytes, s.fingerprint, Path(str(s.path)).name) for s in sources]


def _layers(store: Path | str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Every array under ``/layers`` of a store, by path."""
    tree = xr.open_datatree(store, engine="zarr", storage_options=storage_options)
    return {
        f"{node.path}/{name}": var.values
        for node in tree["layers"].subtree
        for name, var in node.data_vars.items()
    }


def _assert_same_layers(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b) and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The run on local disk and a local ingest of it: what remote copies must equal."""
    run = tmp_path_factory.mktemp("remote") / "run"
    _write_run(run)
    store = run.parent / "local.zarr"
    report = ingest(run, store)
    assert report.ingested == [*STEPS, 40] and not report.failed
    return run, _layers(store)


@pytest.fixture
def memory_run(local_run):
    run, _ = local_run
    fs = fsspec.filesystem("memory")
    root = f"/{uuid.uuid4().hex}/ckpts"
    _upload(run, lambda name, data: fs.pipe_file(f"{root}/{name}", data))
    yield f"memory:/{root}"
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_memory_scan_matches_local(local_run, memory_run):
    run, _ = local_run
    local, remote = scan(run), scan(memory_run)
    assert [s.step for s in remote] == [*STEPS, 40]
    assert _summary(remote) == _summary(local)
    assert all(str(s.path).startswith(memory_run + "/") for s in remote)


def test_memory_readers_read_the_same_tensors(local_run, memory_run):
    run, _ = local_run
    for loc, rem in zip(scan(run), scan(memory_run), strict=True):
        with reader_for(rem.format).open(str(rem.path)) as h:
            infos = h.list_tensors()
            assert infos == reader_for(loc.format).list_tensors(loc.path)
            for name in infos:
                np.testing.assert_array_equal(
                    h.read_tensor(name), reader_for(loc.format).read_tensor(loc.path, name)
                )


def test_memory_ingest_matches_local(local_run, memory_run, tmp_path):
    _, expected = local_run
    report = ingest(memory_run, tmp_path / "remote.zarr")
    assert report.ingested == [*STEPS, 40] and not report.failed
    _assert_same_layers(_layers(tmp_path / "remote.zarr"), expected)
    tree = xr.open_datatree(tmp_path / "remote.zarr", engine="zarr")
    assert all(p.startswith(memory_run + "/") for p in tree["steps"]["source_path"].values)
    # Unchanged objects are not read again.
    again = ingest(memory_run, tmp_path / "remote.zarr")
    assert again.ingested == [] and sorted(again.skipped) == [*STEPS, 40]


def test_memory_url_needs_a_store(memory_run, capsys):
    assert main(["ingest", memory_run, "-q"]) == 2
    assert "need --store OUT" in capsys.readouterr().err


def test_memory_scan_cli_lists_the_objects(memory_run, capsys):
    assert main(["scan", memory_run]) == 0
    out = capsys.readouterr().out
    assert "5 checkpoints" in out and "step_00000.safetensors" in out and "notes" not in out


def test_missing_url_is_a_usage_error(capsys):
    assert main(["scan", f"memory://{uuid.uuid4().hex}/none"]) != 0
    assert "no such file or directory" in capsys.readouterr().err


def _probe_bytes(tmp_path: Path) -> bytes:
    rng = np.random.default_rng(0)
    path = tmp_path / "probe.npz"
    np.savez(path, inputs=rng.normal(size=(8, SHAPES["fc1.weight"][1])), labels=np.arange(8) % 3)
    return path.read_bytes()


def test_memory_probe_loads(tmp_path):
    data = _probe_bytes(tmp_path)
    url = f"memory://{uuid.uuid4().hex}/probe.npz"
    fsspec.filesystem("memory").pipe_file(url, data)
    remote, local = load_probe(url), load_probe(tmp_path / "probe.npz")
    np.testing.assert_array_equal(remote.inputs, local.inputs)
    np.testing.assert_array_equal(remote.labels, local.labels)
    assert str(remote.path) == url


# --- a real S3 server on loopback ---------------------------------------------------------


@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's S3 server with this module's bucket; (storage options, boto3 client, endpoint)."""
    s3_server.client.create_bucket(Bucket=BUCKET)
    return s3_server.storage_options, s3_server.client, s3_server.endpoint


@pytest.fixture(scope="module")
def s3_run(s3, local_run):
    options, client, _ = s3
    run, _ = local_run
    _upload(
        run, lambda name, data: client.put_object(Bucket=BUCKET, Key=f"ckpts/{name}", Body=data)
    )
    return f"s3://{BUCKET}/ckpts"


@pytest.mark.slow
def test_s3_scan_matches_local(s3, s3_run, local_run, capsys):
    options, _, endpoint = s3
    assert _summary(scan(s3_run, storage_options=options)) == _summary(scan(local_run[0]))
    opts = [
        "--storage-option", "key=testing",
        "--storage-option", "secret=testing",
        "--storage-option", f'client_kwargs={{"endpoint_url": "{endpoint}"}}',
    ]  # fmt: skip
    capsys.readouterr()
    assert main(["scan", s3_run, *opts]) == 0
    out = capsys.readouterr().out
    assert "5 checkpoints" in out and "ckpt_000010.pt" in out and "unreadable" not in out


@pytest.mark.slow
def test_s3_ingest_to_local_and_s3_stores_match_local(s3, s3_run, local_run, tmp_path):
    options, _, endpoint = s3
    _, expected = local_run
    report = ingest(s3_run, tmp_path / "from_s3.zarr", storage_options=options)
    assert report.ingested == [*STEPS, 40] and not report.failed
    _assert_same_layers(_layers(tmp_path / "from_s3.zarr"), expected)

    url = f"s3://{BUCKET}/stores/run.zarr"
    opts = [
        "--storage-option", "key=testing",
        "--storage-option", "secret=testing",
        "--storage-option", f'client_kwargs={{"endpoint_url": "{endpoint}"}}',
    ]  # fmt: skip
    assert main(["ingest", s3_run, "--store", url, *opts, "-q"]) == 0
    _assert_same_layers(_layers(url, options), expected)


@pytest.mark.slow
def test_s3_safetensors_reads_only_header_and_tensor_ranges(s3, monkeypatch, tmp_path):
    """A big tensor beside a small one: reading the small one fetches only byte ranges
    (header length, header, that tensor), never the whole object."""
    import s3fs
    from safetensors.numpy import save_file

    options, client, _ = s3
    rng = np.random.default_rng(1)
    tensors = {"big": rng.normal(size=(512, 512)), "small": rng.normal(size=(3, 4))}
    save_file(tensors, str(tmp_path / "step_1.safetensors"))
    size = (tmp_path / "step_1.safetensors").stat().st_size
    client.put_object(
        Bucket=BUCKET,
        Key="ranges/step_1.safetensors",
        Body=(tmp_path / "step_1.safetensors").read_bytes(),
    )
    gets: list[str | None] = []
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        if method == "get_object":
            gets.append(kwargs.get("Range"))
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    (source,) = scan(f"s3://{BUCKET}/ranges", storage_options=options)
    gets.clear()  # the fingerprint samples the whole small object; reading starts here
    with reader_for("safetensors", {"storage_options": options}).open(str(source.path)) as h:
        assert set(h.list_tensors()) == {"big", "small"}
        np.testing.assert_array_equal(h.read_tensor("small"), tensors["small"])
    assert gets and all(r is not None for r in gets), gets
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.split("=")[1].split("-") for r in gets))
    assert len(gets) == 3 and fetched < 1024 < size, (gets, size)


@pytest.mark.slow
def test_s3_probe_loads(s3, tmp_path):
    options, client, _ = s3
    client.put_object(Bucket=BUCKET, Key="probe/probe.npz", Body=_probe_bytes(tmp_path))
    remote = load_probe(f"s3://{BUCKET}/probe/probe.npz", storage_options=options)
    local = load_probe(tmp_path / "probe.npz")
    np.testing.assert_array_equal(remote.inputs, local.inputs)
    np.testing.assert_array_equal(remote.labels, local.labels)


def test_capture_with_a_memory_probe_matches_a_local_probe(tmp_path):
    from gramlin_analyze.capture.task import CaptureConfig
    from tests.capture_models import build_mlp

    run = tmp_path / "run"
    run.mkdir()
    model = build_mlp()
    for step in (0, 1):
        torch.save(model.state_dict(), run / f"step_{step}.pt")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
    local = tmp_path / "probe.npz"
    local.write_bytes(_probe_bytes(tmp_path))
    url = f"memory://{uuid.uuid4().hex}/probe.npz"
    fsspec.filesystem("memory").pipe_file(url, local.read_bytes())
    factory = "tests.capture_models:build_mlp"
    for name, probe in (("a", str(local)), ("b", url)):
        report = ingest(run, tmp_path / f"{name}.zarr", capture=CaptureConfig(probe, model=factory))
        assert report.ingested == [0, 1] and not report.failed
    a = xr.open_datatree(tmp_path / "a.zarr", engine="zarr")
    b = xr.open_datatree(tmp_path / "b.zarr", engine="zarr")
    for layer in ("layers/0", "layers/2"):
        for var in ("input_grad", "weight"):
            np.testing.assert_array_equal(a[layer][var].values, b[layer][var].values)
