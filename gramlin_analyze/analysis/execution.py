"""Running one ``analyze``: the (step, layer) tasks, and each layer's phase 2 once its
last task is done, all through one task runner (threads, or a Dask cluster)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from gramlin_analyze.analysis import phase2
from gramlin_analyze.analysis.output import MetricsOutput
from gramlin_analyze.analysis.phase2 import CHAIN_FAMILIES, ChainJob, ChainResult
from gramlin_analyze.analysis.plan import JobPlan, RunPlan, chain_hashes
from gramlin_analyze.analysis.report import AnalyzeReport
from gramlin_analyze.analysis.scratch import hold_scratch, release_scratch
from gramlin_analyze.analysis.task import TaskResult
from gramlin_analyze.scheduling import make_runner, stop_requested
from gramlin_analyze.store import INPUTS

__all__ = ["Execution", "TaskFeed"]


class TaskFeed:
    """A run's tasks in the order they start: added work (phase 2) first, then the rest.

    The runners take the next task whenever a slot is free and after each
    finished one, whose callback may have added one: so a layer's phase 2
    starts while the next layers' tasks still run. It runs dry while the last
    tasks run and may be fed again by their callbacks. Its length is the
    number of tasks given at the start: what the runner sizes its threads by,
    as when it got a list.
    """

    def __init__(self, tasks: Iterable[tuple]):
        self.rest = deque(tasks)
        self.first: deque[tuple] = deque()
        self.size = len(self.rest)

    def add(self, task: tuple) -> None:
        self.first.append(task)

    def __iter__(self) -> TaskFeed:
        return self

    def __next__(self) -> tuple:
        if self.first:
            return self.first.popleft()
        if self.rest:
            return self.rest.popleft()
        raise StopIteration

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return bool(self.first or self.rest)


class Execution:
    """The tasks of one run, and each layer's phase 2 once its last task is done.

    Phase 2 of a layer reads only that layer's stored results, so it runs as a
    task of its own while the tasks of the layers after it do. The driver only
    records what tasks return (scalars) in the scalar buffer.
    """

    def __init__(
        self,
        out: MetricsOutput,
        run: RunPlan,
        plan: JobPlan,
        report: AnalyzeReport,
        *,
        progress: Callable[[int, int, int], None] | None,
        recompute: bool,
        store: tuple[str, dict | None],
    ):
        self.out, self.run_, self.plan, self.report = out, run, plan, report
        self.progress, self.recompute, self.store = progress, recompute, store
        self.left = {layer: 0 for layer in run.layers}
        for _, layer in plan.jobs:
            self.left[layer] += 1
        self.done = 0
        self.total = 0
        self.hashes = {
            fam: chain_hashes(fam, run.ok, run.fps, run.lr)
            for fam in CHAIN_FAMILIES
            if fam in run.families
        }
        self.feed = TaskFeed(())

    def chain_job(self, layer: str) -> ChainJob | None:
        """The layer's phase 2: each chain from its first step whose provenance is stale."""
        ok, col = self.run_.ok, self.out.layer_index[layer]
        starts = {}
        for fam, hashes in self.hashes.items():
            if fam not in self.run_.layer_fams[layer]:
                continue
            prov = self.out.buf.get(f"{INPUTS}/{fam}_phase2")[:, col]
            pos = next(
                (p for p, i in enumerate(ok) if self.recompute or prov[i] != hashes[i]), None
            )
            if pos is not None:
                starts[fam] = pos
        return self.job(layer, starts) if starts else None

    def job(self, layer: str, starts: dict[str, int]) -> ChainJob:
        run = self.run_
        # The segment length is read here, at each job: the module's value is the seam tests set.
        seconds = phase2.SEGMENT_SECONDS
        grams = "gram" in run.layer_fams[layer]  # every ok step's Gram is current after phase 1
        return ChainJob(
            self.out.run_token, layer, tuple(run.ok), run.steps, run.lr, starts, seconds, grams
        )

    def phase2_pending(self) -> bool:
        """Whether a layer without new (step, layer) tasks still needs its phase 2."""
        return any(
            self.left[layer] == 0 and self.chain_job(layer) is not None
            for layer in self.run_.layers
        )

    def start_phase2(self, job: ChainJob | None) -> None:
        if job is not None and not stop_requested():
            # Looked up at each call: the module's function is the seam tests replace.
            self.feed.add((phase2.layer_chain_task, *self.store, job))
            self.report.phase2_tasks += 1

    def on_done(self, res: TaskResult | ChainResult) -> None:
        """Record a finished task; queue its layer's phase 2 after the layer's last one."""
        if isinstance(res, ChainResult):
            self.on_chain(res)
            return
        self.done += 1
        i, layer = res.index, res.layer
        buf, j = self.out.buf, self.out.layer_index[layer]
        for name, value in res.scalars.items():
            buf.set(name, i, j, value)
        for fam in self.plan.jobs[(i, layer)]:
            buf.set(f"{INPUTS}/{fam}", i, j, self.plan.wanted[(i, layer, fam)])
            self.report.computed += 1
        if (i, layer) in self.plan.in_task:  # its Gram change came with it
            buf.set(f"{INPUTS}/gram_phase2", i, j, self.plan.in_task[(i, layer)])
        if res.nonfinite:
            self.report.nonfinite.append((int(self.run_.steps[i]), layer))
        self.left[layer] -= 1
        if self.left[layer] == 0:
            self.start_phase2(self.chain_job(layer))
        if self.progress:
            self.progress(self.done, self.total, 0)

    def on_chain(self, res: ChainResult) -> None:
        """Record a phase-2 segment (values, then their provenance); queue the rest."""
        buf, j = self.out.buf, self.out.layer_index[res.layer]
        for fam, rows in res.rows.items():
            for i, values in rows.items():
                for name, value in values.items():
                    buf.set(name, i, j, value)
                buf.set(f"{INPUTS}/{fam}_phase2", i, j, self.hashes[fam][i])
        if res.left:
            self.start_phase2(self.job(res.layer, res.left))

    def run(self, tasks: list, *, workers, scheduler, threads) -> None:
        """Every task and phase 2; what finished is kept even when one failed."""
        self.total = len(tasks)
        self.feed = TaskFeed(tasks)
        if self.progress:
            self.progress(0, len(tasks), 0)
        for layer in self.run_.layers:
            if self.left[layer] == 0:  # nothing new here; its chain may need phase 2
                self.start_phase2(self.chain_job(layer))
        hold_scratch()
        try:
            if self.feed:
                make_runner(workers, scheduler, threads)(self.feed, self.on_done)
        finally:
            release_scratch()  # dropped after a while unless another run starts
            self.out.buf.flush()
