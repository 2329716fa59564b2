"""Sample from a trained model: `python generate.py CKPT --prompt TEXT [--num-samples N] [--seed S] ...`.

`python generate.py --help` lists the options; see src/saffu_lab/generate.py and README.md.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "src"))  # runs from a checkout without `pip install -e .`

from saffu_lab.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
