"""The ``.gramlin`` accessor on xarray DataArrays and Datasets.

Importing :mod:`gramlin_analyze.reducers` registers it. On a DataArray the
methods read the array by its dims (a weight ``(..., out, in)``, features
``(..., sample, in)``, a square matrix ``(..., in_i, in_j)``); on a Dataset
laid out like a store's ``/layers/<name>`` group (variables ``weight``,
``bias``, ``input``, ``input_grad``) they pick the variables by name.
Keyword arguments are passed on to the reducer functions.

Examples
--------
>>> import numpy as np, xarray as xr
>>> import gramlin_analyze.reducers
>>> W = xr.DataArray(np.diag([3.0, 4.0]), dims=("out", "in"))
>>> W.gramlin.spectrum().values
array([16.,  9.])
"""

from __future__ import annotations

from typing import Any

import xarray as xr

from gramlin_analyze.errors import MissingDataError
from gramlin_analyze.reducers.agop import nfa_alignment
from gramlin_analyze.reducers.alignment import (
    Mode,
    cosine_similarity,
    pearson,
    vcs_interval_consistency,
)
from gramlin_analyze.reducers.cka import linear_cka
from gramlin_analyze.reducers.collapse import neural_collapse
from gramlin_analyze.reducers.fle import fle_residual
from gramlin_analyze.reducers.gram import gram, gram_change
from gramlin_analyze.reducers.spectrum import (
    effective_rank,
    frobenius_norm,
    gram_spectrum,
    spectral_norm,
    stable_rank,
)
from gramlin_analyze.reducers.surrogate import tl_surrogate
from gramlin_analyze.reducers.target_linearity import target_linearity, tl_null
from gramlin_analyze.reducers.vc import (
    accumulated_vcs,
    virtual_covariance,
    virtual_covariance_shift,
)

__all__ = ["GramlinDataArrayAccessor", "GramlinDatasetAccessor"]


@xr.register_dataarray_accessor("gramlin")
class GramlinDataArrayAccessor:
    """``da.gramlin``: the reducers applied to one DataArray.

    Examples
    --------
    >>> import xarray as xr
    >>> W = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("out", "in"))
    >>> float(W.gramlin.effective_rank())
    2.0
    >>> h = xr.DataArray([[1.0], [2.0], [3.0]], dims=("sample", "in"))
    >>> y = xr.DataArray([0.0, 1.0, 2.0], dims="sample")
    >>> round(float(h.gramlin.target_linearity(targets=y)), 6)
    0.142857
    """

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    # weights (..., out, in)
    def gram(self, **kwargs: Any) -> xr.DataArray:
        """``W^T W``; see :func:`~gramlin_analyze.reducers.gram.gram`."""
        return gram(self._obj, **kwargs)

    def spectrum(self, **kwargs: Any) -> xr.DataArray:
        """Eigenvalues of ``W^T W``, descending; see :func:`~gramlin_analyze.reducers.spectrum.gram_spectrum`."""
        return gram_spectrum(self._obj, **kwargs)

    def effective_rank(self, **kwargs: Any) -> xr.DataArray:
        """Effective rank of ``W^T W``."""
        return effective_rank(self._obj, **kwargs)

    def stable_rank(self, **kwargs: Any) -> xr.DataArray:
        """Stable rank ``||W||_F^2 / ||W||_2^2``."""
        return stable_rank(self._obj, **kwargs)

    def frobenius_norm(self, **kwargs: Any) -> xr.DataArray:
        """Frobenius norm over ``(out, in)``."""
        return frobenius_norm(self._obj, **kwargs)

    def spectral_norm(self, **kwargs: Any) -> xr.DataArray:
        """Spectral norm over ``(out, in)``."""
        return spectral_norm(self._obj, **kwargs)

    def gram_change(self, **kwargs: Any) -> xr.DataArray:
        """``W_b^T W_b - W_a^T W_a`` between consecutive steps."""
        return gram_change(self._obj, **kwargs)

    # square matrices (..., in_i, in_j)
    def accumulated_vcs(self, **kwargs: Any) -> xr.DataArray:
        """Trapezoid accumulation over steps of this VCS."""
        return accumulated_vcs(self._obj, **kwargs)

    def pearson(self, other: xr.DataArray, **kwargs: Any) -> xr.DataArray:
        """Pearson correlation with another matrix (``mode="diag"`` or ``"full"``)."""
        return pearson(self._obj, other, **kwargs)

    def cosine_similarity(self, other: xr.DataArray, **kwargs: Any) -> xr.DataArray:
        """Cosine similarity with another matrix."""
        return cosine_similarity(self._obj, other, **kwargs)

    # features (..., sample, in)
    def target_linearity(self, **kwargs: Any) -> xr.DataArray:
        """TL of these features for ``labels=`` or ``targets=``."""
        return target_linearity(self._obj, **kwargs)

    def tl_null(self, **kwargs: Any) -> xr.DataArray:
        """TL null baseline ``min(1, d/N)``."""
        return tl_null(self._obj, **kwargs)

    def linear_cka(self, other: xr.DataArray, **kwargs: Any) -> xr.DataArray:
        """Linear CKA with another feature set on the same samples."""
        return linear_cka(self._obj, other, **kwargs)

    def neural_collapse(self, labels: xr.DataArray, **kwargs: Any) -> xr.Dataset:
        """NC1-NC2 (NC3-NC4 with ``W=``) of these features."""
        return neural_collapse(self._obj, labels, **kwargs)


