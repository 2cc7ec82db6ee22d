"""Activations computed elsewhere (JAX, TensorFlow, a custom loop), read from files.

File layout
-----------
One file per checkpoint step in one directory, named ``step_<int>.npz`` or
``step_<int>.safetensors`` (zero padding allowed: ``step_000100.npz`` is
step 100; each step at most once). Other files are ignored.

Each file holds two arrays per layer, keyed ``<layer>/<role>``:

- ``<layer>/input``: the layer's inputs ``h``, shape ``(n_samples, d_in)``;
- ``<layer>/input_grad``: ``g = W^T dL/dz``, the gradient of the probe-set
  loss (training reduction) with respect to ``h`` through this layer only,
  same shape.

``<layer>`` is the store's layer name (``encoder.fc1``, the name of its
weight ``encoder.fc1.weight``); the *last* ``/`` separates it from the role,
and any earlier ``/`` (Keras/Flax scopes such as ``block1/dense``) becomes a
dot, as in :func:`gramlin_analyze.io.names.split_param_name`. Both formats
allow ``/`` in array names (``numpy.savez(path, **{"fc1/input": h, ...})``;
``safetensors.numpy.save_file({"fc1/input": h, ...}, path)``). Convolution
and token layers are written already flattened to one row per (example,
position), example-major. Arrays are float16, float32 or float64 (bfloat16 in
safetensors is read as float32).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, StepDiscoveryError, UsageError

__all__ = ["discover_activation_files", "read_activation_file", "ROLES"]

#: Array roles a file holds for each layer.
ROLES = ("input", "input_grad")

_FILE_RE = re.compile(r"^step_(\d+)\.(npz|safetensors)$")


def discover_activation_files(directory: str | Path) -> dict[int, Path]:
    """Activation files of a directory by step.

    Parameters
    ----------
    directory : str or pathlib.Path
        Directory holding ``step_<int>.npz`` / ``step_<int>.safetensors`` files.

    Returns
    -------
    dict of int to pathlib.Path
        Sorted by step.

    Raises
    ------
    UsageError
        If the directory does not exist.
    StepDiscoveryError
        If it holds no activation file, or two files for one step.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"activation directory {str(directory)!r} does not exist")
    found: dict[int, Path] = {}
    for path in directory.iterdir():
        match = _FILE_RE.match(path.name)
        if not match or not path.is_file():
            continue
        step = int(match.group(1))
        if step in found:
            raise StepDiscoveryError(
                f"activation directory {str(directory)!r} holds two files for step {step}: "
                f"{found[step].name!r} and {path.name!r}; keep one"
            )
        found[step] = path
    if not found:
        raise StepDiscoveryError(
            f"activation directory {str(directory)!r} holds no step_<int>.npz or "
            "step_<int>.safetensors file"
        )
    return dict(sorted(found.items()))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except ValueError as err:
            raise CheckpointFormatError(
                f"activation file {str(path)!r} holds a non-numeric (object) array: {err}; "
                "save float arrays only"
            ) from err
        except (OSError, EOFError) as err:
            raise CheckpointFormatError(
                f"activation file {str(path)!r} is not a readable .npz archive: {err}"
            ) from err
    if path.suffix == ".safetensors":
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointFormatError(
                f"activation file {str(path)!r} is not a readable safetensors file: {err}"
            ) from err
        return {
            k: (t.to(torch.float32) if t.dtype == torch.bfloat16 else t).numpy()
            for k, t in tensors.items()
        }
    raise UsageError(f"activation file {str(path)!r} must end in .npz or .safetensors")


def read_activation_file(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read one step's activations.

    Parameters
    ----------
    path : str or pathlib.Path
        A file in the layout of the module docstring.

    Returns
    -------
    dict of str to dict
        ``layer -> {"input": h, "input_grad": g}``, both ``(n_samples, d_in)``.

    Raises
    ------
    CheckpointFormatError
        If the file is unreadable, a key is not ``<layer>/input`` or
        ``<layer>/input_grad``, a layer lacks one of the two, an array is
        not floating point or not 2-D, or the two shapes differ.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"activation file {str(path)!r} does not exist")
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in _read_arrays(path).items():
        layer, sep, role = key.rpartition("/")
        if not sep or not layer or role not in ROLES:
            raise CheckpointFormatError(
                f"activation file {str(path)!r}: array {key!r} is not named '<layer>/input' or "
                "'<layer>/input_grad'; rename it"
            )
        if arr.dtype.kind != "f":
            raise CheckpointFormatError(
                f"activation file {str(path)!r}: array {key!r} has dtype {arr.dtype}; "
                "activations must be floating point"
            )
        if arr.ndim != 2:
            raise CheckpointFormatError(
                f"activation file {str(path)!r}: array {key!r} has shape {arr.shape}; write one "
                "row per sample, (n_samples, d_in) (flatten positions into rows, example-major)"
            )
        name = layer.replace("/", ".").strip(".")
        if role in layers.get(name, {}):
            raise CheckpointFormatError(
                f"activation file {str(path)!r}: two arrays name {role!r} of layer {name!r} "
                "('/' inside a layer name reads as '.'); keep one"
            )
        layers.setdefault(name, {})[role] = arr
    if not layers:
        raise CheckpointFormatError(f"activation file {str(path)!r} holds no arrays")
    for name, roles in layers.items():
        missing = [r for r in ROLES if r not in roles]
        if missing:
            raise CheckpointFormatError(
                f"activation file {str(path)!r}: layer {name!r} has no {missing[0]!r} array; "
                f"write both '{name}/input' and '{name}/input_grad'"
            )
        if roles["input"].shape != roles["input_grad"].shape:
            raise CheckpointFormatError(
                f"activation file {str(path)!r}: layer {name!r} has input of shape "
                f"{roles['input'].shape} but input_grad of shape {roles['input_grad'].shape}; "
                "g = W^T dL/dz has one row per input row and the same width"
            )
    return layers
