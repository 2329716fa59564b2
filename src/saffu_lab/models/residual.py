"""The residual SAFFU: an explicitly solved log-linear SAFFU plus a transformer that learns what it misses.

    combine="sum" (a product of experts):
    logits(y | context) = g(h) * saffu(y | block, radius)  +  transformer(y | window)
                                 solved in closed form        zero at the start (its head is zero),
                                 (solver=loglinear), kept     trained by backprop
                                 fixed by default

    g(h) = 2 sigmoid(w . h + b)   with ``gate=True`` (else g = 1): a weight on the SAFFU's logits read
                                  from the transformer's last hidden state h at the same position;
                                  w = b = 0 at the start, so g = 1 there.

    combine="mixture" (a mixture of experts, two language models interpolated per context):
    p(y | context) = lam(h) * p_saffu(y | block, radius)  +  (1 - lam(h)) * p_transformer(y | window)

    lam(h) = sigmoid(w . h + b)   read from the transformer's last hidden state; w = 0 and
                                  b = logit(mix_init) at the start. The transformer is the GPT
                                  baseline itself (tied head, its own initialisation), a whole
                                  language model rather than a correction of the SAFFU's logits.

Why (measured in ``docs/warm_start.md``): fine-tuning the log-linear SAFFU itself (regime=warm)
passes the Kneser-Ney 4-gram within minutes and then stops improving: its parameters are
per-distance counts of pairs of tokens, so it cannot learn what a pair does not say, and its
30M sparse values memorise the training set after about two epochs. The GPT baseline has no such
ceiling but starts from the uniform distribution. Here the network is both: at the start its
output *is* the explicit solution (the transformer's output head starts at zero), so a warm start
begins where the solve ends; backprop then trains the transformer on the residual, with the
SAFFU's score of each training target taken leave-one-out (``LogLinearSAFFU.training_logits``),
as it would score a held-out target. This is beyond the paper (its warm start fine-tunes the
SAFFU layers themselves).

Why the gate: without it the network cannot express the transformer alone, whatever its weights:
to ignore the SAFFU where it knows better, the transformer would have to output minus the SAFFU's
logits, a sparse count-derived function of the context that is as hard to learn as the SAFFU itself.
With g(h) the set of networks contains both parts alone (g = 1 with a zero head is the explicit
solution, g -> 0 is the transformer alone), and the transformer learns, context by context, how far
to trust the counts (a product of experts whose exponent is a function of the context).

Why the mixture: in the sum the transformer learns only what the SAFFU's logits leave over, and
on kjv it stops fitting the training set early (docs/warm_start.md); interpolating a count-based
model with a neural one is the classic way to get the better of both (each trusted where it is
sure). The gradient of -log p reaches each expert weighted by its share of p(y), so with that loss
alone the transformer is trained only where the counts fail and never becomes a language model
(measured: it starves); ``gpt_loss`` adds its own cross-entropy. At the start (the transformer near
uniform) p is lam0 * p_saffu + (1 - lam0) / N, the explicit solution up to a factor lam0.

Inputs come from ``saffu_lab.framing.ResidualFraming``: ``ids [B, T]`` causal windows (the GPT
baseline's framing), ``scored [B, T]`` (the positions whose target is scored) and ``saffu``, the
block and radial contexts of the scored targets in row-major order, and ``rows`` (with ``rows_of``
and ``n_rows``), those targets' rows in the split, by which the mixture caches the fixed SAFFU's
scores of training targets.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from saffu_lab.framing import IGNORE_INDEX, SpecialIds
from saffu_lab.models.gpt import GPT
from saffu_lab.models.loglinear import LogLinearSAFFU
from saffu_lab.models.sampling import sample


class ResidualSAFFU(nn.Module):
    def __init__(self, vocab_size: int, token_counts: torch.Tensor, special_ids: SpecialIds, n_documents: int = 1,
                 saffu: Callable[..., LogLinearSAFFU] = LogLinearSAFFU, transformer: Callable[..., GPT] = GPT,
                 train_saffu: bool = False, train_pair_values: bool = True, gate: bool = False,
                 combine: str = "sum", mix_init: float = 0.9, gpt_loss: float = 0.0, mix_gate_only: bool = False):
        """``saffu`` and ``transformer`` are factories (Hydra partials) completed with the data's
        arguments. ``train_saffu``: backprop also moves the solved SAFFU, all but its embedding
        (default: it stays as solved); ``train_pair_values=False`` keeps its sparse per-pair values
        (``radial_values``, one per seen (context token, distance, target)) as solved even then.
        The transformer's head is its own matrix, started at zero (untied from its token embedding),
        so the transformer adds nothing at the start. ``gate``: the SAFFU's logits are weighted by
        g(h) (module docstring), 1 at the start. ``combine="mixture"``: the two experts' probabilities
        are interpolated by lam(h) instead (module docstring), lam = ``mix_init`` at the start; the
        transformer is then the GPT baseline as it is (tied head, not zeroed) and ``gate`` must be off.
        ``gpt_loss``: the mixture's training objective adds this weight times the transformer's own
        cross-entropy (0: the mixture's alone); ``mix_gate_only``: the mixture's term trains lam(h)
        only (the transformer's probabilities and features detached), so the transformer trains on
        ``gpt_loss``'s term exactly as the GPT baseline trains."""
        super().__init__()
        if combine not in ("sum", "mixture"):
            raise ValueError(f"model.combine={combine!r} is not a way to combine the experts; use sum or mixture")
        if combine == "mixture" and gate:
            raise ValueError("model.gate=true is for model.combine=sum; the mixture has its own weight lam(h): set model.gate=false")
        if not 0 < mix_init < 1:
            raise ValueError(f"model.mix_init={mix_init!r} must be a weight strictly between 0 and 1, e.g. 0.9")
        if gpt_loss < 0 or (combine == "sum" and (gpt_loss or mix_gate_only)):
            raise ValueError(f"model.gpt_loss={gpt_loss!r} / model.mix_gate_only={mix_gate_only!r}: a weight >= 0, "
                             "and only with model.combine=mixture")
        if mix_gate_only and gpt_loss == 0:
            raise ValueError("model.mix_gate_only=true with model.gpt_loss=0 trains no transformer; set model.gpt_loss=1")
        self.combine, self.gpt_loss, self.mix_gate_only = combine, gpt_loss, mix_gate_only
        self.saffu = saffu(vocab_size=vocab_size, token_counts=token_counts, special_ids=special_ids,
                           n_documents=n_documents)
        if combine == "sum":
            self.transformer = transformer(vocab_size=vocab_size, tie_weights=False)
            nn.init.zeros_(self.transformer.head.weight)  # the network starts as the SAFFU alone
        else:
            self.transformer = transformer(vocab_size=vocab_size)
        d_model = self.transformer.ln_out.normalized_shape[0]
        self.gate = nn.Linear(d_model, 1) if gate else None
        if self.gate is not None:  # g = 2 sigmoid(0) = 1 at the start
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.mix_gate = nn.Linear(d_model, 1) if combine == "mixture" else None
        if self.mix_gate is not None:  # lam = sigmoid(b) = mix_init at the start
            nn.init.zeros_(self.mix_gate.weight)
            nn.init.constant_(self.mix_gate.bias, math.log(mix_init / (1 - mix_init)))
        self.train_saffu, self.train_pair_values = train_saffu, train_pair_values
        for p in self.fixed_parameters():
            p.requires_grad_(False)
        self.context_length = self.transformer.context_length
        # the mixture with a fixed SAFFU: log p_saffu(y) of each training target (leave-one-out), by
        # its row in the training set, scored the first time a batch holds it (so epochs after the
        # first cost the transformer's step alone); kept with the dataset and the SAFFU's state it
        # was scored from, and dropped when either changes. Not saved in checkpoints.
        self._scores: tuple[tuple, torch.Tensor] | None = None

    def fixed_parameters(self) -> list[nn.Parameter]:
        """The parameters backprop leaves alone: the solved SAFFU's; with ``train_saffu``, its
        bit-cipher embedding only (it trains as regime=warm trains a SAFFU)."""
        if not self.train_saffu:
            return list(self.saffu.parameters())
        fixed = list(self.saffu.block_embedding.parameters()) if self.saffu.has_block else []
        return fixed if self.train_pair_values else [*fixed, self.saffu.radial_values]

    def _weight(self, h: torch.Tensor, saffu_logits: torch.Tensor) -> torch.Tensor:
        """The SAFFU's logits ``[..., N]`` times g(h) for the hidden states ``h [..., d_model]`` of
        the same positions (unchanged without a gate), in float32."""
        if self.gate is None:
            return saffu_logits.float()
        return 2 * torch.sigmoid(self.gate(h).float()) * saffu_logits.float()

    def _add(self, ids: torch.Tensor, scored: torch.Tensor, saffu_logits: torch.Tensor) -> torch.Tensor:
        """The transformer's logits ``[B, T, N]`` for ``ids`` in float32 (the loss's precision under
        bf16 autocast), with the SAFFU's ``[M, N]`` (gated) added in place at the M scored positions
        (row-major order, as ``ResidualFraming`` lists their contexts)."""
        h = self.transformer.features(ids)
        out = self.transformer.head(h).float()
        index = torch.nonzero(scored.flatten()).squeeze(1)
        flat = out.view(-1, out.shape[-1])
        flat.index_add_(0, index, self._weight(h.reshape(-1, h.shape[-1])[index], saffu_logits))
        return out

    def _mixture(self, ids: torch.Tensor, scored: torch.Tensor, saffu_logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[B, T, N]`` in float32: the transformer's, and at the M scored positions
        log(lam p_saffu + (1 - lam) p_transformer) from the SAFFU's ``[M, N]`` logits."""
        h = self.transformer.features(ids)
        out = torch.log_softmax(self.transformer.head(h).float(), dim=-1)
        index = torch.nonzero(scored.flatten()).squeeze(1)
        flat = out.view(-1, out.shape[-1])
        mixed = self._mix(h.reshape(-1, h.shape[-1])[index], saffu_logits, flat[index])
        return flat.index_copy(0, index, mixed).view_as(out)

    def _mix(self, h: torch.Tensor, saffu_logits: torch.Tensor, gpt_log_probs: torch.Tensor) -> torch.Tensor:
        """log(lam p_saffu + (1 - lam) p_gpt) ``[M, N]``, lam = sigmoid(w . h + b) from ``h [M, d_model]``."""
        z = self.mix_gate(h).float()  # [M, 1]: the logit of lam
        return torch.logaddexp(F.logsigmoid(z) + torch.log_softmax(saffu_logits.float(), dim=-1),
                               F.logsigmoid(-z) + gpt_log_probs)

    def _combine(self, ids: torch.Tensor, scored: torch.Tensor, saffu_logits: torch.Tensor) -> torch.Tensor:
        return (self._add if self.combine == "sum" else self._mixture)(ids, scored, saffu_logits)

    def _saffu(self, compute):
        if self.train_saffu:
            return compute()
        with torch.no_grad():
            return compute()

    def forward(self, inputs: dict) -> torch.Tensor:
        """Logits ``[B, T, N]``: the transformer's, plus the SAFFU's at the scored positions
        (``inputs["scored"]``; the others, ``<sod>`` and padding, are never scored); for the
        mixture, log-probabilities (the transformer's alone where a position is not scored)."""
        saffu = self._saffu(lambda: self.saffu(inputs["saffu"]))
        return self._combine(inputs["ids"], inputs["scored"], saffu)

    def training_logits(self, inputs: dict, y: torch.Tensor) -> torch.Tensor:
        """As ``forward``, with the SAFFU scoring each training target leave-one-out."""
        saffu = self._saffu(lambda: self.saffu.training_logits(inputs["saffu"], y[inputs["scored"]]))
        return self._combine(inputs["ids"], inputs["scored"], saffu)

    def _saffu_target_scores(self, inputs: dict, target: torch.Tensor) -> torch.Tensor:
        """log p_saffu(y) ``[M]`` of the scored training targets, leave-one-out; from the cache where
        the SAFFU is fixed and the batch names its rows (``inputs["rows"]``, ResidualWindows)."""
        def score() -> torch.Tensor:
            saffu = self._saffu(lambda: self.saffu.training_logits(inputs["saffu"], target)).float()
            return saffu.gather(1, target[:, None])[:, 0] - saffu.logsumexp(-1)

        if self.train_saffu or "rows" not in inputs:
            return score()
        rows = inputs["rows"]
        key = (inputs["rows_of"], inputs["n_rows"],
               *((t.data_ptr(), t._version) for t in (*self.saffu.parameters(), *self.saffu.buffers())))
        if self._scores is None or self._scores[0] != key:
            self._scores = (key, torch.full((inputs["n_rows"],), math.nan, device=target.device))
        cache = self._scores[1]
        known = cache[rows]
        if torch.isnan(known).any():
            known = score()
            cache[rows] = known
        return known

    def _mixture_terms(self, inputs: dict, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the M scored training targets (row-major), each ``[M]``: log lam + log p_saffu(y)
        (leave-one-out), log(1 - lam) + log p_gpt(y) (``mix_gate_only``: the transformer detached),
        and log p_gpt(y) itself (for ``gpt_loss``)."""
        scored = inputs["scored"]
        target = y[scored]
        log_ps = self._saffu_target_scores(inputs, target)
        h = self.transformer.features(inputs["ids"])
        h = h.reshape(-1, h.shape[-1])[torch.nonzero(scored.flatten()).squeeze(1)]  # [M, d_model]
        g = self.transformer.head(h).float()
        log_pg = g.gather(1, target[:, None])[:, 0] - g.logsumexp(-1)
        z = self.mix_gate(h.detach() if self.mix_gate_only else h).float()[:, 0]  # logit of lam
        return F.logsigmoid(z) + log_ps, F.logsigmoid(-z) + (log_pg.detach() if self.mix_gate_only else log_pg), log_pg

    def training_nll(self, inputs: dict, y: torch.Tensor) -> torch.Tensor:
        """The negative log-likelihood ``[M]`` of each scored training target (row-major), its SAFFU
        score leave-one-out (per target, for analysis and tests; training takes ``training_objective``).
        The mixture needs only the target's probability under each expert, log p(y) =
        logaddexp(log lam + log p_saffu(y), log(1 - lam) + log p_gpt(y)), so no mixed [M, N]
        distribution is formed (the loss costs the GPT's cross-entropy plus the SAFFU's scores)."""
        if self.combine == "sum":
            scored = inputs["scored"]
            return F.cross_entropy(self.training_logits(inputs, y)[scored], y[scored], reduction="none")
        saffu_term, gpt_term, _ = self._mixture_terms(inputs, y)
        return -torch.logaddexp(saffu_term, gpt_term)

    def training_objective(self, inputs: dict, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what backprop minimises, the mean training NLL of the network): the mean NLL, plus for the
        mixture ``gpt_loss`` times the transformer's own mean cross-entropy."""
        if self.combine == "sum":
            logits = self.training_logits(inputs, y)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.flatten(), ignore_index=IGNORE_INDEX)
            return nll, nll
        saffu_term, gpt_term, log_pg = self._mixture_terms(inputs, y)
        nll = -torch.logaddexp(saffu_term, gpt_term).mean()
        return nll - self.gpt_loss * log_pg.mean(), nll.detach()

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Sample documents from ``prompt [B, 1 + t]`` (``<sod>``, then t >= 0 prompt tokens): the
        transformer reads the last ``context_length`` ids, the SAFFU the next target's contexts."""
        def next_logits(idx: torch.Tensor) -> torch.Tensor:
            h = self.transformer.features(idx[:, -self.context_length:])[:, -1, :]
            saffu = self.saffu(self.saffu.frame_next(idx[:, 1:]))
            if self.combine == "mixture":
                return self._mix(h, saffu, torch.log_softmax(self.transformer.head(h).float(), dim=-1))
            return self.transformer.head(h) + self._weight(h, saffu)

        return sample(next_logits, prompt, max_new_tokens, **sampling)
