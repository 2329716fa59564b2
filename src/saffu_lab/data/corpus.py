"""Corpus sources: each returns train / dev / test lists of documents (one document per line).

- ``SyntheticCorpus``: the project's own child-directed grammar (``data=synthetic``).
- ``TextDirCorpus``: a local folder in BabyLM layout, ``*.train``, ``*.dev``, ``*.test``,
  read with ``datasets.load_dataset("text", ...)`` (``data=text_dir data.path=DIR``); a file
  that is empty, binary or not UTF-8 is refused first, by name.
- ``HubCorpus``: a dataset on the Hugging Face hub by id, e.g. BabyLM 10M (``data=babylm``).

Every source has a ``fingerprint`` that changes when its text changes; the tokenised-data
cache is keyed by it, so a sweep tokenises each corpus once.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from saffu_lab.data.synthetic import generate_documents
from saffu_lab.errors import ConfigError, DataError

SPLITS = ("train", "dev", "test")
GRAMMAR_VERSION = 1  # bump when the synthetic grammar changes, to invalidate caches
READ_CHUNK = 1 << 22  # bytes per read when hashing and checking corpus files


@dataclass
class Corpus:
    name: str
    fingerprint: str
    train: list[str]
    dev: list[str]
    test: list[str]

    def split(self, name: str) -> list[str]:
        return getattr(self, name)


def _documents(lines) -> list[str]:
    """Non-blank lines, stripped of surrounding whitespace (blank lines are skipped)."""
    return [line.strip() for line in lines if line and not line.isspace()]


def _check_nonempty(corpus: Corpus, where: str) -> Corpus:
    for split in SPLITS:
        if not corpus.split(split):
            raise DataError(f"the {split} split of {where} has no documents (every line is blank)")
    return corpus


@dataclass
class SyntheticCorpus:
    seed: int = 0
    train_words: int = 170_000
    dev_words: int = 17_000
    test_words: int = 17_000

    def __post_init__(self):
        for split in SPLITS:
            n = getattr(self, f"{split}_words")
            if n < 1:
                raise ConfigError(f"data.corpus.{split}_words={n} must be >= 1")

    def load(self) -> Corpus:
        # distinct seeds per split, so dev and test are fresh samples of the same grammar
        docs = {s: generate_documents(getattr(self, f"{s}_words"), seed=self.seed * 3 + i) for i, s in enumerate(SPLITS)}
        key = json.dumps([GRAMMAR_VERSION, self.seed, self.train_words, self.dev_words, self.test_words])
        return Corpus("synthetic", _digest(key.encode()), docs["train"], docs["dev"], docs["test"])


@dataclass
class TextDirCorpus:
    path: str | None = None
    cache_dir: str | None = None

    def files(self) -> dict[str, list[str]]:
        if self.path in (None, "", "???"):
            raise ConfigError("data=text_dir needs a folder: add data.path=DIR (a folder with *.train, *.dev, *.test files)")
        root = Path(self.path).expanduser()
        if not root.exists():
            raise DataError(f"corpus folder {str(root)!r} does not exist; give data.path=DIR with *.train, *.dev, *.test files")
        if not root.is_dir():
            raise DataError(f"data.path={str(root)!r} is a file, not a folder of *.train, *.dev, *.test files")
        files = {s: sorted(str(p) for p in root.glob(f"*.{s}")) for s in SPLITS}
        if not any(files.values()):
            raise DataError(f"corpus folder {str(root)!r} is empty of corpus files: expected *.train, *.dev, *.test (BabyLM layout)")
        for split, found in files.items():
            if not found:
                raise DataError(f"corpus folder {str(root)!r} has no *.{split} file (BabyLM layout needs *.train, *.dev, *.test)")
        return files

    def load(self) -> Corpus:
        import datasets

        files = self.files()
        h = hashlib.blake2b(digest_size=16)
        for split in SPLITS:
            for f in files[split]:
                h.update(f"{split}:{os.path.basename(f)}".encode())
                _hash_text_file(f, h)  # checked here: `datasets` would fail on it with a long traceback
        loaded = datasets.load_dataset(
            "text", data_files={"train": files["train"], "validation": files["dev"], "test": files["test"]},
            cache_dir=self.cache_dir,
        )
        docs = {s: _documents(loaded[hf]["text"]) for s, hf in zip(SPLITS, ("train", "validation", "test"))}
        name = Path(self.path).expanduser().resolve().name
        return _check_nonempty(Corpus(name, h.hexdigest(), docs["train"], docs["dev"], docs["test"]), f"corpus folder {self.path!r}")


def _hash_text_file(path: str, h) -> None:
    """Feed the file to ``h`` in chunks, checking that it holds UTF-8 text: not empty, no NUL byte
    (a NUL anywhere wins over an earlier invalid byte: "binary" is the better diagnosis)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    bad_utf8, offset = None, 0  # (offset, byte) of the first invalid byte; bytes read so far
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(READ_CHUNK), b""):
            h.update(chunk)
            if (nul := chunk.find(b"\0")) >= 0:
                raise DataError(f"corpus file {path!r} looks binary (NUL byte at offset {offset + nul}); remove it from "
                                f"the folder, or if it is UTF-16 text convert it: {_iconv('utf-16', path)}")
            if bad_utf8 is None:
                bad_utf8 = _invalid_utf8(decoder, chunk, offset, final=False)
            offset += len(chunk)
    if offset == 0:
        raise DataError(f"corpus file {path!r} is empty; remove it or give data.path a folder whose *.train/*.dev/*.test files hold text")
    if bad_utf8 is None:
        bad_utf8 = _invalid_utf8(decoder, b"", offset, final=True)  # a character cut off by the end of the file
    if bad_utf8 is not None:
        at, byte = bad_utf8
        raise DataError(f"corpus file {path!r} is not UTF-8 (invalid byte 0x{byte:02x} at offset {at}); "
                        f"convert it, e.g. {_iconv('latin1', path)}")


