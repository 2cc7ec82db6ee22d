"""``validate``: check a store against ``schemas/`` and its chunks against its manifest."""

from __future__ import annotations

import math
import os

import fsspec
import jsonschema
import numpy as np
import zarr

from gramlin_analyze.schemas import load_schema
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.core import GramlinStore

__all__ = ["validate_store", "describe_group"]


def _json_value(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def describe_group(group: zarr.Group) -> dict:
    """``{"attrs": ..., "variables": {name: {"dims", "dtype"}}}`` for schema checks."""
    variables = {}
    for name, arr in group.arrays():
        dtype = arr.metadata.data_type
        dtype = "str" if "String" in type(dtype).__name__ or "UTF8" in type(dtype).__name__ else str(arr.dtype)
        variables[name] = {"dims": list(arr.metadata.dimension_names or []), "dtype": dtype}
    return {"attrs": dict(group.attrs), "variables": variables}


def _errors(schema: dict, instance, where: str) -> list[str]:
    v = jsonschema.Draft202012Validator(schema)
    return [
        f"{where}: {'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(v.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]


def _chunk_keys(url: str, storage_options: dict | None) -> set[str]:
    fs, root = fsspec.core.url_to_fs(url.removeprefix("file://"), **(storage_options or {}))
    root = root.rstrip("/")
    return {p[len(root) + 1 :] for p in fs.find(root) if not p.endswith("zarr.json")}


def _required_chunks(path: str, arr: zarr.Array, index: int) -> list[str]:
    grid = arr.metadata.chunk_grid.chunk_shape
    counts = [max(1, math.ceil(s / c)) for s, c in zip(arr.shape[1:], grid[1:], strict=True)]
    keys = []
    for rest in np.ndindex(*counts) if counts else [()]:
        keys.append(f"{path}/{arr.metadata.encode_chunk_key((index // grid[0], *rest))}")
    return keys


def validate_store(
    url: str | os.PathLike, *, storage_options: dict | None = None, notes: list[str] | None = None
) -> list[str]:
    """Every problem found, one line each; an empty list means valid.

    ``notes`` (when given) collects observations that are not problems, such
    as consolidated metadata lagging behind a writer that was interrupted:
    readers then see the previous consistent state until the next ingest.
    """
    url = str(url)
    problems: list[str] = []
    notes = notes if notes is not None else []
    try:
        gs = GramlinStore(url, mode="r", storage_options=storage_options)
    except Exception as err:  # noqa: BLE001 - report any failure to open as a problem
        return [str(err)]
    root = gs.root
    problems += _errors(load_schema("store"), dict(root.attrs), "/ attrs")
    if L.STEPS not in root:
        return problems + ["/steps: missing"]
    man = gs.manifest()
    rows = []
    for i in range(len(man["step"])):
        rows.append({k: _json_value(v[i]) for k, v in man.items()})
    desc = describe_group(root[L.STEPS])
    problems += _errors(load_schema("steps"), {"variables": desc["variables"], "rows": rows}, "/steps")
    steps = man["step"]
    if np.any(np.diff(steps) <= 0):
        problems.append("/steps: step is not sorted and unique; re-run ingest to repair")

    arrays = _walk_arrays(root)
    # Consolidated metadata must describe the same arrays as the metadata itself.
    try:
        cons = zarr.open_group(gs._zstore, mode="r", zarr_format=3, use_consolidated=True)
        for path, arr in arrays.items():
            carr = cons[path]
            if carr.shape != arr.shape:
                notes.append(
                    f"{path}: consolidated metadata shows shape {carr.shape}, the array has {arr.shape} "
                    "(a writer was interrupted; readers see the previous state until the next ingest)"
                )
    except KeyError as err:
        notes.append(f"consolidated metadata lags behind the store ({err}); the next ingest refreshes it")
    except (ValueError, FileNotFoundError) as err:
        problems.append(f"consolidated metadata missing or unreadable ({err}); re-run ingest to repair")

    layer_schema = load_schema("layer")
    ok_rows = [i for i, s in enumerate(man["status"]) if s == "ok"]
    keys = _chunk_keys(url, storage_options)
    for name in gs.layer_names():
        grp = gs.layer(name)
        problems += _errors(layer_schema, describe_group(grp), f"/layers/{name}")
        coord = arrays.get(f"{L.LAYERS}/{name}/step")
        if coord is not None and not np.array_equal(coord[:], steps):
            problems.append(f"/layers/{name}: step coordinate differs from /steps/step")
    for path, arr in arrays.items():
        dims = arr.metadata.dimension_names or ()
        if not dims or dims[0] != "step" or path.startswith(L.STEPS + "/") or path.endswith("/step"):
            continue
        missing = [i for i in ok_rows if any(k not in keys for k in _required_chunks(path, arr, i))]
        if path.startswith(L.METRICS + "/"):
            continue
        for i in missing[:5]:
            problems.append(
                f"{path}: step {int(steps[i])} is marked ok but its chunks are missing; "
                "re-run ingest to rewrite it"
            )
        if len(missing) > 5:
            problems.append(f"{path}: {len(missing) - 5} more ok steps with missing chunks")
    return problems


def _walk_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """Every array below ``group`` by path, in path order, from one walk.

    zarr fetches each group's members concurrently (in no set order), which
    on an object store saves a round trip per array.
    """
    members = group.members(max_depth=None)
    return {path: node for path, node in sorted(members) if isinstance(node, zarr.Array)}
