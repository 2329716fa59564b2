"""The residual SAFFU: its framing gives both parts the same targets, the network starts as the
solved SAFFU (exactly), backprop on the transformer goes below the solution on held-out text,
and a whole warm run does so beside its references."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY_DATA, read_metrics, run_train
from saffu_lab.data.corpus import SyntheticCorpus
from saffu_lab.data.datamodule import LMDataModule
from saffu_lab.framing import IGNORE_INDEX, ResidualFraming
from saffu_lab.generate import main as generate_main
from saffu_lab.models.gpt import GPT
from saffu_lab.models.loglinear import LogLinearSAFFU
from saffu_lab.models.residual import ResidualSAFFU
from saffu_lab.solver_loglinear import LogLinearSolver
from saffu_lab.tokenizer import CountBPE


@pytest.fixture(scope="module")
def dm(tmp_path_factory):
    dm = LMDataModule(corpus=SyntheticCorpus(seed=0, train_words=20_000, dev_words=3000, test_words=3000),
                      tokenizer=CountBPE(progress=False), cache_dir=str(tmp_path_factory.getbasetemp() / "res-cache"),
                      framing=ResidualFraming(context_length=24, block_size=16, radius=4), batch_size=16)
    dm.setup()
    return dm


def build(dm, seed: int = 0, **kw) -> ResidualSAFFU:
    torch.manual_seed(seed)
    saffu = lambda **kw: LogLinearSAFFU(block_size=16, radius=4, block_dim=32, **kw)  # noqa: E731
    transformer = lambda **kw: GPT(context_length=24, n_layer=1, n_head=2, d_model=32, dropout=0.0, **kw)  # noqa: E731
    return ResidualSAFFU(**dm.model_kwargs(), saffu=saffu, transformer=transformer, **kw)


@pytest.fixture(scope="module")
def solved(dm):
    net = build(dm)
    LogLinearSolver(progress=False).solve(net.saffu, dm.datasets["train"].per_target)
    return net


@torch.no_grad()
def perplexity(net, batches) -> float:
    net.eval()
    total, count = 0.0, 0
    for inputs, y in batches:
        logits = net(inputs)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        count += int((y != IGNORE_INDEX).sum())
    return math.exp(total / count)


def windows(dm, split: str, batch: int = 64):
    data = dm.datasets[split]
    return (data.collate(range(s, min(s + batch, len(data)))) for s in range(0, len(data), batch))


def per_target(dm, split: str, batch: int = 1024):
    data = dm.datasets[split].per_target
    return (data.collate(range(s, min(s + batch, len(data)))) for s in range(0, len(data), batch))


def test_windows_give_both_parts_the_same_targets(dm):
    data = dm.datasets["dev"]
    inputs, y = data.collate(range(len(data)))
    scored = inputs["scored"]
    assert torch.equal(scored, y != IGNORE_INDEX)
    # every target of the split once, in the blocks-and-radii order
    assert torch.equal(y[scored], data.per_target.framed.targets)
    # the SAFFU's nearest radial item is the token the transformer reads at that position
    assert torch.equal(inputs["saffu"]["radial"][:, -1], inputs["ids"][scored])
    assert inputs["saffu"]["block"].shape == (int(scored.sum()), 16)


def test_the_network_starts_as_the_solved_saffu(dm, solved):
    """The transformer's head starts at zero: the residual SAFFU scores held-out text exactly as its SAFFU."""
    alone = perplexity(solved.saffu, per_target(dm, "dev"))
    assert perplexity(solved, windows(dm, "dev")) == pytest.approx(alone, rel=1e-5)
    # and samples as its SAFFU from the same seed
    prompt = torch.full((3, 1), dm.special_ids.sod)
    a = solved.generate(prompt, 10, generator=torch.Generator().manual_seed(1))
    b = solved.saffu.generate(prompt, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_the_gated_network_starts_as_the_solved_saffu_and_can_leave_it_out(dm, solved):
    """g(h) = 1 at the start (the explicit solution, exactly); g -> 0 leaves the transformer alone,
    which the ungated network cannot express."""
    net = build(dm, gate=True)
    net.saffu.load_state_dict(solved.saffu.state_dict())
    assert perplexity(net, windows(dm, "dev")) == pytest.approx(perplexity(solved.saffu, per_target(dm, "dev")), rel=1e-5)
    prompt = torch.full((3, 1), dm.special_ids.sod)
    a = net.generate(prompt, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, solved.saffu.generate(prompt, 10, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        torch.nn.init.normal_(net.transformer.head.weight, std=0.5)
        net.gate.bias.fill_(-40.0)  # g = 2 sigmoid(-40) ~ 1e-17
    net.eval()
    inputs, _ = dm.datasets["dev"].collate(range(8))
    with torch.no_grad():
        torch.testing.assert_close(net(inputs), net.transformer(inputs["ids"]), rtol=0, atol=1e-5)


def test_the_mixture_interpolates_the_two_language_models(dm, solved):
    """combine=mixture: at the scored positions the network's output is log(lam p_saffu + (1 - lam)
    p_gpt), lam = mix_init at the start, each row a distribution; so its held-out perplexity is at
    most the SAFFU's / mix_init. Samples from the same distribution."""
    net = build(dm, combine="mixture", mix_init=0.8)
    net.saffu.load_state_dict(solved.saffu.state_dict())
    net.eval()
    inputs, y = dm.datasets["dev"].collate(range(8))
    with torch.no_grad():
        out = net(inputs)
        p_saffu = net.saffu(inputs["saffu"]).softmax(-1)
        p_gpt = net.transformer(inputs["ids"]).softmax(-1)[inputs["scored"]]
    torch.testing.assert_close(out[inputs["scored"]].exp(), 0.8 * p_saffu + 0.2 * p_gpt, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(out.shape[:2]), rtol=0, atol=1e-4)
    alone = perplexity(solved.saffu, per_target(dm, "dev"))
    assert perplexity(net, windows(dm, "dev")) <= alone / 0.8 * (1 + 1e-5)
    assert net.transformer.head.weight is net.transformer.token_embedding.weight  # the GPT baseline, tied
    prompt = torch.full((2, 1), dm.special_ids.sod)
    assert net.generate(prompt, 6, generator=torch.Generator().manual_seed(1)).shape == (2, 7)


@pytest.mark.parametrize("kw, match", [({"combine": "product"}, "model.combine='product'"),
                                       ({"combine": "mixture", "gate": True}, "model.gate=true"),
                                       ({"combine": "mixture", "mix_init": 1.0}, "model.mix_init=1.0")])
def test_bad_combinations_are_named(dm, kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        build(dm, **kw)


@pytest.mark.parametrize("combine, gate", [("sum", False), ("sum", True), ("mixture", False)])
def test_backprop_trains_the_transformer_below_the_solution_on_held_out_text(dm, solved, combine, gate):
    net = build(dm, gate=gate, combine=combine, **({"gpt_loss": 1.0} if combine == "mixture" else {}))
    net.saffu.load_state_dict(solved.saffu.state_dict())  # the gate starts at g = 1, the mixture at lam = 0.9
    start = perplexity(solved.saffu, per_target(dm, "dev"))  # the explicit solution
    saffu_before = {k: v.clone() for k, v in net.saffu.state_dict().items()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in net.fixed_parameters())
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    data = dm.datasets["train"]
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(3):  # epochs
        for rows in torch.randperm(len(data), generator=generator).split(16):
            inputs, y = data.collate(rows)
            loss, _ = net.training_objective(inputs, y)  # the SAFFU scores training targets leave-one-out
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    end = perplexity(net, windows(dm, "dev"))
    # the mixture's transformer has to become a language model of its own before it helps (here
    # 9.35 -> 9.10 in 3 epochs), where the sum's corrects the SAFFU's logits from the first step
    assert end < (0.97 if combine == "sum" else 0.985) * start, (start, end)
    if gate:  # backprop moves the gate off g = 1
        assert net.gate.weight.abs().max() > 1e-3
    if combine == "mixture":  # and the mixture's weight off its start
        assert net.mix_gate.weight.abs().max() > 1e-3
    for k, v in net.saffu.state_dict().items():  # the solved part stays as solved
        assert torch.equal(v, saffu_before[k]), k


def test_training_scores_the_saffu_leave_one_out(dm, solved):
    inputs, y = dm.datasets["train"].collate(range(8))
    solved.eval()
    plain, loo = solved(inputs), solved.training_logits(inputs, y)
    scored = inputs["scored"]
    gold = lambda logits: logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0][scored]  # noqa: E731
    assert (gold(loo) < gold(plain) + 1e-6).all() and (gold(loo) < gold(plain) - 1e-3).any()


def test_residual_warm_run_beats_its_solution_and_the_references(tmp_path, cache_dir, capsys):
    """experiment=residual_warm end to end on held-out synthetic text: the solve, then the transformer."""
    tiny = ["model.saffu.block_size=16", "model.saffu.radius=4", "model.saffu.block_dim=32", "model.saffu.block_rank=16",
            "model.transformer.context_length=32", "model.transformer.d_model=32", "model.transformer.n_layer=1",
            "model.transformer.n_head=2", "trainer.max_epochs=2", "logger=csv"]
    data = [o for o in TINY_DATA if not o.startswith("data.corpus.train_words")] + ["data.corpus.train_words=12000"]
    run_train(data + ["experiment=residual_warm", *tiny], tmp_path / "residual", cache_dir)
    m = read_metrics(tmp_path / "residual")
    assert m["global_step"] > 0 and m["explicit/val_ppl"] > 0
    assert m["val/ppl"] < m["explicit/val_ppl"], m  # backprop went below the solution
    assert m["test/ppl"] < m["baseline/kn3_test_ppl"] < m["baseline/kn2_test_ppl"], m
    # eval.py reproduces the run's test perplexity from the checkpoint alone; generate.py samples from it
    ckpt = m["best_checkpoint"]
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}",
                           f"paths.cache_dir={cache_dir}", "logger=none"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "eval")["test/ppl"] == pytest.approx(m["test/ppl"], rel=1e-4)
    assert generate_main([ckpt, "--prompt", "The dog", "--num-samples", "2", "--max-tokens", "12", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("The dog")


def test_which_parameters_train(dm, solved):
    """The regime's embedding switch leaves the SAFFU's fixed parameters alone; train_saffu moves
    the SAFFU but its bit-cipher embedding."""
    from functools import partial

    from saffu_lab.lightning_module import LanguageModelModule

    frozen = build(dm)
    LanguageModelModule(frozen, optimizer=partial(torch.optim.AdamW, lr=1e-3), freeze_embeddings=False)
    assert frozen.transformer.token_embedding.weight.requires_grad
    assert not any(p.requires_grad for p in frozen.saffu.parameters())

    net = build(dm, train_saffu=True)
    net.load_state_dict(solved.state_dict())
    LanguageModelModule(net, optimizer=partial(torch.optim.AdamW, lr=1e-3), freeze_embeddings=False)
    assert not net.saffu.block_embedding.weight.requires_grad
    inputs, y = dm.datasets["train"].collate(range(8))
    logits = net.training_logits(inputs, y)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.flatten(), ignore_index=IGNORE_INDEX).backward()
    for name in ("radial_values", "mix", "block_U"):
        assert getattr(net.saffu, name).grad.abs().sum() > 0, name

    pairs_fixed = build(dm, train_saffu=True, train_pair_values=False)  # the per-pair values stay as solved
    pairs_fixed.load_state_dict(solved.state_dict())
    LanguageModelModule(pairs_fixed, optimizer=partial(torch.optim.AdamW, lr=1e-3), freeze_embeddings=False)
    logits = pairs_fixed.training_logits(inputs, y)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.flatten(), ignore_index=IGNORE_INDEX).backward()
    assert not pairs_fixed.saffu.radial_values.requires_grad and pairs_fixed.saffu.radial_values.grad is None
    for name in ("mix", "block_U", "radial_col"):
        assert getattr(pairs_fixed.saffu, name).grad.abs().sum() > 0, name


def test_module_learning_rates(dm):
    """regime.module_lr gives a submodule its own rate (the rest keeps the optimiser's), the schedule
    scales both, and an unknown submodule or a bad rate is refused by name."""
    import types
    from functools import partial

    from saffu_lab.errors import ConfigError
    from saffu_lab.lightning_module import LanguageModelModule

    net = build(dm, train_saffu=True)
    module = LanguageModelModule(net, optimizer=partial(torch.optim.AdamW, lr=3e-3), module_lr={"saffu": 1e-3},
                                 warmup_steps=10, freeze_embeddings=False)
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=100)
    optimizer = module.configure_optimizers()["optimizer"]
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    saffu_lrs = [by_id[id(p)] for p in net.saffu.parameters() if p.requires_grad]
    assert saffu_lrs and saffu_lrs == pytest.approx([1e-4] * len(saffu_lrs))  # 1e-3 at warm-up step 1/10
    transformer_lrs = [by_id[id(p)] for p in net.transformer.parameters()]
    assert transformer_lrs == pytest.approx([3e-4] * len(transformer_lrs))
    assert len(by_id) == sum(p.requires_grad for p in net.parameters())  # every trained parameter once
    for bad, match in (({"decoder": 1e-3}, "no submodule 'decoder'"), ({"saffu": 0}, r"module_lr.saffu=0")):
        with pytest.raises(ConfigError, match=match):
            LanguageModelModule(build(dm), optimizer=partial(torch.optim.AdamW, lr=1e-3), module_lr=bad)


