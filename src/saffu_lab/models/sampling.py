"""Autoregressive sampling shared by every model: temperature, top-k, banned ids, a stop id."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def sample(next_logits: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, max_new_tokens: int,
           stop_id: int | None = None, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None, banned_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """Extend ``prompt [B, T]`` by sampling from ``next_logits(sequence) -> [B, V]``.

    A row that has emitted ``stop_id`` keeps emitting it; sampling ends when every row has.
    """
    idx = prompt
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = next_logits(idx) / max(temperature, 1e-6)
        if banned_ids:
            logits[:, list(banned_ids)] = -float("inf")
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        if stop_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_id), nxt)
            done |= nxt == stop_id
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if stop_id is not None and bool(done.all()):
            break
    return idx