def _iconv(encoding: str, path: str) -> str:
    q, tmp = shlex.quote(path), shlex.quote(path + ".utf8")
    return f"iconv -f {encoding} -t utf-8 {q} > {tmp} && mv {tmp} {q}"


def _invalid_utf8(decoder, chunk: bytes, offset: int, final: bool) -> tuple[int, int] | None:
    """(file offset, value) of the first invalid byte, or None. The decoder keeps the bytes of a
    character split across chunks and decodes them with the next chunk, so error positions count
    from those kept bytes: subtract them to get the file offset."""
    pending = len(decoder.getstate()[0])
    try:
        decoder.decode(chunk, final)
    except UnicodeDecodeError as err:
        return offset - pending + err.start, err.object[err.start]
    return None


# split names that the hub's datasets use for each of our splits, in order of preference
HUB_SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev", "valid", "val"), "test": ("test",)}


@dataclass
class HubCorpus:
    """A dataset by hub id (or a local folder in the same layout) through ``datasets.load_dataset``."""

    hub_id: str = "AlienKevin/BabyLM_2024_10M"
    config_name: str | None = None
    text_column: str = "text"
    cache_dir: str | None = None

    def load(self) -> Corpus:
        import datasets

        try:
            loaded = datasets.load_dataset(self.hub_id, self.config_name, cache_dir=self.cache_dir)
        except (ConnectionError, OSError) as err:  # datasets raises ConnectionError when the hub is unreachable
            raise DataError(
                f"cannot load {self.hub_id!r} from the Hugging Face hub ({type(err).__name__}: {_first_line(err)}). "
                "Without internet, download the BabyLM files elsewhere and use data=text_dir data.path=DIR"
            ) from None
        except Exception as err:  # unknown id, bad config name, ...
            raise DataError(f"cannot load dataset {self.hub_id!r}: {type(err).__name__}: {_first_line(err)}") from None
        docs = {}
        for split, candidates in HUB_SPLIT_NAMES.items():
            hf_split = next((c for c in candidates if c in loaded), None)
            if hf_split is None:
                raise DataError(f"dataset {self.hub_id!r} has no {split} split (it has {sorted(loaded)})")
            if self.text_column not in loaded[hf_split].column_names:
                raise DataError(
                    f"dataset {self.hub_id!r} has no column {self.text_column!r} "
                    f"(it has {loaded[hf_split].column_names}); set data.corpus.text_column"
                )
            docs[split] = _documents(loaded[hf_split][self.text_column])
        fingerprint = _digest("".join(loaded[s]._fingerprint for s in sorted(loaded)).encode())
        return _check_nonempty(Corpus(self.hub_id.replace("/", "__"), fingerprint, docs["train"], docs["dev"], docs["test"]), f"dataset {self.hub_id!r}")


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def write_babylm_layout(corpus: Corpus, folder: str | Path, stem: str | None = None) -> Path:
    """Write a corpus as ``STEM.train``, ``STEM.dev``, ``STEM.test``, one document per line."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (folder / f"{stem or corpus.name}.{split}").write_text("\n".join(corpus.split(split)) + "\n")
    return folder
