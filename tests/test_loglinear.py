"""The log-linear SAFFU and its explicit solution: the radial decoders are exactly Kneser-Ney,
the final layer is the held-out optimum, and the solved model beats the references it should
beat on held-out synthetic text."""

from __future__ import annotations

import math

import pytest
import torch

from saffu_lab.data.corpus import SyntheticCorpus
from saffu_lab.data.datamodule import LMDataModule
from saffu_lab.framing import BlockFraming
from saffu_lab.models.loglinear import LogLinearSAFFU
from saffu_lab.ngram import KneserNey, targets_and_histories
from saffu_lab.solver_loglinear import LogLinearSolver, token_at_distance
from saffu_lab.tokenizer import CountBPE


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    dm = LMDataModule(corpus=SyntheticCorpus(seed=0, train_words=20_000, dev_words=3000, test_words=3000),
                      tokenizer=CountBPE(progress=False), cache_dir=str(tmp_path_factory.getbasetemp() / "ll-cache"),
                      framing=BlockFraming(16, 4))
    dm.setup()
    return dm


def build(dm, **kw):
    args = {"block_size": dm.framing.block_size, "radius": dm.framing.radius, "block_dim": 32, **kw}
    return LogLinearSAFFU(**dm.model_kwargs(), **args)


def solve(dm, net, **kw):
    return LogLinearSolver(progress=False, **kw).solve(net, dm.datasets["train"])


@torch.no_grad()
def nll(net, dm, split="dev"):
    ds = dm.datasets[split]
    inputs, y = ds.collate(torch.arange(len(ds)))
    return float(torch.nn.functional.cross_entropy(net(inputs), y))


def test_token_at_distance_is_the_radial_context(synthetic):
    ds = synthetic.datasets["train"]
    rows = torch.arange(0, len(ds), 7)
    inputs, _ = ds.collate(rows)
    for k in range(1, 5):
        assert torch.equal(token_at_distance(ds.framed, rows, k), inputs["radial"][:, 4 - k])


def test_radial_decoder_at_distance_one_is_the_kneser_ney_bigram(synthetic):
    """r = 1, no block unit, weights (1, 1): the model's distribution is the KN bigram's, exactly."""
    dm = synthetic
    net = build(dm, radius=1, block_unit=False)
    LogLinearSolver(progress=False).solve_units(net, dm.datasets["train"], torch.arange(len(dm.datasets["train"])),
                                                report=type("R", (), {"values": {}})())
    with torch.no_grad():
        net.mix.copy_(torch.tensor([1.0, 1.0]))
    kn = KneserNey(2, dm.vocab_size, dm.special_ids).fit(*targets_and_histories(*dm.splits["train"], dm.special_ids, 1))
    y, h = targets_and_histories(*dm.splits["dev"], dm.special_ids, 1)
    ds = dm.datasets["dev"]
    inputs, targets = ds.collate(torch.arange(len(ds)))
    inputs["radial"] = inputs["radial"][:, -1:]  # the data is framed with r = 4: the nearest item
    assert torch.equal(targets, y)  # the same targets, in the same order
    with torch.no_grad():
        model_lp = torch.log_softmax(net(inputs).double(), -1)
    words = torch.arange(dm.vocab_size)
    for i in range(0, len(ds), 97):  # whole distributions, not only the targets
        kn_lp = kn.log_prob(words, h[i].expand(dm.vocab_size, 1))
        support = torch.isfinite(kn_lp)
        assert torch.allclose(model_lp[i][support], kn_lp[support], atol=1e-5)
        assert bool((model_lp[i][~support] < -1e3).all())


def test_solved_model_beats_the_references_on_held_out_text(synthetic):
    dm = synthetic
    net = build(dm)
    report = solve(dm, net)
    ppl = math.exp(nll(net, dm))
    kn2 = dm.kneser_ney_perplexity(2, "train", "dev")
    kn3 = dm.kneser_ney_perplexity(3, "train", "dev")
    unigram = dm.unigram_perplexity("train", "dev")
    print(f"log-linear SAFFU {ppl:.2f}  KN bigram {kn2:.2f}  KN trigram {kn3:.2f}  unigram {unigram:.2f}")
    assert ppl < 0.95 * kn2 and ppl < kn3 and ppl < 0.3 * unigram
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert report.values["heldout_ppl"] > 1 and report.values["radial_pairs"] == net.radial_values.numel()


