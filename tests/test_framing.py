"""Framing: a worked example, and the proof that no context holds its target or anything after."""

from __future__ import annotations

import torch

from saffu_lab.framing import (IGNORE_INDEX, SpecialIds, block_context, causal_windows, document_stream,
                               first_n_tokens, frame_blocks, radial_context)

SP = SpecialIds(pad=0, sod=1, eod=2, frg=3)
P, S, E, F = 0, 1, 2, 3
# two documents: [10 11 12 13 14] and [20 21]
IDS = torch.tensor([10, 11, 12, 13, 14, 20, 21])
OFFSETS = torch.tensor([0, 5, 7])


def test_document_stream():
    assert document_stream(IDS, OFFSETS, SP).tolist() == [S, 10, 11, 12, 13, 14, E, S, 20, 21, E]


def test_blocks_worked_example():
    framed = frame_blocks(IDS, OFFSETS, b=4, sp=SP)
    # targets of doc 1: 10 11 12 13 14 <eod> -> slices of b-1 = 3; doc 2: 20 21 <eod>
    assert framed.blocks.tolist() == [
        [S, 10, 11, 12],
        [F, 13, 14, E],
        [S, 20, 21, E],
    ]
    assert framed.targets.tolist() == [10, 11, 12, 13, 14, E, 20, 21, E]
    # block context of target 14 (block 1, position 2): positions >= 2 padded
    assert block_context(framed)[4].tolist() == [F, 13, P, P]
    # radial contexts with r = 2: the 2 items before the target in its document's stream
    # <sod> 10 11 12 13 14 <eod>, left-padded with <pad> only before the document's start
    radial = radial_context(framed, r=2)
    assert radial[0].tolist() == [P, S]      # target 10: <sod> and one pad before it
    assert radial[2].tolist() == [10, 11]    # target 12 at position 3
    assert radial[3].tolist() == [11, 12]    # target 13 opens the fragment block: the radius crosses it
    assert radial[8].tolist() == [20, 21]    # <eod> of doc 2
    # r = 6 > b = 4: the whole stream so far, never <frg>, never the previous document
    radial = radial_context(framed, r=6)
    assert radial[5].tolist() == [S, 10, 11, 12, 13, 14]  # <eod> of doc 1 (block 1, position 3)
    assert radial[4].tolist() == [P, S, 10, 11, 12, 13]   # target 14
    assert radial[6].tolist() == [P, P, P, P, P, S]       # target 20 opens doc 2: nothing of doc 1
    # any subset of rows gives the same rows
    rows = torch.tensor([8, 3, 0])
    assert torch.equal(radial_context(framed, 6, rows), radial[rows])


def test_last_block_is_right_padded():
    framed = frame_blocks(torch.tensor([7, 8]), torch.tensor([0, 2]), b=5, sp=SP)
    assert framed.blocks.tolist() == [[S, 7, 8, E, P]]


def test_no_context_holds_its_target_or_anything_after():
    torch.manual_seed(0)
    lengths = torch.randint(0, 20, (30,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.arange(100, 100 + int(lengths.sum()))  # distinct ids: a token's id is its position
    for b in (2, 3, 5, 8):
        framed = frame_blocks(ids, offsets, b=b, sp=SP)
        blocks = block_context(framed)
        for r in (1, 2, 4, 9):
            radial = radial_context(framed, r)
            for m in range(framed.targets.numel()):
                target = int(framed.targets[m])
                later = target if target >= 100 else None  # <eod> has no later token in its document
                for ctx in (blocks[m], radial[m]):
                    real = ctx[ctx >= 100]
                    # every real token of the context comes strictly before the target
                    if later is not None:
                        assert bool((real < later).all()), (b, r, m, ctx.tolist(), target)
                    # and the context never holds the target itself (<eod> included)
                    assert target not in ctx.tolist() or target in (P, S, F)
        # every target appears exactly once and in order
        assert framed.targets[framed.targets >= 100].tolist() == ids.tolist()


def test_causal_windows_never_see_the_future():
    stream = document_stream(IDS, OFFSETS, SP)
    x, y = causal_windows(stream, context=4, sp=SP)
    assert x.tolist() == [[S, 10, 11, 12], [13, 14, E, S], [20, 21, E, P]]
    assert y.tolist() == [[10, 11, 12, 13], [14, E, IGNORE_INDEX, 20], [21, E, IGNORE_INDEX, IGNORE_INDEX]]
    positions = torch.arange(stream.numel())
    px, py = causal_windows(positions, context=4, sp=SpecialIds(pad=-1, sod=-2, eod=-3, frg=-4))
    # under a causal mask, target y[w, t] sees x[w, :t+1]: all of it strictly earlier in the stream
    for w in range(px.shape[0]):
        for t in range(px.shape[1]):
            if py[w, t] >= 0:
                seen = px[w, : t + 1]
                assert bool((seen[seen >= 0] < py[w, t]).all())
    # every stream position after the first is a target exactly once
    assert sorted(py[py >= 0].tolist()) == list(range(1, stream.numel()))


def test_first_n_tokens_keeps_whole_documents():
    ids, offsets, cut = first_n_tokens(IDS, OFFSETS, 7)  # doc 1 has 6 targets, doc 2 has 3
    assert offsets.tolist() == [0, 5] and ids.tolist() == [10, 11, 12, 13, 14] and cut is None
    ids, offsets, cut = first_n_tokens(IDS, OFFSETS, 9)
    assert offsets.tolist() == [0, 5, 7] and cut is None
    ids, offsets, cut = first_n_tokens(IDS, OFFSETS, 1)  # a first document longer than the limit is cut
    assert offsets.tolist() == [0, 0] and ids.tolist() == [] and cut == 6
