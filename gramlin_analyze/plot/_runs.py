"""What the comparison figures read: several runs' scalar metrics along ``run``.

The runs come from :func:`gramlin_analyze.open_runs` (or its ``/metrics`` Dataset);
their scalars are loaded once (small), rows that are not ``ok`` set to NaN as for
one run, layers in depth order. Seeds are pooled when the runs differ in nothing
but ``seed``: a mean line and its spread say more than a tangle of lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import xarray as xr

from gramlin_analyze.errors import MissingDataError, UsageError
from gramlin_analyze.plot._order import depth_order, select_layers

__all__ = ["Runs", "final_values", "load_runs", "seed_groups"]

#: The run attribute that names a repeat of the same configuration.
SEED = "seed"


@dataclass(frozen=True, slots=True)
class Runs:
    """Several runs' scalar metrics ``(run, axis, layer)``, loaded, not-ok rows NaN.

    ``axis`` is ``step``, ``epoch`` or ``tokens_seen`` (how the runs were aligned); ``attributes`` the
    names of the run-attribute coordinates.
    """

    metrics: xr.Dataset
    axis: str
    attributes: tuple[str, ...]

    @property
    def runs(self) -> list[str]:
        return [str(r) for r in self.metrics["run"].values]

    @property
    def layers(self) -> list[str]:
        return [str(v) for v in self.metrics["layer"].values]

    def layers_with(self, var: str) -> list[str]:
        """Layers where any run has a finite value of ``var``, in depth order."""
        if var not in self.metrics:
            return []
        finite = np.isfinite(self.metrics[var].transpose("layer", ...).values)
        return [
            n
            for n, ok in zip(self.layers, finite.reshape(len(self.layers), -1).any(1), strict=True)
            if ok
        ]

    def attribute(self, name: str) -> np.ndarray:
        """The values of run attribute ``name``, one per run."""
        if name not in self.attributes:
            shown = ", ".join(self.attributes) or "none (ingest --run-attr key=value records them)"
            raise UsageError(f"no run attribute {name!r}; the runs have: {shown}")
        return self.metrics[name].values


def _attributes(ds: xr.Dataset) -> tuple[str, ...]:
    return tuple(
        str(n) for n, c in ds.coords.items() if c.dims == ("run",) and n not in ("run", "store")
    )


def load_runs(
    source, *, layers=None, storage_options: dict | None = None, align: str = "step"
) -> Runs:
    """:class:`Runs` from store paths, URLs or a glob, :func:`~gramlin_analyze.open_runs`'s
    DataTree or its ``/metrics`` Dataset, or another :class:`Runs` (``layers`` selects)."""
    if isinstance(source, Runs):
        ds = source.metrics
    elif isinstance(source, xr.DataTree):
        ds = source["metrics"].to_dataset()
    elif isinstance(source, xr.Dataset):
        ds = source
    else:
        from gramlin_analyze.runs import open_runs

        paths = [os.fspath(p) for p in source] if isinstance(source, list | tuple) else source
        ds = open_runs(paths, storage_options=storage_options, align=align)["metrics"].to_dataset()
    if "run" not in ds.dims:
        raise UsageError("comparison figures need several runs: give stores or ga.open_runs(...)")
    axis = next((a for a in ("epoch", "tokens_seen") if a in ds.dims), "step")
    keep = [
        n
        for n, v in ds.data_vars.items()
        if set(v.dims) == {"run", axis, "layer"} and np.issubdtype(v.dtype, np.floating)
    ]
    ds = ds[keep].transpose("run", axis, "layer")
    if "ok" in ds.coords:
        ds = ds.where(ds["ok"])
    ordered = depth_order(str(v) for v in ds["layer"].values)
    return Runs(ds.sel(layer=select_layers(ordered, layers)).load(), axis, _attributes(ds))


def require_runs(runs: Runs, var: str, what: str) -> list[str]:
    """The layers with data for ``var`` in some run, or an error saying what to run."""
    have = runs.layers_with(var)
    if not have:
        raise MissingDataError(
            f"{what} needs {var!r}, which no run has; run gramlin-analyze analyze on each store"
        )
    return have


def final_values(runs: Runs, var: str) -> tuple[xr.DataArray, np.ndarray]:
    """``var`` (run, layer) at each run's last row where some layer has a value, and
    that row's coordinate per run (NaN for a run without any)."""
    da = runs.metrics[var]
    has = np.isfinite(da.values).any(axis=2)  # (run, axis)
    last = np.where(has.any(1), has.shape[1] - 1 - np.argmax(has[:, ::-1], axis=1), -1)
    values = np.full((da.sizes["run"], da.sizes["layer"]), np.nan)
    at = np.full(da.sizes["run"], np.nan)
    coord = da[runs.axis].values
    for i, j in enumerate(last):
        if j >= 0:
            values[i] = da.values[i, j]
            at[i] = coord[j]
    out = xr.DataArray(
        values, coords={"run": da["run"], "layer": da["layer"]}, dims=("run", "layer")
    )
    return out, at


def seed_groups(runs: Runs) -> dict[str, list[str]] | None:
    """Runs that differ only in ``seed``, grouped (label: ``attr=value, ...`` of what
    differs between groups, or ``all seeds``); None when there is no ``seed`` attribute
    or no group has two runs (then each run is drawn on its own)."""
    if SEED not in runs.attributes:
        return None
    others = [a for a in runs.attributes if a != SEED]
    keys = [tuple(str(runs.metrics[a].values[i]) for a in others) for i in range(len(runs.runs))]
    varying = [j for j in range(len(others)) if len({k[j] for k in keys}) > 1]
    groups: dict[str, list[str]] = {}
    for run, key in zip(runs.runs, keys, strict=True):
        label = ", ".join(f"{others[j]}={key[j]}" for j in varying) or "all seeds"
        groups.setdefault(label, []).append(run)
    if all(len(g) == 1 for g in groups.values()):
        return None
    return groups
