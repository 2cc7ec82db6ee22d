"""What one ``analyze`` computes, decided before anything is written.

The layers and families a store has the data for (:func:`select`), what
``/metrics`` must hold for them (:func:`metrics_spec`), the probe's targets
(:func:`probe_targets`), and which (step, layer) pairs are stale: every
result carries a provenance hash of its inputs (:func:`plan_jobs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from gramlin_analyze.analysis.metrics import FAMILIES, METRIC_DOCS
from gramlin_analyze.analysis.output import MetricsOutput, ScalarBuffer
from gramlin_analyze.analysis.report import AnalyzeReport
from gramlin_analyze.analysis.task import ProbeTargets, TLSetup
from gramlin_analyze.errors import MissingDataError, UsageError
from gramlin_analyze.io.names import select_layers
from gramlin_analyze.store import INPUTS, GramlinStore, MatrixSpec, MetricsSpec
from gramlin_analyze.store import layout as L

__all__ = [
    "RunPlan",
    "JobPlan",
    "select",
    "metrics_spec",
    "probe_targets",
    "plan_jobs",
    "chain_hashes",
    "CONV_SAMPLES",
    "check_tl_options",
    "tl_setups",
    "tl_attrs",
    "record_tl_attrs",
]


@dataclass(frozen=True, slots=True)
class RunPlan:
    """The layers, families and ok steps of one ``analyze``, and the step table's columns."""

    layers: list[str]
    families: list[str]
    layer_fams: dict[str, list[str]]
    ok: list[int]
    steps: np.ndarray
    fps: np.ndarray
    lr: np.ndarray
    spectrum_k: dict[str, int]

    @property
    def prev_ok(self) -> dict[int, int | None]:
        return dict(zip(self.ok, [None, *self.ok[:-1]], strict=True))


@dataclass(frozen=True, slots=True)
class JobPlan:
    """Which (step, layer) compute which families, and the provenance each result will carry.

    ``in_task``: the pairs that compute their Gram change in their own task
    (with the hash of its phase-2 chain), so phase 2 has nothing left to do
    for them.
    """

    jobs: dict[tuple[int, str], list[str]]
    wanted: dict[tuple[int, str, str], str]
    in_task: dict[tuple[int, str], str]


def _hash(*parts: Any) -> str:
    return hashlib.blake2b(
        json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12
    ).hexdigest()


def _how_to_add(piece: str, url: str) -> str:
    return {
        "activations": (
            f"the store has no captured activations (/layers/<name>/input); add them with "
            f"`gramlin-analyze ingest RUN_DIR --store {url} --probe PROBE.npz --model pkg.module:build` "
            "(or --mlp-activation NAME, or --activations DIR)"
        ),
        "targets": (
            f"the store has no probe labels or targets (/probe); ingest with "
            f"`--probe PROBE.npz` into {url}"
        ),
        "labels": (
            f"neural collapse needs class labels; the probe set of {url} has none (regression targets "
            "or no /probe): ingest with a probe file holding `labels`"
        ),
        "lr": (
            f"the virtual covariance needs the learning rate at each step, and {url} records none; "
            "re-ingest with --lr RATE or --lr-schedule FILE (checkpoints that record it need nothing)"
        ),
        "agop": (
            f"{url} has no AGOP: ingest the run with `--probe PROBE.npz --model pkg.module:build "
            "--capture-agop` into a new store (or into this one while it holds weights only: a "
            "store captured without AGOP refuses the flag)"
        ),
        "weight": f"{url} holds no layers yet; run `gramlin-analyze ingest RUN_DIR --store {url}`",
    }[piece]


def _available(gs: GramlinStore, layers: list[str], lr: np.ndarray) -> dict[str, dict[str, bool]]:
    """What each layer has: ``{layer: {piece: bool}}`` for every piece a family needs."""
    root = gs.view
    probe = root[L.PROBE] if L.PROBE in root else None
    shared = {
        "weight": True,
        "targets": probe is not None and ("labels" in probe or "targets" in probe),
        "labels": probe is not None and "labels" in probe,
        "lr": bool(np.isfinite(lr).any()),
    }
    out = {}
    for n in layers:
        grp = gs.layer(n)
        out[n] = dict(shared, activations="input" in grp, agop="agop" in grp)
    return out


