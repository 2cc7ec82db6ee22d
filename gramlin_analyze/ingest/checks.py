"""The plan's checks of the inputs against the run and the store, before any write.

Each either returns what the plan needs (the layer template, the capture
setup, the external activation arrays) or raises a usage error that leaves
the store as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gramlin_analyze.dask_target import task_path
from gramlin_analyze.errors import ProbeError, UsageError
from gramlin_analyze.ingest.template import LayerSpec, check_against, plan_layers
from gramlin_analyze.io.discovery import CheckpointSource
from gramlin_analyze.io.names import select_layers
from gramlin_analyze.io.remote import is_url
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.location import is_remote
from gramlin_analyze.store.provenance import describe_run, holds_run_from

if TYPE_CHECKING:
    from gramlin_analyze.capture.config import CaptureConfig
    from gramlin_analyze.ingest.plan import Request
    from gramlin_analyze.ingest.stored import Stored

__all__ = [
    "ExternalPlan",
    "check_capture",
    "check_external",
    "check_layer_selection",
    "new_template",
    "refuse_another_model",
    "refuse_another_run",
    "resolve_capture",
    "settled",
]


@dataclass(frozen=True, slots=True)
class ExternalPlan:
    """Activations computed elsewhere: the probe to store and the arrays to declare."""

    probe: Any  # ProbeSet or None
    layers: list[str]
    by_dtype: dict[np.dtype, dict[str, tuple[int, int, int, int]]] | None  # None: declared already


# -- the layers ----------------------------------------------------------------------


def new_template(req: Request, listed: dict[int, dict[str, LayerSpec]]) -> dict:
    """A new store's layer template, by majority over the listed checkpoints."""
    template = plan_layers(listed, include=req.layers, exclude=req.exclude)
    if not template and listed:
        avail = sorted({k for v in listed.values() for k in v})
        if not avail:
            raise UsageError(
                f"{req.directory}: no checkpoint holds a weight of two or more dimensions (only vectors "
                "or scalars), so there is no layer to store; check that these are model checkpoints"
            )
        raise UsageError(
            f"{req.directory}: no layer matches --layers {req.layers or ['*']} --exclude {req.exclude or []}; "
            f"available layers: {', '.join(avail)}"
        )
    return template


def check_layer_selection(req: Request, st: Stored) -> None:
    """Refuse a ``--layers``/``--exclude`` selection other than the stored layers."""
    if (
        st.template
        and (req.layers or req.exclude)
        and sorted(select_layers(st.template, req.layers, req.exclude)) != sorted(st.template)
    ):
        raise UsageError(
            f"{req.store} already holds layers {sorted(st.template)}; the --layers/--exclude selection "
            "differs. Ingest into a new store to change the layer selection"
        )


def _layer_summary(template: dict) -> str:
    if not template:
        return "no matrix-shaped weights"
    items = [
        f"{name} {'x'.join(map(str, shape))}" for name, (shape, *_) in sorted(template.items())
    ]
    shown = ", ".join(items[:8]) + (f", … ({len(items) - 8} more)" if len(items) > 8 else "")
    return f"{len(items)} layer{'s' if len(items) != 1 else ''}: {shown}"


def _first_difference(stored: dict, layers: dict[str, LayerSpec]) -> str:
    for name, (shape, _, has_bias) in sorted(stored.items()):
        spec = layers.get(name)
        if spec is None:
            return f"no layer {name!r}"
        if tuple(spec.shape) != tuple(shape):
            return f"layer {name!r} is {'x'.join(map(str, spec.shape))}, not {'x'.join(map(str, shape))}"
        if has_bias and spec.bias is None:
            return f"layer {name!r} has no bias"
    return ""


def refuse_another_model(
    req: Request, st: Stored, listed: dict[int, dict[str, LayerSpec]], unchanged: int
) -> None:
    """Refuse checkpoints none of which fits the store's layers: they are another model's.

    (One odd checkpoint among fitting ones fails alone, as in a new store.)
    """
    if not st.template or not listed or unchanged:
        return
    if any(check_against(lay, st.template) is None for lay in listed.values()):
        return
    theirs = plan_layers(listed, include=None, exclude=None)
    raise UsageError(
        f"{describe_run(st.attrs, req.store)} ({_layer_summary(st.template)}); the checkpoints in "
        f"{req.directory} have {_layer_summary(theirs)} ({_first_difference(st.template, listed[min(listed)])}): "
        "use another --store for them (nothing was written)"
    )


