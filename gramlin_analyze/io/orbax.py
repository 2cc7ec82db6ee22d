"""Orbax step directories (``orbax.checkpoint``), the usual JAX/Flax checkpoint.

Two layouts are read:

* ``StandardCheckpointer().save(root / "<step>", tree)``: the step directory
  itself holds the pytree (``_METADATA``, ``_CHECKPOINT_METADATA``,
  ``manifest.ocdbt`` and the ``ocdbt.process_*/`` data).
* ``CheckpointManager(root).save(step, ...)``: ``<root>/<step>/`` holds one
  directory per item, ``default/`` for a single unnamed item. With several
  pytree items every name is prefixed with its item's name.

Shapes and dtypes come from orbax's metadata without restoring any array;
tensors are restored as NumPy arrays on request. Names and orientation
follow the Flax reader (``params.Dense_0.kernel`` is ``Dense_0.weight``,
transposed to ``(out, in)``), see :mod:`gramlin_analyze.io.flax`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, cast

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, MissingDependencyError
from gramlin_analyze.io.base import (
    CheckpointHandle,
    CheckpointMeta,
    CheckpointReader,
    TensorInfo,
    missing_tensor_error,
)
from gramlin_analyze.io.flax import TreeLeaf, convert_leaf, tree_leaves
from gramlin_analyze.io.limits import check_inflate

__all__ = ["OrbaxReader"]

_HINT = "pip install 'gramlin-analyze[jax]'"
#: Files orbax writes into a pytree (or step) directory.
_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
#: Files that describe a checkpoint rather than hold array bytes.
_NOT_DATA = frozenset(
    {"_CHECKPOINT_METADATA", "_METADATA", "_ROOT_METADATA", "_sharding", "commit_success.txt"}
)
_MAX_LISTED = 8


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise MissingDependencyError(
            f"reading orbax checkpoints needs orbax-checkpoint, which is not installed; {_HINT}"
        ) from err
    return ocp


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _data_files(item_dir: Path) -> list[str]:
    files = []
    for f in sorted(item_dir.rglob("*")):
        if not f.is_file() or f.name in _NOT_DATA or f.parent.name == "array_metadatas":
            continue
        if f.name == "manifest.ocdbt" and f.parent == item_dir:
            continue
        files.append(str(f.relative_to(item_dir)))
    return files


def _format_error(item_dir: Path, what: str, err: BaseException) -> CheckpointFormatError:
    """An error that names the checkpoint's data files, since orbax names only the directory."""
    files = _data_files(item_dir)
    listed = ", ".join(files[:_MAX_LISTED])
    if len(files) > _MAX_LISTED:
        listed += f" and {len(files) - _MAX_LISTED} more"
    return CheckpointFormatError(
        f"{item_dir}: {what} failed ({type(err).__name__}: {err}); one of its files "
        f"({listed or 'none found'}) is truncated or corrupt: copy the step directory again "
        "or restore it from a backup"
    )


def _tree_metadata(ocp: Any, item_dir: Path) -> Any:
    """The pytree of array metadata of one item, read without restoring arrays."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(item_dir)
    except Exception as err:
        # orbax and tensorstore raise ValueError, KeyError, JSON and status
        # errors for damaged metadata; all mean the same to the user.
        raise _format_error(item_dir, "reading orbax metadata", err) from err
    finally:
        handler.close()
    return getattr(metadata, "tree", metadata)


def _json(path: Path) -> dict:
    """A JSON sidecar as a dict; empty when missing or unreadable, since sidecars
    are optional (older orbax writes none) and not needed to read tensors."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_tmp(p: Path) -> bool:
    return ".orbax-checkpoint-tmp" in p.name


