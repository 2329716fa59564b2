"""Feed-forward blocks of the transformer: ``x -> W2 act(W1 x)``.

``DenseFFN`` is the baseline; ``StructuredFFN`` uses LowRank, BlockDense or BlockShuffle
maps. The ``ffn`` config group passes a *factory* (a partial of one of
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


class StructuredFFN(nn.Module):
    """The FFN with structured linear maps (``saffu_lab.models.structured``) in place of dense ones.

    ``first_layer`` structures the up-projection too (the official default); otherwise only
    the down-projection is structured. ``rank`` / ``nblocks`` fix the structure, or
    ``param_ratio`` derives the rank from a target fraction of the dense layer's weights.
    In eval mode, batches of fewer than ``premerge_below`` rows use the pre-merged dense
    matrices (decoding at small batch sizes).
    """

    def __init__(self, d_model: int, structure: str, expansion: int = 4, rank: int | None = None,
                 nblocks: int | None = None, param_ratio: float | None = None, first_layer: bool = True,
                 dropout: float = 0.0, bias: bool = True, premerge_below: int | None = 16):
        super().__init__()
        from saffu_lab.models.structured import structured_linear

        hidden = expansion * d_model
        make = lambda i, o: structured_linear(structure, i, o, rank, nblocks, param_ratio, bias, premerge_below)  # noqa: E731
        self.up = make(d_model, hidden) if first_layer else nn.Linear(d_model, hidden, bias=bias)
        self.down = make(hidden, d_model)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))
