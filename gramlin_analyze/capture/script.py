"""Recording ``h`` and ``dL/dz`` inside a TorchScript module.

Script modules accept no Python hooks, so capture edits a copy of the
module's inlined graph instead: every selected ``aten::linear`` /
``aten::conv1d`` / ``aten::conv2d`` / ``aten::_convolution`` call also returns
its input ``h`` and its output ``z`` (downstream code gets a clone of ``z``,
so an in-place op after the layer cannot change the ``z`` whose gradient is
taken). The edited graph runs with the archive's own module as ``self`` and
with graph optimization off, so autograd sees ``z`` itself. A layer is named
by the module owning its ``weight`` attribute, as in the eager case. Calls
inside control flow (``if``/loops in the scripted code) cannot be returned
and are not capturable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gramlin_analyze.capture.layers import (
    CaptureLayer,
    ConvGeometry,
    layer_name,
    match_globs,
    output_rows,
    patches,
    wrapper_prefix,
)
from gramlin_analyze.errors import ModelError, UsageError

__all__ = ["ScriptRunner"]

_SITE_KINDS = ("aten::linear", "aten::conv1d", "aten::conv2d", "aten::_convolution")
_DEFAULT_OWNERS = {"Linear", "Conv1d", "Conv2d"}


def _attr_path(value: torch._C.Value) -> str | None:
    """Dotted attribute path of a value read from ``self`` by ``prim::GetAttr`` nodes."""
    parts = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        parts.append(node.s("name"))
        value = node.input()
        node = value.node()
    if node.kind() != "prim::Param" or not parts:
        return None
    return ".".join(reversed(parts))


def _constant(node: torch._C.Node, index: int, name: str) -> Any:
    value = node.inputsAt(index)
    if value.node().kind() != "prim::Constant":
        raise ModelError(
            f"layer {name!r}: the convolution's argument {index} is computed at run time; "
            "capture needs constant stride, padding and dilation"
        )
    return value.toIValue()


def _same_padding(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    # The F.pad order torch.nn.Conv uses for padding="same" (last dimension first).
    pad = [0] * (2 * len(kernel))
    for j, (k, d) in enumerate(zip(kernel, dilation, strict=True)):
        i = len(kernel) - 1 - j
        total = d * (k - 1)
        pad[2 * i] = total // 2
        pad[2 * i + 1] = total - total // 2
    return tuple(pad)


def _conv_geometry(node: torch._C.Node, weight_shape: tuple[int, ...], name: str) -> ConvGeometry:
    kernel = tuple(weight_shape[2:])
    n = len(kernel)
    if node.kind() == "aten::_convolution":
        if _constant(node, 6, name):
            raise ModelError(
                f"layer {name!r} is a transposed convolution, which capture does not support"
            )
        groups = _constant(node, 8, name)
    else:
        groups = _constant(node, 6, name)
    if groups != 1:
        raise ModelError(
            f"layer {name!r} is a grouped convolution (groups={groups}); capture supports "
            "groups=1 only: leave it out with a layer glob list that excludes it"
        )
    stride = tuple(_constant(node, 3, name))
    dilation = tuple(_constant(node, 5, name))
    padding = _constant(node, 4, name)
    stride = stride * n if len(stride) == 1 else stride
    dilation = dilation * n if len(dilation) == 1 else dilation
    if isinstance(padding, str):
        pre_pad = _same_padding(kernel, dilation) if padding == "same" else ()
        return ConvGeometry(kernel, stride, (0,) * n, dilation, pre_pad=pre_pad)
    padding = tuple(padding)
    padding = padding * n if len(padding) == 1 else padding
    return ConvGeometry(kernel, stride, padding, dilation)


def _clone_after(
    graph: torch._C.Graph, anchor: torch._C.Node, value: torch._C.Value
) -> torch._C.Value:
    none = graph.create("prim::Constant")
    none.output().setType(torch._C.NoneType.get())
    none.insertAfter(anchor)
    clone = graph.create("aten::clone")
    clone.addInput(value)
    clone.addInput(none.output())
    clone.output().setType(value.type())
    clone.insertAfter(none)
    return clone.output()


@dataclass(frozen=True, slots=True)
class _Site:
    """One linear or convolution call of the inlined graph, by the weight it reads."""

    node: torch._C.Node
    #: attribute path of the weight (``encoder.fc1.weight``)
    path: str


@dataclass(frozen=True, slots=True)
class _Sites:
    """The graph's capturable calls by layer, and the layers only called inside control flow."""

    top: dict[str, list[_Site]]
    nested: set[str]

    @property
    def hint(self) -> str:
        """The note error messages append when some layers cannot be captured."""
        if not self.nested:
            return ""
        return (
            f" ({sorted(self.nested)} run inside control flow and cannot be captured from "
            "TorchScript)"
        )


