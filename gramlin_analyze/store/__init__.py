"""The gramlin store: the only package that knows the on-disk layout.

``session`` (``WriteSession``: the one way to write), ``core`` (the store
handle), ``layout`` (names, dims, chunking, node specs), ``lock``, ``location``
(local paths and URLs), ``consolidated`` (the consolidated copy of the metadata
and task-side lookups), ``metadata_cache`` (a remote writer's copy of every
node's metadata), ``step_axis``, ``metrics`` (the ``/metrics`` layout),
``chunks`` (array I/O), ``direct_io``, ``sink`` (capture activations),
``probe``, ``faults`` (full disk, permissions, lost endpoints), ``provenance``,
``validate`` and ``info``. Only zarr's public API is used.
"""

from gramlin_analyze.store.chunks import (
    create_nodes,
    put_rows,
    put_step,
    raw_chunk_path,
    read_all,
    read_step,
    resize_all,
    writable,
    write_all,
)
from gramlin_analyze.store.consolidated import (
    CONSOLIDATED_ATTR,
    open_for_tasks,
    share_with_tasks,
    task_node,
)
from gramlin_analyze.store.core import GramlinStore
from gramlin_analyze.store.direct_io import (
    aligned_empty,
    read_raw_chunk,
    release_buffers,
    write_raw_chunk,
)
from gramlin_analyze.store.location import canonical_url, is_remote, zarr_store
from gramlin_analyze.store.lock import StoreLock
from gramlin_analyze.store.metrics import INPUTS, MatrixSpec, MetricsSpec, declare_metrics
from gramlin_analyze.store.probe import declare_activations, write_probe
from gramlin_analyze.store.session import WriteSession
from gramlin_analyze.store.sink import ActivationSink

__all__ = [
    "CONSOLIDATED_ATTR",
    "INPUTS",
    "MatrixSpec",
    "MetricsSpec",
    "WriteSession",
    "declare_metrics",
    "ActivationSink",
    "GramlinStore",
    "StoreLock",
    "aligned_empty",
    "canonical_url",
    "create_nodes",
    "declare_activations",
    "is_remote",
    "open_for_tasks",
    "put_rows",
    "put_step",
    "raw_chunk_path",
    "read_all",
    "read_raw_chunk",
    "read_step",
    "release_buffers",
    "resize_all",
    "share_with_tasks",
    "task_node",
    "writable",
    "write_all",
    "write_probe",
    "write_raw_chunk",
    "zarr_store",
]
