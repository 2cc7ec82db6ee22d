"""Reports and tables from a store: one self-contained HTML page, figure files, the
per-layer summary and tidy exports of ``/metrics``.

>>> from gramlin_analyze.report import build_report, summary_frame
>>> build_report("digits.zarr", "digits.html", png_dir="figures")   # doctest: +SKIP
>>> summary_frame(gramlin_analyze.plot.load("digits.zarr"))         # doctest: +SKIP

Modules: ``build`` (the report's stages), ``html`` (the page), ``overview``
(run summary and warnings from ``/steps`` and attributes), ``summary`` (the
per-layer table and tidy exports), ``commands`` (the ``report`` and
``summary`` subcommands). Names are loaded on first use: importing this
package imports neither matplotlib nor xarray.
"""

from __future__ import annotations

__all__ = [
    "ReportResult",
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
    "default_output": "build",
    "format_table": "summary",
    "summary_frame": "summary",
    "table_records": "summary",
    "tidy_frame": "summary",
}


def __getattr__(name: str):
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
