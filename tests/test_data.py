"""Corpus sources, their errors, the tokenised-data cache, and the synthetic grammar's structure."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from saffu_lab.data.corpus import HubCorpus, SyntheticCorpus, TextDirCorpus, write_babylm_layout
from saffu_lab.data.datamodule import LMDataModule
from saffu_lab.data.synthetic import generate_documents
from saffu_lab.errors import ConfigError, DataError
from saffu_lab.framing import CausalFraming
from saffu_lab.tokenizer import CountBPE


def test_synthetic_is_deterministic_and_seeded():
    assert generate_documents(2000, seed=3) == generate_documents(2000, seed=3)
    assert generate_documents(2000, seed=3) != generate_documents(2000, seed=4)
    corpus = SyntheticCorpus(seed=0, train_words=3000, dev_words=300, test_words=300).load()
    assert corpus.fingerprint == SyntheticCorpus(seed=0, train_words=3000, dev_words=300, test_words=300).load().fingerprint
    assert corpus.dev != corpus.train[: len(corpus.dev)]  # each split has its own seed


def _cross_entropy(train_docs, test_docs, order):
    """Add-0.1 smoothed word n-gram cross-entropy (nats per word), order 1 or 2."""
    def grams(doc):
        words = ["<s>"] + doc.split() + ["</s>"]
        return [tuple(words[i - order + 1:i + 1]) for i in range(order - 1 if order > 1 else 1, len(words))]
    counts, context = Counter(), Counter()
    for d in train_docs:
        for g in grams(d):
            counts[g] += 1
            context[g[:-1]] += 1
    vocab = len({g[-1] for g in counts}) + 1
    total, n = 0.0, 0
    for d in test_docs:
        for g in grams(d):
            total -= math.log((counts[g] + 0.1) / (context[g[:-1]] + 0.1 * vocab))
            n += 1
    return total / n


def test_synthetic_grammar_has_structure_a_unigram_cannot_see():
    train, test = generate_documents(60_000, seed=0), generate_documents(6000, seed=1)
    unigram, bigram = _cross_entropy(train, test, 1), _cross_entropy(train, test, 2)
    assert math.exp(bigram) < 0.5 * math.exp(unigram)  # context more than halves the perplexity
    # agreement: after "is" comes a singular-compatible continuation; "are" follows plural nouns
    text = " ".join(train)
    assert "dogs is" not in text and "dog are" not in text and "a apple" not in text


def _write_folder(tmp_path, splits=("train", "dev", "test"), text="Hello there.\n\nWhere is the ball?\n"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for s in splits:
        (tmp_path / f"tiny.{s}").write_text(text)
    return tmp_path


def test_text_dir_loader_reads_babylm_layout(tmp_path):
    corpus = SyntheticCorpus(seed=2, train_words=500, dev_words=100, test_words=100).load()
    folder = write_babylm_layout(corpus, tmp_path / "corpus", stem="synthetic")
    (folder / "synthetic.train").write_text("\n".join(corpus.train[:5]) + "\n\n   \n" + "\n".join(corpus.train[5:]) + "\n")
    loaded = TextDirCorpus(path=str(folder), cache_dir=str(tmp_path / "hf")).load()
    assert loaded.train == corpus.train  # blank lines skipped
    assert loaded.dev == corpus.dev and loaded.test == corpus.test
    again = TextDirCorpus(path=str(folder), cache_dir=str(tmp_path / "hf")).load()
    assert again.fingerprint == loaded.fingerprint
    (folder / "synthetic.test").write_text("Changed.\n")
    assert TextDirCorpus(path=str(folder), cache_dir=str(tmp_path / "hf")).load().fingerprint != loaded.fingerprint


@pytest.mark.parametrize("setup,match", [
    ("missing", "does not exist"),
    ("empty", "empty of corpus files"),
    ("no_train", r"no \*\.train file"),
    ("blank_train", "train split .* has no documents"),
    ("file", "is a file"),
])
def test_text_dir_errors(tmp_path, setup, match):
    path = tmp_path / "corpus"
    if setup == "empty":
        path.mkdir()
    elif setup == "no_train":
        _write_folder(path, splits=("dev", "test"))
    elif setup == "blank_train":
        _write_folder(path)
        (path / "tiny.train").write_text("\n  \n\n")
    elif setup == "file":
        path.write_text("not a folder")
    with pytest.raises(DataError, match=match):
        TextDirCorpus(path=str(path), cache_dir=str(tmp_path / "hf")).load()


def test_text_dir_needs_a_path():
    with pytest.raises(ConfigError, match="data.path=DIR"):
        TextDirCorpus(path="???").load()


def test_babylm_loader_on_a_local_copy_in_hub_layout(tmp_path):
    """The `data=babylm` code path (datasets.load_dataset by id) on a folder in the hub's layout."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    corpus = SyntheticCorpus(seed=4, train_words=400, dev_words=100, test_words=100).load()
    data = tmp_path / "BabyLM_local" / "data"
    data.mkdir(parents=True)
    for split, hub_split in (("train", "train"), ("dev", "dev"), ("test", "test")):
        rows = corpus.split(split) + [""]  # a blank row, skipped like a blank line
        pq.write_table(pa.table({"text": rows}), data / f"{hub_split}-00000-of-00001.parquet")
    loaded = HubCorpus(hub_id=str(tmp_path / "BabyLM_local"), cache_dir=str(tmp_path / "hf")).load()
    assert loaded.train == corpus.train and loaded.dev == corpus.dev and loaded.test == corpus.test
    with pytest.raises(DataError, match="no column 'words'"):
        HubCorpus(hub_id=str(tmp_path / "BabyLM_local"), text_column="words", cache_dir=str(tmp_path / "hf")).load()


