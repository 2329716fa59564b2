"""One training run from a composed Hydra config: data -> model -> fit -> validate -> test.

Every component is built with ``hydra.utils.instantiate``. The run directory receives the
checkpoints, the CSV and W&B logs, ``samples.txt`` and ``metrics.json`` (final perplexities,
parameter count, vocabulary size, tokens seen, and the wall-clock of each phase).
"""

from __future__ import annotations

import dataclasses
import json
import netrc
import os
import secrets
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import WandbLogger

from saffu_lab.callbacks import ExplicitSolveCallback
from saffu_lab.config_check import check_config
from saffu_lab.errors import ConfigError, SaffuLabError
from saffu_lab.progress import attach_run_log, detach_run_log, stderr_is_terminal
from saffu_lab.resume import EXIT_CODES, StopHandling, model_checkpoint


def build_components(cfg: DictConfig):
    """Data module (prepared and set up), LightningModule, loggers, callbacks and Trainer."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model_kwargs = datamodule.model_kwargs()
    net = instantiate(cfg.model, **model_kwargs)
    module = instantiate(cfg.regime, net=net)
    module.run_record = run_record(cfg, model_kwargs, datamodule.tokenizer)  # inside every checkpoint
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if isinstance(c, DictConfig) and "_target_" in c]
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if isinstance(c, DictConfig) and "_target_" in c]
    for callback in callbacks:  # a model the regime cannot solve stops here, before any training
        if isinstance(callback, ExplicitSolveCallback):
            callback.check_model(net, module.regime)
    callbacks.append(StopHandling())  # last.ckpt after each validation, at the end, on SIGTERM / Ctrl-C; random states
    resolve_precision(cfg)  # trainer.precision=auto is ours, not Lightning's
    with open_dict(cfg):
        if cfg.trainer.get("enable_progress_bar") is None:  # a bar's carriage returns are noise in a log file
            cfg.trainer.enable_progress_bar = stderr_is_terminal()
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    return datamodule, module, trainer


def run_record(cfg: DictConfig, model_kwargs: dict, tokenizer) -> dict:
    """What a checkpoint needs to stand alone (``saffu_lab.checkpoint.load_run``): the run's config,
    the data-derived model arguments and the tokenizer, so eval.py and generate.py rebuild the
    model without the training corpus."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - outside a Hydra run (tests): ${hydra:...} cannot resolve
        config = OmegaConf.to_container(cfg, resolve=False)
    kwargs = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in model_kwargs.items()}
    return {"config": config, "model_kwargs": kwargs, "tokenizer": tokenizer.to_str()}


