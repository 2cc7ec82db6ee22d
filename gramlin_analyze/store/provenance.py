"""What a store was made from, so that a command meant for another run is refused.

A store records its run in attributes it already had: the root's ``source``
(the checkpoint directory as an absolute path, so that it means the same
from any working directory) and ``run_name``; each layer group's
``source_shape``; ``/probe``'s ``capture_config``. This module reads the root's
part; ``ingest`` compares a command's checkpoints with the rest before it
writes anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gramlin_analyze.errors import UsageError
from gramlin_analyze.store.location import is_remote

__all__ = [
    "check_run_attrs",
    "describe_run",
    "holds_run_from",
    "hyperparameters_update",
    "parse_run_attrs",
    "run_attrs_update",
    "source_of",
    "typed_value",
]


def source_of(directory: str | os.PathLike) -> str:
    """The ``source`` a new store records for checkpoints read from ``directory``."""
    text = str(directory)
    return text if is_remote(text) else str(Path(text).resolve())


def describe_run(attrs: Mapping[str, Any], url: str) -> str:
    """``"<store> holds run '<name>' from <source>"``, from the root attributes."""
    return f"{url} holds run {attrs.get('run_name', '?')!r} from {attrs.get('source', '?')}"


def holds_run_from(attrs: Mapping[str, Any], directory: str | os.PathLike) -> bool | None:
    """Whether the store's run came from ``directory`` (or a path inside it, or one it is inside).

    None when the store does not say: earlier versions recorded ``source`` as
    given, and a relative path means nothing from another working directory.
    """
    recorded = str(attrs.get("source") or "")
    if (
        not recorded
        or is_remote(recorded)
        or not os.path.isabs(recorded)
        or is_remote(str(directory))
    ):
        return None
    here, there = Path(directory).resolve(), Path(os.path.normpath(recorded))
    return here == there or there in here.parents or here in there.parents


#: Root attributes of run metadata (see ``docs/runs.md``): ``run_attrs`` is what the user
#: gave (``--run-attr``), ``hyperparameters`` what the checkpoints state, and
#: ``hyperparameters_from`` the files they were read from.
RUN_ATTRS = "run_attrs"
HYPERPARAMETERS = "hyperparameters"
HYPERPARAMETERS_FROM = "hyperparameters_from"


def typed_value(text: str) -> int | float | bool | str:
    """``"3"`` -> 3, ``"0.5"`` / ``"1e-3"`` -> float, ``"true"`` / ``"false"`` -> bool,
    anything else (``"nan"`` included: JSON has no NaN) the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            value = kind(text.strip())
        except ValueError:
            continue
        if not isinstance(value, float) or math.isfinite(value):
            return value
    return text


def parse_run_attrs(items: Iterable[str]) -> dict[str, Any]:
    """``["label_noise=0.5", "seed=3"]`` as a typed dict; a malformed item is a usage error."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(
                f"--run-attr {item!r}: write KEY=VALUE, e.g. --run-attr label_noise=0.5"
            )
        out[key.strip()] = typed_value(value)
    return out


def check_run_attrs(run_attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``run_attrs`` as stored: text keys, and numbers (finite), flags or text as values."""
    out: dict[str, Any] = {}
    for key, value in (run_attrs or {}).items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"run attribute names must be non-empty text, not {key!r}")
        finite = not isinstance(value, float) or math.isfinite(value)
        if not isinstance(value, bool | int | float | str) or not finite:
            raise UsageError(
                f"run attribute {key}={value!r}: give a finite number, true/false or text"
            )
        out[key] = value
    return out


def run_attrs_update(
    attrs: Mapping[str, Any],
    url: str,
    *,
    run_name: str | None = None,
    run_attrs: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """The root attributes to write for a run's name and attributes given by the user.

    Attributes merge with the stored ones; giving a stored attribute another value means
    another run, so it is refused unless ``replace`` (which replaces them all). A name
    is a label: a new one always replaces the old.
    """
    given = check_run_attrs(run_attrs)
    value = attrs.get(RUN_ATTRS)
    stored: Mapping[str, Any] = value if isinstance(value, Mapping) else {}
    if not replace:
        differ = [
            f"{k}={stored[k]!r} (given {v!r})"
            for k, v in given.items()
            if k in stored and stored[k] != v
        ]
        if differ:
            raise UsageError(
                f"{describe_run(attrs, url)} with run attributes {', '.join(differ)}: ingest "
                "into another --store, or pass --replace-run-attrs to change them deliberately"
            )
    out: dict[str, Any] = {}
    if given or replace:
        out[RUN_ATTRS] = given if replace else {**stored, **given}
    if run_name:
        out["run_name"] = run_name
    return {k: v for k, v in out.items() if attrs.get(k) != v}


def hyperparameters_update(attrs: Mapping[str, Any], found: Any) -> dict[str, Any]:
    """The root attributes recording ``found`` (a :class:`~gramlin_analyze.io.run_meta.RunMetadata`):
    its values merged over the stored ones, the latest checkpoint's winning."""
    if not found.hyperparameters:
        return {}
    stored = attrs.get(HYPERPARAMETERS)
    merged = {**(stored if isinstance(stored, Mapping) else {}), **found.hyperparameters}
    out = {HYPERPARAMETERS: merged, HYPERPARAMETERS_FROM: list(found.sources)}
    return {k: v for k, v in out.items() if attrs.get(k) != v}
