"""The paper's count-based byte-pair encoding with vocabulary reduction (section 4, Tokenization).

Training (``CountBPE.train``):

1. Split every training document into words with GPT-2's byte-level pre-tokeniser, so that
   the 256 byte symbols are the base alphabet and *any* string still tokenises.
2. Keep the ``max_words`` (2^17) most frequent words with their counts.
3. Merge the most frequent adjacent pair, counted over those words weighted by their counts,
   until every new merge would make a token of count 1 (``min_pair_count = 2``).
4. Reduce: keep only the sub-words needed to tokenise the ``keep_words`` (2^12) most frequent
   words, plus every sub-word those are merged from, plus all base bytes. The reduced merges
   tokenise those words exactly as the full merges do (a removed merge never fires on them).

The result is a ``tokenizers.Tokenizer`` (a BPE model with the kept merges), used for fast
batched encoding and saved as ``tokenizer.json`` with each run. The special tokens have fixed
ids 0-3 and are never split.

``FixedTokenizer`` stands in for ``CountBPE`` where a run's tokenizer is reused rather than
trained (``eval.py`` on a new corpus); ``decode_text`` turns a whole sequence of byte-level ids
back into text (``generate.py``).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm

from saffu_lab.errors import ConfigError, DataError

PAD, SOD, EOD, FRG = "<pad>", "<sod>", "<eod>", "<frg>"
SPECIAL_TOKENS = (PAD, SOD, EOD, FRG)  # ids 0, 1, 2, 3


def byte_level_pre_tokenizer() -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def count_words(documents: Iterable[str], progress: bool = False) -> Counter:
    """Counts of byte-level pre-tokenised words ("Ġcat" is " cat") over the documents."""
    pre = byte_level_pre_tokenizer()
    counts: Counter = Counter()
    for doc in tqdm(documents, desc="counting words", unit="doc", disable=not progress, mininterval=1):
        counts.update(word for word, _ in pre.pre_tokenize_str(doc))
    return counts


def learn_merges(word_counts: dict[str, int], min_pair_count: int = 2, progress: bool = False):
    """Count-based BPE merges, most frequent pair first (ties broken by the pair's text).

    Pair counts are updated incrementally: a merge only revisits the words that hold the
    merged pair. Stops when the best pair occurs fewer than ``min_pair_count`` times, i.e.
    with the default 2, when every new merge would create a token of count 1.
    """
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, (symbols, c) in enumerate(zip(words, counts)):
        for pair in zip(symbols, symbols[1:]):
            pair_count[pair] += c
            pair_words[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    bar = tqdm(desc="learning BPE merges", unit="merge", disable=not progress, mininterval=1)
    while heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg_count:
            continue  # stale heap entry: the pair's count changed since it was pushed
        if -neg_count < min_pair_count:
            break
        merges.append(pair)
        bar.update()
        merged, changed = pair[0] + pair[1], set()
        for wi in pair_words.pop(pair):
            symbols, c = words[wi], counts[wi]
            for p in zip(symbols, symbols[1:]):
                pair_count[p] -= c
                changed.add(p)
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_count[p] += c
                pair_words[p].add(wi)
                changed.add(p)
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                pair_count.pop(p, None)
    bar.close()
    return merges


def build_tokenizer(merges: list[tuple[str, str]]) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` with the specials at ids 0-3, then bytes, then merges."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = byte_level_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def reduce_merges(merges, keep_words: list[str]) -> list[tuple[str, str]]:
    """The merges needed to tokenise ``keep_words`` (pre-tokenised words) as the full merges do.

    Needed = every token of those words' full tokenisation, closed under "is merged from".
    """
    full = build_tokenizer(merges).model
    parents: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for a, b in merges:
        parents[a + b].append((a, b))
    needed: set[str] = set()
    stack = [t.value for w in keep_words for t in full.tokenize(w)]
    while stack:
        token = stack.pop()
        if token in needed:
            continue
        needed.add(token)
        for a, b in parents.get(token, ()):
            stack.extend((a, b))
    return [(a, b) for a, b in merges if a + b in needed]


@dataclass
class CountBPE:
    """Hydra-configurable trainer of the paper's count-based BPE (see module docstring)."""

    max_words: int = 2**17
    keep_words: int | None = 2**12
    min_pair_count: int = 2
    progress: bool = True
    stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.max_words < 1:
            raise ConfigError(f"tokenizer.max_words={self.max_words} must be >= 1 (the paper uses 131072)")
        if self.keep_words is not None and not 1 <= self.keep_words <= self.max_words:
            raise ConfigError(
                f"tokenizer.keep_words={self.keep_words} must be in [1, tokenizer.max_words={self.max_words}]"
                " (the paper uses 4096), or null to skip the vocabulary reduction"
            )
        if self.min_pair_count < 2:
            raise ConfigError(
                f"tokenizer.min_pair_count={self.min_pair_count} must be >= 2: a merge of count 1 "
                "memorises a single word (the paper stops before those)"
            )

    def cache_key(self) -> dict:
        """The settings that change the trained vocabulary (used to key the on-disk cache)."""
        return {k: v for k, v in asdict(self).items() if k not in ("progress", "stats")}

    def train(self, documents: Iterable[str]) -> Tokenizer:
        counts = count_words(documents, progress=self.progress)
        if not counts:
            raise DataError("cannot train the tokenizer: the training split has no words")
        top = dict(counts.most_common(self.max_words))
        merges = learn_merges(top, self.min_pair_count, progress=self.progress)
        self.stats = {"words": len(counts), "bpe_words": len(top), "full_vocab": len(build_tokenizer(merges).get_vocab())}
        if self.keep_words is not None:
            merges = reduce_merges(merges, [w for w, _ in counts.most_common(self.keep_words)])
        tok = build_tokenizer(merges)
        self.stats["vocab"] = tok.get_vocab_size()
        return tok


def special_id(tokenizer: Tokenizer, token: str) -> int:
    idx = tokenizer.token_to_id(token)
    if idx is None:
        raise DataError(f"tokenizer has no special token {token!r}; retrain it with saffu_lab.tokenizer.CountBPE")
    return idx


class FixedTokenizer:
    """A tokenizer that is given, not trained: the interface ``LMDataModule`` expects of ``CountBPE``
    (``train``, ``cache_key``, ``stats``), returning one fixed ``Tokenizer`` whatever the corpus.

    ``eval.py`` tokenises a new corpus with the checkpoint's own tokenizer through it, so the ids
    mean what they meant in training; the data cache is keyed by a hash of the tokenizer's JSON.
    """

    def __init__(self, tokenizer: Tokenizer | str):
        self.json = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
        try:
            self.tokenizer = Tokenizer.from_str(self.json)
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises its own Exception type
            raise DataError(f"not a tokenizers.Tokenizer JSON ({str(err).splitlines()[0] if str(err) else err!r})") from None
        for token in SPECIAL_TOKENS:
            special_id(self.tokenizer, token)
        self.stats: dict = {}

    def cache_key(self) -> dict:
        """A hash of the tokenizer itself: another tokenizer, or one trained on the corpus, never shares the cache."""
        return {"fixed_tokenizer": hashlib.blake2b(self.json.encode(), digest_size=16).hexdigest()}

    def train(self, documents: Iterable[str]) -> Tokenizer:
        """The fixed tokenizer (``documents`` are not read)."""
        self.stats = {"vocab": self.tokenizer.get_vocab_size(), "fixed": True}
        return Tokenizer.from_str(self.json)


def _byte_of_symbol() -> dict[str, int]:
    """The byte each of the byte-level alphabet's 256 symbols stands for (GPT-2's table): the
    printable bytes ``!``..``~``, ``¡``..``¬`` and ``®``..``ÿ`` stand for themselves; the other 68
    bytes, in increasing order, are the symbols U+0100, U+0101, ..."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0x100
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(shifted)] = byte
            shifted += 1
    return table


BYTE_OF_SYMBOL = _byte_of_symbol()


def decode_text(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """The text of a whole sequence of byte-level token ids, decoded once: the tokens' bytes are
    joined first and read as UTF-8 at the end, so a character whose bytes span several tokens
    comes out whole. Special tokens are skipped; bytes that form no character (one cut off at the
    end of a truncated sample, or stray bytes a model emitted) are dropped, never shown as U+FFFD."""
    specials = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    data = bytearray()
    for i in ids:
        if i in specials:
            continue
        token = tokenizer.id_to_token(int(i))
        if token is None:
            raise DataError(f"token id {i} is outside the tokenizer's vocabulary of {tokenizer.get_vocab_size()}")
        data.extend(BYTE_OF_SYMBOL[symbol] for symbol in token)
    return data.decode("utf-8", errors="ignore")
