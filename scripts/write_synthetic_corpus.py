"""Write the synthetic corpus to a folder in BabyLM layout, to read it or to use it as text_dir.

    python scripts/write_synthetic_corpus.py OUT_DIR [--seed 0] [--train-words 170000]
    python train.py data=text_dir data.path=OUT_DIR     # the same text through the text_dir loader
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saffu_lab.data.corpus import SyntheticCorpus, write_babylm_layout  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-words", type=int, default=170_000)
    parser.add_argument("--dev-words", type=int, default=17_000)
    parser.add_argument("--test-words", type=int, default=17_000)
    args = parser.parse_args()
    corpus = SyntheticCorpus(args.seed, args.train_words, args.dev_words, args.test_words).load()
    folder = write_babylm_layout(corpus, args.out_dir, stem="synthetic")
    for split in ("train", "dev", "test"):
        docs = corpus.split(split)
        print(f"{folder / f'synthetic.{split}'}: {len(docs)} documents, {sum(d.count(' ') + 1 for d in docs)} words")


if __name__ == "__main__":
    main()
