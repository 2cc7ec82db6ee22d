"""Lightning ``Callback``: records every optimizer step, writes a record beside each ``.ckpt``.

Steps are recorded in ``on_before_optimizer_step`` (after the closure that runs the last
backward inside ``optimizer.step``, after the GradScaler's unscale). Lightning's ``on_save_checkpoint`` does not receive the path, so the callback wraps the
strategy's ``CheckpointIO`` (its documented plugin point): every ``save_checkpoint(ckpt, path)``
also writes ``record_path(path)``, and ``remove_checkpoint`` (``save_top_k``) removes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO

from gramlin_analyze.record.file import record_path
from gramlin_analyze.record.recorder import Recorder

__all__ = ["GramlinLightningCallback"]


class _RecordingIO(CheckpointIO):
    """Delegates to the strategy's own ``CheckpointIO`` and keeps the record beside each file."""

    def __init__(self, inner: CheckpointIO, callback: GramlinLightningCallback):
        self.inner = inner
        self.callback = callback

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.callback.write(path, global_step=checkpoint.get("global_step"))

    def load_checkpoint(self, path: Any, map_location: Any = None, **kwargs: Any) -> Any:
        return self.inner.load_checkpoint(path, map_location=map_location, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
        record_path(path).unlink(missing_ok=True)

    def teardown(self) -> None:
        self.inner.teardown()


class GramlinLightningCallback(pl.Callback):
    """Records the trained ``LightningModule``'s layers; options as for :class:`Recorder`.

    The GradScaler of ``16-mixed`` precision is found in the precision plugin. On resume
    (``ckpt_path=``) the record beside that checkpoint, when present, continues the sums.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.recorder: Recorder | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.recorder = Recorder(pl_module, scaler=scaler, **self.options)
        for optimizer in trainer.optimizers:
            # automatic optimization runs the last backward inside optimizer.step(closure):
            # the step is recorded in on_before_optimizer_step, after the closure
            self.recorder.core.attach_optimizer(optimizer, hook=False)
        if trainer.ckpt_path and record_path(trainer.ckpt_path).is_file():
            self.recorder.load(record_path(trainer.ckpt_path))
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, _RecordingIO):
            strategy.checkpoint_io = _RecordingIO(strategy.checkpoint_io, self)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.recorder is not None:
            self.recorder.core.step()

    def write(self, path: Any, **metadata: Any) -> Path | None:
        """Write the record of the checkpoint at ``path``."""
        if self.recorder is None:
            return None
        return self.recorder.save(record_path(path), framework="lightning", **metadata)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The CheckpointIO wrapper stays: a trainer.save_checkpoint after fit gets its record too.
        if self.recorder is not None:
            self.recorder.close()
