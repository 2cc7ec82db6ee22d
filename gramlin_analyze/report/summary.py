"""The per-layer table at one step, and tidy exports of every ``/metrics`` scalar.

The table answers "where does each layer stand": its TL against its null
baseline, how closely its Gram follows VC, the accumulated VCS and AGOP, how
consistent the checkpoint intervals are, its effective rank and collapse. Only
columns the store has data for are shown; layers are in depth order, names
never cut (the column widens). The tidy export is one row per (step, layer)
with every scalar metric as stored, plus the step's manifest status.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from gramlin_analyze.errors import MissingDataError, UsageError
from gramlin_analyze.plot._source import Source

__all__ = [
    "COLUMNS",
    "Column",
    "format_cell",
    "format_table",
    "resolve_step",
    "summary_frame",
    "table_records",
    "tidy_frame",
]


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: the metric, its header, how it is taken, its number format and meaning."""

    var: str
    header: str
    how: str  # "at": the value at the step; "first": at the first ok step; "median": over intervals up to the step
    fmt: str
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column("target_linearity", "TL", "at", ".3f", "target linearity of the layer's input"),
    Column("tl_null", "null", "at", ".3f", "its null baseline min(1, d/N)"),
    Column("target_linearity", "TL first", "first", ".3f", "TL at the first ok step"),
    Column("gram_vc_corr", "Gram~VC", "at", ".3f", "diag Pearson of W^T W and VC"),
    Column(
        "gram_vcs_acc_corr",
        "Gram~accVCS",
        "at",
        ".3f",
        "diag Pearson of W^T W - W_0^T W_0 and the trapezoid-accumulated VCS (an estimate)",
    ),
    Column(
        "gram_vcs_recorded_corr",
        "Gram~recVCS",
        "at",
        ".3f",
        "diag Pearson of W^T W and the VCS recorded at every training step (summed; the paper's Fig. 7)",
    ),
    Column(
        "dgram_vcs_recorded_corr",
        "dGram~recVCS",
        "at",
        ".3f",
        "diag Pearson of W^T W - W_0^T W_0 and the recorded VCS sum since the first recorded step",
    ),
    Column("nfa_corr", "Gram~AGOP", "at", ".3f", "full Pearson of W^T W and AGOP (NFA)"),
    Column(
        "vcs_interval_corr",
        "interval",
        "median",
        ".3f",
        "median over checkpoint intervals up to the step of the Pearson of dGram and (b-a)(VCS_a+VCS_b)/2",
    ),
    Column(
        "vcs_recorded_interval_corr",
        "rec.interval",
        "median",
        ".3f",
        "median over intervals between recorded checkpoints of the Pearson of dGram and the recorded VCS",
    ),
    Column("fle_residual", "FLE resid", "at", ".3f", "||dGram - (b-a) VCS_a|| / ||dGram||"),
    Column("effective_rank", "eff.rank", "at", ".1f", "exp of the spectral entropy of W^T W"),
    Column("nc1", "NC1", "at", ".3g", "within/between class variability of the layer's input"),
    Column("cka_to_final", "CKA final", "at", ".3f", "linear CKA to the last step's layer input"),
)


def resolve_step(src: Source, step: int | str | None) -> int:
    """The step a table is for: a number, ``"last"`` (default) or ``"first"`` ok step."""
    ok = src.ok_steps()
    if src.metrics.sizes.get("step", 0) == 0 or ok.size == 0:
        raise MissingDataError(
            "no ok step has metrics; run gramlin-analyze analyze STORE (after ingest)"
        )
    if step is None or step == "last":
        return int(ok[-1])
    if step == "first":
        return int(ok[0])
    try:
        value = int(step)
    except (TypeError, ValueError):
        raise UsageError(f"--step must be a step number, first or last, not {step!r}") from None
    if value not in set(ok.tolist()):
        shown = ", ".join(map(str, ok[:10])) + (", ..." if ok.size > 10 else "")
        raise UsageError(f"step {value} is not an ok step of this store; ok steps: {shown}")
    return value


def _column_values(src: Source, col: Column, step: int) -> np.ndarray:
    da = src.metrics[col.var]
    if col.how == "first":
        return da.sel(step=int(src.ok_steps()[0])).values
    if col.how == "median":
        upto = da.sel(step=slice(None, step)).values
        with warnings.catch_warnings():  # an all-NaN column's median is NaN, said by "-"
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(upto, axis=0)
    return da.sel(step=step).values


def summary_frame(src: Source, *, step: int | str | None = "last"):
    """The per-layer table at ``step`` as a pandas DataFrame (index: layer, depth order;
    columns: the headers of :data:`COLUMNS` the store has data for). ``df.attrs`` holds
    the step and each shown column's meaning."""
    import pandas as pd

    at = resolve_step(src, step)
    data, meanings = {}, {}
    for col in COLUMNS:
        if col.var not in src.metrics:
            continue
        values = _column_values(src, col, at)
        if np.isfinite(values).any():
            data[col.header] = values
            meanings[col.header] = col.meaning
    df = pd.DataFrame(data, index=pd.Index(src.layers, name="layer"))
    df.attrs.update(step=at, meanings=meanings)
    return df


def format_cell(value: float, fmt: str) -> str:
    """``value`` in ``fmt``; NaN (no data) as ``-``."""
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def format_table(
    df, *, formats: dict[str, str] | None = None, header: str = "layer input of"
) -> str:
    """``df`` (index: layer) as aligned text: the name column as wide as the longest name."""
    fmts = {c.header: c.fmt for c in COLUMNS} | (formats or {})
    cells = {
        c: [format_cell(float(v), fmts.get(c, ".3f")) for v in df[c].values] for c in df.columns
    }
    names = [str(n) for n in df.index]
    name_w = max([len(header), *map(len, names)]) + 2
    widths = {c: max(len(c), *(len(v) for v in cells[c])) + 2 for c in df.columns}
    head = f"{header:<{name_w}}" + "".join(f"{c:>{widths[c]}}" for c in df.columns)
    lines = [head, "-" * len(head)]
    for i, name in enumerate(names):
        lines.append(
            f"{name:<{name_w}}" + "".join(f"{cells[c][i]:>{widths[c]}}" for c in df.columns)
        )
    return "\n".join(lines)


def table_records(df) -> list[dict]:
    """``df``'s rows as JSON-ready dicts (``layer`` first; NaN as None)."""
    out = []
    for name, row in zip(df.index, df.to_dict("records"), strict=True):
        out.append(
            {"layer": str(name)}
            | {k: (float(v) if math.isfinite(float(v)) else None) for k, v in row.items()}
        )
    return out


def tidy_frame(src: Source):
    """Every ``/metrics`` scalar as stored, one row per (step, layer), with the step's
    manifest ``status``: columns ``step, layer, status, <metric>...``."""
    m = src.metrics
    if not m.data_vars:
        raise MissingDataError("no /metrics in this store; run gramlin-analyze analyze STORE")
    df = m.to_dataframe().reset_index()
    df["step"] = df["step"].astype("int64")
    df["layer"] = df["layer"].astype(str)
    status = ""
    if src.steps is not None and "status" in src.steps:
        lookup = dict(
            zip(
                src.steps["step"].values.tolist(), map(str, src.steps["status"].values), strict=True
            )
        )
        status = df["step"].map(lookup).fillna("")
    df.insert(2, "status", status)
    order = {name: i for i, name in enumerate(src.layers)}
    df = df.sort_values(["step", "layer"], key=lambda s: s.map(order) if s.name == "layer" else s)
    return df.reset_index(drop=True)
