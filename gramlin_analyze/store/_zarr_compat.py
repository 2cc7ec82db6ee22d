"""The one module that uses zarr's private internals, each behind a named capability probe.

Every helper here has a fallback through zarr's public API, taken when the
probe fails (a zarr release renamed or removed the internal) or when
``GRAMLIN_ZARR_PUBLIC=1`` is set; the suite runs both paths and compares the
bytes they write. A private use stays here only while a row of
``benchmarks/`` shows it buys at least 20% (``docs/performance.md``).

Probes:

- :data:`SYNC_CODECS`: chunks of small arrays encoded and decoded in the
  calling thread by the codecs' synchronous methods (``_encode_sync``,
  zarr's ``SupportsSyncCodec`` protocol) and an ``ArraySpec``.
- :data:`EVENT_LOOP`: many coroutines gathered in one trip through zarr's
  event loop (``zarr.core.sync.sync``).
- :data:`CONSOLIDATED_LOOKUP`: a node looked up in consolidated metadata
  without a coroutine (``AsyncGroup._getitem_consolidated``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import zarr

if TYPE_CHECKING:
    from zarr.core.metadata import ArrayV3Metadata

__all__ = [
    "CONSOLIDATED_LOOKUP",
    "EVENT_LOOP",
    "SYNC_CODECS",
    "async_group",
    "available",
    "consolidated_lookup",
    "decode_chunk",
    "encode_chunk",
    "run_together",
    "sync_codecs",
]

SYNC_CODECS = "sync_codecs"
EVENT_LOOP = "event_loop"
CONSOLIDATED_LOOKUP = "consolidated_lookup"


def _switched_off() -> set[str] | Literal[True]:
    """``GRAMLIN_ZARR_PUBLIC``: ``1`` turns every shortcut off (zarr's public API
    alone), a comma-separated list of capability names only those (benchmarks)."""
    value = os.environ.get("GRAMLIN_ZARR_PUBLIC", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return set()
    if value in ("1", "true", "yes", "on", "all"):
        return True
    return {v.strip() for v in value.split(",")}


def public_only() -> bool:
    """Whether ``GRAMLIN_ZARR_PUBLIC`` asks for zarr's public API alone."""
    return _switched_off() is True


@functools.cache
def _probe(name: str) -> bool:
    try:
        if name == SYNC_CODECS:
            from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec  # noqa: F401
            from zarr.codecs import BytesCodec, ZstdCodec
            from zarr.core.array_spec import ArraySpec  # noqa: F401

            return all(
                hasattr(c, "_encode_sync") and hasattr(c, "_decode_sync")
                for c in (BytesCodec, ZstdCodec)
            )
        if name == EVENT_LOOP:
            from zarr.core.sync import sync  # noqa: F401

            return True
        if name == CONSOLIDATED_LOOKUP:
            from zarr.core.group import AsyncGroup

            return hasattr(AsyncGroup, "_getitem_consolidated")
    except ImportError:
        return False
    raise ValueError(f"unknown capability {name!r}")


def available(name: str) -> bool:
    """Whether the private path ``name`` may be used: the installed zarr has it and
    ``GRAMLIN_ZARR_PUBLIC`` does not switch it off."""
    off = _switched_off()
    return off is not True and name not in off and _probe(name)


# -- small arrays: chunks encoded in the calling thread -----------------------------------


def sync_codecs(arr: zarr.Array) -> list | None:
    """The codecs of ``arr`` when its chunks can be encoded here by their synchronous
    methods (an array-to-bytes codec, then bytes-to-bytes codecs); else None."""
    if not available(SYNC_CODECS):
        return None
    from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec

    codecs = [*arr.filters, arr.serializer, *arr.compressors]
    if arr.filters or not isinstance(codecs[0], ArrayBytesCodec):
        return None
    if not all(isinstance(c, BytesBytesCodec) for c in codecs[1:]):
        return None
    if not all(hasattr(c, "_encode_sync") and hasattr(c, "_decode_sync") for c in codecs):
        return None
    return codecs


