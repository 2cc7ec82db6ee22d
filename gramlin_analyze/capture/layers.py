"""Which layers capture sees, their names, and how their inputs become samples.

A captured layer computes ``z = W h (+ b)``. For ``nn.Linear`` each row of
the input's last axis is a sample (tokens of a ``(batch, seq, d)`` input are
one sample each). For ``nn.Conv1d``/``nn.Conv2d`` each (example, output
position) is a sample whose ``h`` is the unfolded input patch (length
``C_in * prod(kernel)``, channel-major, as ``weight.reshape(C_out, -1)``
orders its columns). Samples of one batch are ordered example-major, then
position (row-major over the output grid).

Hugging Face ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) computes
``h @ weight + bias`` with ``weight`` of shape ``(in, out)``: it is a linear
layer whose ``W`` is ``weight.T``, captured like ``nn.Linear``.

Layer names follow :mod:`gramlin_analyze.io.names`: the module path after
stripping the wrapper prefix shared by every state-dict key, i.e. the same
name the store gives the layer's weight ``<layer>.weight``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gramlin_analyze.errors import ModelError, UsageError
from gramlin_analyze.io.names import common_wrapper_prefix, split_param_name

__all__ = [
    "CaptureLayer",
    "ConvGeometry",
    "DEFAULT_LAYER_TYPES",
    "effective_weight",
    "is_hf_conv1d",
    "patches",
    "pool_samples",
]

#: Module types captured when no layer globs are given.
DEFAULT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)

POOLS = (None, "mean", "last")


def is_hf_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D``: ``z = h @ weight + bias`` with ``weight`` of shape ``(in, out)``.

    Duck-typed (class name, ``nf``, weight shape) so that transformers is never imported.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The module's ``W`` as ``(out, in)`` (a ``Conv1D`` weight transposed), not detached."""
    return module.weight.t() if is_hf_conv1d(module) else module.weight


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution turns its input into patches.

    ``pre_pad`` (in ``F.pad`` order) with ``pad_mode`` is applied first
    (non-zero padding modes and string paddings); ``padding`` is the
    symmetric zero padding of the convolution itself.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    pre_pad: tuple[int, ...] = ()
    pad_mode: str = "constant"


@dataclass(frozen=True)
class CaptureLayer:
    """A layer capture records.

    Attributes
    ----------
    name : str
        Layer name, equal to the store's (``"encoder.fc1"``).
    module_name : str
        The module's path in the model as given (wrapper prefixes kept).
    kind : str
        ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
    weight_shape : tuple of int
        The effective weight's shape, ``(out, in)`` or ``(C_out, C_in, *kernel)``
        (a Hugging Face ``Conv1D``'s ``(in, out)`` weight transposed).
    conv : ConvGeometry or None
        Patch geometry of a convolution.
    transposed : bool
        The module stores ``W.T`` (Hugging Face ``Conv1D``).
    """

    name: str
    module_name: str
    kind: str
    weight_shape: tuple[int, ...]
    conv: ConvGeometry | None = None
    transposed: bool = False

    @property
    def d_in(self) -> int:
        """Length of one sample's ``h`` (columns of ``W`` reshaped to 2-D)."""
        d = 1
        for s in self.weight_shape[1:]:
            d *= int(s)
        return d

    @property
    def d_out(self) -> int:
        """Rows of ``W``."""
        return int(self.weight_shape[0])

    @property
    def param_name(self) -> str:
        """The weight's parameter name in the model (``<module_name>.weight``)."""
        return f"{self.module_name}.weight" if self.module_name else "weight"

    @property
    def store_kind(self) -> str:
        """``"linear"`` or ``"conv"``, the store's ``kind`` attribute."""
        return "conv" if self.kind.startswith("conv") else "linear"


