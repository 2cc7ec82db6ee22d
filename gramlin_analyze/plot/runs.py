"""Figures comparing runs: TL over training per run, final TL and a layer-to-layer TL gap
against a run attribute (the paper's random-label figure: last-layer TL against the
label-noise fraction ``p``).

Each takes store paths or a glob, :func:`gramlin_analyze.open_runs`'s DataTree or its
``/metrics`` Dataset. Runs that differ only in ``seed`` are pooled: their mean is drawn
with the spread (min to max) around it. Every drawn line carries a ``gid`` naming what
it shows, and its data are exactly the values drawn, so a figure can be checked
against the stores.
"""

from __future__ import annotations

import warnings

import numpy as np

from gramlin_analyze.errors import UsageError
from gramlin_analyze.plot._layout import Layout, facet_grid, legend_right, text_width
from gramlin_analyze.plot._runs import final_values, load_runs, require_runs, seed_groups
from gramlin_analyze.plot._source import spread
from gramlin_analyze.plot._style import depth_colors, short_names, skipped_note

__all__ = ["final_tl_by", "runs_tl_over_steps", "tl_gap_by"]

TL = "target_linearity"


def run_colors(n: int) -> list:
    """Distinct colors for ``n`` runs: tab10 up to ten, else along viridis."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return depth_colors(n)


def _finite(x: np.ndarray, y: np.ndarray):
    """The points with a value: a run without some of the joined rows still draws a line."""
    keep = np.isfinite(y)
    return x[keep], y[keep]


def _draw_series(ax, x, values, color, gid: str, pooled: bool) -> None:
    """One run's line, or a group's mean line and min-max band (gids ``...|mean``, ``...|spread``)."""
    if not pooled:
        (line,) = ax.plot(*_finite(x, values[0]), color=color, lw=1.3, marker="o", ms=2.5)
        line.set_gid(gid)
        return
    with warnings.catch_warnings():  # a row no run of the group has: NaN, not drawn
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
    keep = np.isfinite(mean)
    band = ax.fill_between(x[keep], lo[keep], hi[keep], color=color, alpha=0.2, lw=0)
    band.set_gid(f"{gid}|spread")
    (line,) = ax.plot(x[keep], mean[keep], color=color, lw=1.5, marker="o", ms=2.5)
    line.set_gid(f"{gid}|mean")


def runs_tl_over_steps(source, *, layers=None, max_panels: int = 16, storage_options=None):
    """TL of each layer's input over training, one panel per layer, one line per run
    (or per group of seeds: mean and min-max spread).

    Returns
    -------
    matplotlib.figure.Figure
        Lines' gids: ``target_linearity|<layer>|<run>``, or for pooled seeds
        ``target_linearity|<layer>|<group>|mean`` (and ``...|spread`` for the band).
    """
    runs = load_runs(source, layers=layers, storage_options=storage_options)
    have = require_runs(runs, TL, "runs_tl_over_steps")
    notes = skipped_note([n for n in runs.layers if n not in have], f"without {TL} in any run")
    shown = spread(have, max_panels)
    if len(shown) < len(have):
        notes.append(f"Showing {len(shown)} of {len(have)} layers, evenly spaced by depth.")
    groups = seed_groups(runs)
    series = groups or {r: [r] for r in runs.runs}
    if groups:
        notes.append("Runs differing only in seed: their mean, and min to max shaded.")
    ncols = len(shown) if len(shown) <= 4 else 4
    layout = Layout(
        ncols,
        -(-len(shown) // ncols),
        (2.3, 1.5),
        left=0.45,
        top=0.4,
        gap=(0.2, 0.45),
        right=text_width(list(series), 7) + 0.6,
    )
    fig = layout.figure(notes=notes, xlabel=runs.axis, ylabel="target linearity")
    axes = facet_grid(fig, layout, len(shown))
    x = runs.metrics[runs.axis].values.astype(float)
    tl = runs.metrics[TL]
    colors = run_colors(len(series))
    for ax, layer, name in zip(axes, shown, short_names(shown, 34), strict=True):
        for (label, members), color in zip(series.items(), colors, strict=True):
            values = tl.sel(layer=layer, run=members).values
            _draw_series(ax, x, values, color, f"{TL}|{layer}|{label}", groups is not None)
        ax.set_title(name, fontsize=7, y=1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    legend_right(fig, axes[0].get_lines(), list(series), fontsize=7, title="run", title_fontsize=7)
    return fig


def _positions(values: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """x positions of attribute values: the numbers themselves, or places of the sorted
    distinct texts (then their tick labels)."""
    if values.dtype.kind in "iuf":
        return values.astype(float), None
    if values.dtype.kind == "b":
        return values.astype(float), ["False", "True"]
    labels = sorted({str(v) for v in values})
    return np.array([labels.index(str(v)) for v in values], float), labels


def _by_attribute(ax, x, y, color, gid: str, label: str):
    """Each run's value (points) and the mean over runs at each distinct x (a line)."""
    keep = np.isfinite(x) & np.isfinite(y)
    points = ax.scatter(x[keep], y[keep], color=color, s=12, alpha=0.55, lw=0)
    points.set_gid(f"{gid}|runs")
    xs = np.unique(x[keep])
    means = np.array([y[keep][x[keep] == v].mean() for v in xs])
    (line,) = ax.plot(xs, means, color=color, lw=1.5, marker="o", ms=4, label=label)
    line.set_gid(gid)
    return line


