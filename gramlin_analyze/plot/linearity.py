"""Target linearity: per layer over training, against depth, and as a layer x step map.

The paper's central picture: TL of each layer's input rises with depth and
over training, well above the null baseline ``min(1, d/N)`` that features
unrelated to the targets reach. The baseline is each layer's own (``d`` and,
for per-token layers, ``N`` differ between layers).
"""

from __future__ import annotations

import numpy as np

from gramlin_analyze.plot._layout import Layout, facet_grid, legend_above, legend_right, text_width
from gramlin_analyze.plot._maps import layer_step_map
from gramlin_analyze.plot._source import load, require, spread
from gramlin_analyze.plot._style import (
    axis_label,
    short_names,
    skipped_note,
    step_label,
    thin_ticks,
)

__all__ = ["tl_over_steps", "tl_vs_depth", "tl_heatmap", "default_steps"]

TL, NULL = "target_linearity", "tl_null"


def default_steps(src, var: str) -> list[int]:
    """The first, middle and last ok steps with a value of ``var``."""
    ok = src.ok_steps()
    if ok.size:
        ok = ok[np.isfinite(src.metrics[var].sel(step=ok).values).any(axis=1)]
    picks = [ok[0], ok[len(ok) // 2], ok[-1]] if ok.size >= 3 else list(ok)
    return sorted({int(s) for s in picks})


def tl_over_steps(source, *, layers=None, max_panels: int = 16, storage_options=None):
    """TL of each layer's input over steps, one panel per layer, with its own null baseline.

    Parameters
    ----------
    source
        A store path or URL, its DataTree (``ga.open``), its ``/metrics`` Dataset.
    layers
        Layer names (kept in the order given) or globs (depth order); default all.
    max_panels
        With more layers, this many evenly spaced by depth (:func:`tl_heatmap` shows all).

    Returns
    -------
    matplotlib.figure.Figure
        Each TL line's gid is ``target_linearity|<layer>``, each baseline's ``tl_null|<layer>``.
    """
    src = load(source, layers=layers, storage_options=storage_options)
    have = require(src, TL, "tl_over_steps")
    notes = skipped_note([n for n in src.layers if n not in have], f"without {TL}")
    shown = spread(have, max_panels)
    if len(shown) < len(have):
        notes.append(
            f"Showing {len(shown)} of {len(have)} layers, evenly spaced by depth "
            "(tl_heatmap shows all; layers= picks others)."
        )
    ncols = len(shown) if len(shown) <= 5 else 4
    layout = Layout(
        ncols, -(-len(shown) // ncols), (2.3, 1.5), left=0.45, top=0.75, gap=(0.2, 0.45)
    )
    fig = layout.figure(notes=notes, xlabel=step_label(src.metrics), ylabel="target linearity")
    axes = facet_grid(fig, layout, len(shown))
    m, steps = src.metrics, src.metrics["step"].values
    for ax, layer, name in zip(axes, shown, short_names(shown, 34), strict=True):
        (tl,) = ax.plot(steps, m[TL].sel(layer=layer).values, color="black", lw=1.5)
        tl.set_gid(f"{TL}|{layer}")
        if NULL in m:
            (null,) = ax.plot(steps, m[NULL].sel(layer=layer).values, color="0.45", ls="--", lw=1)
            null.set_gid(f"{NULL}|{layer}")
        ax.set_title(name, fontsize=7, y=1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    legend_above(
        fig,
        axes[0].get_lines(),
        ["TL of the layer's input", "null baseline min(1, d/N) of that layer"],
        ncols=2,
    )
    return fig


def tl_vs_depth(source, *, steps=None, layers=None, storage_options=None):
    """TL against depth at a few steps (default first, middle, last ok): the paper's
    layer-wise figure. Lines' gids are ``target_linearity|step=<step>`` and ``tl_null|step=<step>``,
    their y data the layers' values in the order of the x axis."""
    src = load(source, layers=layers, storage_options=storage_options)
    have = require(src, TL, "tl_vs_depth")
    chosen = [int(s) for s in steps] if steps is not None else default_steps(src, TL)
    m = src.metrics.sel(layer=have)
    names = short_names(have, 30)
    layout = Layout(
        panel=(max(4.0, 0.3 * len(have)), 3.0),
        bottom=text_width(names, 7) + 0.55,
        right=text_width(["null min(1, d/N)"], 8) + 0.9,
        left=0.7,
    )
    fig = layout.figure(
        notes=skipped_note([n for n in src.layers if n not in have], f"without {TL}")
    )
    ax = fig.subplots()
    x = np.arange(len(have))
    for step, shade, marker in zip(
        chosen, np.linspace(0.7, 0.0, len(chosen)), "osD^v" * 4, strict=False
    ):
        (line,) = ax.plot(
            x,
            m[TL].sel(step=step).values,
            color=str(shade),
            marker=marker,
            ms=4,
            lw=1.4,
            label=f"step {step}",
        )
        line.set_gid(f"{TL}|step={step}")
    if NULL in m and chosen:
        (null,) = ax.plot(
            x,
            m[NULL].sel(step=chosen[-1]).values,
            color="0.45",
            ls="--",
            drawstyle="steps-mid",
            lw=1,
            label="null min(1, d/N)",
        )
        null.set_gid(f"{NULL}|step={chosen[-1]}")
    thin_ticks(ax, "x", names, most=60)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("target linearity of the layer's input", fontsize=8)
    ax.set_xlabel("layer (input of), by depth", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    legend_right(fig)
    return fig


def tl_heatmap(source, *, layers=None, storage_options=None):
    """TL as a layer x step image (every layer, however many). The image's array is
    ``target_linearity`` with rows in the order of the y axis (gid ``target_linearity``)."""
    src = load(source, layers=layers, storage_options=storage_options)
    have = require(src, TL, "tl_heatmap")
    m = src.metrics
    return layer_step_map(
        m[TL].sel(layer=have).transpose("layer", "step").values,
        have,
        [str(s) for s in m["step"].values],
        gid=TL,
        label=axis_label(dict(m[TL].attrs), TL, 34),
        xlabel=step_label(m),
        title="Target linearity of each layer's input",
        notes=skipped_note([n for n in src.layers if n not in have], f"without {TL}"),
    )
