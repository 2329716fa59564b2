"""Structured linear layers (seed paper 2406.16450): drop-in replacements for ``nn.Linear``.

Each maps ``in_features -> out_features`` (plus an optional bias) with fewer parameters:

- ``LowRank``:      y = U (V x),                       V: in -> R, U: R -> out.
                    params R (in + out); initialised from a truncated SVD of a dense init.
- ``BlockDense``:   y = D (B x),   B = diag(B_1..B_n)  each B_i: in/n -> R/n, D: R -> out dense.
                    params R in / n + R out; n = 1 is LowRank. Orthogonal init.
- ``BlockShuffle``: y = B2 P (B1 x)                    B1 = diag(n blocks in/n -> mid/n),
                    P the shuffle (view the mid vector as (n, mid/n), transpose, flatten) so
                    every output block sees every input block, B2 = diag(n blocks mid/n -> out/n).
                    params mid (in + out) / n. Orthogonal init.

``merged_weight()`` multiplies the factors into the equivalent dense [out, in] matrix;
``flops(tokens)`` counts multiply-adds x 2 of one forward pass; ``load_dense(W)`` sets the
factors to the least-squares best structured approximation of a dense matrix W (used to put
an explicit SAFFU solution onto a structure). For all three structures the fit separates into
independent truncated SVDs (Eckart-Young), because every factor entry belongs to exactly one
(input block, output block) pair:

- LowRank:      W^T ~ V U                    one rank-R SVD of W^T.
- BlockDense:   W^T[block i, :] ~ B_i D_i    D_i: the R/n rows of D fed by block i -> one
                                             rank-R/n SVD per input block.
- BlockShuffle: W^T[block i, block j] ~ B1_i[:, S_ij] B2_j[S_ij', :]   S_ij: the mid units the
                                             shuffle routes from block i to block j -> one
                                             rank-|S_ij| SVD per pair of blocks.

Pre-merge (paper, section 2.2): at small batch sizes the extra matmuls of a structured map
are latency-bound, so in eval mode a batch of fewer than ``premerge_below`` rows (the first
dimension of the input) goes through the merged dense matrix instead; it is rebuilt
whenever the factors change. ``premerge_below=None`` turns this off.
"""

from __future__ import annotations

import math

import torch
from torch import nn

STRUCTURES = ("lowrank", "blockdense", "blockshuffle")


class _Structured(nn.Module):
    premerge_below: int | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._merged, self._merged_version = None, None
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if bias:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        # self-guided training: o = alpha * guide(x) + (1 - alpha) * structured(x) while a guide is attached
        self.guide: nn.Linear | None = None
        self.register_buffer("alpha", torch.zeros(()), persistent=False)

    def attach_guide(self) -> nn.Linear:
        """Add a dense guide layer (nn.Linear's init) and set alpha = 1."""
        self.guide = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None).to(self.alpha.device)
        self.alpha.fill_(1.0)
        return self.guide

    def drop_guide(self) -> None:
        self.guide = None
        self.alpha.fill_(0.0)

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.guide is not None:
            y = self.structured(x)
            y = y if self.bias is None else y + self.bias
            return self.alpha * self.guide(x) + (1 - self.alpha) * y
        if self.premerge_below is not None and not self.training and x.shape[0] < self.premerge_below:
            return nn.functional.linear(x, self.premerged_weight(), self.bias)
        y = self.structured(x)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense [out, in] matrix W with layer(x) = x W^T (+ bias)."""
        factor = next(self.parameters())
        return self.structured(torch.eye(self.in_features, device=factor.device, dtype=factor.dtype)).T.contiguous()

    def premerged_weight(self) -> torch.Tensor:
        """``merged_weight()``, cached until a factor changes: in-place updates bump ``_version``, and
        ``.to(dtype or device)`` swaps the storage (``data_ptr``)."""
        version = tuple((p._version, p.data_ptr()) for p in self.parameters())
        if self._merged is None or version != self._merged_version:
            self._merged, self._merged_version = self.merged_weight(), version
        return self._merged

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Project the dense [out, in] ``weight`` onto the structure (least squares, see the module
        docstring); an attached guide takes ``weight`` itself. The bias, if any, is zeroed."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"load_dense: weight is {tuple(weight.shape)}, expected ({self.out_features}, {self.in_features})")
        self._project(weight.T.to(torch.float64))
        if self.bias is not None:
            self.bias.zero_()
        if self.guide is not None:
            self.guide.weight.copy_(weight)
            if self.guide.bias is not None:
                self.guide.bias.zero_()

    def _project(self, target: torch.Tensor) -> None:
        raise NotImplementedError


def _truncated_factors(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors A [m, rank], B [rank, n] of ``target`` [m, n] (A B ~ target), split
    by the square roots of the singular values; ranks beyond min(m, n) get zero columns / rows."""
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    k = min(rank, s.numel())
    A, B = target.new_zeros(target.shape[0], rank), target.new_zeros(rank, target.shape[1])
    root = s[:k].sqrt()
    A[:, :k], B[:k] = u[:, :k] * root, root[:, None] * vh[:k]
    return A, B


