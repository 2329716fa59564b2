"""Structured linear layers: parameter counts, equivalence to their merged dense matrix,
BlockDense with one block = LowRank, the shuffle is a permutation, and the FFN configs."""

from __future__ import annotations

import pytest
import torch

from conftest import fit_counting_sequence

from saffu_lab.models.ffn import StructuredFFN
from saffu_lab.models.gpt import GPT
from saffu_lab.models.structured import BlockDense, BlockShuffle, LowRank, structured_linear


def test_parameter_counts_match_the_formulas():
    i, o, r, n = 64, 96, 16, 4
    assert LowRank(i, o, r).num_parameters() == r * (i + o) + o
    assert BlockDense(i, o, r, n).num_parameters() == r * i // n + r * o + o
    assert BlockShuffle(i, o, 32, n).num_parameters() == 32 * (i + o) // n + o
    assert LowRank(i, o, r, bias=False).num_parameters() == r * (i + o)


@pytest.mark.parametrize("layer", [LowRank(24, 40, 8), BlockDense(24, 40, 8, 4), BlockShuffle(24, 40, 16, 4),
                                   BlockShuffle(24, 40, 16, 2, bias=False)])
def test_each_layer_equals_a_dense_layer_with_its_merged_matrix(layer):
    x = torch.randn(5, 7, 24)
    W = layer.merged_weight()
    dense = torch.nn.functional.linear(x, W, layer.bias)
    assert W.shape == (40, 24)
    assert torch.allclose(layer(x), dense, atol=1e-5)
    rank = torch.linalg.matrix_rank(W)
    if isinstance(layer, (LowRank, BlockDense)):
        assert rank <= layer.rank


def test_blockdense_with_one_block_is_lowrank():
    bd = BlockDense(16, 24, 6, 1)
    lr = LowRank(16, 24, 6)
    with torch.no_grad():
        lr.V.copy_(bd.blocks[0])
        lr.U.copy_(bd.dense)
        lr.bias.copy_(bd.bias)
    x = torch.randn(9, 16)
    assert torch.allclose(bd(x), lr(x), atol=1e-6)


