"""Callbacks: the explicit solve at fit start, the paper's early-stopping rule, and samples."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import move_data_to_device, rank_zero_info

from saffu_lab.errors import ConfigError
from saffu_lab.progress import stderr_is_terminal
from saffu_lab.resume import checkpoint_folder


class PerplexityRiseStopping(pl.Callback):
    """Stop after ``max_rises`` rises of the monitored perplexity (the paper: 2^3 rises).

    A rise is a validation whose value is higher than the previous validation's. With
    ``reset_on_best`` (default) the count restarts whenever a new best value is reached, so
    only rises since the best count; without it, every rise of the run counts.
    """

    def __init__(self, monitor: str = "val/ppl", max_rises: int = 8, reset_on_best: bool = True):
        if max_rises < 1:
            raise ConfigError(f"callbacks.early_stopping.max_rises={max_rises} must be >= 1 (the paper uses 8)")
        self.monitor, self.max_rises, self.reset_on_best = monitor, max_rises, reset_on_best
        self.previous, self.best, self.rises, self.stopped_at = math.inf, math.inf, 0, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if value > self.previous:
            self.rises += 1
        if value < self.best:
            self.best = value
            if self.reset_on_best:
                self.rises = 0
        self.previous = value
        if self.rises >= self.max_rises:
            trainer.should_stop = True
            self.stopped_at = trainer.global_step
            rank_zero_info(f"early stopping: {self.monitor} rose {self.rises} times (best {self.best:.3f})")

    def state_dict(self) -> dict:
        return {"previous": self.previous, "best": self.best, "rises": self.rises}

    def load_state_dict(self, state_dict: dict) -> None:
        self.previous, self.best, self.rises = state_dict["previous"], state_dict["best"], state_dict["rises"]


class WallClock(pl.Callback):
    """Logs ``time/elapsed_s`` beside every validation: seconds since fit started (the explicit
    solve included), so a learning curve can be read against CPU wall-clock
    (``scripts/benchmark_time_to_ppl.py``)."""

    def __init__(self):
        self.start: float | None = None
        self.before = 0.0  # seconds the run had used before a resume (from the checkpoint)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning runs every callback's setup before any callback's on_fit_start, so the clock
        # runs before the explicit solve (ExplicitSolveCallback.on_fit_start) whatever the order of
        # the callbacks (a config's defaults list decides that order: regime=warm puts the solve first)
        if stage == "fit" and self.start is None:
            self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def state_dict(self) -> dict:  # in every checkpoint: a resumed run's clock goes on from there
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.before = float(state.get("elapsed_s", 0.0))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start is not None and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            pl_module.log("time/elapsed_s", self.elapsed(), on_step=False, on_epoch=True)


class SampleCallback(pl.Callback):
    """At every validation, generate documents from ``<sod>`` and log them.

    The rows (step, text) go to a ``wandb.Table`` named ``samples`` (the whole history, re-logged
    each time) and are appended to ``samples.txt`` in the run directory.
    """

    def __init__(self, n_samples: int = 4, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0, output_file: str | None = None):
        if n_samples < 1 or max_new_tokens < 1:
            raise ConfigError(f"callbacks.samples needs n_samples >= 1 and max_new_tokens >= 1, got {n_samples}, {max_new_tokens}")
        self.n_samples, self.max_new_tokens, self.temperature, self.top_k = n_samples, max_new_tokens, temperature, top_k
        self.seed, self.output_file = seed, output_file
        self.rows: list[list] = []

    def generate(self, pl_module: pl.LightningModule, tokenizer, special) -> list[str]:
        prompt = torch.full((self.n_samples, 1), special.sod, dtype=torch.long, device=pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + pl_module.global_step)
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.net.generate(
            prompt, self.max_new_tokens, stop_id=special.eod, temperature=self.temperature, top_k=self.top_k,
            generator=generator, banned_ids=(special.pad, special.sod, special.frg),
        )
        pl_module.train(was_training)
        texts = []
        for row in out.tolist():
            body = row[1:]
            if special.eod in body:
                body = body[: body.index(special.eod)]
            texts.append(tokenizer.decode(body, skip_special_tokens=True))
        return texts

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # only validations inside fit, not trainer.validate() afterwards
        self.log_samples(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(row[0] == trainer.global_step for row in self.rows):  # e.g. regime=explicit: no validation in fit
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        texts = self.generate(pl_module, dm.tokenizer, dm.special_ids)
        step = trainer.global_step
        self.rows.extend([step, t] for t in texts)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="samples", columns=["step", "text"], data=self.rows, step=step)
        if self.output_file:
            path = Path(self.output_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.writelines(f"{step}\t{t}\n" for t in texts)


class ExplicitSolveCallback(pl.Callback):
    """At fit start, solve the SAFFU model explicitly (``saffu_lab.solver``), then let backprop go on.

    Logs ``explicit/val_ppl`` (the solved model on the dev split), the solve's wall-clock and
    the count of non-positive co-occurrences per matrix, and saves the solved model as
    ``checkpoints/explicit.ckpt``. A run resumed from a checkpoint is not solved again.
    With ``only_saffu`` (regime=self_guided) other models are skipped instead of refused.
    ``explicit/train_ppl`` is the solved model's perplexity on ``train_eval_targets`` training
    targets spread evenly over the training split (all of them if it has fewer; null: skip),
    the "train" figure of the paper's appendix-D tables. ``save_checkpoint=false`` (sweeps of
    hundreds of solves) keeps no ``explicit.ckpt``.

    Structured decoders take the least-squares projection of the dense solution; under
    self-guided training their dense guides (attached at setup) take the dense solution itself,
    so training starts from the explicit model and alpha decays away from it.
    """

    def __init__(self, solver, only_saffu: bool = False, train_eval_targets: int | None = 100_000,
                 save_checkpoint: bool = True, eval_batch_size: int = 1024, startup_only: bool = False):
        if train_eval_targets is not None and train_eval_targets < 1:
            raise ConfigError(f"callbacks.explicit_solve.train_eval_targets={train_eval_targets} must be >= 1, or null (skip)")
        self.solver, self.only_saffu = solver, only_saffu
        self.train_eval_targets, self.save_checkpoint, self.eval_batch_size = train_eval_targets, save_checkpoint, eval_batch_size
        self.startup_only = startup_only
        self.metrics: dict = {}

    def check_model(self, net, regime: str) -> bool:
        """Whether ``net`` is solved here (a SAFFU model with its own solver); raises a ConfigError
        for a model this regime cannot solve, or a solver that does not fit the model."""
        from saffu_lab.models.loglinear import LogLinearSAFFU
        from saffu_lab.models.saffu import SAFFUTransformer
        from saffu_lab.solver import ExplicitSolver
        from saffu_lab.solver_loglinear import LogLinearSolver

        net = solved_part(net)
        if not isinstance(net, (SAFFUTransformer, LogLinearSAFFU)):
            if self.only_saffu:
                return False
            raise ConfigError(f"regime={regime} solves SAFFU models explicitly, but model is {type(net).__name__}; "
                              "use regime=cold for model=gpt")
        pairs = {SAFFUTransformer: (ExplicitSolver, "solver=default"), LogLinearSAFFU: (LogLinearSolver, "solver=loglinear")}
        solver_type, option = next(v for k, v in pairs.items() if isinstance(net, k))
        if not isinstance(self.solver, solver_type):
            raise ConfigError(f"a {type(net).__name__} is solved by {option}, not {type(self.solver).__name__}; "
                              f"drop the solver override or give {option}")
        return True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from saffu_lab.models.loglinear import LogLinearSAFFU

        if not self.check_model(pl_module.net, pl_module.regime):
            return
        net = solved_part(pl_module.net)  # a residual SAFFU's SAFFU (its transformer starts at zero)
        if isinstance(net, LogLinearSAFFU) and trainer.world_size > 1 and pl_module.regime != "explicit":
            # DDP registered the parameters before this solve sizes the sparse decoders
            raise ConfigError(f"a log-linear SAFFU (model=saffu_loglinear, saffu_residual) cannot train under DDP (world "
                              f"size {trainer.world_size}): its sparse decoders are sized by the solve, after DDP wraps "
                              "the model; use one process "
                              "(trainer=cpu or trainer=gpu), or regime=explicit")
        if trainer.ckpt_path:
            rank_zero_info("explicit solve skipped: resuming from a checkpoint")
            return
        train = solved_data(trainer.datamodule.datasets["train"])
        # tqdm bars on a terminal only: in a log file their carriage returns are noise
        self.solver.progress = self.solver.progress and trainer.is_global_zero and stderr_is_terminal()
        rank_zero_info(f"explicit solve of {type(net).__name__} over {len(train):,} training targets")
        start = time.perf_counter()
        device = pl_module.device
        net.cpu()  # the solver streams CPU-held data into float64 CPU sums; the model returns to its device after
        report = self.solver.solve(net, train, rank=trainer.global_rank,
                                   world_size=trainer.world_size, startup_only=self.startup_only)
        net.to(device)
        self.metrics = report.metrics()
        self.metrics["explicit/wall_s"] = time.perf_counter() - start
        self.metrics["explicit/val_ppl"] = evaluate_perplexity(pl_module, trainer.datamodule.val_dataloader())
        if self.train_eval_targets is not None:  # the solved part in its own framing: at the start, the same model
            rows = _evenly_spaced(len(train), self.train_eval_targets)
            rows = rows[torch.argsort(train.framed.position[rows], stable=True)]  # batches share padded tails
            batches = (train.collate(rows[s:s + self.eval_batch_size]) for s in range(0, rows.numel(), self.eval_batch_size))
            self.metrics["explicit/train_ppl"] = evaluate_perplexity(net, batches)
            self.metrics["explicit/train_eval_targets"] = rows.numel()
        rank_zero_info(f"explicit solve: {self.metrics['explicit/wall_s']:.1f} s over {report.targets} targets "
                       f"in {report.folds} fold(s); dev perplexity {self.metrics['explicit/val_ppl']:.3f}")
        if self.save_checkpoint:  # keep the solved model: regime=explicit trains nothing, so no other checkpoint holds it
            folder = checkpoint_folder(trainer)
            trainer.save_checkpoint(folder / "explicit.ckpt")
            self.metrics["explicit/checkpoint"] = str(folder / "explicit.ckpt")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: v for k, v in self.metrics.items() if not isinstance(v, str)}, step=trainer.global_step)


def solved_part(net: torch.nn.Module) -> torch.nn.Module:
    """The part of ``net`` that the explicit solver solves: a residual SAFFU's SAFFU, else ``net``."""
    return getattr(net, "saffu", net)


