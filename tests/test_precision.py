"""trainer.precision: `auto` picks bf16 mixed precision where bfloat16 matmuls are native, and
reported perplexities do not depend on the training precision."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import TINY_SAFFU, read_metrics, run_train
from saffu_lab.train import native_bf16_cpu, resolve_precision


@pytest.mark.parametrize("flags,native", [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                                          ("fpu avx2 avx512f avx512bw", False)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
    assert native_bf16_cpu(str(cpuinfo)) is native
    assert native_bf16_cpu(str(tmp_path / "absent")) is False


def test_auto_resolves_once_and_explicit_values_pass_through(monkeypatch):
    monkeypatch.setattr("saffu_lab.train.native_bf16_cpu", lambda: True)
    cfg = OmegaConf.create({"trainer": {"precision": "auto", "accelerator": "cpu"}})
    assert resolve_precision(cfg) == "bf16-mixed" and cfg.trainer.precision == "bf16-mixed"
    monkeypatch.setattr("saffu_lab.train.native_bf16_cpu", lambda: False)
    cfg = OmegaConf.create({"trainer": {"precision": "auto", "accelerator": "cpu"}})
    assert resolve_precision(cfg) == "32-true"
    cfg = OmegaConf.create({"trainer": {"precision": "bf16-mixed", "accelerator": "cpu"}})
    assert resolve_precision(cfg) == "bf16-mixed"


def test_bf16_mixed_trains_and_scores_in_full_precision(tmp_path, cache_dir):
    """An explicit solution scored under bf16-mixed gives the float32 figures (evaluation and the
    solve run in full precision); a warm run under bf16-mixed trains to a finite, lower dev ppl."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        run_train(TINY_SAFFU + ["regime=explicit", f"trainer.precision={precision}"], tmp_path / precision, cache_dir)
        runs[precision] = read_metrics(tmp_path / precision)
    assert runs["bf16-mixed"]["precision"] == "bf16-mixed" and runs["32-true"]["precision"] == "32-true"
    for key in ("val/ppl", "test/ppl"):
        assert runs["bf16-mixed"][key] == pytest.approx(runs["32-true"][key], rel=1e-6)
    run_train(TINY_SAFFU + ["regime=warm", "trainer.max_epochs=1", "trainer.precision=bf16-mixed"], tmp_path / "warm", cache_dir)
    warm = read_metrics(tmp_path / "warm")
    assert warm["precision"] == "bf16-mixed" and warm["global_step"] > 0
    assert warm["val/ppl"] < warm["explicit/val_ppl"]
