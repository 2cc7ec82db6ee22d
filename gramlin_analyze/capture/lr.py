"""Learning rates per checkpoint: a user schedule, a constant, or checkpoint metadata.

A schedule file lists ``(step, lr)`` pairs; the rate at a step is the entry
with the greatest step at or before it (a piecewise-constant schedule), and
a step before the first entry is an error rather than a guess.

Accepted files:

- CSV with two columns ``step,lr`` (a header row is optional);
- JSON: ``[[step, lr], ...]``, ``[{"step": s, "lr": lr}, ...]``, or
  ``{"<step>": lr, ...}``.
"""

from __future__ import annotations

import bisect
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gramlin_analyze.errors import UsageError

__all__ = ["LRSchedule", "load_lr_schedule", "resolve_lr"]


@dataclass(frozen=True)
class LRSchedule:
    """A piecewise-constant learning-rate schedule.

    Attributes
    ----------
    steps : tuple of int
        Strictly increasing steps at which the rate changes.
    lrs : tuple of float
        The rate from each step on.
    path : pathlib.Path or None
        The file it was read from.
    """

    steps: tuple[int, ...]
    lrs: tuple[float, ...]
    path: Path | None = None

    def lr_at(self, step: int) -> float:
        """The rate in effect at ``step``.

        Parameters
        ----------
        step : int
            Optimizer step.

        Returns
        -------
        float

        Raises
        ------
        UsageError
            If ``step`` precedes the schedule's first entry.
        """
        i = bisect.bisect_right(self.steps, int(step)) - 1
        if i < 0:
            where = f" in {str(self.path)!r}" if self.path else ""
            raise UsageError(
                f"step {step} precedes the first entry (step {self.steps[0]}) of the "
                f"learning-rate schedule{where}; add an entry at or before step {step}"
            )
        return self.lrs[i]

    __call__ = lr_at


def _pairs_from_json(data: Any, path: Path) -> list[tuple[Any, Any]]:
    if isinstance(data, dict):
        return list(data.items())
    if isinstance(data, list):
        pairs = []
        for item in data:
            if isinstance(item, dict) and {"step", "lr"} <= set(item):
                pairs.append((item["step"], item["lr"]))
            elif isinstance(item, list | tuple) and len(item) == 2:
                pairs.append((item[0], item[1]))
            else:
                raise UsageError(
                    f"learning-rate schedule {str(path)!r}: entry {item!r} is neither "
                    "[step, lr] nor {'step': ..., 'lr': ...}"
                )
        return pairs
    raise UsageError(
        f"learning-rate schedule {str(path)!r} holds a JSON {type(data).__name__}; "
        "write a list of [step, lr] pairs or an object {step: lr}"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pairs_from_csv(text: str, path: Path) -> list[tuple[Any, Any]]:
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and not _is_number(rows[0][0]):
        rows = rows[1:]  # a header row such as "step,lr"
    pairs = []
    for row in rows:
        if len(row) != 2:
            raise UsageError(
                f"learning-rate schedule {str(path)!r}: row {row!r} does not have the two "
                "columns step,lr"
            )
        pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def load_lr_schedule(path: str | Path) -> LRSchedule:
    """Read a learning-rate schedule from CSV or JSON.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.csv`` or ``.json`` file of ``(step, lr)`` pairs.

    Returns
    -------
    LRSchedule

    Raises
    ------
    UsageError
        If the file is missing or malformed, a step repeats, a step is not a
        non-negative integer, or a rate is not a finite non-negative number.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"learning-rate schedule {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"learning-rate schedule {str(path)!r} is not valid JSON: {err}"
            ) from err
        raw = _pairs_from_json(data, path)
    elif path.suffix.lower() == ".csv":
        raw = _pairs_from_csv(text, path)
    else:
        raise UsageError(
            f"learning-rate schedule {str(path)!r} must be a .csv or .json file of (step, lr) pairs"
        )
    if not raw:
        raise UsageError(f"learning-rate schedule {str(path)!r} has no entries")
    table: dict[int, float] = {}
    for s, lr in raw:
        try:
            step_f = float(s)
            lr_f = float(lr)
        except (TypeError, ValueError) as err:
            raise UsageError(
                f"learning-rate schedule {str(path)!r}: entry ({s!r}, {lr!r}) is not numeric"
            ) from err
        if not step_f.is_integer() or step_f < 0:
            raise UsageError(
                f"learning-rate schedule {str(path)!r}: step {s!r} is not a non-negative integer"
            )
        if not np.isfinite(lr_f) or lr_f < 0:
            raise UsageError(
                f"learning-rate schedule {str(path)!r}: rate {lr!r} at step {s} is not a finite "
                "non-negative number"
            )
        step = int(step_f)
        if step in table:
            raise UsageError(f"learning-rate schedule {str(path)!r}: step {step} appears twice")
        table[step] = lr_f
    steps = tuple(sorted(table))
    return LRSchedule(steps=steps, lrs=tuple(table[s] for s in steps), path=path)


def resolve_lr(
    step: int,
    *,
    meta_lr: float | None = None,
    constant: float | None = None,
    schedule: LRSchedule | None = None,
) -> tuple[float | None, str]:
    """The learning rate at ``step`` and where it came from.

    What the user gives (a schedule or a constant) wins over what the
    checkpoint's metadata says.

    Parameters
    ----------
    step : int
        Optimizer step of the checkpoint.
    meta_lr : float, optional
        The rate recorded in the checkpoint (optimizer state, trainer state).
    constant : float, optional
        A constant rate given by the user.
    schedule : LRSchedule, optional
        A schedule given by the user.

    Returns
    -------
    tuple of (float or None, str)
        The rate, and its source: ``"schedule:<path>"`` (or ``"schedule"``),
        ``"constant"``, ``"checkpoint"``, or ``"unknown"`` with rate None.

    Raises
    ------
    UsageError
        If both a schedule and a constant are given, or the schedule does not
        cover ``step``.
    """
    if schedule is not None and constant is not None:
        raise UsageError(
            "give either a learning-rate schedule or a constant learning rate, not both"
        )
    if schedule is not None:
        source = f"schedule:{schedule.path}" if schedule.path is not None else "schedule"
        return schedule.lr_at(step), source
    if constant is not None:
        if not np.isfinite(constant) or constant < 0:
            raise UsageError(
                f"constant learning rate {constant!r} is not a finite non-negative number"
            )
        return float(constant), "constant"
    if meta_lr is not None:
        return float(meta_lr), "checkpoint"
    return None, "unknown"
