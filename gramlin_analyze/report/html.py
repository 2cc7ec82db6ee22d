"""The report as one HTML file that needs nothing else: figures embedded as PNG data URIs,
styles inline, system fonts, no script. It opens offline and can be mailed as is."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape

from gramlin_analyze.report.overview import Overview

__all__ = ["RenderedFigure", "page", "runs_table"]

_SUBTITLE = "Gram matrix, virtual covariance and target linearity over a training run."

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1a1a1a; background: #fff; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5rem 2rem 3rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: .85rem; }
td, th { padding: .2rem .6rem; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
table.metrics td.num, table.metrics th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td.name { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; white-space: nowrap; }
.scroll { overflow-x: auto; }
ul.warnings li { color: #8a3b00; } #contents ol { columns: 2; font-size: .9rem; }
figure { margin: 1.5rem 0 2.5rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
p.question { font-style: italic; color: #333; margin: .2rem 0 .6rem; }
.note { color: #555; font-size: .85rem; } footer { color: #777; font-size: .8rem; margin-top: 3rem; }
dl { font-size: .85rem; } dt { font-weight: 600; float: left; clear: left; width: 8rem; } dd { margin-left: 8.5rem; }
"""


@dataclass(frozen=True, slots=True)
class RenderedFigure:
    """A drawn figure: its name, title, question, PNG bytes, pixel size and notes."""

    name: str
    title: str
    question: str
    png: bytes
    size: tuple[int, int]
    notes: tuple[str, ...]


def _facts(ov: Overview) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in ov.facts)
    out = f'<table class="facts">{rows}</table>'
    if ov.warnings:
        items = "".join(f"<li>{escape(w)}</li>" for w in ov.warnings)
        out += f'<h3>Warnings</h3><ul class="warnings">{items}</ul>'
    return out


def _figure(fig: RenderedFigure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    w, h = fig.size
    alt = " ".join([fig.title + ".", *fig.notes])  # the notes are drawn under the figure too
    return (
        f'<figure id="fig-{escape(fig.name)}"><h2>{escape(fig.title)}</h2>'
        f'<p class="question">{escape(fig.question)}</p>'
        f'<img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
        f'alt="{escape(alt)}" data-figure="{escape(fig.name)}"></figure>'
    )


def _table(df) -> str:
    if df is None or df.empty:
        return '<p class="note">No metrics at an ok step yet.</p>'
    from gramlin_analyze.report.summary import COLUMNS, format_cell

    fmts = {c.header: c.fmt for c in COLUMNS}
    head = "<th>layer input of</th>" + "".join(
        f'<th class="num">{escape(c)}</th>' for c in df.columns
    )
    body = ""
    for name, row in zip(df.index, df.itertuples(index=False), strict=True):
        cells = "".join(
            f'<td class="num">{format_cell(float(v), fmts.get(c, ".3f"))}</td>'
            for c, v in zip(df.columns, row, strict=True)
        )
        body += f'<tr><td class="name">{escape(str(name))}</td>{cells}</tr>'
    meanings = "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in df.attrs.get("meanings", {}).items()
    )
    return f'<div class="scroll"><table class="metrics"><tr>{head}</tr>{body}</table></div><dl>{meanings}</dl>'


def runs_table(df) -> str:
    """The table of several runs (``run, layer, step`` and metric columns) as HTML."""
    from gramlin_analyze.report.runs_table import KEYS
    from gramlin_analyze.report.summary import COLUMNS, format_cell

    fmts = {c.header: c.fmt for c in COLUMNS}
    metrics = [c for c in df.columns if c not in KEYS]
    head = '<th>run</th><th>layer input of</th><th class="num">step</th>' + "".join(
        f'<th class="num">{escape(c)}</th>' for c in metrics
    )
    body = ""
    for rec in df.to_dict("records"):
        cells = "".join(
            f'<td class="num">{format_cell(float(rec[c]), fmts.get(c, ".3f"))}</td>'
            for c in metrics
        )
        body += (
            f'<tr><td class="name">{escape(str(rec["run"]))}</td>'
            f'<td class="name">{escape(str(rec["layer"]))}</td>'
            f'<td class="num">{int(rec["step"])}</td>{cells}</tr>'
        )
    meanings = "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in df.attrs.get("meanings", {}).items()
    )
    return f'<div class="scroll"><table class="metrics"><tr>{head}</tr>{body}</table></div><dl>{meanings}</dl>'


def page(
    *,
    title: str,
    overview: Overview,
    figures: list[RenderedFigure],
    missing: list[str],
    table,
    footer: str,
    subtitle: str = _SUBTITLE,
    summary_heading: str = "Run summary",
    table_section: tuple[str, str] | None = None,
) -> str:
    """The whole report page. ``table_section``: a (heading, HTML) replacing the
    single run's per-layer table (the comparison page's table of runs)."""
    nav = "".join(
        f'<li><a href="#fig-{escape(f.name)}">{escape(f.title)}</a></li>' for f in figures
    )
    step = table.attrs.get("step") if table is not None else None
    if table_section is None:
        heading = f"Per layer at the last step{f' (step {step})' if step is not None else ''}"
        table_section = (heading, _table(table))
    not_drawn = (
        '<ul class="warnings">' + "".join(f"<li>{escape(m)}</li>" for m in missing) + "</ul>"
        if missing
        else ""
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{escape(title)}</h1>"
        f'<p class="sub">{escape(subtitle)}</p>'
        f'<section id="summary"><h2>{escape(summary_heading)}</h2>{_facts(overview)}</section>'
        f'<section id="contents"><h2>Figures</h2><ol>{nav}</ol>{not_drawn}</section>'
        f'<section id="figures">{"".join(_figure(f) for f in figures)}</section>'
        f'<section id="table"><h2>{escape(table_section[0])}</h2>{table_section[1]}</section>'
        f"<footer>{escape(footer)}</footer></main></body></html>\n"
    )
