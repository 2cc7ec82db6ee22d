"""Which layers the recorder follows, their store names, and their weight as ``(d_out, d_in)``.

Names come from :mod:`gramlin_analyze.capture.layers` (the wrapper prefix shared
by every state-dict key stripped), so a record's layer names are the store's.
Hugging Face ``Conv1D`` (GPT-2) keeps its weight as ``(in, out)``; its effective
``W`` is ``weight.T``, recognised by :func:`~gramlin_analyze.capture.layers.is_hf_conv1d`
(shared with capture) so that transformers is never imported.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gramlin_analyze.capture.layers import is_hf_conv1d, layer_name, match_globs, wrapper_prefix
from gramlin_analyze.errors import UsageError

__all__ = ["RecordLayer", "find_layers", "is_hf_conv1d", "MODES"]

MODES = ("full", "diag")


@dataclass
class RecordLayer:
    """One recorded layer: its module, mode and geometry."""

    name: str
    module_name: str
    module: nn.Module
    transposed: bool
    mode: str

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight

    @property
    def d_out(self) -> int:
        return int(self.param.shape[1 if self.transposed else 0])

    @property
    def d_in(self) -> int:
        return int(self.param.shape[0 if self.transposed else 1])

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective ``W`` (``d_out x d_in``), detached, in ``dtype``."""
        w = self.param.detach()
        return (w.t() if self.transposed else w).to(dtype)

    def grad(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``dL/dW`` of the effective ``W``, or None when the weight has no gradient this step."""
        g = self.param.grad
        if g is None:
            return None
        return (g.t() if self.transposed else g).to(dtype)


def _mode_for(name: str, d_in: int, mode: str | Mapping[str, str], full_max: int) -> str:
    """The layer's mode: a glob mapping picks the first match; ``auto`` is full up to ``full_max``."""
    chosen = mode
    if isinstance(mode, Mapping):
        chosen = next((m for g, m in mode.items() if fnmatch.fnmatchcase(name, g)), "auto")
    if chosen == "auto":
        return "full" if d_in <= full_max else "diag"
    if chosen not in MODES:
        raise UsageError(f"record mode {chosen!r} for layer {name!r}: use 'full', 'diag' or 'auto'")
    return str(chosen)


def find_layers(
    model: nn.Module,
    *,
    layers: Sequence[str] | None = None,
    mode: str | Mapping[str, str] = "auto",
    full_max: int = 1024,
) -> list[RecordLayer]:
    """The model's ``nn.Linear`` and HF ``Conv1D`` layers selected by ``layers`` globs."""
    prefix = wrapper_prefix(model)
    found: dict[str, tuple[str, nn.Module]] = {}
    bypassed = {
        id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
    }  # MultiheadAttention uses out_proj.weight without calling out_proj: no hooks run
    for module_name, module in model.named_modules():
        if id(module) in bypassed:
            continue
        if isinstance(module, nn.Linear) or is_hf_conv1d(module):
            found.setdefault(layer_name(module_name, prefix), (module_name, module))
    if not found:
        raise UsageError(f"model {type(model).__name__} has no nn.Linear or Conv1D layer to record")
    names = list(found) if layers is None else match_globs(found, layers, what="record layer")
    out = []
    for name in names:
        module_name, module = found[name]
        transposed = is_hf_conv1d(module)
        d_in = int(module.weight.shape[0 if transposed else 1])
        out.append(
            RecordLayer(
                name, module_name, module, transposed, _mode_for(name, d_in, mode, full_max)
            )
        )
    return out
