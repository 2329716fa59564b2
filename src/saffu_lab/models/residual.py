"""The residual SAFFU: an explicitly solved log-linear SAFFU plus a transformer that learns what it misses.

    logits(y | context) = g(h) * saffu(y | block, radius)  +  transformer(y | window)
                                 solved in closed form        zero at the start (its head is zero),
                                 (solver=loglinear), kept     trained by backprop
                                 fixed by default

    g(h) = 2 sigmoid(w . h + b)   with ``gate=True`` (else g = 1): a weight on the SAFFU's logits read
                                  from the transformer's last hidden state h at the same position;
                                  w = b = 0 at the start, so g = 1 there.

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

Inputs come from ``saffu_lab.framing.ResidualFraming``: ``ids [B, T]`` causal windows (the GPT
baseline's framing), ``scored [B, T]`` (the positions whose target is scored) and ``saffu``, the
block and radial contexts of the scored targets in row-major order.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from saffu_lab.framing import SpecialIds
from saffu_lab.models.gpt import GPT
from saffu_lab.models.loglinear import LogLinearSAFFU
from saffu_lab.models.sampling import sample


class ResidualSAFFU(nn.Module):
    def __init__(self, vocab_size: int, token_counts: torch.Tensor, special_ids: SpecialIds, n_documents: int = 1,
                 saffu: Callable[..., LogLinearSAFFU] = LogLinearSAFFU, transformer: Callable[..., GPT] = GPT,
                 train_saffu: bool = False, train_pair_values: bool = True, gate: bool = False):
        """``saffu`` and ``transformer`` are factories (Hydra partials) completed with the data's
        arguments. ``train_saffu``: backprop also moves the solved SAFFU, all but its embedding
        (default: it stays as solved); ``train_pair_values=False`` keeps its sparse per-pair values
        (``radial_values``, one per seen (context token, distance, target)) as solved even then.
        The transformer's head is its own matrix, started at zero (untied from its token embedding),
        so the transformer adds nothing at the start. ``gate``: the SAFFU's logits are weighted by
        g(h) (module docstring), 1 at the start."""
        super().__init__()
        self.saffu = saffu(vocab_size=vocab_size, token_counts=token_counts, special_ids=special_ids,
                           n_documents=n_documents)
        self.transformer = transformer(vocab_size=vocab_size, tie_weights=False)
        nn.init.zeros_(self.transformer.head.weight)  # the network starts as the SAFFU alone
        self.gate = nn.Linear(self.transformer.ln_out.normalized_shape[0], 1) if gate else None
        if self.gate is not None:  # g = 2 sigmoid(0) = 1 at the start
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.train_saffu, self.train_pair_values = train_saffu, train_pair_values
        for p in self.fixed_parameters():
            p.requires_grad_(False)
        self.context_length = self.transformer.context_length

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

    def _saffu(self, compute):
        if self.train_saffu:
            return compute()
        with torch.no_grad():
            return compute()

    def forward(self, inputs: dict) -> torch.Tensor:
        """Logits ``[B, T, N]``: the transformer's, plus the SAFFU's at the scored positions
        (``inputs["scored"]``; the others, ``<sod>`` and padding, are never scored)."""
        saffu = self._saffu(lambda: self.saffu(inputs["saffu"]))
        return self._add(inputs["ids"], inputs["scored"], saffu)

    def training_logits(self, inputs: dict, y: torch.Tensor) -> torch.Tensor:
        """As ``forward``, with the SAFFU scoring each training target leave-one-out."""
        saffu = self._saffu(lambda: self.saffu.training_logits(inputs["saffu"], y[inputs["scored"]]))
        return self._add(inputs["ids"], inputs["scored"], saffu)

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Sample documents from ``prompt [B, 1 + t]`` (``<sod>``, then t >= 0 prompt tokens): the
        transformer reads the last ``context_length`` ids, the SAFFU the next target's contexts."""
        def next_logits(idx: torch.Tensor) -> torch.Tensor:
            h = self.transformer.features(idx[:, -self.context_length:])[:, -1, :]
            return self.transformer.head(h) + self._weight(h, self.saffu(self.saffu.frame_next(idx[:, 1:])))

        return sample(next_logits, prompt, max_new_tokens, **sampling)
