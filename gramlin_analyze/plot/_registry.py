"""The figures a report draws, in reading order, and what each needs from the store."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from gramlin_analyze.plot._source import Source

__all__ = ["FIGURES", "FigureSpec", "available_figures"]


@dataclass(frozen=True, slots=True)
class FigureSpec:
    """One figure: its file name, title, the question it answers, the function drawing it,
    the scalar metrics it needs (any of them) and whether it reads per-layer matrices."""

    name: str
    title: str
    question: str
    function: str  # "module:attr" inside gramlin_analyze.plot
    needs: tuple[str, ...]
    matrices: str | None = None  # a /metrics/<layer> array it reads

    def draw(self, source, **kwargs):
        module, attr = self.function.split(":")
        fn: Callable = getattr(importlib.import_module(f"gramlin_analyze.plot.{module}"), attr)
        return fn(source, **kwargs)


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "tl_over_steps",
        "Target linearity over training",
        "Does each layer's input become more linearly predictive of the targets, and how far above its null baseline?",
        "linearity:tl_over_steps",
        ("target_linearity",),
    ),
    FigureSpec(
        "tl_vs_depth",
        "Target linearity against depth",
        "Does TL rise layer by layer (the paper's layer-wise figure), and with training?",
        "linearity:tl_vs_depth",
        ("target_linearity",),
    ),
    FigureSpec(
        "tl_heatmap",
        "Target linearity, layer x step",
        "Where and when does linearization happen, across every layer?",
        "linearity:tl_heatmap",
        ("target_linearity",),
    ),
    FigureSpec(
        "gram_vc_alignment",
        "Gram-VC alignment over training",
        "Does W^T W track the virtual covariance, and its change the accumulated VCS?",
        "alignment:gram_vc_alignment",
        ("gram_vc_corr", "gram_vcs_acc_corr"),
    ),
    FigureSpec(
        "alignment_by_layer",
        "Gram alignment by layer",
        "At the last step, how closely does each layer's Gram follow the VC, the accumulated VCS and the AGOP?",
        "alignment:alignment_by_layer",
        ("gram_vc_corr", "gram_vcs_acc_corr", "nfa_corr"),
    ),
    FigureSpec(
        "gram_vs_vcs",
        "Gram change against accumulated VCS",
        "Entry by entry (diagonals), does the Gram's change equal the accumulated virtual covariance shift?",
        "alignment:gram_vs_vcs",
        ("gram_vcs_acc_corr",),
        matrices="vcs_accumulated",
    ),
    FigureSpec(
        "interval_consistency",
        "Interval consistency",
        "Between which checkpoints does the first-order picture hold (Pearson near 1)?",
        "intervals:interval_consistency",
        ("vcs_interval_corr",),
    ),
    FigureSpec(
        "rank_over_steps",
        "Effective and stable rank",
        "Do the weights concentrate on fewer directions as features are learned?",
        "spectrum:rank_over_steps",
        ("effective_rank", "stable_rank"),
    ),
    FigureSpec(
        "spectra",
        "Gram spectra",
        "How does each layer's eigenvalue spectrum change from the first to the last step?",
        "spectrum:spectra",
        ("effective_rank",),
        matrices="spectrum",
    ),
    FigureSpec(
        "neural_collapse",
        "Neural collapse",
        "Do the representations collapse to their class means (NC1-NC4), the end point of linearization?",
        "representation:neural_collapse",
        ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc3", "nc4"),
    ),
    FigureSpec(
        "cka_to_final",
        "CKA to the final step",
        "When does each layer's representation settle into its final form?",
        "representation:cka_to_final",
        ("cka_to_final",),
    ),
)


def available_figures(src: Source) -> list[FigureSpec]:
    """The figures ``src`` has data for (a scalar each needs, and its matrices when it reads them)."""
    out = []
    for spec in FIGURES:
        if not any(src.has(v) for v in spec.needs):
            continue
        if spec.matrices is not None and src.location is None:
            continue
        out.append(spec)
    return out
