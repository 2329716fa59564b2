"""The count-based BPE: round trip, the stop rule, the reduction, the special tokens."""

from __future__ import annotations

from collections import Counter

import pytest

from saffu_lab.data.synthetic import generate_documents
from saffu_lab.errors import ConfigError
from saffu_lab.tokenizer import SPECIAL_TOKENS, CountBPE, build_tokenizer, count_words, learn_merges, reduce_merges


@pytest.fixture(scope="module")
def docs():
    return generate_documents(30_000, seed=1)


@pytest.fixture(scope="module")
def trained(docs):
    bpe = CountBPE(keep_words=60, progress=False)
    return bpe, bpe.train(docs)


def test_round_trip_any_string(trained):
    _, tok = trained
    for text in ["Where is the ball?", "  two  spaces\tand a tab\n", "naïve café 日本語 ☃ 🙂", "", "zzqx unseen-word 12345"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


def test_specials_have_fixed_ids_and_are_never_split(trained):
    _, tok = trained
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    enc = tok.encode("<sod>Look at the ball!<eod><pad><frg>")
    assert enc.tokens[0] == "<sod>" and "<eod>" in enc.tokens and enc.tokens[-2:] == ["<pad>", "<frg>"]
    # a document's own text never produces a special id
    body = tok.encode("Look at the ball!", add_special_tokens=False).ids
    assert not set(body) & {0, 1, 2, 3}


def _pair_counts(word_counts, merges):
    """Pair counts over the words after applying ``merges`` in order (a slow, obvious reference)."""
    words = {tuple(w): c for w, c in word_counts.items()}
    for a, b in merges:
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    pairs = Counter()
    for w, c in words.items():
        for p in zip(w, w[1:]):
            pairs[p] += c
    return pairs


def test_stop_rule_and_greedy_order():
    word_counts = dict(count_words(generate_documents(3000, seed=5)).most_common())
    merges = learn_merges(word_counts, min_pair_count=2)
    assert merges, "a corpus with repeated words must produce merges"
    # stop rule: after the last merge, every remaining pair occurs at most once
    assert max(_pair_counts(word_counts, merges).values()) <= 1
    # greedy: each merge was a most frequent pair at its time (checked on the first merges)
    for k in range(10):
        counts = _pair_counts(word_counts, merges[:k])
        assert counts[merges[k]] == max(counts.values()) >= 2


def test_reduction_keeps_top_words_tokenised_as_before(docs):
    counts = count_words(docs)
    merges = learn_merges(dict(counts.most_common()))
    top = [w for w, _ in counts.most_common(40)]
    reduced = reduce_merges(merges, top)
    assert len(reduced) < len(merges)
    full, small = build_tokenizer(merges).model, build_tokenizer(reduced).model
    for word in top:
        assert [t.value for t in small.tokenize(word)] == [t.value for t in full.tokenize(word)]
    # every kept token is reachable: each merge's parts are base bytes or earlier merge results
    made = set()
    base = set(build_tokenizer([]).get_vocab())
    for a, b in reduced:
        assert a in base | made and b in base | made
        made.add(a + b)


def test_trained_tokenizer_is_smaller_after_reduction(trained):
    bpe, tok = trained
    assert bpe.stats["vocab"] == tok.get_vocab_size() < bpe.stats["full_vocab"]
    assert tok.get_vocab_size() >= 256 + len(SPECIAL_TOKENS)  # all base bytes stay


@pytest.mark.parametrize("kwargs,match", [
    ({"max_words": 0}, "max_words"), ({"keep_words": 10, "max_words": 5}, "keep_words"),
    ({"min_pair_count": 1}, "min_pair_count"),
])
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CountBPE(**kwargs)
