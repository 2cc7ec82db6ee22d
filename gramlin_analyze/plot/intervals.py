"""Are the checkpoints dense enough for the first-order picture?

Per checkpoint interval ``[a, b]`` and layer: the Pearson correlation of the
actual Gram change with its first-order estimate ``(b - a)(VCS_a + VCS_b)/2``,
and the estimate's size relative to the change. Where both are near 1 the
Gram moves as the virtual covariance says; elsewhere second-order terms
(minibatch noise, large steps) drive it.
"""

from __future__ import annotations

import numpy as np

from gramlin_analyze.plot._maps import layer_step_map
from gramlin_analyze.plot._source import load, require
from gramlin_analyze.plot._style import axis_label, skipped_note

__all__ = ["interval_consistency"]

CORR, RATIO = "vcs_interval_corr", "vcs_interval_ratio"


def interval_consistency(source, *, layers=None, variable: str = CORR, storage_options=None):
    """A layer x interval image of ``vcs_interval_corr`` (or ``variable="vcs_interval_ratio"``,
    on a log scale centred on 1). Columns are the intervals ``a-b`` between consecutive ok
    steps (the value stored at ``b``); the image's array (gid ``<variable>``) has the rows
    in the order of the y axis."""
    from matplotlib.colors import LogNorm

    src = load(source, layers=layers, storage_options=storage_options)
    have = require(src, variable, "interval_consistency")
    ok = src.ok_steps()
    ends = ok[1:]
    values = src.metrics[variable].sel(layer=have, step=ends).transpose("layer", "step").values
    columns = [f"{a}-{b}" for a, b in zip(ok[:-1], ends, strict=True)]
    extra = {}
    if variable == RATIO:
        finite = values[np.isfinite(values) & (values > 0)]
        span = max(10.0, float(np.max(np.abs(np.log10(finite))) if finite.size else 1.0))
        span = 10 ** np.ceil(np.log10(span))
        extra = {"norm": LogNorm(1 / span, span), "cmap": "PuOr_r", "vmin": None, "vmax": None}
    fig = layer_step_map(
        values,
        have,
        columns,
        gid=variable,
        label=axis_label(dict(src.metrics[variable].attrs), variable, 34),
        xlabel="checkpoint interval (steps a-b)",
        title="Interval consistency: actual Gram change vs first-order estimate"
        if variable == CORR
        else "Estimate / actual Gram change (1 = the first-order picture holds)",
        notes=skipped_note([n for n in src.layers if n not in have], f"without {variable}"),
        **extra,
    )
    return fig
