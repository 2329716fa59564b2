"""The LightningDataModule: corpus -> tokenizer -> cached token ids -> framed batches.

``prepare_data`` (one process) loads the corpus, trains the tokenizer on the training split
and writes the tokenised splits to ``cache_dir/tokenized-<key>/``, where the key hashes the
corpus fingerprint and the tokenizer settings: a sweep over model settings tokenises once.
Each entry holds blake2b checksums of its files, checked on every hit: a damaged entry is
rebuilt, with a warning naming the file.
``setup`` (every process) reads that cache, keeps the first ``train_tokens`` / ``dev_tokens``
targets (cutting a first document that alone is longer, with a warning), and frames the
splits with the ``framing`` object (causal windows for the GPT baseline, blocks and radii for
SAFFU models; see ``saffu_lab.framing``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from saffu_lab.data.corpus import SPLITS, Corpus
from saffu_lab.errors import ConfigError
from saffu_lab.framing import SpecialIds, document_lengths, document_stream, first_n_tokens, special_ids_of
from saffu_lab.resume import ResumableLoader, ResumableSampler
from saffu_lab.tokenizer import CountBPE

# the files of a cache entry, with their blake2b digests in CHECKSUMS (written before ``done``)
CACHE_FILES = ("tokenizer.json", *(f"{split}.pt" for split in SPLITS), "stats.json")
CHECKSUMS = "checksums.json"


class LMDataModule(pl.LightningDataModule):
    def __init__(
        self,
        corpus,
        tokenizer: CountBPE,
        cache_dir: str,
        path: str | None = None,
        framing=None,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        train_tokens: int | None = None,
        dev_tokens: int | None = None,
        test_tokens: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """``path`` is the folder of a file-based corpus (the config passes it to the corpus too);
        it is only recorded here, in ``stats``."""
        super().__init__()
        for name, value in (("train_tokens", train_tokens), ("dev_tokens", dev_tokens), ("test_tokens", test_tokens)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value} must be a positive token count, or null for the whole split")
        if framing is None:
            raise ConfigError("data.framing is not set: it comes from the framing group (framing=causal or framing=blocks)")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1, or null for the framing's default")
        self.corpus_source, self.tokenizer_trainer = corpus, tokenizer
        self.cache_dir = Path(cache_dir)
        # examples per batch: windows (causal framing) or targets (block framing)
        self.framing, self.batch_size = framing, batch_size or framing.default_batch_size
        self.eval_batch_size = eval_batch_size or 2 * self.batch_size
        self.limits = {"train": train_tokens, "dev": dev_tokens, "test": test_tokens}
        self.num_workers, self.seed = num_workers, seed
        self.cache_path: Path | None = None
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.datasets: dict[str, Dataset] = {}
        self.stats: dict = {"data/corpus": path or type(corpus).__name__}
        self.timings: dict[str, float] = {}

    # --- preparation: corpus, tokenizer, cache ---------------------------------------------
    def prepare_data(self) -> None:
        if self.cache_path is not None:
            return
        start = time.perf_counter()
        corpus: Corpus = self.corpus_source.load()
        key = json.dumps({"corpus": corpus.fingerprint, "tokenizer": self.tokenizer_trainer.cache_key()}, sort_keys=True)
        path = self.cache_dir / f"tokenized-{corpus.name}-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}"
        done = (path / "done").exists()
        problem = _cache_problem(path) if done else None
        if problem:  # a damaged entry: torch.load would fail later with a traceback naming no file
            _warn(f"tokenised cache {path}: {problem}; rebuilding it")
        hit = done and problem is None
        self.stats.update({"data/cache": path.name, "data/cache_hit": hit})  # sweeps tokenise once, then reuse
        if not hit:
            path.mkdir(parents=True, exist_ok=True)
            (path / "done").unlink(missing_ok=True)  # an interrupted rebuild is not taken for a finished one
            tokenizer = self.tokenizer_trainer.train(corpus.train)
            tmp = path / f"tokenizer.json.tmp{os.getpid()}"
            tokenizer.save(str(tmp))
            os.replace(tmp, path / "tokenizer.json")
            for split in SPLITS:
                encoded = tokenizer.encode_batch(corpus.split(split), add_special_tokens=False)
                lengths = torch.tensor([len(e.ids) for e in encoded], dtype=torch.long)
                ids = torch.tensor([i for e in encoded for i in e.ids], dtype=torch.int32)
                offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
                _atomic_save({"ids": ids, "offsets": offsets}, path / f"{split}.pt")
            _atomic_write_text(path / "stats.json", json.dumps(self.tokenizer_trainer.stats))
            _atomic_write_text(path / CHECKSUMS, json.dumps({name: _file_digest(path / name) for name in CACHE_FILES}))
            (path / "done").write_text(key)
        self.cache_path = path
        self.timings["prepare_data_s"] = time.perf_counter() - start

    # --- setup: read the cache, truncate, frame ----------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.prepare_data()  # a no-op once done; reads the cache location in DDP workers
        self.tokenizer = Tokenizer.from_file(str(self.cache_path / "tokenizer.json"))
        sp = self.special_ids
        for split in SPLITS:
            data = torch.load(self.cache_path / f"{split}.pt")
            ids, offsets, cut = first_n_tokens(data["ids"], data["offsets"], self.limits[split])
            if cut is not None:
                _warn(f"data.{split}_tokens={self.limits[split]}: the first document of the {split} split has "
                      f"{cut:,} targets; cut to its first {self.limits[split]:,}")
            self.stats[f"data/{split}_cut_document"] = cut is not None
            self.splits[split] = (ids, offsets)
            self.datasets[split] = self.framing.dataset(ids, offsets, sp)
            self.stats[f"data/{split}_tokens"] = int(document_lengths(offsets).sum()) + offsets.numel() - 1
            self.stats[f"data/{split}_documents"] = offsets.numel() - 1
        self.stats["vocab_size"] = self.vocab_size

    def model_kwargs(self) -> dict:
        """Data-derived constructor arguments of the model (vocabulary size, and what the framing adds)."""
        return {"vocab_size": self.vocab_size, **self.framing.model_kwargs(self.datasets["train"], self.vocab_size, self.special_ids)}

    @property
    def special_ids(self) -> SpecialIds:
        return special_ids_of(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def unigram_perplexity(self, fit_split: str = "train", eval_split: str = "test", smoothing: float = 1.0) -> float:
        """Perplexity of an add-``smoothing`` unigram model over the same targets as the LM."""
        sp = self.special_ids
        counts = torch.full((self.vocab_size,), smoothing, dtype=torch.float64)
        for split, out in ((fit_split, "fit"), (eval_split, "eval")):
            stream = document_stream(*self.splits[split], sp)
            targets = stream[stream != sp.sod]
            if out == "fit":
                counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
                counts[[sp.pad, sp.sod, sp.frg]] = 0.0  # never targets
            else:
                log_p = torch.log(counts / counts.sum())
                return float(torch.exp(-log_p[targets].mean()))
        raise AssertionError("unreachable")

    def kneser_ney_perplexity(self, order: int, fit_split: str = "train", eval_split: str = "test") -> float:
        """Perplexity of an interpolated modified Kneser-Ney ``order``-gram fitted on the targets of
        ``fit_split`` and scored on the targets of ``eval_split``: the same targets as the LM's
        (``saffu_lab.ngram``; histories within each document)."""
        from saffu_lab.ngram import kneser_ney_perplexity

        return kneser_ney_perplexity(order, self.vocab_size, self.special_ids, self.splits[fit_split], self.splits[eval_split])

    # --- loaders ----------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        if shuffle:  # each epoch's order from (seed, epoch); its position is saved in checkpoints
            order = ResumableSampler(len(dataset), self.seed)
        else:
            order = dataset.eval_order() if hasattr(dataset, "eval_order") else None
        # a generator of its own: creating an iterator then draws nothing from torch's global RNG
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableLoader(
            dataset, batch_size=self.batch_size if shuffle else self.eval_batch_size,
            generator=generator, sampler=order, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, collate_fn=getattr(dataset, "collate", None),
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("dev", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_problem(path: Path) -> str | None:
    """What is wrong with a finished cache entry, in words, or None when every file matches
    the checksum written with it (files are a few MB, so this is cheap on every hit)."""
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"it has no {CHECKSUMS} (written by an older version)"
    except (ValueError, OSError):
        return f"{CHECKSUMS} is unreadable"
    for name in CACHE_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        if expected.get(name) != _file_digest(path / name):
            return f"{name} fails its checksum (truncated or changed)"
    return None


@rank_zero_only
def _warn(message: str) -> None:
    """One line on stderr, from one process (``rank_zero_warn`` would add its source line)."""
    print(f"warning: {message}", file=sys.stderr)
