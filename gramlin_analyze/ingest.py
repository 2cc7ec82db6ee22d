"""``ingest``: checkpoints -> store, as one Dask graph with one task per checkpoint.

The driver plans (scan, layer template, step axis) and is the only writer of
the ``/steps`` manifest; each task reads one checkpoint, one tensor at a
time, and writes its own step's chunks. A step becomes ``ok`` only after the
task has written every array of it, so a killed ingest is finished by the
next run, and an unchanged checkpoint (same fingerprint, status ``ok``) is
never read again.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gramlin_analyze.errors import (
    CheckpointFormatError,
    GramlinError,
    ShapeMismatchError,
    UsageError,
)
from gramlin_analyze.io.base import TensorInfo
from gramlin_analyze.io.discovery import CheckpointSource, scan
from gramlin_analyze.io.names import common_wrapper_prefix, select_layers, split_param_name
from gramlin_analyze.io.registry import get_reader
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.core import GramlinStore
from gramlin_analyze.store.lock import is_remote

__all__ = ["ingest", "IngestReport", "plan_layers", "default_store_path"]


@dataclass
class IngestReport:
    """What one ``ingest`` did."""

    store: str
    ingested: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    nonfinite: dict[int, int] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0
    scan_skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def default_store_path(directory: str | os.PathLike) -> str:
    return str(Path(directory).resolve()).rstrip("/") + ".zarr"


# -- layer template ------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One stored layer as a checkpoint presents it."""

    weight: str  # raw tensor name in this checkpoint
    bias: str | None
    shape: tuple[int, ...]  # (out, in, *kernel) as the reader returns it
    dtype: str


def layers_of(infos: dict[str, TensorInfo]) -> dict[str, LayerSpec]:
    """Every matrix-shaped weight of a checkpoint, by normalized layer name."""
    prefix = common_wrapper_prefix(infos)
    weights: dict[str, TensorInfo] = {}
    biases: dict[str, str] = {}
    for raw, info in infos.items():
        layer, role = split_param_name(raw, prefix)
        if role == "weight" and len(info.shape) >= 2:
            weights[layer] = info
        elif role == "bias" and len(info.shape) == 1:
            biases[layer] = raw
    out = {}
    for layer, info in weights.items():
        b = biases.get(layer)
        if b is not None and infos[b].shape[0] != info.shape[0]:
            b = None
        out[layer] = LayerSpec(info.name, b, tuple(info.shape), info.dtype)
    return out


def plan_layers(
    listed: dict[int, dict[str, LayerSpec]],
    *,
    include: list[str] | None,
    exclude: list[str] | None,
) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """The trajectory's layer template: ``layer -> (shape, dtype, has_bias)``.

    Shapes are decided by majority over checkpoints, so one odd checkpoint
    fails alone instead of redefining the run.
    """
    votes: Counter = Counter()
    first: dict[tuple, int] = {}
    for step, layers in sorted(listed.items()):
        chosen = select_layers(layers, include, exclude)
        sig = tuple(sorted((k, layers[k].shape, layers[k].bias is not None) for k in chosen))
        votes[sig] += 1
        first.setdefault(sig, step)
    if not votes:
        return {}
    best = max(votes, key=lambda s: (votes[s], -first[s]))
    dtypes: dict[str, str] = {}
    for step, layers in sorted(listed.items()):
        for name, shape, _ in best:
            if name in layers and name not in dtypes:
                dtypes[name] = layers[name].dtype
    return {name: (shape, dtypes[name], has_bias) for name, shape, has_bias in best}


def _check_against(layers: dict[str, LayerSpec], template: dict) -> str | None:
    for name, (shape, _, has_bias) in template.items():
        spec = layers.get(name)
        if spec is None:
            return f"layer {name!r} is missing (the other checkpoints have it)"
        if tuple(spec.shape) != tuple(shape):
            return (
                f"layer {name!r} has shape {tuple(spec.shape)} but the trajectory has {tuple(shape)}; "
                "this checkpoint belongs to another model: move it out of the run directory"
            )
        if has_bias and spec.bias is None:
            return f"layer {name!r} has no bias (the other checkpoints have one)"
    return None


