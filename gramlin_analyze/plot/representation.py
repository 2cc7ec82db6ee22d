"""The representations themselves: neural collapse (NC1-NC4), the end point of
linearization, and how far each layer's input still is from its final form (CKA)."""

from __future__ import annotations

from gramlin_analyze.plot._layout import Layout, key_width, layer_key, log_axis
from gramlin_analyze.plot._source import load, require
from gramlin_analyze.plot._style import (
    SHORT,
    axis_label,
    depth_colors,
    draw_layer_lines,
    skipped_note,
    step_label,
)

__all__ = ["neural_collapse", "cka_to_final"]

NC = ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc3", "nc4")


def neural_collapse(source, *, layers=None, storage_options=None):
    """NC1 (log scale), NC2 (equinorm, equiangularity), NC3 and NC4 over steps, one panel
    each, one line per layer that has the metric (NC3/NC4: readout layers only);
    lines' gids ``<var>|<layer>``."""
    src = load(source, layers=layers, storage_options=storage_options)
    present = [v for v in NC if src.has(v)]
    if not present:
        require(src, NC[0], "neural_collapse")
    have = src.layers_with(*present)
    colors = depth_colors(len(have))
    ncols = min(3, len(present))
    layout = Layout(
        ncols,
        -(-len(present) // ncols),
        (2.8, 2.0),
        left=0.5,
        right=key_width(have),
        top=0.6,
        gap=(0.55, 0.8),
    )
    fig = layout.figure(
        notes=skipped_note([n for n in src.layers if n not in have], "without NC metrics"),
        xlabel=step_label(src.metrics),
    )
    grid = fig.subplots(layout.nrows, ncols, sharex=True, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[len(present) :]:
        ax.remove()
    m, handles = src.metrics, {}
    for i, (ax, var) in enumerate(zip(axes, present, strict=False)):
        with_data = src.layers_with(var)
        lines = draw_layer_lines(ax, m, var, with_data, [colors[have.index(n)] for n in with_data])
        handles.update(zip(with_data, lines, strict=True))
        ax.set_title(
            f"{SHORT[var]}\n{axis_label(dict(m[var].attrs), var, 58)}", fontsize=6.5, y=1.0
        )
        ax.tick_params(labelsize=7, labelbottom=i + ncols >= len(present))
        if var == "nc1":
            log_axis(ax, m[var].values)
    layer_key(fig, have, colors, [handles[n] for n in have])
    return fig


def cka_to_final(source, *, layers=None, storage_options=None):
    """Linear CKA between each step's layer input and the last ok step's, over steps:
    when each representation settles. Lines' gids ``cka_to_final|<layer>``."""
    src = load(source, layers=layers, storage_options=storage_options)
    have = require(src, "cka_to_final", "cka_to_final")
    colors = depth_colors(len(have))
    layout = Layout(panel=(5.0, 3.0), left=0.7, right=key_width(have), top=0.35)
    fig = layout.figure(
        notes=skipped_note([n for n in src.layers if n not in have], "without cka_to_final")
    )
    ax = fig.subplots()
    m = src.metrics
    lines = draw_layer_lines(ax, m, "cka_to_final", have, colors)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(SHORT["cka_to_final"], fontsize=9, y=1.0)
    ax.set_ylabel("linear CKA to the last ok step", fontsize=8)
    ax.set_xlabel(step_label(m), fontsize=8)
    ax.tick_params(labelsize=7)
    layer_key(fig, have, colors, lines)
    return fig
