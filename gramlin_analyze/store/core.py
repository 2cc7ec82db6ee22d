"""The gramlin store: a Zarr v3 hierarchy that xarray opens as a DataTree.

Only this package knows the on-disk layout (see ``layout.py`` and
``schemas/``). Writers hold the store lock (``lock.py``); readers never block.
Consolidated metadata: see ``consolidated.py``.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, cast

import numpy as np
import zarr

from gramlin_analyze._version import __version__
from gramlin_analyze.errors import StoreError
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import (
    create_nodes,
    group_at,
    read_all,
    same_values,
    write_all,
)
from gramlin_analyze.store.consolidated import (
    CONSOLIDATED_ATTR,
    consolidated_is_current,
    open_consolidated,
    quiet_consolidated,
)
from gramlin_analyze.store.location import is_remote, zarr_store
from gramlin_analyze.store.lock import StoreLock
from gramlin_analyze.store.metadata_cache import MetadataCache, consolidated_root, seed

__all__ = ["GramlinStore", "zarr_store"]


def root_attributes(source: str, run_name: str | None) -> dict[str, Any]:
    """The root attributes of a new store."""
    return {
        "gramlin_schema_version": L.SCHEMA_VERSION,
        "created_at": _now(),
        "creation_library": "gramlin-analyze",
        "creation_library_version": __version__,
        "source": str(source),
        "run_name": run_name or os.path.basename(str(source).rstrip("/")) or "run",
        "title": "gramlin-analyze checkpoint store",
    }


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class GramlinStore:
    """Handle on one store.

    Parameters
    ----------
    url
        Local path or fsspec URL (``s3://bucket/run.zarr``).
    mode
        ``"r"`` to read, ``"a"`` to create or update (take the lock with
        :meth:`lock` before writing).
    storage_options
        Passed to fsspec for remote stores.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        mode: str = "r",
        storage_options: dict | None = None,
        source: str | None = None,
        run_name: str | None = None,
    ):
        self.url = str(url)
        self.mode = mode
        self.storage_options = storage_options or {}
        self._steps_arrays: dict[str, zarr.Array] | None = None
        self._man: dict[str, np.ndarray] | None = None  # a writer's copy of the manifest
        self._stale = False  # this writer changed the structure since it last consolidated
        self._consolidated = False  # this writer made the consolidated copy
        self._unwritten = False  # ... in memory only: the store holds an older one
        self._view: zarr.Group | None = None
        self.created = False  #: this handle created the store
        self._zstore = zarr_store(url, storage_options=storage_options, read_only=mode == "r")
        # A remote writer keeps every zarr.json it reads or writes (metadata_cache.py):
        # adding a step then reads no array's metadata back.
        self._cache = MetadataCache(self._zstore) if mode != "r" and is_remote(self.url) else None
        if self._cache is not None:
            self._zstore = self._cache
        try:
            if mode == "r":
                self.root = zarr.open_group(
                    self._zstore, mode="r", zarr_format=3, use_consolidated=False
                )
            else:
                self.root = self._open_or_create(source, run_name)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise StoreError(
                f"{self.url}: not a gramlin store (no Zarr group there); create one with "
                "`gramlin-analyze ingest DIR --store " + self.url + "`"
            ) from err
        except Exception as err:
            from gramlin_analyze.store.faults import as_store_error, is_store_fault

            if is_store_fault(err, self.url):
                raise as_store_error(err, self.url) from err
            raise
        self._check_owner()
        # The last writer stopped midway through a structural change (only
        # writers since 0.2.0 clear the flag, and they set it only while changing the structure).
        self._interrupted = mode != "r" and self.root.attrs.get(CONSOLIDATED_ATTR) is False

    def _open_or_create(self, source: str | None, run_name: str | None) -> zarr.Group:
        """The root group; a new store is created with its root attributes in one write
        (a writer killed right after leaves a store, not an anonymous Zarr group)."""
        try:
            return zarr.open_group(self._zstore, mode="r+", zarr_format=3, use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            if source is None:
                raise
        self.created = True
        root = zarr.create_group(
            self._zstore, zarr_format=3, attributes=root_attributes(source, run_name)
        )
        if self._cache is not None:
            self._cache.mark_complete()  # a new store: its root is every node
        return root

    def _check_owner(self) -> None:
        """Refuse a Zarr group another tool wrote, and a store of a newer schema."""
        attrs = dict(self.root.attrs)
        version = attrs.get("gramlin_schema_version")
        if version is None:
            if self.mode == "r":
                raise StoreError(
                    f"{self.url}: a Zarr group, but not a gramlin store (no gramlin_schema_version)"
                )
            if attrs or any(True for _ in self.root.members()):
                raise StoreError(
                    f"{self.url}: a Zarr group written by another tool (no gramlin_schema_version); "
                    "gramlin-analyze will not write into it: choose another --store"
                )
            return
        if L.schema_major(version) > L.schema_major(L.SCHEMA_VERSION):
            raise StoreError(
                f"{self.url}: written with store schema {version} by gramlin-analyze "
                f"{attrs.get('creation_library_version', '?')}; this version ({__version__}) reads and writes "
                f"schema {L.SCHEMA_VERSION} and older: upgrade gramlin-analyze"
            )
        if self.mode != "r" and L.schema_tuple(version) > L.schema_tuple(L.SCHEMA_VERSION):
            raise StoreError(
                f"{self.url}: written with the newer store schema {version} (this version writes "
                f"{L.SCHEMA_VERSION}); it can still be read (open, info, validate), but upgrade "
                "gramlin-analyze to write to it"
            )

    # -- lifecycle -------------------------------------------------------------------

    @property
    def zstore(self):
        """The zarr ``Store`` under this handle."""
        return self._zstore

    def lock(self, *, break_lock: bool = False) -> StoreLock:
        """The single-writer lock (writers use :class:`~.session.WriteSession`, which takes it)."""
        return StoreLock(self.url, storage_options=self.storage_options, break_lock=break_lock)

    def initialize(self, *, source: str, run_name: str | None = None) -> None:
        """Write root attributes and the empty ``/steps`` group if they are missing."""
        if (
            "gramlin_schema_version" not in self.root.attrs
        ):  # an empty group made by zarr or a writer before 0.3
            self.root.update_attributes(root_attributes(source, run_name))
        groups: list[tuple[str, dict[str, Any]]] = []
        arrays: list[tuple[str, dict[str, Any]]] = []
        if L.STEPS not in self.view:
            groups.append((L.STEPS, {"description": "manifest: one row per ingested checkpoint"}))
            arrays.append((f"{L.STEPS}/step", L.step_coord_spec(np.zeros(0, np.int64))))
            arrays.extend((f"{L.STEPS}/{name}", L.manifest_spec(name, 0)) for name in L.MANIFEST)
        else:
            present = dict(
                group_at(self.view, L.STEPS).arrays()
            )  # from the consolidated copy when current
            n = present["step"].shape[0]
            missing = [name for name in L.MANIFEST if name not in present]
            if missing:  # stores from older versions gain new fields
                arrays.extend((f"{L.STEPS}/{name}", L.manifest_spec(name, n)) for name in missing)
                self._man = None  # read again, with the new columns
        if L.LAYERS not in self.view:
            groups.append((L.LAYERS, {"description": "one group per layer"}))
        if groups or arrays:
            self.structure_changed()
            create_nodes(self._zstore, groups=groups, arrays=arrays)

    def consolidate(self) -> None:
        """Make the consolidated copy of every node's metadata.

        A remote writer whose copy of the metadata is complete makes it in
        memory, with no request; the store receives it with the next write of
        the root (:meth:`ensure_consolidated` for tasks in other processes, or
        the closing :meth:`touch`): the new copy is written once per command.
        Otherwise every node's metadata is read back and the root rewritten.
        """
        self._steps_arrays = None
        if self._cache is not None and self._cache.complete:
            consolidated_root(self._cache)
            self._unwritten = True
        else:
            with quiet_consolidated():
                zarr.consolidate_metadata(self._zstore, zarr_format=3)
            if self._cache is not None:
                self._cache.mark_complete()  # consolidating read every node's document
            self._unwritten = False
        self._stale = False
        self._consolidated = True
        self._view = None
        self.root = zarr.open_group(
            self._zstore,
            mode="a" if self.mode != "r" else "r",
            zarr_format=3,
            use_consolidated=False,
        )

    # Consolidation is deferred: a writer changes the structure (creates or
    # resizes nodes) several times while it sets up, and re-reading every
    # node's metadata after each change cost about 15 ms locally (more on an
    # object store) per change. Instead the first change of a command sets the
    # root attribute ``consolidated_current`` to false (one root write), the
    # structure is consolidated once before the tasks that read it start
    # (:meth:`ensure_consolidated`), and the closing :meth:`touch` sets it
    # back. A writer killed in between leaves it false, so the next writer
    # consolidates first; readers meanwhile see the last consolidated state,
    # which is consistent.

    def structure_changed(self) -> None:
        """Note that nodes are about to be created or resized: the consolidated copy goes stale."""
        self._steps_arrays = None
        view, self._view = self._view, None
        if not self._stale:
            if self.root.attrs.get(CONSOLIDATED_ATTR) is not False:
                # Through the consolidated view when open (it keeps the copy in
                # the root document); self.root is not re-read: from now on this
                # writer consults its own _stale, not the attribute.
                self._stamp({CONSOLIDATED_ATTR: False}, via=view, reopen=False)
            self._stale = True

    def ensure_consolidated(self, *, on_store: bool = True) -> None:
        """Consolidate when this writer, or an earlier one that stopped midway, changed the structure.

        ``on_store=False`` when every task runs in this process (they find
        their arrays in :attr:`view`): a copy made in memory then reaches the
        store only with the closing :meth:`touch`, one root write fewer.
        Tasks in other processes read the store's copy, so by default it is
        written now (``consolidated_current`` stays false until the close).
        """
        if self._stale or not (
            self._consolidated or consolidated_is_current(dict(self.root.attrs))
        ):
            self.consolidate()
        if on_store and self._unwritten:
            self._stamp({CONSOLIDATED_ATTR: False}, via=self.view, reopen=False)
            self._unwritten = False

    def touch(self) -> None:
        """Stamp the root with the time and the library version (a writer's last act).

        Written through a handle that holds the root's consolidated metadata,
        so the root keeps it: a reader opening the store before the next
        :meth:`consolidate` sees the last consolidated state, instead of
        falling back (with a warning) to one request per node. A remote
        writer's copy made in memory reaches the store here. A writer stopped
        mid-change (still stale) is not consolidated: the flag stays false.
        """
        attrs = {
            "modified_at": _now(),
            "creation_library_version": __version__,
            CONSOLIDATED_ATTR: not self._stale,
        }
        # The open consolidated view already holds the current copy: no need to read it again.
        self._stamp(attrs, via=None if self._stale else self._view)
        self._unwritten = False

    def set_root_attributes(self, attrs: dict[str, Any]) -> None:
        """Write root attributes (run metadata), through the open consolidated view if any,
        so that view's closing :meth:`touch` keeps them."""
        if attrs:
            self._stamp(attrs, via=self._view)

    def _stamp(
        self, attrs: dict[str, Any], *, via: zarr.Group | None = None, reopen: bool = True
    ) -> None:
        root = (
            via
            if via is not None
            else zarr.open_group(self._zstore, mode="r+", zarr_format=3, use_consolidated=None)
        )
        root.update_attributes(attrs)
        if reopen:
            self.root = zarr.open_group(
                self._zstore, mode="a", zarr_format=3, use_consolidated=False
            )

    # -- arrays ----------------------------------------------------------------------

    def group(self, path: str) -> zarr.Group:
        return cast(zarr.Group, self.view[path])

    def steps(self) -> np.ndarray:
        return self.manifest()["step"]

    def _manifest_arrays(self) -> dict[str, zarr.Array]:
        """The arrays of ``/steps`` by name.

        One listing, whose members' metadata zarr fetches concurrently: on an
        object store each lookup by name is a round trip. A writer keeps the
        handles until its next structural change (:meth:`consolidate`): under
        the lock nobody else resizes ``/steps``.
        """
        if self._steps_arrays is not None:
            return self._steps_arrays
        arrays = dict(group_at(self.view, L.STEPS).arrays())
        if self.mode != "r":
            self._steps_arrays = arrays
        return arrays

    def manifest(self) -> dict[str, np.ndarray]:
        """The ``/steps`` columns by name (copies).

        A writer keeps them in memory: under the lock only it writes them
        (:meth:`write_rows`, :meth:`set_step_axis` update the copy), so each
        command reads the manifest once.
        """
        if self._man is None:
            arrays = self._manifest_arrays()
            names = ["step"] + [n for n in L.MANIFEST if n in arrays]
            man = {}
            for name, v in zip(names, read_all([arrays[n] for n in names]), strict=True):
                if name == "step":
                    man[name] = np.asarray(v, dtype=np.int64)
                else:
                    man[name] = (
                        np.asarray(v, dtype=object) if L.MANIFEST[name][0] is str else np.asarray(v)
                    )
            # A writer killed while resizing leaves columns of different lengths:
            # the step coordinate's is the manifest's (extra rows are dropped,
            # missing ones are unset, so never ok); set_step_axis repairs the shapes.
            n = len(man["step"])
            for name, col in man.items():
                if len(col) != n:
                    fill = "" if col.dtype == object else L.MANIFEST[name][1]
                    man[name] = np.concatenate(
                        [col[:n], np.full(max(0, n - len(col)), fill, dtype=col.dtype)]
                    )
            if self.mode == "r":
                return man
            self._man = man
        return {k: v.copy() for k, v in self._man.items()}

    @property
    def view(self) -> zarr.Group:
        """The root for looking nodes up: the consolidated copy while it is current.

        Each lookup through :attr:`root` reads a ``zarr.json`` (a round trip on
        an object store); through the consolidated copy it is a dictionary
        lookup. Nodes are created through :attr:`root` (after
        :meth:`structure_changed`, from which on this is :attr:`root` too).
        """
        if self._stale or not (
            self._consolidated or consolidated_is_current(dict(self.root.attrs))
        ):
            return self.root
        if self._view is None:
            self._view = open_consolidated(self._zstore, "r" if self.mode == "r" else "r+")
            if self._cache is not None and not self._cache.complete:
                seed(self._cache, self._view)  # the copy is current: no node read from now on
        return self._view

    def layer_names(self) -> list[str]:
        root = self.view
        if L.LAYERS not in root:
            return []
        return sorted(k for k, _ in group_at(root, L.LAYERS).groups())

    def layer(self, name: str) -> zarr.Group:
        return group_at(group_at(self.view, L.LAYERS), name)

    def _walk(self) -> dict[str, zarr.Array | zarr.Group]:
        """Every node of the store by path, each with its metadata.

        From the consolidated copy when it is current (no read per node: under
        the lock nobody else changes the structure), else one walk of the live
        metadata, each group's members fetched concurrently.
        """
        return dict(self.view.members(max_depth=None))

    # -- the step axis ------------------------------------------------------------------

    def set_step_axis(
        self, new_steps: np.ndarray, rows: dict[int, dict[str, Any]] | None = None
    ) -> dict[int, int]:
        """Make ``new_steps`` (sorted, unique) the step axis of every group; ``ok`` rows
        keep their data (see :func:`.step_axis.set_step_axis`). Returns ``{step: index}``."""
        from gramlin_analyze.store.step_axis import set_step_axis

        return set_step_axis(self, new_steps, rows)

    # -- manifest rows ----------------------------------------------------------------

    def write_row_fields(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """:meth:`write_rows` for ``(row index, fields)`` pairs: one call per set of field names."""
        groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
        for i, fields in rows:
            groups.setdefault(tuple(sorted(fields)), []).append((i, fields))
        for keys, items in groups.items():
            self.write_rows([i for i, _ in items], **{k: [f[k] for _, f in items] for k in keys})

    def write_rows(self, index: int | list[int], **fields: Any) -> None:
        """Write manifest fields of one or more rows; ``status`` is written last.

        Each field is a value for every row, or a sequence with one value per
        row. Columns are rewritten whole: the manifest is small, and one write
        per column beats one read-modify-write per row.
        """
        idx = [index] if isinstance(index, int | np.integer) else list(index)
        if not idx:
            return
        g = self._manifest_arrays()
        man = self.manifest()
        stored = self.manifest()  # the columns as stored
        was = stored["status"]
        cols: dict[str, np.ndarray] = {}
        for name, value in fields.items():
            if name not in L.MANIFEST:
                raise KeyError(f"unknown manifest field {name!r}")
            if isinstance(value, list | tuple | np.ndarray):
                if len(value) != len(idx):
                    raise ValueError(f"{name}: {len(value)} values for {len(idx)} rows")
                values = list(value)
            else:
                values = [value] * len(idx)
            if name == "status" and any(v not in L.STATUSES for v in values):
                raise ValueError(f"bad status in {values!r}")
            col = man[name]
            for i, v in zip(idx, values, strict=True):
                col[i] = _coerce(name, v)
            cols[name] = col
        self._man = None  # re-read if a write below fails
        if "status" in cols:
            # Rows leaving ok (a changed checkpoint to redo) leave it first: a kill
            # after their new fingerprint is written must not leave them ok.
            demoted = [i for i in idx if was[i] == "ok" and cols["status"][i] != "ok"]
            if demoted:
                first = was.copy()
                first[demoted] = cols["status"][demoted]
                write_all([(g["status"], first)])
        # Every column but status together; status last (it is what readers trust).
        # A column equal to its stored copy is not written: on an object store
        # each write is a request (a column of fill values, a batch delete).
        changed = [n for n in cols if n != "status" and not same_values(cols[n], stored[n])]
        write_all([(g[name], cols[name]) for name in changed])
        if "status" in cols:
            write_all([(g["status"], cols["status"])])
        man.update(cols)
        self._man = man

    # -- layers -----------------------------------------------------------------------

    def declare_layers(
        self, specs: dict[str, tuple[tuple[int, ...], np.dtype, bool, dict[str, Any]]]
    ) -> None:
        """Create ``/layers/<name>`` with ``step``, ``weight``, ``bias`` and ``nonfinite``
        for the current step axis, for each ``name: (weight_shape, dtype, has_bias, attrs)``.

        Groups first, then every array of every layer in one concurrent batch.
        """
        steps = self.steps()
        # Attributes go in with each node: ``attrs.update`` rewrites the node once per key.
        groups = [(f"{L.LAYERS}/{name}", attrs) for name, (_, _, _, attrs) in specs.items()]
        arrays = [
            spec
            for name, (shape, dtype, bias, _) in specs.items()
            for spec in L.layer_array_specs(name, steps, shape, np.dtype(dtype), bias)
        ]
        self.structure_changed()
        create_nodes(self._zstore, groups=groups, arrays=arrays, overwrite_groups=True)


def _coerce(name: str, v: Any) -> Any:
    dtype = L.MANIFEST[name][0]
    if dtype is str:
        return "" if v is None else str(v)
    if v is None:
        return L.MANIFEST[name][1]
    return np.dtype(dtype).type(v)