# -- the task ----------------------------------------------------------------------


def count_nonfinite(a: np.ndarray) -> int:
    """NaN/Inf count; a sum is ~15x cheaper than ``isfinite`` and is finite
    exactly when every value is (barring overflow, which falls back to the count)."""
    with np.errstate(all="ignore"):
        if np.isfinite(np.add.reduce(a, axis=None, dtype=np.float64)):
            return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def _file_state(files: list[str]) -> list[tuple[int, int]]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append((st.st_size, st.st_mtime_ns))
    return out


def ingest_one(
    store_url: str,
    storage_options: dict | None,
    index: int,
    source: dict[str, Any],
    template: dict[str, tuple[tuple[int, ...], str, bool]],
    stored_dtypes: dict[str, str],
) -> dict[str, Any]:
    """Read one checkpoint and write its step; never raises for bad input.

    Returns the manifest fields for the driver (``status`` last).
    """
    import zarr

    from gramlin_analyze.store.core import zarr_store

    path = source["path"]
    result: dict[str, Any] = {"index": index, "status": "failed", "error": "", "nonfinite": -1}
    try:
        before = _file_state(source["files"])
        reader = get_reader(source["format"], **source.get("reader_options", {}))
        root = zarr.open_group(
            zarr_store(store_url, storage_options=storage_options), mode="r+",
            zarr_format=3, use_consolidated=False,
        )
        layers_grp = root[L.LAYERS]
        total_nonfinite = 0
        with reader.open(path) as h:
            layers = layers_of(h.list_tensors())
            problem = _check_against(layers, template)
            if problem:
                raise ShapeMismatchError(f"{path}: {problem}")
            for name, (shape, _, has_bias) in template.items():
                spec = layers[name]
                grp = layers_grp[name]
                dtype = np.dtype(stored_dtypes[name])
                w = h.read_tensor(spec.weight)
                if tuple(w.shape) != tuple(shape):
                    raise ShapeMismatchError(
                        f"{path}: tensor {spec.weight!r} read with shape {w.shape}, listed as {shape}"
                    )
                w = np.asarray(w, dtype=dtype).reshape(shape[0], -1)
                nonfinite = count_nonfinite(w)
                grp["weight"][index] = w
                del w
                if has_bias:
                    b = np.asarray(h.read_tensor(spec.bias), dtype=dtype)
                    nonfinite += count_nonfinite(b)
                    grp["bias"][index] = b
                grp["nonfinite"][index] = nonfinite
                total_nonfinite += nonfinite
            meta = h.read_metadata()
        if _file_state(source["files"]) != before:
            raise CheckpointFormatError(
                f"{path}: the file changed while it was being read (still being written?); "
                "run ingest again once training has finished writing it"
            )
        result.update(
            status="ok",
            nonfinite=total_nonfinite,
            lr=meta.lr,
            epoch=meta.epoch,
            optimizer=meta.optimizer or "",
        )
    except (GramlinError, OSError, KeyError, ValueError, RuntimeError, EOFError) as err:
        msg = str(err).strip().strip("'\"") or type(err).__name__
        if path not in msg and Path(path).name not in msg:
            msg = f"{path}: {msg}"
        result["error"] = msg.splitlines()[0] if len(msg) > 2000 else msg
    return result


# -- the driver --------------------------------------------------------------------


def _make_tasks_runner(workers: int | None, scheduler: str | None, threads: int | None):
    """Return ``run(funcs, on_done)`` executing callables on the chosen scheduler."""

    def run_threads(tasks: list, on_done: Callable[[dict], None]) -> None:
        import dask
        from dask.callbacks import Callback

        keys = {}
        delayed = []
        for t in tasks:
            d = dask.delayed(t[0], pure=False)(*t[1:])
            keys[d.key] = d
            delayed.append(d)

        class _Done(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                if key in keys:
                    on_done(result)

        with _Done():
            dask.compute(*delayed, scheduler="threads", num_workers=threads or os.cpu_count())

    def run_distributed(tasks: list, on_done: Callable[[dict], None]) -> None:
        from distributed import Client, LocalCluster, as_completed

        if scheduler:
            client = Client(scheduler)
            cluster = None
        else:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=None, silence_logs=40,
            )
            client = Client(cluster)
        try:
            futures = [client.submit(t[0], *t[1:], pure=False) for t in tasks]
            for fut in as_completed(futures):
                on_done(fut.result())
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    if scheduler or (workers and workers > 0):
        return run_distributed
    return run_threads


