"""The per-layer table of several runs: one row per (run, layer), each run at its own step.

Runs of a sweep rarely end at the same step, so each run's row is taken at its
own last ``ok`` step (or ``first``, or a given number every run has), and the step
is a column. Columns are those of the single-run table that any run has data for.
"""

from __future__ import annotations

from collections.abc import Sequence

from gramlin_analyze.errors import GramlinError
from gramlin_analyze.plot._source import Source
from gramlin_analyze.report.summary import COLUMNS, format_cell, summary_frame

__all__ = ["format_runs_table", "runs_records", "runs_summary_frame"]

KEYS = ("run", "layer", "step")


def runs_summary_frame(
    sources: Sequence[Source],
    names: Sequence[str],
    *,
    step: int | str | None = "last",
    stores: Sequence[str] | None = None,
):
    """One DataFrame of the runs' tables: columns ``run, layer, step`` and the metric
    headers of :data:`~gramlin_analyze.report.summary.COLUMNS` (in that order) that some
    run has; ``df.attrs["meanings"]`` their meanings. An error names the run's store."""
    import pandas as pd

    frames, meanings = [], {}
    for i, (src, name) in enumerate(zip(sources, names, strict=True)):
        try:
            df = summary_frame(src, step=step)
        except GramlinError as err:
            where = stores[i] if stores is not None else name
            raise type(err)(f"{where}: {err}") from err
        at = df.attrs["step"]
        meanings |= df.attrs["meanings"]
        df = df.reset_index()
        df.insert(0, "run", name)
        df.insert(2, "step", at)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    order = [c.header for c in COLUMNS if c.header in meanings]
    out = out[[*KEYS, *dict.fromkeys(order)]]
    out.attrs["meanings"] = {h: meanings[h] for h in dict.fromkeys(order)}
    return out


def format_runs_table(df) -> str:
    """``df`` of :func:`runs_summary_frame` as aligned text, names never cut."""
    fmts = {c.header: c.fmt for c in COLUMNS}
    heads = {"run": "run", "layer": "layer input of", "step": "step"}
    cells = {k: [str(v) for v in df[k].values] for k in KEYS}
    metrics = [c for c in df.columns if c not in KEYS]
    cells |= {c: [format_cell(float(v), fmts.get(c, ".3f")) for v in df[c].values] for c in metrics}
    widths = {c: max(len(heads.get(c, c)), *(len(v) for v in cells[c])) + 2 for c in df.columns}

    def row(values: dict[str, str]) -> str:
        left = "".join(f"{values[k]:<{widths[k]}}" for k in ("run", "layer"))
        return left + "".join(f"{values[c]:>{widths[c]}}" for c in ("step", *metrics))

    head = row({c: heads.get(c, c) for c in df.columns})
    lines = [head, "-" * len(head)]
    lines += [row({c: cells[c][i] for c in df.columns}) for i in range(len(df))]
    return "\n".join(lines)


def runs_records(df) -> list[dict]:
    """``df``'s rows as JSON-ready dicts (NaN as None)."""
    import math

    out = []
    for rec in df.to_dict("records"):
        row = {"run": str(rec["run"]), "layer": str(rec["layer"]), "step": int(rec["step"])}
        for k, v in rec.items():
            if k not in KEYS:
                row[k] = float(v) if math.isfinite(float(v)) else None
        out.append(row)
    return out
