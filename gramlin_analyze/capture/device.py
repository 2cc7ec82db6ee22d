"""Where capture runs: the CPU (the default, and what the test suite checks) or a CUDA GPU.

One capture code path serves both: the model is moved to the device, each
probe batch follows it, and ``h``/``g`` come back to the CPU as NumPy arrays
of the same dtypes. The checks here find a device a worker does not have
before anything is stored.
"""

from __future__ import annotations

import re

from gramlin_analyze.errors import UsageError

__all__ = ["DEVICES", "check_device_name", "device_problem"]

#: What ``--device`` takes: ``cpu``, ``cuda`` (the worker's current GPU) or ``cuda:N``.
DEVICES = ("cpu", "cuda")

_NAME = re.compile(r"cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """``name`` if it names a device capture can run on; a usage error otherwise (no torch import)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, not {name!r}")
    return name


def device_problem(name: str) -> str:
    """Why this process cannot run capture on ``name`` (empty when it can)."""
    if check_device_name(name) == "cpu":
        return ""
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__}: torch.cuda.is_available() is False"
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"it has {torch.cuda.device_count()} CUDA device(s), so no {name}"
    return ""
