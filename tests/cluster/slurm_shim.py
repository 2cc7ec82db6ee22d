"""Stand-ins for SLURM's ``sbatch``, ``squeue`` and ``scancel`` that run jobs on this machine.

dask-jobqueue's ``SLURMCluster`` submits a job script with ``sbatch SCRIPT``
and reads the job id from its output, and cancels with ``scancel ID``. Here
``sbatch`` starts the script with bash in a session of its own, detached (its
output in ``STATE/<id>.out``, the script kept in ``STATE``), and the job id is that session's id (its pid);
``squeue`` lists the jobs whose processes are alive; ``scancel`` sends the
session SIGTERM, then SIGKILL to what is left after a few seconds, as SLURM
does. ``STATE`` is ``$SLURM_SHIM_STATE``; every job id started is appended to
``STATE/started`` and every one cancelled to ``STATE/cancelled``. With
``SLURM_SHIM_NEVER_START=1``, ``sbatch`` accepts a job and starts nothing (a
job that stays queued).

The test suite's fixture writes one small executable per command that runs
``python slurm_shim.py COMMAND ARGS...``. Linux only (processes are found in
``/proc``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

KILL_WAIT_S = 5.0  # SLURM's KillWait: SIGTERM, then SIGKILL after this


def session_alive(sid: int) -> bool:
    """Whether any process of session ``sid`` is alive (zombies are not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it exited while we looked
            continue
        fields = text[text.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state not in ("Z", "X"):
            return True
    return False


def _record(state: Path, name: str, job_id: int) -> None:
    with open(state / name, "a") as f:
        f.write(f"{job_id}\n")


def sbatch(state: Path, args: list[str]) -> int:
    script = Path(args[-1])
    if os.environ.get("SLURM_SHIM_NEVER_START") == "1":
        n = len((state / "started").read_text().split()) if (state / "started").exists() else 0
        job_id = 900_000 + n
    else:
        # The script is a temporary file dask-jobqueue deletes once sbatch returns.
        copy = state / f"job-{time.time_ns()}.sh"
        shutil.copy(script, copy)
        with open(f"{copy}.out", "wb") as out:
            proc = subprocess.Popen(
                ["bash", str(copy)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        job_id = proc.pid  # bash may not have opened the script yet: it keeps its name
        Path(f"{copy}.out").rename(state / f"{job_id}.out")
    _record(state, "started", job_id)
    print(f"Submitted batch job {job_id}")
    return 0


def squeue(state: Path, args: list[str]) -> int:
    started = (state / "started").read_text().split() if (state / "started").exists() else []
    print("JOBID")
    for job_id in started:
        if session_alive(int(job_id)):
            print(job_id)
    return 0


def scancel(state: Path, args: list[str]) -> int:
    for job_id in map(int, args):
        _record(state, "cancelled", job_id)
        try:
            os.killpg(job_id, signal.SIGTERM)
        except ProcessLookupError:  # never started, or already ended
            continue
        deadline = time.monotonic() + KILL_WAIT_S
        while session_alive(job_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.killpg(job_id, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 0


def main(argv: list[str]) -> int:
    state = Path(os.environ["SLURM_SHIM_STATE"])
    command = {"sbatch": sbatch, "squeue": squeue, "scancel": scancel}[argv[0]]
    return command(state, argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
