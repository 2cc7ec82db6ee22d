"""``analyze``: reducers over a whole store, incremental, into ``/metrics``."""

from gramlin_analyze.analysis.driver import AnalyzeReport, analyze
from gramlin_analyze.analysis.metrics import FAMILIES, METRIC_DOCS

__all__ = ["analyze", "AnalyzeReport", "FAMILIES", "METRIC_DOCS"]
