"""Where the results of one ``analyze`` go: ``/metrics``, and the buffer of its scalars."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gramlin_analyze.store import INPUTS, GramlinStore, read_all, write_all

__all__ = ["ScalarBuffer", "MetricsOutput"]


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