def test_low_rank_block_decoder_is_the_truncated_svd_and_still_beats_the_references(synthetic):
    """model.block_rank k: the stored A_b B_b is the best rank-k approximation of the solved U_b
    (Frobenius error = the dropped singular values, Eckart-Young; exact at full rank), the forward
    reads it, and the solved model still beats the Kneser-Ney references on held-out text."""
    dm = synthetic
    dense = build(dm)
    solve(dm, dense)
    U = dense.block_U.detach().double()
    nets = {}
    for k, decoder in ((4, U), (32, U), (3, U[:, :20])):  # D_b 32 < N (full rank at 32), and a tall matrix
        net = build(dm, block_rank=k)
        if decoder.shape != U.shape:
            net.block_B = torch.nn.Parameter(torch.zeros(k, decoder.shape[1]))
        net.set_block_decoder(decoder)
        approx = (net.block_A @ net.block_B).detach().double()
        dropped = torch.linalg.svdvals(decoder)[k:].square().sum().sqrt()
        assert float(torch.linalg.norm(decoder - approx)) == pytest.approx(float(dropped), rel=1e-4, abs=1e-4)
        assert torch.allclose(net.block_A.norm(dim=0), net.block_B.norm(dim=1), rtol=1e-4)  # balanced factors
        nets[k] = net
    inputs, _ = dm.datasets["dev"].collate(torch.arange(200))
    with torch.no_grad():
        assert torch.allclose(nets[32].block_logits(inputs["block"], inputs["position"]).double(),
                              dense.block_features(inputs["block"], inputs["position"]).double() @ U, atol=1e-3)
    low = build(dm, block_rank=8)
    solve(dm, low)
    ppl = math.exp(nll(low, dm))
    kn3 = dm.kneser_ney_perplexity(3, "train", "dev")
    print(f"rank-8 block decoder {ppl:.2f}  dense {math.exp(nll(dense, dm)):.2f}  KN trigram {kn3:.2f}")
    assert ppl < kn3 and not hasattr(low, "block_U")
    assert all(torch.isfinite(p).all() for p in low.parameters())


def test_final_layer_is_the_held_out_optimum(synthetic):
    """Newton's lam is a minimum of the held-out loss: zero gradient, and any nudge is worse."""
    dm = synthetic
    net = build(dm)
    solver = LogLinearSolver(progress=False, calibration_targets=2000)
    data = dm.datasets["train"]
    fit, held = solver.split(data)
    assert not set(data.document[fit].tolist()) & set(data.document[held].tolist())  # whole documents held out
    with torch.no_grad():
        solver.solve_units(net, data, fit, report=type("R", (), {"values": {}})())
        lam, ppl = solver.calibrate(net, data, held)
        batches = list(solver._batches(data, held[torch.linspace(0, held.numel() - 1, 2000).round().long().unique()], ""))
        loss, grad, _ = solver._newton_terms(net, batches, lam)
        assert math.exp(loss) == pytest.approx(ppl, rel=1e-9)
        assert float(grad.abs().max()) < 1e-3
        start = torch.zeros_like(lam)
        start[0], start[-1] = 1.0, 1.0
        assert loss < solver._newton_terms(net, batches, start)[0]  # better than the bigram start
        for e in range(lam.numel()):
            for delta in (-0.05, 0.05):
                nudged = lam.clone()
                nudged[e] += delta
                assert solver._newton_terms(net, batches, nudged)[0] > loss


def test_forward_is_the_weighted_sum_of_the_experts(synthetic):
    dm = synthetic
    net = build(dm)
    solve(dm, net)
    inputs, _ = dm.datasets["dev"].collate(torch.arange(300))
    with torch.no_grad():
        experts = net.expert_logits(inputs)
        mixed = torch.einsum("ben,e->bn", experts, net.mix).masked_fill(net.never_target, 0)
        direct = net(inputs).masked_fill(net.never_target, 0)
    assert experts.shape == (300, net.n_experts, dm.vocab_size)
    assert torch.allclose(mixed, direct, atol=1e-4)


