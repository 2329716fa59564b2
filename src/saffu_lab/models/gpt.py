"""The baseline: a small decoder-only transformer (pre-norm, causal self-attention, FFN).

    h_0 = E[x] + P[positions]
    h   = h + Attn(LN(h))          # causal multi-head self-attention
    h   = h + FFN(LN(h))           # built by the `ffn` factory (dense, or structured later)
    logits = LN(h) E^T             # output head tied to the token embedding

The model knows nothing of Hydra: the token embedding and the FFN arrive as factories.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from saffu_lab.models.ffn import DenseFFN
from saffu_lab.models.sampling import sample


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, ffn: Callable[[int], nn.Module]):
        super().__init__()
        self.ln_attn, self.ln_ffn = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ffn = ffn(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.ffn(self.ln_ffn(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context_length: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        dropout: float = 0.1,
        ffn: Callable[[int], nn.Module] = DenseFFN,
        embedding: Callable[[int, int], nn.Module] = nn.Embedding,
        tie_weights: bool = True,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context_length", context_length), ("n_layer", n_layer),
                            ("n_head", n_head), ("d_model", d_model)):
            if value < 1:
                raise ValueError(f"model.{name}={value} must be >= 1")
        if d_model % n_head:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
        self.context_length = context_length
        self.token_embedding = embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(context_length, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, ffn) for _ in range(n_layer))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if tie_weights:
            self.head.weight = self.token_embedding.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for the next token after each prefix of ``idx [B, T]``."""
        return self.head(self.features(idx))

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """The normalised last hidden state ``[B, T, d_model]`` that the head reads."""
        T = idx.shape[1]
        if T > self.context_length:
            raise ValueError(f"sequence of {T} tokens is longer than model.context_length={self.context_length}")
        positions = torch.arange(T, device=idx.device)
        h = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            h = block(h)
        return self.ln_out(h)

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Sample continuations of ``prompt [B, T]`` (see ``saffu_lab.models.sampling.sample``)."""
        return sample(lambda idx: self(idx[:, -self.context_length:])[:, -1, :], prompt, max_new_tokens, **sampling)
