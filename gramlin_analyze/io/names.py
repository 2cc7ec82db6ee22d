"""Parameter and layer names: one normalization used by ingest and capture alike."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

__all__ = [
    "WRAPPER_PREFIXES",
    "PARAM_SUFFIXES",
    "common_wrapper_prefix",
    "split_param_name",
    "select_layers",
]

#: Prefixes that wrappers add to every parameter (DataParallel/DDP ``module.``,
#: Lightning/HF ``model.``, torch.compile ``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")

#: Parameter leaf name -> role. Keras/Flax ``kernel`` is a weight.
PARAM_SUFFIXES = {"weight": "weight", "kernel": "weight", "bias": "bias", "embedding": "weight"}


def common_wrapper_prefix(names: Iterable[str]) -> str:
    """The wrapper prefix shared by *every* name, stripped repeatedly.

    Stripping only when all names share a prefix keeps it consistent: a model
    whose own submodule is called ``model`` keeps that name unless every
    parameter lives under it.
    """
    names = list(names)
    prefix = ""
    while names:
        for p in WRAPPER_PREFIXES:
            if all(n.startswith(p) for n in names) and all(len(n) > len(p) for n in names):
                prefix += p
                names = [n[len(p) :] for n in names]
                break
        else:
            break
    return prefix


def split_param_name(name: str, prefix: str = "") -> tuple[str, str]:
    """``(layer, role)`` of a parameter name after removing ``prefix``.

    ``"module.encoder.fc1.weight"`` with prefix ``"module."`` gives
    ``("encoder.fc1", "weight")``. Path separators of other frameworks
    (``/`` in Keras and orbax) become dots, since ``/`` nests Zarr groups.
    """
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    name = name.replace("/", ".").strip(".")
    layer, _, leaf = name.rpartition(".")
    if not layer:
        return name, "weight"
    return layer, PARAM_SUFFIXES.get(leaf, leaf)


def select_layers(
    layers: Iterable[str],
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[str]:
    """Layers matching any ``include`` glob (all when None) and no ``exclude`` glob."""
    include = list(include or [])
    exclude = list(exclude or [])
    out = []
    for name in layers:
        if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in exclude):
            continue
        out.append(name)
    return out
