"""``build_comparison_report``: several runs on one self-contained HTML page.

TL per layer over training with a line per run (seeds pooled into a mean and its
spread), final TL and a layer-to-layer TL gap against a run attribute, the runs at
a glance and one table of every run's layers. The page is made by the same
``html.page`` as a single run's report, so it too opens offline with nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from gramlin_analyze.errors import GramlinError, UsageError
from gramlin_analyze.plot._registry import FigureSpec
from gramlin_analyze.report.build import ReportResult, draw_figures, exporter
from gramlin_analyze.report.overview import Overview

__all__ = ["COMPARISON_FIGURES", "build_comparison_report", "comparison_output", "default_by"]

_BY = "the runs' attribute given by --by"
#: The comparison page's figures, in reading order.
COMPARISON_FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "runs_tl_over_steps",
        "Target linearity over training, by run",
        "Do the runs linearize their layers' inputs alike, and when do they part?",
        "runs:runs_tl_over_steps",
        ("target_linearity",),
    ),
    FigureSpec(
        "final_tl_by",
        "Final target linearity against a run attribute",
        f"How does each layer's TL at the end of training depend on {_BY} "
        "(the paper: the last layer's TL falls as the label noise grows)?",
        "runs:final_tl_by",
        ("target_linearity",),
    ),
    FigureSpec(
        "tl_gap_by",
        "TL gap between two layers against a run attribute",
        f"How much more target-linear is the deeper layer's input, depending on {_BY}?",
        "runs:tl_gap_by",
        ("target_linearity",),
    ),
)


@dataclass(frozen=True, slots=True)
class _Drawing:
    """What the figure functions of one comparison receive: the runs and the options."""

    runs: object
    by: str | None
    gap: list[str] | None

    def draw_kwargs(self, name: str) -> dict:
        if name == "tl_gap_by":
            return {"by": self.by, "layers": self.gap}
        return {"by": self.by} if name == "final_tl_by" else {}


class _Spec:
    """A :class:`FigureSpec` whose ``draw`` passes the comparison's options along."""

    def __init__(self, spec: FigureSpec, drawing: _Drawing):
        self.spec, self.drawing = spec, drawing
        self.name, self.title, self.question = spec.name, spec.title, spec.question
        if drawing.by is not None:  # say which attribute, now that it is known
            self.title = spec.title.replace("a run attribute", drawing.by)
            self.question = spec.question.replace(_BY, drawing.by)

    def draw(self, source):
        return self.spec.draw(source, **self.drawing.draw_kwargs(self.name))


def comparison_output(stores: Sequence[str]) -> Path:
    """``runs.report.html`` beside the first local store, in the working directory for URLs."""
    first = stores[0]
    if "://" in first:
        return Path("runs.report.html")
    return Path(first.rstrip("/")).parent / "runs.report.html"


def default_by(runs) -> str | None:
    """The one run attribute besides ``seed`` whose value differs between runs, if one."""
    varying = [
        a
        for a in runs.attributes
        if a != "seed" and len({str(v) for v in runs.metrics[a].values}) > 1
    ]
    return varying[0] if len(varying) == 1 else None


def _overview(tree, runs, align: str) -> Overview:
    """A fact row per run (store, steps, attributes) and warnings for runs to doubt."""
    ds = tree["metrics"].to_dataset()
    facts = [("runs", str(ds.sizes["run"])), ("aligned by", align)]
    if runs.attributes:
        facts.append(("run attributes", ", ".join(runs.attributes)))
    warnings = []
    ok = ds["ok"].values
    axis = ds[runs.axis].values
    for i, name in enumerate(runs.runs):
        rows = axis[ok[i]]
        span = f"{rows.min():g}..{rows.max():g}" if rows.size else "none"
        attrs = ", ".join(f"{a}={ds[a].values[i]}" for a in runs.attributes)
        store = str(ds["store"].values[i])
        facts.append(
            (name, f"{store}; {rows.size} ok {runs.axis}s ({span}){'; ' + attrs if attrs else ''}")
        )
        if not rows.size:
            warnings.append(f"run {name} ({store}) has no ok {runs.axis} with metrics")
    warnings += _uneven_layers(runs)
    return Overview(tuple(facts), tuple(warnings))


