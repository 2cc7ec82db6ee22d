"""Does the weight Gram matrix track the virtual covariance?

Over steps (Gram vs VC at each checkpoint, and the Gram's change vs the
accumulated VCS), by layer at one step beside Gram vs AGOP (the Neural Feature
Ansatz, where the store has it), and entry by entry: the diagonal of the Gram's
change against the diagonal of the accumulated VCS, one panel per layer.
"""

from __future__ import annotations

import numpy as np

from gramlin_analyze.errors import MissingDataError
from gramlin_analyze.plot._layout import (
    Layout,
    facet_grid,
    key_width,
    layer_key,
    legend_right,
    text_width,
)
from gramlin_analyze.plot._source import load, require, spread
from gramlin_analyze.plot._style import (
    SHORT,
    depth_colors,
    draw_layer_lines,
    short_names,
    skipped_note,
    step_label,
    thin_ticks,
)

__all__ = ["gram_vc_alignment", "alignment_by_layer", "gram_vs_vcs"]

OVER_STEPS = ("gram_vc_corr", "gram_vcs_acc_corr")
BY_LAYER = ("gram_vc_corr", "gram_vcs_acc_corr", "nfa_corr")


def gram_vc_alignment(source, *, layers=None, storage_options=None):
    """Pearson correlation of the Gram with VC (each checkpoint), and of the Gram's change
    since the first checkpoint with the accumulated VCS, over steps; lines' gids ``<var>|<layer>``."""
    src = load(source, layers=layers, storage_options=storage_options)
    present = [v for v in OVER_STEPS if src.has(v)]
    if not present:
        require(src, OVER_STEPS[0], "gram_vc_alignment")
    have = src.layers_with(*present)
    colors = depth_colors(len(have))
    layout = Layout(len(present), 1, (4.0, 3.0), left=0.9, right=key_width(have), top=0.35)
    fig = layout.figure(
        notes=skipped_note([n for n in src.layers if n not in have], "without VC metrics")
    )
    axes = list(fig.subplots(1, len(present), sharey=True, squeeze=False).ravel())
    m = src.metrics
    for ax, var in zip(axes, present, strict=True):
        lines = draw_layer_lines(ax, m, var, have, colors)
        ax.set_title(SHORT[var], fontsize=9, y=1.0)
        ax.set_xlabel(step_label(m), fontsize=8)
        ax.set_ylim(-1.05, 1.05)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("Pearson correlation (diag)", fontsize=8)
    layer_key(fig, have, colors, lines)
    return fig


def _last_step(src, var: str) -> int:
    ok = src.ok_steps()
    finite = np.isfinite(src.metrics[var].sel(step=ok).values).any(axis=1) if ok.size else []
    steps = ok[np.asarray(finite, bool)] if ok.size else ok
    if steps.size == 0:
        raise MissingDataError(f"no ok step has {var!r}; run gramlin-analyze analyze STORE")
    return int(steps[-1])


def alignment_by_layer(source, *, step=None, layers=None, storage_options=None):
    """Gram ~ VC, Gram change ~ accumulated VCS and Gram ~ AGOP by layer at one step (default
    the last); lines' gids ``<var>|step=<step>``, y data in the order of the x axis."""
    src = load(source, layers=layers, storage_options=storage_options)
    present = [v for v in BY_LAYER if src.has(v)]
    if not present:
        require(src, BY_LAYER[0], "alignment_by_layer")
    step = _last_step(src, present[0]) if step is None else int(step)
    have = src.layers_with(*present)
    m = src.metrics.sel(layer=have, step=step)
    names = short_names(have, 30)
    layout = Layout(
        panel=(max(4.0, 0.3 * len(have)), 3.0),
        left=0.7,
        right=text_width([SHORT[v] for v in present], 8) + 0.9,
        bottom=text_width(names, 7) + 0.55,
    )
    fig = layout.figure(
        notes=skipped_note([n for n in src.layers if n not in have], "without these metrics")
    )
    ax = fig.subplots()
    x = np.arange(len(have))
    styles = {"gram_vc_corr": ("o", "-"), "gram_vcs_acc_corr": ("s", "--"), "nfa_corr": ("^", ":")}
    for var, shade in zip(present, ("0.0", "0.35", "0.6"), strict=False):
        marker, ls = styles[var]
        (line,) = ax.plot(
            x, m[var].values, marker=marker, ls=ls, color=shade, ms=5, lw=1.2, label=SHORT[var]
        )
        line.set_gid(f"{var}|step={step}")
    thin_ticks(ax, "x", names, most=60)
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.tick_params(labelsize=7)
    ax.set_ylabel("Pearson correlation", fontsize=8)
    ax.set_xlabel("layer (input of), by depth", fontsize=8)
    ax.set_title(f"Gram alignment by layer at step {step}", fontsize=9, y=1.0)
    ax.grid(True, alpha=0.3)
    legend_right(fig)
    return fig


