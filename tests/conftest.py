"""Shared fixtures: a tiny synthetic configuration, Hydra composition, and `train.py` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "src"))
from saffu_lab.resume import register_resolvers  # noqa: E402

register_resolvers()  # conf/hydra/default.yaml's ${run_folder:...}, as train.py registers it

# tests never reach the network: W&B offline, the Hugging Face hub answered from the cache only
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("SAFFU_LAB_ROOT", str(ROOT))

# a corpus and models small enough that a whole run takes seconds
TINY_DATA = ["data.corpus.train_words=4000", "data.corpus.dev_words=600", "data.corpus.test_words=600",
             "callbacks.samples.max_new_tokens=12"]
TINY = TINY_DATA + [  # the GPT baseline
    "model=gpt", "regime=cold", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context_length=32",
    "data.batch_size=16", "trainer.max_epochs=2",
]
TINY_SAFFU = TINY_DATA + [
    "model=saffu_cat_r8", "model.block_size=16", "model.radius=4", "model.block_dim=32", "model.radial_dim=16",
    "model.hidden_dim=64", "data.batch_size=256",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenised-data cache for the whole session, as a sweep would share it."""
    return tmp_path_factory.mktemp("cache")


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path):
    """Compose `conf/train.yaml` as `train.py` would, with a run directory set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        del cfg.hydra
    return cfg


def run_train(overrides: list[str], run_dir: Path, cache_dir: Path, check: bool = True, timeout: int = 600):
    """Run `python train.py` in a subprocess; return the CompletedProcess."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def fit_counting_sequence(net, steps: int = 150, lr: float = 1e-2) -> float:
    """Train ``net`` on 0, 1, ..., 16 (mod 20) with AdamW; return the final loss (log 20 = 3.0 is uniform)."""
    import torch

    seq = torch.arange(17) % 20
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(seq[None, :-1])[0], seq[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()
