"""Framing: from tokenised documents to (context, target) pairs, by token id, vectorised.

A tokenised split is a flat id tensor ``ids`` with document boundaries ``offsets``
(document d is ``ids[offsets[d]:offsets[d+1]]``). Each document's *targets* are its tokens
followed by ``<eod>``; ``<sod>``, ``<frg>`` and ``<pad>`` are never targets.

Two framings, following ``shared/notes/saffu-reading.md`` (Data framing):

- **Causal windows** (GPT baseline): the stream ``<sod> doc_1 <eod> <sod> doc_2 <eod> ...``
  cut into windows of ``context + 1`` ids that overlap by one, so every stream position but
  the first is a target exactly once; ``<sod>`` targets are masked with ``IGNORE_INDEX``.
- **Blocks and radii** (SAFFU, section 3): each document's targets are cut into slices of
  ``b - 1``; block ``i`` is ``[<sod> or <frg>, slice_i..., <pad>...]``. The target at block
  position ``j`` (0-based here, ``1 <= j < b``) has the block context "the block with positions
  ``>= j`` replaced by ``<pad>``" (K = b) and the radial context "the r items before the target
  in its document's stream ``<sod> t1 t2 ...``, left-padded with ``<pad>`` only before the
  document's start" (K = r). The radius crosses block boundaries (it never holds ``<frg>``),
  so r > b is legal (appendix D solves those cells). Contexts are gathered by index on
  demand, so that a caller can materialise them chunk by chunk.
- **Both** (``ResidualFraming``, the residual SAFFU): the causal windows, and for each of their
  targets the row of that target in the blocks-and-radii framing, so that one batch feeds a
  transformer its windows and a SAFFU the same targets' block and radial contexts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from saffu_lab.tokenizer import EOD, FRG, PAD, SOD, special_id

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    sod: int
    eod: int
    frg: int


def special_ids_of(tokenizer) -> SpecialIds:
    """The special ids of a trained ``tokenizers.Tokenizer`` (a clear error if one is missing)."""
    return SpecialIds(pad=special_id(tokenizer, PAD), sod=special_id(tokenizer, SOD), eod=special_id(tokenizer, EOD),
                      frg=special_id(tokenizer, FRG))


def document_lengths(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def first_n_tokens(ids: torch.Tensor, offsets: torch.Tensor, n_tokens: int | None):
    """The first ``n_tokens`` targets (tokens + ``<eod>``) of a split: ``(ids, offsets, cut)``.

    Whole documents are kept while they fit. If the first document alone has more than n
    targets, it is cut to its first n - 1 tokens (n targets with its ``<eod>``), so the limit
    holds exactly: ``cut`` is then that document's target count before the cut, else None.
    ``None`` keeps everything.
    """
    if n_tokens is None:
        return ids, offsets, None
    targets_cum = torch.cumsum(document_lengths(offsets) + 1, 0)
    n_docs = int((targets_cum <= n_tokens).sum())
    if n_docs == 0 and targets_cum.numel() > 0:
        return ids[: n_tokens - 1], offsets.new_tensor([0, n_tokens - 1]), int(targets_cum[0])
    offsets = offsets[: n_docs + 1]
    return ids[: int(offsets[-1])], offsets, None


def document_stream(ids: torch.Tensor, offsets: torch.Tensor, sp: SpecialIds) -> torch.Tensor:
    """``<sod> doc_1 <eod> <sod> doc_2 <eod> ...`` as one id tensor, built without a loop."""
    lengths = document_lengths(offsets)
    n_docs = lengths.numel()
    doc_of_token = torch.repeat_interleave(torch.arange(n_docs), lengths)
    stream = torch.empty(ids.numel() + 2 * n_docs, dtype=torch.long)
    starts = offsets[:-1] + 2 * torch.arange(n_docs)  # where each document's <sod> lands
    stream[starts] = sp.sod
    stream[starts + lengths + 1] = sp.eod
    stream[torch.arange(ids.numel()) + 2 * doc_of_token + 1] = ids.long()
    return stream


def causal_windows(stream: torch.Tensor, context: int, sp: SpecialIds) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x`` and targets ``y`` of shape ``[n_windows, context]``; ``y[w, t]`` follows ``x[w, :t+1]``.

    Windows start every ``context`` positions and hold ``context + 1`` ids, so each stream
    position after the first is predicted once. The tail is padded; padded and ``<sod>``
    targets are ``IGNORE_INDEX``.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    n_windows = max(1, -(-(stream.numel() - 1) // context))
    padded = torch.full((n_windows * context + 1,), sp.pad, dtype=torch.long)
    padded[: stream.numel()] = stream
    windows = padded.unfold(0, context + 1, context)  # [n_windows, context + 1], a view
    x, y = windows[:, :-1].clone(), windows[:, 1:].clone()
    y[(y == sp.sod) | (y == sp.pad)] = IGNORE_INDEX
    return x, y


@dataclass(frozen=True)
class Blocks:
    """All blocks of a split and the (block, position) address of every target."""

    blocks: torch.Tensor  # [n_blocks, b] token ids
    block_index: torch.Tensor  # [M] block of each target
    position: torch.Tensor  # [M] 0-based position of each target in its block, 1..b-1
    targets: torch.Tensor  # [M] target ids, == blocks[block_index, position]
    first_block: torch.Tensor  # [n_docs] index of each document's first block
    rank_in_doc: torch.Tensor  # [M] 0-based rank of each target among its document's targets
    pad_id: int
    sod_id: int


def frame_blocks(ids: torch.Tensor, offsets: torch.Tensor, b: int, sp: SpecialIds) -> Blocks:
    """Cut each document's targets (tokens then ``<eod>``) into blocks of ``b`` (section 3)."""
    if b < 2:
        raise ValueError(f"block size b must be >= 2 (one start token plus one target), got {b}")
    lengths = document_lengths(offsets) + 1  # targets per document, <eod> included
    n_docs = lengths.numel()
    blocks_per_doc = -(-lengths // (b - 1))
    first_block = torch.cumsum(blocks_per_doc, 0) - blocks_per_doc
    n_blocks = int(blocks_per_doc.sum())

    targets = document_stream(ids, offsets, sp)
    targets = targets[targets != sp.sod]  # tokens and <eod> of each document, in order
    doc_of_target = torch.repeat_interleave(torch.arange(n_docs), lengths)
    rank_in_doc = torch.arange(targets.numel()) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    block_index = first_block[doc_of_target] + rank_in_doc // (b - 1)
    position = 1 + rank_in_doc % (b - 1)

    blocks = torch.full((n_blocks, b), sp.pad, dtype=torch.long)
    blocks[:, 0] = sp.frg
    blocks[first_block, 0] = sp.sod
    blocks[block_index, position] = targets
    return Blocks(blocks, block_index, position, targets, first_block, rank_in_doc, sp.pad, sp.sod)


def block_context(framed: Blocks, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """``X^block`` ids for the selected targets: the block, positions >= the target's padded. [m, b]"""
    block_index, position = framed.block_index[rows], framed.position[rows]
    ctx = framed.blocks[block_index]
    pad = framed.blocks.new_full((), framed.pad_id)
    columns = torch.arange(framed.blocks.shape[1])
    return torch.where(columns[None, :] < position[:, None], ctx, pad)


def radial_context(framed: Blocks, r: int, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """``X^radius`` ids: the ``r`` items before each target in its document's stream
    ``<sod> t1 t2 ...``, left-padded with ``<pad>`` before the document's start.  [m, r]

    Target ``t_i`` (rank ``i`` in its document, 0-based) sits at stream position ``i + 1``; the
    stream holds ``<sod>`` at 0 and ``t_s`` at ``s + 1``, so column ``c`` (distance ``r - c``)
    reads stream position ``i + 1 - r + c``: ``<sod>`` at 0, ``<pad>`` before it.
    """
    if r < 1:
        raise ValueError(f"radius r must be >= 1, got {r}")
    rows = torch.arange(framed.targets.numel())[rows]
    rank = framed.rank_in_doc[rows]
    stream_pos = rank[:, None] + 1 - r + torch.arange(r)[None, :]  # [m, r], may be <= 0
    index = (rows - rank)[:, None] + stream_pos - 1  # target index of stream position s >= 1
    ids = framed.targets[index.clamp(min=0)]
    ids = torch.where(stream_pos == 0, framed.targets.new_full((), framed.sod_id), ids)
    return torch.where(stream_pos < 0, framed.targets.new_full((), framed.pad_id), ids)


def next_target_context(generated: torch.Tensor, block_size: int, radius: int, sp: SpecialIds) -> dict:
    """Block and radial contexts of the next target of documents whose targets so far are
    ``generated [B, t]`` (for generation): the same contexts the data framing gives that target.

    The block is the current block (``<sod>`` or ``<frg>``, then this block's targets, padded
    from the target's position); the radius is the last r items of the stream ``<sod> generated...``,
    left-padded with ``<pad>``.
    """
    B, t = generated.shape
    b, r, dev = block_size, radius, generated.device
    start = (t // (b - 1)) * (b - 1)
    position = 1 + t % (b - 1)
    block = torch.full((B, b), sp.pad, dtype=torch.long, device=dev)
    block[:, 0] = sp.sod if start == 0 else sp.frg
    block[:, 1:position] = generated[:, start:t]
    stream = torch.cat([torch.full((B, r), sp.pad, dtype=torch.long, device=dev),
                        torch.full((B, 1), sp.sod, dtype=torch.long, device=dev), generated], 1)
    return {"block": block, "radial": stream[:, stream.shape[1] - r:],
            "position": torch.full((B,), position, dtype=torch.long, device=dev)}


# --- framings as objects: what the data module hands to a model family ---------------------

class CausalFraming:
    """Causal windows of ``context_length`` for the GPT baseline; batches are ``(x, y)``."""

    default_batch_size = 32  # windows (of context_length targets each)

    def __init__(self, context_length: int):
        if context_length < 1:
            raise ValueError(f"model.context_length={context_length} must be >= 1")
        self.context_length = context_length

    def dataset(self, ids: torch.Tensor, offsets: torch.Tensor, sp: SpecialIds):
        from torch.utils.data import TensorDataset

        return TensorDataset(*causal_windows(document_stream(ids, offsets, sp), self.context_length, sp))

    def model_kwargs(self, train, vocab_size: int, sp: SpecialIds) -> dict:
        return {}


class BlockTargets(torch.utils.data.Dataset):
    """Every target of a split with its block and radial contexts, gathered per batch.

    Items are target indices; ``collate(rows)`` returns ``(inputs, y)`` where inputs holds
    ``block [B, b]``, ``radial [B, r]``, ``position [B]`` (block position j of the target) and,
    with ``document_prefix``, ``prefix [B, L]`` / ``prefix_len [B]`` (the document's preceding
    targets) and ``document [B]`` (the document index, the document model's target).
    """

    def __init__(self, framed: Blocks, radius: int, document_prefix: bool):
        self.framed, self.radius, self.document_prefix = framed, radius, document_prefix
        n_blocks_of_doc = torch.diff(torch.cat([framed.first_block, torch.tensor([framed.blocks.shape[0]])]))
        doc_of_block = torch.repeat_interleave(torch.arange(framed.first_block.numel()), n_blocks_of_doc)
        self.document = doc_of_block[framed.block_index]
        self.rank_in_doc = framed.rank_in_doc
        self.doc_start = torch.arange(self.document.numel()) - self.rank_in_doc  # index of the doc's first target

    def __len__(self) -> int:
        return self.framed.targets.numel()

    def __getitem__(self, i: int) -> int:
        return i

    def eval_order(self) -> list[int]:
        """Targets ordered by block position, for evaluation: a batch then shares most of its
        padded block tail, which the model folds (perplexity does not depend on the order)."""
        return torch.argsort(self.framed.position, stable=True).tolist()

    def collate(self, rows) -> tuple[dict, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        inputs = {
            "block": block_context(self.framed, rows),
            "radial": radial_context(self.framed, self.radius, rows),
            "position": self.framed.position[rows],
        }
        if self.document_prefix:
            length = self.rank_in_doc[rows]
            cols = torch.arange(max(1, int(length.max())))
            idx = (self.doc_start[rows][:, None] + cols[None, :]).clamp(max=len(self) - 1)
            prefix = torch.where(cols[None, :] < length[:, None], self.framed.targets[idx], self.framed.pad_id)
            inputs.update(prefix=prefix, prefix_len=length, document=self.document[rows])
        return inputs, self.framed.targets[rows]


class BlockFraming:
    """Blocks of ``block_size`` and radii of ``radius`` (section 3) for SAFFU models."""

    default_batch_size = 1024  # targets

    def __init__(self, block_size: int, radius: int, document_prefix: bool = False):
        if block_size < 2 or radius < 1:
            raise ValueError(f"model.block_size={block_size} must be >= 2 and model.radius={radius} >= 1")
        self.block_size, self.radius, self.document_prefix = block_size, radius, document_prefix

    def dataset(self, ids: torch.Tensor, offsets: torch.Tensor, sp: SpecialIds) -> BlockTargets:
        return BlockTargets(frame_blocks(ids, offsets, self.block_size, sp), self.radius, self.document_prefix)

    def model_kwargs(self, train: BlockTargets, vocab_size: int, sp: SpecialIds) -> dict:
        """Facts of the training data that a SAFFU model is built from: the target counts
        f = sum_m Y[m] (section 2.5; they order the bit-cipher codes and drive their noise, so
        ``<pad>``, ``<sod>`` and ``<frg>``, never targets, have f = 0), the number of training
        documents, and the framing's special ids (for generation)."""
        counts = torch.bincount(train.framed.targets, minlength=vocab_size).double()
        return {"token_counts": counts, "n_documents": int(train.framed.first_block.numel()), "special_ids": sp}


_DATASET_TOKENS = itertools.count()


class ResidualWindows(torch.utils.data.Dataset):
    """Causal windows whose targets also carry their SAFFU contexts (``ResidualFraming``).

    Items are window indices. ``collate(rows)`` returns ``(inputs, y)``: ``inputs["ids"] [B, T]``
    the windows (as ``CausalFraming``), ``inputs["scored"] [B, T]`` whether a position's target is
    scored (``y != IGNORE_INDEX``), ``inputs["saffu"]`` the ``BlockTargets`` inputs of the scored
    targets in row-major order, ``inputs["rows"]`` their rows in ``per_target`` (with ``rows_of``,
    this dataset's identity, and ``n_rows``), and ``y [B, T]``.
    ``per_target`` is the ``BlockTargets`` of the same split (the explicit solver reads it).
    """

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, sp: SpecialIds, context_length: int,
                 per_target: BlockTargets):
        stream = document_stream(ids, offsets, sp)
        self.x, self.y = causal_windows(stream, context_length, sp)
        self.per_target = per_target
        self.token = next(_DATASET_TOKENS)  # this dataset's identity, unique in the process (rows_of)
        # stream position s holds BlockTargets row (number of non-<sod> ids in stream[1..s]) - 1;
        # window w, column t has target stream position w T + t + 1
        is_target = stream != sp.sod
        row_of_position = torch.cumsum(is_target.long(), 0) - 1
        position = torch.arange(self.x.numel()).view(self.x.shape) + 1
        rows = row_of_position[position.clamp(max=stream.numel() - 1)]
        self.rows = torch.where(self.y != IGNORE_INDEX, rows, torch.full_like(rows, -1))
        if not torch.equal(self.per_target.framed.targets[self.rows[self.rows >= 0]], self.y[self.y != IGNORE_INDEX]):
            raise AssertionError("ResidualWindows: windows and blocks disagree on the targets")  # a framing bug, not input

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, rows) -> tuple[dict, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        target_rows = self.rows[rows]
        scored = target_rows[target_rows >= 0]
        saffu, _ = self.per_target.collate(scored)
        # rows: the scored targets' rows in this split (a model may keep per-target scores by them)
        return {"ids": self.x[rows], "scored": target_rows >= 0, "saffu": saffu, "rows": scored,
                "rows_of": self.token, "n_rows": len(self.per_target)}, self.y[rows]


class ResidualFraming:
    """Causal windows of ``context_length`` with each target's blocks-and-radii contexts (the residual SAFFU)."""

    default_batch_size = 32  # windows

    def __init__(self, context_length: int, block_size: int, radius: int):
        self.causal, self.blocks = CausalFraming(context_length), BlockFraming(block_size, radius)  # they check the sizes

    def dataset(self, ids: torch.Tensor, offsets: torch.Tensor, sp: SpecialIds) -> ResidualWindows:
        return ResidualWindows(ids, offsets, sp, self.causal.context_length, self.blocks.dataset(ids, offsets, sp))

    def model_kwargs(self, train: ResidualWindows, vocab_size: int, sp: SpecialIds) -> dict:
        return self.blocks.model_kwargs(train.per_target, vocab_size, sp)