def _uneven_layers(runs) -> list[str]:
    """Layers with TL in some runs but not others: their comparison is partial."""
    if "target_linearity" not in runs.metrics:
        return []
    has = np.isfinite(runs.metrics["target_linearity"].values).any(axis=1)  # (run, layer)
    out = []
    for j, layer in enumerate(runs.layers):
        if has[:, j].any() and not has[:, j].all():
            lacking = [r for r, h in zip(runs.runs, has[:, j], strict=True) if not h]
            out.append(f"layer {layer} has no TL in run(s) {', '.join(lacking)}")
    return out


def _table(names, stores, layers, storage_options, step):
    from gramlin_analyze.plot._source import load
    from gramlin_analyze.report.html import runs_table
    from gramlin_analyze.report.runs_table import runs_summary_frame

    try:
        sources = [load(s, layers=layers, storage_options=storage_options) for s in stores]
        df = runs_summary_frame(sources, names, step=step, stores=stores)
    except GramlinError as err:
        return ("Per run and layer", f'<p class="note">{err}</p>')
    return ("Per run and layer, each run at its last ok step", runs_table(df))


def _specs(runs, by: str | None, gap: list[str] | None) -> tuple[list[_Spec], list[str]]:
    """The figures to draw, and those not drawn with what they need."""
    if by is None:
        by = default_by(runs)
    elif by not in runs.attributes:
        runs.attribute(by)  # raises, naming the attributes there are
    drawing = _Drawing(runs, by, gap)
    specs, missing = [], []
    for spec in COMPARISON_FIGURES:
        if not runs.layers_with("target_linearity"):
            missing.append(f"{spec.title}: no run has target_linearity (run analyze on each store)")
        elif spec.name != "runs_tl_over_steps" and by is None:
            have = ", ".join(runs.attributes) or "none (ingest --run-attr key=value records them)"
            missing.append(f"{spec.title}: give --by ATTR, a run attribute; the runs have: {have}")
        else:
            specs.append(_Spec(spec, drawing))
    return specs, missing


def build_comparison_report(
    stores: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    by: str | None = None,
    gap: list[str] | None = None,
    align: str = "step",
    png_dir: str | os.PathLike | None = None,
    svg: bool = False,
    layers: list[str] | None = None,
    storage_options: dict | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ReportResult:
    """Write the comparison report of several stores (default :func:`comparison_output`).

    ``stores``: paths, URLs or globs (see :func:`gramlin_analyze.open_runs`). ``by``: the
    run attribute the final-TL and TL-gap figures put on their x axis (default: the one
    attribute besides ``seed`` that differs between runs, if there is exactly one);
    ``gap``: the two layers of the TL gap (default the first and last with TL);
    ``align``: ``"step"``, ``"epoch"`` or ``"tokens"``. Reads only ``/metrics``, ``/steps`` and
    attributes; other options as :func:`~gramlin_analyze.report.build.build_report`.
    """
    from gramlin_analyze._version import __version__
    from gramlin_analyze.plot._runs import load_runs
    from gramlin_analyze.report.html import page
    from gramlin_analyze.runs import expand_stores, open_runs

    if svg and png_dir is None:
        raise UsageError("--svg writes SVGs beside the PNGs: give --png DIR too")
    if gap is not None and len(gap) != 2:
        raise UsageError(f"--gap takes two layers (first, second), not {len(gap)}")
    urls = expand_stores(list(stores), storage_options=storage_options)
    tree = open_runs(urls, align=align, storage_options=storage_options)
    runs = load_runs(tree, layers=layers)
    specs, missing = _specs(runs, by, gap)
    png_path = Path(png_dir).absolute() if png_dir is not None else None
    if png_path is not None:
        png_path.mkdir(parents=True, exist_ok=True)
    drawn, files, not_drawn = draw_figures(runs, specs, exporter(png_path, svg), progress)
    names = [str(r) for r in tree["metrics"]["run"].values]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    ov = _overview(tree, runs, align)
    text = page(
        title=f"gramlin-analyze comparison: {len(names)} runs",
        overview=ov,
        figures=drawn,
        missing=missing + not_drawn,
        table=None,
        footer=f"Written by gramlin-analyze {__version__} on {when} from {', '.join(urls)}. "
        "Metric definitions: docs/metrics.md of gramlin-analyze.",
        subtitle="Target linearity across training runs, aligned by "
        f"{align} (runs: {', '.join(names)}).",
        summary_heading="Runs",
        table_section=_table(names, urls, layers, storage_options, "last"),
    )
    html_path = Path(output) if output is not None else comparison_output(urls)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(text, encoding="utf-8")
    return ReportResult(html_path, tuple(files), tuple(missing + not_drawn), ov.warnings)
