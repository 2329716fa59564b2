"""Every option of every config group composes, and every component instantiates."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from conftest import CONF, compose_config
from saffu_lab.errors import ConfigError
from saffu_lab.framing import SpecialIds
from saffu_lab.train import check_environment, resolve_precision

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_required_group_exists():
    required = {"data", "tokenizer", "model", "embedding", "aggregation", "ffn", "regime",
                "trainer", "logger", "callbacks", "experiment", "paths", "hydra"}
    assert required <= set(GROUPS)
    assert all(any(g == group for g, _ in OPTIONS) for group in required)


def _data_kwargs(cfg: DictConfig) -> dict:
    """What the data module would hand the model, for a vocabulary of 300."""
    kwargs = {"vocab_size": 300}
    if cfg.framing._target_.endswith(("BlockFraming", "ResidualFraming")):
        kwargs.update(token_counts=torch.arange(300, 0, -1).double(), n_documents=20,
                      special_ids=SpecialIds(pad=0, sod=1, eod=2, frg=3))
    return kwargs


def _instantiate_all(cfg: DictConfig):
    dm = instantiate(cfg.data)
    net = instantiate(cfg.model, **_data_kwargs(cfg))
    module = instantiate(cfg.regime, net=net)
    loggers = [instantiate(c) for c in cfg.logger.values() if isinstance(c, DictConfig) and "_target_" in c]
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if isinstance(c, DictConfig) and "_target_" in c]
    if cfg.framing._target_.endswith("BlockFraming"):
        b, r = cfg.model.block_size, cfg.model.radius
        inputs = {"block": torch.zeros(2, b, dtype=torch.long), "radial": torch.zeros(2, r, dtype=torch.long),
                  "position": torch.tensor([1, b - 1]), "prefix": torch.zeros(2, 1, dtype=torch.long),
                  "prefix_len": torch.zeros(2, dtype=torch.long)}
        assert net(inputs).shape == (2, 300)
    elif cfg.framing._target_.endswith("ResidualFraming"):  # 2 windows of 5, each target with its SAFFU contexts
        b, r = cfg.model.saffu.block_size, cfg.model.saffu.radius
        saffu = {"block": torch.zeros(10, b, dtype=torch.long), "radial": torch.zeros(10, r, dtype=torch.long),
                 "position": torch.arange(10) % (b - 1) + 1}
        inputs = {"ids": torch.zeros(2, 5, dtype=torch.long), "scored": torch.ones(2, 5, dtype=torch.bool), "saffu": saffu}
        assert net(inputs).shape == (2, 5, 300)
    else:
        assert net(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 300)
    return dm, module, loggers, callbacks


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] not in ("hydra", "trainer", "experiment", "framing")])
def test_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [] if group == "paths" else [f"{group}={option}"]
    if group == "ffn" or (group == "embedding" and option == "learned"):
        overrides.append("model=gpt")  # options of the GPT baseline
    if group == "model" and option.endswith("_r128"):
        overrides.append("model.hidden_dim=64")  # keep the cat decoder small in this test
    if group == "data" and option == "text_dir":
        overrides.append(f"data.path={tmp_path}")
    cfg = compose_config(overrides, tmp_path / "run", tmp_path / "cache")
    _instantiate_all(cfg)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_composes_and_instantiates(option, tmp_path):
    cfg = compose_config([f"experiment={option}"], tmp_path / "run", tmp_path / "cache")
    _instantiate_all(cfg)


@pytest.mark.parametrize("option", ["cpu", "ddp", "gpu"])
def test_trainer_option(option, tmp_path):
    cfg = compose_config([f"trainer={option}", "logger=none"], tmp_path / "run", tmp_path / "cache")
    if option == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer=gpu"):
            check_environment(cfg)
        return
    check_environment(cfg)
    assert resolve_precision(cfg) in ("32-true", "bf16-mixed")
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.num_devices == cfg.trainer.devices
