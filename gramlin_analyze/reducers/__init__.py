"""Reducers: the measurements of MATH.md as float64 NumPy kernels with xarray/Dask wrappers.

Each module holds one measurement: a NumPy kernel (``*_np``, batched over
leading axes, reduced axes last) and an xarray wrapper that works on NumPy-
and Dask-backed DataArrays. Importing this package registers the
``.gramlin`` accessor on DataArrays and Datasets (once xarray is imported:
the NumPy kernels import neither xarray nor Dask).
"""

import sys as _sys

if "xarray" in _sys.modules:  # else gramlin_analyze registers it when xarray is imported
    from gramlin_analyze.reducers import accessor as _accessor  # noqa: F401  (registers .gramlin)
from gramlin_analyze.reducers._common import nonfinite, one_hot_np
from gramlin_analyze.reducers.agop import (
    agop,
    agop_np,
    nfa_alignment,
    nfa_correlation,
    nfa_correlation_np,
    psd_sqrt_np,
)
from gramlin_analyze.reducers.alignment import (
    cosine_np,
    cosine_similarity,
    norm_ratio_np,
    pearson,
    pearson_np,
    vcs_interval_consistency,
)
from gramlin_analyze.reducers.cka import (
    cka_stats_np,
    linear_cka,
    linear_cka_from_stats_np,
    linear_cka_np,
)
from gramlin_analyze.reducers.collapse import (
    class_means,
    collapse_from_stats_np,
    collapse_stats_np,
    nc3_np,
    ncc_mismatch_np,
    neural_collapse,
)
from gramlin_analyze.reducers.fle import (
    accumulate_vcs_np,
    fle_interval_metrics_np,
    fle_residual,
    fle_residual_np,
    interval_gradient_np,
    interval_vcs_np,
    second_order_term,
    second_order_term_np,
    weight_gradient,
    weight_gradient_np,
)
from gramlin_analyze.reducers.gram import gram, gram_change, gram_np
from gramlin_analyze.reducers.spectrum import (
    effective_rank,
    effective_rank_np,
    frobenius_norm,
    frobenius_norm_np,
    gram_spectrum,
    gram_spectrum_np,
    spectral_norm,
    spectral_norm_np,
    stable_rank,
    stable_rank_np,
)
from gramlin_analyze.reducers.surrogate import tl_surrogate
from gramlin_analyze.reducers.target_linearity import (
    target_linearity,
    target_linearity_from_stats_np,
    target_linearity_np,
    tl_null,
    tl_stats_np,
)
from gramlin_analyze.reducers.vc import (
    accumulate_trapezoid_np,
    accumulated_vcs,
    interval_vcs,
    vc_stats,
    vc_stats_np,
    vcs_np,
    virtual_covariance,
    virtual_covariance_np,
    virtual_covariance_shift,
)

__all__ = [
    "nonfinite",
    # gram
    "gram",
    "gram_np",
    "gram_spectrum",
    "gram_spectrum_np",
    "effective_rank",
    "effective_rank_np",
    "stable_rank",
    "stable_rank_np",
    "frobenius_norm",
    "frobenius_norm_np",
    "spectral_norm",
    "spectral_norm_np",
    "gram_change",
    # virtual covariance
    "vc_stats",
    "vc_stats_np",
    "virtual_covariance",
    "virtual_covariance_np",
    "virtual_covariance_shift",
    "vcs_np",
    "interval_vcs",
    "accumulated_vcs",
    "accumulate_trapezoid_np",
    "weight_gradient",
    "weight_gradient_np",
    "second_order_term",
    "second_order_term_np",
    "fle_residual",
    "fle_residual_np",
    "interval_vcs_np",
    "accumulate_vcs_np",
    "interval_gradient_np",
    "fle_interval_metrics_np",
    # alignment
    "pearson",
    "pearson_np",
    "cosine_similarity",
    "cosine_np",
    "norm_ratio_np",
    "vcs_interval_consistency",
    # target linearity
    "target_linearity",
    "target_linearity_np",
    "target_linearity_from_stats_np",
    "tl_stats_np",
    "one_hot_np",
    "tl_null",
    "tl_surrogate",
    # AGOP / NFA
    "agop",
    "agop_np",
    "psd_sqrt_np",
    "nfa_correlation",
    "nfa_correlation_np",
    "nfa_alignment",
    # neural collapse
    "neural_collapse",
    "class_means",
    "collapse_stats_np",
    "collapse_from_stats_np",
    "nc3_np",
    "ncc_mismatch_np",
    # CKA
    "linear_cka",
    "linear_cka_np",
    "cka_stats_np",
    "linear_cka_from_stats_np",
]
