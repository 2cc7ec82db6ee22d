"""Layer x column images (TL per step, consistency per interval) with their keys."""

from __future__ import annotations

from gramlin_analyze.plot._layout import Layout, text_width
from gramlin_analyze.plot._style import short_names, thin_ticks

__all__ = ["layer_step_map"]


def layer_step_map(values, layers, columns, *, gid, label, xlabel, title, notes, **imshow):
    """``values`` (layers x columns) as an image, rows labelled by layer, a colorbar.

    The image's array is ``values`` as given (gid ``gid``); NaN cells are light gray.
    """
    from matplotlib import colormaps

    names = short_names(layers, 40)
    rotate = max((len(c) for c in columns), default=0) > 6
    layout = Layout(
        panel=(max(4.5, min(9.0, 0.1 * len(columns) + 3.5)), 0.16 * len(layers) + 0.6),
        left=text_width(names, 7) + 0.25,
        right=0.75 + 0.14 * (label.count("\n") + 1),  # ticks, then the label's lines
        top=0.45,
        bottom=(text_width(columns[:30], 7) + 0.25 if rotate else 0.3) + 0.35,
    )
    fig = layout.figure(notes=notes)
    ax = fig.subplots()
    cmap = colormaps[imshow.pop("cmap", "viridis")].with_extremes(bad="0.85")
    kwargs = {"vmin": 0.0, "vmax": 1.0, **imshow}
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, **kwargs)
    image.set_gid(gid)
    thin_ticks(ax, "y", names, most=60)
    thin_ticks(ax, "x", columns, most=30)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9, y=1.0)
    w, _ = fig.get_size_inches()
    p = fig.subplotpars
    cax = fig.add_axes((p.right + 0.15 / w, p.bottom, 0.12 / w, p.top - p.bottom))
    bar = fig.colorbar(image, cax=cax)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(label, fontsize=7)
    return fig
