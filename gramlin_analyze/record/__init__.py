"""Training-time recording of the VCS, its parts and the Gram change, beside each checkpoint.

:class:`Recorder` serves a plain PyTorch loop; :class:`GramlinLightningCallback` and
:class:`GramlinHFCallback` the two frameworks (imported only when used, so the core never
imports Lightning or transformers). docs/record.md describes the file.
"""

from __future__ import annotations

from typing import Any

from gramlin_analyze.record.file import RECORD_NAME, RECORD_SUFFIX, read_record, record_path
from gramlin_analyze.record.recorder import Recorder

__all__ = [
    "Recorder",
    "GramlinLightningCallback",
    "GramlinHFCallback",
    "RECORD_NAME",
    "RECORD_SUFFIX",
    "read_record",
    "record_path",
]

_LAZY = {
    "GramlinLightningCallback": "gramlin_analyze.record.lightning",
    "GramlinHFCallback": "gramlin_analyze.record.hf",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
