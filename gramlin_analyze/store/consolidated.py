"""Consolidated metadata: the copy of every node's metadata in the root document.

Written deliberately (zarr v3 warns that it is not yet in the v3 spec; that
one warning is silenced at the write), because without it
``xarray.open_datatree`` warns on every open and lists every group over the
network: once per command, after the structural changes and before the
tasks, which find their arrays in it. The root attribute
``consolidated_current`` is false from a writer's first structural change to
its closing write, so a store left by a killed writer is consolidated by the
next one.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import zarr

from gramlin_analyze.store.location import zarr_store

__all__ = [
    "CONSOLIDATED_ATTR",
    "consolidated_is_current",
    "open_consolidated",
    "open_for_tasks",
    "share_with_tasks",
    "task_node",
]

#: Root attribute: false while a writer may have changed the structure since the
#: consolidated metadata was written (see :meth:`GramlinStore.structure_changed`).
CONSOLIDATED_ATTR = "consolidated_current"
#: The first version that keeps CONSOLIDATED_ATTR. Every writer stamps its version
#: (``creation_library_version``) as its first write; an older writer leaves the
#: attribute as it found it, so it is trusted only after a writer that keeps it.
_CONSOLIDATED_ATTR_SINCE = (0, 2, 0)


def _version_tuple(text: Any) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).split(".")[:3])
    except ValueError:
        return ()


def consolidated_is_current(attrs: dict[str, Any]) -> bool:
    """Whether root ``attrs`` vouch that the consolidated copy is current."""
    return (
        attrs.get(CONSOLIDATED_ATTR) is True
        and _version_tuple(attrs.get("creation_library_version")) >= _CONSOLIDATED_ATTR_SINCE
    )


_task_roots: dict[tuple[str, str], zarr.Group] = {}
_task_nodes: dict[tuple[str, str, str], zarr.Group | zarr.Array] = {}
_task_roots_lock = threading.Lock()


def open_consolidated(zstore, mode: Literal["r", "r+", "a", "w", "w-"]) -> zarr.Group:
    """The root of ``zstore``, its nodes found in the consolidated metadata."""
    return zarr.open_group(zstore, mode=mode, zarr_format=3, use_consolidated=True)


def open_for_tasks(url: str, storage_options: dict | None, token: str) -> zarr.Group:
    """The store's root for a writer task, opened once per process and run.

    The driver consolidates metadata after every structural change and before
    it starts tasks, so tasks can navigate groups from the consolidated copy in
    memory instead of reading a ``zarr.json`` per lookup (which cost several
    ms per task). ``token`` identifies the run: a new run reopens.
    """
    key = (url, token)
    root = _task_roots.get(key)
    if root is None:
        with _task_roots_lock:  # a process's task threads start together: one of them opens
            root = _task_roots.get(key)
            if root is None:
                root = open_consolidated(zarr_store(url, storage_options=storage_options), "r+")
                share_with_tasks(url, token, root)
    return root


def share_with_tasks(url: str, token: str, root: zarr.Group) -> None:
    """Make ``root`` (the consolidated copy, current) what :func:`open_for_tasks` returns for run ``token``.

    The driver calls it with the view it already holds, so tasks on threads
    of its own process start without parsing the consolidated metadata again
    (several ms per thread, all threads at once at the start of a run).
    """
    _task_roots.clear()
    _task_nodes.clear()
    _task_roots[(url, token)] = root


def task_node(
    url: str, storage_options: dict | None, token: str, path: str
) -> zarr.Group | zarr.Array:
    """The group or array at ``path`` for a writer task, looked up once per process and run.

    Each lookup builds a new zarr object from its metadata (about 0.4 ms);
    a task touches several, and a run has thousands of tasks. Nodes are
    cached with the root of :func:`open_for_tasks` and dropped with it.
    """
    root = open_for_tasks(url, storage_options, token)
    key = (url, token, path)
    node = _task_nodes.get(key)
    if node is None:
        node = _task_nodes[key] = root[path]
    return node


@contextmanager
def quiet_consolidated() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        # the temporary file of a write a killed writer cut short: not a node, never read
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
        yield