def _chunk_spec(arr: zarr.Array):
    from zarr.buffer import default_buffer_prototype
    from zarr.core.array_spec import ArraySpec

    md = cast("ArrayV3Metadata", arr.metadata)  # chunks encoded here are Zarr v3 (local_dir)
    return ArraySpec(
        shape=tuple(arr.chunks),
        dtype=md.data_type,
        fill_value=md.fill_value,
        config=arr.async_array.config,
        prototype=default_buffer_prototype(),
    )


def encode_chunk(arr: zarr.Array, codecs: list, block: np.ndarray) -> np.ndarray | None:
    """The stored bytes of one whole chunk ``block`` of ``arr`` (None: all fill value,
    not to be stored unless the array writes empty chunks, as zarr decides)."""
    spec = _chunk_spec(arr)
    nd = spec.prototype.nd_buffer.from_numpy_array(block)
    if not spec.config.write_empty_chunks and nd.all_equal(
        spec.fill_value
    ):  # zarr's test (bitwise for 0.0)
        return None
    buf = codecs[0]._encode_sync(nd, spec)
    for c in codecs[1:]:
        buf = c._encode_sync(buf, spec)
    return buf.as_numpy_array()


def decode_chunk(arr: zarr.Array, codecs: list, raw: bytes) -> np.ndarray:
    """One chunk of ``arr`` decoded from its stored bytes."""
    spec = _chunk_spec(arr)
    buf = spec.prototype.buffer.from_bytes(raw)
    for c in reversed(codecs[1:]):
        buf = c._decode_sync(buf, spec)
    return codecs[0]._decode_sync(buf, spec).as_numpy_array().reshape(spec.shape)


# -- many operations in one trip through zarr's event loop ----------------------------------


def run_together(jobs: Sequence[tuple[Callable[..., Any], Callable[..., Any]]]) -> list:
    """Run ``(coroutine factory, public call)`` pairs; their results in order.

    With the event loop at hand, the coroutines go in one trip, concurrently
    (on an object store, one round trip instead of one per job); otherwise the
    public calls run on a few threads, still concurrently.
    """
    if not jobs:
        return []
    if not available(EVENT_LOOP):
        if len(jobs) == 1:
            return [jobs[0][1]()]
        # zarr's synchronous calls are thread-safe: on threads they still overlap
        return list(_public_pool().map(lambda job: job[1](), jobs))
    import asyncio

    from zarr.core.sync import sync

    async def run() -> list:
        return await asyncio.gather(*(coro() for coro, _ in jobs))

    return list(sync(run()))


_pool = None


def _public_pool():
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(8, thread_name_prefix="gramlin-zarr")
    return _pool


# -- consolidated metadata ------------------------------------------------------------------


def consolidated_lookup(group: zarr.Group, path: str) -> zarr.Array | zarr.Group | None:
    """``group[path]`` from the group's consolidated metadata as a plain call (zarr runs
    it as a coroutine on its I/O thread); None when that is not possible here."""
    if not available(CONSOLIDATED_LOOKUP):
        return None
    from zarr.core.group import AsyncGroup

    ag = group._async_group
    if ag.metadata.consolidated_metadata is None:
        return None
    node = ag._getitem_consolidated(ag.store_path / path, path, prefix=ag.name)
    return type(group)(node) if isinstance(node, AsyncGroup) else zarr.Array(node)


def async_group(group: zarr.Group):
    """The ``AsyncGroup`` behind ``group`` (for :class:`zarr.Group` subclasses)."""
    return group._async_group


def v3_metadata(arr: zarr.Array) -> ArrayV3Metadata:
    """``arr.metadata``, typed as Zarr v3's (for type checkers only: gramlin stores are
    Zarr format 3, and the class lives in zarr's internal modules)."""
    return cast("ArrayV3Metadata", arr.metadata)