def select(
    gs: GramlinStore,
    url: str,
    layers: list[str] | None,
    requested: list[str] | None,
    report: AnalyzeReport,
) -> RunPlan | None:
    """The layers, families and ok steps to compute; None when there is nothing to do.

    A family runs on the layers that have its data (an embedding without
    captured inputs does not stop TL on the others); it is reported as
    unavailable only when no chosen layer has the data.
    """
    all_layers = gs.layer_names()
    chosen = select_layers(all_layers, layers, None)
    if layers and not chosen:
        raise UsageError(
            f"--layers {layers} matches no layer of {url}; layers: {', '.join(all_layers)}"
        )
    man = gs.manifest()
    steps, status, fps = man["step"], man["status"], man["fingerprint"]
    lr = np.asarray(man["lr"], dtype=np.float64)
    ok = [i for i, s in enumerate(status) if s == "ok"]
    report.skipped_steps = {
        int(steps[i]): str(status[i]) for i in range(len(steps)) if status[i] != "ok"
    }
    avail = _available(gs, chosen, lr)
    layer_fams: dict[str, list[str]] = {n: [] for n in chosen}
    families = []
    for fam in requested or list(FAMILIES):
        ready = [n for n in chosen if all(avail[n][p] for p in FAMILIES[fam].needs)]
        if not ready:
            missing = next(p for p in FAMILIES[fam].needs if not any(avail[n][p] for n in chosen))
            if requested:
                raise MissingDataError(f"{fam}: {_how_to_add(missing, url)}")
            report.unavailable[fam] = _how_to_add(missing, url)
            continue
        families.append(fam)
        for n in ready:
            layer_fams[n].append(fam)
        skipped = [n for n in chosen if n not in ready]
        if skipped:
            report.partial[fam] = skipped
    report.families = families
    if not families or not ok or not chosen:
        return None
    spectrum_k = {n: int(min(gs.layer(n)["weight"].shape[1:])) for n in chosen}
    return RunPlan(chosen, families, layer_fams, ok, steps, fps, lr, spectrum_k)


def metrics_spec(gs: GramlinStore, run: RunPlan) -> MetricsSpec:
    """What the run's families write for its layers (the store lays it out)."""
    scalars: dict[str, dict[str, Any]] = {}
    inputs: list[str] = []
    matrices: dict[str, dict[str, MatrixSpec]] = {layer: {} for layer in run.layers}
    for fam in run.families:
        f = FAMILIES[fam]
        for name in f.scalars + f.phase2_scalars:
            scalars[name] = {"long_name": METRIC_DOCS[name], "family": fam}
        inputs += [fam, fam + "_phase2"] if (f.phase2_scalars or f.phase2_matrices) else [fam]
        for layer in run.layers:
            weight = gs.layer(layer)["weight"]
            for name in f.matrices + f.phase2_matrices:
                matrices[layer][name] = _matrix_spec(name, fam, weight, run.spectrum_k[layer])
    return MetricsSpec(scalars=scalars, inputs=tuple(inputs), matrices=matrices)


def _matrix_spec(name: str, fam: str, weight: Any, spectrum_k: int) -> MatrixSpec:
    if name == "spectrum":
        shape, dims = (spectrum_k,), ("k",)
    else:
        d = weight.shape[2]
        shape, dims = (d, d), ("in_i", "in_j")
    # The Gram is stored in its weight's dtype: computed in float64, but
    # its precision is that of W, and float64 doubled the bytes written
    # (the cost of --metrics gram). VC/VCS are sums over samples and
    # steps and stay float64.
    dtype = np.promote_types(weight.dtype, np.float32) if name == "gram" else np.dtype("float64")
    attrs = {"long_name": METRIC_DOCS[name], "family": fam, "computed_in": "float64"}
    return MatrixSpec(shape, dims, np.dtype(dtype), attrs)


def probe_targets(
    gs: GramlinStore, run: RunPlan, report: AnalyzeReport
) -> tuple[ProbeTargets, str]:
    """The probe set's targets as tasks use them, and the probe's fingerprint.

    (n,) labels go with every position of an example; (n, T) token labels go
    with their own row. A layer whose samples per example match neither
    loses TL and NC, with a note.
    """
    if L.PROBE not in gs.view:
        return ProbeTargets(), ""
    pg = gs.view[L.PROBE]
    fingerprint = str(pg.attrs.get("fingerprint", ""))
    if "labels" in pg:
        raw = np.asarray(pg["labels"][:], dtype=np.int64)
        labels = raw.reshape(-1)
        c = int(pg.attrs.get("n_classes", labels.max() + 1))
        per_label = int(np.prod(raw.shape[1:], dtype=np.int64)) if raw.ndim > 1 else 1
        _drop_unpaired_labels(gs, run, per_label, report)
        # Class indices travel to the tasks, not an N x C one-hot matrix.
        return ProbeTargets(labels=labels, n_classes=c, labels_per_example=per_label), fingerprint
    if "targets" in pg:
        return ProbeTargets(Y=np.asarray(pg["targets"][:], dtype=np.float64)), fingerprint
    return ProbeTargets(), fingerprint


