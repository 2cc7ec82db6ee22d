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

from gramlin_analyze._lazy import lazy_attributes

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

# Loaded on first use: the driver reads the torch-free parts without importing torch.
_LAZY = {
    "ACTIVATIONS": "gramlin_analyze.capture.models",
    "CaptureLayer": "gramlin_analyze.capture.layers",
    "CaptureResult": "gramlin_analyze.capture.engine",
    "ConvGeometry": "gramlin_analyze.capture.layers",
    "LRSchedule": "gramlin_analyze.capture.lr",
    "LossFunction": "gramlin_analyze.capture.losses",
    "ProbeSet": "gramlin_analyze.capture.probe",
    "RebuiltMLP": "gramlin_analyze.capture.models",
    "Sink": "gramlin_analyze.capture.engine",
    "StateDictDiff": "gramlin_analyze.capture.models",
    "capture_layers": "gramlin_analyze.capture.engine",
    "capture_step": "gramlin_analyze.capture.engine",
    "discover_activation_files": "gramlin_analyze.capture.external",
    "load_factory": "gramlin_analyze.capture.models",
    "load_lr_schedule": "gramlin_analyze.capture.lr",
    "load_probe": "gramlin_analyze.capture.probe",
    "load_state_dict_strict": "gramlin_analyze.capture.models",
    "load_torchscript": "gramlin_analyze.capture.models",
    "make_probe": "gramlin_analyze.capture.probe",
    "probe_summary": "gramlin_analyze.capture.probe",
    "read_activation_file": "gramlin_analyze.capture.external",
    "rebuild_mlp": "gramlin_analyze.capture.models",
    "resolve_loss": "gramlin_analyze.capture.losses",
    "resolve_lr": "gramlin_analyze.capture.lr",
    "sample_counts": "gramlin_analyze.capture.engine",
}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, __all__, globals())
