"""``info``: a human summary of a store."""

from __future__ import annotations

import json
import os
from collections import Counter

import fsspec
import numpy as np
import zarr

from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import array_at, group_at
from gramlin_analyze.store.core import GramlinStore

__all__ = ["store_info"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _du(url: str, path: str, storage_options: dict | None) -> int:
    fs, root = fsspec.core.url_to_fs(url.removeprefix("file://"), **(storage_options or {}))
    try:
        return int(fs.du(root.rstrip("/") + "/" + path))
    except FileNotFoundError:
        return 0


def _optimizer_lines(gs: GramlinStore, man: dict) -> list[str]:
    """The optimizers the ok steps recorded, and a warning when the SGD-assuming metrics do not fit."""
    from gramlin_analyze.io.optimizer import manifest_check, sgd_warning

    ok = man["status"] == "ok"
    fams = Counter(str(f) for f in man.get("optimizer", np.zeros(0))[ok] if f)
    if not fams:
        return []
    check, used = manifest_check(man)
    lines = ["optimizer " + ", ".join(f"{k} x{v}" for k, v in sorted(fams.items())) + f" ({check})"]
    if used is not None:
        lines.append("warning  " + sgd_warning(used, _sgd_metrics(gs)))
    return lines


def _sgd_metrics(gs: GramlinStore) -> list[str]:
    """The stored metrics marked ``assumes: sgd`` by ``analyze`` (scalars and matrices)."""
    if L.METRICS not in gs.root:
        return []
    names = {
        a.path.rsplit("/", 1)[-1]
        for _, a in group_at(gs.root, L.METRICS).members(max_depth=None)
        if isinstance(a, zarr.Array) and a.attrs.get("assumes") == "sgd"
    }
    return sorted(names)


def _run_lines(attrs: dict) -> list[str]:
    """The run's attributes (given with ``--run-attr``) and the hyper-parameters its
    checkpoints state, ``key=value`` wrapped to a readable width."""
    lines = []
    for key, label in (("run_attrs", "attrs"), ("hyperparameters", "hparams")):
        value = attrs.get(key)
        if not isinstance(value, dict) or not value:
            continue
        row = f"{label:<8} "
        for k, v in value.items():
            item = f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
            if len(row) + len(item) > 100 and row.strip() != label:
                lines.append(row.rstrip())
                row = " " * 9
            row += item + "  "
        lines.append(row.rstrip())
    return lines


def store_info(url: str | os.PathLike, *, storage_options: dict | None = None) -> str:
    """A multi-line text summary of the store at ``url``."""
    url = str(url)
    gs = GramlinStore(url, mode="r", storage_options=storage_options)
    a = dict(gs.root.attrs)
    man = gs.manifest()
    steps = man["step"]
    lines = [
        f"store    {url}",
        f"run      {a.get('run_name', '?')}   source {a.get('source', '?')}",
        f"created  {a.get('created_at', '?')} by {a.get('creation_library', '?')} "
        f"{a.get('creation_library_version', '?')} (schema {a.get('gramlin_schema_version', '?')})",
    ]
    lines += _run_lines(a)
    counts = Counter(man["status"])
    rng = f"{steps.min()}..{steps.max()}" if len(steps) else "-"
    lines.append(
        f"steps    {len(steps)} ({rng}): "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in L.STATUSES)
    )
    fmts = Counter(f for f in man["format"] if f)
    if fmts:
        lines.append("formats  " + ", ".join(f"{k} x{v}" for k, v in sorted(fmts.items())))
    lr = man.get("lr")
    if lr is not None and np.isfinite(lr).any():
        lines.append(f"lr       {np.nanmin(lr):.4g}..{np.nanmax(lr):.4g}")
    lines += _optimizer_lines(gs, man)
    flagged = [(int(s), int(n)) for s, n in zip(steps, man["nonfinite"], strict=True) if n > 0]
    if flagged:
        lines.append("nonfinite " + ", ".join(f"step {s}: {n} NaN/Inf" for s, n in flagged[:10]))
    lines.append("")
    names = gs.layer_names()
    header = f"{'layer':<28} {'kind':<10} {'weight (out, in)':<18} {'dtype':<8} {'bias':<5} {'activations':<22} {'size':>10}"
    lines.append(header)
    lines.append("-" * len(header))
    for name in names:
        grp = gs.layer(name)
        la = dict(grp.attrs)
        w = array_at(grp, "weight")
        acts = "-"
        if "input" in grp:
            acts = f"{array_at(grp, 'input').shape[1]} samples x {array_at(grp, 'input').shape[2]}"
        size = _du(url, f"{L.LAYERS}/{name}", storage_options)
        lines.append(
            f"{name:<28} {la.get('kind', '?'):<10} {str(tuple(w.shape[1:])):<18} {w.dtype.name:<8} "
            f"{'yes' if 'bias' in grp else 'no':<5} {acts:<22} {_human(size):>10}"
        )
    if not names:
        lines.append("(no layers yet)")
    if L.PROBE in gs.root:
        pa = dict(gs.root[L.PROBE].attrs)
        lines.append("")
        lines.append(
            f"probe    {pa.get('n_samples', '?')} samples, loss {pa.get('loss', '?')} "
            f"({pa.get('reduction', '?')}), fingerprint {str(pa.get('fingerprint', '?'))[:16]}"
        )
    if L.METRICS in gs.root:
        mg = group_at(gs.root, L.METRICS)
        scalars = sorted(k for k, _ in mg.arrays() if k not in ("step", "layer"))
        lines.append("")
        lines.append("metrics  " + (", ".join(scalars) or "(none)"))
    failed = [
        (int(s), e)
        for s, st, e in zip(steps, man["status"], man["error"], strict=True)
        if st == "failed"
    ]
    if failed:
        lines.append("")
        lines.append("failed steps:")
        for s, e in failed:
            lines.append(f"  step {s}: {e}")
    lines.append("")
    lines.append(f"total on disk {_human(_du(url, '', storage_options))}")
    return "\n".join(lines)