def solved_data(dataset):
    """The per-target dataset the solver reads: a residual framing's ``per_target``, else ``dataset``."""
    return getattr(dataset, "per_target", dataset)


def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    """``min(n, k)`` indices spread evenly over ``range(n)`` (deterministic)."""
    if k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long().unique()


@torch.no_grad()
def evaluate_perplexity(module: torch.nn.Module, loader) -> float:
    """Per-target perplexity of a LightningModule or a bare network over ``(inputs, y)`` batches
    (no Trainer needed)."""
    from saffu_lab.framing import IGNORE_INDEX

    was_training = module.training
    device = next(module.parameters()).device
    module.eval()
    total, count = 0.0, 0
    for inputs, y in loader:
        logits = module(move_data_to_device(inputs, device)).float()
        y = y.to(device)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.flatten(),
                                                          ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((y != IGNORE_INDEX).sum())
    module.train(was_training)
    return math.exp(total / max(count, 1))


class SelfGuidedTraining(pl.Callback):
    """Self-guided training (seed paper 2406.16450, section 2.3) for structured linear maps.

    Every structured map gets a dense guide, and computes o = a * dense(x) + (1 - a) * structured(x);
    a falls from 1 to 0 on a cosine over the first ``fraction`` of training, then the guides
    leave the model and the optimiser. ``mode="steps"`` (official default) measures progress in
    training steps; ``mode="flops"`` in FFN FLOPs: the FLOPs spent so far, guides included,
    over ``fraction`` of the FLOPs the structured FFNs alone would spend in the whole run (so
    the guided phase ends earlier in steps, and the run's extra FLOPs stay within that budget).
    Logs ``self_guided/alpha`` and ``self_guided/extra_flops`` (the guides' forward and
    backward FLOPs: 3 x 2 x in x out per token).

    A model without structured maps (ffn=dense) is refused, unless ``dense_models="skip"``
    (used by sweeps that cross ffn with regime): then the run is plain cold training, said so
    in the log and in ``self_guided/guided_layers = 0``.
    """

    def __init__(self, fraction: float = 0.5, mode: str = "steps", dense_models: str = "error"):
        if not 0 < fraction <= 1:
            raise ConfigError(f"callbacks.self_guided.fraction={fraction} must be in (0, 1]")
        if mode not in ("steps", "flops"):
            raise ConfigError(f"callbacks.self_guided.mode={mode!r} is not one of 'steps', 'flops'")
        if dense_models not in ("error", "skip"):
            raise ConfigError(f"callbacks.self_guided.dense_models={dense_models!r} is not one of 'error', 'skip'")
        self.fraction, self.mode, self.dense_models = fraction, mode, dense_models
        self.layers: list = []
        self.extra_flops = 0
        self.flops_done = 0
        self.metrics: dict = {}

    def alpha(self, step: int, total_steps: int) -> float:
        """Cosine from 1 (step 0) to 0 (step = fraction * total), 0 afterwards."""
        return self.cosine(step / max(1, round(self.fraction * total_steps)))

    @staticmethod
    def cosine(progress: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from saffu_lab.models.structured import _Structured

        if stage != "fit" or self.layers:
            return
        self.layers = [m for m in pl_module.modules() if isinstance(m, _Structured)]
        if not self.layers:
            if self.dense_models == "skip":
                self.metrics = {"self_guided/guided_layers": 0}
                rank_zero_info("self-guided training: the model has no structured maps, so this run is plain cold training")
                return
            raise ConfigError("regime=self_guided needs structured FFN layers: add ffn=lowrank|blockdense|blockshuffle")
        for layer in self.layers:
            layer.attach_guide()  # before configure_optimizers, so the optimiser sees the guides

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if not self.layers or self.layers[0].guide is None:
            return
        tokens = batch[1].numel()
        guide_flops = 3 * sum(2 * tokens * l.in_features * l.out_features for l in self.layers)
        structured_flops = 3 * sum(l.flops(tokens) for l in self.layers)
        if self.mode == "steps":
            a = self.alpha(trainer.global_step, trainer.estimated_stepping_batches)
        else:
            budget = self.fraction * structured_flops * trainer.estimated_stepping_batches
            a = self.cosine(self.flops_done / budget)
        if a <= 0.0:
            self._drop_guides(trainer)
            return
        for layer in self.layers:
            layer.alpha.fill_(a)
        self.extra_flops += guide_flops
        self.flops_done += guide_flops + structured_flops
        pl_module.log("self_guided/alpha", a)
        pl_module.log("self_guided/extra_flops", float(self.extra_flops))

    def _drop_guides(self, trainer: pl.Trainer) -> None:
        guide_params = {id(p) for layer in self.layers for p in layer.guide.parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in guide_params:
                        optimizer.state.pop(p, None)
                group["params"] = [p for p in group["params"] if id(p) not in guide_params]
        for layer in self.layers:
            layer.drop_guide()
        self.metrics = {"self_guided/extra_flops": self.extra_flops, "self_guided/dropped_at_step": trainer.global_step,
                        "self_guided/guided_layers": len(self.layers)}
        rank_zero_info(f"self-guided training: dense guides dropped at step {trainer.global_step}")