def refuse_another_run(
    req: Request, st: Stored, sources: list[CheckpointSource], ok_fp: dict[int, str]
) -> None:
    """Refuse replacing stored steps with checkpoints of the same model from another run.

    A run read from another directory whose checkpoints differ at every
    stored step it shares is another run (a moved or copied run has its
    unchanged checkpoints; one retrained in place is in the same directory).
    """
    shared = [s for s in sources if s.step in ok_fp]
    changed = [s.step for s in shared if s.fingerprint != ok_fp[s.step]]
    if (
        not changed
        or len(changed) < len(shared)
        or holds_run_from(st.attrs, req.directory) is not False
    ):
        return
    steps = ", ".join(map(str, changed[:8])) + (
        f", … ({len(changed) - 8} more)" if len(changed) > 8 else ""
    )
    raise UsageError(
        f"{describe_run(st.attrs, req.store)}; the checkpoints in {req.directory} differ from it at "
        f"step{'s' if len(changed) > 1 else ''} {steps} (another run?): use another --store for them "
        "(nothing was written)"
    )


# -- capture -------------------------------------------------------------------------


def resolve_capture(st: Stored, capture: CaptureConfig | None) -> tuple[CaptureConfig | None, bool]:
    """The capture config to use, and whether every step must be (re)read.

    A store remembers how it was captured, its paths resolved (absolute, or
    relative to the store when inside it): new checkpoints are captured the
    same way with no flags, ``--model`` alone reuses the stored probe, and the
    same file spelled another way is the same setting. A different probe set
    or capture setup is refused (it would mix two experiments in one store), as
    is ``--capture-agop`` on a store captured without it (never ignored).
    """
    attrs = st.probe_attrs or {}
    if capture is None and not attrs.get("capture_config"):
        return None, False  # weights only: no need to import the capture code (and torch)
    from gramlin_analyze.capture.config import CaptureConfig

    stored = (
        _usable(CaptureConfig.from_json(attrs["capture_config"]), st.url)
        if attrs.get("capture_config")
        else None
    )
    if capture is None:
        return stored, False
    capture = _usable(capture, st.url)
    if not capture.probe:
        if stored is None:
            raise UsageError("capturing activations needs a probe set: pass --probe FILE")
        capture = replace(capture, probe=stored.probe)
    from gramlin_analyze.capture.probe import cached_probe

    probe = cached_probe(capture.probe)
    if st.probe_attrs is not None and attrs.get("fingerprint") != probe.fingerprint:
        raise ProbeError(
            f"{capture.probe}: this probe set differs from the one {st.url} already holds "
            f"(fingerprint {str(attrs.get('fingerprint'))[:16]}…); a store holds one probe set: "
            "ingest into a new store to use another"
        )
    if stored is None:
        return capture, True
    _refuse_other_capture(st, stored, capture)
    # Runtime choices (batch size, strict loading) are the command's; what is stored, the store's.
    return replace(stored, batch_size=capture.batch_size, strict=capture.strict), False


def _refuse_other_capture(st: Stored, stored: CaptureConfig, capture: CaptureConfig) -> None:
    """Refuse settings that would change what the stored capture records."""
    if capture.agop and not stored.agop:
        raise UsageError(
            f"{st.url} was captured without --capture-agop and its stored steps have no AGOP; "
            "an existing capture cannot gain it: ingest the run into a new store with --capture-agop "
            "(nothing was written)"
        )
    if stored.identity() != capture.identity():
        diff = {
            k: (stored.identity()[k], v)
            for k, v in capture.identity().items()
            if stored.identity()[k] != v
        }
        raise UsageError(
            f"{st.url} was captured with other settings ({diff} as stored vs given); "
            "ingest into a new store to capture differently"
        )


def _is_path_spec(model: str | None) -> tuple[str, str] | None:
    """``(file, attr)`` of a ``path/to/file.py:build`` factory (None for a module or none)."""
    if not model:
        return None
    module_part, sep, attr = model.rpartition(":")
    if sep and (module_part.endswith(".py") or "/" in module_part or "\\" in module_part):
        return module_part, attr
    return None


def _store_dir(url: str) -> Path | None:
    return None if is_remote(url) else Path(url).resolve()


def _usable(config: CaptureConfig, store: str) -> CaptureConfig:
    """``config`` with its paths absolute: stored ones relative to the store are joined to it."""
    base = _store_dir(store)

    def absolute(p: str) -> str:
        if not p or is_url(p):
            return p
        if base is not None and p.startswith(_IN_STORE):
            return str(base / p.removeprefix(_IN_STORE))
        return str(Path(p).resolve())  # (one spelling: ./, .., symlinks resolved)

    spec = _is_path_spec(config.model)
    model = f"{absolute(spec[0])}:{spec[1]}" if spec else config.model
    return replace(config, probe=absolute(str(config.probe or "")), model=model)


