"""The GPT baseline and the callbacks, without a Trainer."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import fit_counting_sequence

from saffu_lab.callbacks import PerplexityRiseStopping
from saffu_lab.errors import ConfigError
from saffu_lab.models.gpt import GPT


def test_gpt_is_causal():
    torch.manual_seed(0)
    net = GPT(vocab_size=50, context_length=12, n_layer=2, n_head=2, d_model=16, dropout=0.0).eval()
    x = torch.randint(0, 50, (3, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 50, (3, 5))  # change the future only
    assert torch.allclose(net(x)[:, :7], net(y)[:, :7], atol=1e-6)
    assert not torch.allclose(net(x)[:, 7:], net(y)[:, 7:])


def test_gpt_learns_a_deterministic_sequence():
    torch.manual_seed(0)
    net = GPT(vocab_size=20, context_length=16, n_layer=1, n_head=2, d_model=32, dropout=0.0)
    assert fit_counting_sequence(net) < 0.05  # uniform would be log(20) = 3.0


def test_generate_stops_and_respects_bans():
    torch.manual_seed(0)
    net = GPT(vocab_size=30, context_length=8, n_layer=1, n_head=1, d_model=8).eval()
    g = torch.Generator().manual_seed(0)
    out = net.generate(torch.ones(4, 1, dtype=torch.long), max_new_tokens=20, stop_id=2, generator=g, banned_ids=(0, 1, 3))
    assert out.shape[0] == 4 and out.shape[1] <= 21
    assert not torch.isin(out[:, 1:], torch.tensor([0, 1, 3])).any()
    for row in out.tolist():  # after a stop id only stop ids follow
        if 2 in row:
            assert set(row[row.index(2):]) == {2}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = net.generate(torch.ones(2, 1, dtype=torch.long), 10, generator=g1)
    assert torch.equal(a, net.generate(torch.ones(2, 1, dtype=torch.long), 10, generator=g2))


@pytest.mark.parametrize("kwargs,match", [({"d_model": 10, "n_head": 3}, "divisible"), ({"dropout": 1.0}, "dropout"),
                                          ({"n_layer": 0}, "n_layer")])
def test_gpt_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT(vocab_size=10, **kwargs)


def _fake_trainer(value):
    return types.SimpleNamespace(sanity_checking=False, callback_metrics={"val/ppl": torch.tensor(value)},
                                 should_stop=False, global_step=0)


@pytest.mark.parametrize("reset_on_best,values,stop_index", [
    (True, [10, 11, 12, 9, 10, 11, 12], 6),    # rises since the best: 10->11->12 | best 9, then 3 rises
    (False, [10, 11, 12, 9, 10, 11, 12], 4),   # every rise counts: the 3rd rise is at index 4
    (True, [10, 9, 8, 7, 6, 5], None),         # never rises
])
def test_rise_stopping_counts_rises(reset_on_best, values, stop_index):
    cb = PerplexityRiseStopping(max_rises=3, reset_on_best=reset_on_best)
    stopped = None
    for i, v in enumerate(values):
        trainer = _fake_trainer(v)
        cb.on_validation_end(trainer, None)
        if trainer.should_stop and stopped is None:
            stopped = i
    assert stopped == stop_index
    restored = PerplexityRiseStopping(max_rises=3)
    restored.load_state_dict(cb.state_dict())
    assert restored.state_dict() == cb.state_dict()


def test_rise_stopping_rejects_zero():
    with pytest.raises(ConfigError, match="max_rises"):
        PerplexityRiseStopping(max_rises=0)
