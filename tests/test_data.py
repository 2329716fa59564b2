"""Corpus sources, their errors, the tokenised-data cache, token limits, and the synthetic grammar's structure."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from saffu_lab.data.corpus import Corpus, HubCorpus, SyntheticCorpus, TextDirCorpus, write_babylm_layout
from saffu_lab.data.datamodule import LMDataModule
from saffu_lab.data.synthetic import generate_documents
from saffu_lab.errors import ConfigError, DataError
from saffu_lab.framing import CausalFraming, first_n_tokens
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


# --- corpus files that are not UTF-8 text: refused by name before `datasets` reads them ----------------

@pytest.mark.parametrize("content,match", [
    (b"", r"corpus file '.*tiny\.dev' is empty; remove it or give data\.path a folder"),
    (b"Hello.\nWor\0ld\n", r"corpus file '.*tiny\.dev' looks binary \(NUL byte at offset 10\);.* iconv -f utf-16"),
    ("Où est la balle?\n".encode("latin1"), r"corpus file '.*tiny\.dev' is not UTF-8 \(invalid byte 0xf9 at offset 1\);"
                                            r" convert it, e.g. iconv -f latin1 -t utf-8 "),
    ("caf\u00e9 \u20ac\n".encode() + b"ab\xe2\x82", r"is not UTF-8 \(invalid byte 0xe2 at offset 12\)"),  # cut-off character
    (b"\xff\0", r"looks binary \(NUL byte at offset 1\)"),  # a NUL wins over an invalid byte before it
])
def test_text_dir_refuses_a_file_that_is_not_utf8_text(tmp_path, content, match):
    folder = _write_folder(tmp_path / "corpus")
    (folder / "tiny.dev").write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        TextDirCorpus(path=str(folder), cache_dir=str(tmp_path / "hf")).load()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 22])
def test_text_dir_utf8_check_is_exact_across_read_chunks(tmp_path, monkeypatch, chunk):
    """Multi-byte characters split across reads are fine, and the offset of a bad byte is exact."""
    monkeypatch.setattr("saffu_lab.data.corpus.READ_CHUNK", chunk)
    folder = _write_folder(tmp_path / "corpus", text="Où est la balle? \u20ac\u20ac \U0001f600\n")
    assert TextDirCorpus(path=str(folder), cache_dir=str(tmp_path / "hf")).load().train == ["Où est la balle? \u20ac\u20ac \U0001f600"]
    bad = "\u20ac\U0001f600 ok\n".encode() + b"\xe2\x82(tail\n"  # 3 + 4 + 4 bytes, then a character cut short
    (folder / "tiny.test").write_bytes(bad)  # its first bytes may be held from an earlier read when "(" shows it bad
    with pytest.raises(DataError, match=r"tiny\.test' is not UTF-8 \(invalid byte 0xe2 at offset 11\)"):
        TextDirCorpus(path=str(folder), cache_dir=str(tmp_path / "hf")).load()


def test_train_py_refuses_a_latin1_corpus_file_in_one_line(tmp_path):
    from conftest import TINY, run_train

    folder = _write_folder(tmp_path / "corpus")
    (folder / "tiny.train").write_bytes("Où est la balle?\n".encode("latin1"))
    base = [o for o in TINY if not o.startswith("data.corpus.")]
    proc = run_train(base + ["data=text_dir", f"data.path={folder}"], tmp_path / "run", tmp_path / "cache", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Epoch 0" not in proc.stdout + proc.stderr
    assert [line for line in proc.stderr.splitlines() if "tiny.train" in line] == [  # besides "Seed set to 0"
        f"error: corpus file '{folder / 'tiny.train'}' is not UTF-8 (invalid byte 0xf9 at offset 1); "
        f"convert it, e.g. iconv -f latin1 -t utf-8 {folder / 'tiny.train'} > {folder / 'tiny.train'}.utf8 "
        f"&& mv {folder / 'tiny.train'}.utf8 {folder / 'tiny.train'}"
    ], proc.stderr[-2000:]


# --- token limits: exact, cutting a first document longer than the limit ---------------------------------

def test_first_n_tokens_cuts_a_first_document_longer_than_the_limit():
    ids, offsets = torch.tensor([10, 11, 12, 13, 14, 20, 21]), torch.tensor([0, 5, 7])  # 6 and 3 targets
    for n, kept_offsets in ((6, [0, 5]), (7, [0, 5]), (8, [0, 5]), (9, [0, 5, 7]), (100, [0, 5, 7])):
        kept_ids, kept, cut = first_n_tokens(ids, offsets, n)  # whole documents that fit (6, 9: exactly n)
        assert kept.tolist() == kept_offsets and kept_ids.tolist() == ids[: kept_offsets[-1]].tolist() and cut is None
    kept_ids, kept, cut = first_n_tokens(ids, offsets, 4)  # doc 1 has 6 targets > 4: its first 3 tokens + <eod>
    assert kept_ids.tolist() == [10, 11, 12] and kept.tolist() == [0, 3] and cut == 6
    kept_ids, kept, cut = first_n_tokens(ids, offsets, 1)  # only the <eod>
    assert kept_ids.tolist() == [] and kept.tolist() == [0, 0] and cut == 6
    assert first_n_tokens(ids, offsets, None) == (ids, offsets, None)


@dataclass
class _FixedCorpus:
    """A corpus source that returns the given documents (one long first training document)."""

    train: list[str]
    dev: list[str]
    test: list[str]

    def load(self) -> Corpus:
        return Corpus("fixed", str(hash((*self.train, *self.dev, *self.test))), self.train, self.dev, self.test)


def test_datamodule_cuts_a_first_document_longer_than_train_tokens(tmp_path, capsys):
    words = generate_documents(3000, seed=0)
    corpus = _FixedCorpus([" ".join(words)] + words[:5], words[5:40], words[40:80])  # doc 1: the whole text
    dm = LMDataModule(corpus=corpus, tokenizer=CountBPE(progress=False), cache_dir=str(tmp_path), framing=CausalFraming(16),
                      train_tokens=500, dev_tokens=10_000)
    dm.setup()
    assert dm.stats["data/train_tokens"] == 500 and dm.stats["data/train_documents"] == 1
    assert dm.stats["data/train_cut_document"] is True and dm.stats["data/dev_cut_document"] is False
    assert dm.stats["data/test_cut_document"] is False
    first = int(torch.load(dm.cache_path / "train.pt")["offsets"][1]) + 1  # its targets before the cut
    assert first > 1000
    assert capsys.readouterr().err.splitlines() == [
        f"warning: data.train_tokens=500: the first document of the train split has {first:,} targets; cut to its first 500"]
    assert len(dm.datasets["train"]) == -(-500 // 16)  # windows over <sod> + 500 targets


# --- the tokenised cache: checksums checked on every hit, a damaged entry rebuilt ------------------------

@pytest.mark.parametrize("damage,problem", [
    ("train.pt", "train.pt fails its checksum (truncated or changed)"),
    ("tokenizer.json", "tokenizer.json fails its checksum (truncated or changed)"),
    ("checksums.json", "it has no checksums.json (written by an older version)"),  # a cache from before checksums
    ("dev.pt-missing", "dev.pt is missing"),
])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, capsys, damage, problem):
    def module():
        return LMDataModule(corpus=SyntheticCorpus(seed=0, train_words=1500, dev_words=200, test_words=200),
                            tokenizer=CountBPE(progress=False), cache_dir=str(tmp_path), framing=CausalFraming(16))

    first = module()
    first.setup()
    original = {name: (first.cache_path / name).read_bytes() for name in ("tokenizer.json", "train.pt", "dev.pt", "test.pt")}
    assert module().prepare_data() is None and capsys.readouterr().err == ""  # an intact entry: a hit, silently
    name = damage.removesuffix("-missing")
    if damage == "checksums.json" or damage.endswith("-missing"):
        (first.cache_path / name).unlink()
    else:
        (first.cache_path / name).write_bytes(original[name][: len(original[name]) // 2])
    second = module()
    second.setup()
    assert capsys.readouterr().err.splitlines() == [f"warning: tokenised cache {first.cache_path}: {problem}; rebuilding it"]
    assert second.stats["data/cache_hit"] is False and second.cache_path == first.cache_path
    assert (first.cache_path / "tokenizer.json").read_bytes() == original["tokenizer.json"]
    for split in ("train", "dev", "test"):
        assert all(torch.equal(a, b) for a, b in zip(second.splits[split], first.splits[split]))
    third = module()
    third.setup()
    assert third.stats["data/cache_hit"] is True and capsys.readouterr().err == ""
