"""Figures from a store: each function answers one question and returns a matplotlib Figure.

>>> import gramlin_analyze.plot as gp
>>> fig = gp.tl_over_steps("digits.zarr")            # doctest: +SKIP
>>> fig.savefig("tl.png")                              # doctest: +SKIP

Every function takes a store path or URL, its DataTree (``ga.open``) or its
``/metrics`` Dataset (figures of per-layer matrices need one of the first two),
and ``layers=`` (names, or globs such as ``"bert.encoder.layer.1*"``). Layers are
ordered by depth as their names imply (``plot.depth_order``), not alphabetically;
layers without the data a figure needs are skipped with a note under it; rows
of steps that are not ``ok`` are never drawn. Only ``/metrics``, ``/steps`` and
attributes are read. Figures are made without pyplot (no GUI backend; Agg
draws PNGs), and each drawn line or image carries a ``gid`` naming its metric
and layer, so what a figure shows can be checked against the store.

Comparison figures (``runs_tl_over_steps``, ``final_tl_by``, ``tl_gap_by``) take
several stores (paths, a glob) or ``ga.open_runs(...)``'s DataTree instead.
"""

from __future__ import annotations

from gramlin_analyze._lazy import lazy_attributes

__all__ = [
    "FIGURES",
    "FigureSpec",
    "alignment_by_layer",
    "available_figures",
    "cka_to_final",
    "depth_order",
    "final_tl_by",
    "gram_vc_alignment",
    "gram_vs_vcs",
    "interval_consistency",
    "load",
    "load_runs",
    "neural_collapse",
    "rank_over_steps",
    "runs_tl_over_steps",
    "spectra",
    "tl_heatmap",
    "tl_gap_by",
    "tl_over_steps",
    "tl_vs_depth",
]

# public name -> module; loaded on first use, so importing the package imports no matplotlib
_LAZY = {
    "tl_over_steps": "linearity",
    "tl_vs_depth": "linearity",
    "tl_heatmap": "linearity",
    "gram_vc_alignment": "alignment",
    "alignment_by_layer": "alignment",
    "gram_vs_vcs": "alignment",
    "interval_consistency": "intervals",
    "rank_over_steps": "spectrum",
    "spectra": "spectrum",
    "neural_collapse": "representation",
    "cka_to_final": "representation",
    "runs_tl_over_steps": "runs",
    "final_tl_by": "runs",
    "tl_gap_by": "runs",
    "load_runs": "_runs",
    "depth_order": "_order",
    "load": "_source",
    "FIGURES": "_registry",
    "FigureSpec": "_registry",
    "available_figures": "_registry",
}


__getattr__, __dir__ = lazy_attributes(
    __name__, {k: "." + v for k, v in _LAZY.items()}, __all__, globals()
)
