"""Several runs as one DataTree: each store's ``/metrics`` gains a ``run`` dimension.

>>> import gramlin_analyze as ga
>>> runs = ga.open_runs("sweep/*.zarr")                          # doctest: +SKIP
>>> tl = runs["metrics"]["target_linearity"]                     # (run, step, layer)
>>> tl.where(tl.ok).sel(run=tl.label_noise == 0.5)               # doctest: +SKIP
>>> runs["metrics"].groupby("label_noise").mean()                # doctest: +SKIP

A sweep or a set of seeds is several stores, one per training run; comparing them
means aligning their trajectories on a common axis. Steps (or epochs) are joined
outer: a run without a step holds NaN there, and the coordinate ``ok`` (run, step)
says which rows exist and were ingested ``ok``. Each run's hyper-parameters, read
from its root attributes (``hyperparameters``, then ``run_attrs``, which wins), become
coordinates along ``run``, so selections and ``groupby`` work on them.

Only attributes, ``/steps`` and the metadata of ``/metrics`` are read on opening;
metric values stay Dask arrays until computed, and ``/layers`` is never touched.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from gramlin_analyze.errors import MissingDataError, StoreError, UsageError

__all__ = [
    "RUN_ATTR_KEYS",
    "expand_stores",
    "open_runs",
    "run_attributes",
    "run_names",
]

#: Root attributes holding a run's hyper-parameters (dicts), read in this order: a key
#: of a later one wins. ``hyperparameters``: recorded from the checkpoints;
#: ``run_attrs``: given by the user (``ingest --run-attr key=value``).
RUN_ATTR_KEYS = ("hyperparameters", "run_attrs")
#: Coordinates ``open_runs`` sets itself; a run attribute of one of these names is
#: renamed ``attr_<name>``.
RESERVED = frozenset({"run", "step", "epoch", "tokens_seen", "layer", "ok", "store", "run_name"})
_GLOB = set("*?[")
_ALIGN = ("step", "epoch", "tokens")
#: The ``/steps`` column each non-step alignment indexes by.
_AXIS = {"epoch": "epoch", "tokens": "tokens_seen"}


@dataclass(frozen=True, slots=True)
class _Run:
    """One opened store: its URL, root attributes, lazy ``/metrics`` and loaded ``/steps``."""

    url: str
    attrs: dict[str, Any]
    metrics: xr.Dataset
    steps: xr.Dataset | None


def expand_stores(
    paths_or_glob: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    storage_options: dict | None = None,
) -> list[str]:
    """The store URLs that ``paths_or_glob`` names: paths, URLs and glob patterns.

    A pattern (``*``, ``?``, ``[``) expands to the matching paths, sorted; for a URL
    (``s3://bucket/sweep/*.zarr``) through fsspec. A pattern matching nothing is an
    error, since an empty comparison is always a mistake.
    """
    items = [paths_or_glob] if isinstance(paths_or_glob, str | os.PathLike) else list(paths_or_glob)
    out: list[str] = []
    for item in map(os.fspath, items):
        if not _GLOB & set(item):
            out.append(item)
            continue
        found = _expand_url(item, storage_options) if "://" in item else sorted(glob.glob(item))
        if not found:
            raise UsageError(f"{item}: no store matches this pattern")
        out += found
    if not out:
        raise UsageError("no stores given: pass store paths, URLs or a glob such as 'runs/*.zarr'")
    return list(dict.fromkeys(p.rstrip("/") or p for p in out))


def _expand_url(pattern: str, storage_options: dict | None) -> list[str]:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(pattern, **(storage_options or {}))
    protocol = pattern.split("://", 1)[0]
    return [f"{protocol}://{p}" for p in sorted(fs.glob(path))]


def _stem(url: str) -> str:
    name = Path(url.rstrip("/")).name or "run"
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def run_names(attrs: Sequence[dict], urls: Sequence[str]) -> list[str]:
    """Unique names for runs: each store's ``run_name`` (else its file name without
    ``.zarr``); a name several stores share gets ``@<file name>``, then ``-2``, ``-3``."""
    names = [str(a.get("run_name") or _stem(u)) for a, u in zip(attrs, urls, strict=True)]
    shared = {n for n, c in Counter(names).items() if c > 1}
    names = [f"{n}@{_stem(u)}" if n in shared else n for n, u in zip(names, urls, strict=True)]
    seen: Counter[str] = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    while len(set(out)) < len(out):  # "a-2" given as a name of its own: number again
        out = [n if i == out.index(n) else f"{n}-{i + 1}" for i, n in enumerate(out)]
    return out


def run_attributes(attrs: dict) -> dict[str, Any]:
    """A run's hyper-parameters from its root attributes (see :data:`RUN_ATTR_KEYS`)."""
    out: dict[str, Any] = {}
    for key in RUN_ATTR_KEYS:
        value = attrs.get(key)
        if isinstance(value, str):  # a dict written as JSON text by another tool
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if isinstance(value, dict):
            out.update({str(k): v for k, v in value.items()})
    return {(f"attr_{k}" if k in RESERVED else k): v for k, v in out.items()}


def _open_run(url: str, storage_options: dict | None, chunks: dict | None) -> _Run:
    """Root attributes, ``/steps`` (loaded: one small row per step) and ``/metrics`` (lazy)."""
    import zarr

    kwargs = {"storage_options": storage_options} if storage_options else {}
    try:
        attrs = dict(zarr.open_group(url, mode="r", **kwargs).attrs)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise StoreError(
            f"{url}: no store there; give stores written by gramlin-analyze ingest"
        ) from err
    if "gramlin_schema_version" not in attrs:
        raise StoreError(
            f"{url}: not a gramlin-analyze store (no gramlin_schema_version attribute); "
            "give stores written by gramlin-analyze ingest"
        )
    opened = {}
    for group in ("steps", "metrics"):
        try:
            opened[group] = xr.open_dataset(
                url, engine="zarr", group=group, chunks={} if chunks is None else chunks, **kwargs
            )
        except (KeyError, FileNotFoundError):
            opened[group] = None
    if opened["metrics"] is None or "layer" not in opened["metrics"].dims:
        raise MissingDataError(f"{url}: no /metrics yet; run gramlin-analyze analyze {url}")
    metrics = opened["metrics"]
    metrics = metrics.assign_coords(layer=[str(v) for v in metrics["layer"].values])
    steps = opened["steps"].load() if opened["steps"] is not None else None
    return _Run(url, attrs, metrics, steps)


def _ok(run: _Run) -> xr.DataArray:
    """True at the steps of ``run``'s ``/metrics`` whose manifest row is ``ok``."""
    steps = run.metrics["step"].values
    if run.steps is None or "status" not in run.steps:
        return xr.DataArray(np.ones(steps.size, bool), coords={"step": steps}, dims="step")
    status = run.steps["status"].reindex(step=steps, fill_value="")
    return (status == "ok").drop_vars([c for c in status.coords if c != "step"])


def _on_axis(ds: xr.Dataset, run: _Run, ok: xr.DataArray, axis: str) -> xr.Dataset:
    """``ds`` indexed by its run's ``axis`` column of ``/steps`` (epochs, tokens seen)
    instead of steps (``step`` kept as a coordinate).

    Rows that are not ``ok`` and have no value are left out (they hold no trustworthy
    data); an ``ok`` step without a value, or two with one value, is an error.
    """
    steps = ds["step"].values
    value = (
        run.steps[axis].reindex(step=steps).values.astype(float)
        if run.steps is not None and axis in run.steps
        else np.full(steps.size, np.nan)
    )
    good = ok.reindex(step=steps, fill_value=False).values
    keep = np.isfinite(value)
    if (good & ~keep).any() or np.unique(value[keep]).size < keep.sum():
        bad = "repeated" if (good <= keep).all() else "missing"
        source = (
            "trainer_state.json's num_input_tokens_seen"
            if axis == "tokens_seen"
            else ("the checkpoints or trainer_state.json")
        )
        raise UsageError(
            f"{run.url}: cannot align by {axis}: values are {bad} in /steps "
            f"(ingest records them from {source}); align by step"
        )
    ds = ds.isel(step=np.flatnonzero(keep))
    return ds.assign_coords({axis: ("step", value[keep])}).swap_dims(step=axis).sortby(axis)


def _stack(parts: list[xr.Dataset], names: list[str]) -> xr.Dataset:
    """``parts`` (one per run) concatenated along ``run``, indexes joined outer; strings
    missing in a run are ``""``, numbers NaN, flags False."""
    fill: dict[str, Any] = {}
    for ds in parts:
        for name, var in ds.variables.items():
            if name in ds.indexes:
                continue
            kind = var.dtype.kind
            fill.setdefault(name, "" if kind in "OUST" else False if kind == "b" else np.nan)
    out = xr.concat(
        [ds.expand_dims(run=[n]) for ds, n in zip(parts, names, strict=True)],
        dim="run",
        join="outer",
        fill_value=fill,
        coords="different",
        compat="equals",
        combine_attrs="drop_conflicts",
    )
    for name, value in fill.items():  # concat fills with an object array: back to text
        if value == "" and name in out.variables and out[name].dtype.kind == "O":
            out[name] = out[name].fillna("").astype(str)
    return out


def _attribute_coords(runs: list[_Run]) -> dict[str, np.ndarray]:
    """One array along ``run`` per run attribute any run has: numbers (NaN where a run
    lacks it), flags, or text (``""`` where missing; lists and dicts as JSON)."""
    found = [run_attributes(r.attrs) for r in runs]
    keys = list(dict.fromkeys(k for f in found for k in f))
    out = {}
    for key in keys:
        values = [f.get(key) for f in found]
        present = [v for v in values if v is not None]
        if all(isinstance(v, bool) for v in present) and len(present) == len(values):
            out[key] = np.array(values, bool)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            ints = all(isinstance(v, int) for v in present) and len(present) == len(values)
            out[key] = np.array(
                [np.nan if v is None else v for v in values], np.int64 if ints else float
            )
        else:
            text = [
                "" if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                for v in values
            ]
            out[key] = np.array(text, dtype=str)
    return out


def _layer_order(ds: xr.Dataset) -> xr.Dataset:
    from gramlin_analyze.plot._order import depth_order

    return ds.sel(layer=depth_order(str(v) for v in ds["layer"].values))


def open_runs(
    paths_or_glob: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    align: str = "step",
    storage_options: dict | None = None,
    chunks: dict | None = None,
) -> xr.DataTree:
    """Open several stores as one lazy :class:`xarray.DataTree` along a ``run`` dimension.

    Parameters
    ----------
    paths_or_glob
        Store paths or fsspec URLs, or glob patterns (``"sweep/*.zarr"``), or a list of them.
    align
        ``"step"`` (default), ``"epoch"`` or ``"tokens"`` (``/steps.tokens_seen``, from
        HF ``num_input_tokens_seen``): the axis the runs' trajectories share; by epoch or
        tokens, every ok step of each run needs a value in its ``/steps``, and ``step``
        becomes a coordinate saying which step each run had there.
    storage_options
        fsspec options for remote stores (the same for every store).
    chunks
        Dask chunks of ``/metrics`` (default: the stores' own).

    Returns
    -------
    xarray.DataTree
        ``/metrics``: each store's ``(step, layer)`` variables as ``(run, step, layer)``,
        steps and layers joined outer (NaN where a run has none), layers in depth order;
        coordinates ``run`` (unique run names), ``store`` (its URL), ``ok`` (run, step):
        the row exists and its step was ingested ``ok``; one coordinate per run attribute.
        ``/steps``: the manifests on the same axes. Root attributes: ``align`` and
        ``run_attributes`` (the names of the attribute coordinates).

    Examples
    --------
    >>> runs = open_runs(["a.zarr", "b.zarr"])                  # doctest: +SKIP
    >>> runs["metrics"]["target_linearity"].sel(layer="fc4")    # doctest: +SKIP
    """
    if align not in _ALIGN:
        raise UsageError(f"align must be one of {', '.join(_ALIGN)}, not {align!r}")
    urls = expand_stores(paths_or_glob, storage_options=storage_options)
    runs = [_open_run(u, storage_options, chunks) for u in urls]
    names = run_names([r.attrs for r in runs], urls)
    metrics, manifests = [], []
    for run in runs:
        ok = _ok(run)
        m = run.metrics.assign(ok=ok)  # a variable while stacked: it gains ``run`` even if equal
        s = run.steps if run.steps is not None else xr.Dataset()
        if align in _AXIS:
            m = _on_axis(m, run, ok, _AXIS[align])
            s = _on_axis(s, run, ok, _AXIS[align]) if s.data_vars else s
        metrics.append(m)
        manifests.append(s)
    attributes = _attribute_coords(runs)
    coords = {
        "run": np.array(names, dtype=str),
        "store": ("run", np.array(urls, dtype=str)),
    } | {k: ("run", v) for k, v in attributes.items()}
    ds = _layer_order(_stack(metrics, names)).assign_coords(coords)
    ds = ds.assign(ok=ds["ok"].fillna(False).astype(bool)).set_coords("ok")
    root = xr.Dataset(attrs={"align": align, "run_attributes": list(attributes)})
    tree = {"/": root, "/metrics": ds}
    if any(m.data_vars for m in manifests):
        tree["/steps"] = _stack(manifests, names).assign_coords(coords)
    return xr.DataTree.from_dict(tree)
