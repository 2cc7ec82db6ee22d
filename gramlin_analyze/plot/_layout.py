"""Figure geometry planned in inches before drawing: panels of a fixed size, margins
sized for the labels, keys and notes they hold.

No layout engine runs at draw time: matplotlib's constrained layout measures
every tick label of every panel on each draw, most of a report's time; a plan
made from the text's known sizes costs nothing and keeps every panel the same
size whatever the labels. Titles are set at a fixed height (``set_title(..., y=1.0)``,
where matplotlib would put them anyway: no panel has ticks on top); placed
automatically, each title's height is worked out on every draw from the tight
bounding boxes of its axes' tick labels, much of a report's drawing time.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gramlin_analyze.errors import MissingDependencyError

try:
    import matplotlib  # noqa: F401  (every figure module comes through here)
except ImportError as err:  # pragma: no cover - the dev and demo extras install it
    raise MissingDependencyError(
        "figures need matplotlib: pip install 'gramlin-analyze[plot]'"
    ) from err

from gramlin_analyze.plot._style import LEGEND_MAX, short_names  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "NOTE_GID",
    "Layout",
    "facet_grid",
    "key_width",
    "layer_key",
    "log_axis",
    "new_figure",
    "text_width",
]

#: The ``gid`` of a figure's note (layers skipped and why), for readers of the figure.
NOTE_GID = "gramlin-notes"
_NOTE_LINE = 0.14  # inches per line of a 7 pt note
_LABEL = 0.3  # inches for a figure-level axis label (8 pt) and its gap


def text_width(labels: Sequence[str], size: float) -> float:
    """About the width in inches of the longest of ``labels`` at ``size`` points."""
    longest = max((len(str(s)) for s in labels), default=0)
    return longest * size * 0.55 / 72


def key_width(layers: Sequence[str]) -> float:
    """Inches to the right of the panels that :func:`layer_key` needs."""
    names = short_names(layers)
    if len(layers) <= LEGEND_MAX:
        return text_width([*names, "layer input of"], 7) + 0.75
    return text_width(names, 6) + 0.75


@dataclass(frozen=True, slots=True)
class Layout:
    """``nrows`` x ``ncols`` panels of ``panel`` inches, ``gap`` between them, margins
    (inches) for tick labels, titles and keys; figure-level labels and notes add their own."""

    ncols: int = 1
    nrows: int = 1
    panel: tuple[float, float] = (5.0, 3.0)
    left: float = 0.8
    right: float = 0.25
    top: float = 0.4
    bottom: float = 0.55
    gap: tuple[float, float] = (0.35, 0.55)

    def figure(
        self, *, notes: Sequence[str] = (), xlabel: str | None = None, ylabel: str | None = None
    ) -> Figure:
        """A figure of this geometry, its subplot parameters set, labels and notes drawn."""
        text = "\n".join(textwrap.fill(n, 140) for n in notes)
        note_h = (_NOTE_LINE * (text.count("\n") + 1) + 0.1) if notes else 0.0
        left = self.left + (_LABEL if ylabel else 0.0)
        bottom = self.bottom + note_h + (_LABEL if xlabel else 0.0)
        pw, ph = self.panel
        width = left + self.ncols * pw + (self.ncols - 1) * self.gap[0] + self.right
        height = bottom + self.nrows * ph + (self.nrows - 1) * self.gap[1] + self.top
        fig = new_figure(width, height)
        fig.subplots_adjust(
            left=left / width,
            right=1 - self.right / width,
            bottom=bottom / height,
            top=1 - self.top / height,
            wspace=self.gap[0] / pw,
            hspace=self.gap[1] / ph,
        )
        middle_x = (left + (width - self.right)) / 2 / width
        middle_y = (bottom + (height - self.top)) / 2 / height
        if xlabel:
            fig.text(
                middle_x, (note_h + 0.05) / height, xlabel, ha="center", va="bottom", fontsize=8
            )
        if ylabel:
            fig.text(
                0.06 / width, middle_y, ylabel, rotation=90, ha="left", va="center", fontsize=8
            )
        if notes:
            fig.text(
                0.06 / width,
                0.05 / height,
                text,
                fontsize=7,
                color="0.3",
                va="bottom",
                gid=NOTE_GID,
            )
        return fig


def new_figure(width: float, height: float) -> Figure:
    """A figure without pyplot (nothing registered, no GUI backend involved)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def facet_grid(fig: Figure, layout: Layout, n: int, *, shared: bool = True) -> list:
    """The first ``n`` panels of ``layout`` (axes shared unless ``shared`` is false), the
    unused cells of the last row removed; a panel with none below it shows its x tick labels."""
    grid = fig.subplots(layout.nrows, layout.ncols, sharex=shared, sharey=shared, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[n:]:
        ax.remove()
    for i, ax in enumerate(axes[:n]):
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)  # small panels: few ticks (each tick is costly to draw)
        if i + layout.ncols >= n:
            ax.tick_params(labelbottom=True)
    return axes[:n]


