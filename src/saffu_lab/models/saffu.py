"""SAFFU layers and the SAFFU transformer (sections 2.1 and 3 of the paper).

One SAFFU (eq. 1), for a context of K token embeddings X[m] in R^{K x D} with head h:

    Q[m, k] = <X[m, h], X[m, k]>                 # quadratic features, K of them
    a[m]    = -log softmax(Q[m] W)               # W in R^{K x K}; a > 0
    H[m]    = sum_k a[m,k] X[m,k]       (sum)    # R^D
            | concat_k a[m,k] X[m,k]    (cat)    # R^{K D}
    out[m]  = softmax(H[m] U)                    # U in R^{D x D_out} or R^{K D x D_out}

The SAFFU transformer (section 3) runs a block SAFFU (K = b, D_b) and a radial SAFFU
(K = r, D_r) side by side; each decodes to a D_H-dimensional distribution (trained
explicitly against D_H-bit cipher codes of the target), and a final layer M in
R^{2 D_H x N} decodes their concatenation (plus Delta document-model outputs, section 3.1)
to the vocabulary:

    logits[m] = concat(softmax(H_b U_b), softmax(H_r U_r) [, softmax(x D)]) M

The explicit solution of every matrix lives in ``saffu_lab.solver``; this module only
defines the function, its parameters and autoregressive generation.

Structured decoders (beyond the paper): any of U_b, U_r and M may be a LowRank, BlockDense or
BlockShuffle map (``saffu_lab.models.structured``) instead of a dense matrix. The solver still
computes the dense explicit solution and ``load_decoder`` / ``load_final`` project it onto the
structure (least squares); a self-guided dense guide, when attached, takes the dense solution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saffu_lab.framing import SpecialIds, next_target_context
from saffu_lab.models.bitcipher import BitCipherEmbedding, codes_by_frequency
from saffu_lab.models.sampling import sample
from saffu_lab.models.structured import structured_linear

AGGREGATIONS = ("sum", "cat")
DECODERS = ("block", "radial", "M")


def _dense_or_structured(in_dim: int, out_dim: int, structure: dict | None, init_std: float):
    """A dense [in, out] parameter (applied as x @ U), or a bias-free structured map when
    ``structure`` (keys of ``structured_linear``) names one."""
    if structure is None:
        return nn.Parameter(torch.randn(in_dim, out_dim) * init_std)
    return structured_linear(in_features=in_dim, out_features=out_dim, bias=False, **structure)


def _apply(decoder, x: torch.Tensor) -> torch.Tensor:
    return x @ decoder if isinstance(decoder, nn.Parameter) else decoder(x)


def _effective_matrix(decoder) -> torch.Tensor:
    """The dense [in, out] matrix a decoder applies (a guided structured map: the alpha mix)."""
    if isinstance(decoder, nn.Parameter):
        return decoder
    merged = decoder.premerged_weight().T
    if decoder.guide is None:
        return merged
    return decoder.alpha * decoder.guide.weight.T + (1 - decoder.alpha) * merged


@torch.no_grad()
def _load(decoder, value: torch.Tensor) -> None:
    if isinstance(decoder, nn.Parameter):
        decoder.copy_(value.to(decoder.dtype))
    else:
        decoder.load_dense(value.T.to(decoder.alpha.dtype))


class SAFFU(nn.Module):
    """One self-attentive feed-forward unit (eq. 1) over contexts of ``n_features`` token ids."""

    def __init__(self, embedding: nn.Embedding, n_features: int, out_dim: int, aggregation: str, init_std: float = 0.02,
                 structure: dict | None = None):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
        if n_features < 2:
            raise ValueError(f"a SAFFU needs at least 2 features (K >= 2), got K={n_features}")
        self.embedding, self.n_features, self.aggregation = embedding, n_features, aggregation
        dim = embedding.embedding_dim
        self.hidden_dim = dim if aggregation == "sum" else n_features * dim
        self.out_dim = out_dim
        self.W = nn.Parameter(torch.randn(n_features, n_features) * init_std)
        # the decoder U: a dense parameter, or a structured map (``structure``) stored as ``U``
        self.U = _dense_or_structured(self.hidden_dim, out_dim, structure, init_std)

    def quadratic_features(self, X: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Q[m, k] = <X[m, h_m], X[m, k]>  ->  [B, K]."""
        x_head = X[torch.arange(X.shape[0], device=X.device), head]
        return torch.einsum("bd,bkd->bk", x_head, X)

    def attention(self, Q: torch.Tensor) -> torch.Tensor:
        """a = -log softmax(Q W)  ->  [B, K], positive."""
        return -torch.log_softmax(Q @ self.W, dim=-1)

    def aggregate(self, a: torch.Tensor, X: torch.Tensor, e_tail: torch.Tensor | None = None) -> torch.Tensor:
        """H: the attention-weighted features, summed [B, D] or concatenated [B, K D].

        ``X`` may hold only the first L columns when columns L..K-1 are all the same embedding
        ``e_tail`` (the <pad> after the target's position in a block context): the tail is folded in.
        """
        L = X.shape[1]
        if self.aggregation == "sum":
            H = torch.bmm(a[:, None, :L], X).squeeze(1)  # sum_k a_k X_k, without a [B, K, D] temporary
            return H if e_tail is None else H + a[:, L:].sum(1, keepdim=True) * e_tail
        H = (a[:, :L, None] * X).flatten(1)
        return H if e_tail is None else torch.cat([H, (a[:, L:, None] * e_tail).flatten(1)], 1)

    def decode(self, a: torch.Tensor, X: torch.Tensor, e_tail: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits H U  ->  [B, out_dim], with a padded tail folded (see ``aggregate``).

        With cat aggregation and a dense U, H U = sum_{k<L} a_k X_k U_k + sum_{k>=L} a_k (e_tail U_k):
        the tail costs one [K-L, out] product per batch instead of a [B, (K-L) D] x [(K-L) D, out] one.
        """
        if self.aggregation == "sum" or e_tail is None or not isinstance(self.U, nn.Parameter):
            return self.decode_hidden(self.aggregate(a, X, e_tail))
        L, D = X.shape[1], X.shape[2]
        U = self.U.view(self.n_features, D, -1)
        head = (a[:, :L, None] * X).flatten(1) @ U[:L].reshape(L * D, -1)
        return head + a[:, L:] @ torch.einsum("d,kdo->ko", e_tail, U[L:])

    def decode_hidden(self, H: torch.Tensor) -> torch.Tensor:
        """H U for an aggregated H [B, hidden_dim] (dense or structured U)."""
        return _apply(self.U, H)

    def context_features(self, ctx: torch.Tensor, head: torch.Tensor, real_cols: int | None = None):
        """Q [B, K], X [B, L, D] and e_tail: X holds the first L = ``real_cols`` columns when every
        column from L on is one token (the block context's <pad>), else all K (e_tail None)."""
        K = ctx.shape[1]
        if real_cols is None or real_cols >= K:
            X = self.embedding(ctx)
            return self.quadratic_features(X, head), X, None
        X = self.embedding(ctx[:, :real_cols])
        e_tail = self.embedding(ctx[:1, real_cols])[0]
        x_head = X[torch.arange(X.shape[0], device=X.device), head]
        Q = torch.cat([torch.einsum("bd,bkd->bk", x_head, X), (x_head @ e_tail)[:, None].expand(-1, K - real_cols)], 1)
        return Q, X, e_tail

    def hidden(self, ctx: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        Q, X, e_tail = self.context_features(ctx, head)
        return self.aggregate(self.attention(Q), X, e_tail)

    def forward(self, ctx: torch.Tensor, head: torch.Tensor, real_cols: int | None = None) -> torch.Tensor:
        """Decoder logits H U  ->  [B, out_dim] (eq. 1 before its outer softmax).

        ``real_cols`` = L promises that columns L..K-1 of every row are the same token (<pad>)
        and that every head lies before L; the result is the same, computed with less work.
        """
        Q, X, e_tail = self.context_features(ctx, head, real_cols)
        return self.decode(self.attention(Q), X, e_tail)

    def decoder_matrix(self) -> torch.Tensor:
        """U as the dense [hidden_dim, out_dim] matrix the decoder applies (merged if structured)."""
        return _effective_matrix(self.U)

    def load_decoder(self, U: torch.Tensor) -> None:
        """Set U from a dense solution (projected onto the structure, if U is structured)."""
        _load(self.U, U)


class DocumentModel(nn.Module):
    """Section 3.1: x = (E[<pad>] + sum of the document's preceding embeddings) / m; softmax(x D).

    ``D`` predicts which training document (or group of documents, when there are more than
    ``n_classes``) the prefix came from.
    """

    def __init__(self, embedding: nn.Embedding, n_classes: int, pad_id: int, init_std: float = 0.02):
        super().__init__()
        self.embedding, self.pad_id = embedding, pad_id
        self.D = nn.Parameter(torch.randn(embedding.embedding_dim, n_classes) * init_std)

    def features(self, prefix: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        """x [B, D_doc] from the preceding ids ``prefix [B, L]`` (padded with <pad>) and their count."""
        e = self.embedding(prefix)
        valid = torch.arange(prefix.shape[1], device=prefix.device)[None, :] < prefix_len[:, None]
        total = (e * valid.unsqueeze(-1)).sum(1) + self.embedding.weight[self.pad_id]
        return total / (prefix_len + 1).unsqueeze(-1).to(total.dtype)

    def forward(self, prefix: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        return self.features(prefix, prefix_len) @ self.D


class SAFFUTransformer(nn.Module):
    """The encoder-decoder SAFFU transformer of section 3 (block + radial SAFFUs, then M).

    ``token_counts`` orders the bit-cipher codes (frequent tokens get low-norm codes);
    ``special_ids`` gives the framing tokens used by ``generate``.
    """

    def __init__(
        self,
        vocab_size: int,
        token_counts: torch.Tensor,
        special_ids,
        block_size: int = 128,
        radius: int = 8,
        block_dim: int = 128,
        radial_dim: int = 32,
        hidden_dim: int = 512,
        block_aggregation: str = "sum",
        radial_aggregation: str = "cat",
        head: str | int = "most_recent",
        document_model: bool = False,
        n_documents: int = 1,
        document_classes: int = 1024,
        document_dim: int = 32,
        embedding=BitCipherEmbedding,
        init_std: float = 0.02,
        decoder_structure: dict | None = None,
        structured_decoders=DECODERS,
    ):
        super().__init__()
        for name, value in (("block_size", block_size), ("radius", radius)):
            if value < 2:
                raise ValueError(f"model.{name}={value} must be >= 2 (a SAFFU attends over at least 2 features)")
        for name, value in (("block_dim", block_dim), ("radial_dim", radial_dim), ("hidden_dim", hidden_dim)):
            if value < 1:
                raise ValueError(f"model.{name}={value} must be >= 1")
            if value < 62 and vocab_size > 2**value - 1:
                raise ValueError(f"model.{name}={value} bits give only {2**value - 1} bit-cipher codes for {vocab_size} tokens")
        if not (head == "most_recent" or (isinstance(head, int) and 0 <= head < min(radius, block_size))):
            raise ValueError(f"model.head={head!r} must be 'most_recent' or a feature index in [0, min(radius, block_size)="
                             f"{min(radius, block_size)})")
        if document_model and document_classes < 1:
            raise ValueError(f"model.document_classes={document_classes} must be >= 1")
        structure = dict(decoder_structure) if decoder_structure and decoder_structure.get("structure") else None
        unknown = set(structured_decoders) - set(DECODERS)
        if unknown:
            raise ValueError(f"model.structured_decoders has {sorted(unknown)}; choose from {list(DECODERS)}")
        structure_of = {name: structure if name in structured_decoders else None for name in DECODERS}
        token_counts = torch.as_tensor(token_counts, dtype=torch.float64)
        if token_counts.numel() != vocab_size:
            raise ValueError(f"token_counts has {token_counts.numel()} entries for a vocabulary of {vocab_size}")
        self.vocab_size, self.block_size, self.radius, self.head = vocab_size, block_size, radius, head
        self.pad_id, self.sod_id, self.frg_id = special_ids.pad, special_ids.sod, special_ids.frg
        self.block = SAFFU(embedding(token_counts, block_dim), block_size, hidden_dim, block_aggregation, init_std,
                           structure_of["block"])
        self.radial = SAFFU(embedding(token_counts, radial_dim), radius, hidden_dim, radial_aggregation, init_std,
                            structure_of["radial"])
        # hidden targets of both SAFFUs: the D_H-bit cipher of the vocabulary, normalised (sec. 3)
        codes = codes_by_frequency(token_counts, hidden_dim)
        self.register_buffer("hidden_targets", codes / codes.sum(1, keepdim=True))
        self.n_document_classes = min(document_classes, n_documents) if document_model else 0
        self.document = (DocumentModel(embedding(token_counts, document_dim), self.n_document_classes, self.pad_id, init_std)
                         if document_model else None)
        self.final_dim = 2 * hidden_dim + self.n_document_classes
        self.M = _dense_or_structured(self.final_dim, vocab_size, structure_of["M"], init_std)

    # --- forward -------------------------------------------------------------------------
    def heads(self, block_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head feature of each SAFFU: the most recent context token (block position j-1), or a fixed index."""
        if self.head == "most_recent":
            return block_position - 1, torch.full_like(block_position, self.radius - 1)
        return torch.full_like(block_position, self.head), torch.full_like(block_position, self.head)

    def decoder_inputs(self, inputs: dict) -> torch.Tensor:
        """The concatenated distributions that M decodes: [B, 2 D_H (+ Delta)]."""
        head_b, head_r = self.heads(inputs["position"])
        # block contexts are <pad> from each target's position on: fold columns past the batch's last one
        real_cols = max(int(inputs["position"].max()), int(head_b.max()) + 1)
        parts = [torch.softmax(self.block(inputs["block"], head_b, real_cols), -1),
                 torch.softmax(self.radial(inputs["radial"], head_r), -1)]
        if self.document is not None:
            parts.append(torch.softmax(self.document(inputs["prefix"], inputs["prefix_len"]), -1))
        return torch.cat(parts, dim=-1)

    def forward(self, inputs: dict) -> torch.Tensor:
        """Next-token logits [B, N] for the targets described by ``inputs`` (see BlockFraming)."""
        return _apply(self.M, self.decoder_inputs(inputs))

    def load_final(self, M: torch.Tensor) -> None:
        """Set M from a dense solution (projected onto the structure, if M is structured)."""
        _load(self.M, M)

    # --- generation ----------------------------------------------------------------------
    def frame_next(self, generated: torch.Tensor) -> dict:
        """Inputs for the next target of documents whose targets so far are ``generated [B, t]``."""
        sp = SpecialIds(pad=self.pad_id, sod=self.sod_id, eod=-1, frg=self.frg_id)
        inputs = next_target_context(generated, self.block_size, self.radius, sp)
        if self.document is not None:
            B, t = generated.shape
            prefix = generated if t else torch.full((B, 1), self.pad_id, dtype=torch.long, device=generated.device)
            inputs.update(prefix=prefix, prefix_len=torch.full((B,), t, dtype=torch.long, device=generated.device))
        return inputs

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Sample documents: ``prompt [B, 1 + t]`` is the ``<sod>`` column, then t >= 0 prompt tokens
        (the document's first targets; ``frame_next`` gives every later target the contexts the data
        framing gives it, across block boundaries too). See ``sampling.sample``."""
        return sample(lambda idx: self(self.frame_next(idx[:, 1:])), prompt, max_new_tokens, **sampling)
