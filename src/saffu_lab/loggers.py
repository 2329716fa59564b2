"""Lightning's CSV logger, made to keep one history per run folder.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its writer starts, so a run resumed
into its own folder (``ckpt_path=RUN/checkpoints/last.ckpt``) would lose what it logged
before it stopped. This one keeps those rows, up to the step the run resumes from: rows
logged after the checkpoint (work the stop threw away) are dropped, so every step appears
once.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.utilities import rank_zero_only


class CSVLogger(LightningCSVLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._earlier: list[dict] | None = None  # rows of the stopped run, until the first new step

    @property
    def experiment(self):
        if self._experiment is None and rank_zero_only.rank == 0:
            path = Path(self.log_dir) / "metrics.csv"
            if path.is_file():
                with path.open(newline="") as f:
                    self._earlier = list(csv.DictReader(f))
        return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if self._earlier is not None:
            first = self.experiment.metrics[-1]["step"]  # the step this run goes on from
            kept = [{k: v for k, v in row.items() if v != ""} for row in self._earlier if int(row["step"]) < first]
            self.experiment.metrics[:0] = kept
            self._earlier = None
