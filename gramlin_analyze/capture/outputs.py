"""The tensor the loss is taken of, from whatever a model's forward returns.

Hugging Face models return ``ModelOutput`` objects (ordered dicts with
attributes); the loss-relevant tensor is their ``logits``, so a factory may
return a ``transformers`` model as it is, parameter names unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gramlin_analyze.errors import ModelError

__all__ = ["model_outputs"]


def _named_logits(out: Any) -> torch.Tensor | None:
    """``out.logits``, else the one ``*logits`` entry of a mapping (``prediction_logits``)."""
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        named = [k for k, v in out.items() if str(k).endswith("logits") and torch.is_tensor(v)]
        if len(named) == 1:
            return out[named[0]]
    return None


def model_outputs(out: Any, model: Any = None) -> torch.Tensor:
    """The outputs capture feeds to the loss: a tensor as it is, a ``ModelOutput``'s logits.

    Raises
    ------
    ModelError
        For any other return value, naming what the model returned and what to do.
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = _named_logits(out)
    if logits is not None:
        return logits
    what = type(model).__name__ if model is not None else "model"
    keys = f" with entries {list(out.keys())}" if isinstance(out, Mapping) else ""
    raise ModelError(
        f"{what} returned a {type(out).__name__}{keys}; capture needs a tensor of outputs or an "
        "object with .logits (a Hugging Face ModelOutput): use a model with a head "
        "(AutoModelFor...), or wrap it so that forward returns the logits"
    )
