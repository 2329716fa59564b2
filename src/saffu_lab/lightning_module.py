"""The LightningModule: next-token cross-entropy, perplexity, optimiser and schedule.

It wraps any network ``net(inputs) -> logits [B, T, V]`` or ``[B, V]`` with a ``generate``
method (the GPT baseline takes ids [B, T]; SAFFU models take a dict of contexts);
the training regime (optimiser, learning-rate schedule) comes from the ``regime`` group.
"""

from __future__ import annotations

import math
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from saffu_lab.errors import ConfigError
from saffu_lab.framing import IGNORE_INDEX


class LanguageModelModule(pl.LightningModule):
    def __init__(
        self,
        net: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 0,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        regime: str = "cold",
        freeze_embeddings: bool = False,
        module_lr: dict[str, float] | None = None,
    ):
        """``module_lr``: a learning rate of its own for some of the network's direct submodules, by
        name (e.g. ``{"saffu": 1e-3}`` for a residual SAFFU's solved part); the rest of the network
        trains at ``optimizer``'s rate. The schedule scales every rate alike."""
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ConfigError(f"regime.schedule={schedule!r} is not one of 'cosine', 'constant'")
        if warmup_steps < 0:
            raise ConfigError(f"regime.warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"regime.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        children = dict(net.named_children())
        for name, lr in (module_lr or {}).items():
            if name not in children:
                raise ConfigError(f"regime.module_lr.{name}: the network ({type(net).__name__}) has no submodule {name!r}; "
                                  f"use one of {sorted(children)}")
            if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
                raise ConfigError(f"regime.module_lr.{name}={lr!r} must be a learning rate > 0, e.g. 1e-3")
        self.net = net
        self.module_lr = dict(module_lr or {})
        # warm start: Adam on all but the (bit-cipher) embeddings; parameters a model keeps fixed
        # (``fixed_parameters``: a residual SAFFU's solved part) stay out of training either way
        fixed = {id(p) for p in net.fixed_parameters()} if hasattr(net, "fixed_parameters") else set()
        for module in net.modules():
            if isinstance(module, torch.nn.Embedding) and id(module.weight) not in fixed:
                module.weight.requires_grad_(not freeze_embeddings)
        self.optimizer_factory = optimizer
        self.warmup_steps, self.schedule, self.min_lr_ratio, self.regime = warmup_steps, schedule, min_lr_ratio, regime
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        # targets trained on by this process; saved in checkpoints so that a resumed run keeps counting
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        # config, data-derived model arguments and tokenizer (saffu_lab.train.run_record): saved in
        # every checkpoint under "saffu_lab", so eval.py and generate.py need no training corpus
        self.run_record: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_record is not None:
            checkpoint["saffu_lab"] = self.run_record

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch
        # a model solved from counts of these very targets scores them leave-one-out (LogLinearSAFFU)
        if hasattr(self.net, "training_objective"):  # its own objective and training NLL (the residual SAFFU's mixture)
            loss, nll = self.net.training_objective(x, y)
        else:
            logits = self.net.training_logits(x, y) if hasattr(self.net, "training_logits") else self(x)
            loss = nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.flatten(), ignore_index=IGNORE_INDEX)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}; lower regime.optimizer.lr")
        self.tokens_seen += (y != IGNORE_INDEX).sum()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", nll.detach().exp())
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def _evaluate(self, batch, metric: Perplexity, name: str):
        """Perplexity in full precision whatever the training precision (reported figures do not
        depend on trainer.precision); the parameters are float32 under mixed precision."""
        x, y = batch
        with torch.autocast(device_type=self.device.type, enabled=False):
            logits = self(x).float()
        if logits.dim() == 2:  # one target per row (SAFFU framing): a sequence of length 1
            logits, y = logits.unsqueeze(1), y.unsqueeze(1)
        metric.update(logits, y)
        self.log(name, metric, prog_bar=True, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_ppl, "val/ppl")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_ppl, "test/ppl")

    def configure_optimizers(self):
        own = [{"params": [p for p in getattr(self.net, name).parameters() if p.requires_grad], "lr": lr}
               for name, lr in self.module_lr.items()]
        taken = {id(p) for group in own for p in group["params"]}
        rest = {"params": [p for p in self.parameters() if p.requires_grad and id(p) not in taken]}
        optimizer = self.optimizer_factory(params=[g for g in [rest, *own] if g["params"]])
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup, schedule, floor = self.warmup_steps, self.schedule, self.min_lr_ratio

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())  # tied weights are counted once