def _block_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Block-diagonal map: ``x [..., n * a]`` with ``weight [n, a, b]`` -> ``[..., n * b]``."""
    n, a, _ = weight.shape
    xb = x.reshape(*x.shape[:-1], n, a)
    return torch.einsum("...na,nab->...nb", xb, weight).flatten(-2)


def _orthogonal_blocks(n: int, a: int, b: int) -> torch.Tensor:
    w = torch.empty(n, a, b)
    for i in range(n):
        nn.init.orthogonal_(w[i])
    return w


def _check_divisible(name: str, value: int, n: int, what: str):
    if value % n:
        raise ValueError(f"{what}={value} must be divisible by ffn.nblocks={n} for {name}")


class LowRank(_Structured):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"ffn.rank={rank} must be in [1, {min(in_features, out_features)}] for LowRank {in_features}->{out_features}")
        self.rank = rank
        dense = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))  # nn.Linear's initialisation
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)  # truncated SVD of it
        root = s[:rank].sqrt()
        self.V = nn.Parameter((root[:, None] * vh[:rank]).T.contiguous())  # [in, R]
        self.U = nn.Parameter((u[:, :rank] * root[None, :]).T.contiguous())  # [R, out]

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.V) @ self.U

    def flops(self, tokens: int) -> int:
        return 2 * tokens * self.rank * (self.in_features + self.out_features)

    def _project(self, target):  # W^T ~ V U
        V, U = _truncated_factors(target, self.rank)
        self.V.copy_(V)
        self.U.copy_(U)


class BlockDense(_Structured):
    def __init__(self, in_features: int, out_features: int, rank: int, nblocks: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        _check_divisible("BlockDense", in_features, nblocks, "in_features")
        _check_divisible("BlockDense", rank, nblocks, "ffn.rank")
        if not 1 <= rank <= out_features:
            raise ValueError(f"ffn.rank={rank} must be in [1, {out_features}] for BlockDense")
        self.rank, self.nblocks = rank, nblocks
        self.blocks = nn.Parameter(_orthogonal_blocks(nblocks, in_features // nblocks, rank // nblocks))
        dense = torch.empty(rank, out_features)
        nn.init.orthogonal_(dense)
        self.dense = nn.Parameter(dense)

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        return _block_forward(x, self.blocks) @ self.dense

    def flops(self, tokens: int) -> int:
        return 2 * tokens * (self.rank * self.in_features // self.nblocks + self.rank * self.out_features)

    def _project(self, target):  # W^T[block i] ~ B_i D[rows of block i]
        a, r = self.in_features // self.nblocks, self.rank // self.nblocks
        for i in range(self.nblocks):
            B_i, D_i = _truncated_factors(target[i * a:(i + 1) * a], r)
            self.blocks[i].copy_(B_i)
            self.dense[i * r:(i + 1) * r].copy_(D_i)


class BlockShuffle(_Structured):
    def __init__(self, in_features: int, out_features: int, mid_features: int, nblocks: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        for what, value in (("in_features", in_features), ("out_features", out_features), ("mid_features", mid_features)):
            _check_divisible("BlockShuffle", value, nblocks, what)
        if mid_features < nblocks:
            raise ValueError(f"BlockShuffle mid width {mid_features} must be >= ffn.nblocks={nblocks} (raise ffn.param_ratio or ffn.rank)")
        self.mid_features, self.nblocks = mid_features, nblocks
        self.first = nn.Parameter(_orthogonal_blocks(nblocks, in_features // nblocks, mid_features // nblocks))
        self.second = nn.Parameter(_orthogonal_blocks(nblocks, mid_features // nblocks, out_features // nblocks))

    def shuffle(self, h: torch.Tensor) -> torch.Tensor:
        """View [..., mid] as (n, mid/n), transpose to (mid/n, n), flatten: block i's j-th unit
        goes to block j mod n, so each block of the second map sees all blocks of the first."""
        n = self.nblocks
        return h.reshape(*h.shape[:-1], n, -1).transpose(-1, -2).flatten(-2)

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        return _block_forward(self.shuffle(_block_forward(x, self.first)), self.second)

    def flops(self, tokens: int) -> int:
        return 2 * tokens * self.mid_features * (self.in_features + self.out_features) // self.nblocks

    def _project(self, target):  # W^T[block i, block j] ~ first_i[:, S_ij] second_j[rows of S_ij]
        n, m = self.nblocks, self.mid_features // self.nblocks
        a, c = self.in_features // n, self.out_features // n
        position = self.shuffle(torch.arange(n * m).view(1, -1)).view(-1).argsort()  # where each mid unit lands
        self.first.zero_()
        self.second.zero_()
        for i in range(n):
            units = torch.arange(m)
            landed = position[i * m + units]  # unit (i, u) feeds row landed % m of second-map block landed // m
            for j in range(n):
                S = units[landed // m == j]
                if S.numel():
                    A, B = _truncated_factors(target[i * a:(i + 1) * a, j * c:(j + 1) * c], S.numel())
                    self.first[i][:, S] = A.to(self.first.dtype)
                    self.second[j][landed[S] % m] = B.to(self.second.dtype)


def structured_linear(structure: str, in_features: int, out_features: int, rank: int | None = None,
                      nblocks: int | None = None, param_ratio: float | None = None, bias: bool = True,
                      premerge_below: int | None = None) -> nn.Module:
    """Build a structured layer; with ``param_ratio`` the rank (or mid width) is derived so that
    the layer has at most that fraction of the dense layer's ``in * out`` weights."""
    layer = _build(structure, in_features, out_features, rank, nblocks, param_ratio, bias)
    if premerge_below is not None and premerge_below < 0:
        raise ValueError(f"ffn.premerge_below={premerge_below} must be >= 0 (0 never pre-merges), or null")
    layer.premerge_below = premerge_below
    return layer


def _build(structure, in_features, out_features, rank, nblocks, param_ratio, bias) -> _Structured:
    if structure not in STRUCTURES:
        raise ValueError(f"ffn.structure={structure!r} is not one of {STRUCTURES}")
    n = nblocks or (1 if structure == "lowrank" else 4 if structure == "blockdense" else 2)
    if (rank is None) == (param_ratio is None):
        raise ValueError("give exactly one of ffn.rank and ffn.param_ratio")
    if param_ratio is not None and not 0 < param_ratio <= 1:
        raise ValueError(f"ffn.param_ratio={param_ratio} must be in (0, 1]")
    dense = in_features * out_features
    if structure == "lowrank":
        r = rank or int(param_ratio * dense / (in_features + out_features))
        return LowRank(in_features, out_features, r, bias)
    if structure == "blockdense":
        r = rank or int(param_ratio * dense / (in_features / n + out_features)) // n * n
        return BlockDense(in_features, out_features, r, n, bias)
    mid = rank or int(param_ratio * dense * n / (in_features + out_features)) // n * n
    return BlockShuffle(in_features, out_features, mid, n, bias)
