"""Faults: a run stopped by a signal, resumed exactly; a stopped sweep finished by re-running it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import ROOT, TINY, read_metrics, run_train

TESTS = Path(__file__).resolve().parent
# dropout on and 2 epochs, so that both the data order and the random state matter on resume
RESUMABLE = TINY + ["trainer.max_epochs=2", "logger=wandb", "trainer.log_every_n_steps=1", "model.dropout=0.1"]


def _signal_at(step: int, name: str = "SIGTERM", **extra) -> list[str]:
    return ["+callbacks.signal._target_=signal_at_step.SignalAtStep", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.name={name}", *[f"+callbacks.signal.{k}={v}" for k, v in extra.items()]]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(TESTS)}


def _train(overrides: list[str], cache_dir: Path, run_dir: Path | None = None, multirun: bool = False):
    cmd = [sys.executable, str(ROOT / "train.py"), *(["-m"] if multirun else []), f"paths.cache_dir={cache_dir}", *overrides]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_the_run_with_a_failure_code_last_ckpt_and_metrics(name, code, tmp_path, cache_dir):
    run_dir = tmp_path / "stopped"
    proc = _train(TINY + ["trainer.max_epochs=3", "logger=csv"] + _signal_at(7, name), cache_dir, run_dir)
    assert proc.returncode == code, proc.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["interrupted"] is True and m["signal"] == name and m["global_step"] == 7
    assert Path(m["last_checkpoint"]) == run_dir / "checkpoints" / "last.ckpt" and Path(m["last_checkpoint"]).exists()
    assert f"stopped by {name} at step 7" in proc.stderr and "ckpt_path=" in proc.stderr


def test_a_resumed_run_follows_the_uninterrupted_path_in_the_same_folder(tmp_path, cache_dir):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert _train(RESUMABLE, cache_dir, whole).returncode == 0
    first = _train(RESUMABLE + _signal_at(15), cache_dir, stopped)  # mid-epoch 1 (an epoch has 11 batches)
    assert first.returncode == 143, first.stderr[-3000:]
    wandb_id = (stopped / "wandb_id.txt").read_text()
    clock_at_stop = torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]["WallClock"]["elapsed_s"]
    # no hydra.run.dir: a checkpoint of RUN/checkpoints resumes into RUN
    resumed = _train(RESUMABLE + [f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}"], cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _losses(whole), _losses(stopped)
    assert sorted(a) == sorted(b) and len(a) == 22  # one history: every step once, none lost
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, [(s, a[s], b[s]) for s in sorted(a) if abs(a[s] - b[s]) >= 1e-5][:5]
    mw, ms = read_metrics(whole), read_metrics(stopped)
    assert ms["interrupted"] is False and ms["global_step"] == mw["global_step"]
    assert ms["val/ppl"] == pytest.approx(mw["val/ppl"], rel=1e-5)
    assert (stopped / "wandb_id.txt").read_text() == wandb_id  # the same W&B run, resumed
    with open(stopped / "csv" / "metrics.csv") as f:  # the clock goes on from the stop (validations at steps 11, 22)
        clock = [float(r["time/elapsed_s"]) for r in csv.DictReader(f) if r.get("time/elapsed_s")]
    assert len(clock) == 2 and clock[0] < clock_at_stop < clock[1], (clock, clock_at_stop)
    assert "resume: allow" in (stopped / "config.yaml").read_text()


def test_a_stopped_sweep_is_finished_by_running_it_again(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    once = tmp_path / "signal-sent"
    overrides = TINY + ["trainer.max_epochs=1", "logger=csv", "model.d_model=16,24,32", f"hydra.sweep.dir={sweep}"]
    stopped = _train(overrides + _signal_at(5, job=1, once_file=once), cache_dir, multirun=True)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert json.loads((sweep / "stopped.json").read_text())["job"] == 1
    plan = json.loads((sweep / "plan.json").read_text())
    assert [[o for o in j["overrides"] if o.startswith("model.d_model")] for j in plan["jobs"]] == [
        ["model.d_model=16"], ["model.d_model=24"], ["model.d_model=32"]]

    collect = [sys.executable, str(ROOT / "scripts" / "collect_results.py"), str(sweep)]
    out = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "3 planned jobs: 1 ok, 1 stopped, 1 missing" in out.stdout, out.stdout

    again = _train(overrides + _signal_at(5, job=1, once_file=once), cache_dir, multirun=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "job 0 (" in again.stderr and "finished earlier: skipped" in again.stderr
    assert "job 1 was stopped at step 5: resuming from" in again.stderr
    for num in range(3):
        m = read_metrics(sweep / str(num))
        assert m["interrupted"] is False and m["val/ppl"] > 1
    out = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "3 planned jobs: 3 ok" in out.stdout, out.stdout


class _ScriptedPerplexity(pl.LightningModule):
    """One parameter, one training batch per epoch, and a dev perplexity read from a script."""

    def __init__(self, script: list[float]):
        super().__init__()
        self.w, self.script = torch.nn.Parameter(torch.zeros(1)), script

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/ppl", self.script[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _FailAtStep(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("a crash that no handler sees (as SIGKILL or the out-of-memory killer)")


def _fit_scripted(tmp_path: Path, script: list[float], fail_at: int | None = None):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from saffu_lab.resume import StopHandling

    best = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/ppl", mode="min", save_top_k=1, save_last=False)
    callbacks = [best, StopHandling()] + ([_FailAtStep(fail_at)] if fail_at is not None else [])
    data = torch.utils.data.DataLoader(torch.zeros(1, 1))
    trainer = pl.Trainer(max_epochs=len(script), callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    try:
        trainer.fit(_ScriptedPerplexity(script), data, data)
    except RuntimeError:
        assert fail_at is not None
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    return ckpt["global_step"], float(state["best_model_score"])


def test_last_ckpt_is_the_last_state_not_the_best(tmp_path):
    """Lightning's save_last wrote last.ckpt only beside a new best: after the best validation
    (step 2 here) it stood still. StopHandling writes it after every validation and at the end."""
    assert _fit_scripted(tmp_path, [5.0, 3.0, 4.0, 6.0]) == (4, 3.0)


def test_last_ckpt_holds_the_best_updated_by_the_same_validation(tmp_path):
    """StopHandling runs after ModelCheckpoint, so a last.ckpt saved at a new best records that best
    (a resume from it then compares later validations with the right score)."""
    assert _fit_scripted(tmp_path, [5.0, 4.0, 3.0]) == (3, 3.0)


def test_a_crash_without_a_signal_loses_only_the_steps_since_the_last_validation(tmp_path):
    """A process killed without a handler (here an exception as step 4 starts) leaves last.ckpt at its
    last validation (step 3, not a best), not at the best one (step 1)."""
    assert _fit_scripted(tmp_path, [3.0, 5.0, 6.0, 7.0], fail_at=3) == (3, 3.0)
