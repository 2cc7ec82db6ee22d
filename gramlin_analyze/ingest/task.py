"""One ingest task: read one checkpoint, write its step (weights, then activations)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, GramlinError, ShapeMismatchError
from gramlin_analyze.ingest.template import check_against, layers_of
from gramlin_analyze.io.registry import reader_for
from gramlin_analyze.store import layout as L
from gramlin_analyze.store import put_step, writable
from gramlin_analyze.store.faults import is_store_fault

__all__ = [
    "CheckpointJob",
    "TaskContext",
    "TaskResult",
    "count_nonfinite",
    "error_message",
    "ingest_one",
]

_READ_ERRORS = (GramlinError, OSError, KeyError, ValueError, RuntimeError, EOFError)


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What every task of one ingest shares: the store, its layers, what else to write."""

    store_url: str
    storage_options: dict | None
    run_token: str  # tasks of this run in this process share one open store
    template: dict[str, tuple[tuple[int, ...], str, bool]]
    stored_dtypes: dict[str, str]
    reader_options: dict[str, Any]
    capture: str | None  # CaptureConfig JSON: capture activations and gradients
    activation_layers: list[str]
    external_dir: str | None  # activations computed elsewhere: their directory
    # Threads in this process: a task may return while its activation writes
    # finish (the driver marks the step ok only after them).
    write_behind: bool
    device: str = "cpu"  # where capture runs: "cpu", "cuda" or "cuda:N"
    recorded: dict[str, Any] | None = None  # layer -> RecordedLayer: training-time records


@dataclass(frozen=True, slots=True)
class CheckpointJob:
    """One checkpoint to read, and the row of the step it writes."""

    index: int
    step: int
    path: str
    format: str
    files: tuple[str, ...]
    external: str | None  # its activation file, with ``TaskContext.external_dir``
    record: str | None = None  # its training-time record file (gramlin_analyze.record)


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A task's manifest fields for the driver, which marks the step ``ok`` only then."""

    index: int
    status: str  # "ok" or "failed"
    error: str = ""
    nonfinite: int = -1
    layer_nonfinite: dict[str, int] = field(default_factory=dict)
    lr: float | None = None
    epoch: Any = None
    tokens_seen: Any = None
    optimizer: str = ""
    optimizer_params: str = ""  # JSON (gramlin_analyze.io.optimizer.OptimizerInfo.to_json)
    pending: Future | None = None  # activation writes still running (write-behind)


def count_nonfinite(a: np.ndarray) -> int:
    """NaN/Inf count; a sum is ~15x cheaper than ``isfinite`` and is finite
    exactly when every value is (barring overflow, which falls back to the count)."""
    with np.errstate(all="ignore"):
        if np.isfinite(np.add.reduce(a, axis=None, dtype=np.float64)):
            return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def _file_state(files: tuple[str, ...]) -> list[tuple[int, int]]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append((st.st_size, st.st_mtime_ns))
    return out


def ingest_one(ctx: TaskContext, job: CheckpointJob) -> TaskResult:
    """Read one checkpoint and write its step; never raises for bad input.

    Weights first, then (when configured) the probe-set activations and
    gradients, captured from the model rebuilt for this checkpoint or read
    from an external activation file.
    """
    from gramlin_analyze.store import open_for_tasks

    pending = None
    try:
        before = _file_state(job.files)
        reader = reader_for(job.format, ctx.reader_options)
        root = open_for_tasks(ctx.store_url, ctx.storage_options, ctx.run_token)
        layers_grp = root[L.LAYERS]
        # Weight writes go on while the next tensors are read and the probe set
        # runs; leaving the block waits for them.
        with reader.open(job.path) as opened, _Writes() as writes:
            # Capture rebuilds the model from every tensor: read each one once.
            h = _Cached(opened) if ctx.capture else opened
            layer_nonfinite = _write_weights(ctx, job, h, layers_grp, writes)
            meta = h.read_metadata()
            if ctx.capture:
                pending = _capture(ctx, job, h, root)
        if ctx.external_dir:
            _write_external(ctx, job, root)
        if ctx.recorded:
            from gramlin_analyze.ingest.recorded import write_recorded

            write_recorded(layers_grp, job.index, job.record, ctx.recorded)
        if _file_state(job.files) != before:
            raise CheckpointFormatError(
                f"{job.path}: the file changed while it was being read (still being written?); "
                "run ingest again once training has finished writing it"
            )
    except _READ_ERRORS as err:
        if is_store_fault(err, ctx.store_url):  # not the checkpoint's fault: the run stops
            raise
        error = error_message(err, job.path)
        return TaskResult(job.index, "failed", error=error, pending=pending)
    return TaskResult(
        job.index,
        "ok",
        nonfinite=sum(layer_nonfinite.values()),
        layer_nonfinite=layer_nonfinite,
        lr=meta.lr,
        epoch=meta.epoch,
        tokens_seen=meta.tokens_seen,
        optimizer=meta.optimizer or "",
        optimizer_params=str(meta.extra.get("optimizer_params", "")),
        pending=pending,
    )


