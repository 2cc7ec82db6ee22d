"""Checkpoint tensors into a model: prefixes, tied weights, ``Conv1D`` orientation, and
a message that explains every mismatch."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from gramlin_analyze.capture.layers import is_hf_conv1d
from gramlin_analyze.errors import ModelError
from gramlin_analyze.io.names import common_wrapper_prefix

__all__ = ["StateDictDiff", "load_state_dict_strict", "to_tensor"]

_MAX_LISTED = 10


@dataclass(frozen=True)
class StateDictDiff:
    """Keys compared between a model and checkpoint tensors (prefixes stripped)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """A readable summary listing at most ten entries of each kind."""

        def listed(items: list[Any]) -> str:
            more = len(items) - _MAX_LISTED
            return ", ".join(map(str, items[:_MAX_LISTED])) + (
                f", … ({more} more)" if more > 0 else ""
            )

        parts = []
        if self.missing:
            parts.append(
                f"missing from the checkpoint ({len(self.missing)}): {listed(self.missing)}"
            )
        if self.unexpected:
            parts.append(
                f"in the checkpoint but not the model ({len(self.unexpected)}): "
                f"{listed(self.unexpected)}"
            )
        if self.mismatched:
            shapes = [
                f"{k} model {tuple(m)} vs checkpoint {tuple(c)}" for k, m, c in self.mismatched
            ]
            parts.append(f"shape mismatches ({len(shapes)}): {listed(shapes)}")
        return "; ".join(parts)


def to_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    arr = np.asarray(value)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    arr = np.ascontiguousarray(arr)
    # readers may return read-only views of a memory-mapped file; torch wants writable memory
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def load_state_dict_strict(
    model: nn.Module,
    tensors: Mapping[str, np.ndarray | torch.Tensor],
    *,
    strict: bool = True,
    transposed: Collection[str] = (),
) -> StateDictDiff:
    """Load checkpoint tensors into ``model`` (in place), explaining any mismatch.

    Wrapper prefixes shared by every name (``module.``, ``model.``,
    ``_orig_mod.``) are stripped on both sides before matching; values are
    cast to the model's dtypes. A parameter the model shares with another
    (tied weights: same storage) may be missing when its partner is present,
    as ``save_pretrained`` writes a tied output embedding.

    Parameters
    ----------
    model : torch.nn.Module
        The model to fill.
    tensors : Mapping of str to numpy.ndarray or torch.Tensor
        Checkpoint tensors by name.
    strict : bool, default True
        When False, missing and unexpected keys are tolerated (and returned);
        shape mismatches are always an error.
    transposed : collection of str
        Names the reader turned from ``(in, out)`` into ``(out, in)``: they go
        back into a Hugging Face ``Conv1D``'s ``(in, out)`` weight transposed.

    Returns
    -------
    StateDictDiff
        Empty after a strict load; otherwise the tolerated differences.

    Raises
    ------
    ModelError
        On mismatch, listing missing keys, unexpected keys and shape
        mismatches (at most ten of each), and a prefix that one side's keys share.
    """
    model_sd = model.state_dict()
    m_prefix = common_wrapper_prefix(model_sd)
    t_prefix = common_wrapper_prefix(tensors)
    model_keys = {k[len(m_prefix) :]: k for k in model_sd}
    ckpt_keys = {k[len(t_prefix) :]: k for k in tensors}
    back = _conv1d_params(model)
    values = {
        k: _oriented(tensors[c], c in transposed and model_keys.get(k) in back)
        for k, c in ckpt_keys.items()
    }
    tied = _tied_keys(model, m_prefix)
    missing = sorted(
        k for k in set(model_keys) - set(ckpt_keys) if not (tied.get(k, set()) & set(ckpt_keys))
    )
    unexpected = sorted(set(ckpt_keys) - set(model_keys))
    mismatched = []
    for key in sorted(set(model_keys) & set(ckpt_keys)):
        m_shape = tuple(model_sd[model_keys[key]].shape)
        c_shape = tuple(np.shape(values[key]))
        if m_shape != c_shape:
            mismatched.append((key, m_shape, c_shape))
    diff = StateDictDiff(missing=missing, unexpected=unexpected, mismatched=mismatched)
    if mismatched or (strict and diff):
        raise ModelError(
            f"checkpoint tensors do not fit the model {type(model).__name__}: "
            f"{_prefix_hint(missing, unexpected)}{diff.describe()} "
            "(check that the model factory builds the architecture that was trained, "
            "with the same sizes)"
        )
    remapped = {model_keys[k]: to_tensor(values[k]) for k in set(model_keys) & set(ckpt_keys)}
    model.load_state_dict(remapped, strict=False)
    return diff


def _conv1d_params(model: nn.Module) -> set[str]:
    """State-dict keys of Hugging Face ``Conv1D`` weights (stored ``(in, out)``)."""
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if is_hf_conv1d(module)
    }


def _oriented(value: np.ndarray | torch.Tensor, back: bool) -> np.ndarray | torch.Tensor:
    """A reader's ``(out, in)`` tensor back in a ``Conv1D``'s ``(in, out)`` when ``back``."""
    if not back:
        return value
    return value.detach().t() if isinstance(value, torch.Tensor) else np.asarray(value).T


def _tied_keys(model: nn.Module, prefix: str) -> dict[str, set[str]]:
    """``{key: keys sharing its storage}`` of tied parameters, wrapper prefix stripped."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name[len(prefix) :])
    return {k: set(names) - {k} for names in by_param.values() if len(names) > 1 for k in names}


def _first_part(keys: list[str]) -> str | None:
    """The first dotted part every key shares (``net.`` of ``net.fc1.weight``), if any."""
    parts = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(parts) == 1 and all("." in k for k in keys):
        return f"{parts.pop()}."
    return None


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """A prefix that explains the mismatch: the keys fit once it is removed or added."""
    if not missing or not unexpected:
        return ""
    for side, keys, other, fix in (
        ("checkpoint's", unexpected, missing, "remove it from the checkpoint keys"),
        ("model's", missing, unexpected, "return the inner model from the factory"),
    ):
        prefix = _first_part(keys)
        if prefix and {k[len(prefix) :] for k in keys} & set(other):
            return (
                f"the {side} keys start with `{prefix}` where the other side's do not "
                f"({fix}, e.g. with a factory that wraps or unwraps the model); "
            )
    return ""
