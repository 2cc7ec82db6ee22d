"""Reports and tables from a store: one self-contained HTML page, figure files, the
per-layer summary and tidy exports of ``/metrics``.

>>> from gramlin_analyze.report import build_report, summary_frame
>>> build_report("digits.zarr", "digits.html", png_dir="figures")   # doctest: +SKIP
>>> summary_frame(gramlin_analyze.plot.load("digits.zarr"))         # doctest: +SKIP

Modules: ``build`` (the report's stages), ``html`` (the page), ``overview``
(run summary and warnings from ``/steps`` and attributes), ``summary`` (the
per-layer table and tidy exports), ``compare`` and ``runs_table`` (the comparison
page and table of several runs), ``commands`` (the ``report`` and
``summary`` subcommands). Names are loaded on first use: importing this
package imports neither matplotlib nor xarray.
"""

from __future__ import annotations

from gramlin_analyze._lazy import lazy_attributes

__all__ = [
    "ReportResult",
    "build_comparison_report",
    "build_report",
    "default_output",
    "format_table",
    "summary_frame",
    "table_records",
    "tidy_frame",
]

_LAZY = {
    "ReportResult": "build",
    "build_report": "build",
    "build_comparison_report": "compare",
    "default_output": "build",
    "format_table": "summary",
    "summary_frame": "summary",
    "table_records": "summary",
    "tidy_frame": "summary",
}


__getattr__, __dir__ = lazy_attributes(
    __name__, {k: "." + v for k, v in _LAZY.items()}, __all__, globals()
)
