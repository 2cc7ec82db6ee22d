"""Task results into the ``/steps`` manifest: a step is ``ok`` only once its writes are done."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

from gramlin_analyze.ingest.plan import Plan, Request, lr_for
from gramlin_analyze.ingest.task import TaskResult, error_message
from gramlin_analyze.io.discovery import CheckpointSource
from gramlin_analyze.store import GramlinStore, read_all, writable, write_all
from gramlin_analyze.store.faults import is_store_fault

if TYPE_CHECKING:
    from gramlin_analyze.ingest.driver import IngestReport

__all__ = ["Recorder"]


class Recorder:
    """Task results into the manifest.

    Rows are buffered and flushed about once a second: one column write per
    flush instead of per step. A step that finished but was not flushed when
    the process was killed is simply redone; ``ok`` is never written early.
    A result whose background writes are still running is recorded once they
    are done.
    """

    def __init__(
        self,
        gs: GramlinStore,
        report: IngestReport,
        request: Request,
        plan: Plan,
        by_index: dict[int, CheckpointSource],
        *,
        total: int,
        progress: Callable[[int, int, int], None] | None,
        on_error: Callable[[str], None] | None,
    ):
        self.gs, self.report, self.request, self.plan = gs, report, request, plan
        self.by_index = by_index
        self.total, self.progress, self.on_error = total, progress, on_error
        self.done = 0
        self.rows: list[tuple[int, dict]] = []
        self.nonfinite: dict[str, list[tuple[int, int]]] = {}
        self.deferred: list[tuple[TaskResult, Future]] = []
        self.last_flush = time.monotonic()

    def on_done(self, res: TaskResult) -> None:
        """A task returned."""
        if res.pending is not None:
            self.deferred.append((res, res.pending))
        else:
            self.record(res)
        self.drain(block=False)

    def drain(self, block: bool) -> None:
        """Record the deferred results whose writes are done (all, waiting, when ``block``)."""
        keep = []
        for res, fut in self.deferred:
            if not (block or fut.done()):
                keep.append((res, fut))
                continue
            err = fut.exception()
            if err is not None and is_store_fault(err, self.gs.url):
                raise err
            if err is not None and res.status == "ok":
                path = self.by_index[res.index].path
                res = dataclasses.replace(res, status="failed", error=error_message(err, path))
            self.record(res)
        self.deferred[:] = keep

    def record(self, res: TaskResult) -> None:
        """One step's row (and its layers' NaN/Inf counts), flushed about once a second."""
        src = self.by_index[res.index]
        report = self.report
        self.done += 1
        report.bytes_read += src.bytes
        if res.status == "ok":
            rate, rate_source = lr_for(src.step, res.lr, self.request.lr, self.plan.schedule)
            row = {
                "lr": rate,
                "epoch": res.epoch,
                "tokens_seen": res.tokens_seen,
                "lr_source": rate_source,
                "optimizer": res.optimizer,
                "optimizer_params": res.optimizer_params,
                "nonfinite": res.nonfinite,
                "error": "",
                "status": "ok",
            }
            self.rows.append((res.index, row))
            for name, n in res.layer_nonfinite.items():
                self.nonfinite.setdefault(name, []).append((res.index, n))
            report.ingested.append(src.step)
            if res.nonfinite:
                report.nonfinite[src.step] = res.nonfinite
        else:
            self.rows.append((res.index, {"error": res.error, "status": "failed"}))
            report.failed[src.step] = res.error
            if self.on_error:
                self.on_error(res.error)
        if time.monotonic() - self.last_flush > 1.0:
            self.flush()
        if self.progress:
            self.progress(self.done, self.total, report.bytes_read)

    def flush(self) -> None:
        """Per-layer NaN/Inf counts, then the rows that mark their steps ok."""
        gs = self.gs
        arrs = {name: writable(gs.layer(name)["nonfinite"]) for name in self.nonfinite}
        # Arrays of one chunk (new stores) are rewritten whole, all at once.
        whole = [n for n, a in arrs.items() if a.chunks[0] >= a.shape[0]]
        cols = {
            n: np.array(c) for n, c in zip(whole, read_all([arrs[n] for n in whole]), strict=True)
        }
        for name, pairs in self.nonfinite.items():
            if name in cols:
                for i, v in pairs:
                    cols[name][i] = v
            else:
                arrs[name].set_coordinate_selection(
                    np.asarray([i for i, _ in pairs]),
                    np.asarray([v for _, v in pairs], dtype=np.int64),
                )
        write_all([(arrs[n], c) for n, c in cols.items()])
        self.nonfinite.clear()
        gs.write_row_fields(self.rows)
        self.rows.clear()
        self.last_flush = time.monotonic()
