"""``kill -9`` at many points of real ``ingest`` and ``analyze`` processes.

Each command is first run whole, counting its changes to the store's files
(renames into place, removals: see ``tests/kill_at.py``). Then, from the same
starting store, it is killed just before its N-th change for N spread over
the run (the first structural writes included). After each kill the store
must open with ``xr.open_datatree``, ``validate`` must find no problem, and
the same command run again must leave the bytes of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from gramlin_analyze.store.validate import validate_store
from tests.trajectory import write_trajectory

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KILLER = REPO / "tests" / "kill_at.py"
VOLATILE = {"created_at", "modified_at"}


def _cli(store: Path, args: list[str], *, kill_at: int = 0, count_file: Path | None = None):
    env = {**os.environ, "KILL_AT": str(kill_at)}
    if count_file is not None:
        env["COUNT_FILE"] = str(count_file)
    return subprocess.run(
        [sys.executable, str(KILLER), str(store), *args, "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or ".partial" in p.name:  # a write the kill cut short; never read
            continue
        key = p.relative_to(root).as_posix()
        if key.startswith("steps/stat_key/"):  # file identities of the checkpoints, not data
            continue
        data = p.read_bytes()
        if key == "zarr.json":
            doc = json.loads(data)
            doc["attributes"] = {k: v for k, v in doc["attributes"].items() if k not in VOLATILE}
            data = json.dumps(doc, sort_keys=True).encode()
        out[key] = data
    return out


def _kill_points(total: int, n: int = 7) -> list[int]:
    """The first changes (structure), the last, and points spread between."""
    spread = np.linspace(1, total, n + 2).round().astype(int)[1:-1]
    return sorted({1, 2, 3, total, *spread.tolist()} & set(range(1, total + 1)))


def _check_kills(tmp_path: Path, start: Path, args_for, *, points: int = 5, then=None) -> None:
    """Run ``args_for(store)`` from a copy of ``start`` whole, then killed at many points.

    ``then(store)`` gives a command run after the whole run and after each
    repairing run before the bytes are compared (results derived from moved
    rows are recomputed by the next ``analyze``, not moved by a repairing ingest).
    """
    whole = tmp_path / "whole.zarr"
    shutil.copytree(start, whole, symlinks=True) if start.exists() else None
    count_file = tmp_path / "count"
    done = _cli(whole, args_for(whole), count_file=count_file)
    assert done.returncode == 0, done.stderr
    if then is not None:
        assert _cli(whole, then(whole)).returncode == 0
    want = _files(whole)
    total = int(count_file.read_text())
    assert total > 5
    for n in _kill_points(total, points):
        store = tmp_path / f"killed-{n}.zarr"
        if start.exists():
            shutil.copytree(start, store, symlinks=True)
        killed = _cli(store, args_for(store), kill_at=n)
        # The number of changes varies a little from run to run (background flushes):
        # a run that ends before its N-th change is not killed, and is checked the same way.
        assert killed.returncode in (-signal.SIGKILL, 0), (n, killed.stderr)
        if store.exists() and (store / "zarr.json").exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                xr.open_datatree(str(store), engine="zarr").load()
            assert validate_store(store) == [], n
        again = _cli(store, args_for(store))
        assert again.returncode == 0, (n, again.stderr)
        if then is not None:
            assert _cli(store, then(store)).returncode == 0
        got = _files(store)
        assert sorted(got) == sorted(want), n
        for key in want:
            assert got[key] == want[key], (n, key)
        assert validate_store(store) == []
        shutil.rmtree(store)


def test_killed_weights_ingest_inserting_steps(tmp_path):
    run = tmp_path / "run"
    write_trajectory(run, [0, 20, 40], formats=("safetensors",))
    start = tmp_path / "start.zarr"
    assert _cli(start, ["ingest", str(run), "--store", str(start)]).returncode == 0
    assert _cli(start, ["analyze", str(start), "--metrics", "gram"]).returncode == 0
    write_trajectory(
        run, [10, 30, 50], formats=("safetensors",), seed=5
    )  # in the middle and at the end
    _check_kills(
        tmp_path,
        start,
        lambda s: ["ingest", str(run), "--store", str(s)],
        then=lambda s: ["analyze", str(s), "--metrics", "gram"],
    )


def test_killed_first_analyze(tmp_path):
    run = tmp_path / "run"
    write_trajectory(run, [0, 10, 20, 30], formats=("safetensors",))
    start = tmp_path / "start.zarr"
    assert _cli(start, ["ingest", str(run), "--store", str(start)]).returncode == 0
    _check_kills(tmp_path, start, lambda s: ["analyze", str(s), "--metrics", "gram", "spectrum"])


def test_killed_capture_ingest_of_a_new_store(tmp_path):
    import torch
    from torch import nn

    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    np.savez(tmp_path / "probe.npz", inputs=x, labels=y)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    for step in (0, 5, 10):
        torch.save(model.state_dict(), run / f"step_{step:04d}.pt")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    args = [
        "--probe",
        str(tmp_path / "probe.npz"),
        "--model",
        "tests.capture_models:build_mlp",
        "--lr",
        "0.05",
    ]
    _check_kills(
        tmp_path, tmp_path / "none.zarr", lambda s: ["ingest", str(run), "--store", str(s), *args]
    )


@pytest.mark.parametrize("flagged", [True, False])
def test_a_creation_stopped_between_group_and_array_documents(tmp_path, flagged):
    """A kill after /steps's group document and before its arrays' (seen at an early
    kill point): validate says what happened instead of failing, and the next run
    finishes the store."""
    import zarr

    import gramlin_analyze as ga

    run = tmp_path / "run"
    expected = write_trajectory(run, [0, 10], formats=("safetensors",))
    store = tmp_path / "s.zarr"
    ga.ingest(run, store)
    shutil.rmtree(store / "steps" / "step")
    zarr.open_group(str(store), mode="r+", zarr_format=3).attrs.update(
        {"consolidated_current": not flagged}
    )
    notes: list[str] = []
    problems = validate_store(store, notes=notes)
    if flagged:  # the writer's structural change was unfinished: a note, not a problem
        assert problems == [] and any("interrupted before its first step" in n for n in notes)
    else:  # a store claiming to be whole (no kill leaves this): a problem, not a crash
        assert any(p.startswith("/steps") for p in problems), problems
        return
    report = ga.ingest(run, store)
    assert not report.failed
    assert validate_store(store) == []
    tree = xr.open_datatree(str(store), engine="zarr")
    assert list(tree["steps"]["step"].values) == sorted(expected)
    for step, arrays in expected.items():
        np.testing.assert_array_equal(
            tree["layers/fc1"]["weight"].sel(step=step).values, arrays["fc1.weight"]
        )
