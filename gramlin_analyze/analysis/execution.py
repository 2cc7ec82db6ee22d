"""Running one ``analyze``: the (step, layer) tasks, and each layer's phase 2 once its
last task is done."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from gramlin_analyze.analysis import phase2
from gramlin_analyze.analysis.output import MetricsOutput
from gramlin_analyze.analysis.plan import JobPlan, RunPlan
from gramlin_analyze.analysis.report import AnalyzeReport
from gramlin_analyze.analysis.scratch import hold_scratch, release_scratch
from gramlin_analyze.analysis.task import TaskResult
from gramlin_analyze.scheduling import kernel_threads, make_runner
from gramlin_analyze.store import INPUTS

__all__ = ["Execution"]


class Execution:
    """The tasks of one run, and each layer's phase 2 once its last task is done.

    Phase 2 of a layer reads only that layer's phase-1 results, so it runs (in
    the driver, on its own threads) while the tasks of the layers after it do.
    NumPy and zarr release the GIL; the buffer's lock serializes the bookkeeping.
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
    ):
        self.out, self.run_, self.plan, self.report = out, run, plan, report
        self.progress, self.recompute = progress, recompute
        self.left = {layer: 0 for layer in run.layers}
        for _, layer in plan.jobs:
            self.left[layer] += 1
        self.done = 0
        self.total = 0
        self.phase2: list[Future] = []
        self.pool: ThreadPoolExecutor | None = None

    def start_phase2(self, layer: str) -> None:
        assert self.pool is not None, "start_phase2 runs inside run()"
        chain = phase2.LayerChain(self.out, self.run_, layer, self.recompute)
        # Looked up at each call: the module's function is the seam tests replace.
        self.phase2.append(self.pool.submit(phase2.layer_phase2, chain))

    def on_done(self, res: TaskResult) -> None:
        """Record a finished task; start its layer's phase 2 after the layer's last one."""
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
            self.start_phase2(layer)
        if self.progress:
            self.progress(self.done, self.total, 0)

    def run(self, tasks: list, *, workers, scheduler, threads) -> None:
        """Every task and phase 2; what finished is kept even when one failed."""
        cores = os.cpu_count() or 1
        self.total = len(tasks)
        self.pool = phase2.phase2_pool(max(1, min(threads or 2 * cores, len(self.run_.layers))))
        if self.progress:
            self.progress(0, len(tasks), 0)
        # The BLAS thread limit is process-wide: set it here to what the threaded
        # runner sets for its tasks, so it does not change under a running phase 2.
        n_run = max(1, min(threads or 2 * cores, len(tasks) or 1))
        hold_scratch()
        try:
            with kernel_threads(max(1, cores // n_run)):
                for layer in self.run_.layers:
                    if self.left[layer] == 0:  # nothing new here; its chain may need phase 2
                        self.start_phase2(layer)
                if tasks:
                    make_runner(workers, scheduler, threads)(tasks, self.on_done)
                for fut in self.phase2:
                    fut.result()
        finally:
            for fut in self.phase2:  # after an error: what has not started never will
                fut.cancel()
            wait_futures(self.phase2)
            release_scratch()  # dropped after a while unless another run starts
            self.out.buf.flush()
