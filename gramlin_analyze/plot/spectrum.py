"""How the weights' spectra evolve: effective and stable rank over steps, and the
eigenvalues of ``W^T W`` at a few steps, one panel per layer."""

from __future__ import annotations

import numpy as np

from gramlin_analyze.errors import MissingDataError
from gramlin_analyze.plot._layout import (
    Layout,
    facet_grid,
    key_width,
    layer_key,
    legend_above,
    log_axis,
)
from gramlin_analyze.plot._source import load, require, spread
from gramlin_analyze.plot._style import (
    SHORT,
    axis_label,
    depth_colors,
    draw_layer_lines,
    short_names,
    skipped_note,
    step_label,
)

__all__ = ["rank_over_steps", "spectra"]

RANKS = ("effective_rank", "stable_rank")


def rank_over_steps(source, *, layers=None, storage_options=None):
    """Effective rank (exp of the spectral entropy) and stable rank of each layer's weight
    over steps; lines' gids ``<var>|<layer>``."""
    src = load(source, layers=layers, storage_options=storage_options)
    present = [v for v in RANKS if src.has(v)]
    if not present:
        require(src, RANKS[0], "rank_over_steps")
    have = src.layers_with(*present)
    colors = depth_colors(len(have))
    layout = Layout(
        len(present), 1, (4.0, 3.0), left=0.9, right=key_width(have), top=0.35, gap=(0.9, 0.5)
    )
    fig = layout.figure(
        notes=skipped_note([n for n in src.layers if n not in have], "without a spectrum")
    )
    axes = list(fig.subplots(1, len(present), squeeze=False).ravel())
    m = src.metrics
    for ax, var in zip(axes, present, strict=True):
        lines = draw_layer_lines(ax, m, var, have, colors)
        ax.set_title(SHORT[var], fontsize=9, y=1.0)
        ax.set_ylabel(axis_label(dict(m[var].attrs), var, 45), fontsize=7)
        ax.set_xlabel(step_label(m), fontsize=8)
        ax.tick_params(labelsize=7)
    layer_key(fig, have, colors, lines)
    return fig


def _pick_steps(ok: np.ndarray, steps) -> list[int]:
    if steps is not None:
        return [int(s) for s in steps]
    picks = [ok[0], ok[len(ok) // 2], ok[-1]] if ok.size >= 3 else list(ok)
    return sorted({int(s) for s in picks})


def spectra(source, *, steps=None, layers=None, max_panels: int = 12, storage_options=None):
    """Eigenvalues of ``W^T W`` (descending, log scale) at a few steps (default first, middle,
    last ok), one panel per layer. Lines' gids are ``spectrum|<layer>|step=<step>``."""
    src = load(source, layers=layers, storage_options=storage_options)
    candidates = require(src, "effective_rank", "spectra")
    chosen = _pick_steps(src.ok_steps(), steps)
    data = {}
    for layer in spread(candidates, max_panels):
        ds = src.matrices(layer)
        if ds is not None and "spectrum" in ds:
            data[layer] = ds["spectrum"].sel(step=chosen).values
    if not data:
        raise MissingDataError("spectra needs /metrics/<layer>/spectrum (a store path or DataTree)")
    notes = skipped_note([n for n in src.layers if n not in candidates], "without a spectrum")
    if len(candidates) > len(data):
        notes.append(
            f"Showing {len(data)} of {len(candidates)} layers, evenly spaced by depth "
            "(layers= picks others)."
        )
    ncols = min(4, len(data))
    layout = Layout(ncols, -(-len(data) // ncols), (2.2, 1.6), left=0.6, top=0.75, gap=(0.5, 0.5))
    fig = layout.figure(notes=notes, xlabel="eigenvalue index k", ylabel="eigenvalue of W^T W")
    axes = facet_grid(fig, layout, len(data), shared=False)
    shades = [str(s) for s in np.linspace(0.7, 0.0, len(chosen))]
    for ax, (layer, values), name in zip(
        axes, data.items(), short_names(list(data), 34), strict=True
    ):
        for step, row, shade, ls in zip(
            chosen, values, shades, ("--", "-.", "-") * 4, strict=False
        ):
            k = np.arange(1, row.size + 1)
            (line,) = ax.plot(k, row, color=shade, ls=ls, lw=1.2, label=f"step {step}")
            line.set_gid(f"spectrum|{layer}|step={step}")
        log_axis(ax, values)
        ax.set_title(name, fontsize=7, y=1.0)
        ax.grid(True, alpha=0.3)
    legend_above(fig, axes[0].get_lines(), ncols=len(chosen))
    return fig
