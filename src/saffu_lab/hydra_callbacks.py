"""Hydra callbacks: the run-directory check before Hydra creates it, a multirun's plan (the jobs
it will run, so that a stopped sweep shows what is missing), and its failure summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def _check_writable(folder: str, setting: str) -> None:
    """Exit with one clear line if ``folder`` cannot be created and written."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        print(f"error: run directory {folder!r} cannot be written ({err.strerror}); set {setting}=DIR", file=sys.stderr)
        sys.exit(2)


class RunDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


def planned_jobs(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job of a basic-sweeper multirun, in Hydra's job order (the
    sweeper's own expansion of ``hydra.sweeper.params`` and the command line); None for other
    sweepers (an Optuna search decides its trials as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return BasicSweeper.split_arguments(overrides, None)[0]


class SweepPlan(Callback):
    """``plan.json`` in the sweep folder: each planned job's number and overrides. Re-running the
    same command with ``hydra.sweep.dir=<that folder>`` skips the jobs that finished (their
    ``metrics.json``), resumes stopped ones from their ``last.ckpt``, and runs the rest;
    ``scripts/collect_results.py`` lists planned jobs that have no result."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        jobs = planned_jobs(config)
        if jobs is None:
            return
        sweep = Path(config.hydra.sweep.dir)
        sweep.mkdir(parents=True, exist_ok=True)
        plan = {"overrides": list(config.hydra.overrides.task), "jobs": [{"num": i, "overrides": o} for i, o in enumerate(jobs)]}
        (sweep / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        (sweep / "stopped.json").unlink(missing_ok=True)  # this sweep goes on


class SweepSummary(Callback):
    """At the end of a multirun, list the jobs that failed (their ``failed.json``) in
    ``failures.json`` of the sweep folder and on stderr; the other jobs' results stand."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = sorted(sweep.glob("**/failed.json"))
        if not failed:
            return
        records = [{"folder": str(f.parent), **{k: v for k, v in json.loads(f.read_text()).items() if k != "traceback"}}
                   for f in failed]
        (sweep / "failures.json").write_text(json.dumps(records, indent=2) + "\n")
        total = len(list(sweep.glob("**/.hydra")))
        print(f"{len(failed)} of {total} jobs failed (details: {sweep / 'failures.json'}):", file=sys.stderr)
        for r in records:
            print(f"  job {r['job']}: {r['error']}", file=sys.stderr)
