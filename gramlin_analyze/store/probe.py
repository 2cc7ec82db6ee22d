"""``/probe`` and the capture arrays (``input``, ``input_grad``, ``agop``) of each layer."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import create_nodes, update_attributes_all

__all__ = ["declare_activations", "write_probe"]


def write_probe(store, probe: Any, attrs: dict[str, Any]) -> None:
    """Create ``/probe`` (dims ``sample``, …) from a ``ProbeSet`` and its capture attrs.

    Attributes go in with each node (an ``attrs.update`` afterwards rewrites
    it); the group and its arrays, with their data, are created together.
    """
    n = probe.n_samples
    base = L.PROBE
    arrays: list[tuple[str, dict[str, Any]]] = [
        (
            f"{base}/sample",
            dict(
                data=np.arange(n, dtype=np.int64),
                chunks=(n,),
                dimension_names=["sample"],
                attributes={"long_name": "probe sample index"},
            ),
        ),
    ]
    x = np.ascontiguousarray(probe.inputs)
    arrays.append(
        (
            f"{base}/inputs",
            dict(
                data=x,
                chunks=L.leading_chunks(x.shape, x.dtype.itemsize),
                dimension_names=["sample", *[f"input_dim_{i}" for i in range(1, x.ndim)]],
                attributes={"long_name": "probe inputs"},
            ),
        )
    )
    if probe.labels is not None:
        y = np.asarray(probe.labels, dtype=np.int64)
        arrays.append(
            (
                f"{base}/labels",
                dict(
                    data=y,
                    chunks=y.shape or (1,),
                    dimension_names=["sample", *[f"label_dim_{i}" for i in range(1, y.ndim)]],
                    attributes={"long_name": "class index"},
                ),
            )
        )
    if probe.targets is not None:
        t = np.asarray(probe.targets)
        t2 = t.reshape(n, -1)
        arrays.append(
            (
                f"{base}/targets",
                dict(
                    data=t2,
                    chunks=t2.shape,
                    dimension_names=["sample", "target"],
                    attributes={"long_name": "regression target", "original_shape": list(t.shape)},
                ),
            )
        )
    sid = None if probe.sample_id is None else np.asarray(probe.sample_id)
    text = sid is not None and sid.dtype.kind in "US"
    if sid is not None:
        # Text ids are stored as zarr's variable-length strings (no fixed-width dtype): created, then written.
        spec = dict(
            chunks=(n,),
            dimension_names=["sample"],
            attributes={"long_name": "sample id from the probe file"},
        )
        arrays.append(
            (
                f"{base}/sample_id",
                {**spec, "shape": (n,), "dtype": str} if text else {**spec, "data": sid},
            )
        )
    store.structure_changed()
    create_nodes(store.zstore, groups=[(base, attrs)], arrays=arrays, overwrite_groups=True)
    if text:
        store.root[f"{base}/sample_id"][:] = cast(np.ndarray, sid).astype(
            object
        )  # text implies sid


def declare_activations(
    store,
    layers: dict[str, tuple[int, int, int, int]],
    *,
    dtype: np.dtype,
    agop: bool,
) -> None:
    """Create ``input``/``input_grad`` (step, sample, in) (and ``agop``) in each ``/layers/<layer>``.

    ``layers`` maps a layer to ``(n_samples, d_in, rows_per_chunk,
    samples_per_example)``; every array is created in one concurrent batch.
    """
    n_steps = len(store.steps())
    specs: list[tuple[str, dict[str, Any]]] = []
    for layer, (n_samples, d_in, rows_per_chunk, per_example) in layers.items():
        base = f"{L.LAYERS}/{layer}"
        shape = (n_steps, n_samples, d_in)
        chunks = (1, max(1, min(n_samples, rows_per_chunk)), d_in)
        for name, long_name in (
            ("input", f"input h of {layer} (previous layer's output; conv: unfolded patches)"),
            (
                "input_grad",
                f"g = W^T dL/dz of {layer}: loss gradient w.r.t. h through this layer only",
            ),
        ):
            specs.append(
                (
                    f"{base}/{name}",
                    dict(
                        shape=shape,
                        dtype=dtype,
                        chunks=chunks,
                        dimension_names=["step", "sample", "in"],
                        fill_value=np.nan,
                        compressors=None,
                        overwrite=True,
                        chunk_key_encoding=L.STEP_CHUNK_KEYS,
                        attributes={"long_name": long_name, "samples_per_example": per_example},
                    ),
                )
            )
        if agop:
            specs.append(
                (
                    f"{base}/agop",
                    dict(
                        shape=(n_steps, d_in, d_in),
                        dtype="float64",
                        chunks=L.matrix_chunks((n_steps, d_in, d_in), 8),
                        dimension_names=["step", "in_i", "in_j"],
                        fill_value=np.nan,
                        compressors=None,
                        overwrite=True,
                        chunk_key_encoding=L.STEP_CHUNK_KEYS,
                        attributes={
                            "long_name": f"AGOP of the network output w.r.t. the input of {layer}"
                        },
                    ),
                )
            )
    store.structure_changed()
    create_nodes(store.zstore, arrays=specs)
    groups = [(store.root[f"{L.LAYERS}/{layer}"], per) for layer, (_, _, _, per) in layers.items()]
    update_attributes_all([(g, {"samples_per_example": per}) for g, per in groups])
