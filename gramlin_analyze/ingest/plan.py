"""The ingest plan: every check, the layer template and the steps to read, decided
before anything is written (``checks``: the inputs against the run and the store;
``stored``: what the store holds; ``write``: the plan written)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gramlin_analyze.dask_target import task_path
from gramlin_analyze.errors import GramlinError, UsageError
from gramlin_analyze.ingest.checks import (
    ExternalPlan,
    check_capture,
    check_external,
    check_layer_selection,
    new_template,
    refuse_another_model,
    refuse_another_run,
    resolve_capture,
)
from gramlin_analyze.ingest.stored import Stored, fingerprint_rows, is_store, ok_fingerprints
from gramlin_analyze.ingest.task import error_message
from gramlin_analyze.ingest.template import LayerSpec, check_against, layers_of
from gramlin_analyze.io.discovery import CheckpointSource, scan
from gramlin_analyze.io.registry import reader_for
from gramlin_analyze.store import GramlinStore
from gramlin_analyze.store.location import is_remote

if TYPE_CHECKING:
    from gramlin_analyze.capture.config import CaptureConfig

__all__ = ["Plan", "Request", "is_store", "lr_for", "make_plan"]

_READ_ERRORS = (GramlinError, OSError, KeyError, ValueError, RuntimeError, EOFError)


def _here(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in this process (no cluster)."""
    return fn(*args)


def lr_for(step: int, meta_lr, constant, schedule) -> tuple[float | None, str]:
    """A step's learning rate and where it comes from: the options win over the checkpoint."""
    if schedule is not None or constant is not None:
        from gramlin_analyze.capture.lr import resolve_lr

        return resolve_lr(step, meta_lr=meta_lr, constant=constant, schedule=schedule)
    if meta_lr is not None:
        return float(meta_lr), "checkpoint"
    return None, "unknown"


@dataclass(frozen=True, slots=True)
class Request:
    """What the command asked for: the options that decide what is read and stored."""

    directory: str | os.PathLike
    store: str
    layers: list[str] | None
    exclude: list[str] | None
    format: str | None
    order: str | None
    reader_options: dict[str, Any]
    settle_seconds: float
    capture: CaptureConfig | None
    activations: str | os.PathLike | None
    probe: str | os.PathLike | None
    lr: float | None
    lr_schedule: str | os.PathLike | None
    #: which checkpoints of the scan to consider (the others wait for a later run); all if None
    select: Callable[[CheckpointSource], bool] | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """What an ingest will write, decided (and checked) before it writes anything."""

    stored: Stored
    sources: list[CheckpointSource]
    schedule: Any
    external: dict[int, Path]
    capture: CaptureConfig | None
    todo: list[CheckpointSource]  # to read (new, changed, or every one when capture starts)
    skipped: list[int]
    moved: list[CheckpointSource]  # unchanged, at a new path
    listed: dict[int, dict[str, LayerSpec]]
    template: dict[str, tuple[tuple[int, ...], str, bool]]
    runnable: list[CheckpointSource]
    failed: dict[int, str]  # steps recorded as failed
    kept: dict[int, str]  # ok steps whose new checkpoint is unusable: they keep what they hold
    capture_counts: dict[str, tuple[int, int]] | None  # activation arrays to declare for capture
    external_plan: ExternalPlan | None
    # the request's, plus ``conv1d_layers`` when a model source turns Conv1D weights: tasks
    # read with these, so they see the checkpoints as the plan did
    reader_options: dict[str, Any]


def make_plan(req: Request, gs: GramlinStore | None, *, call: Callable[..., Any] = _here) -> Plan:
    """Scan the run and check every option against it and the store; write nothing.

    Usage errors (a missing or bad probe, a loss or model that does not fit,
    layer globs matching nothing, checkpoints of another model or run than
    the store's) raise here, so the store is neither created nor changed.
    Checkpoints are planned from their headers; ``call(fn, *args)`` runs the
    capture setup's check (which builds a model) where the tasks run.
    """
    st = Stored.read(gs, req)
    sources = _scan(req, st)
    schedule = _lr_schedule(req, sources)
    external = _external_files(req)
    capture, need_all = resolve_capture(st, req.capture)
    ok_fp = ok_fingerprints(st.manifest)
    todo = list(sources) if need_all else [s for s in sources if ok_fp.get(s.step) != s.fingerprint]
    req = _oriented_by_module(req, gs, capture, todo, call)
    listed, errors = _list_layers(req, todo)
    template = st.template or new_template(req, listed)
    check_layer_selection(req, st)
    refuse_another_model(req, st, listed, len(sources) - len(todo))
    refuse_another_run(req, st, sources, ok_fp)
    errors.update(_misfits(todo, listed, template))
    # A stored ok step is not given up for a checkpoint that cannot replace it
    # (unless capture starts: then every step must be read again).
    kept = {} if need_all else _kept(req, errors, ok_fp)
    runnable = [s for s in todo if s.step not in errors]
    return Plan(
        stored=st,
        sources=sources,
        schedule=schedule,
        external=external,
        capture=capture,
        todo=todo,
        skipped=[s.step for s in sources if s not in todo],
        moved=_moved(st.manifest, sources, todo),
        listed=listed,
        template=template,
        runnable=runnable,
        failed={s: m for s, m in errors.items() if s not in kept},
        kept=kept,
        capture_counts=check_capture(req, st, capture, runnable, template, call),
        external_plan=check_external(req, st, external, template),
        reader_options=req.reader_options,
    )


