"""Train a language model: `python train.py [group=option ...] [key=value ...]`.

`python train.py --help` lists the config groups; see README.md.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("SAFFU_LAB_ROOT", ROOT)
sys.path.insert(0, os.path.join(ROOT, "src"))  # runs from a checkout without `pip install -e .`

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from saffu_lab.resume import register_resolvers  # noqa: E402
from saffu_lab.train import main_guarded  # noqa: E402

register_resolvers()  # ${run_folder:...} in conf/hydra/default.yaml


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return main_guarded(cfg)


if __name__ == "__main__":
    main()
