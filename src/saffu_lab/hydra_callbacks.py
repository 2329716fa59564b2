"""Hydra callbacks: checks that must run before Hydra creates the run directory."""

from __future__ import annotations

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
