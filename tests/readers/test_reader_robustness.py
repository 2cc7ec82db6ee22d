"""Readers never crash the run: the damaged, hostile and special files a fuzzing
campaign found, each reported as one clear project error naming the file."""

from __future__ import annotations

import os
import pickle
import socket
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gramlin_analyze.errors import (
    CheckpointFormatError,
    CheckpointReadError,
    DecompressionLimitError,
    GramlinError,
    MissingTensorError,
    UnsafeCheckpointError,
    UsageError,
)
from gramlin_analyze.io.base import CheckpointReader, TensorInfo
from gramlin_analyze.io.discovery import scan
from gramlin_analyze.io.registry import get_reader, guess_reader, register_reader
from tests.trajectory import state_dict


def _rename_entry(path, old: bytes, new: bytes) -> None:
    """Rewrite a zip entry name in place (local and central headers), same length."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert data.count(old) == 2
    path.write_bytes(data.replace(old, new))


def test_torch_zip_with_non_utf8_entry_name_is_a_clear_error(tmp_path):
    """The TorchScript reader's recognizer runs on every .pt: a zip whose names are not
    UTF-8 is not TorchScript, and the PyTorch reader reports the damage."""
    path = tmp_path / "step_1.pt"
    torch.save(state_dict(1), path)
    _rename_entry(path, b"step_1/version", b"step_1/v\xffrsion")
    assert get_reader("torchscript").guess_can_read(path) is False
    assert guess_reader(path).name == "torch"
    try:
        get_reader("torch").list_tensors(path)
    except CheckpointFormatError as err:
        assert path.name in str(err)
    (source,) = scan(tmp_path)
    assert source.format == "torch"


def test_npz_with_damaged_deflate_stream(tmp_path):
    path = tmp_path / "step_1.npz"
    np.savez_compressed(path, w=np.random.default_rng(0).standard_normal((200, 200)))
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"\xff\x00\xff\x00"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="step_1.npz.*re-save or re-copy"):
        get_reader("npz").read_tensor(path, "w")


def test_npz_header_that_disagrees_with_its_data(tmp_path):
    """A (6, 0) shape written over a (6, 4) header: numpy would read nothing and keep going."""
    path = tmp_path / "step_1.npz"
    np.savez(path, w=np.ones((6, 4), np.float32))
    with zipfile.ZipFile(path) as archive:
        member = archive.read("w.npy").replace(b"(6, 4)", b"(6, 0)")
    with zipfile.ZipFile(path, "w") as archive:  # a valid CRC: only the header lies
        archive.writestr("w.npy", member)
    with pytest.raises(CheckpointFormatError, match=r"declares shape \(6, 0\)"):
        get_reader("npz").list_tensors(path)


def test_npz_decompression_bomb_is_refused_unless_allowed(tmp_path, monkeypatch):
    path = tmp_path / "step_1.npz"
    np.savez_compressed(path, w=np.zeros(20_000_000, np.float32))  # 80 MB in ~80 KB
    reader = get_reader("npz")
    with pytest.raises(DecompressionLimitError, match="GRAMLIN_MAX_INFLATE") as info:
        reader.read_tensor(path, "w")
    assert path.name in str(info.value)
    monkeypatch.setenv("GRAMLIN_MAX_INFLATE", "5000")
    assert reader.read_tensor(path, "w").shape == (20_000_000,)
    monkeypatch.setenv("GRAMLIN_MAX_INFLATE", "lots")
    with pytest.raises(UsageError, match="GRAMLIN_MAX_INFLATE"):
        reader.list_tensors(path)


def test_torch_zip_declaring_a_huge_member_is_refused(tmp_path):
    path = tmp_path / "step_1.pt"
    torch.save(state_dict(1), path)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("step_1/data.pkl")
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02", 0, data.find(b"PK\x05\x06"))
    while data[central + 46 : central + 46 + len(info.filename)] != info.filename.encode():
        central = data.rfind(b"PK\x01\x02", 0, central)
    data[central + 24 : central + 28] = (0xFFFF0000).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="step_1.pt"):
        get_reader("torch").list_tensors(path)


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_hostile_pickles_of_every_protocol_are_refused_as_code(tmp_path, protocol, zipped):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save(
        {"w": torch.ones(2, 2), "x": _Hostile(marker)},
        path,
        pickle_protocol=protocol,
        _use_new_zipfile_serialization=zipped,
    )
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused: it would run code"):
        get_reader("torch").list_tensors(path)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(_Hostile(marker), protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        get_reader("torch").list_tensors(plain)
    assert not marker.exists()


def test_truncated_pickle_is_corrupt_not_hostile(tmp_path):
    path = tmp_path / "step_1.pt"
    torch.save(state_dict(1), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointFormatError) as info:
        get_reader("torch").list_tensors(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


@pytest.fixture
def special_run(tmp_path):
    """A run with one real checkpoint and, named like checkpoints: a FIFO, a dangling
    link, a link to /dev/zero and a socket."""
    run = tmp_path / "run"
    run.mkdir()
    save_file(state_dict(0), run / "step_0.safetensors")
    os.mkfifo(run / "step_1.pt")
    os.symlink(run / "gone.safetensors", run / "step_2.safetensors")
    os.symlink("/dev/zero", run / "step_3.npz")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(run / "step_4.pt"))
    yield run
    sock.close()


@pytest.mark.timeout(60)
def test_scan_reports_special_files_without_opening_them(special_run):
    result = scan(special_run)
    assert [s.step for s in result] == [0]
    why = {p.name: reason for p, reason in result.skipped}
    assert "FIFO" in why["step_1.pt"] and "not opened" in why["step_1.pt"]
    assert "dangling symbolic link" in why["step_2.safetensors"]
    assert "/dev/zero" in why["step_3.npz"] and "character device" in why["step_3.npz"]
    assert "socket" in why["step_4.pt"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "reader"),
    [("step_1.pt", "torch"), ("step_2.safetensors", "safetensors"), ("step_3.npz", "npz")],
)
def test_readers_refuse_special_files_before_opening(special_run, name, reader):
    path = special_run / name
    with pytest.raises(CheckpointReadError, match="not opened|dangling") as info:
        get_reader(reader).list_tensors(path)
    assert isinstance(info.value, OSError) and name in str(info.value)
    with pytest.raises(CheckpointReadError):
        get_reader(reader).open(path)
    with pytest.raises(GramlinError):
        guess_reader(path)


@pytest.mark.timeout(60)
def test_scan_of_a_fifo_itself_is_a_usage_error(special_run):
    with pytest.raises(UsageError, match="FIFO"):
        scan(special_run / "step_1.pt")


@pytest.mark.timeout(120, method="thread")
def test_keras_file_with_a_damaged_global_heap_does_not_hang(tmp_path):
    """libhdf5 loops forever reading a layer's name from a global heap whose object
    size was changed by one bit (found by the fuzzer); the reader checks the heap first."""
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6)])
    path = tmp_path / "step_1.weights.h5"
    model.save_weights(path)
    data = bytearray(path.read_bytes())
    heap = data.find(b"GCOL\x01\x00\x00\x00")
    assert heap > 0
    data[heap + 16 + 9] ^= 0x01  # the first object's size, + 256 bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="global heap"):
        get_reader("keras").list_tensors(path)


class _FragileReader(CheckpointReader):
    """A third-party reader whose parser fails with a raw TypeError on its own format."""

    name = "fragile"
    suffixes = (".fragile",)

    def list_tensors(self, path):
        text = open(path, "rb").read()
        return {"w": TensorInfo("w", (int(text[:1]), 2), "float32")}

    def read_tensor(self, path, name):
        if name != "w":
            raise KeyError(name)
        return np.zeros(len(open(path, "rb").read()) + None)


def test_third_party_reader_exceptions_become_clear_errors(tmp_path):
    register_reader("fragile", _FragileReader, clobber=True)
    path = tmp_path / "step_1.fragile"
    path.write_bytes(b"x")
    reader = get_reader("fragile")
    with pytest.raises(CheckpointFormatError, match=r"step_1\.fragile: listing its tensors"):
        reader.list_tensors(path)
    with pytest.raises(CheckpointFormatError, match=r"reading tensor 'w' with the fragile"):
        reader.read_tensor(path, "w")
    with pytest.raises(MissingTensorError) as info:
        reader.read_tensor(path, "nope")
    assert isinstance(info.value, KeyError)