def check_environment(cfg: DictConfig) -> None:
    """Problems that would otherwise surface only after data preparation (the run directory is
    checked earlier, by ``saffu_lab.hydra_callbacks.RunDirCheck``)."""
    missing = sorted(k for k in missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        hint = " (data=text_dir needs the corpus folder: data.path=DIR)" if "data.path" in missing else ""
        raise ConfigError(f"no value for {', '.join(missing)}: give it on the command line, e.g. {missing[0]}=VALUE{hint}")
    check_kneser_ney_orders(cfg.get("kneser_ney_orders"))
    if OmegaConf.select(cfg, "logger.wandb") is not None and not cfg.logger.get("offline", True) and not wandb_credentials():
        raise ConfigError("logger.offline=false syncs to W&B, but no credentials were found (WANDB_API_KEY, or ~/.netrc "
                          "from `wandb login`): run `wandb login`, or keep logger.offline=true and upload later with "
                          "`wandb sync RUN/wandb/offline-run-*`")
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer=gpu asks for a CUDA GPU but torch sees none; use trainer=cpu (or trainer=ddp for 2 CPU processes)")


def check_kneser_ney_orders(orders) -> None:
    """``kneser_ney_orders``: null or a list of n-gram orders in 1..4 (train.py and eval.py)."""
    for n in ([] if orders is None else orders if isinstance(orders, (list, ListConfig)) else [orders]):
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4:
            raise ConfigError(f"kneser_ney_orders has {n!r}; give n-gram orders in 1..4, e.g. kneser_ney_orders=[2,3] "
                              "(or kneser_ney_orders=[] for none)")
    if orders is not None and not isinstance(orders, (list, ListConfig)):
        raise ConfigError(f"kneser_ney_orders={orders!r} must be a list of n-gram orders, e.g. kneser_ney_orders=[2,3]")


def wandb_credentials() -> bool:
    """Whether W&B can authenticate: an API key in the environment, or the ~/.netrc entry that
    ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16 in its flags). Without
    either, bfloat16 matmuls are emulated and slower than float32."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:  # not Linux: no cheap way to tell, keep float32
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision=auto``: bf16 mixed precision where it is fast (a CUDA device, or a CPU
    with native bfloat16 matmuls), float32 elsewhere; any other value is Lightning's own."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision != "auto":
        return precision
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    fast = torch.cuda.is_available() if accelerator in ("gpu", "cuda", "auto") else native_bf16_cpu()
    chosen = "bf16-mixed" if fast else "32-true"
    with open_dict(cfg):
        cfg.trainer.precision = chosen
    return chosen


def missing_keys(node, prefix: str = "") -> list[str]:
    """Keys whose value is ``???`` (without resolving interpolations that point at them)."""
    found = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_interpolation(node, key):
            continue
        elif isinstance(node[key], DictConfig):
            found += missing_keys(node[key], f"{prefix}{key}.")
    return found


def write_resolved_config(cfg: DictConfig) -> None:
    """``config.yaml`` in the run folder: every value resolved (what scripts/collect_results.py reads)."""
    folder = Path(cfg.paths.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def continue_wandb_run(cfg: DictConfig) -> None:
    """One W&B run per run folder: the id is kept in ``wandb_id.txt``, so a run resumed into its
    folder (or a re-run sweep job) logs into the same W&B run, resumed, not a new one."""
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
    if not isinstance(wandb_cfg, DictConfig) or wandb_cfg.get("id"):
        return
    path = Path(cfg.paths.output_dir) / "wandb_id.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = path.read_text().strip() if path.exists() else secrets.token_hex(6)  # not from the seeded RNGs
    path.write_text(run_id + "\n")
    with open_dict(cfg):
        wandb_cfg.id, wandb_cfg.resume = run_id, "allow"


_FLUSH_DENORMAL: dict = {}  # this process's setting: {"requested": bool, "on": bool}


def set_flush_denormal(requested: bool) -> bool:
    """Flush subnormal floats to zero on the CPU (``flush_denormal``); returns whether it is on.

    The CPU keeps this mode per thread and torch's worker threads copy it from the main thread
    when they start, so it is set once per process, at its first job (before any torch work); a
    later job of the same process (a sweep worker) must ask for the same, or it is refused.
    """
    if not _FLUSH_DENORMAL:
        supported = torch.set_flush_denormal(requested)  # False where the CPU cannot
        _FLUSH_DENORMAL.update(requested=requested, on=requested and supported)
    elif _FLUSH_DENORMAL["requested"] != requested:
        raise ConfigError(f"flush_denormal={requested}, but this process already runs with flush_denormal="
                          f"{_FLUSH_DENORMAL['requested']} (set once per process): do not sweep flush_denormal within one "
                          "multirun; launch one multirun (or run) per value")
    return _FLUSH_DENORMAL["on"]


def run(cfg: DictConfig) -> dict:
    """Train, validate and test; return (and write) the metrics of the run."""
    threads = torch.get_num_threads()
    run_log = attach_run_log(cfg.paths.output_dir)  # progress and Lightning's messages into train.log
    try:
        metrics = _run(cfg)
    except BaseException:
        finish_wandb(exit_code=1)  # W&B shows the run as failed
        raise
    finally:
        torch.set_num_threads(threads)  # a later job in this process starts from the default again
        detach_run_log(run_log)
    finish_wandb(exit_code=0)
    return metrics


def finish_wandb(exit_code: int) -> None:
    """Close the W&B run, so that the next job of a sweep in this process starts its own
    (WandbLogger would otherwise attach to the run still open)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def _run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    (Path(cfg.paths.output_dir) / "failed.json").unlink(missing_ok=True)  # a re-run job folder
    check_environment(cfg)
    precision = resolve_precision(cfg)  # trainer.precision=auto -> a Lightning value, before the type check
    check_config(cfg)  # types and ranges, before any data is read
    continue_wandb_run(cfg)
    write_resolved_config(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    flush_denormal = set_flush_denormal(bool(cfg.get("flush_denormal")))
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("logger") and cfg.logger.get("offline", True):
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        datamodule, module, trainer = build_components(cfg)
    except InstantiationException as err:
        raise unwrap_instantiation_error(err) from None
    timings = {"time/prepare_data_s": datamodule.timings.get("prepare_data_s", 0.0)}
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    t = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except (SystemExit, KeyboardInterrupt):
        stop = next(cb for cb in trainer.callbacks if isinstance(cb, StopHandling))
        if stop.stopped_by is None:
            raise
        raise RunStopped(stop.stopped_by, _stopped_metrics(cfg, trainer, module, stop, start)) from None
    timings["time/fit_s"] = time.perf_counter() - t
    ckpt = _best_checkpoint(trainer)  # none if fit trained nothing

    callback_metrics = _callback_metrics(trainer)
    t = time.perf_counter()
    if trainer.global_step == 0 and "explicit/val_ppl" in callback_metrics:
        val = [{"val/ppl": callback_metrics["explicit/val_ppl"]}]  # untrained since the solve: already measured
    else:
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    timings["time/validate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    test = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False) if cfg.get("test", True) else [{}]
    timings["time/test_s"] = time.perf_counter() - t

    tokens_seen = int(trainer.strategy.reduce(module.tokens_seen.float(), reduce_op="sum"))
    metrics = {
        "val/ppl": val[0]["val/ppl"] if val else None,  # none with trainer.limit_val_batches=0
        "test/ppl": test[0].get("test/ppl"),
        "unigram/test_ppl": datamodule.unigram_perplexity("train", "test"),
        "unigram/val_ppl": datamodule.unigram_perplexity("train", "dev"),
        **kneser_ney_baselines(datamodule, cfg.get("kneser_ney_orders") or [], test=bool(cfg.get("test", True))),
        "params": module.num_parameters(),
        "vocab_size": datamodule.vocab_size,
        "tokens_seen": tokens_seen,
        **datamodule.stats,
        **callback_metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "interrupted": trainer.interrupted,
        "best_checkpoint": ckpt,
        "world_size": trainer.world_size,
        "ddp_backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        **timings,
    }
    metrics["warnings"] = references_warnings(metrics)
    metrics["warning/worse_than_unigram"] = int(bool(metrics["warnings"]))
    metrics["time/total_s"] = time.perf_counter() - start
    metrics["threads"] = torch.get_num_threads()
    metrics["flush_denormal"] = flush_denormal
    metrics["precision"] = precision
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            logger.save()  # after test, Lightning has already flushed its loggers for the last time
        tokenizer_path = Path(cfg.paths.output_dir) / "tokenizer.json"
        datamodule.tokenizer.save(str(tokenizer_path))
        for text in metrics["warnings"]:
            print(f"warning: {text}", file=sys.stderr)
        if metrics["warnings"]:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary["warnings"] = "; ".join(metrics["warnings"])
        _write_metrics(cfg, metrics)
        references = "  ".join([f"unigram {metrics['unigram/val_ppl']:.1f}"] + [
            f"KN {n}-gram {metrics[f'baseline/kn{n}_val_ppl']:.1f}" for n in cfg.get("kneser_ney_orders") or []])
        test_text = f"test/ppl {metrics['test/ppl']:.3f}" if metrics["test/ppl"] is not None else "test skipped"
        val_text = f"val/ppl {metrics['val/ppl']:.3f}" if metrics["val/ppl"] is not None else "validation skipped"
        print(f"{val_text}  {test_text}  (dev references: {references})  "
              f"-> {cfg.paths.output_dir}/metrics.json")
    return metrics


def references_warnings(metrics: dict) -> list[str]:
    """A model worse on dev than the add-one unigram on the same targets has learnt less than
    token frequencies: said in the console, metrics.json and W&B, not left for a reader to find."""
    unigram = metrics.get("unigram/val_ppl")
    out = []
    for key, what in (("explicit/val_ppl", "the explicitly solved model"), ("val/ppl", "the final model")):
        value = metrics.get(key)
        if value is not None and unigram is not None and value > unigram:
            out.append(f"{what} is worse than the unigram on dev ({key} {value:.1f} > unigram {unigram:.1f}): too little "
                       f"training data for its size (data.train_tokens={metrics.get('data/train_tokens')}) or training "
                       "that diverged; see docs/explicit_solutions.md")
    return out


class RunStopped(Exception):
    """A signal stopped training: ``last.ckpt`` and ``metrics.json`` (``"interrupted": true``)
    are written; the process exits with the shell's code for that signal (143, 130)."""

    def __init__(self, signal_name: str, metrics: dict):
        super().__init__(f"{signal_name} at step {metrics['global_step']}")
        self.signal_name, self.metrics, self.exit_code = signal_name, metrics, EXIT_CODES[signal_name]


def _stopped_metrics(cfg: DictConfig, trainer, module, stop, start: float) -> dict:
    """``metrics.json`` of a run stopped by a signal: how far it got and how to go on."""
    metrics = {
        "interrupted": True, "signal": stop.stopped_by, "global_step": trainer.global_step,
        "epochs": trainer.current_epoch, "tokens_seen": int(module.tokens_seen),
        "last_checkpoint": stop.last_checkpoint, "best_checkpoint": _best_checkpoint(trainer),
        **_callback_metrics(trainer),
        "time/total_s": time.perf_counter() - start,
        "resume": f"python train.py <the same overrides> ckpt_path={stop.last_checkpoint}",
    }
    if trainer.is_global_zero:
        _write_metrics(cfg, metrics)
    return metrics


def _callback_metrics(trainer) -> dict:
    """What the callbacks measured (the explicit solve, self-guided training), merged."""
    return {k: v for cb in trainer.callbacks for k, v in getattr(cb, "metrics", {}).items()}


def _write_metrics(cfg: DictConfig, metrics: dict) -> None:
    (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _best_checkpoint(trainer) -> str | None:
    best = getattr(model_checkpoint(trainer), "best_model_path", "")
    return best if best and Path(best).exists() else None


def kneser_ney_baselines(datamodule, orders, test: bool = True) -> dict:
    """``baseline/kn{n}_val_ppl`` (and ``_test_ppl``) for each order: Kneser-Ney n-grams fitted on
    exactly the run's training targets, scored on exactly its dev (test) targets."""
    out = {}
    for n in orders:
        out[f"baseline/kn{n}_val_ppl"] = datamodule.kneser_ney_perplexity(n, "train", "dev")
        if test:
            out[f"baseline/kn{n}_test_ppl"] = datamodule.kneser_ney_perplexity(n, "train", "test")
    return out


def unwrap_instantiation_error(err: InstantiationException) -> Exception:
    """The user's error inside a Hydra instantiation, as a one-line ConfigError."""
    cause = err.__cause__
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, SaffuLabError):
        return cause
    if isinstance(cause, (ValueError, TypeError)):
        return ConfigError(f"{cause}")
    return err


def _sweep_job() -> dict | None:
    """The job's place in a multirun (number, overrides, sweep folder), or None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return {"num": hc.job.num, "overrides": list(hc.overrides.task), "sweep_dir": hc.sweep.dir}


def tag_sweep_job(cfg: DictConfig, job: dict) -> None:
    """W&B: group a sweep's runs (the experiment's group, else the sweep folder's name) and tag
    each with its overrides (``model.radius=8``), so the dashboard can pivot on them."""
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
    if not isinstance(wandb_cfg, DictConfig):
        return
    with open_dict(cfg):
        if not wandb_cfg.get("group"):
            wandb_cfg.group = f"{cfg.task_name}-{Path(job['sweep_dir']).name}"
        tags = list(wandb_cfg.get("tags") or []) + [o[:64] for o in job["overrides"]]  # W&B allows 64 characters
        wandb_cfg.tags = list(dict.fromkeys(tags))
        wandb_cfg.job_type = "sweep"


def finished_job(cfg: DictConfig, job: dict) -> dict | None:
    """A re-run sweep (the same command, ``hydra.sweep.dir`` of the stopped one): the metrics of
    this job if its folder holds a finished run of the same overrides; else None, after pointing
    ``ckpt_path`` at the job's ``last.ckpt`` when it was stopped part-way (so it goes on)."""
    folder = Path(cfg.paths.output_dir)
    record = folder / "job.json"
    same = record.exists() and json.loads(record.read_text()).get("overrides") == job["overrides"]
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else None
    if same and metrics is not None and not metrics.get("interrupted"):
        return metrics
    last = folder / "checkpoints" / "last.ckpt"
    if same and last.exists() and not cfg.get("ckpt_path"):
        with open_dict(cfg):
            cfg.ckpt_path = str(last)
        print(f"job {job['num']} was stopped at step {metrics.get('global_step') if metrics else '?'}: resuming from {last}",
              file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"num": job["num"], "overrides": job["overrides"]}, indent=2) + "\n")
    return None


def record_stopped_sweep(job: dict, stop: RunStopped) -> None:
    """``stopped.json`` in the sweep folder, and the command that finishes the sweep."""
    sweep = Path(job["sweep_dir"])
    record = {"job": job["num"], "signal": stop.signal_name, "global_step": stop.metrics["global_step"],
              "finish": f"re-run the same command with hydra.sweep.dir={sweep}: finished jobs are skipped, "
                        "stopped ones resume from last.ckpt"}
    (sweep / "stopped.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"sweep stopped at job {job['num']}; to finish it, {record['finish']}", file=sys.stderr)


def record_failure(cfg: DictConfig, err: BaseException, job: dict) -> Path:
    """Write ``failed.json`` (error, traceback, overrides) into the job's folder."""
    import traceback

    folder = Path(cfg.paths.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"error": f"{type(err).__name__}: {err}", "user_error": isinstance(err, SaffuLabError),
              "overrides": job.get("overrides"), "job": job.get("num"),
              "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))}
    (folder / "failed.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder / "failed.json"


def main_guarded(cfg: DictConfig) -> float | None:
    """Entry point for ``train.py``.

    A single run: one clear line and exit code 2 for a user error. In a multirun (``-m``) a
    failing job is recorded in its folder as ``failed.json`` and returns NaN (Optuna marks the
    trial failed), so the other jobs go on; ``saffu_lab.hydra_callbacks.SweepSummary`` lists
    the failures at the end.
    """
    job = _sweep_job()
    try:
        if job is not None:
            finished = finished_job(cfg, job)
            if finished is not None:
                print(f"job {job['num']} ({' '.join(job['overrides'])}) finished earlier: skipped "
                      f"({cfg.paths.output_dir}/metrics.json)", file=sys.stderr)
                return finished.get(cfg.get("optimized_metric", "val/ppl"))
            tag_sweep_job(cfg, job)
        metrics = run(cfg)
    except RunStopped as stop:
        print(f"stopped by {stop.signal_name} at step {stop.metrics['global_step']}: {stop.metrics['last_checkpoint']} and "
              f"{cfg.paths.output_dir}/metrics.json written; resume with ckpt_path={stop.metrics['last_checkpoint']}",
              file=sys.stderr)
        if job is not None:
            record_stopped_sweep(job, stop)
        sys.exit(stop.exit_code)  # a stopped run is not a success, and a stopped sweep stops
    except SaffuLabError as err:
        if job is not None:
            print(f"error: job {job['num']} ({' '.join(job['overrides'])}): {err} -> {record_failure(cfg, err, job)}", file=sys.stderr)
            return float("nan")
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - a sweep must survive any one job
        if job is None:
            raise
        print(f"error: job {job['num']} failed with {type(err).__name__}: {err} -> {record_failure(cfg, err, job)}", file=sys.stderr)
        return float("nan")
    return metrics.get(cfg.get("optimized_metric", "val/ppl"))