def test_shuffle_is_a_true_permutation_that_mixes_blocks():
    layer = BlockShuffle(9, 6, 12, 3)
    h = torch.arange(12.0)
    out = layer.shuffle(h)
    assert sorted(out.tolist()) == h.tolist()  # a permutation
    # every block of the output holds one unit from every input block
    src_block = (out // 4).long().view(3, 4)
    for block in src_block:
        assert set(block.tolist()) == {0, 1, 2}


def test_lowrank_init_is_the_truncated_svd_of_a_dense_init():
    torch.manual_seed(0)
    full = LowRank(20, 20, 20).merged_weight()
    torch.manual_seed(0)
    half = LowRank(20, 20, 10).merged_weight()
    s_full = torch.linalg.svdvals(full)
    assert torch.allclose(torch.linalg.svdvals(half)[:10], s_full[:10], atol=1e-5)


@pytest.mark.parametrize("structure", ["lowrank", "blockdense", "blockshuffle"])
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_param_ratio_gives_at_most_that_fraction(structure, ratio):
    layer = structured_linear(structure, 128, 512, param_ratio=ratio, bias=False)
    fraction = layer.num_parameters() / (128 * 512)
    assert ratio * 0.8 < fraction <= ratio


def test_bad_structure_settings_are_rejected():
    with pytest.raises(ValueError, match="exactly one"):
        structured_linear("lowrank", 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        BlockDense(10, 8, 4, 4)
    with pytest.raises(ValueError, match="param_ratio"):
        structured_linear("lowrank", 8, 8, param_ratio=1.5)
    with pytest.raises(ValueError, match="not one of"):
        structured_linear("sparse", 8, 8, rank=2)


@pytest.mark.parametrize("structure", ["lowrank", "blockdense", "blockshuffle"])
def test_gpt_with_structured_ffn_has_fewer_parameters_and_learns(structure):
    torch.manual_seed(0)
    dense = GPT(vocab_size=20, context_length=16, n_layer=1, n_head=2, d_model=32, dropout=0.0)
    net = GPT(vocab_size=20, context_length=16, n_layer=1, n_head=2, d_model=32, dropout=0.0,
              ffn=lambda d: StructuredFFN(d, structure, param_ratio=0.25))
    ffn_params = lambda m: sum(p.numel() for p in m.blocks[0].ffn.parameters())  # noqa: E731
    assert ffn_params(net) < 0.35 * ffn_params(dense)
    assert fit_counting_sequence(net) < 0.1


@pytest.mark.parametrize("structure", ["lowrank", "blockdense", "blockshuffle"])
def test_premerge_below_the_batch_threshold_equals_the_structured_path(structure):
    layer = structured_linear(structure, 32, 64, param_ratio=0.5, premerge_below=8).eval()
    small, large = torch.randn(2, 5, 32), torch.randn(64, 5, 32)
    merged = torch.nn.functional.linear(small, layer.merged_weight(), layer.bias)
    assert torch.equal(layer(small), merged)  # batch 2 < 8: the pre-merged dense matrix
    assert torch.allclose(layer(small), layer.structured(small) + layer.bias, atol=1e-5)
    assert torch.equal(layer(large), layer.structured(large) + layer.bias)  # batch 64: structured
    layer.train()
    assert torch.equal(layer(small), layer.structured(small) + layer.bias)  # never while training
    # the cache follows the weights: an in-place update is seen at the next call
    layer.eval()
    with torch.no_grad():
        next(layer.parameters()).mul_(2.0)
    assert torch.allclose(layer(small), layer.structured(small) + layer.bias, atol=1e-5)


def test_self_guided_schedule_and_guides_leave_model_and_optimizer():
    import math
    import types

    from saffu_lab.callbacks import SelfGuidedTraining

    cb = SelfGuidedTraining(fraction=0.5)
    assert cb.alpha(0, 100) == 1.0 and cb.alpha(50, 100) == 0.0 and cb.alpha(80, 100) == 0.0
    assert cb.alpha(25, 100) == pytest.approx(0.5)  # cosine: half way down at a quarter of the steps
    assert cb.alpha(10, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 50)))
    values = [cb.alpha(s, 100) for s in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone

    torch.manual_seed(0)
    net = GPT(vocab_size=20, context_length=8, n_layer=1, n_head=2, d_model=16,
              ffn=lambda d: StructuredFFN(d, "lowrank", param_ratio=0.5))
    plain_params = sum(p.numel() for p in net.parameters())
    cb.setup(None, net, "fit")
    guides = [p for layer in cb.layers for p in layer.guide.parameters()]
    assert len(cb.layers) == 2 and sum(p.numel() for p in net.parameters()) > plain_params
    x = torch.randint(0, 20, (2, 8))
    layer = cb.layers[0]
    h = torch.randn(3, 16)
    assert torch.allclose(layer(h), layer.guide(h))  # alpha = 1: the dense guide alone
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(x).sum().backward()
    opt.step()
    trainer = types.SimpleNamespace(optimizers=[opt], global_step=50)
    cb._drop_guides(trainer)
    ids = {id(p) for p in guides}
    assert all(layer.guide is None for layer in cb.layers)
    assert sum(p.numel() for p in net.parameters()) == plain_params
    assert not any(id(p) in ids for g in opt.param_groups for p in g["params"])
    assert not any(id(p) in ids for p in opt.state)


# --- projecting a dense matrix onto a structure (for explicit SAFFU solutions) ----------------

PROJECTIONS = [("lowrank", {"rank": 6}), ("blockdense", {"rank": 8, "nblocks": 4}),
               ("blockshuffle", {"rank": 8, "nblocks": 2}),
               ("blockshuffle", {"rank": 12, "nblocks": 4})]  # 3 mid units per block: an uneven shuffle


@pytest.mark.parametrize("structure,kw", PROJECTIONS)
def test_load_dense_is_the_least_squares_projection(structure, kw):
    torch.manual_seed(0)
    layer = structured_linear(structure, 16, 24, bias=False, **kw)
    # a matrix that already has the structure is reproduced exactly
    target = structured_linear(structure, 16, 24, bias=False, **kw).merged_weight()
    layer.load_dense(target)
    assert torch.allclose(layer.merged_weight(), target, atol=1e-5)
    # a dense matrix: no gradient-descent fit of the factors gets closer than the projection
    dense = torch.randn(24, 16)
    layer.load_dense(dense)
    projected = float((layer.merged_weight() - dense).norm())
    fitted = structured_linear(structure, 16, 24, bias=False, **kw)
    opt = torch.optim.Adam(fitted.parameters(), lr=1e-2)
    for _ in range(1500):
        opt.zero_grad()
        loss = (fitted.structured(torch.eye(16)).T - dense).pow(2).sum()
        loss.backward()
        opt.step()
    fitted_error = float(loss.detach().sqrt())
    assert projected <= fitted_error + 1e-4, (projected, fitted_error)
    assert projected < 0.95 * float(dense.norm())  # and it is not trivially zero
    if structure == "lowrank":  # Eckart-Young: the error is the tail of the singular values
        tail = torch.linalg.svdvals(dense)[kw["rank"]:]
        assert projected == pytest.approx(float(tail.norm()), rel=1e-4)


def test_load_dense_gives_an_attached_guide_the_dense_matrix_itself():
    layer = structured_linear("lowrank", 16, 24, rank=4, bias=True)
    layer.attach_guide()
    dense = torch.randn(24, 16)
    layer.load_dense(dense)
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), x @ dense.T, atol=1e-5)  # alpha = 1: the guide, bias zeroed
    with pytest.raises(ValueError, match="expected"):
        layer.load_dense(dense.T)
