"""Score a trained model on a corpus: ``python eval.py ckpt_path=CKPT [data=text_dir data.path=DIR]``.

The model, its hyper-parameters, its framing and its tokenizer all come from the checkpoint
(``saffu_lab.checkpoint.load_run``); conf/model is never read. The corpus is the ``data`` group
when one is given, else the checkpoint's own data config (its corpus and split limits, so the
run's ``test/ppl`` is reproduced). The corpus is tokenised with the checkpoint's tokenizer
(``saffu_lab.tokenizer.FixedTokenizer``: no tokenizer is trained), framed with the run's framing,
and scored on its dev and test targets in full precision, beside the add-one unigram and the
Kneser-Ney n-grams fitted on the same corpus's training targets with the same token ids.

``metrics.json`` in eval's own run folder (``logs/eval/runs/<time>/``) holds the perplexities,
the references, the checkpoint and the corpus; the same numbers go to the configured loggers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from saffu_lab.errors import ConfigError, SaffuLabError
from saffu_lab.train import (check_kneser_ney_orders, finish_wandb, kneser_ney_baselines, missing_keys,
                             unwrap_instantiation_error)

ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


def check_config(cfg: DictConfig) -> None:
    """Bad values of eval's own config, before anything is loaded."""
    missing = [k for k in missing_keys(cfg) if not k.startswith("hydra.")]
    if missing:
        hint = {"ckpt_path": " (a checkpoint written by train.py, e.g. ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt)",
                "data.path": " (data=text_dir needs the corpus folder: data.path=DIR)"}.get(missing[0], "")
        raise ConfigError(f"no value for {', '.join(missing)}: give it on the command line, e.g. {missing[0]}=VALUE{hint}")
    check_kneser_ney_orders(cfg.get("kneser_ney_orders"))
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be a positive number of CPU threads, or null for torch's default")
    accelerator = str(cfg.get("accelerator", "cpu"))
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"accelerator={accelerator!r} is not one of {', '.join(ACCELERATORS)}; e.g. accelerator=cpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"accelerator={accelerator} asks for a CUDA GPU but torch sees none; use accelerator=cpu")


def adopt_run_config(cfg: DictConfig, run_cfg: DictConfig, ckpt_path: str, vocab_size: int) -> bool:
    """Complete eval's config from the checkpoint's: the data config when none is given (returns
    whether it was), and the values the data configs interpolate (``framing``, ``seed``,
    ``tokenizer``); W&B runs are tagged ``job_type=eval`` and join the training run's group."""
    own_data = OmegaConf.select(cfg, "data") is None
    with open_dict(cfg):
        if own_data:
            cfg.data = _resolved(run_cfg, "data")
            cfg.data.cache_dir = "${paths.cache_dir}"  # eval's caches, not the training machine's folders
            if "cache_dir" in cfg.data.get("corpus", {}):
                cfg.data.corpus.cache_dir = "${paths.cache_dir}/hf"  # as conf/data/{text_dir,babylm}.yaml
            cfg.data.tokenizer, cfg.data.framing = "${tokenizer}", "${framing}"
        cfg.framing = _resolved(run_cfg, "framing")
        cfg.seed = run_cfg.get("seed", 0)
        cfg.tokenizer = {"from_checkpoint": ckpt_path, "vocab_size": vocab_size}  # described; never trained
        wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
        if isinstance(wandb_cfg, DictConfig):
            wandb_cfg.job_type = wandb_cfg.get("job_type") or "eval"
            if not wandb_cfg.get("group"):
                wandb_cfg.group = OmegaConf.select(run_cfg, "logger.wandb.group")
    return own_data


def _resolved(run_cfg: DictConfig, key: str) -> dict:
    """``run_cfg[key]`` with its interpolations resolved in the run's config (checkpoints hold it
    resolved; a record written outside a Hydra run may still hold ``${...}``)."""
    try:
        return OmegaConf.to_container(run_cfg[key], resolve=True)
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra run: keep it as written
        return OmegaConf.to_container(run_cfg[key], resolve=False)


def run(cfg: DictConfig) -> dict:
    """Load, tokenise, score; return (and write) the metrics."""
    start = time.perf_counter()
    check_config(cfg)
    import pytorch_lightning as pl
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from saffu_lab.checkpoint import load_run
    from saffu_lab.tokenizer import FixedTokenizer

    ckpt_path = str(Path(cfg.ckpt_path).expanduser().resolve())
    module, run_cfg, tokenizer = load_run(ckpt_path)
    own_data = adopt_run_config(cfg, run_cfg, ckpt_path, tokenizer.get_vocab_size())
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.set_flush_denormal(bool(run_cfg.get("flush_denormal", False)))  # the run's arithmetic, as in its test
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.get("logger") and cfg.logger.get("offline", True):
        os.environ.setdefault("WANDB_MODE", "offline")

    fixed = FixedTokenizer(tokenizer)
    try:
        datamodule = instantiate(cfg.data, tokenizer=fixed)
        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if isinstance(c, DictConfig) and "_target_" in c]
    except InstantiationException as err:
        raise unwrap_instantiation_error(err) from None
    t = time.perf_counter()
    datamodule.prepare_data()
    datamodule.setup("validate")
    prepare_s = time.perf_counter() - t

    trainer = pl.Trainer(accelerator=str(cfg.get("accelerator", "cpu")), devices=1, precision="32-true",
                         logger=loggers or False, callbacks=[], enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=bool(cfg.get("progress_bar", False)), default_root_dir=str(output_dir))
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    t = time.perf_counter()
    val = trainer.validate(module, datamodule=datamodule, verbose=False)
    test = trainer.test(module, datamodule=datamodule, verbose=False)
    score_s = time.perf_counter() - t
    orders = list(cfg.get("kneser_ney_orders") or [])
    metrics = {
        "val/ppl": val[0]["val/ppl"],
        "test/ppl": test[0]["test/ppl"],
        "unigram/val_ppl": datamodule.unigram_perplexity("train", "dev"),
        "unigram/test_ppl": datamodule.unigram_perplexity("train", "test"),
        **kneser_ney_baselines(datamodule, orders),
        "ckpt_path": ckpt_path,
        "model": OmegaConf.select(run_cfg, "model._target_"),
        "params": module.num_parameters(),
        "train_run": OmegaConf.select(run_cfg, "paths.output_dir"),
        "corpus": OmegaConf.to_container(cfg.data.corpus, resolve=True),
        "data/from_checkpoint": own_data,
        "tokenizer/from_checkpoint": True,
        "tokenizer/hash": fixed.cache_key()["fixed_tokenizer"],
        **datamodule.stats,  # data/corpus, data/cache, data/*_tokens, vocab_size
        "precision": "32-true",
        "time/prepare_data_s": prepare_s,
        "time/score_s": score_s,
    }
    metrics["time/total_s"] = time.perf_counter() - start
    try:
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            logger.save()
    finally:
        finish_wandb(exit_code=0)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    references = "  ".join([f"unigram {metrics['unigram/test_ppl']:.1f}"] +
                           [f"KN {n}-gram {metrics[f'baseline/kn{n}_test_ppl']:.1f}" for n in orders])
    print(f"val/ppl {metrics['val/ppl']:.3f}  test/ppl {metrics['test/ppl']:.3f}  (test references: {references})  "
          f"-> {output_dir}/metrics.json")
    return metrics


def main_guarded(cfg: DictConfig) -> dict:
    """Entry point for ``eval.py``: a user error is one line on stderr and exit code 2."""
    try:
        return run(cfg)
    except SaffuLabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
