"""Stopping and resuming a run so that it is one run: the data order, the random state, the
run folder and the logs continue where they stopped.

- ``ResumableSampler``: the training order of epoch ``e`` is a permutation drawn from
  ``seed`` and ``e`` alone (not from how many epochs this process has run), and it records
  how far into the epoch training got, so a run resumed mid-epoch sees exactly the targets
  it had not yet seen, in the same order (Lightning saves and restores its state through
  the data loader's ``state_dict``).
- ``StopHandling``: keeps ``checkpoints/last.ckpt`` the run's latest state: after every
  validation of a fit, when training ends, and on SIGTERM (Lightning raises ``SIGTERMException``
  at the next step end) or Ctrl-C, at that step, recording how the run stopped; every
  checkpoint carries the Python, NumPy and torch random states, restored on resume.
- ``run_folder_of``: the run folder a checkpoint belongs to (``RUN/checkpoints/x.ckpt`` ->
  ``RUN``), so that ``ckpt_path=RUN/checkpoints/last.ckpt`` logs into ``RUN`` again.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """A random permutation per epoch from (seed, epoch); ``state_dict`` says how many of this
    epoch's indices were handed out (with ``num_workers=0`` Lightning fetches no batch ahead for
    a sized loader, so that is exactly the targets trained on)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.served, self.skip = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before every epoch
        if epoch != self.epoch:
            self.epoch, self.served = epoch, 0

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self):
        start, self.skip = self.skip, 0  # a resumed epoch starts where the stopped one was
        self.served = start
        for i in self.order(self.epoch)[start:].tolist():
            self.served += 1
            yield i

    def __len__(self) -> int:  # the whole epoch, also when resumed: Lightning adds the batches done before
        return self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.skip = state["epoch"], state["served"] % self.n if self.n else 0
        self.served = self.skip


class ResumableLoader(DataLoader):
    """A DataLoader whose sampler's position is saved in Lightning checkpoints (Lightning saves
    the state of any training loader that has ``state_dict`` / ``load_state_dict``)."""

    def state_dict(self) -> dict:  # {} under DDP, where Lightning wraps the sampler in a distributed one
        return self.sampler.state_dict() if isinstance(self.sampler, ResumableSampler) else {}

    def load_state_dict(self, state: dict) -> None:
        if state and isinstance(self.sampler, ResumableSampler):
            self.sampler.load_state_dict(state)


def random_states() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain values, so that a
    checkpoint still loads with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


STOP_SIGNALS = {SIGTERMException: "SIGTERM", KeyboardInterrupt: "SIGINT"}
EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}  # what a shell reports: 143, 130


def model_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The run's ``ModelCheckpoint`` (best-*.ckpt), if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)


def checkpoint_folder(trainer: pl.Trainer) -> Path:
    """Where the run's checkpoints go: ModelCheckpoint's folder, else ``<root>/checkpoints``."""
    best = model_checkpoint(trainer)
    return Path(best.dirpath) if best is not None and best.dirpath else Path(trainer.default_root_dir) / "checkpoints"


class StopHandling(Checkpoint):
    """Keeps ``last.ckpt`` the run's latest state, so that a stopped run loses nothing it can keep:
    written after every validation of a fit (a run killed without warning, by SIGKILL or the out-of-
    memory killer, loses only the steps since), when training ends (a finished run's last.ckpt is
    its final state), and when a signal stops the run, at that step (recording which:
    ``stopped_by``). Lightning's ``ModelCheckpoint(save_last=True)`` writes last.ckpt only beside a
    new best, so after a run's best validation it stood still (conf/callbacks/default.yaml turns
    it off). Also puts the random states into every checkpoint and restores them on resume.

    The file must hold the best as updated by the same validation (a resume compares later
    validations with it). Lightning runs ``Checkpoint`` callbacks after all others, in their listed
    order, so this one runs after ModelCheckpoint; but ModelCheckpoint saves at the end of the
    training epoch rather than of the validation when validation runs once per epoch, so a
    validation at an epoch's end is saved again there if ModelCheckpoint's state changed since."""

    def __init__(self):
        self.stopped_by: str | None = None
        self.last_checkpoint: str | None = None
        self._saved: tuple | None = None  # (global step, ModelCheckpoint's state) last.ckpt holds, when written here
        self._loader_state: dict | None = None  # the training loader's position, from a checkpoint being resumed

    @staticmethod
    def _state(trainer: pl.Trainer) -> tuple:
        best = model_checkpoint(trainer)
        return trainer.global_step, repr(best.state_dict()) if best is not None else None

    def _save_last(self, trainer: pl.Trainer) -> Path:
        path = checkpoint_folder(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)
        self.last_checkpoint, self._saved = str(path), self._state(trainer)
        return path

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saved_step = self._saved[0] if self._saved else None
        if saved_step == trainer.global_step and self._saved != self._state(trainer):
            self._save_last(trainer)  # this step's validation, with the best ModelCheckpoint has just updated

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved is None or self._saved[0] != trainer.global_step:  # not already saved at this step
            self._save_last(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        name = next((v for k, v in STOP_SIGNALS.items() if isinstance(exception, k)), None)
        if name is None:
            return  # a failure, not a stop: the last good checkpoint stands
        self.stopped_by = name
        path = self._save_last(trainer)
        rank_zero_info(f"{name}: stopped at step {trainer.global_step}; saved {path}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["random_states"] = random_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "random_states" in checkpoint:
            set_random_states(checkpoint["random_states"])
        # Lightning restores a stateful loader only if it builds the loader after this restore;
        # configure_optimizers (trainer.estimated_stepping_batches) builds it before
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_state = (loops.get("combined_loader") or [None])[0]

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._loader_state = self._loader_state, None
        loader = trainer.train_dataloader
        if state and isinstance(loader, ResumableLoader):  # before the epoch's first batch is drawn
            loader.load_state_dict(state)


def run_folder_of(ckpt_path: str | None) -> str | None:
    """``RUN`` for a checkpoint at ``RUN/checkpoints/NAME.ckpt`` written by a run (``RUN/.hydra``
    exists); None otherwise (the resumed run then gets a new folder)."""
    if not ckpt_path:
        return None
    path = Path(str(ckpt_path)).expanduser().resolve()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and (run / ".hydra").is_dir():
        return str(run)
    return None


def register_resolvers() -> None:
    """``${run_folder:CKPT,DEFAULT}``: the run folder of a checkpoint (see ``run_folder_of``), else DEFAULT."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("run_folder", lambda ckpt, default: run_folder_of(ckpt) or default, replace=True)