def _find_sites(graph: torch._C.Graph, prefix: str) -> _Sites:
    """Every call reading a ``weight`` of ``self``, named by the module owning that weight."""

    def site(node: torch._C.Node) -> tuple[str, str] | None:
        path = _attr_path(node.inputsAt(1))
        if path is None or path.rpartition(".")[2] != "weight":
            return None
        owner = path.rpartition(".")[0]
        return layer_name(owner, prefix), path

    top: dict[str, list[_Site]] = {}
    for node in graph.nodes():
        found = site(node) if node.kind() in _SITE_KINDS else None
        if found:
            top.setdefault(found[0], []).append(_Site(node, found[1]))
    nested = set()
    for kind in _SITE_KINDS:
        for node in graph.findAllNodes(kind, True):
            found = site(node)
            if found and found[0] not in top:
                nested.add(found[0])
    return _Sites(top, nested)


def _select(
    module: torch.jit.ScriptModule,
    sites: _Sites,
    layers: Sequence[str] | None,
    extra_layers: Sequence[str],
) -> list[str]:
    """The layers to capture: Linear/Conv owners, extra layers by glob, then the selection."""
    submodules = dict(module.named_modules())

    def owner_type(path: str) -> str:
        owner = submodules.get(path.rpartition(".")[0])
        return getattr(owner, "original_name", "")

    top, hint = sites.top, sites.hint
    standard = [n for n, found in top.items() if owner_type(found[0].path) in _DEFAULT_OWNERS]
    other = [n for n in top if n not in standard]
    extra = match_globs(other, extra_layers, what="extra layer", hint=hint) if extra_layers else []
    candidates = [*standard, *extra]
    chosen = (
        candidates if layers is None else match_globs(candidates, layers, what="layer", hint=hint)
    )
    if not chosen:
        raise UsageError(
            f"TorchScript module {module.original_name} has no linear or convolution call to "
            f"capture outside control flow{hint}"
        )
    return chosen


def _capture_layer(
    name: str, found: list[_Site], params: dict[str, torch.nn.Parameter]
) -> CaptureLayer:
    """The layer called once per forward pass at ``found``; reuse is refused."""
    if len(found) > 1:
        raise ModelError(
            f"layer {name!r} runs {len(found)} times per forward pass (weight reuse); "
            "its samples would be ambiguous, so leave it out of the layer selection"
        )
    node, path = found[0].node, found[0].path
    weight_shape = tuple(int(s) for s in params[path].shape)
    module_name = path.rpartition(".")[0]
    if node.kind() == "aten::linear":
        return CaptureLayer(name, module_name, "linear", weight_shape)
    if len(weight_shape) in (3, 4):
        kind = "conv1d" if len(weight_shape) == 3 else "conv2d"
        geom = _conv_geometry(node, weight_shape, name)
        return CaptureLayer(name, module_name, kind, weight_shape, geom)
    raise ModelError(f"layer {name!r}: only 1-D and 2-D convolutions can be captured")