def settled(config: CaptureConfig, store: str) -> CaptureConfig:
    """``config`` as a store records it: paths absolute, or relative to the store when inside it."""
    base = _store_dir(store)

    def stored(p: str) -> str:
        if not p or is_url(p):
            return p
        path = Path(p).resolve()
        if base is not None and path.is_relative_to(base):
            return _IN_STORE + path.relative_to(base).as_posix()
        return str(path)

    spec = _is_path_spec(config.model)
    model = f"{stored(spec[0])}:{spec[1]}" if spec else config.model
    return replace(config, probe=stored(str(config.probe)), model=model)


#: Prefix of a stored path that lives inside the store (so the store can move with it).
_IN_STORE = "<store>/"


def check_capture(
    req: Request,
    st: Stored,
    capture: CaptureConfig | None,
    runnable: list[CheckpointSource],
    template: dict,
    call: Callable[..., Any],
) -> dict[str, tuple[int, int]] | None:
    """Check the capture setup on the first checkpoint to read; ``layer -> (rows, d_in)`` to declare.

    The probe (read by :func:`resolve_capture`), the loss, the model (its
    factory, the checkpoint's fit, the probe's inputs) and the labels against
    the model's outputs: a setup that fails here is never recorded. The model
    is built by ``call(fn, *args)`` where the tasks run (a worker), not here.
    """
    if capture is None or (st.probe_attrs is not None and st.activation_layers):
        return None  # none, or declared (and checked) by an earlier ingest
    from gramlin_analyze.capture.remote import check_setup

    first = (runnable[0].format, task_path(runnable[0].path)) if runnable else None
    setup = capture.for_tasks().to_json()
    try:
        return call(check_setup, setup, first, req.reader_options, list(template))
    except ProbeError as err:
        if str(capture.probe) in str(err):
            raise
        raise ProbeError(f"probe file {str(capture.probe)!r}: {err}") from err


# -- activations computed elsewhere --------------------------------------------------


def check_external(
    req: Request, st: Stored, files: dict[int, Path], template: dict
) -> ExternalPlan | None:
    """Check activations computed elsewhere against the store's layers and the probe.

    Rows per layer may be a multiple ``P`` of the probe's samples (conv
    positions, tokens: example-major, row ``i * P + p``); ``P`` is recorded as
    ``samples_per_example`` so that analyze pairs rows with labels.
    """
    if req.activations is None:
        return None
    from gramlin_analyze.capture.external import read_activation_file

    p = _external_probe(req, st)
    if st.activation_layers:
        return ExternalPlan(p, list(st.activation_layers), None)
    if not files:
        raise UsageError(
            f"{req.activations}: no activation files (step_<N>.npz or step_<N>.safetensors) found"
        )
    first = read_activation_file(files[min(files)])
    unknown = sorted(set(first) - set(template))
    if unknown:
        raise UsageError(
            f"{files[min(files)]}: layers {unknown} are not in the store (stored: {sorted(template)}); "
            "name activation arrays after the stored layers"
        )
    by_dtype: dict[np.dtype, dict[str, tuple[int, int, int, int]]] = {}
    for name, arrs in first.items():
        n, d = arrs["input"].shape
        if p is None:
            per_example = 1
        elif n % p.n_samples:
            raise ProbeError(
                f"{files[min(files)]}: layer {name} has {n} rows, not a multiple of the probe's "
                f"{p.n_samples} samples ({req.probe}); rows must be (example, position) pairs, example-major"
            )
        else:
            per_example = n // p.n_samples
        dtype = (
            arrs["input"].dtype
            if arrs["input"].dtype in (np.float16, np.float32, np.float64)
            else np.float32
        )
        rows = L.activation_rows(n, d, np.dtype(dtype).itemsize, batch_rows=1)
        by_dtype.setdefault(np.dtype(dtype), {})[name] = (n, d, rows, per_example)
    return ExternalPlan(p, sorted(first), by_dtype)


def _external_probe(req: Request, st: Stored) -> Any:
    """The probe given beside external activations (None if none), checked against the store's."""
    if req.probe is None:
        return None
    from gramlin_analyze.capture.probe import load_probe

    p = load_probe(req.probe)
    if st.probe_attrs is not None and st.probe_attrs.get("fingerprint") != p.fingerprint:
        raise ProbeError(
            f"{req.probe}: this probe set differs from the one {st.url} already holds; a store holds "
            "one probe set: ingest into a new store to use another"
        )
    return p
