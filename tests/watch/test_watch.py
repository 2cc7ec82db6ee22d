"""``watch`` in this process: which checkpoints count as complete, a watch that stops when
idle or asked, and the command line's refusals (issue 15, point 4)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gramlin_analyze as ga
from gramlin_analyze.cli import main
from gramlin_analyze.ingest.complete import Completeness
from gramlin_analyze.ingest.watch import pid_alive
from tests.watch.helpers import age, arrays

SETTLE = 0.5


def weights(rng, shapes=(("fc1.weight", (8, 5)), ("fc2.weight", (3, 8)))) -> dict:
    return {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in shapes}


def test_only_complete_checkpoints_are_ready(tmp_path, rng):
    run = tmp_path / "run"
    run.mkdir()
    done = run / "step_00010.pt"
    torch.save(weights(rng), done)
    age(done, 5)
    # a torch.save cut short: settled, but its zip directory is missing, so it does not parse
    whole = run / "step_00020.pt.tmp"
    torch.save(weights(rng), whole)
    cut = run / "step_00020.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    age(cut, 5)
    # still being written: modified just now
    torch.save(weights(rng), run / "step_00030.pt")
    # Hugging Face's staging directory, complete inside but not renamed yet
    staging = run / "tmp-checkpoint-40"
    staging.mkdir()
    save_file(weights(rng), str(staging / "model.safetensors"))
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    # a Trainer directory whose weights are written while its optimizer state still is
    partial = run / "checkpoint-50"
    partial.mkdir()
    save_file(weights(rng), str(partial / "model.safetensors"))
    age(partial / "model.safetensors", 5)
    (partial / "optimizer.pt").write_bytes(b"\0" * 64)

    c = Completeness(run, SETTLE)
    assert c.ready() == {}  # one look is not enough: the stat must hold at two looks
    ready = c.ready()
    assert list(ready) == [str(done)]
    age(run / "step_00030.pt", 5)
    age(partial / "optimizer.pt", 5)
    c.ready()
    assert sorted(c.ready()) == sorted(
        [str(done), str(run / "step_00030.pt"), str(partial / "model.safetensors")]
    )


def test_watch_ingests_analyzes_and_stops_when_idle(tmp_path, rng):
    run = tmp_path / "run"
    run.mkdir()
    saved = {}
    for step in (0, 5):
        sd = weights(rng)
        torch.save(sd, run / f"step_{step:05d}.pt")
        age(run / f"step_{step:05d}.pt", 5)
        saved[step] = sd
    store = tmp_path / "s.zarr"
    passes = []
    report = ga.watch(
        run,
        store,
        settle_seconds=SETTLE,
        analyze=True,
        until_idle=0.6,
        poll_seconds=0.05,
        on_pass=passes.append,
    )
    assert report.stopped_by == "idle" and report.ingested == [0, 5] and report.exit_code == 0
    assert len(passes) == 1 and passes[0].analyzed > 0
    a = arrays(store)
    for i, step in enumerate((0, 5)):
        w = saved[step]["fc1.weight"].numpy()
        assert np.array_equal(a["layers/fc1/weight"][i], w)
        # stable rank |W|_F^2 / |W|_2^2 in float64, independently of the reducers
        w64 = w.astype(np.float64)
        want = np.sum(w64**2) / np.linalg.norm(w64, 2) ** 2
        layer = list(a["metrics/layer"][:]).index("fc1")
        np.testing.assert_allclose(a["metrics/stable_rank"][i, layer], want, rtol=1e-6)


def test_watch_stops_when_asked_and_a_new_watch_resumes(tmp_path, rng):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(weights(rng), run / "step_00000.pt")
    age(run / "step_00000.pt", 5)
    store = tmp_path / "s.zarr"
    stop = threading.Event()
    first = ga.watch(
        run,
        store,
        settle_seconds=SETTLE,
        poll_seconds=0.05,
        stop=stop,
        on_pass=lambda p: stop.set(),
    )
    assert first.stopped_by == "stop" and first.ingested == [0]
    torch.save(weights(rng), run / "step_00007.pt")
    age(run / "step_00007.pt", 5)
    second = ga.watch(run, store, settle_seconds=SETTLE, until_idle=0.3, poll_seconds=0.05)
    assert second.ingested == [7]  # step 0 is unchanged: not read again
    assert list(arrays(store)["steps/step"][:]) == [0, 7]


def test_pid_alive_tells_a_running_process_from_an_exited_one():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(proc.pid)
    finally:
        proc.kill()
    for _ in range(200):  # killed but not yet reaped: a zombie is not alive
        if not pid_alive(proc.pid):
            break
        threading.Event().wait(0.01)
    assert not pid_alive(proc.pid)
    proc.wait()


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--analyze"], "--analyze act after each checkpoint of a live run: add --watch"),
        (["--watch", "--pid", "999999999"], "--pid 999999999: no such process"),
        (["--watch", "--poll", "0"], "--poll must be a positive number"),
        (["--watch", "--until-idle", "-1"], "--until-idle must be a positive number"),
    ],
)
def test_the_command_refuses_bad_watch_options(tmp_path, capsys, extra, says):
    run = tmp_path / "run"
    run.mkdir()
    code = main(["ingest", str(run), "--store", str(tmp_path / "s.zarr"), *extra])
    assert code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_the_command_watches_until_idle(tmp_path, rng, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_file(weights(rng), str(run / "step_00003.safetensors"))
    age(run / "step_00003.safetensors", 5)
    store = tmp_path / "s.zarr"
    args = ["ingest", str(run), "--store", str(store), "--watch", "--until-idle", "0.5"]
    assert main([*args, "--settle", str(SETTLE), "--poll", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "watch pass 1: steps 3 ingested" in out
    assert "watched until idle: 1 checkpoint(s) ingested in 1 pass(es), 0 failed" in out
    assert Path(store, "zarr.json").is_file()


@pytest.mark.slow
def test_the_command_analyzes_and_writes_the_report(tmp_path, rng, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    for step in (0, 4):
        save_file(weights(rng), str(run / f"step_{step:05d}.safetensors"))
        age(run / f"step_{step:05d}.safetensors", 5)
    store, html = tmp_path / "s.zarr", tmp_path / "live.html"
    args = [
        "ingest",
        str(run),
        "--store",
        str(store),
        "--watch",
        "--analyze",
        "--report",
        str(html),
    ]
    assert main([*args, "--until-idle", "0.5", "--settle", str(SETTLE), "--poll", "0.05"]) == 0
    assert f"report {html}" in capsys.readouterr().out
    page = html.read_text()
    assert page.lower().startswith("<!doctype html>") and "stable rank" in page.lower()
    assert arrays(store)["metrics/stable_rank"].shape == (2, 2)
