"""Capture: run the probe set through one checkpoint's model, record ``h`` and ``g``.

For every selected layer ``z = W h (+ b)`` and every sample, capture records
the layer input ``h_i`` and ``g_i = W^T dL/dz_i``: the gradient of the
probe-set loss with respect to ``h_i`` through this layer only (MATH.md).
``L`` is the full probe-set loss with the training's reduction: with
``"mean"`` each batch contributes its summed losses divided by the probe
set's element count, so the recorded gradients do not depend on the batch
size.

Sink contract
-------------
``sink(layer_name, sample_start, h, g)`` is called once per batch per layer,
batches in order and, within a batch, layers in selection order. ``h`` and
``g`` are C-contiguous NumPy arrays ``(n, d_in)`` of the requested dtype;
``sample_start`` is the index of the first row on the layer's flattened
sample axis. A layer with ``P`` samples per probe example (positions of a
convolution's output grid, tokens of a sequence; ``P = 1`` for a plain
linear layer or with ``pool``) has ``N * P`` samples, example-major: row
``i * P + p`` is example ``i``, position ``p``. :func:`sample_counts` gives
every layer's ``(N * P, d_in)`` before capture, to pre-declare storage.

AGOP
----
With ``capture_agop`` each layer also gets its AGOP ``(1/n) sum_i J_i^T J_i``
over its ``n`` samples, with ``J_i = d f(x_i) / d h_i`` the Jacobian of the
network output ``f`` through this layer (``J_i^T = W^T df/dz_i``): exact (one
backward per output) for at most 16 outputs, else an unbiased Rademacher
estimate.

Memory stays at one model plus one batch: nothing is accumulated except the
loss and, when asked, the ``(d_in, d_in)`` AGOP matrices.

Capture runs where the model's parameters are (the CPU, or a GPU the model
was moved to): each batch follows them there, and the arrays handed to the
sink come back to the CPU with the same dtypes either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gramlin_analyze.capture.agop import accumulate_agop, agop_sums
from gramlin_analyze.capture.hooks import EagerRunner
from gramlin_analyze.capture.layers import POOLS, CaptureLayer, pool_samples
from gramlin_analyze.capture.losses import LossFunction, resolve_loss
from gramlin_analyze.capture.probe import ProbeSet
from gramlin_analyze.capture.script import ScriptRunner
from gramlin_analyze.errors import ModelError, ProbeError, UsageError

__all__ = ["CaptureResult", "Sink", "capture_step", "capture_layers", "sample_counts"]

Sink = Callable[[str, int, np.ndarray, np.ndarray], None]

Runner = EagerRunner | ScriptRunner


@dataclass
class CaptureResult:
    """What one capture pass produced besides the sink's arrays.

    Attributes
    ----------
    loss : float
        The full probe-set loss with the training reduction.
    reduction : str
        ``"mean"`` or ``"sum"``.
    layers : list of CaptureLayer
        The captured layers, in sink order.
    n_samples : dict of str to int
        Rows written per layer.
    d_in : dict of str to int
        Columns of ``h`` and ``g`` per layer.
    dtype : numpy.dtype
        dtype of the arrays passed to the sink.
    model_dtype : str
        ``"float32"`` or ``"float64"``, the precision capture ran in.
    agop : dict of str to numpy.ndarray or None
        ``(d_in, d_in)`` float64 AGOP per layer, when asked for.
    agop_method : str or None
        ``"exact"`` or ``"rademacher:<k>"``.
    pool : str or None
        The pooling applied to multi-position layers.
    """

    loss: float
    reduction: str
    layers: list[CaptureLayer]
    n_samples: dict[str, int]
    d_in: dict[str, int]
    dtype: np.dtype
    model_dtype: str
    agop: dict[str, np.ndarray] | None = None
    agop_method: str | None = None
    pool: str | None = None


def _make_runner(
    model: nn.Module, layers: Sequence[str] | None, extra_layers: Sequence[str]
) -> Runner:
    if layers is not None and isinstance(layers, str):
        raise UsageError(f"layers must be a list of globs, got the string {layers!r}")
    if isinstance(model, torch.jit.ScriptModule):
        return ScriptRunner(model, layers, tuple(extra_layers))
    if not isinstance(model, nn.Module):
        raise ModelError(f"capture needs a torch.nn.Module, got a {type(model).__name__}")
    return EagerRunner(model, layers, tuple(extra_layers))


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            if p.dtype not in (torch.float32, torch.float64):
                raise ModelError(
                    f"model parameters are {p.dtype}; capture runs in float32 or float64: "
                    "convert the model with model.float() (or .double()) first"
                )
            return p.dtype
    raise ModelError("model has no floating-point parameters to capture")


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are: its batches go there."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _inputs(
    probe: ProbeSet, start: int, stop: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(probe.inputs[start:stop]))
    return x.to(device, dtype) if x.is_floating_point() else x.to(device, torch.long)


def _targets(
    probe: ProbeSet, start: int, stop: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if probe.labels is not None:
        return torch.from_numpy(np.ascontiguousarray(probe.labels[start:stop])).to(
            device, torch.long
        )
    return torch.from_numpy(np.ascontiguousarray(probe.targets[start:stop])).to(device, dtype)


def _first_forward(runner: Runner, x: torch.Tensor) -> torch.Tensor:
    """Run the first batch, turning a shape error into a message about the probe."""
    try:
        return runner.forward(x, verify=True)
    except RuntimeError as err:
        first = runner.layers[0]
        expects = (
            f"in_features={first.d_in}"
            if first.kind == "linear"
            else f"in_channels={first.weight_shape[1]}"
        )
        raise ProbeError(
            f"the model rejected probe inputs of shape {tuple(x.shape)} (per sample "
            f"{tuple(x.shape[1:])}, dtype {x.dtype}): {str(err).splitlines()[0]}; its first "
            f"captured layer {first.name!r} expects {expects} -- give a probe set whose inputs "
            "have the shape the model was trained on"
        ) from err


def capture_layers(
    model: nn.Module,
    *,
    layers: Sequence[str] | None = None,
    extra_layers: Sequence[str] = (),
) -> list[CaptureLayer]:
    """The layers capture would record, without running the model.

    Parameters
    ----------
    model : torch.nn.Module or torch.jit.ScriptModule
    layers : sequence of str, optional
        Globs selecting among the Linear/Conv1d/Conv2d layers and the extra layers (default: all of them).
    extra_layers : sequence of str
        Globs adding other modules with a 2-D ``weight`` computing ``h @ W.T + b``.

    Returns
    -------
    list of CaptureLayer

    Raises
    ------
    UsageError
        If a glob matches no layer (the message lists the available ones).
    """
    return list(_make_runner(model, layers, extra_layers).layers)


def sample_counts(
    model: nn.Module,
    probe: ProbeSet,
    *,
    layers: Sequence[str] | None = None,
    extra_layers: Sequence[str] = (),
    pool: str | None = None,
) -> dict[str, tuple[int, int]]:
    """Rows and columns each layer's ``h``/``g`` will have, from one probe example.

    Parameters
    ----------
    model : torch.nn.Module or torch.jit.ScriptModule
    probe : ProbeSet
    layers, extra_layers : sequence of str
        As for :func:`capture_step`.
    pool : {None, "mean", "last"}
        As for :func:`capture_step`.

    Returns
    -------
    dict of str to (int, int)
        ``layer -> (n_samples, d_in)``, in capture order.
    """
    _check_pool(pool)
    runner = _make_runner(model, layers, extra_layers)
    dtype = _model_dtype(model)
    with _eval_mode(model):
        with runner, torch.no_grad():
            _first_forward(runner, _inputs(probe, 0, 1, dtype, _model_device(model)))
        counts = {}
        for layer in runner.layers:
            per_example = 1 if pool else runner.h[layer.name].shape[0]
            counts[layer.name] = (probe.n_samples * per_example, layer.d_in)
        return counts


def _check_pool(pool: str | None) -> None:
    if pool not in POOLS:
        raise UsageError(f"unknown pool {pool!r}; choose None, 'mean' or 'last'")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for a pass, in its own mode again after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def capture_step(
    model: nn.Module,
    probe: ProbeSet,
    *,
    loss: LossFunction | str,
    sink: Sink | None,
    layers: Sequence[str] | None = None,
    extra_layers: Sequence[str] = (),
    batch_size: int = 256,
    dtype: np.dtype | type = np.float32,
    pool: str | None = None,
    step: int | None = None,
    capture_agop: bool = False,
    agop_projections: int = 64,
    agop_seed: int = 0,
) -> CaptureResult:
    """Run the probe set through ``model`` and hand each layer's ``h`` and ``g`` to ``sink``.

    Parameters
    ----------
    model : torch.nn.Module or torch.jit.ScriptModule
        The checkpoint's model with its weights loaded. It runs in eval mode
        (restored afterwards) in its own precision, float32 or float64.
    probe : ProbeSet
        Probe inputs with labels or targets.
    loss : LossFunction or str
        The training loss (a name is resolved with ``reduction="mean"``).
    sink : callable or None
        ``sink(layer_name, sample_start, h, g)``; see the module docstring.
        None records nothing (e.g. for AGOP or the loss alone).
    layers, extra_layers : sequence of str
        As for :func:`capture_layers`; extra layers are checked on the first batch.
    batch_size : int, default 256
        Probe examples per forward pass.
    dtype : numpy dtype, default float32
        dtype of the arrays handed to the sink.
    pool : {None, "mean", "last"}
        Reduce the positions of a convolution or sequence layer to one
        sample per example, applying the same map to ``h`` and ``g``.
    step : int, optional
        The checkpoint's step, named in error messages.
    capture_agop : bool, default False
        Also compute each layer's AGOP (see the module docstring).
    agop_projections, agop_seed : int, default 64 and 0
        Projections of the AGOP estimate (more than 16 outputs), and their seed.

    Returns
    -------
    CaptureResult

    Raises
    ------
    ProbeError
        If the probe inputs do not fit the model.
    ModelError
        If the loss is NaN or infinite, or the model cannot be captured.
    UsageError
        If a layer glob matches nothing (the message lists the layers).
    """
    plan = _plan_pass(
        model,
        loss=loss,
        layers=layers,
        extra_layers=extra_layers,
        batch_size=batch_size,
        dtype=dtype,
        pool=pool,
        step=step,
        agop_projections=agop_projections if capture_agop else None,
        agop_seed=agop_seed,
    )
    with _eval_mode(model), plan.runner, torch.enable_grad():
        totals = _run_batches(plan, probe, sink)
    return _result(plan, totals)


@dataclass(frozen=True, slots=True)
class _Pass:
    """One capture pass's settings, checked and resolved before the first batch."""

    runner: Runner
    loss_fn: LossFunction
    out_dtype: np.dtype
    model_dtype: torch.dtype
    device: torch.device
    batch_size: int
    pool: str | None
    step: int | None
    #: None: no AGOP
    agop_projections: int | None
    generator: torch.Generator


