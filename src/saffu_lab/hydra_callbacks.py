"""Hydra callbacks: the run-directory check before Hydra creates it, and a multirun's failure summary."""

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