def test_checkpoint_round_trip_and_gradients(synthetic, tmp_path):
    """The sparse decoders' size comes from the data: a fresh model loads it from a state dict;
    every part of the solved model takes gradients (a warm start can fine-tune it)."""
    dm = synthetic
    net = build(dm)
    solve(dm, net)
    torch.save(net.state_dict(), tmp_path / "ll.pt")
    fresh = build(dm)
    fresh.load_state_dict(torch.load(tmp_path / "ll.pt"))
    inputs, y = dm.datasets["dev"].collate(torch.arange(200))
    assert torch.equal(fresh(inputs), net(inputs))
    loss = torch.nn.functional.cross_entropy(fresh(inputs), y)
    loss.backward()
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_generation_frames_like_the_data(synthetic):
    dm = synthetic
    net = build(dm)
    solve(dm, net)
    ds = dm.datasets["train"]
    rows = torch.nonzero(ds.document == 2).squeeze(1)
    doc_targets = ds.framed.targets[rows]
    for t in range(doc_targets.numel()):
        expected, _ = ds.collate(rows[t:t + 1])
        got = net.frame_next(doc_targets[None, :t])
        for key in ("block", "radial", "position"):
            assert torch.equal(got[key], expected[key]), (t, key)
    sp = dm.special_ids
    out = net.generate(torch.full((3, 1), sp.sod), 20, stop_id=sp.eod, generator=torch.Generator().manual_seed(0),
                       banned_ids=(sp.pad, sp.sod, sp.frg))
    assert out.shape[0] == 3 and not torch.isin(out[:, 1:], torch.tensor([sp.pad, sp.sod, sp.frg])).any()


@pytest.mark.parametrize("kwargs,match", [
    ({"block_aggregation": "cat"}, "aggregates block sum"),
    ({"decoder_structure": "lowrank"}, "no structured decoders"),
    ({"radius": 0}, "radius=0"),
    ({"block_rank": 33}, "block_rank=33"), ({"block_rank": -1}, "block_rank=-1"),
])
def test_model_refuses_what_it_cannot_be(synthetic, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(synthetic, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"heldout_every": 1}, "heldout_every"), ({"radial_smoothing": "witten_bell"}, "radial_smoothing"),
    ({"block_smoothing": 0.0}, "block_smoothing"), ({"calibration_targets": 0}, "calibration_targets"),
])
def test_solver_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogLinearSolver(**kwargs)


def test_block_sums_through_the_code_bits_equal_the_dense_sums(synthetic, monkeypatch):
    """The solver sums h_B through E = q Z~ + (1 - q) p (a few bits per code): the same sums as the
    dense block features; an embedding that has changed (trained) takes the dense path."""
    dm = synthetic
    net = build(dm, block_dim=16)  # 16 bits: codes of 1 to 3 bits for this vocabulary
    solver = LogLinearSolver(progress=False, batch_size=300)
    data = dm.datasets["train"]
    parts = (torch.arange(0, len(data), 2), torch.arange(1, len(data), 2))
    assert net.block_embedding.noise_form() is not None
    assert int((net.block_embedding.noise_form()[0] > 0).sum(1).max()) > 1
    fast = solver.block_sums(net, data, *parts)
    monkeypatch.setattr(net.block_embedding, "noise_form", lambda: None)
    dense = solver.block_sums(net, data, *parts)
    assert torch.allclose(fast, dense, rtol=1e-6, atol=1e-9)
    monkeypatch.undo()
    with torch.no_grad():
        net.block_embedding.weight[5] += 1e-3
    assert net.block_embedding.noise_form() is None


def test_callback_refuses_to_train_under_ddp(synthetic):
    """DDP registers the parameters before the solve sizes the sparse decoders: a warm or cold run
    of this model under several processes stops with the fix; regime=explicit is allowed."""
    from types import SimpleNamespace

    from saffu_lab.callbacks import ExplicitSolveCallback
    from saffu_lab.errors import ConfigError

    callback = ExplicitSolveCallback(LogLinearSolver(progress=False))
    module = SimpleNamespace(net=build(synthetic), regime="warm")
    with pytest.raises(ConfigError, match="cannot train under DDP.*regime=explicit"):
        callback.on_fit_start(SimpleNamespace(world_size=2, ckpt_path=None), module)


