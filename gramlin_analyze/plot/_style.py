"""How every figure looks: colors by depth, names, labels from attributes, lines.

Layers are colored by depth along a colormap whose lightness rises
monotonically (viridis, stopped before its palest yellow), so the order stays
readable in grayscale print; line styles and markers tell a few layers apart.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "LEGEND_MAX",
    "SHORT",
    "axis_label",
    "depth_colors",
    "draw_layer_lines",
    "short_names",
    "skipped_note",
    "step_label",
    "thin_ticks",
]

#: Up to this many layers get a legend; more get a colorbar keyed by depth.
LEGEND_MAX = 10
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Short names of the metrics the figures draw, for titles and keys.
SHORT = {
    "target_linearity": "TL",
    "tl_null": "null min(1, d/N)",
    "gram_vc_corr": "Gram ~ VC",
    "gram_vcs_acc_corr": "Gram change ~ accumulated VCS",
    "nfa_corr": "Gram ~ AGOP",
    "vcs_interval_corr": "interval consistency (Pearson)",
    "vcs_interval_ratio": "estimate / actual Gram change",
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "nc1": "NC1",
    "nc2_equinorm": "NC2 equinorm",
    "nc2_equiangularity": "NC2 equiangularity",
    "nc3": "NC3",
    "nc4": "NC4",
    "cka_to_final": "CKA to the final step",
}


def depth_colors(n: int) -> list[tuple[float, ...]]:
    """``n`` colors from shallow (dark) to deep (light) along viridis."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [tuple(cmap(x)) for x in np.linspace(0.0, 0.85, max(n, 1))][:n]


def short_names(layers: Sequence[str], width: int = 32) -> list[str]:
    """Layer names without the dotted prefix they all share; a name still longer than
    ``width`` keeps its last segments (where layers of one block differ)."""
    parts = [n.split(".") for n in layers]
    k = 0
    while len(parts) > 1 and all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    if k and any(p[k].isdigit() for p in parts):
        k -= 1  # "layer.0.attention", not "0.attention"
    out = []
    for segments in parts:
        p = segments[k:]
        while len(".".join(p)) > width - 1 and len(p) > 1:
            p = p[1:]
        name = ".".join(p)
        if len(p) < len(segments) - k or len(name) > width:
            name = "…" + name[-(width - 1) :]
        out.append(name)
    return out


def axis_label(attrs: dict, fallback: str, width: int = 40) -> str:
    """``long_name [units]`` from a variable's attributes, wrapped."""
    label = str(attrs.get("long_name", fallback))
    units = attrs.get("units")
    if units and units != "1":
        label += f" [{units}]"
    return "\n".join(textwrap.wrap(label, width))


def step_label(metrics) -> str:
    return axis_label(dict(metrics["step"].attrs), "step") if "step" in metrics else "step"


def draw_layer_lines(ax: Axes, metrics, var: str, layers: Sequence[str], colors) -> list:
    """One line per layer of ``var`` over steps (each line's gid ``var|layer``); the lines."""
    steps = metrics["step"].values
    few = len(layers) <= LEGEND_MAX
    lines = []
    values = metrics[var].sel(layer=list(layers)).transpose("layer", "step").values
    for i, (layer, color, y) in enumerate(zip(layers, colors, values, strict=True)):
        (line,) = ax.plot(
            steps,
            y,
            color=color,
            lw=1.4 if few else 1.0,
            ls=_STYLES[i % len(_STYLES)] if few else "-",
            marker=_MARKERS[i % len(_MARKERS)] if few else None,
            markevery=max(1, len(steps) // 8),
            ms=4,
            label=layer,
        )
        line.set_gid(f"{var}|{layer}")
        lines.append(line)
    ax.grid(True, alpha=0.3)
    return lines


def skipped_note(layers: Sequence[str], why: str) -> list[str]:
    """One note naming the skipped ``layers`` (the first few) and ``why``."""
    if not layers:
        return []
    shown = ", ".join(layers[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
    return [f"Skipped {len(layers)} layer(s) {why}: {shown}."]


def thin_ticks(ax: Axes, axis: str, labels: Sequence[str], most: int = 24) -> None:
    """Tick labels on ``axis`` at every k-th position, at most ``most`` of them."""
    every = max(1, -(-len(labels) // most))
    pos = np.arange(0, len(labels), every)
    shown = [labels[i] for i in pos]
    if axis == "x":
        rotation = 90 if max((len(t) for t in shown), default=0) > 6 else 0
        ax.set_xticks(pos, shown, rotation=rotation, fontsize=7)
    else:
        ax.set_yticks(pos, shown, fontsize=7)