@dataclass(frozen=True, slots=True)
class _Totals:
    """What a pass accumulated over its batches."""

    loss: float
    #: rows handed over per layer
    starts: dict[str, int]
    #: summed ``J^T J`` per layer (empty without AGOP)
    agop: dict[str, torch.Tensor]
    agop_method: str | None


def _plan_pass(
    model: nn.Module,
    *,
    loss: LossFunction | str,
    layers: Sequence[str] | None,
    extra_layers: Sequence[str],
    batch_size: int,
    dtype: np.dtype | type,
    pool: str | None,
    step: int | None,
    agop_projections: int | None,
    agop_seed: int,
) -> _Pass:
    """Check the options and resolve the loss, the layers and the dtypes: errors before any batch."""
    _check_pool(pool)
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    if agop_projections is not None and agop_projections < 1:
        raise UsageError(f"agop_projections must be positive, got {agop_projections}")
    loss_fn = resolve_loss(loss) if isinstance(loss, str) else loss
    out_dtype = np.dtype(dtype)
    runner = _make_runner(model, layers, extra_layers)
    return _Pass(
        runner=runner,
        loss_fn=loss_fn,
        out_dtype=out_dtype,
        model_dtype=_model_dtype(model),
        device=_model_device(model),
        batch_size=batch_size,
        pool=pool,
        step=step,
        agop_projections=agop_projections,
        generator=torch.Generator().manual_seed(agop_seed),
    )


