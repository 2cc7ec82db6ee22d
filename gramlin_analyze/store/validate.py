"""``validate``: check a store against ``schemas/`` and its chunks against its manifest."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import cast

import fsspec
import jsonschema
import numpy as np
import zarr

from gramlin_analyze.schemas import load_schema
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import v3_metadata
from gramlin_analyze.store.consolidated import CONSOLIDATED_ATTR
from gramlin_analyze.store.core import GramlinStore
from gramlin_analyze.store.faults import StoreUnavailableError

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
        dtype: object = v3_metadata(arr).data_type
        dtype = (
            "str"
            if "String" in type(dtype).__name__ or "UTF8" in type(dtype).__name__
            else str(arr.dtype)
        )
        variables[name] = {"dims": list(v3_metadata(arr).dimension_names or []), "dtype": dtype}
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
    grid = arr.chunks
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
    with warnings.catch_warnings():
        # directories and temporary files of writes a killed writer cut short: not nodes, never read
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
        return _validate(str(url), storage_options, notes if notes is not None else [])


def _validate(url: str, storage_options: dict | None, notes: list[str]) -> list[str]:
    try:
        gs = GramlinStore(url, mode="r", storage_options=storage_options)
    except StoreUnavailableError:  # not a verdict on the store: the command fails (exit 2)
        raise
    except Exception as err:  # noqa: BLE001 - report any failure to open as a problem
        return [str(err)]
    root = gs.root
    problems = _errors(load_schema("store"), dict(root.attrs), "/ attrs")
    if L.STEPS not in root:
        if not _members(root):
            notes.append(
                "an empty store: the ingest that made it stopped before recording a step; run it again"
            )
            return problems
        return problems + ["/steps: missing"]
    view, consolidated_problems = _reader_view(gs, notes)
    problems += consolidated_problems
    if view is None:
        return problems
    problems += _manifest_problems(root, view)
    keys = _chunk_keys(url, storage_options)
    stray = [k for k in keys if k.endswith(".partial")]
    if stray:
        notes.append(
            f"{len(stray)} temporary files of writes cut short (*.partial); never read, safe to delete"
        )
    problems += _structure_problems(view, notes)
    return problems + _missing_chunk_problems(view, keys)


_CREATOR_INTERRUPTED = (
    "the writer that created this store was interrupted before its first step landed; "
    "run the ingest again"
)


@dataclass(frozen=True, slots=True)
class _ReaderView:
    """The store as readers see it: the consolidated copy while a writer's change is
    unfinished (``interrupted``), else the live metadata."""

    tree: zarr.Group
    arrays: dict[str, zarr.Array]
    manifest: dict[str, np.ndarray]
    interrupted: bool


def _reader_view(gs: GramlinStore, notes: list[str]) -> tuple[_ReaderView | None, list[str]]:
    """What readers see, and the problems of the consolidated metadata; no view when
    a writer was interrupted before the first step landed (nothing to check yet)."""
    root = gs.root
    interrupted = root.attrs.get(CONSOLIDATED_ATTR) is False
    try:
        man = gs.manifest()
    except KeyError as err:  # a /steps array not made yet
        if not interrupted:
            return None, [f"/steps: {err.args[0]} missing; re-run ingest to repair"]
        notes.append(_CREATOR_INTERRUPTED)
        return None, []
    arrays = _walk_arrays(root)
    problems: list[str] = []
    # Consolidated metadata must describe the same arrays as the metadata itself.
    try:
        cons = zarr.open_group(gs.zstore, mode="r", zarr_format=3, use_consolidated=True)
        seen = _walk_arrays(cons)
    except (ValueError, FileNotFoundError) as err:
        if interrupted:
            notes.append(_CREATOR_INTERRUPTED)
            return None, problems
        problems.append(
            f"consolidated metadata missing or unreadable ({err}); re-run ingest to repair"
        )
        cons, seen = root, arrays
    lagging = sorted(
        p
        for p in set(arrays) | set(seen)
        if p not in seen or p not in arrays or seen[p].shape != arrays[p].shape
    )
    if lagging and interrupted:
        # What readers open is the consolidated copy: check that, and say what the next writer finishes.
        notes.append(
            f"a writer was interrupted while changing {len(lagging)} arrays (such as {lagging[0]}); readers see "
            "the previous state, and the next ingest or analyze finishes the change"
        )
        arrays = seen
        man = _reader_manifest(seen, man)
    elif lagging:
        notes.append(
            f"consolidated metadata lags behind the store at {lagging[0]}; the next ingest refreshes it"
        )
    return _ReaderView(cons if interrupted else root, arrays, man, interrupted), problems


def _manifest_problems(root: zarr.Group, view: _ReaderView) -> list[str]:
    """``/steps`` against its schema, with steps sorted and unique."""
    man = view.manifest
    rows = [{k: _json_value(v[i]) for k, v in man.items()} for i in range(len(man["step"]))]
    if view.interrupted:  # rows a killed writer added but never wrote: unset, so never ok
        rows = [r for r in rows if r["status"] != ""]
    desc = describe_group(cast(zarr.Group, root[L.STEPS]))
    problems = _errors(
        load_schema("steps"), {"variables": desc["variables"], "rows": rows}, "/steps"
    )
    if np.any(np.diff(man["step"]) <= 0):
        problems.append("/steps: step is not sorted and unique; re-run ingest to repair")
    return problems


def _structure_problems(view: _ReaderView, notes: list[str]) -> list[str]:
    """Each layer's group against its schema, and the coordinates against the manifest
    (only noted while a writer's change is unfinished: it rewrote some, not all yet)."""
    tree = view.tree
    layers = (
        {k: g for k, g in _members(cast(zarr.Group, tree[L.LAYERS]))} if L.LAYERS in tree else {}
    )
    layer_schema = load_schema("layer")
    problems: list[str] = []
    for name, grp in sorted(layers.items()):
        problems += _errors(layer_schema, describe_group(grp), f"/layers/{name}")
    coordinate_problems = _coordinate_problems(view.arrays, view.manifest["step"], sorted(layers))
    if view.interrupted:
        notes += [
            f"{p} (a writer was interrupted; the next ingest or analyze rewrites it)"
            for p in coordinate_problems
        ]
    else:
        problems += coordinate_problems
    return problems


def _missing_chunk_problems(view: _ReaderView, keys: set[str]) -> list[str]:
    """Steps marked ok whose chunks are not in the store (``/metrics`` is exempt: analyze
    writes its results after ingest marks a step ok)."""
    steps = view.manifest["step"]
    ok_rows = [i for i, s in enumerate(view.manifest["status"]) if s == "ok"]
    problems = []
    for path, arr in view.arrays.items():
        dims = v3_metadata(arr).dimension_names or ()
        if (
            not dims
            or dims[0] != "step"
            or path.startswith(L.STEPS + "/")
            or path.endswith("/step")
            or path.startswith(L.METRICS + "/")
        ):
            continue
        missing = [i for i in ok_rows if any(k not in keys for k in _required_chunks(path, arr, i))]
        for i in missing[:5]:
            problems.append(
                f"{path}: step {int(steps[i])} is marked ok but its chunks are missing; "
                "re-run ingest to rewrite it"
            )
        if len(missing) > 5:
            problems.append(f"{path}: {len(missing) - 5} more ok steps with missing chunks")
    return problems


def _reader_manifest(
    seen: dict[str, zarr.Array], man: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The manifest as readers see it: each column at its consolidated length."""
    out = {}
    for name, col in man.items():
        arr = seen.get(f"{L.STEPS}/{name}")
        out[name] = col if arr is None else np.asarray(arr[:], dtype=col.dtype)
    n = min(len(c) for c in out.values())
    return {k: v[:n] for k, v in out.items()}


def _coordinate_problems(
    arrays: dict[str, zarr.Array], steps: np.ndarray, layers: list[str]
) -> list[str]:
    """Every group's ``step`` coordinate holds the manifest's steps, and ``/metrics``'s
    ``layer`` coordinate names stored layers, each once."""
    problems = []
    for path, arr in arrays.items():
        if path.rsplit("/", 1)[-1] != "step" or path == f"{L.STEPS}/step":
            continue
        if arr.shape != steps.shape or not np.array_equal(arr[:], steps):
            problems.append(
                f"/{path.rsplit('/', 1)[0]}: step coordinate differs from /steps/step; re-run ingest to repair"
            )
    lay = arrays.get(f"{L.METRICS}/layer")
    if lay is not None:
        names = [str(v) for v in cast(np.ndarray, lay[:])]
        if len(set(names)) != len(names) or not set(names) <= set(layers):
            problems.append(
                f"/{L.METRICS}: layer coordinate {names} does not name stored layers; re-run analyze"
            )
    return problems


def _walk_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """Every array below ``group`` by path, in path order, from one walk.

    zarr fetches each group's members concurrently (in no set order), which
    on an object store saves a round trip per array. Temporary files of a
    write cut short are noted by the caller, not warned about here.
    """
    return {
        path: node
        for path, node in sorted(_members(group, max_depth=None))
        if isinstance(node, zarr.Array)
    }


def _members(group: zarr.Group, **kw) -> list:
    """``group.members(**kw)``, quiet about the temporary files of writes cut short."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
        return list(group.members(**kw))