def _drop_unpaired_labels(
    gs: GramlinStore, run: RunPlan, per_label: int, report: AnalyzeReport
) -> None:
    """Take TL and NC off the layers whose samples the labels cannot be paired with."""
    for n in run.layers:
        per = int(gs.layer(n).attrs.get("samples_per_example", 1))
        if per_label in (1, per):
            continue
        for fam in ("tl", "nc"):
            if fam in run.layer_fams[n]:
                run.layer_fams[n].remove(fam)
                report.partial.setdefault(fam, []).append(n)
        report.unavailable[f"tl/nc for {n}"] = (
            f"the probe has {per_label} labels per example but layer {n} has {per} samples "
            "per example; give one label per example or per position"
        )


def plan_jobs(
    out: MetricsOutput,
    run: RunPlan,
    probe_fp: str,
    options: dict,
    *,
    recompute: bool,
    report: AnalyzeReport,
) -> JobPlan:
    """Which (step, layer) compute which families, and the input hash each result will carry.

    Layer-major: a layer's tasks finish together, and its phase 2 starts while
    the next layers' tasks still run. ``options`` holds each family's options
    (they enter its hash).
    """
    buf, layer_index = out.buf, out.layer_index
    inputs = {fam: buf.get(f"{INPUTS}/{fam}") for fam in run.families}
    jobs: dict[tuple[int, str], list[str]] = {}
    wanted: dict[tuple[int, str, str], str] = {}
    for layer in run.layers:
        j = layer_index[layer]
        for i in run.ok:
            for fam in run.layer_fams[layer]:
                h = _input_hash(run, i, fam, options, probe_fp)
                if recompute or inputs[fam][i, j] != h:
                    jobs.setdefault((i, layer), []).append(fam)
                    wanted[(i, layer, fam)] = h
                else:
                    report.up_to_date += 1
    in_task = _gram_change_in_task(buf, run, layer_index, jobs, recompute)
    return JobPlan(jobs, wanted, in_task)


def _input_hash(run: RunPlan, i: int, fam: str, options: dict, probe_fp: str) -> str:
    """What a family's result at row ``i`` depends on, hashed."""
    parts = [run.fps[i], options.get(fam)]
    if fam in ("vc", "tl", "nc", "cka"):
        parts.append(probe_fp)
    if fam == "vc":
        parts.append(float(run.lr[i]))
    if fam == "cka":
        parts.append(run.fps[run.ok[-1]])
    return _hash(fam, *parts)


def _gram_change_in_task(
    buf: ScalarBuffer, run: RunPlan, layer_index: dict[str, int], jobs: dict, recompute: bool
) -> dict[tuple[int, str], str]:
    """New steps whose previous ok step's Gram is stored and current (an incremental
    run): each gets its Gram change in its own task, from the Gram it has in memory,
    and phase 2 has nothing left to do for it."""
    in_task: dict[tuple[int, str], str] = {}
    if "gram" not in run.families or recompute:
        return in_task
    prov_all = buf.get(f"{INPUTS}/gram_phase2")
    prev_ok = run.prev_ok
    hashes = chain_hashes("gram", run.ok, run.fps, run.lr)  # the same chain for every layer
    for layer in run.layers:
        if "gram" not in run.layer_fams[layer]:
            continue
        prov = prov_all[:, layer_index[layer]]
        for i in run.ok:
            p = prev_ok[i]
            if "gram" in jobs.get((i, layer), ()) and (
                p is None or ("gram" not in jobs.get((p, layer), ()) and prov[p] == hashes[p])
            ):
                in_task[(i, layer)] = hashes[i]
    return in_task


def chain_hashes(fam: str, ok: list[int], fps: Any, lr: Any) -> dict[int, str]:
    """Provenance of each ok step's phase-2 results: every ok step up to it
    (fingerprints, and learning rates for VC), as a chain."""
    key = fam + "_phase2"
    chain: list = []
    hashes = {}
    for i in ok:
        chain.append(fps[i])
        if fam == "vc":
            chain.append(float(lr[i]))
        hashes[i] = _hash(key, chain)
    return hashes


#: How a multi-position layer's rows (conv positions, tokens) become TL/NC samples.
CONV_SAMPLES = ("image", "position", "mean")
#: Widest per-image sample streamed with an exact ``d x d`` covariance (float64: 128 MiB, and
#: an ``eigh`` of seconds); wider layers use the mean over positions, with a note.
IMAGE_FEATURES_MAX = 4096