@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_training_nll_is_the_cross_entropy_of_the_training_logits(dm, solved, combine):
    """The per-target training NLL (what training_objective averages) is the cross-entropy of the
    full training logits, for the mixture computed from the target's probabilities alone."""
    net = build(dm, combine=combine)
    net.saffu.load_state_dict(solved.saffu.state_dict())
    net.eval()
    with torch.no_grad():
        torch.nn.init.normal_(net.transformer.head.weight, std=0.1)
        if net.mix_gate is not None:
            torch.nn.init.normal_(net.mix_gate.weight, std=0.3)
    inputs, y = dm.datasets["train"].collate(range(8))
    logits = net.training_logits(inputs, y)
    full = F.cross_entropy(logits[inputs["scored"]], y[inputs["scored"]], reduction="none")
    torch.testing.assert_close(net.training_nll(inputs, y), full, rtol=1e-5, atol=1e-5)


def test_the_fixed_saffus_training_scores_are_cached_by_row(dm, solved, monkeypatch):
    """The mixture scores a training target with the fixed SAFFU once: later batches holding the
    same rows read the cache (the same values), and a change to the SAFFU's state drops it."""
    net = build(dm, combine="mixture", gpt_loss=1.0)
    net.saffu.load_state_dict(solved.saffu.state_dict())
    calls = []
    score = net.saffu.training_logits
    monkeypatch.setattr(net.saffu, "training_logits", lambda *a: calls.append(1) or score(*a))
    data = dm.datasets["train"]
    first = net.training_nll(*data.collate(range(8)))
    assert len(calls) == 1
    again = net.training_nll(*data.collate(range(8)))
    assert len(calls) == 1 and torch.equal(first, again)
    part = net.training_nll(*data.collate([2, 5]))  # rows already scored, in another batch
    assert len(calls) == 1
    net.training_nll(*data.collate([2, 5, 9]))  # a new row: the batch is scored
    assert len(calls) == 2
    with torch.no_grad():  # the cached scores are the SAFFU's leave-one-out scores
        inputs, y = data.collate([2, 5])
        logits = score(inputs["saffu"], y[inputs["scored"]]).float()
        saffu_term, _, _ = net._mixture_terms(inputs, y)
        direct = logits.log_softmax(-1).gather(1, y[inputs["scored"]][:, None])[:, 0]
        torch.testing.assert_close(saffu_term - F.logsigmoid(net.mix_gate(net.transformer.features(inputs["ids"])
                                   .reshape(-1, 32)[inputs["scored"].flatten()]).float()[:, 0]), direct)
        net.saffu.radial_values.mul_(0.5)  # the SAFFU changes: its scores are recomputed
    assert part.shape == (int(inputs["scored"].sum()),)
    net.training_nll(*data.collate([2, 5]))
    assert len(calls) == 3
    net.training_nll(*dm.datasets["dev"].collate([0, 1]))  # another dataset: its own scores
    net.training_nll(*data.collate([2, 5]))  # and back: the training set's are scored again
    assert len(calls) == 5
