"""``ingest --watch`` beside real training processes (issue 15, point 5).

A plain torch loop saving some checkpoints atomically and some not (one of them stalled
half-written for longer than ``--settle``), and the Hugging Face ``Trainer`` on a tiny
BERT, each write checkpoints while ``gramlin-analyze ingest --watch`` runs in another
process. The watcher is killed (SIGKILL), restarted, interrupted (SIGINT: exit 130) and
restarted again; at the end its store equals an ingest and analyze of the finished
directory bit for bit, every manifest fingerprint is that of the final files, and no
watcher ever reported a failed checkpoint (a half-written file read would be one).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gramlin_analyze as ga
from gramlin_analyze.cli import main
from tests.watch.helpers import assert_fingerprints_final, assert_same_store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SETTLE, POLL = "0.4", "0.1"
HANG_GUARD_S = 120  # only so that a hung process fails the test instead of the session

TORCH_WRITER = r"""
import io, os, sys, time
import torch
run, gate, release = sys.argv[1:4]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

def save(step, mode):
    path = os.path.join(run, f"step_{step:05d}.pt")
    if mode == "atomic":  # written under a scratch name, then renamed
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        return
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    data = buf.getvalue()
    with open(path, "wb") as f:  # the final name, half of it first
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(1.0 if mode == "stall" else 0.1)  # stall: longer than --settle
        f.write(data[len(data) // 2 :])

modes = ["atomic", "direct", "atomic", "direct", "stall", "atomic"]
for step in range(30):
    if step == 15:
        print("gate", flush=True)
        while not os.path.exists(gate):
            time.sleep(0.02)
    if step % 5 == 0:
        save(step, modes[step // 5])
        time.sleep(0.2)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print("done", flush=True)
while not os.path.exists(release):
    time.sleep(0.02)
"""

HF_WRITER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
import transformers
from tests.hf.trainer_runs import Examples, bert_config

class Slow(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.25)  # a live run: checkpoints some time apart

    def on_save(self, args, state, control, **kw):
        if state.global_step == 2:  # training goes on once the watcher has ingested it
            while not os.path.exists(gate):
                time.sleep(0.02)

run, release, _, gate = sys.argv[1:5]
transformers.set_seed(0)
model = transformers.BertForSequenceClassification(bert_config())
args = transformers.TrainingArguments(
    output_dir=run, max_steps=6, save_steps=2, per_device_train_batch_size=4, optim="sgd",
    learning_rate=0.1, lr_scheduler_type="constant", report_to=[], use_cpu=True,
    disable_tqdm=True, logging_steps=1, dataloader_num_workers=0,
)
transformers.Trainer(
    model=model, args=args, train_dataset=Examples(32, per_token=False, seed=1), callbacks=[Slow()]
).train()
print("done", flush=True)
while not os.path.exists(release):
    time.sleep(0.02)
"""


class Proc:
    """A child process whose stdout lines are collected as they come."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.p = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line)

    def wait_for(self, text: str) -> None:
        """Until a stdout line contains ``text``."""
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            if self.p.poll() is not None and self.lines.empty():
                raise AssertionError(f"exited {self.p.returncode}: {self.p.stderr.read()}")
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"no line with {text!r} after {HANG_GUARD_S} s: {self.seen}")

    def finish(self) -> tuple[int, str]:
        """Its exit code and stderr once it exits; ``seen`` then holds every stdout line."""
        rc = self.p.wait(timeout=HANG_GUARD_S)
        self.reader.join(timeout=HANG_GUARD_S)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return rc, self.p.stderr.read()


def watcher(run: Path, store: Path, *extra: str) -> Proc:
    return Proc(
        [sys.executable, "-m", "gramlin_analyze", "ingest", str(run), "--store", str(store)]
        + ["--watch", "--analyze", "--settle", SETTLE, "--poll", POLL, *extra]
    )


def reference(run: Path, tmp_path: Path) -> Path:
    """An ingest and analyze of the finished directory, in one go."""
    ref = tmp_path / "ref.zarr"
    ga.ingest(run, ref)
    ga.analyze(ref)
    return ref


def test_watch_a_torch_loop_through_kill_interrupt_and_restart(tmp_path):
    run, store = tmp_path / "run", tmp_path / "live.zarr"
    run.mkdir()
    gate, release = tmp_path / "gate", tmp_path / "release"
    writer = Proc([sys.executable, "-c", TORCH_WRITER, str(run), str(gate), str(release)])
    first = watcher(run, store)
    first.wait_for("watch pass 1:")
    first.p.kill()  # SIGKILL: no chance to clean up
    assert first.finish()[0] == -signal.SIGKILL

    second = watcher(run, store)
    second.wait_for("watch pass 1:")  # resumes: what the first left undone
    second.p.send_signal(signal.SIGINT)
    rc, err = second.finish()
    assert rc == 130 and "stopped (SIGINT)" in err and "error" not in err
    assert main(["validate", str(store)]) == 0  # consistent as it was left

    writer.wait_for("gate")
    third = watcher(run, store, "--pid", str(writer.p.pid))
    third.wait_for("watch pass 1:")
    gate.touch()  # the second half of the run is written while the third watcher looks
    writer.wait_for("done")
    release.touch()
    rc, err = third.finish()
    assert rc == 0 and "error" not in err, err
    assert "watched until the training process exited" in third.seen[-1]
    assert writer.finish()[0] == 0
    # the third watcher ingested during the live half, not only after the writer exited
    assert sum("ingested" in line and "no new step" not in line for line in third.seen) >= 2

    assert_fingerprints_final(store, run)
    assert_same_store(store, reference(run, tmp_path))


def test_watch_a_hugging_face_trainer(tmp_path):
    run, store = tmp_path / "run", tmp_path / "live.zarr"
    run.mkdir()
    release, gate = tmp_path / "release", tmp_path / "gate"
    writer = Proc([sys.executable, "-c", HF_WRITER, str(run), str(release), str(REPO), str(gate)])
    live = watcher(run, store, "--pid", str(writer.p.pid))
    live.wait_for("watch pass 1: steps 2 ingested")  # while the Trainer waits after saving it
    gate.touch()
    writer.wait_for("done")
    release.touch()
    rc, err = live.finish()
    assert rc == 0 and "error" not in err, err
    assert writer.finish()[0] == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == [
        f"checkpoint-{k}" for k in (2, 4, 6)
    ]
    assert_fingerprints_final(store, run)
    assert_same_store(store, reference(run, tmp_path))