def test_training_logits_score_targets_leave_one_out(synthetic):
    """training_logits adds lam_k delta_k(x_k, y) to the target's logit and nothing elsewhere, with
    delta from a Kneser-Ney bigram per distance fitted on the same training targets."""
    dm = synthetic
    net = build(dm)
    solve(dm, net)
    data = dm.datasets["train"]
    rows = torch.arange(0, len(data), 7)
    inputs, y = data.collate(rows)
    with torch.no_grad():
        diff = net.training_logits(inputs, y) - net(inputs)
    want = torch.zeros(rows.numel(), dtype=torch.float64)
    sp = dm.special_ids
    all_rows = torch.arange(len(data))
    for k in range(1, net.radius + 1):
        kn = KneserNey(2, dm.vocab_size, sp).fit(data.framed.targets[all_rows], token_at_distance(data.framed, all_rows, k)[:, None])
        loo = kn.bigram_leave_one_out()
        key = token_at_distance(data.framed, rows, k) * dm.vocab_size + y
        want += float(net.mix[k - 1].detach()) * loo[torch.searchsorted(kn.orders[1].gram_keys, key)]
    assert torch.allclose(diff.gather(1, y[:, None]).squeeze(1).double(), want, atol=1e-4)
    diff.scatter_(1, y[:, None], 0.0)
    assert diff.abs().max() == 0  # other columns untouched
    assert want.mean() < 0


def test_block_leave_one_out_is_a_recount(synthetic):
    """The block unit's offset equals solving its decoder again without the target's own h_B
    (U_b recomputed from the sums less h_B, the eq. of solve_block), relative to another column;
    it is large for a target id seen once and small for a frequent one."""
    dm = synthetic
    net, solver = build(dm), LogLinearSolver(progress=False, block_leave_one_out=True)
    solver.solve(net, dm.datasets["train"])
    data = dm.datasets["train"]
    everything = torch.arange(len(data))
    S = solver.block_sums(net, data, everything, everything[:0])[0]  # [N, D_b]: sum of h_B per target id
    y_all = data.framed.targets
    counts = torch.bincount(y_all, minlength=dm.vocab_size).double() + 1.0
    counts[net.never_target] = 0.0
    prior, beta = counts / counts.sum(), solver.block_smoothing

    def decoder(S):  # solve_block by hand
        F, row = S.T, S.T.sum(1, keepdim=True)
        return torch.log((F + beta * prior[None, :] * row) / ((1 + beta) * row)) - torch.log(prior.clamp(min=1e-300))[None, :]

    U = decoder(S)
    seen = torch.bincount(y_all, minlength=dm.vocab_size)
    once = torch.nonzero(seen[y_all] == 1).squeeze(1)[:3]
    frequent = torch.nonzero(y_all == int(seen.argmax())).squeeze(1)[:3]
    rows = torch.cat([once, frequent])
    inputs, y = data.collate(rows)
    with torch.no_grad():
        x = net.block_features(inputs["block"], inputs["position"])
        got = net.block_leave_one_out(x, y).double()
        x = x.double()
    other = int(torch.bincount(y_all, minlength=dm.vocab_size).argsort()[-2])  # a frequent column, not a target here
    for i in range(rows.numel()):
        less = S.clone()
        less[y[i]] -= x[i]
        change = x[i] @ (decoder(less) - U)
        assert float(got[i]) == pytest.approx(float(change[y[i]] - change[other]), abs=2e-3), i
    assert (got[:once.numel()] < -0.1).all() and (got[once.numel():].abs() < 0.01).all(), got


def test_warm_start_on_training_text_improves_dev_only_leave_one_out(synthetic):
    """Adam on the training targets from the solved model: with leave-one-out scores dev gets
    better; with the plain forward (counts that include each target) it gets worse."""
    dm = synthetic
    data = dm.datasets["train"]
    solved = build(dm)
    solve(dm, solved)
    start = nll(solved, dm)
    result = {}
    for name in ("loo", "plain"):
        net = build(dm)
        net.load_state_dict(solved.state_dict())
        opt = torch.optim.Adam([p for n, p in net.named_parameters() if "embedding" not in n], lr=3e-3)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        for step in range(30):
            inputs, y = data.collate(order[step * 256:(step + 1) * 256])
            logits = net.training_logits(inputs, y) if name == "loo" else net(inputs)
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        result[name] = nll(net, dm)
    print(f"dev nll: solved {start:.4f}  warm leave-one-out {result['loo']:.4f}  warm plain {result['plain']:.4f}")
    assert result["loo"] < start < result["plain"]
