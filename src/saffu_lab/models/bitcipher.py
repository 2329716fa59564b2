"""Bit-cipher codes and embeddings (appendix C, section 2.5).

Codes: the D standard basis vectors first (the D most frequent tokens), then 2-bit vectors
made by adding one basis vector to a 1-bit vector, then 3-bit vectors, ... so that code norms
never decrease with frequency rank. Within a norm d, components are added in order i = 1..D,
each time to the (d-1)-bit vectors taken in reverse order of their assignment (the appendix's
"reverse order", which keeps neighbouring codes similar); duplicates are skipped.

Embeddings: E[n] = Z[n] / ||Z[n]||_1, then densified with noise (section 2.5):
    f = token counts, e_bar = sum_n f_n E[n] / sum_n f_n, q_n = f_n / (f_n + 1),
    p = (1 - e_bar) / ||1 - e_bar||_1,           E[n] <- q_n E[n] + (1 - q_n) p.
Rows stay on the simplex (sum to 1) and become strictly positive.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn


def bit_cipher_codes(n_codes: int, dim: int) -> torch.Tensor:
    """The first ``n_codes`` bit vectors of the cipher order, as a ``{0,1}`` tensor [n_codes, dim].

    Memoised per process (a sweep's jobs in one worker share them): a fresh copy is returned."""
    return _bit_cipher_codes(n_codes, dim).clone()


@lru_cache(maxsize=16)
def _bit_cipher_codes(n_codes: int, dim: int) -> torch.Tensor:
    if dim < 1:
        raise ValueError(f"bit-cipher dimension must be >= 1, got {dim}")
    if n_codes > 2**dim - 1:
        raise ValueError(f"{n_codes} codes need dimension D with 2^D - 1 >= {n_codes}; D={dim} gives {2**dim - 1}")
    codes: list[int] = [1 << i for i in range(min(dim, n_codes))]
    seen, level = set(codes), list(codes)
    while len(codes) < n_codes:
        new_level = []
        for i in range(dim):
            bit = 1 << i
            for v in reversed(level):
                w = v | bit
                if w != v and w not in seen:
                    seen.add(w)
                    new_level.append(w)
                    codes.append(w)
                    if len(codes) == n_codes:
                        break
            if len(codes) == n_codes:
                break
        level = new_level
    masks = torch.tensor(codes[:n_codes], dtype=torch.long) if dim < 63 else None
    if masks is not None:
        return ((masks[:, None] >> torch.arange(dim)[None, :]) & 1).float()
    return torch.tensor([[(c >> i) & 1 for i in range(dim)] for c in codes[:n_codes]], dtype=torch.float32)


def codes_by_frequency(token_counts: torch.Tensor, dim: int) -> torch.Tensor:
    """Z [N, dim]: the most frequent token gets the first code (ties broken by token id)."""
    n = token_counts.numel()
    order = torch.argsort(-token_counts.double() + torch.arange(n) * 1e-9 / max(n, 1), stable=True)
    z = torch.empty(n, dim)
    z[order] = bit_cipher_codes(n, dim)
    return z


def noise_parts(token_counts: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces of the noised embedding E = q Z~ + (1 - q) p (section 2.5): the normalised codes
    Z~ [N, dim], q [N] and the noise vector p [dim], in float64."""
    z = codes_by_frequency(token_counts, dim).double()
    e = z / z.sum(1, keepdim=True)
    f = token_counts.double().clamp(min=0)
    e_bar = (f[:, None] * e).sum(0) / f.sum().clamp(min=1)
    q = f / (f + 1)
    p = (1 - e_bar) / (1 - e_bar).sum()
    return e, q, p


def bit_cipher_embedding(token_counts: torch.Tensor, dim: int, noise: bool = True) -> torch.Tensor:
    """E in (0, 1]^{N x dim}, rows summing to 1: normalised codes, densified with noise (sec. 2.5)."""
    if not noise:
        z = codes_by_frequency(token_counts, dim)
        return z / z.sum(1, keepdim=True)
    e, q, p = noise_parts(token_counts, dim)
    return (q[:, None] * e + (1 - q[:, None]) * p[None, :]).float()


class BitCipherEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose weights are the bit-cipher embedding of the token counts.

    Frozen by default (``trainable=False``), as in the paper's warm start.
    """

    def __init__(self, token_counts: torch.Tensor, dim: int, noise: bool = True, trainable: bool = False):
        super().__init__(token_counts.numel(), dim)
        with torch.no_grad():
            self.weight.copy_(bit_cipher_embedding(token_counts, dim, noise))
        self.weight.requires_grad_(trainable)
        self.token_counts, self.noise = torch.as_tensor(token_counts).double().clone(), noise

    def noise_form(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(Z~, q, p) with weight = q Z~ + (1 - q) p (``noise_parts``) while the weight is still the
        bit-cipher embedding it was built as; None once it has changed (trained, loaded) or without noise.
        Solvers use it to work with the codes' few bits instead of dense rows."""
        if not self.noise:
            return None
        e, q, p = noise_parts(self.token_counts, self.embedding_dim)
        rebuilt = (q[:, None] * e + (1 - q[:, None]) * p[None, :]).to(self.weight.dtype)
        return (e, q, p) if torch.equal(rebuilt, self.weight.detach().cpu()) else None