def ingest(
    directory: str | os.PathLike,
    store: str | os.PathLike | None = None,
    *,
    layers: list[str] | None = None,
    exclude: list[str] | None = None,
    format: str | None = None,
    order: str | None = None,
    state_dict_key: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    storage_options: dict | None = None,
    break_lock: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> IngestReport:
    """Ingest every checkpoint under ``directory`` into the store at ``store``.

    Only new, changed (fingerprint) or not-yet-``ok`` checkpoints are read.

    Parameters
    ----------
    directory
        Run directory (searched recursively) or one checkpoint.
    store
        Store path or fsspec URL; default ``<directory>.zarr``.
    layers, exclude
        Glob patterns over normalized layer names (``encoder.*``).
    format, order, state_dict_key
        See :func:`gramlin_analyze.io.discovery.scan`.
    workers
        Run on a ``LocalCluster`` of this many processes instead of threads.
    threads
        Threads of the default threaded scheduler (default: all cores).
    scheduler
        Address of a running Dask scheduler (``tcp://host:8786``).
    progress
        Called as ``progress(done, total, bytes_done)`` after each checkpoint.
    on_error
        Called with one message per failed checkpoint.

    Returns
    -------
    IngestReport
    """
    t0 = time.perf_counter()
    store = str(store) if store is not None else default_store_path(directory)
    reader_options = {"state_dict_key": state_dict_key} if state_dict_key else None
    sources = scan(directory, format=format, order=order, reader_options=reader_options)
    report = IngestReport(store=store, scan_skipped=list(getattr(sources, "skipped", [])))
    if not is_remote(store) and Path(store).resolve() == Path(directory).resolve():
        raise UsageError("the store cannot be the checkpoint directory itself; pass --store OUT")

    gs = GramlinStore(store, mode="a", storage_options=storage_options)
    with gs.lock(break_lock=break_lock):
        gs.initialize(source=str(directory))
        man = gs.manifest()
        ok_fp = {
            int(s): fp for s, st, fp in zip(man["step"], man["status"], man["fingerprint"], strict=True)
            if st == "ok"
        }
        todo = [s for s in sources if ok_fp.get(s.step) != s.fingerprint]
        report.skipped = [s.step for s in sources if ok_fp.get(s.step) == s.fingerprint]

        # List tensors (headers only) to fix the template and fail odd checkpoints early.
        listed: dict[int, dict[str, LayerSpec]] = {}
        plan_errors: dict[int, str] = {}
        for src in todo:
            try:
                reader = get_reader(src.format, **(reader_options or {}) if src.format in ("torch", "lightning") else {})
                listed[src.step] = layers_of(reader.list_tensors(src.path))
            except (GramlinError, OSError, KeyError, ValueError, RuntimeError, EOFError) as err:
                msg = str(err).strip().strip("'\"")
                plan_errors[src.step] = msg if str(src.path) in msg or src.path.name in msg else f"{src.path}: {msg}"

        stored = gs.layer_names()
        if stored:
            template = {}
            for name in stored:
                a = dict(gs.layer(name).attrs)
                template[name] = (tuple(a["source_shape"]), a["source_dtype"], bool(a["has_bias"]))
            if layers or exclude:
                wanted = select_layers(stored, layers, exclude)
                if sorted(wanted) != stored:
                    raise UsageError(
                        f"{store} already holds layers {stored}; the --layers/--exclude selection "
                        "differs. Ingest into a new store to change the layer selection"
                    )
        else:
            template = plan_layers(listed, include=layers, exclude=exclude)
            if not template and listed:
                avail = sorted({k for v in listed.values() for k in v})
                raise UsageError(
                    f"no layer matches --layers {layers or ['*']} --exclude {exclude or []}; "
                    f"available layers: {', '.join(avail) or '(no matrix-shaped weights)'}"
                )
        for step, lay in listed.items():
            problem = _check_against(lay, template)
            if problem:
                src = next(s for s in todo if s.step == step)
                plan_errors[step] = f"{src.path}: {problem}"

        new_steps = sorted(set(int(s) for s in man["step"][man["status"] == "ok"]) | {s.step for s in sources}
                           | {int(s) for s, st in zip(man["step"], man["status"], strict=True)
                              if st == "failed"})
        if not stored and template:
            gs.set_step_axis(np.asarray(new_steps, dtype=np.int64))
            for name, (shape, dtype, has_bias) in template.items():
                sdtype = L.storage_dtype(dtype)
                flat = (shape[0], int(np.prod(shape[1:], dtype=np.int64)))
                attrs = {
                    "param_name": listed[min(listed)][name].weight if name in listed[min(listed)] else name,
                    "kind": L.layer_kind(name, shape),
                    "source_shape": list(shape),
                    "source_dtype": dtype,
                    "stored_dtype": sdtype.name,
                    "has_bias": has_bias,
                    "long_name": f"layer {name}",
                }
                if len(shape) > 2:
                    attrs["kernel_shape"] = list(shape[1:])
                    attrs["im2col_view"] = (
                        "weight is the (out, in*k...) view of the (out, in, *kernel) kernel in C order: "
                        "weight.reshape(out, *kernel_shape) restores it"
                    )
                if dtype == "bfloat16":
                    attrs["bfloat16_stored_as"] = "float32"
                gs.declare_layer(name, weight_shape=flat, dtype=sdtype, bias=has_bias, attrs=attrs)
            gs.consolidate()
        pos = gs.set_step_axis(np.asarray(new_steps, dtype=np.int64))
        stored_dtypes = {n: dict(gs.layer(n).attrs)["stored_dtype"] for n in gs.layer_names()}

        gs.write_rows(
            [pos[s.step] for s in todo],
            source_path=[str(s.path) for s in todo], format=[s.format for s in todo],
            fingerprint=[s.fingerprint for s in todo], bytes=[s.bytes for s in todo],
            status="pending",
        )
        gs.write_rows(
            [pos[s] for s in plan_errors], error=list(plan_errors.values()), status="failed"
        )
        for step, msg in plan_errors.items():
            report.failed[step] = msg
            if on_error:
                on_error(msg)

        runnable = [s for s in todo if s.step not in plan_errors]
        tasks = [
            (
                ingest_one, store, storage_options, pos[s.step],
                {
                    "path": str(s.path), "format": s.format,
                    "files": [str(f) for f in s.files],
                    "reader_options": (reader_options or {}) if s.format in ("torch", "lightning") else {},
                },
                template, stored_dtypes,
            )
            for s in runnable
        ]
        by_index = {pos[s.step]: s for s in runnable}
        done = 0
        total = len(tasks)

        def on_done(res: dict) -> None:
            nonlocal done
            src = by_index[res["index"]]
            done += 1
            report.bytes_read += src.bytes
            meta_lr = res.get("lr")
            if res["status"] == "ok":
                gs.write_rows(
                    res["index"], lr=meta_lr, epoch=res.get("epoch"),
                    lr_source="metadata" if meta_lr is not None else "none",
                    optimizer=res.get("optimizer", ""), nonfinite=res["nonfinite"], error="",
                    status="ok",
                )
                report.ingested.append(src.step)
                if res["nonfinite"]:
                    report.nonfinite[src.step] = res["nonfinite"]
            else:
                gs.write_rows(res["index"], error=res["error"], status="failed")
                report.failed[src.step] = res["error"]
                if on_error:
                    on_error(res["error"])
            if progress:
                progress(done, total, report.bytes_read)

        if progress:
            progress(0, total, 0)
        if tasks:
            _make_tasks_runner(workers, scheduler, threads)(tasks, on_done)
        # Steps that failed in an earlier run and were not retried still count.
        man = gs.manifest()
        for s, st, err in zip(man["step"], man["status"], man["error"], strict=True):
            if st == "failed" and int(s) not in report.failed:
                report.failed[int(s)] = err
        gs.touch()
        gs.consolidate()
    report.ingested.sort()
    report.seconds = time.perf_counter() - t0
    return report