def _scan(req: Request, st: Stored) -> list[CheckpointSource]:
    """The run's checkpoints (the stored fingerprints of unchanged files reused)."""
    sources = scan(
        req.directory,
        format=req.format,
        order=req.order,
        reader_options=req.reader_options,
        settle_seconds=req.settle_seconds,
        known=fingerprint_rows(st.manifest),
    )
    if req.select is not None:  # (``watch``: checkpoints still being written wait)
        sources = type(sources)([s for s in sources if req.select(s)], sources.skipped)
    if not is_remote(req.store) and Path(req.store).resolve() == Path(req.directory).resolve():
        raise UsageError("the store cannot be the checkpoint directory itself; pass --store OUT")
    return sources


def _lr_schedule(req: Request, sources: list[CheckpointSource]) -> Any:
    """The ``--lr-schedule`` file, loaded; a bad ``--lr``/``--lr-schedule`` fails here."""
    schedule = None
    if req.lr_schedule is not None:
        from gramlin_analyze.capture.lr import load_lr_schedule

        schedule = load_lr_schedule(req.lr_schedule)
    for src in sources:
        lr_for(src.step, None, req.lr, schedule)
    return schedule


def _external_files(req: Request) -> dict[int, Path]:
    """``{step: activation file}`` of ``--activations`` (none without it)."""
    if req.activations is None:
        return {}
    from gramlin_analyze.capture.external import discover_activation_files

    return discover_activation_files(req.activations)


def _moved(
    man: dict[str, np.ndarray], sources: list[CheckpointSource], todo: list[CheckpointSource]
) -> list[CheckpointSource]:
    """Unchanged checkpoints that moved or were copied (same content, new path or file stats).

    The manifest learns where they are now, so the next ingest reuses their
    fingerprints without hashing.
    """
    step_row = {int(s): i for i, s in enumerate(man["step"])}
    stat_keys = man.get("stat_key", [""] * len(man["step"]))
    return [
        s
        for s in sources
        if s not in todo
        and s.step in step_row
        and (man["source_path"][step_row[s.step]], stat_keys[step_row[s.step]])
        != (str(s.path), s.stat_key)
    ]


def _oriented_by_module(
    req: Request,
    gs: GramlinStore | None,
    capture: CaptureConfig | None,
    todo: list[CheckpointSource],
    call: Callable[..., Any],
) -> Request:
    """``req`` reading the model source's ``Conv1D`` weights ``(out, in)`` (``conv1d_layers``).

    A store that holds layers keeps its orientation: the layers it stored with
    ``orientation_source`` "module" (no model is built, and no flag is needed).
    A new store learns them from the capture model, built once where the tasks
    run (weights alone cannot tell, so weights-only ingest lists them as stored).
    """
    if gs is not None and gs.layer_names():
        layers = sorted(
            n
            for n in gs.layer_names()
            if dict(gs.layer(n).attrs).get("orientation_source") == "module"
        )
    elif capture is not None and capture.model and todo:
        from gramlin_analyze.capture.remote import conv1d_layers

        first = (todo[0].format, task_path(todo[0].path))
        layers = call(conv1d_layers, capture.for_tasks().to_json(), first)
    else:
        layers = []
    if not layers:
        return req
    return replace(req, reader_options={**req.reader_options, "conv1d_layers": tuple(layers)})


def _list_layers(
    req: Request, todo: list[CheckpointSource]
) -> tuple[dict[int, dict[str, LayerSpec]], dict[int, str]]:
    """Each checkpoint's layers from its tensor list (headers only), and the ones that fail."""
    listed: dict[int, dict[str, LayerSpec]] = {}
    errors: dict[int, str] = {}
    for src in todo:
        try:
            listed[src.step] = layers_of(
                reader_for(src.format, req.reader_options).list_tensors(src.path)
            )
        except _READ_ERRORS as err:
            errors[src.step] = error_message(err, src.path)
    return listed, errors


def _misfits(
    todo: list[CheckpointSource], listed: dict[int, dict[str, LayerSpec]], template: dict
) -> dict[int, str]:
    """``{step: problem}`` of the listed checkpoints that do not fit the template."""
    paths = {s.step: s.path for s in todo}
    misfits = {}
    for step, lay in listed.items():
        problem = check_against(lay, template)
        if problem:
            misfits[step] = f"{paths[step]}: {problem}"
    return misfits


def _kept(req: Request, errors: dict[int, str], ok_fp: dict[int, str]) -> dict[int, str]:
    """The stored ok steps whose new checkpoint failed: they keep what they hold."""
    return {
        step: f"{msg} ({req.store} keeps step {step} as ingested before)"
        for step, msg in errors.items()
        if step in ok_fp
    }
