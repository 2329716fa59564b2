"""Feed-forward blocks of the transformer: ``x -> W2 act(W1 x)``.

``DenseFFN`` is the baseline. The ``ffn`` config group passes a *factory* (a partial of one of
these classes) to the model, which calls it with ``d_model`` once per layer, so the structured
layers of the structured-FFN issue drop in without the model knowing which one it holds.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseFFN(nn.Module):
    """Two dense linear maps with a GELU between: d_model -> expansion * d_model -> d_model."""

    def __init__(self, d_model: int, expansion: int = 4, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if expansion < 1:
            raise ValueError(f"ffn.expansion={expansion} must be >= 1")
        hidden = expansion * d_model
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))
