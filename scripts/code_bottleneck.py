"""What the paper's D_H-code path costs: push a perfect Kneser-Ney bigram through it.

    python scripts/code_bottleneck.py --data ../shared/corpora/kjv [--hidden-dims 512 2048]

The SAFFU transformer decodes each unit to a distribution over D_H bit-cipher codes and solves
a final layer M over those distributions (eq. 7). Here the unit is replaced by the best input
it could ever give for the nearest token: p(code | x) = P_KN(. | x) Z~, the exact Kneser-Ney
bigram pushed onto the normalised D_H-bit codes Z~ of the targets. Printed: dev perplexity of
the bigram itself, of M solved by eq. 7 on those inputs (K_M = 1 and 2), and of M fitted by
Adam on the same inputs (``--adam-steps``; the best a final layer can do with this input),
all on the project's tokens and targets. On `kjv` about 10 minutes on 2 cores for D_H = 512
(most of it the Adam fit); D_H = 2048 takes several times longer (``--hidden-dims 512``
skips it).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "corpora" / "kjv"), help="a BabyLM-layout folder")
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--adam-steps", type=int, default=300)
    args = p.parse_args()

    import torch

    from saffu_lab.data.corpus import TextDirCorpus
    from saffu_lab.data.datamodule import LMDataModule
    from saffu_lab.framing import CausalFraming
    from saffu_lab.models.bitcipher import codes_by_frequency
    from saffu_lab.ngram import KneserNey, targets_and_histories
    from saffu_lab.solver import explicit_solution
    from saffu_lab.tokenizer import CountBPE

    torch.manual_seed(0)
    dm = LMDataModule(corpus=TextDirCorpus(path=args.data, cache_dir=str(ROOT / ".cache" / "hf")),
                      tokenizer=CountBPE(progress=False), cache_dir=str(ROOT / ".cache"), framing=CausalFraming(1))
    dm.setup()
    sp, N = dm.special_ids, dm.vocab_size
    y, h = targets_and_histories(*dm.splits["train"], sp, 1)
    dev_y, dev_h = targets_and_histories(*dm.splits["dev"], sp, 1)
    kn = KneserNey(2, N, sp).fit(y, h)
    # the bigram as a dense [N, N] table P(w | x), row by row from its back-off form
    x, w, log1p_s, log_p1 = kn.bigram_backoff_form()
    logits = log_p1.clamp(min=-1e4)[None, :].repeat(N, 1)
    logits[x, w] += log1p_s
    P = torch.softmax(logits, 1).float()
    print(f"{Path(args.data).name}: vocabulary {N}, {y.numel():,} training and {dev_y.numel():,} dev targets")
    print(f"Kneser-Ney bigram (the input's information): dev perplexity "
          f"{math.exp(-float(kn.log_prob(dev_y, dev_h).mean())):.1f}")
    counts = torch.bincount(y, minlength=N).double()
    pair_counts = torch.zeros(N * N).index_add_(0, h[:, 0] * N + y, torch.ones(y.numel())).view(N, N)
    for dim in args.hidden_dims:
        Z = codes_by_frequency(counts, dim)
        codes = P @ (Z / Z.sum(1, keepdim=True))  # [N, D_H]: the unit's ideal output after each token
        F = torch.zeros(N, dim, dtype=torch.float64).index_add_(0, y, codes[h[:, 0]].double())  # F(codes, Y)^T
        for K in (1.0, 2.0):
            M, _ = explicit_solution(F.T, K, 1e-3)
            dev = math.exp(float(torch.nn.functional.cross_entropy(codes[dev_h[:, 0]] @ M.float(), dev_y)))
            print(f"D_H = {dim}: M by eq. 7 (K_M = {K:g}): dev perplexity {dev:.1f}")
        M = explicit_solution(F.T, 1.0, 1e-3)[0].float().requires_grad_()
        opt = torch.optim.Adam([M], lr=0.05)
        for _ in range(args.adam_steps):  # full batch: the input depends on the previous token only
            loss = -(pair_counts * torch.log_softmax(codes @ M, 1)).sum() / pair_counts.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            dev = math.exp(float(torch.nn.functional.cross_entropy(codes[dev_h[:, 0]] @ M, dev_y)))
        print(f"D_H = {dim}: M fitted by Adam ({args.adam_steps} full-batch steps): dev perplexity {dev:.1f}")


if __name__ == "__main__":
    main()
