"""The write session: the one way a command writes to a store.

``with WriteSession(url) as gs:`` takes the store's lock (keyed on its
canonical location), opens the store, finishes what a writer killed midway
left (:func:`repair`), and on the way out stamps the store as consistent
(``touch``) when the body ended without an error or was stopped by a signal.
A body that fails leaves the structure flag as it is, so the next session
repairs again. Drivers never take the lock or stamp the store themselves.
"""

from __future__ import annotations

import os
from types import TracebackType

import numpy as np

from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import group_at, resize_all
from gramlin_analyze.store.core import GramlinStore
from gramlin_analyze.store.faults import StoreUnavailableError, as_store_error, is_store_fault
from gramlin_analyze.store.lock import StoreLock
from gramlin_analyze.store.metrics import repair_metrics
from gramlin_analyze.store.step_axis import _step_nodes

__all__ = ["WriteSession", "repair"]


class WriteSession:
    """Context manager owning a writer's whole protocol; yields the :class:`GramlinStore`.

    Parameters
    ----------
    url
        Local path or fsspec URL of the store.
    storage_options
        Passed to fsspec for remote stores.
    break_lock
        Remove a remote lock left by a writer that died (``--break-lock``).
    source
        What a new store is made from (its root attributes): a store is
        created only when this is given.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        storage_options: dict | None = None,
        break_lock: bool = False,
        source: str | None = None,
    ):
        self.url = str(url)
        self.storage_options = storage_options
        self.source = source
        self._lock = StoreLock(self.url, storage_options=storage_options, break_lock=break_lock)
        self.store: GramlinStore | None = None

    def __enter__(self) -> GramlinStore:
        try:
            self._lock.acquire()
        except Exception as err:
            if is_store_fault(err, self.url):
                raise as_store_error(err, self.url) from err
            raise
        try:
            self.store = GramlinStore(
                self.url, mode="a", storage_options=self.storage_options, source=self.source
            )
            if self.store._interrupted:
                repair(self.store)
        except BaseException as err:
            self._lock.release()
            if is_store_fault(err, self.url):
                raise as_store_error(err, self.url) from err
            raise
        return self.store

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.store is not None and (
                exc_type is None or issubclass(exc_type, KeyboardInterrupt)
            ):
                if "gramlin_schema_version" in self.store.root.attrs:
                    self.store.touch()
        finally:
            lock_left = self._release_lock(exc)
        if isinstance(exc, Exception) and (lock_left or is_store_fault(exc, self.url)):
            if not isinstance(exc, StoreUnavailableError) or lock_left:
                raise as_store_error(exc, self.url, lock_left=lock_left) from exc

    def _release_lock(self, exc: BaseException | None) -> bool:
        """Release the lock; True when a lost remote endpoint kept its lock object
        (the next run then needs --break-lock, and the one line says so)."""
        try:
            self._lock.release()
        except Exception as err:
            if not is_store_fault(err, self.url):
                raise
            if exc is None:
                raise as_store_error(err, self.url, lock_left=True) from err
            return True
        return False


def repair(gs: GramlinStore) -> None:
    """Finish a structural change a killed writer left: every step-major array gets the
    manifest's length again, ``/metrics`` coordinates are rewritten, and the
    consolidated copy is written anew. A store whose first ingest was killed before
    any step landed holds nothing to keep: its nodes are removed, and the ingest
    makes them again."""
    if not _has_ok_step(gs):
        for name in (L.STEPS, L.LAYERS, L.PROBE, L.METRICS):
            if name in gs.root:
                del gs.root[name]
        gs._man = None
    if L.STEPS in gs.root:
        n = len(gs.steps())
        arrays, coords = _step_nodes(gs._walk())
        resize_all([(a, (n, *a.shape[1:])) for a in [*arrays.values(), *coords] if a.shape[0] != n])
        repair_metrics(gs)
    gs.consolidate()
    gs._interrupted = False


def _has_ok_step(gs: GramlinStore) -> bool:
    """Whether the manifest is whole and holds an ``ok`` row."""
    if L.STEPS not in gs.root:
        return False
    present = {k for k, _ in group_at(gs.root, L.STEPS).arrays()}
    if not {"step", "status"} <= present:  # (older stores lack some newer columns)
        return False
    return bool(np.any(gs.manifest()["status"] == "ok"))
