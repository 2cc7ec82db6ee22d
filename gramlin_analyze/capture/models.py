"""Model sources for capture: a user factory, a TorchScript archive, or a rebuilt MLP.

Capture needs the architecture, which weights alone do not give. Three sources:

- :func:`load_factory`: ``"pkg.module:build"`` or ``"path/to/file.py:build"``
  names a callable returning a ``torch.nn.Module``; it is called with the
  checkpoint's config dict when it takes one argument, else with none.
  Importing the factory runs the user's own code, which they named.
  ``"hf"`` builds a ``transformers`` model from the checkpoint's ``config.json``
  (:mod:`gramlin_analyze.capture.hf_models`).
- :func:`load_torchscript`: a ``torch.jit`` archive. Such archives contain
  code that runs when the model runs, so loading one needs the explicit
  ``allow_code=True`` (CLI: a loudly named flag); never loaded by default.
- :func:`rebuild_mlp`: for a plain state dict that is a chain of linear
  layers, an MLP whose linear submodules keep the checkpoint's layer names.

:func:`load_state_dict_strict` loads checkpoint tensors into a model,
tolerating wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) on
either side and explaining every mismatch.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gramlin_analyze.capture.state_dict import StateDictDiff, load_state_dict_strict, to_tensor
from gramlin_analyze.errors import GramlinError, ModelError
from gramlin_analyze.io.names import common_wrapper_prefix, split_param_name
from gramlin_analyze.io.torchscript import load_torchscript  # the one place TorchScript is loaded

__all__ = [
    "ACTIVATIONS",
    "HF_FACTORY",
    "check_factory",
    "StateDictDiff",
    "RebuiltMLP",
    "load_factory",
    "load_state_dict_strict",
    "load_torchscript",
    "rebuild_mlp",
]

#: Activation names accepted by :func:`rebuild_mlp`.
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}

_MAX_LISTED = 10

#: ``--model hf``: the model built by transformers from the checkpoint's ``config.json``.
HF_FACTORY = "hf"


def _import_target(spec: str) -> Any:
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ModelError(
            f"model factory {spec!r} is not of the form 'pkg.module:function' or "
            "'path/to/file.py:function'"
        )
    is_file = module_part.endswith(".py") or "/" in module_part or "\\" in module_part
    try:
        if is_file:
            path = Path(module_part).expanduser().resolve()
            if not path.is_file():
                raise ModelError(f"model factory {spec!r}: file {str(path)!r} does not exist")
            mod_name = f"_gramlin_factory_{abs(hash(str(path)))}"
            mod_spec = importlib.util.spec_from_file_location(mod_name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise ModelError(f"model factory {spec!r}: {str(path)!r} is not a Python file")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_name] = module
            try:
                mod_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            module = importlib.import_module(module_part)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(
            f"model factory {spec!r}: importing {module_part!r} failed with "
            f"{type(err).__name__}: {err} (check the module path and that it imports on its own)"
        ) from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        public = sorted(n for n in dir(module) if not n.startswith("_"))[:_MAX_LISTED]
        raise ModelError(
            f"model factory {spec!r}: module {module_part!r} has no attribute {attr!r} "
            f"(it defines e.g. {public})"
        ) from err


def _takes_one_argument(fn: Any) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return bool(params)


def check_factory(spec: str) -> Any:
    """Import a model factory without calling it, and return it.

    A wrong module path, file or name fails here, before anything is stored;
    ``"hf"`` (:data:`HF_FACTORY`) needs transformers installed.

    Raises
    ------
    ModelError
        If the import fails or the attribute is missing or not callable.
    """
    if spec == HF_FACTORY:
        from gramlin_analyze.capture.hf_models import hf_factory

        return hf_factory
    factory = _import_target(spec)
    if not callable(factory):
        raise ModelError(
            f"model factory {spec!r} is a {type(factory).__name__}, not a callable; "
            "name a function or class that returns a torch.nn.Module"
        )
    return factory


def load_factory(spec: str, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Import a model factory and call it.

    Parameters
    ----------
    spec : str
        ``"pkg.module:build"`` (importable module) or ``"path/to/file.py:build"``.
    config : Mapping, optional
        The checkpoint's config dict, passed as the single positional argument
        when the factory accepts one (an empty dict when None); factories
        taking no argument are called without it.

    Returns
    -------
    torch.nn.Module
        The model, in eval mode.

    Raises
    ------
    ModelError
        If the import fails, the attribute is missing or not callable, the
        factory raises, or it returns something other than a ``torch.nn.Module``.
    """
    factory = check_factory(spec)
    try:
        model = factory(dict(config or {})) if _takes_one_argument(factory) else factory()
    except GramlinError:
        raise
    except Exception as err:
        raise ModelError(
            f"model factory {spec!r} raised {type(err).__name__}: {err} "
            "(a factory takes the checkpoint config dict as its single argument, or none)"
        ) from err
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model factory {spec!r} returned a {type(model).__name__}, expected a "
            "torch.nn.Module; return the model itself (not a state dict or a tuple)"
        )
    return model.eval()


def _natural_key(name: str) -> list[Any]:
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


def _chain_by_shapes(shapes: dict[str, tuple[int, int]]) -> list[str] | None:
    """The unique order in which each layer's input size is the previous output size."""
    remaining = dict(shapes)
    outs = [s[0] for s in shapes.values()]
    starts = [n for n, (_, d_in) in shapes.items() if d_in not in outs]
    if len(starts) != 1:
        return None
    order = [starts[0]]
    del remaining[starts[0]]
    while remaining:
        d_out = shapes[order[-1]][0]
        nxt = [n for n, (_, d_in) in remaining.items() if d_in == d_out]
        if len(nxt) != 1:
            return None
        order.append(nxt[0])
        del remaining[nxt[0]]
    return order


