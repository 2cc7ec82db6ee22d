"""Capture: layer inputs ``h`` and gradients ``g = W^T dL/dz`` from a model and a probe set.

The pieces an ingest needs, without any store writing:

- probe sets: :func:`load_probe`, :func:`make_probe`, :class:`ProbeSet`;
- model sources: :func:`load_factory`, :func:`load_torchscript`,
  :func:`rebuild_mlp`, and :func:`load_state_dict_strict` to load a
  checkpoint's tensors;
- the loss: :func:`resolve_loss`; the learning rate: :func:`load_lr_schedule`,
  :func:`resolve_lr`;
- the engine: :func:`capture_layers`, :func:`sample_counts`,
  :func:`capture_step` (see :mod:`gramlin_analyze.capture.engine` for the
  sink contract);
- activations computed elsewhere: :func:`discover_activation_files`,
  :func:`read_activation_file` (layout in :mod:`gramlin_analyze.capture.external`).
"""

from gramlin_analyze.capture.engine import (
    CaptureResult,
    Sink,
    capture_layers,
    capture_step,
    sample_counts,
)
from gramlin_analyze.capture.external import discover_activation_files, read_activation_file
from gramlin_analyze.capture.layers import CaptureLayer, ConvGeometry
from gramlin_analyze.capture.losses import LossFunction, resolve_loss
from gramlin_analyze.capture.lr import LRSchedule, load_lr_schedule, resolve_lr
from gramlin_analyze.capture.models import (
    ACTIVATIONS,
    RebuiltMLP,
    StateDictDiff,
    load_factory,
    load_state_dict_strict,
    load_torchscript,
    rebuild_mlp,
)
from gramlin_analyze.capture.probe import ProbeSet, load_probe, make_probe, probe_summary

__all__ = [
    "ACTIVATIONS",
    "CaptureLayer",
    "CaptureResult",
    "ConvGeometry",
    "LRSchedule",
    "LossFunction",
    "ProbeSet",
    "RebuiltMLP",
    "Sink",
    "StateDictDiff",
    "capture_layers",
    "capture_step",
    "discover_activation_files",
    "load_factory",
    "load_lr_schedule",
    "load_probe",
    "load_state_dict_strict",
    "load_torchscript",
    "make_probe",
    "probe_summary",
    "read_activation_file",
    "rebuild_mlp",
    "resolve_loss",
    "resolve_lr",
    "sample_counts",
]