def _attribute_axis(fig_ax, by: str, ticks: list[str] | None) -> None:
    if ticks is not None:
        fig_ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
    fig_ax.set_xlabel(by, fontsize=8)
    fig_ax.tick_params(labelsize=7)
    fig_ax.grid(True, alpha=0.3)


def final_tl_by(source, by: str, *, layers=None, max_layers: int = 6, storage_options=None):
    """Final TL (each run's last row with values) against run attribute ``by``, one line
    per layer (default: up to ``max_layers`` by depth, the last layer always): e.g. the
    last layer's TL against the label-noise fraction.

    Lines' gids are ``target_linearity|<layer>|by=<by>``: x the distinct values of ``by``
    (sorted), y the mean final TL of the runs with that value; each run's value is a
    point (gid ``...|runs``).
    """
    runs = load_runs(source, layers=layers, storage_options=storage_options)
    attr = runs.attribute(by)
    have = require_runs(runs, TL, "final_tl_by")
    shown = have if layers else spread(have, max_layers)
    finals, _ = final_values(runs, TL)
    x, ticks = _positions(attr)
    names = short_names(shown, 30)
    notes = skipped_note([n for n in runs.layers if n not in have], f"without {TL} in any run")
    layout = Layout(panel=(4.5, 3.0), right=text_width(names, 7) + 0.9, left=0.7)
    fig = layout.figure(notes=notes)
    ax = fig.subplots()
    colors = depth_colors(len(shown))
    for layer, name, color in zip(shown, names, colors, strict=True):
        y = finals.sel(layer=layer).values
        _by_attribute(ax, x, y, color, f"{TL}|{layer}|by={by}", name)
    _attribute_axis(ax, by, ticks)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("final target linearity", fontsize=8)
    legend_right(fig, fontsize=7, title="layer input of", title_fontsize=7)
    return fig


def tl_gap_by(source, by: str, *, layers=None, storage_options=None):
    """The TL gap between two layers, ``TL(second) - TL(first)`` at each run's last row,
    against run attribute ``by`` (``layers``: the two, default the first and last layer
    with TL). The line's gid is ``tl_gap|<first>|<second>|by=<by>``; points ``...|runs``."""
    runs = load_runs(source, storage_options=storage_options)
    attr = runs.attribute(by)
    have = require_runs(runs, TL, "tl_gap_by")
    pair = list(layers) if layers else [have[0], have[-1]]
    if len(pair) != 2 or any(p not in runs.layers for p in pair):
        raise UsageError(f"tl_gap_by needs two layers of the runs, not {pair}; layers: {have}")
    finals, _ = final_values(runs, TL)
    gap = (finals.sel(layer=pair[1]) - finals.sel(layer=pair[0])).values
    x, ticks = _positions(attr)
    first, second = short_names(pair, 30)
    layout = Layout(panel=(4.5, 3.0), left=0.7)
    fig = layout.figure()
    ax = fig.subplots()
    _by_attribute(ax, x, gap, "black", f"tl_gap|{pair[0]}|{pair[1]}|by={by}", "mean")
    ax.axhline(0.0, color="0.5", lw=0.8)
    _attribute_axis(ax, by, ticks)
    ax.set_ylabel(f"final TL({second}) - TL({first})", fontsize=8)
    return fig
