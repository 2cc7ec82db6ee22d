"""Listing a ``torch.save``'d state dict from its pickle, without torch (io/torch_listing.py).

The reference is torch itself: every file is written by ``torch.save`` and the
listing must equal what ``torch.load`` gives, tensor by tensor. Files the
pickle reader does not take (training checkpoints, legacy files, odd dtypes,
damage, code) must fall back to torch, which keeps its errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from gramlin_analyze.errors import UnsafeCheckpointError
from gramlin_analyze.io.registry import get_reader
from gramlin_analyze.io.torch_listing import list_state_dict
from gramlin_analyze.io.torch_pickle import load_torch_file


def by_torch(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` as ``torch.load`` gives them (the independent reference)."""
    return {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in load_torch_file(path).items()
    }


def listed(path: Path) -> dict[str, tuple[tuple[int, ...], str]] | None:
    infos = list_state_dict(path)
    return None if infos is None else {k: (i.shape, i.dtype) for k, i in infos.items()}


def _model() -> nn.Module:
    torch.manual_seed(0)
    head = nn.Linear(5, 7)
    net = nn.Sequential(nn.Embedding(7, 5), nn.LayerNorm(5), nn.BatchNorm1d(5), head)
    head.weight = net[0].weight  # tied, as GPT-2's head and embedding: one storage, two names
    return net


def _views() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(6, 5, dtype=torch.float64, generator=g)
    return {
        "whole": t,
        "slice": t[1:4, ::2],  # an offset and strides into a shared storage
        "transposed": t.T,
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3),
        "int32": torch.arange(5, dtype=torch.int32),
        "half": torch.ones(2, 3, dtype=torch.float16),
        "bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "bool": torch.ones(2, dtype=torch.bool),
        "complex": torch.ones(2, dtype=torch.complex64),
        "uint8": torch.ones(3, dtype=torch.uint8),
        "int8": torch.ones(3, dtype=torch.int8),
        "int16": torch.ones(3, dtype=torch.int16),
        "complex128": torch.ones(1, dtype=torch.complex128),
    }


STATE_DICTS = {
    "model": lambda: _model().state_dict(),
    "views": _views,
    "parameters": lambda: {"p": nn.Parameter(torch.randn(3, 2)), "q": torch.zeros(4)},
    "plain_dict": lambda: dict(_model().state_dict()),
}


@pytest.mark.parametrize("name", list(STATE_DICTS))
def test_bare_state_dicts_are_listed_as_torch_loads_them(tmp_path, name):
    path = tmp_path / f"{name}.pt"
    torch.save(STATE_DICTS[name](), path)
    fast = listed(path)
    assert fast is not None, "a bare state dict must be listed from its pickle"
    assert fast == by_torch(path)
    assert list(fast) == list(by_torch(path))  # the saved order too
    infos = get_reader("torch").list_tensors(path)
    assert {k: (i.shape, i.dtype) for k, i in infos.items()} == fast


class _RunsShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


FALLBACKS = {
    "training_checkpoint": lambda: {"model": _model().state_dict(), "step": 7},
    "extras_beside_weights": lambda: {"w": torch.randn(2), "lr": 0.1},
    "float8": lambda: {"w": torch.randn(2).to(torch.float8_e4m3fn)},
    "empty": dict,
    "a_tensor": lambda: torch.ones(3),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_other_files_are_left_to_torch(tmp_path, name):
    path = tmp_path / f"{name}.pt"
    torch.save(FALLBACKS[name](), path)
    assert list_state_dict(path) is None


def test_legacy_files_are_left_to_torch(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(_views(), path, _use_new_zipfile_serialization=False)
    assert list_state_dict(path) is None
    assert get_reader("torch").list_tensors(path).keys() == _views().keys()


def test_a_state_dict_holding_code_is_refused_by_torch(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "b": _RunsShellCommand(f"touch {marker}")}, path)
    assert list_state_dict(path) is None
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        get_reader("torch").list_tensors(path)
    assert not marker.exists()


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a zip archive member by member, ``edit(name, bytes)`` deciding each (None: drop)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


@pytest.mark.parametrize("damage", ["short_storage", "missing_storage", "no_pickle"])
def test_damaged_archives_are_left_to_torch(tmp_path, damage):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.randn(4, 3)}, good)
    assert listed(good) == {"w": ((4, 3), "float32")}

    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith("/data/0"):
            return (
                data[:-4]
                if damage == "short_storage"
                else None
                if damage == "missing_storage"
                else data
            )
        if name.endswith("data.pkl") and damage == "no_pickle":
            return None
        return data

    _rewrite(good, bad, edit)
    assert list_state_dict(bad) is None


def test_listing_a_state_dict_does_not_import_torch(tmp_path):
    """The ingest driver lists every checkpoint to plan; torch's import is 1.5 s of it."""
    path = tmp_path / "model.pt"
    torch.save(_model().state_dict(), path)
    script = f"""
import sys
from gramlin_analyze.io.registry import get_reader
infos = get_reader("torch").list_tensors({str(path)!r})
print(sorted((k, i.shape, i.dtype) for k, i in infos.items()))
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    listing, imported = out.stdout.strip().splitlines()
    assert imported == "False"
    assert listing == str(sorted((k, v[0], v[1]) for k, v in by_torch(path).items()))
