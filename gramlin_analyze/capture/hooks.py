"""Recording ``h`` and ``dL/dz`` of eager PyTorch layers with hooks.

A forward hook on each selected module stores its input ``h`` (as sample
rows: unfolded patches for convolutions) and registers a tensor hook on its
output ``z`` that records the gradient arriving at ``z``. The gradient is
taken at the layer's own output, never from ``h.grad``, which with skip
connections or weight tying also holds other paths. Tensor hooks registered
on ``z`` before an in-place op (``ReLU(inplace=True)``) still receive the
gradient of ``z`` itself.

``g = W^T dL/dz`` is what backpropagation computes anyway to go on past a
plain ``nn.Linear`` (its own forward, no hooks but ours: see
``EagerRunner._plain_linear``). For such a layer a forward pre-hook hands the module an
alias of its input (``h.view_as(h)``) that nothing else uses, and a tensor
hook on the alias records its gradient: exactly the gradient through this
layer only, computed once by autograd instead of a second time as
``dz @ W``. Where backward never reaches the alias (the first layer, whose
input needs no gradient; a layer below every other selected one), ``g`` is
``dz @ W`` as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gramlin_analyze.capture.layers import eager_layers, effective_weight, output_rows, patches
from gramlin_analyze.capture.outputs import model_outputs
from gramlin_analyze.errors import ModelError

__all__ = ["EagerRunner"]


class EagerRunner:
    """Runs an eager ``nn.Module`` and records the selected layers.

    Use as a context manager: hooks are registered (and the selected layers'
    parameters made to require grad) inside, and removed on exit.

    Parameters
    ----------
    model : torch.nn.Module
    layers : sequence of str or None
        Globs selecting among Linear/Conv1d/Conv2d and extra layers (all when None).
    extra_layers : sequence of str
        Globs adding other modules with a 2-D weight computing ``h @ W.T + b``.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str] | None, extra_layers: Sequence[str]
    ) -> None:
        self.model = model
        self.layers, self._modules = eager_layers(model, layers, extra_layers)
        self._by_name = {layer.name: layer for layer in self.layers}
        self.h: dict[str, torch.Tensor] = {}
        self.z_shapes: dict[str, torch.Size] = {}
        self._dz: dict[str, torch.Tensor] = {}
        self._dh: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved_requires_grad: list[tuple[torch.nn.Parameter, bool]] = []
        self._verify = False

    def weight(self, name: str) -> torch.Tensor:
        """The layer's weight as a detached ``(d_out, d_in)`` matrix (``Conv1D``'s transposed)."""
        weight = effective_weight(self._modules[name]).detach()
        return weight.reshape(weight.shape[0], -1)

    def __enter__(self) -> EagerRunner:
        # Decided before any hook of ours is registered (the check looks for others').
        plain = {name: self._plain_linear(module) for name, module in self._modules.items()}
        for name, module in self._modules.items():
            if plain[name]:
                self._handles.append(
                    module.register_forward_pre_hook(self._make_alias_hook(name), with_kwargs=True)
                )
            self._handles.append(
                module.register_forward_hook(self._make_hook(name), with_kwargs=True)
            )
        for p in self._params():
            self._saved_requires_grad.append((p, p.requires_grad))
            p.requires_grad_(True)
        return self

    def _params(self) -> list[torch.nn.Parameter]:
        unique = {id(p): p for m in self._modules.values() for p in m.parameters()}
        return list(unique.values())

    def _grad_targets(self) -> list[torch.nn.Parameter]:
        """What the backward pass is asked for: per layer its bias, else its weight.

        Backward must reach every layer's output ``z`` (its tensor hook records
        ``dL/dz``), but the parameters' gradients are not needed. Asking for the
        bias (a sum over rows) instead of the weight spares autograd the
        ``dz^T h`` product per layer, a third of a training step's compute.
        """
        out = {}
        for m in self._modules.values():
            bias = getattr(m, "bias", None)
            # no bias parameter (or a parametrized module): its parameters, as a training step would
            for p in [bias] if isinstance(bias, torch.nn.Parameter) else m.parameters():
                out[id(p)] = p
        return list(out.values())

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad.clear()

    @staticmethod
    def _plain_linear(module: nn.Module) -> bool:
        """Whether the module's call is ``F.linear(input, weight, bias)`` and nothing
        else, so that its input's gradient through the call is ``W^T dz``.

        Not so for a subclass with its own forward (an adapter may use the
        input twice), a forward replaced on the instance (wrappers), or a
        module or process with hooks of someone else's: a forward hook may add
        a path from the input to the output, and a backward hook may change
        the input's gradient. Those layers get ``g = dz @ W``.
        """
        from torch.nn.modules import module as torch_module

        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            return False
        if "forward" in vars(module):
            return False
        own = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        # torch's hook registries; one this version of torch does not have counts as holding hooks
        if any(getattr(module, name, True) for name in own):
            return False
        return not any(getattr(torch_module, f"_global{name}", True) for name in own)

    def _make_alias_hook(self, name: str) -> Callable[[nn.Module, tuple, dict], tuple | None]:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            given = args[0] if args else kwargs.get("input")
            if not isinstance(given, torch.Tensor) or not given.requires_grad:
                return None
            alias = given.view_as(given)

            def record(grad: torch.Tensor) -> None:
                self._dh[name] = grad.detach()

            alias.register_hook(record)
            if args:
                return (alias, *args[1:]), kwargs
            return args, {**kwargs, "input": alias}

        return pre_hook

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple, dict, torch.Tensor], None]:
        layer = self._by_name[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if name in self.h:
                raise ModelError(
                    f"layer {name!r} runs more than once per forward pass (weight reuse); "
                    "its samples would be ambiguous, so leave it out of the layer selection"
                )
            given = args[0] if args else kwargs.get("input")
            if not isinstance(given, torch.Tensor):
                raise ModelError(f"layer {name!r} was called without a tensor input")
            h = given.detach()
            if layer.conv is not None:
                rows = patches(h, layer.conv)
            else:
                rows = h.reshape(-1, h.shape[-1]).clone()
            if (
                self._verify
                and layer.conv is None
                and not layer.transposed
                and not isinstance(module, nn.Linear)
            ):
                self._check_linear(name, module, h, output)
            self.h[name] = rows
            self.z_shapes[name] = output.shape
            if output.requires_grad:

                def record(grad: torch.Tensor) -> None:
                    self._dz[name] = grad.detach()

                output.register_hook(record)

        return hook

    @staticmethod
    def _check_linear(name: str, module: nn.Module, h: torch.Tensor, z: torch.Tensor) -> None:
        expected = F.linear(h, module.weight.detach(), getattr(module, "bias", None))
        tol = 1e-4 if z.dtype == torch.float32 else 1e-10
        if expected.shape != z.shape or not torch.allclose(
            expected, z.detach(), rtol=tol, atol=tol
        ):
            raise ModelError(
                f"extra layer {name!r} ({type(module).__name__}) does not compute "
                "h @ weight.T + bias; capture needs z = W h (+ b) with weight of shape "
                "(out, in) (Hugging Face Conv1D, whose weight is (in, out), is recognized "
                "by its type)"
            )

    def forward(self, x: torch.Tensor, *, verify: bool = False) -> torch.Tensor:
        """Run the model on one batch, recording ``h`` of every selected layer.

        Parameters
        ----------
        x : torch.Tensor
            The batch.
        verify : bool
            Check that extra layers compute ``h @ W.T + b``.
        """
        self.h.clear()
        self.z_shapes.clear()
        self._verify = verify
        out = model_outputs(self.model(x), self.model)
        missing = [layer.name for layer in self.layers if layer.name not in self.h]
        if missing:
            raise ModelError(
                f"layers {missing} did not run in the forward pass; leave them out of the "
                "layer selection"
            )
        return out

    def input_grads(
        self, objective: torch.Tensor, *, retain_graph: bool
    ) -> dict[str, torch.Tensor]:
        """``g = W^T d objective / dz`` of every selected layer as ``(samples, d_in)`` rows."""
        self._dz.clear()
        self._dh.clear()
        torch.autograd.grad(
            objective, self._grad_targets(), retain_graph=retain_graph, allow_unused=True
        )
        out = {}
        for layer in self.layers:
            dh = self._dh.get(layer.name)
            if dh is not None:  # autograd's own W^T dz at the alias of this layer's input
                out[layer.name] = dh.reshape(-1, dh.shape[-1])
            else:
                dz = self._dz.get(layer.name)
                if dz is None:
                    # The objective does not depend on this layer's output.
                    dz = torch.zeros(
                        self.z_shapes[layer.name], dtype=objective.dtype, device=objective.device
                    )
                out[layer.name] = output_rows(dz, layer) @ self.weight(layer.name)
        return out
