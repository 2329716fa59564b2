"""Slow tests (`pytest -m slow`): full default runs and real text from ../shared/corpora."""

from __future__ import annotations

import pytest

from conftest import SHARED, read_metrics, run_train

pytestmark = pytest.mark.slow
KJV = SHARED / "corpora" / "kjv"


def test_default_run_beats_unigram(tmp_path, cache_dir):
    """The README's main command on the synthetic default, as it is (a few minutes on 2 cores)."""
    run_train(["logger=csv"], tmp_path / "default", cache_dir, timeout=1800)
    m = read_metrics(tmp_path / "default")
    assert m["test/ppl"] < 0.2 * m["unigram/test_ppl"], m


@pytest.mark.skipif(not KJV.exists(), reason="../shared/corpora/kjv is not beside this checkout")
def test_kjv_one_epoch(tmp_path, cache_dir):
    run_train(["data=text_dir", f"data.path={KJV}", "trainer.max_epochs=1", "logger=csv"], tmp_path / "kjv",
              cache_dir, timeout=1800)
    m = read_metrics(tmp_path / "kjv")
    assert m["data/train_tokens"] > 500_000
    assert m["test/ppl"] < m["unigram/test_ppl"], m
