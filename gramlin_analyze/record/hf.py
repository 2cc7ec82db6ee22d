"""Hugging Face ``TrainerCallback``: records every optimizer step, writes into ``checkpoint-N/``.

``on_save`` runs after the Trainer has written ``<output_dir>/checkpoint-<global_step>/``;
the record goes into it as ``gramlin_record.safetensors`` (so ``save_total_limit`` rotation
removes it with its checkpoint). Only the world's process zero writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from gramlin_analyze.record.file import RECORD_NAME
from gramlin_analyze.record.recorder import Recorder

__all__ = ["GramlinHFCallback"]


class GramlinHFCallback(TrainerCallback):
    """Records the Trainer's model; options as for :class:`Recorder`.

    The optimizer is unwrapped from accelerate's ``AcceleratedOptimizer`` and its GradScaler
    (fp16) taken from it. On resume, the record in the checkpoint the Trainer resumed from
    (``checkpoint-<global_step>`` at ``on_train_begin``), when present, continues the sums.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.recorder: Recorder | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        scaler = getattr(optimizer, "scaler", None)
        self.recorder = Recorder(model, optimizer, scaler=scaler, **self.options)
        resumed = Path(args.output_dir) / f"checkpoint-{state.global_step}" / RECORD_NAME
        if state.global_step and resumed.is_file():
            self.recorder.load(resumed)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.recorder.save(
            Path(folder) / RECORD_NAME, framework="transformers", global_step=state.global_step
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
