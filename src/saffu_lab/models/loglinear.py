"""The log-linear SAFFU: SAFFU units that decode straight to the vocabulary (beyond the paper).

Why this model exists (measured in ``docs/explicit_solutions.md``): the paper's transformer
decodes each SAFFU to a D_H-bit code distribution and solves a final layer M over those
distributions. Even a perfect bigram pushed through that path (D_H = 512 codes, M by eq. 7)
scores 161 dev perplexity on KJV, where the bigram itself scores 65: the closed-form M, linear
in the code probabilities, cannot undo the bottleneck. Here every unit decodes to the
vocabulary (its hidden codes are the identity: the bit cipher with D_H = N), and the units'
log-probability ratios are added with a handful of weights, the way eq. 7's theorem reads for
a softmax layer whose features are the units themselves.

For a target with radius items x_1 (nearest) ... x_r and block context B:

    logits(y) =   sum_k  lam_k  [log P_k(y | x_k) - log p(y)]       radial unit, one expert per distance k
                +        lam_b  [h_B U_b](y)                         block unit
                +        lam_0  log p(y)                             prior (the target unigram)

- Radial unit: a cat SAFFU whose features keep the exact identity of each item (one-hot, the
  bit cipher with D = N). With one-hot features eq. 5 is a per-distance conditional,
  F(onehot x_k, Y) = c_k(x, y), and its closed form is log c_k(x, y) up to a column shift;
  here its zero co-occurrences get interpolated modified Kneser-Ney discounting and back-off
  (``saffu_lab.ngram``) instead of an additive eps. Stored as
  log P_k(y | x) = log g_k(x) + log P_k1(y) + S_k[x, y], with S_k sparse (seen pairs only);
  log g_k(x) is constant in y and drops out of the softmax.
- Block unit: a sum SAFFU over the block's bit-cipher embeddings (D_b), uniform weights over
  the block's real positions (the pad tail carries no weight: the paper's document-model
  feature, section 3.1, restricted to the block), h_B = mean_k E_b[x_k]; its decoder decodes
  to the vocabulary by eq. 5 with one-hot targets, as a log-ratio
  U_b[d, y] = log P(y | d) - log p(y), P(y | d) = (F[d, y] + beta p(y) F[d, .]) / ((1 + beta) F[d, .]).
  With ``block_rank`` k > 0 the decoder is stored as its best rank-k approximation in the
  Frobenius norm (truncated SVD, Eckart-Young), U_b ~ A_b B_b with A_b [D_b, k] and B_b [k, N]:
  h_B A_b B_b costs k (D_b + N) per target instead of D_b N. Solved (lam refitted for the cut
  decoder), `kjv` dev is 40.58 at k = 256 and 40.44 at k = 512 against 40.78 dense, `kjv_chapters`
  46.07 and 45.69 against 45.91: the small singular directions are mostly the noise of rare
  counts. It makes the residual SAFFU's steps cheaper (docs/warm_start.md).
- Final layer: the weights lam (one per distance, the block, the prior) replace the attention
  weights and M; the solver fits them by Newton's method on held-out training documents
  (the negative log-likelihood is convex in lam). The weights are what the paper's attention
  would supply; they are static per distance here.

``saffu_lab.solver_loglinear.LogLinearSolver`` solves every part. All parts are parameters, so
a warm start can fine-tune them by backprop (the sparse values keep their sparsity pattern).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saffu_lab.framing import SpecialIds, next_target_context
from saffu_lab.models.bitcipher import BitCipherEmbedding
from saffu_lab.models.sampling import sample

NEVER = -1.0e4  # logit of <pad>, <sod>, <frg>: they are never targets (exp underflows to 0)


class LogLinearSAFFU(nn.Module):
    """Radial (exact identity, Kneser-Ney decoders) and block (bit-cipher) SAFFU experts, mixed log-linearly."""

    def __init__(self, vocab_size: int, token_counts: torch.Tensor, special_ids: SpecialIds, block_size: int = 128,
                 radius: int = 8, block_dim: int = 128, block_unit: bool = True, block_rank: int = 0, n_documents: int = 1,
                 embedding=BitCipherEmbedding, block_aggregation: str = "sum", radial_aggregation: str = "cat",
                 decoder_structure: str | None = None):
        """``n_documents`` comes with the framing's model arguments; this model does not use it. The
        aggregations are fixed (block sum, radial cat over identity features) and the decoders are
        dense: the last three arguments exist so that a config asking for anything else is refused."""
        super().__init__()
        if (block_aggregation, radial_aggregation) != ("sum", "cat"):
            raise ValueError(f"model=saffu_loglinear aggregates block sum + radial cat, not block {block_aggregation} + "
                             f"radial {radial_aggregation}; drop the aggregation override (or use model=saffu)")
        if decoder_structure not in (None, "dense"):
            raise ValueError(f"model=saffu_loglinear has no structured decoders (ffn structure {decoder_structure!r}); "
                             "use ffn=dense, or model=saffu for structured SAFFU decoders")
        if block_size < 2:
            raise ValueError(f"model.block_size={block_size} must be >= 2 (one start token plus one target)")
        if radius < 1:
            raise ValueError(f"model.radius={radius} must be >= 1")
        if block_unit and block_dim < 1:
            raise ValueError(f"model.block_dim={block_dim} must be >= 1")
        if block_unit and not 0 <= block_rank <= min(block_dim, vocab_size):
            raise ValueError(f"model.block_rank={block_rank} must be 0 (a dense block decoder) or between 1 and "
                             f"min(model.block_dim, vocabulary) = {min(block_dim, vocab_size)}")
        token_counts = torch.as_tensor(token_counts, dtype=torch.float64)
        if token_counts.numel() != vocab_size:
            raise ValueError(f"token_counts has {token_counts.numel()} entries for a vocabulary of {vocab_size}")
        N = vocab_size
        self.vocab_size, self.block_size, self.radius, self.has_block = N, block_size, radius, bool(block_unit)
        self.pad_id, self.sod_id, self.frg_id = special_ids.pad, special_ids.sod, special_ids.frg
        never = torch.zeros(N, dtype=torch.bool)
        never[[special_ids.pad, special_ids.sod, special_ids.frg]] = True
        self.register_buffer("never_target", never)
        # final layer: lam for distances 1..r, then the block unit, then the prior
        # (a cold start trains from here: every expert at weight 1 and zero log-ratios, the uniform
        # distribution; without a solve the radial decoders have no sparse entries, only their columns)
        self.mix = nn.Parameter(torch.ones(self.n_experts))
        self.log_prior = nn.Parameter(torch.zeros(N))  # log p(y)
        # radial decoders: col[k-1] = log P_k1(y) - log p(y); S_k in CSR rows (k-1) N + x
        self.radial_col = nn.Parameter(torch.zeros(radius, N))
        self.register_buffer("radial_crow", torch.zeros(radius * N + 1, dtype=torch.long))
        self.register_buffer("radial_cols", torch.zeros(0, dtype=torch.long))
        self.radial_values = nn.Parameter(torch.zeros(0))
        # leave-one-out offset of each sparse entry (KneserNey.bigram_leave_one_out), for training only
        self.register_buffer("radial_loo", torch.zeros(0))
        if self.has_block:
            self.block_embedding = embedding(token_counts, block_dim)
            self.block_dim, self.block_rank = block_dim, block_rank
            if block_rank:  # U_b = A_b B_b, set by set_block_decoder
                self.block_A = nn.Parameter(torch.zeros(block_dim, block_rank))
                self.block_B = nn.Parameter(torch.zeros(block_rank, N))
            else:
                self.block_U = nn.Parameter(torch.zeros(block_dim, N))
            # leave-one-out for the block decoder (training only): M[y, d] = the smoothed mass of
            # F[d, y] behind U_b[d, y], divided by 1 + beta p(y) (set by set_block_decoder)
            self.register_buffer("block_loo_mass", torch.zeros(0))

    @property
    def n_experts(self) -> int:
        return self.radius + int(self.has_block) + 1

    def expert_names(self) -> list[str]:
        return [f"radial_{k}" for k in range(1, self.radius + 1)] + (["block"] if self.has_block else []) + ["prior"]

    # --- the sparse radial decoders --------------------------------------------------------
    def set_radial(self, col: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                   loo: torch.Tensor | None = None) -> None:
        """Store the radial decoders: ``col [r, N]`` and the sparse entries (row (k-1) N + x, column y,
        value log1p(S)), sorted by row then column; ``loo`` the entries' leave-one-out offsets
        (none: training scores its targets with the counts that include them)."""
        with torch.no_grad():
            self.radial_col.copy_(col)
            counts = torch.bincount(rows, minlength=self.radius * self.vocab_size)
            self.radial_crow.copy_(torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]))
            self.radial_cols = cols.to(self.radial_crow.device)
            self.radial_values.data = values.to(self.radial_col.dtype).to(self.radial_col.device)
            self.radial_loo = (torch.zeros(0) if loo is None else loo).to(self.radial_col.dtype).to(self.radial_col.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The sparse decoders' size is the data's: take it from the checkpoint before loading."""
        if self.has_block and prefix + "block_loo_mass" not in state_dict:  # a checkpoint from before it
            state_dict[prefix + "block_loo_mass"] = torch.zeros(0)
        for name in ("radial_cols", "radial_values", "radial_loo", "block_loo_mass"):
            if prefix + name in state_dict:
                incoming = state_dict[prefix + name]
                getattr(self, name).data = torch.empty_like(incoming, device=self.radial_crow.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _radial_rows(self, radial: torch.Tensor) -> torch.Tensor:
        """CSR row of each (target, distance) pair: (k-1) N + x_k, distance k = 1 first.  [B, r]"""
        if radial.shape[1] != self.radius:
            raise ValueError(f"radial contexts of {radial.shape[1]} items for a model of radius {self.radius}")
        k = torch.arange(self.radius, device=radial.device)
        return k[None, :] * self.vocab_size + radial.flip(1)

    def _radial_rows_dense(self, radial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct (distance, item) rows of the batch as a dense [U, N] block of S, and the
        index of each target's row per distance [B, r]. Frequent items repeat across a batch, so
        U is far below B r; the CSR entries of the U rows are scattered once, without a loop."""
        rows = self._radial_rows(radial)
        unique, inverse = torch.unique(rows, return_inverse=True)
        start = self.radial_crow[unique]
        length = self.radial_crow[unique + 1] - start
        total = int(length.sum())
        owner = torch.repeat_interleave(torch.arange(unique.numel(), device=rows.device), length, output_size=total)
        first = torch.cumsum(length, 0) - length
        entry = start[owner] + torch.arange(total, device=rows.device) - first[owner]
        dense = self.radial_values.new_zeros(unique.numel() * self.vocab_size)
        dense = dense.index_add(0, owner * self.vocab_size + self.radial_cols[entry], self.radial_values[entry])
        return dense.view(unique.numel(), self.vocab_size), inverse

    # --- the block unit ---------------------------------------------------------------------
    def block_features(self, block: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """h_B = the mean bit-cipher embedding of the block's real positions (< the target's).  [B, D_b]"""
        L = int(position.max())  # columns from L on are <pad> for every row: no weight, so not read
        real = (torch.arange(L, device=block.device)[None, :] < position[:, None]).to(self.block_embedding.weight.dtype)
        bag = F.embedding_bag(block[:, :L], self.block_embedding.weight, per_sample_weights=real, mode="sum")
        return bag / real.sum(1, keepdim=True)

    @torch.no_grad()
    def set_block_decoder(self, U: torch.Tensor, loo_mass: torch.Tensor | None = None) -> None:
        """Store the solved block decoder ``U [D_b, N]``: as it is, or (``block_rank`` k) as its
        truncated SVD U ~ (u_k s_k^1/2)(s_k^1/2 v_k^T), the factors balanced so that backprop moves
        both alike. ``loo_mass [N, D_b]``: the masses behind U for the leave-one-out offsets of
        ``training_logits`` (none: training targets are scored with the sums that include them)."""
        self.block_loo_mass = (torch.zeros(0) if loo_mass is None else loo_mass).to(self.mix)
        if not self.block_rank:
            self.block_U.copy_(U)
            return
        U, k = U.double(), self.block_rank
        # the top k singular pairs from the Gram matrix of the smaller side (U U^T = u s^2 u^T: about
        # 8x faster than a full SVD of the 2,048 x 6,902 decoder, and exact for the directions kept)
        tall = U.shape[0] > U.shape[1]
        w, V = torch.linalg.eigh(U.T @ U if tall else U @ U.T)
        V = V[:, -k:].flip(1)  # largest first
        root = w[-k:].flip(0).clamp(min=0).sqrt().sqrt().clamp(min=1e-150)  # s^1/2
        if tall:  # V holds the right singular vectors: A = U v s^-1/2 = u s^1/2, B = s^1/2 v^T
            self.block_A.copy_((U @ V) / root[None, :])
            self.block_B.copy_(root[:, None] * V.T)
        else:  # V holds the left singular vectors: A = u s^1/2, B = s^-1/2 u^T U = s^1/2 v^T
            self.block_A.copy_(V * root[None, :])
            self.block_B.copy_((V.T @ U) / root[:, None])

    def block_logits(self, block: torch.Tensor, position: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The block unit's log-ratios h_B U_b (or h_B A_b B_b); ``h``: h_B when already computed.  [B, N]"""
        h = self.block_features(block, position) if h is None else h
        return h @ self.block_A @ self.block_B if self.block_rank else h @ self.block_U

    # --- forward ------------------------------------------------------------------------------
    def expert_logits(self, inputs: dict) -> torch.Tensor:
        """Each expert's log-ratio over the vocabulary, before the final weights.  [B, n_experts, N]"""
        B = inputs["radial"].shape[0]
        dense, inverse = self._radial_rows_dense(inputs["radial"])
        parts = [dense[inverse] + self.radial_col[None]]  # [B, r, N]: S_k[x_k] + col_k
        if self.has_block:
            parts.append(self.block_logits(inputs["block"], inputs["position"])[:, None, :])
        parts.append(self.log_prior[None, None, :].expand(B, 1, -1))
        return torch.cat(parts, 1)

    def forward(self, inputs: dict, block_h: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, N]: the experts' log-ratios weighted by ``mix`` (the final layer).
        ``block_h``: the block features h_B when the caller has them (``training_logits``)."""
        r = self.radius
        lam = self.mix
        dense, inverse = self._radial_rows_dense(inputs["radial"])  # sum_k lam_k S_k[x_k]: one weighted bag
        logits = F.embedding_bag(inverse, dense, per_sample_weights=lam[:r].expand(inverse.shape[0], r), mode="sum")
        logits = logits + (lam[:r] @ self.radial_col + lam[-1] * self.log_prior)[None, :]
        if self.has_block:
            logits = logits + lam[r] * self.block_logits(inputs["block"], inputs["position"], block_h)
        return logits.masked_fill(self.never_target, NEVER)

    def _entry_keys(self) -> torch.Tensor:
        """(CSR row) N + column of every sparse entry, ascending; cached until the decoders change."""
        cached = getattr(self, "_keys_cache", None)
        if cached is None or cached[0] != (self.radial_cols.data_ptr(), self.radial_cols.numel()):
            row = torch.repeat_interleave(torch.arange(self.radius * self.vocab_size, device=self.radial_cols.device),
                                          self.radial_crow.diff(), output_size=self.radial_cols.numel())
            self._keys_cache = ((self.radial_cols.data_ptr(), self.radial_cols.numel()), row * self.vocab_size + self.radial_cols)
        return self._keys_cache[1]

    def training_logits(self, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        """The logits that backprop on *training* targets sees: ``forward``, with each radial
        expert's score of the target taken as if its own occurrence were not in the counts
        (leave-one-out: + lam_k delta_k(x_k, y)), and the block unit's as if its h_B were not in
        the decoder's sums (``block_leave_one_out``). Without it a warm start learns to trust counts
        that include the very target they score (dev perplexity rises from the first step)."""
        block_loo = self.has_block and self.block_loo_mass.numel() > 0
        block_h = self.block_features(inputs["block"], inputs["position"]) if block_loo else None  # once, for both
        logits = self(inputs, block_h)
        offset = torch.zeros(targets.shape, dtype=self.mix.dtype, device=targets.device)
        if self.radial_loo.numel():
            rows = self._radial_rows(inputs["radial"])  # [B, r]
            entry_keys = self._entry_keys()  # row N + column of every entry: unique and sorted
            query = rows * self.vocab_size + targets[:, None]
            pos = torch.searchsorted(entry_keys, query).clamp(max=max(entry_keys.numel() - 1, 0))
            found = entry_keys[pos] == query  # the key holds the row, so a match is in the target's row
            delta = torch.where(found, self.radial_loo[pos], torch.zeros((), dtype=self.radial_loo.dtype, device=rows.device))
            offset = offset + (delta * self.mix[: self.radius]).sum(1)
        if block_loo:  # and the block unit's: + lam_b delta_b(h_B, y)
            offset = offset + self.mix[self.radius] * self.block_leave_one_out(block_h, targets)
        return logits.scatter_add(1, targets[:, None], offset[:, None].to(logits.dtype))

    def block_leave_one_out(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How far the block unit's score of each training target moves with its own h_B taken out
        of the sums it was solved from (``solver_loglinear.solve_block``): F[d, y] and F[d, .] lose
        x = h_B, so, relative to the other columns (whose change, a share of order x / F[d, .], is
        left out as the radial decoders leave it out),
            delta = sum_d x_d log((F[d, y] - x_d + beta p(y) (F[d, .] - x_d)) / (F[d, y] + beta p(y) F[d, .]))
                  = sum_d x_d log1p(-x_d / M[y, d]),   M = (F[d, y] + beta p(y) F[d, .]) / (1 + beta p(y)).
        A target id seen once has F[:, y] = x: without this its own block code is what U_b[:, y]
        scores it by (about 0.8 nats per unit of the block's weight on the synthetic corpus). With a
        truncated decoder the dense decoder's offset is used. ``x``: the targets' h_B (``block_features``,
        float32 under bf16 autocast too, as the solve summed them).  [B]"""
        x = x.float()
        return (x * torch.log1p(-x / self.block_loo_mass[targets].float())).sum(1)

    # --- generation ---------------------------------------------------------------------------
    def frame_next(self, generated: torch.Tensor) -> dict:
        sp = SpecialIds(pad=self.pad_id, sod=self.sod_id, eod=-1, frg=self.frg_id)
        return next_target_context(generated, self.block_size, self.radius, sp)

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Sample documents: ``prompt [B, 1 + t]`` is the ``<sod>`` column, then t >= 0 prompt tokens
        (the document's first targets; ``frame_next`` gives every later target the contexts the data
        framing gives it, across block boundaries too). See ``sampling.sample``."""
        return sample(lambda idx: self(self.frame_next(idx[:, 1:])), prompt, max_new_tokens, **sampling)