def _pair(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def conv_geometry(module: nn.Conv1d | nn.Conv2d, name: str) -> ConvGeometry:
    """Patch geometry of an eager ``Conv1d``/``Conv2d``; grouped convolutions are refused."""
    if module.groups != 1:
        raise ModelError(
            f"layer {name!r} is a grouped convolution (groups={module.groups}); capture "
            "supports groups=1 only: leave it out with a layer glob list that excludes it"
        )
    n = len(module.kernel_size)
    pre_pad: tuple[int, ...] = ()
    pad_mode = "constant"
    padding: tuple[int, ...] = (0,) * n
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        if module.padding != "valid":
            pre_pad = tuple(module._reversed_padding_repeated_twice)
        if module.padding_mode != "zeros":
            pad_mode = module.padding_mode
    else:
        padding = _pair(module.padding, n)
    return ConvGeometry(
        kernel_size=_pair(module.kernel_size, n),
        stride=_pair(module.stride, n),
        padding=padding,
        dilation=_pair(module.dilation, n),
        pre_pad=pre_pad,
        pad_mode=pad_mode,
    )


def patches(x: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Unfold a convolution's input into one row per (example, output position).

    Parameters
    ----------
    x : torch.Tensor
        ``(n, C_in, L)`` or ``(n, C_in, H, W)``.
    geom : ConvGeometry

    Returns
    -------
    torch.Tensor
        ``(n * positions, C_in * prod(kernel))``.
    """
    if geom.pre_pad:
        x = F.pad(x, geom.pre_pad, mode=geom.pad_mode)
    if len(geom.kernel_size) == 1:
        x = x.unsqueeze(2)
        kernel = (1, *geom.kernel_size)
        stride, padding, dilation = (1, *geom.stride), (0, *geom.padding), (1, *geom.dilation)
    else:
        kernel, stride, padding, dilation = (
            geom.kernel_size,
            geom.stride,
            geom.padding,
            geom.dilation,
        )
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_rows(z: torch.Tensor, layer: CaptureLayer) -> torch.Tensor:
    """A layer output (or its gradient) as one row per sample, ``(samples, d_out)``."""
    if layer.conv is not None:
        return z.flatten(2).transpose(1, 2).reshape(-1, z.shape[1])
    return z.reshape(-1, z.shape[-1])


def pool_samples(rows: torch.Tensor, n_examples: int, pool: str | None) -> torch.Tensor:
    """Pool a batch's per-position rows to one row per example.

    The same linear map is applied to ``h`` and ``g`` (mean or last
    position), so the virtual update ``h - gamma g`` of every position pools
    to the virtual update of the pooled row.
    """
    if pool is None:
        return rows
    per = rows.reshape(n_examples, -1, rows.shape[-1])
    return per.mean(dim=1) if pool == "mean" else per[:, -1]


def wrapper_prefix(model: nn.Module) -> str:
    """The wrapper prefix shared by every state-dict key of ``model``."""
    return common_wrapper_prefix(model.state_dict().keys())


def layer_name(module_name: str, prefix: str) -> str:
    """The store's layer name of the module ``module_name``."""
    param = f"{module_name}.weight" if module_name else "weight"
    return split_param_name(param, prefix)[0]


def match_globs(
    available: Iterable[str], globs: Iterable[str], *, what: str, hint: str = ""
) -> list[str]:
    """Names in ``available`` matched by any glob, in ``available`` order.

    Raises
    ------
    UsageError
        If some glob matches nothing; names the globs and lists the available names.
    """
    available = list(available)
    globs = list(globs)
    unmatched = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in available)]
    if unmatched:
        raise UsageError(
            f"{what} glob(s) {unmatched} match no layer; available: {available or 'none'}" + hint
        )
    return [n for n in available if any(fnmatch.fnmatchcase(n, g) for g in globs)]


def _linear_like(module: nn.Module) -> bool:
    """Captured without being named: ``nn.Linear``, ``Conv1d``/``Conv2d``, HF ``Conv1D``."""
    return isinstance(module, DEFAULT_LAYER_TYPES) or is_hf_conv1d(module)


def eager_layers(
    model: nn.Module, layers: Sequence[str] | None, extra_layers: Sequence[str]
) -> tuple[list[CaptureLayer], dict[str, nn.Module]]:
    """The selected layers of an eager model, and their modules by layer name.

    ``extra_layers`` globs add modules other than ``nn.Linear``/``nn.Conv1d``/
    ``nn.Conv2d``/HF ``Conv1D`` that hold a 2-D ``weight`` and compute
    ``h @ W.T + b`` (verified on the first batch); ``layers`` globs then select
    among all of these (every one when None). An extra glob that also matches
    standard layers (``transformer.h.*``) adds the others it matches.
    """
    prefix = wrapper_prefix(model)
    standard: dict[str, tuple[str, nn.Module]] = {}
    other: dict[str, tuple[str, nn.Module]] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if _linear_like(module):
            standard[layer_name(module_name, prefix)] = (module_name, module)
        elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
            other[layer_name(module_name, prefix)] = (module_name, module)
    hint = " (modules with a 2-D weight that are not Linear/Conv)"
    extra = []
    if extra_layers:
        match_globs({**standard, **other}, extra_layers, what="extra layer", hint=hint)
        extra = [n for n in other if any(fnmatch.fnmatchcase(n, g) for g in extra_layers)]
    candidates = [*standard, *extra]
    chosen = (
        candidates
        if layers is None
        else match_globs(
            candidates,
            layers,
            what="layer",
            hint=" (Linear, Conv1d, Conv2d, Hugging Face Conv1D and extra layers)",
        )
    )
    if not chosen:
        raise UsageError(
            f"model {type(model).__name__} has no Linear, Conv1d or Conv2d layer to capture; "
            "name other linear modules with extra_layers"
        )
    out, modules = [], {}
    for name in chosen:
        module_name, module = standard.get(name) or other[name]
        out.append(_capture_layer(name, module_name, module, extra=name in other))
        modules[name] = module
    return out, modules


def _capture_layer(name: str, module_name: str, module: nn.Module, *, extra: bool) -> CaptureLayer:
    """The :class:`CaptureLayer` of one selected module."""
    weight_shape = tuple(int(s) for s in effective_weight(module).shape)
    if is_hf_conv1d(module):
        return CaptureLayer(name, module_name, "linear", weight_shape, transposed=True)
    if isinstance(module, nn.Linear) or extra:
        return CaptureLayer(name, module_name, "linear", weight_shape)
    kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
    return CaptureLayer(name, module_name, kind, weight_shape, conv_geometry(module, name))