class RebuiltMLP(nn.Module):
    """A chain of ``nn.Linear`` layers under their checkpoint names.

    Linear submodules sit at their original dotted paths (``encoder.fc1`` is
    ``self.encoder.fc1``), so capture's layer names equal the store's. The
    activation runs between linear layers, not after the last. Inputs with
    more than two dimensions are flattened per sample.
    """

    def __init__(self, layers: list[tuple[str, nn.Linear]], activation: str) -> None:
        super().__init__()
        self.layer_names = [name for name, _ in layers]
        self.activation_name = activation
        self._act = ACTIVATIONS[activation]()
        for name, linear in layers:
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    self._check_free(parent, part, name)
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            self._check_free(parent, leaf, name)
            parent.add_module(leaf, linear)

    @staticmethod
    def _check_free(parent: nn.Module, part: str, name: str) -> None:
        if part in parent._modules or hasattr(parent, part):
            raise ModelError(
                f"cannot rebuild an MLP: layer name {name!r} collides with the attribute "
                f"{part!r} of {type(parent).__name__}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the chain; flatten per-sample inputs of rank > 1 first."""
        if x.dim() > 2:
            x = x.flatten(1)
        last = len(self.layer_names) - 1
        for i, name in enumerate(self.layer_names):
            x = self.get_submodule(name)(x)
            if i < last:
                x = self._act(x)
        return x


def rebuild_mlp(
    tensors: Mapping[str, np.ndarray | torch.Tensor], *, activation: str = "relu"
) -> RebuiltMLP:
    """Rebuild an MLP from a plain state dict of linear layers.

    Layers are ordered by the natural order of their names (``layers.2``
    before ``layers.10``); when that order does not chain (each layer's input
    size equal to the previous layer's output size), the unique chain by
    shapes is used. Wrapper prefixes are stripped; weights are in the
    PyTorch ``(out, in)`` orientation that every gramlin reader produces.

    Parameters
    ----------
    tensors : Mapping of str to numpy.ndarray or torch.Tensor
        ``<layer>.weight`` (2-D) and optional ``<layer>.bias`` (1-D) entries only.
    activation : {"relu", "gelu", "tanh", "sigmoid", "silu", "identity"}
        Applied between linear layers, not after the last.

    Returns
    -------
    RebuiltMLP
        In eval mode, with the dtype of the weights.

    Raises
    ------
    ModelError
        If the tensors are not a chain of linear layers, or the activation is unknown.
    """
    if activation not in ACTIVATIONS:
        raise ModelError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    if not tensors:
        raise ModelError("cannot rebuild an MLP from an empty state dict")
    params = _linear_params(tensors)
    shapes = {layer: _linear_shape(layer, p) for layer, p in params.items()}
    layers = [(layer, _linear(params[layer], shapes[layer])) for layer in _chain(shapes)]
    return RebuiltMLP(layers, activation).eval()


def _linear_params(
    tensors: Mapping[str, np.ndarray | torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """``layer -> {"weight": ..., "bias": ...}``, wrapper prefix stripped; other roles refused."""
    prefix = common_wrapper_prefix(tensors)
    params: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        layer, role = split_param_name(name, prefix)
        if role not in ("weight", "bias"):
            raise ModelError(
                f"cannot rebuild an MLP: tensor {name!r} is neither a weight nor a bias; "
                "pass a model factory for architectures other than a plain linear chain"
            )
        params.setdefault(layer, {})[role] = to_tensor(value)
    return params


def _linear_shape(layer: str, p: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(out, in)`` of a linear layer, after checking its weight is 2-D and its bias fits."""
    weight, bias = p.get("weight"), p.get("bias")
    if weight is None or weight.dim() != 2:
        raise ModelError(
            f"cannot rebuild an MLP: layer {layer!r} has "
            + (
                "no weight"
                if weight is None
                else f"a {weight.dim()}-D weight {tuple(weight.shape)}"
            )
            + "; only 2-D linear weights chain into an MLP (use a model factory)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ModelError(
            f"cannot rebuild an MLP: layer {layer!r} has bias {tuple(bias.shape)} for "
            f"weight {tuple(weight.shape)}"
        )
    return (int(weight.shape[0]), int(weight.shape[1]))


def _chain(shapes: dict[str, tuple[int, int]]) -> list[str]:
    """The layers in natural name order if it chains, else the unique chain by shapes."""
    order = sorted(shapes, key=_natural_key)
    if any(shapes[a][0] != shapes[b][1] for a, b in zip(order, order[1:], strict=False)):
        order = _chain_by_shapes(shapes)
        if order is None:
            raise ModelError(
                "cannot rebuild an MLP: the linear layers do not form one chain "
                f"(layer -> (out, in): {shapes}); pass a model factory instead"
            )
    return order


def _linear(p: dict[str, torch.Tensor], shape: tuple[int, int]) -> nn.Linear:
    """An ``nn.Linear`` holding the layer's weight (and bias)."""
    weight, bias = p["weight"], p.get("bias")
    linear = nn.Linear(shape[1], shape[0], bias=bias is not None)
    # Capture computes in float32 or float64; half-precision weights are widened.
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    linear = linear.to(dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
