"""What the plots and the report read from a store: ``/metrics``, ``/steps`` and attributes.

Scalars ``(step, layer)`` are loaded once (small: 1,000 steps x 50 layers of
30 metrics is 12 MB); a layer's matrices (``/metrics/<layer>``) are opened
only when a figure draws them. ``/layers`` is never read: its arrays are the
store's bulk, and nothing a figure shows needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import xarray as xr

from gramlin_analyze.errors import MissingDataError, StoreError
from gramlin_analyze.plot._order import depth_order, select_layers

__all__ = ["Source", "load", "require", "spread"]

_GLOB = set("*?[")


@dataclass(frozen=True, slots=True)
class Source:
    """A store's metrics, ready to plot.

    ``metrics`` holds the scalar ``(step, layer)`` metrics, loaded, layers in depth
    order, rows of steps that are not ``ok`` set to NaN (they hold no trustworthy
    data). ``location`` is where a layer's matrices come from: a store URL, a
    DataTree, or None when only a Dataset was given.
    """

    metrics: xr.Dataset
    steps: xr.Dataset | None
    attrs: dict[str, Any]
    location: str | xr.DataTree | None = None
    storage_options: dict | None = None
    _matrices: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[str]:
        return [str(v) for v in self.metrics["layer"].values] if "layer" in self.metrics else []

    @property
    def step_values(self) -> np.ndarray:
        return self.metrics["step"].values if "step" in self.metrics else np.array([], np.int64)

    def ok_steps(self) -> np.ndarray:
        """Steps whose manifest row is ``ok`` (every step when there is no manifest)."""
        steps = self.step_values
        if self.steps is None or "status" not in self.steps:
            return steps
        status = self.steps["status"].reindex(step=steps, fill_value="").values
        return steps[np.asarray(status == "ok")]

    def has(self, var: str) -> bool:
        """Whether any layer has a finite value of ``var``."""
        return var in self.metrics and bool(np.isfinite(self.metrics[var].values).any())

    def layers_with(self, *names: str) -> list[str]:
        """The layers with at least one finite value of any of ``names``, in depth order."""
        present = [v for v in names if v in self.metrics]
        if not present:
            return []
        finite = np.zeros(len(self.layers), bool)
        for var in present:
            finite |= np.isfinite(self.metrics[var].transpose("layer", "step").values).any(axis=1)
        return [name for name, ok in zip(self.layers, finite, strict=True) if ok]

    def matrices(self, layer: str) -> xr.Dataset | None:
        """``/metrics/<layer>`` (lazy), its ``step`` coordinate that of ``/metrics``."""
        if layer not in self._matrices:
            self._matrices[layer] = self._open_matrices(layer)
        return self._matrices[layer]

    def _open_matrices(self, layer: str) -> xr.Dataset | None:
        tree = self.location
        if isinstance(tree, str):  # every layer's group in one open, at the first need
            if "/" not in self._matrices:
                self._matrices["/"] = _open_tree(tree, self.storage_options)
            tree = self._matrices["/"]
        elif isinstance(tree, xr.DataTree):
            tree = tree["metrics"] if "metrics" in tree else None
        if tree is None or layer not in tree.children:
            return None
        ds = tree[layer].to_dataset(inherit=False)
        if "step" not in ds.dims or ds.sizes["step"] != self.step_values.size:
            return None
        return ds.assign_coords(step=self.step_values)


def _open_tree(url: str, storage_options: dict | None) -> xr.DataTree | None:
    kwargs = {"storage_options": storage_options} if storage_options else {}
    try:
        return xr.open_datatree(url, engine="zarr", group="metrics", chunks=None, **kwargs)
    except (KeyError, FileNotFoundError):
        return None


def _open_group(url: str, group: str | None, storage_options: dict | None) -> xr.Dataset | None:
    kwargs = {"storage_options": storage_options} if storage_options else {}
    try:
        return xr.open_dataset(url, engine="zarr", group=group, chunks=None, **kwargs)
    except (KeyError, FileNotFoundError):
        if group is None:
            raise
        return None


def _scalars(ds: xr.Dataset) -> xr.Dataset:
    keep = [
        name
        for name, da in ds.data_vars.items()
        if set(da.dims) == {"step", "layer"} and np.issubdtype(da.dtype, np.floating)
    ]
    out = ds[keep]
    if "layer" in out.coords:
        out = out.assign_coords(layer=[str(v) for v in out["layer"].values])
    return out.transpose("step", "layer")


def _order(metrics: xr.Dataset, layers: list[str] | None) -> xr.Dataset:
    """Layers in depth order; ``layers`` selects (names keep their order, globs depth's)."""
    if "layer" not in metrics.dims:
        return metrics
    ordered = depth_order(str(v) for v in metrics["layer"].values)
    if layers and not any(_GLOB & set(p) for p in layers) and set(layers) <= set(ordered):
        chosen = list(layers)
    else:
        chosen = select_layers(ordered, layers)
    return metrics.sel(layer=chosen)


def _mask_not_ok(metrics: xr.Dataset, steps: xr.Dataset | None) -> xr.Dataset:
    if steps is None or "status" not in steps or "step" not in metrics.dims:
        return metrics
    status = steps["status"].reindex(step=metrics["step"].values, fill_value="")
    return metrics.where(status == "ok")


def _from_path(url: str, storage_options: dict | None) -> Source:
    try:
        root = _open_group(url, None, storage_options)
    except (FileNotFoundError, ValueError) as err:
        local = "://" not in url and os.path.exists(url)
        what = "not a gramlin-analyze store (no Zarr group there)" if local else "no store there"
        raise StoreError(
            f"{url}: {what}; give the path of a store written by gramlin-analyze ingest"
        ) from err
    attrs = dict(root.attrs) if root is not None else {}
    if "gramlin_schema_version" not in attrs:
        raise StoreError(
            f"{url}: not a gramlin-analyze store (no gramlin_schema_version attribute); "
            "give the path of a store written by gramlin-analyze ingest"
        )
    steps = _open_group(url, "steps", storage_options)
    metrics = _open_group(url, "metrics", storage_options)
    return Source(
        metrics=_scalars(metrics) if metrics is not None else xr.Dataset(),
        steps=steps.load() if steps is not None else None,
        attrs=attrs,
        location=url,
        storage_options=storage_options,
    )


def _from_tree(tree: xr.DataTree) -> Source:
    metrics = tree["metrics"].to_dataset(inherit=False) if "metrics" in tree else xr.Dataset()
    steps = tree["steps"].to_dataset(inherit=False).load() if "steps" in tree else None
    return Source(_scalars(metrics), steps, dict(tree.attrs), location=tree)


def load(
    source: Source | xr.DataTree | xr.Dataset | str | os.PathLike,
    *,
    layers: list[str] | None = None,
    storage_options: dict | None = None,
    ok_only: bool = True,
) -> Source:
    """A :class:`Source` from a store path or URL, its DataTree, its ``/metrics`` Dataset,
    or another Source (then only ``layers`` applies). ``ok_only=False`` keeps the values
    stored for steps that are not ``ok`` (exports show every row as stored)."""
    if isinstance(source, Source):
        return replace(source, metrics=_order(source.metrics, layers)) if layers else source
    if isinstance(source, xr.DataTree):
        src = _from_tree(source)
    elif isinstance(source, xr.Dataset):
        src = Source(_scalars(source), None, {})
    else:
        src = _from_path(os.fspath(source), storage_options)
    metrics = _mask_not_ok(src.metrics, src.steps) if ok_only else src.metrics
    return replace(src, metrics=_order(metrics, layers).load())


def spread(layers: list[str], most: int) -> list[str]:
    """At most ``most`` layers, evenly spaced by depth, first and last kept."""
    if len(layers) <= most:
        return layers
    idx = np.unique(np.round(np.linspace(0, len(layers) - 1, most)).astype(int))
    return [layers[i] for i in idx]


def require(src: Source, var: str, what: str) -> list[str]:
    """The layers with data for ``var``, or a MissingDataError saying how to get it."""
    have = src.layers_with(var)
    if not have:
        from gramlin_analyze.analysis.metrics import FAMILIES

        family = next((f.name for f in FAMILIES.values() if var in _outputs(f)), "?")
        raise MissingDataError(
            f"{what} needs {var!r}, which no layer of this store has; "
            f"run gramlin-analyze analyze STORE --metrics {family} (it may need activations: ingest --probe ... --model ...)"
        )
    return have


def _outputs(family) -> tuple[str, ...]:
    return family.scalars + family.matrices + family.phase2_scalars + family.phase2_matrices
