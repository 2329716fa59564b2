"""Faults: a run stopped by a signal, resumed exactly; a stopped sweep finished by re-running it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
