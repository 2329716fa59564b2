"""`train.py` end to end: metrics.json, the offline W&B run, resume, DDP, and one-line errors."""

from __future__ import annotations

import math

import pytest

from conftest import TINY, read_metrics, run_train
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
                "time/prepare_data_s", "time/total_s", "unigram/test_ppl", "data/train_tokens"):
        assert key in m, key
    assert all(math.isfinite(m[k]) for k in ("val/ppl", "test/ppl"))
    assert m["epochs"] == 3 and m["world_size"] == 1 and not m["interrupted"]
    assert m["tokens_seen"] >= 3 * m["data/train_tokens"] * 0.99
    # the baseline learns the grammar: well below the unigram perplexity of the same data
    assert m["test/ppl"] < 0.5 * m["unigram/test_ppl"], (m["test/ppl"], m["unigram/test_ppl"])
    assert (trained_run / "tokenizer.json").exists()
    assert (trained_run / "checkpoints" / "last.ckpt").exists()


def test_offline_wandb_run_holds_val_ppl_history_and_samples(trained_run):
    rows = history(trained_run / "wandb")
    val = [r["val/ppl"] for r in rows if "val/ppl" in r]
    assert len(val) >= 3 and val[0] > val[-1]  # one per validation, falling
    summary = [r for r in rows if "test/ppl" in r]
    assert summary and "vocab_size" in summary[-1]
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
    run_train(overrides + ["trainer.max_epochs=4", f"ckpt_path={ckpt}", "logger=csv"], resumed_dir, cache_dir)
    m = read_metrics(resumed_dir)
    assert m["epochs"] == 4
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
])
def test_bad_input_is_one_clear_line_before_training(overrides, message, tmp_path, cache_dir):
    base = [o for o in TINY if not o.startswith("data.corpus.")] if "data=text_dir" in overrides else TINY
    proc = run_train(base + overrides, tmp_path / "run", cache_dir, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Epoch 0" not in proc.stdout + proc.stderr  # nothing was trained
