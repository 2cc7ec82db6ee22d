"""Exceptions raised by gramlin-analyze.

Every error derives from :class:`GramlinError` and also from the builtin a
caller would naturally catch (the pattern of ``zarr.errors``), so
``except ValueError`` keeps working for code that does not know us.
Messages name the file or object concerned and say what to do.
"""

from __future__ import annotations

__all__ = [
    "GramlinError",
    "UsageError",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "MissingDependencyError",
    "StepDiscoveryError",
    "ShapeMismatchError",
    "StoreError",
    "StoreLockedError",
    "StoreUnavailableError",
    "SchemaValidationError",
    "ProbeError",
    "ModelError",
    "MissingDataError",
    "MissingTensorError",
    "CheckpointReadError",
    "DecompressionLimitError",
]


class GramlinError(Exception):
    """Base class of every error raised on purpose by gramlin-analyze."""


class UsageError(GramlinError, ValueError):
    """The command or function was called wrongly (CLI exit code 2)."""


class CheckpointFormatError(GramlinError, ValueError):
    """A checkpoint file is truncated, corrupt, or not of the format its name claims."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A checkpoint would need to execute code (e.g. arbitrary unpickling) to load."""


class MissingDependencyError(GramlinError, ImportError):
    """An optional framework needed to read a format is not installed."""


class StepDiscoveryError(GramlinError, ValueError):
    """Step numbers of a checkpoint directory are missing or ambiguous."""


class ShapeMismatchError(GramlinError, ValueError):
    """A checkpoint's tensor shapes differ from the rest of the trajectory."""


class StoreError(GramlinError, OSError):
    """The store is missing, malformed, or cannot be written."""


class StoreLockedError(StoreError):
    """Another process is writing to the store."""


class StoreUnavailableError(StoreError):
    """The store cannot be used: its disk is full or read-only, permission is
    denied, or its remote endpoint cannot be reached."""


class SchemaValidationError(StoreError):
    """The store (or a config/probe file) does not match its JSON Schema."""


class ProbeError(GramlinError, ValueError):
    """The probe set is malformed or disagrees with the store or the model."""


class ModelError(GramlinError, ValueError):
    """The model factory, archive, or rebuilt model cannot be used for capture."""


class MissingDataError(GramlinError, LookupError):
    """A metric needs data the store does not hold (e.g. TL without activations)."""


class MissingTensorError(GramlinError, KeyError):
    """A checkpoint holds no tensor of the requested name (a ``KeyError``, as readers promise)."""

    def __str__(self) -> str:
        # KeyError's str() quotes its argument; this one is a sentence.
        return str(self.args[0]) if self.args else ""


class CheckpointReadError(GramlinError, OSError):
    """A checkpoint cannot be read at all: missing, unreadable, a dangling link, or a
    special file (FIFO, device, socket) that is never opened."""


class DecompressionLimitError(CheckpointFormatError):
    """A checkpoint declares more decompressed or allocated bytes than its size allows
    (a decompression bomb, or a corrupt size field); ``GRAMLIN_MAX_INFLATE`` raises the cap."""
