"""Workers reuse freed memory for large temporaries (gramlin_analyze/allocator.py).

A Dask nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns
glibc's dynamic mmap threshold off: every block over 128 KiB is a fresh mapping
whose pages fault in again. What is measured is the page faults (``ru_minflt``)
of allocating and touching the same 16 MiB block again and again, in a fresh
process with the nanny's environment, and on a real nanny-started worker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gramlin_analyze import allocator

distributed = pytest.importorskip("distributed")
glibc_only = pytest.mark.skipif(
    allocator._glibc() is None, reason="glibc's mallopt (Linux with glibc) is what is tuned"
)

#: Page faults of 10 rounds of two 12 MiB blocks (an array and its double, as a reducer's
#: float64 copies), after one round to warm up. Untuned, each round's blocks fault in again.
FAULTS = """
import resource
import numpy as np
from gramlin_analyze.allocator import keep_freed_memory, release_freed_memory


def one_round() -> None:
    a = np.ones(12 << 17)
    c = a * 2
    del a, c


def faults() -> int:
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_round()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""
ROUNDS_FAULTING = 10 * 500  # a fraction of the 10 x 6,144 pages: huge pages fault fewer times


def run(script: str, **env: str) -> str:
    full = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", **env}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS + script], capture_output=True, text=True, env=full
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@glibc_only
def test_freed_blocks_are_reused_under_the_nannys_setting():
    untuned = int(run("print(faults())"))
    tuned, kept = run("k = keep_freed_memory(); print(faults(), k)").split()
    assert untuned > ROUNDS_FAULTING, "the nanny's setting maps every large block anew"
    assert kept == "True"
    assert int(tuned) < untuned / 8, (tuned, untuned)


@glibc_only
def test_released_memory_goes_back_and_the_switch_turns_it_off():
    # after release_freed_memory the kept pages are returned: the next round faults again
    script = """
keep_freed_memory()
faults()
release_freed_memory()
import resource
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    assert int(run(script)) > ROUNDS_FAULTING / 10
    off = run("print(keep_freed_memory(), faults())", GRAMLIN_MALLOPT="0").split()
    assert off[0] == "False" and int(off[1]) > ROUNDS_FAULTING


def _worker_faults() -> int:
    """``faults()`` of :data:`FAULTS`, run where a task runs."""
    scope: dict = {}
    exec(FAULTS, scope)
    return scope["faults"]()


@glibc_only
def test_a_nanny_started_worker_is_tuned_by_a_run(tmp_path):
    """A real LocalCluster (its nanny sets MALLOC_TRIM_THRESHOLD_): our tasks fault little."""
    from gramlin_analyze.scheduling import make_runner

    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c,
        distributed.Client(c, set_as_default=False) as client,
    ):
        (before,) = client.run(_worker_faults).values()
        seen: list = []
        make_runner(None, client, None, threads_per_task=1)([(_worker_faults,)] * 2, seen.append)
    assert before > ROUNDS_FAULTING, "the nanny's environment should make every round fault"
    assert max(seen) < before / 8, (seen, before)