def _expose(graph: torch._C.Graph, node: torch._C.Node) -> list[torch._C.Value]:
    """Make the call's ``h`` and ``z`` graph outputs; code after it gets a clone of ``z``."""
    z = node.output()
    z_downstream = _clone_after(graph, node, z)
    z.replaceAllUsesWith(z_downstream)
    z_downstream.node().replaceInput(0, z)
    return [_clone_after(graph, node, node.inputsAt(0)), z]


class ScriptRunner:
    """Runs a TorchScript module and records the selected layers.

    Same interface as :class:`gramlin_analyze.capture.hooks.EagerRunner`.
    """

    def __init__(
        self,
        module: torch.jit.ScriptModule,
        layers: Sequence[str] | None,
        extra_layers: Sequence[str],
    ) -> None:
        self.module = module
        graph = module.inlined_graph
        torch._C._jit_pass_constant_propagation(graph)
        self._params = dict(module.named_parameters())
        sites = _find_sites(graph, wrapper_prefix(module))
        self.layers: list[CaptureLayer] = []
        self._paths: dict[str, str] = {}
        extra_outputs = []
        for name in _select(module, sites, layers, extra_layers):
            found = sites.top[name]
            self.layers.append(_capture_layer(name, found, self._params))
            self._paths[name] = found[0].path
            extra_outputs += _expose(graph, found[0].node)
        for value in extra_outputs:
            graph.registerOutput(value)
        graph.makeMultiOutputIntoTuple()
        graph.lint()
        self._fn = torch._C._create_function_from_graph(f"gramlin_capture_{id(self)}", graph)
        self.h: dict[str, torch.Tensor] = {}
        self.z_shapes: dict[str, torch.Size] = {}
        self._z: dict[str, torch.Tensor] = {}
        self._saved_requires_grad: list[tuple[torch.Tensor, bool]] = []

    def weight(self, name: str) -> torch.Tensor:
        """The layer's weight as a detached ``(d_out, d_in)`` matrix."""
        weight = self._params[self._paths[name]].detach()
        return weight.reshape(weight.shape[0], -1)

    def __enter__(self) -> ScriptRunner:
        for path in self._paths.values():
            p = self._params[path]
            self._saved_requires_grad.append((p, p.requires_grad))
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc: object) -> None:
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad.clear()

    def forward(self, x: torch.Tensor, *, verify: bool = False) -> torch.Tensor:
        """Run the module on one batch, recording ``h`` and ``z`` of every selected layer.

        ``verify`` is accepted for interface parity; graph sites are linear
        or convolution calls by construction.
        """
        with torch.jit.optimized_execution(False):
            result = self._fn(self.module._c, x)
        out = result[0]
        self.h.clear()
        self._z.clear()
        self.z_shapes.clear()
        for i, layer in enumerate(self.layers):
            h, z = result[1 + 2 * i], result[2 + 2 * i]
            self.h[layer.name] = (
                patches(h.detach(), layer.conv)
                if layer.conv
                else h.detach().reshape(-1, h.shape[-1])
            )
            self._z[layer.name] = z
            self.z_shapes[layer.name] = z.shape
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"TorchScript module returned a {type(out).__name__}; capture needs a tensor "
                "of outputs"
            )
        return out

    def grads(self, objective: torch.Tensor, *, retain_graph: bool) -> dict[str, torch.Tensor]:
        """``d objective / dz`` of every selected layer as ``(samples, d_out)`` rows."""
        zs = [self._z[layer.name] for layer in self.layers]
        dzs = torch.autograd.grad(objective, zs, retain_graph=retain_graph, allow_unused=True)
        out = {}
        for layer, z, dz in zip(self.layers, zs, dzs, strict=True):
            out[layer.name] = output_rows(torch.zeros_like(z) if dz is None else dz, layer)
        return out

    def input_grads(
        self, objective: torch.Tensor, *, retain_graph: bool
    ) -> dict[str, torch.Tensor]:
        """``g = W^T d objective / dz`` of every selected layer as ``(samples, d_in)`` rows."""
        dz = self.grads(objective, retain_graph=retain_graph)
        return {layer.name: dz[layer.name] @ self.weight(layer.name) for layer in self.layers}
