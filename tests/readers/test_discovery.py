"""scan: grouping, step numbers from names and metadata, ambiguity, temp files."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from gramlin_analyze.cli import main
from gramlin_analyze.errors import StepDiscoveryError
from gramlin_analyze.io.base import CheckpointReader
from gramlin_analyze.io.discovery import scan, step_from_name
from tests.trajectory import state_dict


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("checkpoint-500", 500),
        ("step1000", 1000),
        ("step1000-tokens2B", 1000),
        ("epoch=3-step=1200.ckpt", 1200),
        ("epoch=3-step=1200-v1.ckpt", 1200),
        ("ckpt_000120.pt", 120),
        ("global_step300", 300),
        ("000700.safetensors", 700),
        ("iter_42.pth", 42),
        ("model.safetensors", None),
        ("final.pt", None),
    ],
)
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_step_from_parent_directory(tmp_path):
    assert step_from_name(tmp_path / "run" / "250" / "model.safetensors", tmp_path / "run") == 250


def _save(path, step=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(step), str(path))


def test_groups_sharded_and_hf_dirs_and_skips_temp(tmp_path):
    run = tmp_path / "run"
    # A sharded safetensors checkpoint: two shards + index -> one checkpoint.
    sd = state_dict(3)
    shard_dir = run / "step_300"
    shard_dir.mkdir(parents=True)
    save_file(
        {k: v for k, v in sd.items() if k.startswith("fc1")},
        str(shard_dir / "model-00001-of-00002.safetensors"),
    )
    save_file(
        {k: v for k, v in sd.items() if k.startswith("fc2")},
        str(shard_dir / "model-00002-of-00002.safetensors"),
    )
    weight_map = {
        k: (
            "model-00001-of-00002.safetensors"
            if k.startswith("fc1")
            else "model-00002-of-00002.safetensors"
        )
        for k in sd
    }
    (shard_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    # A Hugging Face Trainer directory.
    hf = run / "checkpoint-500"
    _save(hf / "model.safetensors", 5)
    (hf / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": 500,
                "epoch": 2.0,
                "log_history": [{"step": 500, "learning_rate": 0.01}],
            }
        )
    )
    torch.save({"state": {}}, hf / "optimizer.pt")
    # Plain files, and scratch that must be skipped.
    _save(run / "step_100.safetensors", 1)
    _save(run / "step_200.safetensors.tmp", 2)
    (run / "orbax" / "400.orbax-checkpoint-tmp-12").mkdir(parents=True)
    _save(run / "orbax" / "400.orbax-checkpoint-tmp-12" / "x.safetensors", 4)
    (run / "notes.txt").write_text("not a checkpoint")

    found = scan(run)
    assert [s.step for s in found] == [100, 300, 500]
    fmt = {s.step: s.format for s in found}
    assert fmt == {100: "safetensors", 300: "safetensors-sharded", 500: "hf-trainer"}
    assert len(next(s for s in found if s.step == 300).files) == 3


def test_ambiguity_is_an_error_and_order_resolves_it(tmp_path):
    run = tmp_path / "run"
    _save(run / "epoch=0-step=10.safetensors", 1)
    time.sleep(0.01)
    _save(run / "epoch=0-step=10-v1.safetensors", 2)
    with pytest.raises(StepDiscoveryError) as info:
        scan(run)
    assert "epoch=0-step=10.safetensors" in str(info.value) and "-v1" in str(info.value)
    kept = scan(run, order="name")
    assert len(kept) == 1 and kept[0].path.name == "epoch=0-step=10-v1.safetensors"
    assert kept.skipped and "epoch=0-step=10.safetensors" in str(kept.skipped[0][0])
    os.utime(run / "epoch=0-step=10.safetensors", (time.time() + 100, time.time() + 100))
    assert scan(run, order="mtime")[0].path.name == "epoch=0-step=10.safetensors"


def test_no_step_is_an_error_unless_ordered(tmp_path):
    run = tmp_path / "run"
    _save(run / "a.safetensors", 1)
    _save(run / "b.safetensors", 2)
    with pytest.raises(StepDiscoveryError, match="a.safetensors"):
        scan(run)
    assert [(s.step, s.path.name) for s in scan(run, order="name")] == [
        (0, "a.safetensors"),
        (1, "b.safetensors"),
    ]
    assert main(["scan", str(run), "-q"]) == 2


def test_step_from_metadata(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": state_dict(1), "global_step": 77}, run / "final.pt")
    (found,) = scan(run)
    assert found.step == 77 and found.step_origin == "metadata"


def test_fingerprint_ignores_copies_and_sees_changes(tmp_path):
    _save(tmp_path / "a" / "step_1.safetensors", 1)
    _save(tmp_path / "b" / "step_1.safetensors", 1)
    _save(tmp_path / "c" / "step_1.safetensors", 9)
    fa, fb, fc = (scan(tmp_path / d)[0].fingerprint for d in "abc")
    assert fa == fb != fc


def test_scan_reads_no_tensor_bytes(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    for s in (1, 2):
        _save(run / f"step_{s}.safetensors", s)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("scan read tensor bytes")

    for cls in CheckpointReader.__subclasses__():
        monkeypatch.setattr(cls, "read_tensor", forbidden, raising=False)
    assert main(["scan", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step_1.safetensors" in out and "safetensors" in out