def _diagonals(src, layer: str, first: int, step: int):
    """(diag of the accumulated VCS at ``step``, diag of Gram(step) - Gram(first)), or None."""
    ds = src.matrices(layer)
    if ds is None or "gram" not in ds or "vcs_accumulated" not in ds:
        return None
    gram = ds["gram"].sel(step=[first, step]).values.astype(np.float64)
    acc = ds["vcs_accumulated"].sel(step=step).values
    x, y = np.diagonal(acc), np.diagonal(gram[1]) - np.diagonal(gram[0])
    return (x, y) if np.isfinite(x).all() and np.isfinite(y).all() else None


def gram_vs_vcs(source, *, step=None, layers=None, max_panels: int = 12, storage_options=None):
    """Diagonal of the Gram's change since the first ok step against the diagonal of the
    accumulated VCS at ``step`` (default the last), one panel per layer, titled with the
    diag Pearson (and Gram ~ AGOP where present). Each scatter's gid is
    ``gram_vs_vcs|<layer>``, its offsets ``(diag accumulated VCS, diag Gram change)``."""
    src = load(source, layers=layers, storage_options=storage_options)
    candidates = require(src, "gram_vcs_acc_corr", "gram_vs_vcs")
    step = _last_step(src, "gram_vcs_acc_corr") if step is None else int(step)
    first = int(src.ok_steps()[0])
    data = {}
    for layer in spread(candidates, max_panels):
        if (d := _diagonals(src, layer, first, step)) is not None:
            data[layer] = d
    notes = skipped_note([n for n in src.layers if n not in candidates], "without VC metrics")
    if len(candidates) > len(data):
        notes.append(
            f"Showing {len(data)} of {len(candidates)} layers with an accumulated VCS, evenly "
            "spaced by depth (layers= picks others)."
        )
    if not data:
        raise MissingDataError(
            "gram_vs_vcs needs /metrics/<layer>/gram and vcs_accumulated (a store path or DataTree)"
        )
    ncols = min(4, len(data))
    layout = Layout(ncols, -(-len(data) // ncols), (2.2, 2.2), left=0.7, top=0.5, gap=(0.75, 0.7))
    fig = layout.figure(
        notes=notes,
        xlabel=f"accumulated VCS, diagonal (trapezoid estimate to step {step})",
        ylabel=f"W^T W - W_0^T W_0, diagonal (step {first} to {step})",
    )
    axes = facet_grid(fig, layout, len(data), shared=False)
    m = src.metrics.sel(step=step)
    for ax, (layer, (x, y)), name in zip(
        axes, data.items(), short_names(list(data), 30), strict=True
    ):
        dots = ax.scatter(x, y, s=8, color="black", alpha=0.7, linewidths=0)
        dots.set_gid(f"gram_vs_vcs|{layer}")
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        pad = 0.05 * (hi - lo) or 1.0
        ax.plot([lo, hi], [lo, hi], color="0.6", ls="--", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        title = f"{name}\nr = {float(m['gram_vcs_acc_corr'].sel(layer=layer)):.2f}"
        if "nfa_corr" in m and np.isfinite(m["nfa_corr"].sel(layer=layer)):
            title += f", AGOP r = {float(m['nfa_corr'].sel(layer=layer)):.2f}"
        ax.set_title(title, fontsize=7, y=1.0)
        ax.grid(True, alpha=0.3)
    for ax in axes:
        ax.tick_params(labelbottom=True)
    return fig
