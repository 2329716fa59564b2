"""`train.py` end to end: metrics.json, the offline W&B run, resume, DDP, and one-line errors."""

from __future__ import annotations

import math
import platform
from pathlib import Path

import pytest
import torch

from conftest import TINY, TINY_DATA, TINY_SAFFU, read_metrics, run_train
from saffu_lab.wandb_offline import history, tables

LEARNABLE = [o for o in TINY if not o.startswith(("data.corpus.train_words", "trainer.max_epochs"))] + [
    "data.corpus.train_words=20000", "trainer.max_epochs=3", "model.d_model=48",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "first"
    run_train(LEARNABLE, run_dir, cache_dir)
    return run_dir


def test_run_writes_metrics_json(trained_run):
    m = read_metrics(trained_run)
    for key in ("val/ppl", "test/ppl", "params", "vocab_size", "tokens_seen", "time/fit_s", "time/test_s",
                "time/prepare_data_s", "time/total_s", "unigram/test_ppl", "data/train_tokens",
                "baseline/kn2_val_ppl", "baseline/kn3_val_ppl", "baseline/kn2_test_ppl", "baseline/kn3_test_ppl"):
        assert key in m, key
    assert all(math.isfinite(m[k]) for k in ("val/ppl", "test/ppl"))
    assert m["epochs"] == 3 and m["world_size"] == 1 and not m["interrupted"]
    if platform.machine() in ("x86_64", "AMD64"):
        assert m["flush_denormal"] is True  # the default, on a CPU that has the mode
    assert m["tokens_seen"] >= 3 * m["data/train_tokens"] * 0.99
    # the baseline learns the grammar: well below the unigram perplexity of the same data
    assert m["test/ppl"] < 0.5 * m["unigram/test_ppl"], (m["test/ppl"], m["unigram/test_ppl"])
    assert (trained_run / "tokenizer.json").exists()
    assert (trained_run / "checkpoints" / "last.ckpt").exists()


def test_offline_wandb_run_holds_val_ppl_history_and_samples(trained_run):
    rows = history(trained_run / "wandb")
    val = [r["val/ppl"] for r in rows if "val/ppl" in r]
    assert len(val) >= 3 and val[0] > val[-1]  # one per validation, falling
    clock = [r["time/elapsed_s"] for r in rows if "time/elapsed_s" in r]  # callbacks.WallClock, one per validation
    assert len(clock) == 3 and 0 < clock[0] < clock[1] < clock[2]  # the 3 validations of fit (3 epochs)
    summary = [r for r in rows if "test/ppl" in r]
    assert summary and "vocab_size" in summary[-1]
    for key in ("baseline/kn2_val_ppl", "baseline/kn3_val_ppl", "baseline/kn2_test_ppl", "baseline/kn3_test_ppl"):
        assert summary[-1][key] == pytest.approx(read_metrics(trained_run)[key])  # the references reach W&B too
    samples = tables(trained_run / "wandb", "samples")
    assert samples[-1]["columns"] == ["step", "text"]
    steps = {row[0] for row in samples[-1]["data"]}
    assert len(steps) == 3 and len(samples[-1]["data"]) == 3 * 4  # 4 samples at each of 3 validations
    assert all(isinstance(text, str) for _, text in samples[-1]["data"])
    csv_lines = (trained_run / "csv" / "metrics.csv").read_text().splitlines()
    assert "val/ppl" in csv_lines[0] and len(csv_lines) > 3


def test_resume_from_checkpoint(trained_run, tmp_path, cache_dir):
    first = read_metrics(trained_run)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    resumed_dir = tmp_path / "resumed"
    overrides = [o for o in LEARNABLE if not o.startswith("trainer.max_epochs")]
    run_train(overrides + ["trainer.max_epochs=4", f"ckpt_path={ckpt}", "logger=csv", "flush_denormal=false"],
              resumed_dir, cache_dir)
    m = read_metrics(resumed_dir)
    assert m["epochs"] == 4 and m["flush_denormal"] is False
    assert m["global_step"] == first["global_step"] * 4 // 3  # continued, not restarted
    assert m["tokens_seen"] > first["tokens_seen"]
    csv = (resumed_dir / "csv" / "metrics.csv").read_text()
    assert csv.count("\n") > 1


def test_ddp_with_two_cpu_processes(tmp_path, cache_dir):
    run_dir = tmp_path / "ddp"
    run_train(TINY + ["trainer=ddp", "logger=csv", "trainer.max_epochs=1"], run_dir, cache_dir)
    m = read_metrics(run_dir)
    assert m["world_size"] == 2 and m["ddp_backend"] == "gloo"
    assert math.isfinite(m["val/ppl"])


@pytest.mark.parametrize("overrides,message", [
    (["model=nope"], "Could not find 'model/nope'"),
    (["data.train_tokens=0"], "error: data.train_tokens=0 must be a positive token count"),
    (["model.n_head=3"], "error: model.d_model=32 must be divisible by model.n_head=3"),
    (["data=text_dir", "data.path=/nonexistent/corpus"], "error: corpus folder '/nonexistent/corpus' does not exist"),
    (["data=text_dir"], "data.path"),
    (["hydra.run.dir=/dev/null/run"], "error: run directory '/dev/null/run' cannot be written"),
    (["model=gpt", "regime=warm"], "error: regime=warm solves SAFFU models explicitly, but model is GPT; use regime=cold"),
    (["model=saffu_loglinear", "regime=explicit", "aggregation=block_cat_radial_cat"],
     "error: model=saffu_loglinear aggregates block sum + radial cat, not block cat + radial cat"),
    (["model=saffu_loglinear", "regime=explicit", "solver=default"], "error: a LogLinearSAFFU is solved by solver=loglinear"),
    (["kneser_ney_orders=[2,5]"], "error: kneser_ney_orders has 5; give n-gram orders in 1..4"),
    (["model=saffu_cat_r8", "solver.tuning_iterations=-1"], "error: solver.tuning_iterations=-1 must be >= 0"),
    # the whole config is checked (types and ranges) before any data is read
    (["model=saffu_loglinear", "regime=explicit", "model.radius=eight"],
     "error: model.radius='eight' is not an integer (LogLinearSAFFU takes radius: an integer); give e.g. model.radius=8"),
    (["model.d_model=1.5"], "error: model.d_model=1.5 is not an integer"),
    (["model=saffu_residual", "regime=warm", "model.saffu.radius=0"], "error: model.saffu.radius=0 must be an integer >= 1"),
    (["regime.optimizer.lr=-0.001"], "error: regime.optimizer.lr=-0.001 must be a learning rate > 0"),
    (["+regime.module_lr.head=0"], "error: regime.module_lr.head=0 must be a learning rate > 0"),
    (["+regime.module_lr.saffu=1e-3"], "error: regime.module_lr.saffu: the network (GPT) has no submodule 'saffu'; use one of"),
    (["model=saffu_residual", "regime=warm", "model.saffu.block_rank=-1"], "error: model.saffu.block_rank=-1 must be 0"),
    (["model=saffu_residual", "regime=warm", "model.combine=product"], "error: model.combine='product' must be sum (the experts'"),
    (["experiment=mixture_warm", "model.mix_init=1"], "error: model.mix_init=1 must be a weight strictly between 0 and 1"),
    (["experiment=mixture_warm", "model.gpt_loss=-1"], "error: model.gpt_loss=-1 must be a weight >= 0"),
    (["trainer.max_epochs=0"], "error: trainer.max_epochs=0 trains nothing with regime=cold (backprop)"),
    (["trainer.limit_val_batches=1.5"], "error: trainer.limit_val_batches=1.5 must be null, a fraction in [0, 1]"),
    (["data.batch_size=0"], "error: data.batch_size=0 must be null or an integer >= 1"),
    (["callbacks.model_checkpoint.save_last=true"], "error: callbacks.model_checkpoint.save_last=True must be false: train.py writes last.ckpt"),
    (["+trainer.enable_checkpointing=false"], "error: trainer.enable_checkpointing=False must be true: every run keeps last.ckpt"),
    (["logger=wandb", "logger.offline=false"], "error: logger.offline=false syncs to W&B, but no credentials were found"),
])
def test_bad_input_is_one_clear_line_before_training(overrides, message, tmp_path, cache_dir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` credentials either
    base = [o for o in TINY if not o.startswith("data.corpus.")] if "data=text_dir" in overrides else TINY
    if any(o.startswith(("regime=", "model=")) for o in overrides):  # these replace the GPT baseline's choices
        base = [o for o in TINY_DATA if o.startswith("data.corpus.")] + [o for o in overrides if o.startswith(("regime=", "model="))]
        overrides = [o for o in overrides if not o.startswith(("regime=", "model="))]
    proc = run_train(base + overrides, tmp_path / "run", cache_dir, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Epoch 0" not in proc.stdout + proc.stderr  # nothing was trained


@pytest.fixture(scope="module")
def saffu_runs(tmp_path_factory, cache_dir):
    """regime=explicit, and regime=warm and warm_as_cold vs regime=cold at the same short budget (2 epochs)."""
    root = tmp_path_factory.mktemp("saffu")
    data = [o for o in TINY_SAFFU if not o.startswith("data.corpus.train_words")] + ["data.corpus.train_words=12000"]
    run_train(data + ["regime=explicit"], root / "explicit", cache_dir)
    run_train(data + ["regime=warm", "trainer.max_epochs=2", "logger=csv"], root / "warm", cache_dir)
    run_train(data + ["regime=warm_as_cold", "trainer.max_epochs=2", "logger=csv"], root / "warm_as_cold", cache_dir)
    run_train(data + ["regime=cold", "trainer.max_epochs=2", "logger=csv"], root / "cold", cache_dir)
    return {name: read_metrics(root / name) for name in ("explicit", "warm", "warm_as_cold", "cold")}


def test_explicit_regime_solves_and_evaluates_without_backprop(saffu_runs):
    m = saffu_runs["explicit"]
    assert m["global_step"] == 0 and m["tokens_seen"] == 0  # no backprop step
    # start-up only (the paper's ablation): attention, decoders, final layer; no tuning pass
    assert m["explicit/passes"] == 3 and m["explicit/targets"] == m["data/train_tokens"]
    assert not any(k.startswith("explicit/tuning") for k in m)
    assert m["val/ppl"] == pytest.approx(m["explicit/val_ppl"], rel=1e-4)
    assert m["test/ppl"] < 0.55 * m["unigram/test_ppl"], m  # beats a unigram model on held-out text
    for key in ("explicit/wall_s", "explicit/start-up_s", "explicit/nonpositive_M"):
        assert key in m
    # the Kneser-Ney references on the same targets, in metrics.json
    for split in ("val", "test"):
        kn2, kn3 = m[f"baseline/kn2_{split}_ppl"], m[f"baseline/kn3_{split}_ppl"]
        assert 1 < kn3 < kn2 < m[f"unigram/{split}_ppl"]
    assert Path(m["explicit/checkpoint"]).exists()  # the solved model is kept


def test_explicit_best_beats_the_kneser_ney_references(tmp_path, cache_dir):
    """experiment=explicit_best (the log-linear SAFFU, explicit only) on held-out synthetic text."""
    data = [o for o in TINY_DATA if not o.startswith("data.corpus.train_words")] + ["data.corpus.train_words=12000"]
    run_train(data + ["experiment=explicit_best", "logger=csv", "model.block_dim=32"], tmp_path / "best", cache_dir)
    m = read_metrics(tmp_path / "best")
    assert m["global_step"] == 0 and m["explicit/lam_radial_1"] > 0 and m["explicit/heldout_targets"] > 0
    assert m["val/ppl"] < m["baseline/kn2_val_ppl"] and m["test/ppl"] < m["baseline/kn2_test_ppl"], m
    assert m["test/ppl"] < m["baseline/kn3_test_ppl"], m


@pytest.mark.parametrize("regime", ["warm", "warm_as_cold"])
def test_warm_start_ends_below_cold_start(saffu_runs, regime):
    """Both warm regimes; warm_as_cold trains exactly as cold does, so only the start differs."""
    warm, cold = saffu_runs[regime], saffu_runs["cold"]
    assert warm["global_step"] == cold["global_step"] > 0  # the same budget
    assert warm["test/ppl"] < cold["test/ppl"], (warm["test/ppl"], cold["test/ppl"])
    assert warm["test/ppl"] <= warm["explicit/val_ppl"] * 1.05  # backprop did not undo the solve


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (trainer=gpu)")
def test_warm_start_on_a_gpu_solves_as_on_the_cpu(saffu_runs, tmp_path, cache_dir):
    """The explicit solve runs on the CPU whatever the trainer's device; the model then trains on the GPU."""
    data = [o for o in TINY_SAFFU if not o.startswith("data.corpus.train_words")] + ["data.corpus.train_words=12000"]
    run_train(data + ["regime=warm", "trainer=gpu", "trainer.max_epochs=2", "logger=csv"], tmp_path / "gpu", cache_dir)
    gpu, cpu = read_metrics(tmp_path / "gpu"), saffu_runs["warm"]
    assert gpu["explicit/val_ppl"] == pytest.approx(cpu["explicit/val_ppl"], rel=1e-3)
    assert gpu["global_step"] == cpu["global_step"] and math.isfinite(gpu["test/ppl"])
    assert gpu["test/ppl"] <= gpu["explicit/val_ppl"] * 1.05


def test_self_guided_run_drops_its_guides_half_way(tmp_path, cache_dir):
    overrides = TINY + ["ffn=lowrank", "ffn.param_ratio=0.25", "logger=csv"]
    run_train(overrides + ["regime=cold"], tmp_path / "plain", cache_dir)
    guided_overrides = [o for o in overrides if o != "regime=cold"] + ["regime=self_guided"]
    run_train(guided_overrides, tmp_path / "guided", cache_dir)
    plain, guided = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "guided")
    assert guided["self_guided/dropped_at_step"] == guided["global_step"] // 2
    assert guided["params"] == plain["params"]  # the dense guides are gone from the final model
    assert guided["self_guided/extra_flops"] > 0 and math.isfinite(guided["test/ppl"])


def test_self_guided_flops_mode_ends_the_guided_phase_earlier(tmp_path, cache_dir):
    overrides = [o for o in TINY if o != "regime=cold"] + ["ffn=lowrank", "ffn.param_ratio=0.25", "logger=none",
                                                            "regime=self_guided", "callbacks.self_guided.mode=flops"]
    run_train(overrides, tmp_path / "flops", cache_dir)
    m = read_metrics(tmp_path / "flops")
    # the guides cost FLOPs too, so half the structured-FFN FLOP budget is spent before half the steps
    assert 0 < m["self_guided/dropped_at_step"] < m["global_step"] // 2


def test_structured_saffu_self_guided_starts_from_the_dense_explicit_solution(saffu_runs, tmp_path, cache_dir):
    data = [o for o in TINY_SAFFU if not o.startswith("data.corpus.train_words")] + ["data.corpus.train_words=12000"]
    run_train(data + ["ffn=lowrank", "regime=self_guided", "trainer.max_epochs=2", "logger=csv",
                      "callbacks.explicit_solve.startup_only=true"], tmp_path / "sg", cache_dir)  # the solve regime=explicit runs
    guided, dense = read_metrics(tmp_path / "sg"), saffu_runs["explicit"]
    # alpha = 1 at the start: the dense guides hold the explicit solution, so the model *is* the dense solve
    assert guided["explicit/val_ppl"] == pytest.approx(dense["explicit/val_ppl"], rel=1e-4)
    assert guided["self_guided/dropped_at_step"] == guided["global_step"] // 2
    assert guided["params"] < dense["params"]  # guides gone: only the low-rank decoders remain
    assert guided["test/ppl"] < dense["test/ppl"], (guided["test/ppl"], dense["test/ppl"])


def test_flush_denormal_is_set_once_per_process(monkeypatch):
    """The CPU keeps the mode per thread (torch's workers copy it when they start), so a process sets
    it at its first job, and a later job that asks for the other setting is refused, not half-applied."""
    import saffu_lab.train as train_module
    from saffu_lab.errors import ConfigError

    calls = []
    monkeypatch.setattr(train_module, "_FLUSH_DENORMAL", {})
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: calls.append(on) or True)
    assert train_module.set_flush_denormal(True) is True
    assert train_module.set_flush_denormal(True) is True and calls == [True]  # set once
    with pytest.raises(ConfigError, match="flush_denormal=False.*already runs with flush_denormal=True"):
        train_module.set_flush_denormal(False)
    monkeypatch.setattr(train_module, "_FLUSH_DENORMAL", {})
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: False)  # a CPU without the mode
    assert train_module.set_flush_denormal(True) is False


def test_common_trainer_keys_need_no_plus_and_a_model_worse_than_unigram_is_flagged(tmp_path, cache_dir):
    run_dir = tmp_path / "one-step"
    proc = run_train(TINY + ["trainer.max_steps=1", "trainer.accumulate_grad_batches=1", "trainer.gradient_clip_val=0.5",
                             "trainer.limit_train_batches=1.0", "trainer.val_check_interval=1.0", "logger=csv"], run_dir, cache_dir)
    m = read_metrics(run_dir)
    assert m["global_step"] == 1
    assert m["val/ppl"] > m["unigram/val_ppl"]  # one step of a random GPT: worse than token frequencies
    assert m["warning/worse_than_unigram"] == 1 and "worse than the unigram on dev" in m["warnings"][0]
    assert "warning: the final model is worse than the unigram on dev" in proc.stderr
    assert "warning/worse_than_unigram" in (run_dir / "csv" / "metrics.csv").read_text()


def test_validation_can_be_switched_off(tmp_path, cache_dir):
    run_dir = tmp_path / "no-val"
    proc = run_train(TINY + ["trainer.max_steps=2", "trainer.limit_val_batches=0"], run_dir, cache_dir)
    m = read_metrics(run_dir)
    assert m["val/ppl"] is None and m["global_step"] == 2 and m["test/ppl"] > 1
    assert "validation skipped" in proc.stdout and m["warnings"] == []


def test_progress_lines_reach_a_redirected_stderr_and_train_log(tmp_path, cache_dir):
    run_dir = tmp_path / "progress"
    proc = run_train(TINY + ["trainer.max_epochs=1", "callbacks.progress.every_s=0.001"], run_dir, cache_dir)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert len(lines) >= 5, proc.stderr[-2000:]  # not a terminal: plain lines, one per step at this interval
    assert all("tok/s" in line and "loss" in line and "elapsed" in line for line in lines)
    assert "ETA" in lines[0] and "\r" not in proc.stderr  # no progress bar
    log = (run_dir / "train.log").read_text()
    assert "| loss " in log and "validation at step" in log and "training ended" in log


def test_progress_line_names_the_epoch_of_the_last_step():
    """A run stopped mid-epoch (trainer.max_time or max_steps): Lightning has advanced current_epoch by
    the end, the line still names the epoch the last step was in; max_epochs=-1 shows no bound."""
    import types

    from saffu_lab.progress import ProgressLog

    log = ProgressLog(every_s=1e9)
    module = types.SimpleNamespace(tokens_seen=torch.tensor(0))
    trainer = types.SimpleNamespace(global_step=680, current_epoch=3, max_epochs=100, max_steps=-1,
                                    estimated_stepping_batches=22500, callback_metrics={}, is_global_zero=True)
    log.on_train_batch_end(trainer, module, None, None, 0)
    trainer.current_epoch = 4  # what Lightning reports in on_train_end after the stop
    assert "| epoch 4/100 |" in log.line(trainer, module, log.start + 1)
    trainer.max_epochs = -1
    assert "| epoch 4 |" in log.line(trainer, module, log.start + 1)


def test_wall_clock_counts_a_solve_in_an_earlier_callback(tmp_path):
    """time/elapsed_s counts from fit start whatever the callbacks' order: a stand-in for the explicit
    solve listed before WallClock (as regime=warm's defaults put it) still lies inside the clock."""
    import time

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from saffu_lab.callbacks import WallClock

    class Solve(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            time.sleep(0.5)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val/loss", self.layer(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    clock = WallClock()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[Solve(), clock], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(Tiny(), loader, loader)
    assert trainer.callback_metrics["time/elapsed_s"] >= 0.5
