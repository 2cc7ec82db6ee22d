"""The on-disk layout: group names, dims, manifest fields, chunk sizes.

This module is the single place that knows names and shapes on disk; the
JSON Schemas in ``schemas/`` describe the same contract for other readers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SCHEMA_VERSION = "1.0"


def schema_tuple(version: object) -> tuple[int, ...]:
    """``"1.2"`` as ``(1, 2)``; an unreadable version sorts after every real one."""
    try:
        return tuple(int(p) for p in str(version).split("."))
    except ValueError:
        return (10**9,)


def schema_major(version: object) -> int:
    """The major part of a schema version: a reader reads every minor version of its major."""
    return schema_tuple(version)[0]


STEPS = "steps"
LAYERS = "layers"
PROBE = "probe"
METRICS = "metrics"

#: Manifest variables of ``/steps``: name -> (zarr dtype, fill value, long_name, units)
MANIFEST: dict[str, tuple[type[str] | str, object, str, str | None]] = {
    "source_path": (str, "", "checkpoint path (file or directory)", None),
    "format": (str, "", "checkpoint reader that read it", None),
    "fingerprint": (str, "", "content fingerprint (size + sampled blake2b)", None),
    "bytes": ("int64", -1, "checkpoint size on disk", "bytes"),
    "lr": ("float64", np.nan, "learning rate at this checkpoint", None),
    "epoch": ("float64", np.nan, "training epoch at this checkpoint", None),
    "tokens_seen": (
        "float64",
        np.nan,
        "training tokens seen at this checkpoint (HF num_input_tokens_seen)",
        None,
    ),
    "status": (str, "", "ingest status: ok | pending | failed", None),
    "error": (str, "", "why the step failed (empty when ok)", None),
    "nonfinite": ("int64", -1, "number of NaN/Inf values stored for this step", None),
    "lr_source": (
        str,
        "",
        "where lr came from: checkpoint | constant | schedule:<path> | unknown",
        None,
    ),
    "optimizer": (str, "", "optimizer family when the checkpoint says it", None),
    "optimizer_params": (
        str,
        "",
        "JSON: the optimizer's hyper-parameters (lr, momentum, betas, eps, weight_decay, ...), "
        "inferred_from (the keys that decided the family) and source",
        None,
    ),
    "stat_key": (
        str,
        "",
        "size, mtime and inode of the files when the fingerprint was taken (lets ingest skip re-hashing them)",
        None,
    ),
}

STATUSES = ("ok", "pending", "failed")

#: chunk length of the manifest arrays along ``step`` (one driver writes them)
MANIFEST_CHUNK = 512

#: target bytes of one chunk of a weight or activation array
TARGET_CHUNK_BYTES = 32 * 2**20

#: Chunk keys of the step-major arrays (weights, activations, metric matrices):
#: ``c.<step>.<row>.<col>``, every chunk a file in its array's directory.
#: Zarr's default ``c/<step>/<row>/<col>`` makes a directory per step (and
#: per row tile): twice as many inodes as chunks, which on a local disk
#: made creating them a sixth of the CPU time of a capture. Readers need
#: nothing: the encoding is in each array's metadata.
STEP_CHUNK_KEYS = {"name": "default", "separator": "."}


def matrix_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks for a ``(step, rows, cols)`` array: one step per chunk, rows tiled.

    One step per chunk means parallel writers of different steps never share
    a chunk; rows are tiled so that a chunk stays under about 32 MiB.
    """
    rest = shape[2:]
    row_bytes = max(1, int(np.prod(rest, dtype=np.int64)) * itemsize)
    rows = max(1, min(shape[1], TARGET_CHUNK_BYTES // row_bytes)) if len(shape) > 1 else 1
    return (1, rows, *rest)


def leading_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks tiling only the first axis, about ``TARGET_CHUNK_BYTES`` each (probe inputs)."""
    if not shape:
        return ()
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    return (max(1, min(shape[0], TARGET_CHUNK_BYTES // row)), *shape[1:])


#: target bytes of an activation chunk: capture buffers up to one chunk per layer
ACTIVATION_CHUNK_BYTES = 8 * 2**20


def activation_rows(n: int, d: int, itemsize: int, *, batch_rows: int) -> int:
    """Rows per ``(step, sample, in)`` chunk: about 8 MiB, at least one capture batch.

    Small chunks (one 256-sample batch of a 512-wide layer is 0.5 MiB) made
    capture 2x slower in writes alone; chunks are equal-sized so that the
    last is not a sliver.
    """
    row = max(1, d * itemsize)
    rows = max(batch_rows, ACTIVATION_CHUNK_BYTES // row)
    rows = min(rows, max(1, TARGET_CHUNK_BYTES // row), max(1, n))
    nchunks = math.ceil(n / rows) if n else 1
    return max(1, math.ceil(n / nchunks))


def sample_chunks(shape: tuple[int, int, int], itemsize: int) -> tuple[int, int, int]:
    """Chunks for ``(step, sample, in)`` activations: one step, samples tiled."""
    _, n, d = shape
    rows = max(1, min(n, TARGET_CHUNK_BYTES // max(1, d * itemsize)))
    # Equal-sized chunks read better than one big and one small.
    nchunks = math.ceil(n / rows)
    rows = math.ceil(n / nchunks) if n else 1
    return (1, rows, d)


def storage_dtype(dtype: str) -> np.dtype:
    """float32/float16/float64 are kept; bfloat16 (and other floats) become float32."""
    if dtype in ("float16", "float32", "float64"):
        return np.dtype(dtype)
    return np.dtype("float32")


def layer_kind(layer: str, shape: tuple[int, ...]) -> str:
    if len(shape) > 2:
        return "conv"
    if "embed" in layer.lower() or "wte" in layer.lower() or "wpe" in layer.lower():
        return "embedding"
    return "linear"


# -- node specs: keywords for zarr's ``create_array`` ----------------------------------


def step_coord_spec(steps) -> dict[str, Any]:
    """Keywords creating a group's ``step`` coordinate holding ``steps``."""
    kw: dict[str, Any] = dict(
        chunks=(MANIFEST_CHUNK,),
        dimension_names=["step"],
        fill_value=-1,
        overwrite=True,
        attributes={"long_name": "optimizer step", "units": "steps"},
    )
    if len(steps):
        kw["data"] = np.asarray(steps, dtype=np.int64)
    else:
        kw.update(shape=(0,), dtype="int64")
    return kw


def manifest_spec(name: str, n: int) -> dict[str, Any]:
    """Keywords creating manifest column ``name`` of length ``n``."""
    dtype, fill, long_name, units = MANIFEST[name]
    kw: dict[str, Any] = {} if dtype is str else {"fill_value": fill}
    return dict(
        shape=(n,),
        dtype=dtype,
        chunks=(MANIFEST_CHUNK,),
        dimension_names=["step"],
        overwrite=True,
        attributes={"long_name": long_name, **({"units": units} if units else {})},
        **kw,
    )


def layer_array_specs(name: str, steps, weight_shape: tuple[int, ...], dtype: np.dtype, bias: bool):
    """``(path, keywords)`` of the arrays of ``/layers/<name>``: ``step``, ``weight``,
    ``bias`` when the layer has one, and ``nonfinite``."""
    base = f"{LAYERS}/{name}"
    n = len(steps)
    shape = (n, *weight_shape)
    specs = [
        (f"{base}/step", step_coord_spec(steps)),
        (
            f"{base}/weight",
            dict(
                shape=shape,
                dtype=dtype,
                chunks=matrix_chunks(shape, dtype.itemsize),
                dimension_names=["step", "out", "in"],
                fill_value=np.nan,
                compressors=None,
                chunk_key_encoding=STEP_CHUNK_KEYS,
                attributes={"long_name": f"weight of {name}, (out, in) order", "units": "1"},
            ),
        ),
    ]
    if bias:
        specs.append(
            (
                f"{base}/bias",
                dict(
                    shape=(n, weight_shape[0]),
                    dtype=dtype,
                    chunks=(1, weight_shape[0]),
                    dimension_names=["step", "out"],
                    fill_value=np.nan,
                    compressors=None,
                    chunk_key_encoding=STEP_CHUNK_KEYS,
                    attributes={"long_name": f"bias of {name}", "units": "1"},
                ),
            )
        )
    specs.append(
        (
            f"{base}/nonfinite",
            dict(
                shape=(n,),
                dtype="int64",
                chunks=(MANIFEST_CHUNK,),
                dimension_names=["step"],
                fill_value=-1,  # written by the driver with the manifest rows, like them chunked
                attributes={"long_name": f"NaN/Inf values in weight and bias of {name}"},
            ),
        )
    )
    return specs


# -- training-time records (gramlin_analyze.record) in /layers/<name> ------------------

#: Recorded running sums stored per step as ``<q>_recorded``: ``q`` -> long_name.
RECORDED_SUMS: dict[str, str] = {
    "vcs": "recorded VCS summed over every optimizer step since training began",
    "vcs_first": "first-order part -gamma (W^T G + G^T W) of the recorded VCS sum",
    "vcs_second": "second-order part gamma^2 sum_i g_i g_i^T of the recorded VCS sum",
    "dgram": "recorded W_t^T W_t - W_0^T W_0 since training began",
    "sgd_second": "recorded sum of gamma^2 G^T G (plain SGD: vcs_first + sgd_second is the Gram change)",
}

#: Recorded per-step counters stored as ``<q>_recorded``: ``q`` -> (dtype, fill, long_name).
RECORDED_COUNTERS: dict[str, tuple[str, int | float, str]] = {
    "steps": ("int64", -1, "optimizer steps the record summed (-1: no record for this step)"),
    "samples": ("int64", -1, "rows i summed by the record (-1: no record)"),
    "lr_sum": ("float64", np.nan, "sum of the learning rates of the recorded steps"),
}

RECORDED_SOURCE = "gramlin_analyze.record: every optimizer step on its own training batch"


def recorded_name(quantity: str) -> str:
    """The array of ``/layers/<name>`` holding a recorded quantity: ``vcs`` -> ``vcs_recorded``."""
    return f"{quantity}_recorded"


def recorded_array_specs(
    name: str, n_steps: int, d_in: int, mode: str, quantities: tuple[str, ...]
) -> list[tuple[str, dict[str, Any]]]:
    """``(path, keywords)`` of the recorded arrays of ``/layers/<name>``: each sum as
    ``(step, in_i, in_j)`` (mode ``full``) or ``(step, in)`` (``diag``), one step per chunk,
    and the counters ``(step,)`` in chunks of one step, so that tasks never share a chunk."""
    base = f"{LAYERS}/{name}"
    common: dict[str, Any] = dict(
        compressors=None, overwrite=True, chunk_key_encoding=STEP_CHUNK_KEYS
    )
    specs = []
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    for q in quantities:
        if mode == "full":
            shape, dims = (n_steps, d_in, d_in), ["step", "in_i", "in_j"]
            chunks = matrix_chunks(shape, 8)
        else:
            shape, dims, chunks = (n_steps, d_in), ["step", "in"], (1, d_in)
        attrs = {"long_name": f"{RECORDED_SUMS[q]} ({name})", "units": "1", "mode": mode}
        attrs["source"] = RECORDED_SOURCE
        kw = dict(shape=shape, dtype="float64", chunks=chunks, fill_value=np.nan, **common)
        specs.append(
            (f"{base}/{recorded_name(q)}", dict(kw, dimension_names=dims, attributes=attrs))
        )
    for q, (dtype, fill, long_name) in RECORDED_COUNTERS.items():
        kw = dict(shape=(n_steps,), dtype=dtype, chunks=(1,), fill_value=fill, **common)
        attrs = {"long_name": long_name, "source": RECORDED_SOURCE}
        specs.append(
            (f"{base}/{recorded_name(q)}", dict(kw, dimension_names=["step"], attributes=attrs))
        )
    return specs
