"""The capture checks the ingest driver sends to where tasks run, importable without torch.

The driver passes these functions to its task runner; each imports the torch
side of capture (:mod:`gramlin_analyze.capture.task`) only when it runs, so a
driver on a cluster never pays torch's import (about 1.5 s per command).
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_setup", "conv1d_layers"]


def check_setup(*args: Any) -> Any:
    """:func:`gramlin_analyze.capture.task.check_setup`, run where the tasks run."""
    from gramlin_analyze.capture.task import check_setup as run

    return run(*args)


def conv1d_layers(*args: Any) -> Any:
    """:func:`gramlin_analyze.capture.task.conv1d_layers`, run where the tasks run."""
    from gramlin_analyze.capture.task import conv1d_layers as run

    return run(*args)
