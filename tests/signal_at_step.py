"""A test-only callback: the run sends itself a real signal after a given training step, as a
scheduler (SIGTERM) or a user (SIGINT) would. Used with ``PYTHONPATH=tests`` and
``+callbacks.signal._target_=signal_at_step.SignalAtStep``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    def __init__(self, step: int, name: str = "SIGTERM", job: int | None = None, once_file: str | None = None):
        self.step, self.signum, self.job, self.once_file = step, getattr(signal, name), job, once_file

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.job is not None:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.get().job.num != self.job:
                return
        if self.once_file:
            if Path(self.once_file).exists():
                return
            Path(self.once_file).write_text("sent")
        os.kill(os.getpid(), self.signum)
