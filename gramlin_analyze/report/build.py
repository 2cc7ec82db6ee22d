"""``build_report``: every figure the store has data for, the run summary and the
per-layer table, as one self-contained HTML file (and PNG/SVG files on request).

Stages: read the store's ``/metrics``, ``/steps`` and attributes once; draw each
available figure and render it; assemble the page; write the files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from gramlin_analyze.errors import GramlinError, UsageError

__all__ = ["ReportResult", "build_report", "default_output"]

#: Resolution of embedded and exported PNGs (figures are sized in inches at 100 dpi).
DPI = 100


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What a report wrote: the HTML page, each figure file, the figures not drawn and why."""

    html: Path
    files: tuple[Path, ...]
    missing: tuple[str, ...]
    warnings: tuple[str, ...]


def default_output(store: str) -> Path:
    """``<store name>.report.html`` beside a local store, in the working directory for a URL."""
    name = Path(store.rstrip("/")).name or "store"
    stem = name[: -len(".zarr")] if name.endswith(".zarr") else name
    if "://" in store:
        return Path(f"{stem}.report.html")
    return Path(store.rstrip("/")).parent / f"{stem}.report.html"


def _in_view_ticks(fig) -> None:
    """Each axis's major ticks fixed to those its locator puts inside the view.

    A locator also returns a tick beyond each end of the view; matplotlib builds a tick
    (two lines, a grid line, two labels) for each before dropping it from the drawing,
    up to a third of a small panel's ticks. Fixing the ticks drawn anyway changes no pixel;
    done here, at render time, so a figure handed to the user keeps its live locators.
    Axes with fixed ticks (named layers, steps) and colorbars are left as they are.
    """
    from matplotlib.ticker import FixedLocator

    for ax in fig.axes:
        if hasattr(ax, "_colorbar"):
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_locator(), FixedLocator):
                continue
            locs = np.asarray(axis.get_majorticklocs(), dtype=float)
            lo, hi = sorted(axis.get_view_interval())
            slack = 1e-10 * max(abs(lo), abs(hi), 1.0)
            keep = locs[(locs >= lo - slack) & (locs <= hi + slack)]
            if 0 < keep.size < locs.size:
                axis.set_major_locator(FixedLocator(keep))


def _render(fig, fmt: str) -> bytes:
    _in_view_ticks(fig)
    buf = io.BytesIO()
    if fmt == "png":  # light compression: quicker to encode, files a little larger
        fig.savefig(buf, format=fmt, dpi=DPI, pil_kwargs={"compress_level": 1})
    else:
        fig.savefig(buf, format=fmt, dpi=DPI)
    return buf.getvalue()


def _notes(fig) -> tuple[str, ...]:
    from gramlin_analyze.plot._layout import NOTE_GID

    return tuple(t.get_text().replace("\n", " ") for t in fig.texts if t.get_gid() == NOTE_GID)


def draw_figures(src, specs, export, progress) -> tuple[list, list[Path], list[str]]:
    """Each of ``specs`` drawn, rendered (and exported); and those without data, and why."""
    from gramlin_analyze.report.html import RenderedFigure

    drawn, files, missing = [], [], []
    for i, spec in enumerate(specs):
        if progress:
            progress(i, len(specs), spec.name)
        try:
            fig = spec.draw(src)
        except GramlinError as err:  # data the figure needs is absent for every layer
            missing.append(f"{spec.title}: {err}")
            continue
        png = _render(fig, "png")
        size = (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))  # IHDR
        drawn.append(RenderedFigure(spec.name, spec.title, spec.question, png, size, _notes(fig)))
        files += export(spec.name, fig, png)
    return drawn, files, missing


def exporter(png_dir: Path | None, svg: bool) -> Callable:
    """``export(name, fig, png)``: the files written for one figure (none without a DIR)."""

    def export(name: str, fig, png: bytes) -> list[Path]:
        if png_dir is None:
            return []
        out = [png_dir / f"{name}.png"]
        out[0].write_bytes(png)
        if svg:
            out.append(png_dir / f"{name}.svg")
            out[1].write_bytes(_render(fig, "svg"))
        return out

    return export


