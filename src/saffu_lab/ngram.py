"""Count-based references on the same token ids: interpolated modified Kneser-Ney n-grams.

A model in this repository means something only beside the n-grams fitted on exactly its
training targets and scored on exactly its targets. The targets of a document are its tokens
and ``<eod>``; the history of a target is what precedes it in the document's stream
``<sod> t1 t2 ...``, left-padded with ``<pad>`` (so the history never crosses documents, like
the SAFFU radius). ``<pad>``, ``<sod>`` and ``<frg>`` are never targets: the distributions
are over the other ``V`` ids of the vocabulary and sum to 1 over them.

Interpolated modified Kneser-Ney (Chen and Goodman, 1998), for order n and history h:

    P_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h .)  +  gamma_k(h) P_{k-1}(w | h')
    gamma_k(h) = (D_k1 N_1(h .) + D_k2 N_2(h .) + D_k3 N_3+(h .)) / c_k(h .)
    P_0(w)     = 1 / V                                            (the uniform floor)

where h' drops the oldest token of h; c_n are raw counts and, for k < n, c_k(h w) is the
continuation count N_1+(. h w) (the number of distinct tokens seen before h w); N_i(h .) is the
number of words whose count after h is i (3+: at least 3); a history never seen gives
P_k(w | h) = P_{k-1}(w | h'). The discounts of each order come from its count-of-counts n_i:
Y = n1 / (n1 + 2 n2), D_k1 = 1 - 2Y n2/n1, D_k2 = 2 - 3Y n3/n2, D_k3 = 3 - 4Y n4/n3 (where a
count-of-counts is 0, as on a tiny corpus, the discount falls back to i/2 for D_ki).

Everything is vectorised: n-grams are int64 keys (base-N digits), counted with ``torch.unique``
and looked up with ``searchsorted``; no Python loop runs over tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saffu_lab.framing import SpecialIds, document_lengths


def targets_and_histories(ids: torch.Tensor, offsets: torch.Tensor, sp: SpecialIds, n_history: int):
    """Every target of a split (tokens then ``<eod>`` of each document) and its ``n_history``
    preceding stream items (``<sod>`` first, ``<pad>`` before it): ``targets [M]``, ``history [M, n_history]``
    (column ``n_history - 1`` is the most recent)."""
    lengths = document_lengths(offsets) + 1  # targets per document, <eod> included
    n_docs = lengths.numel()
    starts = torch.cumsum(lengths, 0) - lengths
    targets = torch.empty(int(lengths.sum()), dtype=torch.long)
    doc_of_token = torch.repeat_interleave(torch.arange(n_docs), lengths - 1)
    token_slot = torch.arange(ids.numel()) - offsets[:-1].repeat_interleave(lengths - 1) + starts[doc_of_token]
    targets[token_slot] = ids.long()
    targets[starts + lengths - 1] = sp.eod
    rank = torch.arange(targets.numel()) - starts.repeat_interleave(lengths)
    stream_pos = rank[:, None] - n_history + 1 + torch.arange(n_history)[None, :]  # <sod> at 0, t_s at s + 1
    history = targets[(torch.arange(targets.numel())[:, None] - rank[:, None] + stream_pos - 1).clamp(min=0)]
    history = torch.where(stream_pos == 0, torch.full_like(history, sp.sod), history)
    history = torch.where(stream_pos < 0, torch.full_like(history, sp.pad), history)
    return targets, history


def _keys(columns: torch.Tensor, base: int) -> torch.Tensor:
    """Base-``base`` integer key of each row of ``columns [M, k]`` (k = 0: all zeros)."""
    key = torch.zeros(columns.shape[0], dtype=torch.long)
    for j in range(columns.shape[1]):  # k <= order: a loop over columns, not tokens
        key = key * base + columns[:, j]
    return key


def _lookup(sorted_keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor, default: float = 0.0) -> torch.Tensor:
    """``values`` of ``query`` keys in ``sorted_keys`` (``default`` where absent)."""
    if sorted_keys.numel() == 0:
        return torch.full(query.shape, default, dtype=values.dtype)
    i = torch.searchsorted(sorted_keys, query).clamp(max=sorted_keys.numel() - 1)
    found = sorted_keys[i] == query
    return torch.where(found, values[i], torch.full_like(values[i], default))


def modified_kn_discounts(counts: torch.Tensor) -> torch.Tensor:
    """(D1, D2, D3+) from the count-of-counts of ``counts`` (Chen and Goodman's estimates)."""
    n = [float((counts == i).sum()) for i in range(1, 5)]
    fallback = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    if n[0] == 0 or n[1] == 0:
        return fallback
    y = n[0] / (n[0] + 2 * n[1])
    d = [1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1] if n[1] else 1.0, 3 - 4 * y * n[3] / n[2] if n[2] else 1.5]
    return torch.tensor([di if 0 < di <= i + 1 else float(fallback[i]) for i, di in enumerate(d)], dtype=torch.float64)


