"""What a store was made from, so that a command meant for another run is refused.

A store records its run in attributes it already had: the root's ``source``
(the checkpoint directory as an absolute path, so that it means the same
from any working directory) and ``run_name``; each layer group's
``source_shape``; ``/probe``'s ``capture_config``. This module reads the root's
part; ``ingest`` compares a command's checkpoints with the rest before it
writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gramlin_analyze.store.location import is_remote

__all__ = ["describe_run", "holds_run_from", "source_of"]


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