def _run_batches(plan: _Pass, probe: ProbeSet, sink: Sink | None) -> _Totals:
    """Forward, loss and backward per batch; hand each layer's rows to the sink."""
    runner, n_total = plan.runner, probe.n_samples
    starts = {layer.name: 0 for layer in runner.layers}
    projections = plan.agop_projections
    agop = agop_sums(runner.layers, plan.device) if projections is not None else {}
    total_loss, agop_method = 0.0, None
    for start in range(0, n_total, plan.batch_size):
        stop = min(start + plan.batch_size, n_total)
        out, term = _batch_loss(plan, probe, start, stop)
        total_loss += float(term.detach())
        gs = runner.input_grads(term, retain_graph=projections is not None)
        _hand_over(plan, sink, starts, gs, stop - start)
        if projections is not None:
            agop_method = accumulate_agop(
                runner, out, agop, stop - start, plan.pool, projections, plan.generator
            )
    return _Totals(loss=total_loss, starts=starts, agop=agop, agop_method=agop_method)


def _batch_loss(
    plan: _Pass, probe: ProbeSet, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs on probe samples ``start:stop`` and their term of the loss."""
    x = _inputs(probe, start, stop, plan.model_dtype, plan.device)
    out = _first_forward(plan.runner, x) if start == 0 else plan.runner.forward(x)
    targets = _targets(probe, start, stop, plan.model_dtype, plan.device)
    term = plan.loss_fn.batch_term(out, targets, probe.n_samples)
    if not torch.isfinite(term):
        where = f" at step {plan.step}" if plan.step is not None else ""
        raise ModelError(
            f"the {plan.loss_fn.name} loss is {term.item()}{where} on probe samples "
            f"{start}..{stop - 1}; the checkpoint's weights or outputs are not finite "
            "(a diverged run?): leave this step out or check the loss and targets"
        )
    return out, term


def _hand_over(
    plan: _Pass,
    sink: Sink | None,
    starts: dict[str, int],
    gs: dict[str, torch.Tensor],
    n_ex: int,
) -> None:
    """Pool one batch's ``h`` and ``g`` rows, pass them to the sink, advance ``starts``."""
    for layer in plan.runner.layers:
        h = pool_samples(plan.runner.h[layer.name], n_ex, plan.pool)
        g = pool_samples(gs[layer.name], n_ex, plan.pool)
        if sink is not None:
            sink(
                layer.name,
                starts[layer.name],
                np.ascontiguousarray(h.cpu().numpy(), dtype=plan.out_dtype),
                np.ascontiguousarray(g.cpu().numpy(), dtype=plan.out_dtype),
            )
        starts[layer.name] += h.shape[0]


def _result(plan: _Pass, totals: _Totals) -> CaptureResult:
    """The pass's result; AGOP sums become means over each layer's samples."""
    runner, starts = plan.runner, totals.starts
    return CaptureResult(
        loss=totals.loss,
        reduction=plan.loss_fn.reduction,
        layers=list(runner.layers),
        n_samples=dict(starts),
        d_in={layer.name: layer.d_in for layer in runner.layers},
        dtype=plan.out_dtype,
        model_dtype=str(plan.model_dtype).removeprefix("torch."),
        agop={k: (v / max(starts[k], 1)).cpu().numpy() for k, v in totals.agop.items()}
        if plan.agop_projections is not None
        else None,
        agop_method=totals.agop_method,
        pool=plan.pool,
    )