def _draw_all(src, job, helper, progress):
    """Every available figure, in reading order: half of them by ``helper`` when there is
    one (the parent takes the even places, the helper the odd), or all here."""
    from gramlin_analyze.plot._registry import FIGURES, available_figures

    specs = available_figures(src)
    theirs = specs[1::2] if helper is not None and len(specs) > 1 else []
    mine = [s for s in specs if s not in theirs]
    if helper is not None:
        helper.hand([s.name for s in theirs])
    export = exporter(job.png_dir, job.svg)
    drawn, files, missing = draw_figures(src, mine, export, progress)
    if theirs:
        got = helper.result() or draw_figures(src, theirs, export, None)
        drawn, files, missing = drawn + got[0], files + got[1], missing + got[2]
    order = {spec.name: i for i, spec in enumerate(FIGURES)}
    drawn.sort(key=lambda f: order[f.name])
    names = {s.name for s in specs}
    for spec in FIGURES:
        if spec.name not in names:
            missing.append(f"{spec.title}: the store has no {' or '.join(spec.needs)}")
    if progress:
        progress(len(specs), len(specs), "")
    files.sort(key=lambda path: (order[path.stem], path.suffix != ".png"))
    return drawn, files, missing


def _start_helper(job, processes: int | None):
    from gramlin_analyze.report import parallel

    if processes is None:
        processes = (
            2
            if parallel.usable_cpus() > 1
            and (parallel.cells(job.store, job.storage_options) >= parallel.MIN_CELLS)
            else 1
        )
    return parallel.Helper.start(job) if processes > 1 else None


def build_report(
    store: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    png_dir: str | os.PathLike | None = None,
    svg: bool = False,
    layers: list[str] | None = None,
    storage_options: dict | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    processes: int | None = None,
) -> ReportResult:
    """Write the HTML report of ``store`` (default :func:`default_output`).

    Reads only ``/metrics``, ``/steps`` and attributes. ``png_dir`` also writes each
    figure as ``<name>.png`` (and ``<name>.svg`` with ``svg``); ``layers`` selects
    layers by name or glob. ``progress(done, total, figure)`` is called as figures
    are drawn. ``processes=2`` draws half the figures in a second process (the default
    does so for runs of at least :data:`~gramlin_analyze.report.parallel.MIN_CELLS`
    step x layer cells, where there is a second CPU); ``1`` draws all here.
    """
    from gramlin_analyze._version import __version__
    from gramlin_analyze.plot._source import load
    from gramlin_analyze.report.html import page
    from gramlin_analyze.report.overview import overview
    from gramlin_analyze.report.parallel import Job
    from gramlin_analyze.report.summary import summary_frame

    if svg and png_dir is None:
        raise UsageError("--svg writes SVGs beside the PNGs: give --png DIR too")
    store = os.fspath(store)
    html_path = Path(output) if output is not None else default_output(store)
    png_path = Path(png_dir).absolute() if png_dir is not None else None
    job = Job(store, layers, storage_options, png_path, svg)
    helper = _start_helper(job, processes)
    try:
        src = load(store, layers=layers, storage_options=storage_options)
        ov = overview(src, store)
        if png_path is not None:
            png_path.mkdir(parents=True, exist_ok=True)
        drawn, files, missing = _draw_all(src, job, helper, progress)
    finally:
        if helper is not None:
            helper.close()
    try:
        table = summary_frame(src) if src.metrics.data_vars else None
    except GramlinError:
        table = None
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = page(
        title=f"gramlin-analyze report: {src.attrs.get('run_name') or Path(store).name}",
        overview=ov,
        figures=drawn,
        missing=missing,
        table=table,
        footer=f"Written by gramlin-analyze {__version__} on {when} from {store}. "
        "Metric definitions: docs/metrics.md of gramlin-analyze.",
    )
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(text, encoding="utf-8")
    return ReportResult(html_path, tuple(files), tuple(missing), ov.warnings)