class OrbaxReader(CheckpointReader):
    """Orbax step directories written by ``StandardCheckpointer`` or ``CheckpointManager``.

    Pass the step directory (``<root>/<step>``) or, for a manager, one of its
    item directories (``<root>/<step>/default``). Use :meth:`open` to read
    many tensors: the handle restores the pytree once.

    Notes
    -----
    The step comes from the directory name; metrics and custom metadata saved
    by a ``CheckpointManager`` appear in :attr:`CheckpointMeta.extra`.
    """

    name = "orbax"
    is_directory_format = True
    requires = ("orbax.checkpoint",)
    extra = "jax"

    def guess_can_read(self, path: str | os.PathLike) -> bool:
        p = Path(path)
        if not p.is_dir() or _is_tmp(p):
            return False
        if any((p / m).is_file() for m in _MARKERS):
            return True
        return bool(self._item_dirs(p))

    def list_tensors(self, path: str | os.PathLike) -> dict[str, TensorInfo]:
        return {name: leaf.info for name, leaf in self._leaves(path).items()}

    def read_tensor(self, path: str | os.PathLike, name: str) -> np.ndarray:
        leaves = self._leaves(path)
        leaf = _lookup(leaves, Path(path), name)
        return convert_leaf(self._restore(path, [leaf])[leaf.path], leaf.convert)

    def read_metadata(self, path: str | os.PathLike) -> CheckpointMeta:
        p = Path(path)
        step_dir = p
        if not p.name.isdigit() and p.parent.name.isdigit() and (p / "_METADATA").is_file():
            step_dir = p.parent
        meta = CheckpointMeta(step=int(step_dir.name) if step_dir.name.isdigit() else None)
        info = _json(step_dir / "_CHECKPOINT_METADATA")
        for key in ("metrics", "custom_metadata"):
            if info.get(key):
                meta.extra[key] = info[key]
        # A CheckpointManager with best_fn keeps the metrics as a JSON item.
        metrics = _json(step_dir / "metrics" / "metrics")
        if metrics:
            meta.extra["metrics"] = metrics
        return meta

    def open(self, path: str | os.PathLike) -> CheckpointHandle:
        return _OrbaxHandle(self, path)

    def _item_dirs(self, p: Path) -> list[tuple[str, Path]]:
        """``(name prefix, directory)`` of each pytree item of a step directory."""
        if (p / "_METADATA").is_file() or (p / "manifest.ocdbt").is_file():
            return [("", p)]
        items = {
            c.name: c
            for c in sorted(p.iterdir())
            if c.is_dir()
            and not c.name.isdigit()
            and not _is_tmp(c)
            and (c / "_METADATA").is_file()
        }
        if "default" in items:
            return [("", items["default"])]
        if len(items) == 1:
            return [("", next(iter(items.values())))]
        return [(name, d) for name, d in items.items()]

    def _resolve(self, path: str | os.PathLike) -> list[tuple[str, Path]]:
        # orbax refuses relative paths.
        p = Path(path).resolve()
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such orbax checkpoint directory")
        items = self._item_dirs(p)
        if not items:
            raise CheckpointFormatError(
                f"{p}: no orbax pytree found (no _METADATA here or in an item directory); "
                "pass a step directory such as <root>/<step>"
            )
        return items

    def _leaves(self, path: str | os.PathLike) -> dict[str, TreeLeaf]:
        import jax

        ocp = _ocp()
        items = []
        for prefix, item_dir in self._resolve(path):
            tree = _tree_metadata(ocp, item_dir)
            flat, _ = jax.tree_util.tree_flatten_with_path(tree)
            for key_path, value in flat:
                if getattr(value, "shape", None) is None or getattr(value, "dtype", None) is None:
                    continue
                keys = tuple(_key_name(k) for k in key_path)
                keys = (prefix, *keys) if prefix else keys
                items.append((keys, tuple(value.shape), np.dtype(value.dtype).name))
        leaves = tree_leaves(items, source=Path(path))
        return {leaf.info.name: leaf for leaf in leaves}

    def _restore(
        self, path: str | os.PathLike, wanted: list[TreeLeaf]
    ) -> dict[tuple[str, ...], np.ndarray]:
        """Restore the ``wanted`` leaves (orbax skips the other leaves) as NumPy arrays."""
        import jax

        ocp = _ocp()
        stored = sum(f.stat().st_size for f in self.files(path))
        for leaf in wanted:  # compressed chunks may declare any shape: check before restoring
            declared = math.prod(leaf.info.shape) * np.dtype(leaf.info.dtype).itemsize
            check_inflate(path, declared, stored, f"array {leaf.info.name!r}")
        wanted_paths = {leaf.path for leaf in wanted}
        out: dict[tuple[str, ...], np.ndarray] = {}
        for prefix, item_dir in self._resolve(path):
            keep = {p[1:] if prefix else p for p in wanted_paths if not prefix or p[0] == prefix}
            if not keep:
                continue
            tree = _tree_metadata(ocp, item_dir)

            def select(key_path: Any, value: Any, keep: set = keep) -> Any:
                keys = tuple(_key_name(k) for k in key_path)
                return value if keys in keep else ocp.PLACEHOLDER

            item = jax.tree_util.tree_map_with_path(select, tree)
            restore_args = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
            )
            handler = ocp.PyTreeCheckpointHandler()
            try:
                restored = handler.restore(
                    item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
                )
            except Exception as err:
                # tensorstore reports truncated or garbled data as ValueError
                # with a status code; the data file is not named, so we list them.
                raise _format_error(item_dir, "restoring arrays", err) from err
            finally:
                handler.close()
            shapes = {
                tuple(_key_name(k) for k in key_path): tuple(getattr(value, "shape", ()))
                for key_path, value in jax.tree_util.tree_flatten_with_path(tree)[0]
            }
            flat, _ = jax.tree_util.tree_flatten_with_path(restored)
            for key_path, value in flat:
                keys = tuple(_key_name(k) for k in key_path)
                if keys in keep:
                    # Scalars come back as 1-element arrays; restore the saved shape.
                    arr = np.asarray(value).reshape(shapes[keys])
                    out[(prefix, *keys) if prefix else keys] = arr
        return out


def _lookup(leaves: dict[str, TreeLeaf], path: Path, name: str) -> TreeLeaf:
    try:
        return leaves[name]
    except KeyError:
        raise missing_tensor_error(name, path, list(leaves)) from None


class _OrbaxHandle(CheckpointHandle):
    """Restores the whole pytree on the first read and serves every tensor from it."""

    reader: OrbaxReader

    def __init__(self, reader: OrbaxReader, path: str | os.PathLike):
        super().__init__(reader, path)
        self._leaves: dict[str, TreeLeaf] | None = None
        self._arrays: dict[tuple[str, ...], np.ndarray] | None = None

    def list_tensors(self) -> dict[str, TensorInfo]:
        if self._leaves is None:
            self._leaves = self.reader._leaves(self.path)
        return {name: leaf.info for name, leaf in self._leaves.items()}

    def read_tensor(self, name: str) -> np.ndarray:
        self.list_tensors()
        leaves = cast("dict[str, TreeLeaf]", self._leaves)  # set by list_tensors()
        leaf = _lookup(leaves, self.path, name)
        if self._arrays is None:
            self._arrays = self.reader._restore(self.path, list(leaves.values()))
        return convert_leaf(self._arrays[leaf.path], leaf.convert)

    def close(self) -> None:
        self._leaves = None
        self._arrays = None
        super().close()