def _write_weights(
    ctx: TaskContext, job: CheckpointJob, h, layers_grp, writes: _Writes
) -> dict[str, int]:
    """Each layer's weight (and bias) into the step's row; ``{layer: NaN/Inf count}``."""
    layers = layers_of(h.list_tensors())
    problem = check_against(layers, ctx.template)
    if problem:
        raise ShapeMismatchError(f"{job.path}: {problem}")
    layer_nonfinite: dict[str, int] = {}
    for name, (shape, _, has_bias) in ctx.template.items():
        spec = layers[name]
        grp = layers_grp[name]
        dtype = np.dtype(ctx.stored_dtypes[name])
        w = h.read_tensor(spec.weight)
        if tuple(w.shape) != tuple(shape):
            raise ShapeMismatchError(
                f"{job.path}: tensor {spec.weight!r} read with shape {w.shape}, listed as {shape}"
            )
        w = np.asarray(w, dtype=dtype).reshape(shape[0], -1)
        nonfinite = count_nonfinite(w)
        writes.put(writable(grp["weight"]), job.index, w)
        del w
        if has_bias:
            b = np.asarray(h.read_tensor(spec.bias), dtype=dtype)
            nonfinite += count_nonfinite(b)
            writes.put(writable(grp["bias"]), job.index, b)
        layer_nonfinite[name] = nonfinite  # the driver writes it with the manifest row
    return layer_nonfinite


def error_message(err: BaseException, path: str | os.PathLike) -> str:
    """The error's message, prefixed with the checkpoint's path unless it names it."""
    msg = str(err).strip().strip("'\"") or type(err).__name__
    path = str(path)
    if path not in msg and Path(path).name not in msg:
        msg = f"{path}: {msg}"
    return msg.splitlines()[0] if len(msg) > 2000 else msg


class _Writes:
    """A checkpoint's weight writes, a few in flight while the next tensors are read.

    A large chunk is written with ``O_DIRECT`` and its call returns when the
    device has it: one after another, a checkpoint's layers waited on the
    device in turn. At most ``depth`` writes are in flight (memory stays a few
    tensors); leaving the block waits for all and re-raises the first error.
    """

    _pool = None
    _pool_lock = threading.Lock()

    def __init__(self, depth: int = 4):
        self.depth = depth
        self.pending: list = []

    @classmethod
    def _executor(cls):
        with cls._pool_lock:
            if cls._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                cls._pool = ThreadPoolExecutor(
                    2 * (os.cpu_count() or 1), thread_name_prefix="gramlin-weights"
                )
            return cls._pool

    def put(self, arr, index: int, value: np.ndarray) -> None:
        while len(self.pending) >= self.depth:
            self.pending.pop(0).result()
        self.pending.append(self._executor().submit(put_step, arr, index, value))

    def __enter__(self) -> _Writes:
        return self

    def __exit__(self, *exc: object) -> None:
        from concurrent.futures import wait

        wait(self.pending)
        if exc[0] is None:
            for fut in self.pending:
                fut.result()


class _Cached:
    """A handle that keeps what it read (one checkpoint, for weights and model)."""

    def __init__(self, handle):
        self._handle = handle
        self._cache: dict[str, np.ndarray] = {}

    def read_tensor(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._handle.read_tensor(name)
        return self._cache[name]

    def __getattr__(self, attr: str):
        return getattr(self._handle, attr)


def _capture(ctx: TaskContext, job: CheckpointJob, handle, root) -> Future | None:
    """Capture the step's activations and gradients; the writes still running, if behind."""
    from gramlin_analyze.capture.task import CaptureConfig, capture_checkpoint
    from gramlin_analyze.store import ActivationSink

    config = CaptureConfig.from_json(ctx.capture)
    layers = ctx.activation_layers
    behind = ctx.write_behind
    sink = ActivationSink(root[L.LAYERS], job.index, layers)
    if behind:
        _write_behind_slots.acquire()
    pending = None
    try:
        result = capture_checkpoint(
            config, handle, layers=layers, sink=sink, step=job.step, device=ctx.device
        )
        pending = sink.finish(wait=not behind)
    finally:
        sink.close()
        if behind:  # the slot is given back on every path: now, or when the writes end
            if pending is None:
                _write_behind_slots.release()
            else:
                pending.add_done_callback(lambda _: _write_behind_slots.release())
    sink.check_complete()
    if result.agop:
        for name, mat in result.agop.items():
            if name in layers:
                writable(root[L.LAYERS][name]["agop"])[job.index] = mat
    return pending if behind else None


#: Steps whose activation writes may still be running after their task returned
#: (write-behind, threaded ingest only): a task waits for a slot before capturing,
#: so at most this many steps' chunk buffers are held by unfinished writes.
#: Capture runs one task per core, and each running task holds a slot: with
#: only as many slots as cores, every task waited for the previous step's last
#: writes before it could start (0.35 s of waiting over benchmarks/capture.py's
#: 20 checkpoints). One more slot lets a step's writes finish while the next
#: is computed; more than that made no difference there, and each costs up to
#: a step's chunk buffers of memory.
_write_behind_slots = threading.Semaphore((os.cpu_count() or 1) + 1)


def _write_external(ctx: TaskContext, job: CheckpointJob, root) -> None:
    from gramlin_analyze.capture.external import read_activation_file

    path = job.external
    if path is None:
        raise CheckpointFormatError(
            f"{job.path}: no activation file for step {job.step} in {ctx.external_dir} "
            f"(expected step_{job.step}.npz or .safetensors); export it, then run ingest again"
        )
    arrays = read_activation_file(path)
    for name in ctx.activation_layers:
        if name not in arrays:
            raise ShapeMismatchError(f"{path}: no activations for layer {name!r}")
        grp = root[L.LAYERS][name]
        for key in ("input", "input_grad"):
            a = arrays[name][key]
            if a.shape != grp[key].shape[1:]:
                raise ShapeMismatchError(
                    f"{path}: {name}/{key} has shape {a.shape}, the store expects {grp[key].shape[1:]}"
                )
            writable(grp[key])[job.index] = a
