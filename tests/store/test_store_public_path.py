"""zarr's public API alone writes the same store as the shortcuts through its internals.

The whole pipeline (a capture ingest with inserted and appended steps, then
``analyze``) runs twice in fresh processes, once with ``GRAMLIN_ZARR_PUBLIC=1``;
every file is compared byte for byte, the root document's timestamps and the
checkpoints' file identities aside.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import sys
from pathlib import Path

import gramlin_analyze as ga
from gramlin_analyze.capture.task import CaptureConfig
from tests.analysis.test_analyze import LR, FACTORY, _run

base = Path(sys.argv[1])
run, x, y = _run(base, [0, 2, 4, 6, 8])
later = [base / "step_0004.pt", base / "step_0008.pt"]
(run / "step_0004.pt").rename(later[0])
(run / "step_0008.pt").rename(later[1])
cfg = CaptureConfig(probe=str(base / "probe.npz"), model=FACTORY, batch_size=16)
store = base / "s.zarr"
ga.ingest(run, store, capture=cfg, lr=LR)
ga.analyze(store, metrics=["gram", "tl", "vc"])
for p in later:  # one step in the middle, one at the end
    p.rename(run / p.name)
ga.ingest(run, store, capture=cfg, lr=LR)
ga.analyze(store, metrics=["gram", "tl", "vc"])
"""

VOLATILE = {"created_at", "modified_at"}
#: File identities (inode, mtime) of the checkpoints: new files in each build.
STAT_KEYS = "steps/stat_key/c/"


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _root_doc(raw: bytes) -> dict:
    doc = json.loads(raw)
    doc["attributes"] = {k: v for k, v in doc["attributes"].items() if k not in VOLATILE}
    return doc


def _build(base: Path, public: bool) -> dict[str, bytes]:
    """The store's files; built at the same path both times (attributes record paths)."""
    env = {k: v for k, v in os.environ.items() if k != "GRAMLIN_ZARR_PUBLIC"}
    if public:
        env["GRAMLIN_ZARR_PUBLIC"] = "1"
    base.mkdir()
    repo = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(base)], cwd=repo, env=env, check=True, timeout=600
    )
    files = _files(base / "s.zarr")
    shutil.rmtree(base)
    return files


def test_public_api_writes_the_same_bytes(tmp_path):
    fast = _build(tmp_path / "run", public=False)
    public = _build(tmp_path / "run", public=True)
    assert sorted(fast) == sorted(public)
    assert any(k.startswith("layers/") and "/input/" in k for k in fast)  # capture data is compared
    assert any(k.startswith("metrics/") for k in fast)
    for key in fast:
        if key == "zarr.json":
            assert _root_doc(fast[key]) == _root_doc(public[key])
        elif not key.startswith(STAT_KEYS):
            assert fast[key] == public[key], key