def log_axis(ax, values) -> None:
    """A log y axis when ``values`` span more than a decade and a half, with a few
    plain-text labels (no minor ticks, no mathtext: the default's many ticks and typeset
    labels cost more than the rest of a panel); else the linear axis stays."""
    from matplotlib.ticker import LogFormatter, LogLocator, NullLocator

    positive = np.asarray(values, dtype=float)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if positive.size == 0 or positive.max() / positive.min() < 30:
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=4))
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=True))
    ax.yaxis.set_minor_locator(NullLocator())


def _inches(fig: Figure) -> tuple[float, float]:
    w, h = fig.get_size_inches()
    return float(w), float(h)


def legend_right(fig: Figure, *args, fontsize: float = 8, **kw) -> None:
    """A figure legend right of the panels, in the right margin the layout left."""
    p = fig.subplotpars
    fig.legend(
        *args,
        loc="upper left",
        bbox_to_anchor=(p.right + 0.1 / fig.get_figwidth(), p.top),
        fontsize=fontsize,
        frameon=False,
        **kw,
    )


def legend_above(fig: Figure, handles, labels=None, *, ncols: int) -> None:
    """A figure legend in one row above the panels, in the top margin the layout left."""
    fig.legend(
        handles=handles,
        **({} if labels is None else {"labels": labels}),
        loc="lower center",
        bbox_to_anchor=(0.5, fig.subplotpars.top + 0.3 / fig.get_figheight()),
        ncols=ncols,
        fontsize=8,
        frameon=False,
    )


def layer_key(fig: Figure, layers: Sequence[str], colors, handles=None) -> None:
    """A legend right of the panels (few layers) or a colorbar keyed by depth (many);
    the figure's right margin is :func:`key_width` wide."""
    w, h = _inches(fig)
    p = fig.subplotpars
    names = short_names(layers)
    if len(layers) <= LEGEND_MAX:
        legend_right(fig, handles, names, fontsize=7, title="layer input of", title_fontsize=7)
        return
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    n = len(layers)
    cax = fig.add_axes((p.right + 0.15 / w, p.bottom, 0.12 / w, p.top - p.bottom))
    mappable = ScalarMappable(BoundaryNorm(np.arange(n + 1) - 0.5, n), ListedColormap(colors))
    bar = fig.colorbar(mappable, cax=cax)
    every = max(1, -(-n // max(4, int((p.top - p.bottom) * h / 0.11))))
    bar.set_ticks(np.arange(0, n, every), labels=names[::every], fontsize=6)
    _boundary_marks(bar, n)
    bar.ax.set_title("layer,\nby depth", fontsize=6, loc="left", y=1.0)


def _boundary_marks(bar, n: int) -> None:
    """The colorbar's minor ticks (one per layer boundary) as one line of tick markers.

    Matplotlib builds a whole tick (lines, grid line, labels) for each of the ``n + 1``
    boundaries; one :class:`~matplotlib.lines.Line2D` of right-pointing tick markers
    draws the same marks at a small part of the cost.
    """
    from matplotlib import rcParams
    from matplotlib.lines import Line2D
    from matplotlib.markers import TICKRIGHT

    bar.minorticks_off()
    ax = bar.ax
    marks = Line2D(
        np.ones(n + 1),
        np.arange(n + 1) - 0.5,
        ls="none",
        marker=TICKRIGHT,
        markersize=rcParams["ytick.minor.size"],
        markeredgewidth=rcParams["ytick.minor.width"],
        color=rcParams["ytick.color"],
        transform=ax.get_yaxis_transform(),
        clip_on=False,
        zorder=2.01,
    )
    ax.add_artist(marks)