def check_tl_options(tl_pca: int, tl_pca_above: int, conv_samples: str) -> None:
    """Refuse TL options that cannot mean anything, before the store is locked."""
    if conv_samples not in CONV_SAMPLES:
        raise UsageError(f"--conv-samples {conv_samples!r} is not one of {', '.join(CONV_SAMPLES)}")
    if int(tl_pca) != tl_pca or tl_pca < 0:
        raise UsageError(f"--tl-pca must be an integer >= 0 (0: no PCA), got {tl_pca}")
    if int(tl_pca_above) != tl_pca_above or tl_pca_above < 0:
        raise UsageError(f"--tl-pca-above must be an integer >= 0, got {tl_pca_above}")


def _labels_per_example(gs: GramlinStore) -> int:
    pg = gs.view[L.PROBE] if L.PROBE in gs.view else None
    if pg is None or "labels" not in pg:
        return 1
    return int(np.prod(pg["labels"].shape[1:], dtype=np.int64))


def tl_setups(
    gs: GramlinStore,
    run: RunPlan,
    *,
    tl_pca: int,
    tl_pca_above: int,
    conv_samples: str,
    report: AnalyzeReport,
) -> dict[str, TLSetup]:
    """Each TL/NC layer's samples and PCA, from its width and positions per example.

    Per-position labels keep one sample per position; a per-image sample wider
    than :data:`IMAGE_FEATURES_MAX` falls back to the mean over positions (noted).
    """
    per_label = _labels_per_example(gs)
    out = {}
    for name in run.layers:
        if not {"tl", "nc"} & set(run.layer_fams[name]):
            continue
        grp = gs.layer(name)
        per = int(grp.attrs.get("samples_per_example", 1))
        d_in, d_out = int(grp["weight"].shape[2]), int(grp["weight"].shape[1])
        mode = conv_samples if per > 1 and per_label == 1 else "position"
        if per == 1:
            mode = "example"
        if mode == "image" and per * d_in > IMAGE_FEATURES_MAX:
            report.unavailable[f"per-image TL/NC for {name}"] = (
                f"{per} positions x {d_in} inputs = {per * d_in} features exceed the "
                f"{IMAGE_FEATURES_MAX} of an exact streamed PCA; used the mean over positions "
                "(pass --conv-samples mean or position to choose)"
            )
            mode = "mean"
        width = per * d_in if mode == "image" else d_in
        z_width = per * d_out if mode == "image" else d_out
        out[name] = TLSetup(
            samples=mode,
            positions=per,
            features=width,
            pca_components=_pca_k(width, tl_pca, tl_pca_above),
            surrogate_pca=_pca_k(z_width, tl_pca, tl_pca_above),
        )
    return out


def _pca_k(width: int, k: int, above: int) -> int | None:
    return int(k) if k > 0 and width > above and k < width else None


def tl_attrs(setups: dict[str, TLSetup], tl_pca: int, tl_pca_above: int, conv_samples: str):
    """What TL/NC's ``/metrics`` arrays record of how they were computed, per layer."""
    layers = {
        name: {
            "samples": s.samples,
            "positions": s.positions,
            "features": s.features,
            "tl_pca_components": s.pca_components or 0,
            "surrogate_pca_components": s.surrogate_pca or 0,
        }
        for name, s in setups.items()
    }
    return {
        "tl_pca": int(tl_pca),
        "tl_pca_above": int(tl_pca_above),
        "tl_pca_method": "exact: eigh of the centered float64 covariance, features H P",
        "conv_samples": conv_samples,
        "tl_samples_by_layer": layers,
    }


def record_tl_attrs(gs: GramlinStore, attrs: dict[str, Any]) -> bool:
    """Write ``attrs`` on the TL/NC scalars of ``/metrics`` (per-layer entries merged with
    those of layers this run did not touch); True when anything changed."""
    if L.METRICS not in gs.root:
        return False
    m = gs.root[L.METRICS]
    updates = []
    for name in ("target_linearity", "tl_null", "tl_surrogate", "kta", "nc1"):
        if name not in m:
            continue
        arr = m[name]
        have = dict(arr.attrs)
        layers = dict(have.get("tl_samples_by_layer") or {})
        layers.update(attrs["tl_samples_by_layer"])
        new = dict(attrs, tl_samples_by_layer=layers)
        if any(have.get(k) != v for k, v in new.items()):
            updates.append((name, new))
    if updates:  # attributes live in the consolidated copy too: it is rewritten
        gs.structure_changed()
        for name, new in updates:
            gs.root[L.METRICS][name].update_attributes(new)
    return bool(updates)
