"""Progress that shows where a progress bar cannot: plain lines in the run's ``train.log`` and,
when stderr is not a terminal (a log file, Slurm, CI), on stderr.

    step 120/870 (14%) | epoch 1/10 | 23,400 tok/s | loss 3.214 | 1m02s elapsed | ETA 6m28s

On a terminal Lightning's progress bar stays and the lines go to ``train.log`` only.
``attach_run_log`` also sends this package's and Lightning's own messages (the explicit solve,
early stopping, checkpoints restored) into ``train.log``, so that file tells the run's story.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

from saffu_lab.errors import ConfigError

LOG = logging.getLogger("saffu_lab")
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def attach_run_log(folder: str | Path) -> list[logging.Handler]:
    """``folder/train.log`` (appended: a resumed run goes on in the same file) for this package's
    and Lightning's loggers; this package's lines also on stderr when it is not a terminal.
    Returns the handlers, for ``detach_run_log``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(Path(folder) / "train.log", mode="a", encoding="utf-8")
    file.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    handlers = [file]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # Hydra's root handlers would print it a second time
    LOG.addHandler(file)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addHandler(file)
    if not stderr_is_terminal():
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(stream)
        handlers.append(stream)
    return handlers


def detach_run_log(handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        for logger in (LOG, *(logging.getLogger(n) for n in LIGHTNING_LOGGERS)):
            logger.removeHandler(handler)
        handler.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressLog(pl.Callback):
    """A progress line every ``every_s`` seconds of training, one per validation, one at the end."""

    def __init__(self, every_s: float = 10.0):
        if not every_s > 0:
            raise ConfigError(f"callbacks.progress.every_s={every_s} must be > 0 (seconds between progress lines)")
        self.every_s = every_s
        self.start = self.last = 0.0
        self.start_step = self.start_tokens = 0
        self.epoch = 0  # the epoch of the last training batch (Lightning advances current_epoch when a run stops)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.last = time.perf_counter()
        self.start_step, self.start_tokens = trainer.global_step, int(pl_module.tokens_seen)
        self.epoch = trainer.current_epoch
        LOG.info(f"training from step {trainer.global_step} of {self._total(trainer)} "
                 f"({trainer.num_training_batches} batches per epoch, up to {trainer.max_epochs} epochs)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.epoch = trainer.current_epoch
        if now - self.last >= self.every_s and trainer.is_global_zero:
            self.last = now
            LOG.info(self.line(trainer, pl_module, now))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero:
            return
        ppl = trainer.callback_metrics.get("val/ppl")
        if ppl is not None:
            LOG.info(f"validation at step {trainer.global_step}: val/ppl {float(ppl):.3f}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            LOG.info("training ended: " + self.line(trainer, pl_module, time.perf_counter()))

    @staticmethod
    def _total(trainer: pl.Trainer) -> int | float:
        total = trainer.estimated_stepping_batches
        return min(total, trainer.max_steps) if trainer.max_steps > 0 else total

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: float) -> str:
        step, total = trainer.global_step, self._total(trainer)
        elapsed = now - self.start
        tokens = int(pl_module.tokens_seen) - self.start_tokens
        parts = [f"step {step}/{total}" + (f" ({100 * step / total:.0f}%)" if total and total != float("inf") else ""),
                 f"epoch {self.epoch + 1}/{trainer.max_epochs}" if trainer.max_epochs > 0 else f"epoch {self.epoch + 1}",
                 f"{tokens / max(elapsed, 1e-9):,.0f} tok/s"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.3f}")
        parts.append(f"{_duration(elapsed)} elapsed")
        done = step - self.start_step
        if done > 0 and total != float("inf") and total > step:
            parts.append(f"ETA {_duration((total - step) * elapsed / done)}")
        return " | ".join(parts)
