"""Training losses for capture, with the reduction the training used.

``reduction="mean"`` follows PyTorch: the mean over every loss element of the
whole probe set (samples for cross-entropy on ``(n, C)`` outputs; samples
times outputs for MSE and BCE; samples times positions for token outputs).
Capture runs the probe set in batches, so it sums each batch's elementwise
losses and divides by the probe set's element count, which makes every
gradient equal to that of the full-probe-set loss.

Built-ins (outputs are the network's raw outputs, logits for classification):

- ``cross_entropy``: ``labels`` are class indices; outputs ``(n, C)`` or
  ``(n, ..., C)`` with labels ``(n, ...)``; float ``targets`` are class
  probabilities of the outputs' shape.
- ``mse``: ``labels`` become one-hot rows over the outputs' last axis;
  ``targets`` must have the outputs' shape (``(n,)`` for ``(n, 1)`` outputs).
- ``bce``: binary cross-entropy on logits; labels become one-hot rows when
  the outputs have more than one column, else 0/1 values.

A custom loss ``"pkg.module:fn"`` is called as ``fn(outputs, y,
reduction="none")`` and must return elementwise losses whose leading axis is
the batch (the convention of ``torch.nn.functional``; e.g.
``"torch.nn.functional:huber_loss"`` works).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from gramlin_analyze.capture.outputs import model_outputs
from gramlin_analyze.errors import ModelError, ProbeError, UsageError

if TYPE_CHECKING:
    from gramlin_analyze.capture.probe import ProbeSet

__all__ = ["LossFunction", "resolve_loss", "check_loss", "BUILTIN_LOSSES", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")

ElementwiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _class_axis_last(outputs: torch.Tensor) -> torch.Tensor:
    # F.cross_entropy wants classes on axis 1; models emit them last.
    return outputs.movedim(-1, 1) if outputs.dim() > 2 else outputs


def _cross_entropy(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.is_floating_point():
        if y.shape != outputs.shape:
            raise ProbeError(
                f"cross_entropy with float targets needs class probabilities of the outputs' "
                f"shape {tuple(outputs.shape)}, got {tuple(y.shape)}; store class indices as "
                "integer 'labels' instead"
            )
        return F.cross_entropy(_class_axis_last(outputs), _class_axis_last(y), reduction="none")
    if y.shape != outputs.shape[:-1]:
        raise ProbeError(
            f"cross_entropy needs labels of shape {tuple(outputs.shape[:-1])} for outputs "
            f"{tuple(outputs.shape)}, got {tuple(y.shape)}"
        )
    n_classes = outputs.shape[-1]
    if y.numel() and int(y.max()) >= n_classes:
        raise ProbeError(
            f"labels go up to {int(y.max())} but the model has {n_classes} outputs; "
            "labels must be class indices 0..C-1 for this model"
        )
    return F.cross_entropy(_class_axis_last(outputs), y, reduction="none")


def _dense_targets(outputs: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    if not y.is_floating_point():
        n_classes = outputs.shape[-1]
        if n_classes == 1 and y.shape == outputs.shape[:-1] and name == "bce":
            return y.to(outputs.dtype).unsqueeze(-1)
        if y.shape != outputs.shape[:-1]:
            raise ProbeError(
                f"{name} with class labels needs labels of shape {tuple(outputs.shape[:-1])} "
                f"for outputs {tuple(outputs.shape)}, got {tuple(y.shape)}"
            )
        if y.numel() and int(y.max()) >= n_classes:
            raise ProbeError(
                f"labels go up to {int(y.max())} but the model has {n_classes} outputs; "
                "labels must be class indices 0..C-1 for this model"
            )
        return F.one_hot(y, n_classes).to(outputs.dtype)
    y = y.to(outputs.dtype)
    if y.shape != outputs.shape and y.numel() == outputs.numel() and y.shape[0] == outputs.shape[0]:
        y = y.reshape(outputs.shape)
    if y.shape != outputs.shape:
        raise ProbeError(
            f"{name} needs targets of the outputs' shape {tuple(outputs.shape)}, "
            f"got {tuple(y.shape)}"
        )
    return y


def _mse(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs, _dense_targets(outputs, y, "mse"), reduction="none")


def _bce(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(
        outputs, _dense_targets(outputs, y, "bce"), reduction="none"
    )


BUILTIN_LOSSES: dict[str, ElementwiseFn] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
    "bce": _bce,
}


@dataclass(frozen=True)
class LossFunction:
    """A training loss with its reduction.

    Attributes
    ----------
    name : str
        ``"cross_entropy"``, ``"mse"``, ``"bce"`` or the custom spec.
    reduction : str
        ``"mean"`` or ``"sum"``.
    elementwise : callable
        ``(outputs, y) -> tensor`` of unreduced losses, leading axis the batch.
    """

    name: str
    reduction: str
    elementwise: ElementwiseFn

    def _terms(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        terms = self.elementwise(outputs, y)
        if not isinstance(terms, torch.Tensor) or terms.dim() == 0:
            raise ModelError(
                f"loss {self.name!r} returned a {'scalar' if isinstance(terms, torch.Tensor) else type(terms).__name__}"
                " when called with reduction='none'; it must return one loss per element "
                "with the batch as leading axis"
            )
        if terms.shape[0] != outputs.shape[0]:
            raise ModelError(
                f"loss {self.name!r} returned shape {tuple(terms.shape)} for a batch of "
                f"{outputs.shape[0]}; the leading axis must be the batch"
            )
        return terms

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one set of outputs with this reduction (a scalar)."""
        terms = self._terms(outputs, y)
        return terms.mean() if self.reduction == "mean" else terms.sum()

    def batch_term(self, outputs: torch.Tensor, y: torch.Tensor, n_total: int) -> torch.Tensor:
        """This batch's share of the loss over ``n_total`` probe samples.

        Summing the shares of all batches gives the full-probe-set loss with
        this reduction, and so do the gradients.

        Parameters
        ----------
        outputs : torch.Tensor
            The batch's outputs.
        y : torch.Tensor
            The batch's labels or targets.
        n_total : int
            Number of samples in the whole probe set.

        Returns
        -------
        torch.Tensor
            A scalar.
        """
        terms = self._terms(outputs, y)
        if self.reduction == "sum":
            return terms.sum()
        per_sample = terms[0].numel()
        return terms.sum() / (n_total * per_sample)


