"""What one ``analyze`` did: the families run, what was computed or skipped, and why."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AnalyzeReport"]


@dataclass
class AnalyzeReport:
    store: str
    families: list[str] = field(default_factory=list)
    computed: int = 0
    up_to_date: int = 0
    skipped_steps: dict[int, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    partial: dict[str, list[str]] = field(default_factory=dict)
    nonfinite: list[tuple[int, str]] = field(default_factory=list)
    #: one line each, shown on stderr (e.g. metrics that assume SGD on a run that used AdamW)
    warnings: list[str] = field(default_factory=list)
    #: phase-2 tasks run (a layer's trajectory, or a segment of it)
    phase2_tasks: int = 0
    #: layers whose training-time record was correlated with the Gram (analysis/recorded.py)
    recorded_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
