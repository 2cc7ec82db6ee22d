"""The activation sink: capture batches assembled into whole chunks and written behind."""

from __future__ import annotations

from concurrent.futures import Future
from typing import cast

import numpy as np
import zarr

from gramlin_analyze.errors import StoreError
from gramlin_analyze.store.chunks import array_at, group_at, put_rows, writable
from gramlin_analyze.store.direct_io import chunk_buffers

__all__ = ["ActivationSink"]


class _Chunk:
    """One chunk of ``input`` and ``input_grad`` being assembled: rows ``first:first+rows``."""

    __slots__ = ("first", "rows", "filled", "bufs", "H", "G")

    def __init__(self, first: int, rows: int, d: int, dtype: np.dtype):
        self.first, self.rows, self.filled = first, rows, 0
        nbytes = rows * d * dtype.itemsize
        self.bufs = (chunk_buffers.take(nbytes), chunk_buffers.take(nbytes))
        self.H, self.G = (
            np.frombuffer(b, dtype=dtype, count=rows * d).reshape(rows, d) for b in self.bufs
        )

    def release(self) -> None:
        self.H = self.G = cast(np.ndarray, None)  # a released chunk is never read again
        for b in self.bufs:
            chunk_buffers.give(b)


class ActivationSink:
    """Writes capture batches into one step's rows of ``input``/``input_grad``.

    Batches arrive in order and are copied into the chunk they belong to
    (page-aligned buffers reused across chunks, see :class:`_AlignedPool`),
    so that every chunk is written whole, once. Whole chunks are written by
    a background thread while the model computes the next batch (at most
    ``max_pending`` chunks in flight, so memory stays bounded); :meth:`flush`
    writes the rest and waits for every write, re-raising any error.
    """

    def __init__(
        self, layers_group: zarr.Group, index: int, layers: list[str], *, max_pending: int = 4
    ):
        from concurrent.futures import ThreadPoolExecutor

        self.index = index
        self.arrays = {
            n: (
                writable(array_at(group_at(layers_group, n), "input")),
                writable(array_at(group_at(layers_group, n), "input_grad")),
            )
            for n in layers
        }
        self.rows = {n: a[0].chunks[1] for n, a in self.arrays.items()}
        self.open: dict[str, _Chunk | None] = {n: None for n in layers}
        self.written = {n: 0 for n in layers}
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gramlin-sink")
        self._pending: list = []
        self._finished = False

    def _write(self, layer: str, chunk: _Chunk) -> None:
        ah, ag = self.arrays[layer]
        index = self.index

        def job() -> None:
            try:
                put_rows(ah, index, chunk.first, chunk.H[: chunk.filled])
                put_rows(ag, index, chunk.first, chunk.G[: chunk.filled])
            finally:
                chunk.release()

        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(job))
        self.written[layer] += chunk.filled

    def __call__(self, layer: str, start: int, h: np.ndarray, g: np.ndarray) -> None:
        if layer not in self.arrays:
            return
        ah = self.arrays[layer][0]
        total, rows = ah.shape[1], self.rows[layer]
        off, n = 0, len(h)
        while off < n:
            chunk = self.open[layer]
            if chunk is None:
                pos = start + off
                # the rows up to the chunk boundary (or the last sample); past the
                # end, what is left (put_rows then refuses it with IndexError)
                size = min(rows - pos % rows, total - pos) if pos < total else n - off
                chunk = self.open[layer] = _Chunk(pos, size, ah.shape[2], ah.dtype)
            k = min(n - off, chunk.rows - chunk.filled)
            chunk.H[chunk.filled : chunk.filled + k] = h[off : off + k]
            chunk.G[chunk.filled : chunk.filled + k] = g[off : off + k]
            chunk.filled += k
            off += k
            if chunk.filled == chunk.rows:
                self.open[layer] = None
                self._write(layer, chunk)

    def flush(self) -> None:
        """Write what is left and wait for every write (re-raising the first error)."""
        self.finish(wait=True)

    def finish(self, *, wait: bool) -> Future:
        """Write what is left; a future that is done when every write of this step is.

        With ``wait=False`` the writes go on in the background (write-behind:
        the task can return while the device catches up); the future raises
        the first write error.
        """
        self._finished = True
        try:
            for layer, chunk in self.open.items():
                if chunk is not None and chunk.filled:
                    self._write(layer, chunk)
                elif chunk is not None:
                    chunk.release()
                self.open[layer] = None
            pending, self._pending = self._pending, []
            if wait:
                for fut in pending:
                    fut.result()
                done: Future = Future()
                done.set_result(None)
                return done

            def barrier() -> None:  # the writer runs jobs in order: this one runs last
                for fut in pending:
                    fut.result()

            return self._pool.submit(barrier)
        finally:
            self._pool.shutdown(wait=wait)

    def close(self) -> None:
        """Stop the writer thread (pending writes finish first, unless :meth:`finish`
        already handed them to the background) and drop chunks never written."""
        if not self._finished:
            self._pool.shutdown(wait=True)
        for layer, chunk in self.open.items():
            if chunk is not None:
                chunk.release()
                self.open[layer] = None

    def check_complete(self) -> None:
        for layer, (ah, _) in self.arrays.items():
            if self.written[layer] != ah.shape[1]:
                raise StoreError(
                    f"layer {layer}: capture wrote {self.written[layer]} of {ah.shape[1]} samples"
                )
