"""The Kneser-Ney references: a brute-force reference agrees, every context's distribution sums
to 1 over the vocabulary, histories stay inside their document."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from saffu_lab.framing import SpecialIds
from saffu_lab.ngram import KneserNey, kneser_ney_perplexity, modified_kn_discounts, targets_and_histories

SP = SpecialIds(pad=0, sod=1, eod=2, frg=3)
P, S, E = 0, 1, 2


def test_targets_and_histories_worked_example():
    ids, offsets = torch.tensor([10, 11, 12, 20]), torch.tensor([0, 3, 4])
    y, h = targets_and_histories(ids, offsets, SP, 3)
    assert y.tolist() == [10, 11, 12, E, 20, E]
    assert h.tolist() == [[P, P, S], [P, S, 10], [S, 10, 11], [10, 11, 12],   # doc 1: <sod> 10 11 12 <eod>
                          [P, P, S], [P, S, 20]]                               # doc 2 sees nothing of doc 1


def _corpus(n_docs=60, seed=0, vocab=14):
    """Documents from a skewed Markov chain over ids 4..vocab-1 (plenty of counts of counts)."""
    g = torch.Generator().manual_seed(seed)
    chain = torch.Generator().manual_seed(1234)  # one chain for every split; documents drawn with ``seed``
    trans = torch.softmax(3 * torch.randn(vocab, vocab - 4, generator=chain), 1)
    docs = []
    for _ in range(n_docs):
        length = int(torch.randint(3, 25, (1,), generator=g))
        prev, doc = 0, []
        for _ in range(length):
            prev = 4 + int(torch.multinomial(trans[prev], 1, generator=g))
            doc.append(prev)
        docs.append(doc)
    ids = torch.tensor([t for d in docs for t in d])
    offsets = torch.tensor([0] + list(torch.cumsum(torch.tensor([len(d) for d in docs]), 0)))
    return ids, offsets


def brute_force_kn(y, h, order: int, vocab: int):
    """Interpolated modified Kneser-Ney written out with dictionaries, one n-gram at a time."""
    rows = [(tuple(hh[len(hh) - (order - 1):]) if order > 1 else (), w) for hh, w in zip(h.tolist(), y.tolist())]
    counts = {order: Counter(hist + (w,) for hist, w in rows)}
    for k in range(order - 1, 0, -1):  # continuation counts: distinct left extensions
        counts[k] = Counter(gram[1:] for gram in counts[k + 1])
    discounts = {k: modified_kn_discounts(torch.tensor(list(c.values()), dtype=torch.float64)).tolist()
                 for k, c in counts.items()}
    support = [w for w in range(vocab) if w not in (SP.pad, SP.sod, SP.frg)]

    def prob(k, hist, w):
        if w not in support:
            return 0.0
        if k == 0:
            return 1.0 / len(support)
        lower = prob(k - 1, hist[1:], w)
        seen = {g: c for g, c in counts[k].items() if g[:-1] == hist}
        total = sum(seen.values())
        if total == 0:
            return lower
        d = discounts[k]
        disc = lambda c: 0.0 if c == 0 else d[min(c, 3) - 1]  # noqa: E731
        gamma = sum(disc(c) for c in seen.values()) / total
        c = seen.get(hist + (w,), 0)
        return max(c - disc(c), 0.0) / total + gamma * lower

    return lambda hist, w: prob(order, tuple(hist[len(hist) - (order - 1):]) if order > 1 else (), w)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_agrees_with_a_brute_force_reference(order):
    ids, offsets = _corpus()
    y, h = targets_and_histories(ids, offsets, SP, max(order - 1, 1))
    model = KneserNey(order, 14, SP).fit(y, h)
    reference = brute_force_kn(y, h, order, 14)
    test_ids, test_offsets = _corpus(n_docs=15, seed=1)
    ty, th = targets_and_histories(test_ids, test_offsets, SP, max(order - 1, 1))
    got = model.log_prob(ty, th).exp()
    want = torch.tensor([reference(hh, w) for hh, w in zip(th.tolist(), ty.tolist())], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    if order > 1:  # the corpus exercises the estimated discounts, not the fallback
        assert model.orders[-1].discounts.tolist() != [0.5, 1.0, 1.5]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_every_context_sums_to_one_over_the_vocabulary(order):
    vocab = 14
    ids, offsets = _corpus()
    y, h = targets_and_histories(ids, offsets, SP, order - 1)
    model = KneserNey(order, vocab, SP).fit(y, h)
    # every history seen in training, plus unseen ones (a history of never-seen tokens, pads)
    contexts = torch.unique(h, dim=0)
    contexts = torch.cat([contexts, torch.tensor([[13] * (order - 1), [P] * (order - 1), [P] * (order - 2) + [S]])])
    words = torch.arange(vocab)
    probs = model.log_prob(words.repeat(contexts.shape[0]), contexts.repeat_interleave(vocab, 0)).exp().view(-1, vocab)
    assert torch.allclose(probs.sum(1), torch.ones(contexts.shape[0], dtype=torch.float64), atol=1e-12)
    assert bool((probs[:, [SP.pad, SP.sod, SP.frg]] == 0).all()) and bool((probs[:, 4:] > 0).all())


def test_orders_improve_on_a_markov_corpus_and_perplexity_matches_log_prob():
    train, dev = _corpus(n_docs=400), _corpus(n_docs=80, seed=1)
    ppl = {n: kneser_ney_perplexity(n, 14, SP, train, dev) for n in (1, 2, 3)}
    assert ppl[2] < 0.8 * ppl[1]  # the chain is first-order: the bigram sees it
    assert ppl[3] < ppl[2] * 1.05  # and the trigram loses little for its extra order
    y, h = targets_and_histories(*dev, SP, 1)
    model = KneserNey(2, 14, SP).fit(*targets_and_histories(*train, SP, 1))
    assert ppl[2] == pytest.approx(math.exp(-float(model.log_prob(y, h).mean())), rel=1e-12)


def test_refuses_never_targets_and_overflowing_keys():
    with pytest.raises(ValueError, match="never targets"):
        KneserNey(2, 14, SP).fit(torch.tensor([5, SP.pad]), torch.tensor([[6], [7]]))
    with pytest.raises(ValueError, match="overflows"):
        KneserNey(5, 10_000, SP)


def test_leave_one_out_offsets_agree_with_recounting():
    """bigram_leave_one_out: for each seen pair, take one occurrence out of the counts by hand
    (discounts and P_1 fixed), renormalise nothing, and compare the target's log-ratio to an
    unseen word's."""
    ids, offsets = _corpus()
    y, h = targets_and_histories(ids, offsets, SP, 1)
    model = KneserNey(2, 14, SP).fit(y, h)
    stats, p1 = model.orders[1], model.level_probs(1).tolist()
    d = stats.discounts.tolist()
    disc = lambda c: 0.0 if c == 0 else d[min(c, 3) - 1]  # noqa: E731
    pairs = Counter(zip(h[:, 0].tolist(), y.tolist()))

    def prob(after, x, w, remove):
        seen = {v: c - (v == remove) for (hx, v), c in after.items() if hx == x}
        total = sum(seen.values())
        if total == 0:
            return p1[w]
        gamma = sum(disc(c) for c in seen.values()) / total
        return max(seen.get(w, 0) - disc(seen.get(w, 0)), 0.0) / total + gamma * p1[w]

    got = model.bigram_leave_one_out()
    want = []
    for x, w in zip((stats.gram_keys // 14).tolist(), (stats.gram_keys % 14).tolist()):
        unseen = next(v for v in range(4, 14) if (x, v) not in pairs)
        want.append(math.log(prob(pairs, x, w, w) / prob(pairs, x, w, None))
                    - math.log(prob(pairs, x, unseen, w) / prob(pairs, x, unseen, None)))
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    singletons = stats.gram_counts == 1
    assert singletons.any() and (got[singletons] < 0).all()  # a pair seen once: unseen once it is taken out