@dataclass
class _Order:
    """One order k of the model: counts of (history, word) keys and per-history statistics."""

    gram_keys: torch.Tensor   # sorted keys of the k-grams (history then word)
    gram_counts: torch.Tensor  # c_k of each, float64
    hist_keys: torch.Tensor   # sorted keys of the (k-1)-token histories
    hist_total: torch.Tensor  # c_k(h .)
    hist_gamma_mass: torch.Tensor  # D1 N1(h .) + D2 N2(h .) + D3 N3+(h .)
    discounts: torch.Tensor   # (D1, D2, D3+)


class KneserNey:
    """An interpolated modified Kneser-Ney n-gram model of ``order`` over a vocabulary of ``vocab_size``.

    ``fit(targets, history)`` and ``log_prob(targets, history)`` take the targets and their
    histories (``targets_and_histories``); ``perplexity`` does both from token ids and offsets.
    """

    def __init__(self, order: int, vocab_size: int, special_ids: SpecialIds):
        if order < 1:
            raise ValueError(f"a Kneser-Ney model needs order >= 1, got {order}")
        if vocab_size ** order >= 2**62:
            raise ValueError(f"order {order} over {vocab_size} ids overflows 64-bit n-gram keys; use a lower order")
        self.order, self.N, self.sp = order, vocab_size, special_ids
        never = torch.zeros(vocab_size, dtype=torch.bool)
        never[[special_ids.pad, special_ids.sod, special_ids.frg]] = True
        self.never_target = never
        self.V = int((~never).sum())  # the support: every id but <pad>, <sod>, <frg>
        self.orders: list[_Order] = []

    # --- fitting -------------------------------------------------------------------------
    def fit(self, targets: torch.Tensor, history: torch.Tensor) -> "KneserNey":
        n, N = self.order, self.N
        if history.shape[1] < n - 1:
            raise ValueError(f"order {n} needs {n - 1} history columns, got {history.shape[1]}")
        if bool(self.never_target[targets].any()):
            raise ValueError("a target is <pad>, <sod> or <frg>: those are never targets (see targets_and_histories)")
        grams = torch.cat([history[:, history.shape[1] - (n - 1):], targets[:, None]], 1)  # [M, n]
        # highest order: raw counts of the n-grams
        keys, counts = torch.unique(_keys(grams, N), return_counts=True)
        per_order = {n: (keys, counts.double())}
        # lower orders: continuation counts N1+(. h w), the distinct (k+1)-grams that end in h w;
        # dropping the oldest token of a key is the key modulo N^k
        distinct = keys
        for k in range(n - 1, 0, -1):
            keys, counts = torch.unique(distinct % N**k, return_counts=True)
            per_order[k] = (keys, counts.double())
            distinct = keys
        self.orders = [self._statistics(k, *per_order[k]) for k in range(1, n + 1)]
        return self

    def _statistics(self, k: int, keys: torch.Tensor, counts: torch.Tensor) -> _Order:
        discounts = modified_kn_discounts(counts)
        hist = keys // self.N  # the (k-1)-token history of each k-gram (0 for the unigram level)
        hist_keys, inverse = torch.unique(hist, return_inverse=True)
        total = torch.zeros(hist_keys.numel(), dtype=torch.float64).index_add_(0, inverse, counts)
        d_of_count = discounts[(counts.clamp(max=3) - 1).long()]
        gamma_mass = torch.zeros_like(total).index_add_(0, inverse, d_of_count)
        return _Order(keys, counts, hist_keys, total, gamma_mass, discounts)

    def level_probs(self, k: int) -> torch.Tensor:
        """P_k(w) for every id w when k = 1 (the lowest level: continuation counts interpolated
        with the uniform floor), float64 [N]; 0 for ids that are never targets."""
        if k != 1:
            raise ValueError("only the lowest level (k = 1) has a history-free distribution")
        stats = self.orders[0]
        c = torch.zeros(self.N, dtype=torch.float64)
        c[stats.gram_keys] = stats.gram_counts
        d = stats.discounts[(c.clamp(min=1, max=3) - 1).long()]
        total, gamma_mass = float(stats.hist_total[0]), float(stats.hist_gamma_mass[0])
        p = (c - d).clamp(min=0) / total + gamma_mass / total / self.V
        return torch.where(self.never_target, torch.zeros_like(p), p)

    def bigram_backoff_form(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An order-2 model as ``P(w | x) = g(x) P_1(w) (1 + S[x, w])``, the form the log-linear
        SAFFU's radial decoders store (``log P = log g(x) + log P_1(w) + log1p(S)``):

            S[x, w] = max(c(x w) - D(c), 0) / (gamma_mass(x) P_1(w))   for every seen pair,

        0 elsewhere; g(x) = gamma_mass(x) / c(x .) (1 for an unseen x). Returns the seen pairs'
        ``x``, ``w`` and ``log1p(S)`` (sorted by x, then w) and ``log P_1`` [N]."""
        if self.order != 2:
            raise ValueError(f"bigram_backoff_form needs an order-2 model, got order {self.order}")
        p1 = self.level_probs(1)
        stats = self.orders[1]
        x, w = stats.gram_keys // self.N, stats.gram_keys % self.N
        d = stats.discounts[(stats.gram_counts.clamp(max=3) - 1).long()]
        gamma_mass = _lookup(stats.hist_keys, stats.hist_gamma_mass, x)
        s = (stats.gram_counts - d).clamp(min=0) / (gamma_mass * p1[w])
        return x, w, torch.log1p(s), torch.log(p1)

    def bigram_leave_one_out(self) -> torch.Tensor:
        """For every seen pair (x, w) of an order-2 model (in ``bigram_backoff_form``'s order): how
        much less likely w after x is once one occurrence of (x, w) is taken out of the counts,
        relative to the words never seen after x:

            delta(x, w) = log P'(w | x) - log P(w | x) - log [P'(v | x) / P(v | x)],  v unseen after x

        where P' has c(x w) - 1, c(x .) - 1 and the back-off mass of those counts (the discounts
        D and P_1 held fixed); when x was seen once, P' is P_1. A training target's own
        occurrence is in the counts that score it; adding delta to its logit scores it as held-out
        text would (leave-one-out), so that backprop on training text does not learn to trust
        the counts more."""
        if self.order != 2:
            raise ValueError(f"bigram_leave_one_out needs an order-2 model, got order {self.order}")
        p1 = self.level_probs(1)
        stats = self.orders[1]
        x, w, c = stats.gram_keys // self.N, stats.gram_keys % self.N, stats.gram_counts
        D = stats.discounts
        total = _lookup(stats.hist_keys, stats.hist_total, x)
        gamma_mass = _lookup(stats.hist_keys, stats.hist_gamma_mass, x)
        d = D[(c.clamp(max=3) - 1).long()]
        full = (c - d) / total + gamma_mass / total * p1[w]
        c_out, total_out = c - 1, total - 1
        d_out = torch.where(c_out >= 1, D[(c_out.clamp(min=1, max=3) - 1).long()], torch.zeros_like(c))
        gamma_out = gamma_mass - d + d_out
        seen = total_out > 0
        safe = torch.where(seen, total_out, torch.ones_like(total_out))
        held_out = torch.where(seen, (c_out - d_out).clamp(min=0) / safe + gamma_out / safe * p1[w], p1[w])
        unseen_ratio = torch.where(seen, gamma_out * total / (gamma_mass * safe), total / gamma_mass)
        return torch.log(held_out) - torch.log(full) - torch.log(unseen_ratio)

    # --- scoring -------------------------------------------------------------------------
    def log_prob(self, targets: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """log P(target | history) for each row, float64 [M]."""
        if not self.orders:
            raise RuntimeError("fit the model first")
        N = self.N
        p = torch.full(targets.shape, 1.0 / self.V, dtype=torch.float64)  # P_0: uniform over the support
        for k, stats in enumerate(self.orders, 1):
            hist = history[:, history.shape[1] - (k - 1):] if k > 1 else history[:, :0]
            hist_key = _keys(hist, N)
            gram_key = hist_key * N + targets
            c = _lookup(stats.gram_keys, stats.gram_counts, gram_key)
            total = _lookup(stats.hist_keys, stats.hist_total, hist_key)
            gamma_mass = _lookup(stats.hist_keys, stats.hist_gamma_mass, hist_key)
            d = stats.discounts[(c.clamp(min=1, max=3) - 1).long()]
            seen = total > 0
            safe_total = torch.where(seen, total, torch.ones_like(total))
            higher = (c - d).clamp(min=0) / safe_total + gamma_mass / safe_total * p
            p = torch.where(seen, higher, p)
        p = torch.where(self.never_target[targets], torch.zeros_like(p), p)
        return torch.log(p)

    def perplexity(self, targets: torch.Tensor, history: torch.Tensor) -> float:
        return math.exp(-float(self.log_prob(targets, history).mean()))


def kneser_ney_perplexity(order: int, vocab_size: int, sp: SpecialIds, train: tuple, evaluate: tuple) -> float:
    """Perplexity on the targets of ``evaluate`` (ids, offsets) of the order-``order`` model fitted
    on the targets of ``train`` (ids, offsets)."""
    model = KneserNey(order, vocab_size, sp).fit(*targets_and_histories(*train, sp, order - 1))
    return model.perplexity(*targets_and_histories(*evaluate, sp, order - 1))