def _import_loss(spec: str) -> Callable[..., torch.Tensor]:
    module_name, _, attr = spec.rpartition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise UsageError(
            f"loss {spec!r} could not be imported ({type(err).__name__}: {err}); "
            f"use one of {sorted(BUILTIN_LOSSES)} or 'pkg.module:function'"
        ) from err
    if not callable(fn):
        raise UsageError(f"loss {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def resolve_loss(name: str, *, reduction: str = "mean") -> LossFunction:
    """The loss named ``name`` with the training's reduction.

    Parameters
    ----------
    name : str
        ``"cross_entropy"``, ``"mse"``, ``"bce"``, or ``"pkg.module:fn"`` (a
        function accepting ``reduction="none"`` and returning elementwise losses).
    reduction : {"mean", "sum"}, default "mean"
        The reduction used in training.

    Returns
    -------
    LossFunction
        Callable as ``loss(outputs, labels_or_targets) -> scalar``.

    Raises
    ------
    UsageError
        For an unknown name or reduction, or an import failure.
    """
    if reduction not in REDUCTIONS:
        raise UsageError(f"unknown loss reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    if name in BUILTIN_LOSSES:
        return LossFunction(name=name, reduction=reduction, elementwise=BUILTIN_LOSSES[name])
    if ":" not in name:
        raise UsageError(
            f"unknown loss {name!r}; use one of {sorted(BUILTIN_LOSSES)} or 'pkg.module:function'"
        )
    fn = _import_loss(name)

    def elementwise(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            return fn(outputs, y, reduction="none")
        except TypeError as err:
            raise ModelError(
                f"custom loss {name!r} failed when called as fn(outputs, y, reduction='none'): "
                f"{err}; it must accept a 'reduction' keyword like torch.nn.functional losses"
            ) from err

    return LossFunction(name=name, reduction=reduction, elementwise=elementwise)


def _bounding_samples(probe: ProbeSet) -> list[int]:
    """The first sample, and the one holding the largest label: enough to check labels against outputs."""
    rows = [0]
    if probe.labels is not None and probe.labels.size:
        per_sample = probe.labels.reshape(probe.n_samples, -1).max(axis=1)
        top = int(np.argmax(per_sample))
        if top:
            rows.append(top)
    return rows


def check_loss(loss: LossFunction, model: torch.nn.Module, probe: ProbeSet) -> None:
    """Run ``loss`` once through ``model`` on the probe samples that bound its labels.

    Labels beyond the model's outputs, targets of another shape, or a custom
    loss that does not follow the convention fail here, once, before a store
    records the capture setup (instead of failing every checkpoint later).

    Raises
    ------
    ProbeError
        The probe's labels or targets do not fit the model's outputs (the
        message names the probe file).
    ModelError
        The model does not return a tensor, or the loss fails otherwise.
    """
    rows = _bounding_samples(probe)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.from_numpy(np.ascontiguousarray(probe.inputs[rows]))
    x = x.to(dtype) if x.is_floating_point() else x.long()
    if probe.labels is not None:
        y = torch.from_numpy(np.ascontiguousarray(probe.labels[rows])).long()
    else:
        y = torch.from_numpy(np.ascontiguousarray(probe.targets[rows])).to(dtype)
    where = f"probe file {str(probe.path)!r}" if probe.path is not None else "the probe set"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(x)
            except RuntimeError as err:
                raise ProbeError(
                    f"{where}: the model rejected inputs of shape {tuple(x.shape)}: {str(err).splitlines()[0]}"
                ) from err
            out = model_outputs(out, model)
            try:
                loss(out, y)
            except ProbeError as err:
                raise ProbeError(f"{where}: {err}") from err
            except (ModelError, UsageError):
                raise
            except (RuntimeError, ValueError, IndexError) as err:
                raise ModelError(
                    f"loss {loss.name!r} failed on outputs {tuple(out.shape)} and {where}'s "
                    f"{'labels' if probe.labels is not None else 'targets'} {tuple(y.shape)}: "
                    f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                ) from err
    finally:
        model.train(was_training)
