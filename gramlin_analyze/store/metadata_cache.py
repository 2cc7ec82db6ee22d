"""A remote writer's copy of every node's ``zarr.json``, kept as it reads and writes them.

On an object store each metadata document read is a round trip (s3fs makes
a HEAD and a GET), and ``zarr.consolidate_metadata`` reads every node's
document back: about two requests per array each time a writer
consolidated, which made adding one step cost O(arrays) requests. Under the
store lock only this writer changes the structure, so the documents it has
read or written stay true for the whole command: this store keeps them, and
the consolidated copy is made from them in memory (:func:`consolidated_root`)
and written once, by the closing stamp.

The copy is *complete* when it holds every node (a new store, or one seeded
from a current consolidated copy, :func:`seed`): a document it lacks then
does not exist, and no request is made to find out. Only ``zarr.json`` keys
are kept; chunks always go to the store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.buffer import default_buffer_prototype
from zarr.storage import MemoryStore, WrapperStore

__all__ = ["MetadataCache", "consolidated_root", "seed"]

_DOC = "zarr.json"


def _is_doc(key: str) -> bool:
    return key == _DOC or key.endswith("/" + _DOC)


@dataclass
class _Docs:
    """What copies of one store share (``with_read_only`` makes new wrappers)."""

    docs: dict[str, Any] = field(default_factory=dict)  # key -> zarr Buffer
    complete: bool = False


class MetadataCache(WrapperStore[Store]):
    """``store`` with its ``zarr.json`` documents kept in memory (see the module)."""

    def __init__(self, store: Store, *, shared: _Docs | None = None) -> None:
        super().__init__(store)
        self.inner = store
        self.shared = shared if shared is not None else _Docs()

    def with_read_only(self, read_only: bool = False) -> MetadataCache:
        return MetadataCache(self.inner.with_read_only(read_only), shared=self.shared)

    @property
    def complete(self) -> bool:
        return self.shared.complete

    def mark_complete(self) -> None:
        """Every node's document is in the copy (a new store, or one just consolidated)."""
        self.shared.complete = True

    async def get(self, key: str, prototype, byte_range: ByteRequest | None = None):
        docs = self.shared.docs
        if _is_doc(key) and byte_range is None:
            if key in docs:
                return prototype.buffer.from_bytes(docs[key].to_bytes())
            if self.shared.complete:
                return None
        value = await self.inner.get(key, prototype, byte_range)
        if _is_doc(key) and byte_range is None and value is not None:
            docs[key] = value
        return value

    async def exists(self, key: str) -> bool:
        if _is_doc(key) and (key in self.shared.docs or self.shared.complete):
            return key in self.shared.docs
        return await self.inner.exists(key)

    async def set(self, key: str, value) -> None:
        await self.inner.set(key, value)
        if _is_doc(key):
            self.shared.docs[key] = value

    async def set_if_not_exists(self, key: str, value) -> None:
        if _is_doc(key) and key in self.shared.docs:
            return  # it exists (zarr makes a node's missing parents this way)
        await self.inner.set_if_not_exists(key, value)
        if _is_doc(key) and self.shared.complete:
            self.shared.docs[key] = value  # it did not exist, so it is this one now

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)
        self.shared.docs.pop(key, None)

    async def delete_dir(self, prefix: str) -> None:
        await self.inner.delete_dir(prefix)
        stem = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        for key in [k for k in self.shared.docs if k.startswith(stem)]:
            del self.shared.docs[key]


def seed(cache: MetadataCache, view: zarr.Group) -> None:
    """Fill the copy from ``view``, a root opened from a current consolidated copy.

    Groups found through consolidated metadata carry their children's
    metadata; their own documents do not, so it is dropped here.
    """
    proto = default_buffer_prototype()
    docs = cache.shared.docs
    for path, node in view.members(max_depth=None):
        if isinstance(node, zarr.Group):
            doc = dataclasses.replace(node.metadata, consolidated_metadata=None).to_buffer_dict(
                proto
            )
        else:
            doc = node.metadata.to_buffer_dict(proto)
        docs[f"{path}/{_DOC}"] = doc[_DOC]
    cache.shared.complete = True


def consolidated_root(cache: MetadataCache) -> None:
    """Put a root document holding the consolidated metadata of every node in the copy,
    made in memory from the complete copy: no request, nothing written to the store
    (the next write of the root's attributes through a view opened on it writes it)."""
    if not cache.complete:
        raise RuntimeError("consolidated_root needs a complete copy of the metadata")
    memory: dict[str, Any] = dict(cache.shared.docs)
    from gramlin_analyze.store.consolidated import quiet_consolidated

    with quiet_consolidated():
        zarr.consolidate_metadata(MemoryStore(memory), zarr_format=3)
    cache.shared.docs[_DOC] = memory[_DOC]