@xr.register_dataset_accessor("gramlin")
class GramlinDatasetAccessor:
    """``ds.gramlin``: the reducers applied to a layer group (``weight``, ``input``, ...).

    Variable names default to the store's and can be overridden per call
    (``weight=``, ``bias=``, ``input=``, ``input_grad=``). Labels, targets,
    learning rates and AGOPs are given as DataArrays or as names of
    variables of the Dataset.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({
    ...     "weight": (("out", "in"), [[1.0, 0.0], [0.0, 2.0]]),
    ...     "input": (("sample", "in"), [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    ...     "input_grad": (("sample", "in"), [[0.1, 0.0], [0.0, 0.1], [0.0, 0.0]]),
    ...     "labels": ("sample", [0, 1, 1]),
    ... })
    >>> ds.gramlin.gram().values
    array([[1., 0.],
           [0., 4.]])
    >>> ds.gramlin.virtual_covariance_shift(gamma=1.0).values
    array([[-0.19,  0.  ],
           [ 0.  , -0.19]])
    >>> round(float(ds.gramlin.target_linearity(labels="labels")), 6)
    0.777778
    """

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def _get(self, name_or_array: Any, role: str) -> Any:
        if isinstance(name_or_array, str):
            if name_or_array not in self._obj.variables:
                raise MissingDataError(
                    f"{role} needs the variable {name_or_array!r}, which this dataset does not have "
                    f"(it has {sorted(map(str, self._obj.data_vars))}); pass another name or a DataArray"
                )
            return self._obj[name_or_array]
        return name_or_array

    # weights
    def gram(self, *, weight: str = "weight", **kwargs: Any) -> xr.DataArray:
        """``W^T W`` of the layer's weight."""
        return gram(self._get(weight, "gram"), **kwargs)

    def spectrum(self, *, weight: str = "weight", **kwargs: Any) -> xr.DataArray:
        """Eigenvalues of ``W^T W``."""
        return gram_spectrum(self._get(weight, "spectrum"), **kwargs)

    def effective_rank(self, *, weight: str = "weight", **kwargs: Any) -> xr.DataArray:
        """Effective rank of ``W^T W``."""
        return effective_rank(self._get(weight, "effective_rank"), **kwargs)

    def stable_rank(self, *, weight: str = "weight", **kwargs: Any) -> xr.DataArray:
        """Stable rank of the weight."""
        return stable_rank(self._get(weight, "stable_rank"), **kwargs)

    def gram_change(self, *, weight: str = "weight", **kwargs: Any) -> xr.DataArray:
        """Change of ``W^T W`` between consecutive steps."""
        return gram_change(self._get(weight, "gram_change"), **kwargs)

    # virtual covariance
    def _hg(self, input: str, input_grad: str, role: str) -> tuple[xr.DataArray, xr.DataArray]:
        return self._get(input, role), self._get(input_grad, role)

    def virtual_covariance(
        self, gamma: Any, *, input: str = "input", input_grad: str = "input_grad", **kwargs: Any
    ) -> xr.DataArray:
        """VC of the layer input with learning rate ``gamma`` (number, DataArray or name)."""
        h, g = self._hg(input, input_grad, "virtual_covariance")
        return virtual_covariance(h, g, self._get(gamma, "gamma"), **kwargs)

    def virtual_covariance_shift(
        self, gamma: Any, *, input: str = "input", input_grad: str = "input_grad", **kwargs: Any
    ) -> xr.DataArray:
        """VCS (``batch_size=`` for the minibatch second-order scaling)."""
        h, g = self._hg(input, input_grad, "virtual_covariance_shift")
        return virtual_covariance_shift(h, g, self._get(gamma, "gamma"), **kwargs)

    def accumulated_vcs(self, gamma: Any, *, step_dim: str = "step", **kwargs: Any) -> xr.DataArray:
        """VCS accumulated over steps by the trapezoid rule (an estimate)."""
        return accumulated_vcs(self.virtual_covariance_shift(gamma, **kwargs), step_dim=step_dim)

    def gram_vc_corr(
        self,
        gamma: Any,
        *,
        mode: Mode = "diag",
        against: str = "accumulated_vcs",
        weight: str = "weight",
        step_dim: str = "step",
        **kwargs: Any,
    ) -> xr.DataArray:
        """Pearson correlation of ``W^T W`` with the accumulated VCS (or with ``against="vc"``)."""
        if against == "accumulated_vcs":
            other = self.accumulated_vcs(gamma, step_dim=step_dim, **kwargs)
        elif against == "vc":
            other = self.virtual_covariance(gamma, **kwargs)
        else:
            raise ValueError(f"against must be 'accumulated_vcs' or 'vc', got {against!r}")
        return pearson(self.gram(weight=weight), other, mode=mode)

    def vcs_interval_consistency(
        self,
        gamma: Any,
        *,
        mode: Mode = "full",
        weight: str = "weight",
        step_dim: str = "step",
        **kwargs: Any,
    ) -> xr.Dataset:
        """Per interval: Pearson and norm ratio of the actual Gram change vs the trapezoid VCS."""
        vcs = self.virtual_covariance_shift(gamma, **kwargs)
        return vcs_interval_consistency(self.gram(weight=weight), vcs, step_dim=step_dim, mode=mode)

    def fle_residual(
        self,
        gamma: Any,
        *,
        second_order: xr.DataArray | None = None,
        weight: str = "weight",
        step_dim: str = "step",
        **kwargs: Any,
    ) -> xr.DataArray:
        """FLE residual of each one-interval Gram change against the VCS at its start.

        Meaningful for consecutive checkpoints one full-batch GD step apart;
        ``second_order`` (e.g. :func:`~gramlin_analyze.reducers.vc.second_order_term`)
        is added to the VCS when given.
        """
        dgram = gram_change(self._get(weight, "fle_residual"), step_dim=step_dim, label="lower")
        vcs = self.virtual_covariance_shift(gamma, **kwargs)
        if second_order is not None:
            vcs = vcs + second_order
        return fle_residual(dgram, vcs)

    # features
    def _y(self, labels: Any, targets: Any) -> dict[str, Any]:
        return {"labels": self._get(labels, "labels"), "targets": self._get(targets, "targets")}

    def target_linearity(
        self, *, labels: Any = None, targets: Any = None, input: str = "input", **kwargs: Any
    ) -> xr.DataArray:
        """TL of the layer input for ``labels=`` or ``targets=`` (DataArray or name)."""
        h = self._get(input, "target_linearity")
        return target_linearity(h, **self._y(labels, targets), **kwargs)

    def tl_null(self, *, input: str = "input", **kwargs: Any) -> xr.DataArray:
        """TL null baseline ``min(1, d/N)`` of the layer input."""
        return tl_null(self._get(input, "tl_null"), **kwargs)

    def tl_surrogate(
        self,
        *,
        labels: Any = None,
        targets: Any = None,
        input: str = "input",
        weight: str = "weight",
        **kwargs: Any,
    ) -> xr.Dataset:
        """TL surrogate and kernel-target alignment of ``Z = H W^T``."""
        h, w = self._get(input, "tl_surrogate"), self._get(weight, "tl_surrogate")
        return tl_surrogate(h, w, **self._y(labels, targets), **kwargs)

    def neural_collapse(
        self,
        labels: Any,
        *,
        readout: bool = True,
        input: str = "input",
        weight: str = "weight",
        bias: str = "bias",
        **kwargs: Any,
    ) -> xr.Dataset:
        """Neural collapse of the layer input; with ``readout`` this layer's weight is the readout."""
        h = self._get(input, "neural_collapse")
        if readout:
            kwargs.setdefault("W", self._get(weight, "neural_collapse"))
            if bias in self._obj.variables:
                kwargs.setdefault("b", self._obj[bias])
        return neural_collapse(h, self._get(labels, "labels"), **kwargs)

    def nfa_alignment(
        self, agop: Any = "agop", *, weight: str = "weight", **kwargs: Any
    ) -> xr.Dataset:
        """NFA correlations of ``W^T W`` with the AGOP (DataArray or variable name)."""
        return nfa_alignment(self._get(weight, "nfa_alignment"), self._get(agop, "agop"), **kwargs)
