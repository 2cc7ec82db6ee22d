"""Where the results of one ``analyze`` go: ``/metrics``, the buffer of its scalars, and the
attributes that say which of them assume plain SGD steps."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from gramlin_analyze.analysis.metrics import ASSUMES_SGD
from gramlin_analyze.store import INPUTS, GramlinStore, read_all, write_all
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import group_at

__all__ = ["MetricsOutput", "ScalarBuffer", "note_optimizer"]


class ScalarBuffer:
    """In-memory copies of the small (step, layer) arrays, flushed whole.

    One writer (the driver) updates values cell by cell; writing each cell
    would rewrite a chunk per cell. Values are flushed before their
    provenance hashes, so a kill loses at most work that is then redone.
    """

    def __init__(self, m):
        self.m = m
        self.cache: dict[str, np.ndarray] = {}
        self.dirty: set[str] = set()
        self.last = time.monotonic()
        self.lock = threading.RLock()
        self.autoflush = True

    def _load(self, path: str) -> np.ndarray:
        if path not in self.cache:
            arr = read_all([self.m[path]])[0]
            self.cache[path] = (
                np.asarray(arr, dtype=object) if arr.dtype.kind in "OTU" else np.array(arr)
            )
        return self.cache[path]

    def get(self, path: str) -> np.ndarray:
        with self.lock:
            return self._load(path)

    def set(self, path: str, i: int, j: int, value) -> None:
        with self.lock:
            self._load(path)[i, j] = value
            self.dirty.add(path)
            if self.autoflush and time.monotonic() - self.last > 5.0:
                self.flush()

    def flush(self) -> None:
        with self.lock:
            # Values (together), then their provenance hashes (together).
            for hashes in (False, True):
                write_all(
                    [
                        (self.m[p], self.cache[p])
                        for p in sorted(self.dirty)
                        if p.startswith(INPUTS) == hashes
                    ]
                )
            self.dirty.clear()
            self.last = time.monotonic()


@dataclass(frozen=True, slots=True)
class MetricsOutput:
    """The open ``/metrics`` of a run: its group, its scalar buffer, each layer's column."""

    gs: GramlinStore
    metrics: Any
    buf: ScalarBuffer
    layer_index: dict[str, int]
    run_token: str


def note_optimizer(gs: GramlinStore, families: list[str], warnings: list[str]) -> None:
    """Mark the metrics that assume SGD (``assumes``, ``optimizer_check`` attrs); warn when not SGD.

    Attributes change only when the check does (a structural change: the
    consolidated copy is rewritten by the caller).
    """
    if "vc" not in families or L.METRICS not in gs.root:
        return
    from gramlin_analyze.io.optimizer import manifest_check, sgd_warning

    check, used = manifest_check(gs.manifest())
    if used is not None:
        warnings.append(sgd_warning(used, ASSUMES_SGD))
    m = group_at(gs.root, L.METRICS)
    wanted: dict[str, Any] = {"assumes": "sgd", "optimizer_check": check}
    arrays = [a for _, a in m.members(max_depth=None) if isinstance(a, zarr.Array)]
    stale = [
        a
        for a in arrays
        if a.path.rsplit("/", 1)[-1] in ASSUMES_SGD
        and any(a.attrs.get(k) != v for k, v in wanted.items())
    ]
    if stale:
        gs.structure_changed()
        for a in stale:
            a.update_attributes(wanted)
