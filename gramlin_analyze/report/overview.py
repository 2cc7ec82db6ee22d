"""The run at a glance, from ``/steps`` and the root attributes: what was measured, from
what, and what to be wary of (failed steps, optimizers the identities do not cover)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from gramlin_analyze.plot._source import Source

__all__ = ["Overview", "overview"]

# Optimizers for which the Feature Learning Equation and the VCS hold (plain gradient steps).
_PLAIN = {"sgd"}


@dataclass(frozen=True, slots=True)
class Overview:
    """``facts``: (label, value) rows of the run summary; ``warnings``: one line each."""

    facts: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]


def _counts(values) -> str:
    counts = Counter(str(v) for v in values if str(v))
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "not recorded"


def _manifest_facts(steps) -> list[tuple[str, str]]:
    s = steps["step"].values
    status = Counter(str(v) or "unset" for v in steps["status"].values)
    facts = [
        ("steps", f"{s.size} ({s.min()}..{s.max()})" if s.size else "0"),
        ("statuses", ", ".join(f"{n} {k}" for k, n in sorted(status.items()))),
    ]
    if "format" in steps:
        facts.append(("formats", _counts(steps["format"].values)))
    if "optimizer" in steps:
        facts.append(("optimizer", _counts(steps["optimizer"].values)))
    if "lr" in steps:
        lr = steps["lr"].values.astype(float)
        source = _counts(steps["lr_source"].values) if "lr_source" in steps else ""
        rng = f"{np.nanmin(lr):.4g}..{np.nanmax(lr):.4g}" if np.isfinite(lr).any() else "unknown"
        facts.append(("learning rate", f"{rng} ({source})" if source else rng))
    return facts


def _manifest_warnings(steps) -> list[str]:
    out = []
    for step, st, err in zip(
        steps["step"].values,
        steps["status"].values,
        steps["error"].values if "error" in steps else [""] * steps.sizes["step"],
        strict=True,
    ):
        if str(st) == "failed":
            out.append(f"step {int(step)} failed: {err}")
        elif str(st) != "ok":
            out.append(
                f"step {int(step)} is {str(st) or 'unset'}: its data is not used (run ingest again)"
            )
    if "optimizer" in steps:
        other = sorted(
            {str(o) for o in steps["optimizer"].values if str(o) and str(o).lower() not in _PLAIN}
        )
        if other:
            out.append(
                f"optimizer {', '.join(other)}: the Feature Learning Equation and the VCS assume plain "
                "gradient steps; Adam-type preconditioning breaks them (read Gram-VC alignment with care)"
            )
    if "lr" in steps and not np.isfinite(steps["lr"].values.astype(float)).all():
        out.append(
            "some steps have no learning rate: VC metrics need one (ingest --lr or --lr-schedule)"
        )
    if "nonfinite" in steps:
        bad = [
            int(s)
            for s, n in zip(steps["step"].values, steps["nonfinite"].values, strict=True)
            if n > 0
        ]
        if bad:
            out.append(f"NaN/Inf weights stored at step(s) {', '.join(map(str, bad[:10]))}")
    return out


def overview(src: Source, store: str) -> Overview:
    """The run summary and warnings of ``src`` (the store at ``store``)."""
    a = src.attrs
    facts: list[tuple[str, str]] = [
        ("store", store),
        ("run", str(a.get("run_name", "?"))),
        ("source", str(a.get("source", "?"))),
        (
            "created",
            f"{a.get('created_at', '?')} by {a.get('creation_library', '?')} "
            f"{a.get('creation_library_version', '?')} (schema {a.get('gramlin_schema_version', '?')})",
        ),
        ("last written", str(a.get("modified_at", "?"))),
    ]
    warnings: list[str] = []
    if src.steps is not None and src.steps.sizes.get("step", 0):
        facts += _manifest_facts(src.steps)
        warnings += _manifest_warnings(src.steps)
    layers = src.layers
    facts.append(("layers", f"{len(layers)}" if layers else "no /metrics yet"))
    vcs = _vcs_sources(src.metrics)
    if vcs:
        facts.append(("VCS sum", vcs))
    if not src.metrics.data_vars:
        warnings.append(f"no /metrics: run gramlin-analyze analyze {store}")
    return Overview(tuple(facts), tuple(warnings))


def _vcs_sources(metrics) -> str:
    """Where the metrics' VCS sums come from: the training-time record and/or the checkpoint
    trapezoid estimate (empty when neither was computed)."""
    out = []
    for var, text in (
        ("gram_vcs_recorded_corr", "recorded at every training step ({n} layers)"),
        ("gram_vcs_acc_corr", "trapezoid estimate from the checkpoints ({n} layers)"),
    ):
        if var in metrics:
            have = np.isfinite(metrics[var].transpose("layer", "step").values).any(axis=1)
            if have.any():
                out.append(text.format(n=int(have.sum())))
    return "; ".join(out)