def test_babylm_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load 'someone/not-downloaded-babylm'.*data=text_dir"):
        HubCorpus(hub_id="someone/not-downloaded-babylm", cache_dir=str(tmp_path / "hf")).load()


def test_tokenised_data_is_cached_by_corpus_and_tokenizer(tmp_path, monkeypatch):
    def module(**kw):
        return LMDataModule(corpus=SyntheticCorpus(seed=0, train_words=2000, dev_words=200, test_words=200),
                            tokenizer=CountBPE(progress=False, **kw), cache_dir=str(tmp_path), framing=CausalFraming(16))

    first = module()
    first.setup()
    calls = []
    original = CountBPE.train
    monkeypatch.setattr(CountBPE, "train", lambda self, docs: calls.append(1) or original(self, docs))
    second = module()
    second.setup()
    assert calls == [] and second.cache_path == first.cache_path  # reused, not retrained
    assert second.vocab_size == first.vocab_size
    third = module(keep_words=50)  # another tokenizer: another cache entry
    third.setup()
    assert calls == [1] and third.cache_path != first.cache_path


def test_token_limits_and_unigram_baseline(tmp_path):
    dm = LMDataModule(corpus=SyntheticCorpus(seed=0, train_words=3000, dev_words=300, test_words=300),
                      tokenizer=CountBPE(progress=False), cache_dir=str(tmp_path), framing=CausalFraming(16), train_tokens=500)
    dm.setup()
    assert 450 <= dm.stats["data/train_tokens"] <= 500
    ppl = dm.unigram_perplexity("train", "test")
    assert 1.0 < ppl < dm.vocab_size


@pytest.mark.parametrize("kwargs,match", [({"train_tokens": 0}, "train_tokens"), ({"batch_size": 0}, "batch_size"),
                                          ({"framing": None}, "framing")])
def test_datamodule_rejects_out_of_range_values(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LMDataModule(corpus=SyntheticCorpus(), tokenizer=CountBPE(), cache_dir=str(tmp_path),
                     **{"framing": CausalFraming(8), **kwargs})
