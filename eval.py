"""Score a trained model on a corpus: `python eval.py ckpt_path=CKPT [data=text_dir data.path=DIR]`.

Writes metrics.json into logs/eval/runs/<time>/; see src/saffu_lab/evaluate.py and README.md.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("SAFFU_LAB_ROOT", ROOT)
sys.path.insert(0, os.path.join(ROOT, "src"))  # runs from a checkout without `pip install -e .`

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from saffu_lab.evaluate import main_guarded  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    main_guarded(cfg)


if __name__ == "__main__":
    main()
