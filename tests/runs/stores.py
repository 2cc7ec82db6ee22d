"""Stores of several runs for the comparison tests, made cheaply from one analyzed store.

Each is a real Zarr store in the store layout (root attributes, ``/steps``,
``/metrics``) written by xarray from a real store's groups: a subset of its steps,
its metric values scaled, its own run name and run attributes. Building one takes
a fraction of a second, where ingest and analyze take many.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from zarr.errors import UnstableSpecificationWarning, ZarrUserWarning


def derived_store(
    source: Path,
    dest: Path,
    *,
    steps=None,
    scale: float = 1.0,
    run_name: str | None = None,
    run_attrs: dict | None = None,
    epochs=None,
    tokens=None,
    status: dict[int, str] | None = None,
) -> Path:
    """``source``'s root attributes, ``/steps`` and ``/metrics`` (no per-layer matrices),
    at ``steps`` (default all), every float metric times ``scale``; ``epochs`` sets the
    manifest's epochs, ``status`` some steps' status."""
    tree = xr.open_datatree(str(source), engine="zarr")
    metrics = tree["metrics"].to_dataset(inherit=False).load()
    manifest = tree["steps"].to_dataset(inherit=False).load()
    if steps is not None:
        metrics, manifest = metrics.sel(step=list(steps)), manifest.sel(step=list(steps))
    for name, var in metrics.data_vars.items():
        if np.issubdtype(var.dtype, np.floating):
            metrics[name] = var * scale
            metrics[name].attrs = var.attrs
    if epochs is not None:
        manifest["epoch"] = ("step", np.asarray(epochs, float), manifest["epoch"].attrs)
    if tokens is not None:
        manifest["tokens_seen"] = ("step", np.asarray(tokens, float))
    if status:
        values = manifest["status"].values.astype(object)
        for step, value in status.items():
            values[list(manifest["step"].values).index(step)] = value
        manifest["status"] = ("step", values.astype(str), manifest["status"].attrs)
    attrs = dict(tree.attrs)
    if run_name is not None:
        attrs["run_name"] = run_name
    if run_attrs is not None:
        attrs["run_attrs"] = run_attrs
    out = xr.DataTree.from_dict(
        {"/": xr.Dataset(attrs=attrs), "/steps": manifest, "/metrics": metrics}
    )
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata (which ingest writes too) and fixed-width
        # text are not in the v3 specification yet; both read back with zarr-python
        warnings.simplefilter("ignore", ZarrUserWarning)
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        out.to_zarr(str(dest), mode="w-")
    return dest


def metrics_of(store: Path) -> xr.Dataset:
    """A store's own ``/metrics``, loaded: the reference the comparisons are checked against."""
    ds = xr.open_dataset(str(store), engine="zarr", group="metrics").load()
    return ds.assign_coords(layer=[str(v) for v in ds["layer"].values])


#: (label_noise, seed, scale of the metrics) of the runs :func:`sweep` writes.
SWEEP = ((0.0, 0, 1.0), (0.0, 1, 0.9), (0.5, 0, 0.5), (0.5, 1, 0.4))


def sweep(source: Path, base: Path) -> list[Path]:
    """Four runs of a label-noise sweep, two seeds each, written under ``base``; the
    noisy runs' metrics are scaled down (their TL lower), as the paper's would be."""
    out = []
    for i, (noise, seed, scale) in enumerate(SWEEP):
        out.append(
            derived_store(
                source,
                base / f"run{i}.zarr",
                scale=scale,
                run_name=f"p{noise}-s{seed}",
                run_attrs={"label_noise": noise, "seed": seed, "optimizer": "sgd"},
            )
        )
    return out


def cached_sweep(tmp_path_factory) -> list[Path]:
    """:func:`sweep` of the cached MLP store, once per test session (tests/runs, plot, report)."""
    from tests.plot.stores import cached_store

    base = tmp_path_factory.getbasetemp() / "gramlin-runs-sweep"
    stores = [base / f"run{i}.zarr" for i in range(len(SWEEP))]
    if not all((s / "zarr.json").exists() for s in stores):
        import shutil

        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        sweep(cached_store(tmp_path_factory, "mlp"), base)
    return stores
