"""Capture as one step of ingest: one checkpoint's pass, and the checks before any.

:class:`~gramlin_analyze.capture.config.CaptureConfig` (torch-free, the
driver's) says how; :func:`capture_checkpoint` builds the model for one checkpoint from an open
reader handle and hands ``h``/``g`` batches to a sink (the store's writer).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gramlin_analyze.capture.config import CaptureConfig
from gramlin_analyze.capture.engine import CaptureResult, Sink, capture_step, sample_counts
from gramlin_analyze.capture.losses import resolve_loss
from gramlin_analyze.capture.models import load_factory, load_state_dict_strict, rebuild_mlp
from gramlin_analyze.capture.probe import cached_probe
from gramlin_analyze.errors import ModelError, UsageError
from gramlin_analyze.io.base import CheckpointHandle

__all__ = [
    "CaptureConfig",
    "build_model",
    "capture_checkpoint",
    "check_setup",
    "checkpoint_config",
    "conv1d_layers",
    "plan_capture",
]

_local = threading.local()


def checkpoint_config(path: str | Path) -> dict | None:
    """The model config that travels with a checkpoint: ``config.json`` in its
    directory (Hugging Face ``checkpoint-N/``) or beside the file. JSON only."""
    p = Path(path)
    candidate = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not candidate.is_file():
        return None
    try:
        return json.loads(candidate.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{candidate}: not a readable JSON model config ({err})") from err


def _factory_model(config: CaptureConfig, model_config: dict | None) -> nn.Module:
    """One model per thread, factory and config, reused across checkpoints (weights reloaded)."""
    key = (config.model, json.dumps(model_config, sort_keys=True))
    cache = getattr(_local, "models", None)
    if cache is None:
        cache = _local.models = {}
    if key not in cache:
        cache.clear()
        cache[key] = load_factory(config.model, model_config)
    return cache[key]


def build_model(config: CaptureConfig, handle: CheckpointHandle) -> nn.Module:
    """The checkpoint's model with its weights loaded."""
    if config.torchscript:
        module = getattr(handle, "module", None)
        if module is None:
            raise UsageError(
                f"{handle.path}: --model torchscript needs TorchScript archives (read with "
                "--format torchscript --allow-torchscript-code)"
            )
        return module
    infos = handle.list_tensors()
    tensors = {name: handle.read_tensor(name) for name in infos}
    if config.mlp_activation:
        model = rebuild_mlp(tensors, activation=config.mlp_activation)
    else:
        model_config = (
            config.model_config
            if config.model_config is not None
            else checkpoint_config(handle.path)
        )
        model = _factory_model(config, model_config)
        # Hugging Face Conv1D weights the reader listed as (out, in) go back as (in, out).
        flipped = {n for n, i in infos.items() if i.source_layout == "in_out"}
        load_state_dict_strict(model, tensors, strict=config.strict, transposed=flipped)
    return model


def conv1d_layers(config_json: str, checkpoint: tuple[str, str] | None) -> list[str]:
    """Where the tasks run: the layers whose module is a Hugging Face ``Conv1D`` (weight
    stored ``(in, out)``), from the model the factory builds for the checkpoint ``(format,
    path)``; ingest presents their weights ``(out, in)`` before planning the layers."""
    config = CaptureConfig.from_json(config_json)
    if not config.model:
        return []
    from gramlin_analyze.capture.hf_models import conv1d_layer_names

    model_config = config.model_config
    if model_config is None and checkpoint is not None:
        model_config = checkpoint_config(checkpoint[1])
    return conv1d_layer_names(_factory_model(config, model_config))


def plan_capture(
    config: CaptureConfig, handle: CheckpointHandle, store_layers: list[str]
) -> dict[str, tuple[int, int]]:
    """``layer -> (n_samples, d_in)`` of every stored layer that capture records."""
    model = build_model(config, handle)
    if not isinstance(model, torch.jit.ScriptModule):
        from gramlin_analyze.capture.hf_models import check_orientation
        from gramlin_analyze.capture.layers import eager_layers

        chosen = eager_layers(model, config.layers, config.extra_layers)[0]
        stored = [layer for layer in chosen if layer.name in store_layers]
        check_orientation(stored, handle.list_tensors(), handle.path)
    counts = sample_counts(
        model,
        cached_probe(config.probe),
        layers=config.layers,
        extra_layers=config.extra_layers,
        pool=config.pool,
    )
    selected = {k: v for k, v in counts.items() if k in store_layers}
    if not selected:
        raise UsageError(
            f"none of the model's capturable layers ({', '.join(counts) or 'none'}) is a stored layer "
            f"({', '.join(store_layers)}); check --layers/--exclude"
        )
    return selected


def check_setup(
    config_json: str,
    checkpoint: tuple[str, str] | None,
    reader_options: dict[str, Any],
    store_layers: list[str],
) -> dict[str, tuple[int, int]] | None:
    """Where the tasks run, not in the driver: the loss, and the model built for the
    first checkpoint ``(format, path)`` with a probe example through it and the loss.

    Returns ``layer -> (n_samples, d_in)`` of the stored layers capture records
    (None without a checkpoint: then only the loss and the factory are checked).
    """
    from gramlin_analyze.capture.losses import check_loss
    from gramlin_analyze.capture.models import check_factory
    from gramlin_analyze.io.registry import reader_for

    config = CaptureConfig.from_json(config_json)
    loss = resolve_loss(config.loss, reduction=config.reduction)
    if checkpoint is None:
        if config.model:
            check_factory(config.model)
        return None
    fmt, path = checkpoint
    with reader_for(fmt, reader_options).open(path) as h:
        counts = plan_capture(config, h, store_layers)
        check_loss(loss, build_model(config, h), cached_probe(config.probe))
    return counts


def capture_checkpoint(
    config: CaptureConfig,
    handle: CheckpointHandle,
    *,
    layers: list[str],
    sink: Sink,
    step: int,
    device: str = "cpu",
) -> CaptureResult:
    """Build the checkpoint's model, move it to ``device``, run the probe set through it."""
    model = build_model(config, handle)
    if device != "cpu":
        _require(device)
        model = model.to(device)
    result = capture_step(
        model,
        cached_probe(config.probe),
        loss=resolve_loss(config.loss, reduction=config.reduction),
        sink=sink,
        layers=layers,
        extra_layers=config.extra_layers,
        batch_size=config.batch_size,
        dtype=np.dtype(config.dtype),
        pool=config.pool,
        step=step,
        capture_agop=config.agop,
        agop_projections=config.agop_projections,
    )
    if not np.isfinite(result.loss):
        raise ModelError(
            f"step {step}: the probe-set loss is {result.loss}; the checkpoint's weights may be NaN/Inf"
        )
    del model
    torch.set_num_threads(torch.get_num_threads())
    return result


def _require(device: str) -> None:
    """A task asked for a device its process lacks (a worker that joined after the check)."""
    from gramlin_analyze.capture.device import device_problem

    problem = device_problem(device)
    if problem:
        import socket

        raise UsageError(
            f"no CUDA device on worker {socket.gethostname()} ({problem}); run without "
            f"--device {device}, or on workers with a GPU"
        )
