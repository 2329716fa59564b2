"""Benchmark the explicit solve: throughput, peak memory, and the fraction of the machine's
matmul peak, at several corpus sizes (to show that time grows linearly with tokens).

    python scripts/benchmark_solver.py --data ../shared/corpora/kjv --sizes 250000 500000 1000000
    python scripts/benchmark_solver.py --model loglinear --sizes 1000000   # experiment=explicit_best

Each size runs in a fresh process (so its peak RSS is its own): it solves the model twice,
once timed and once under ``torch.utils.flop_counter.FlopCounterMode`` to count the matmul
FLOPs (gathers and scatters count zero, so the fraction is a lower bound on the work done).
The machine's matmul FLOP/s is measured in the parent with float32 square matmuls.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def child(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from saffu_lab.data.corpus import TextDirCorpus
    from saffu_lab.data.datamodule import LMDataModule
    from saffu_lab.framing import BlockFraming
    from saffu_lab.models.loglinear import LogLinearSAFFU
    from saffu_lab.models.saffu import SAFFUTransformer
    from saffu_lab.solver import ExplicitSolver
    from saffu_lab.solver_loglinear import LogLinearSolver
    from saffu_lab.tokenizer import CountBPE

    torch.set_flush_denormal(args.flush_denormal)  # as train.py does (flush_denormal, default true)
    torch.manual_seed(0)
    dm = LMDataModule(corpus=TextDirCorpus(path=args.data, cache_dir=str(ROOT / ".cache" / "hf")),
                      tokenizer=CountBPE(progress=False), cache_dir=str(ROOT / ".cache"),
                      framing=BlockFraming(args.block_size, args.radius), train_tokens=args.child)
    dm.setup()
    train = dm.datasets["train"]
    if args.model == "loglinear":  # the log-linear SAFFU of experiment=explicit_best
        Model, model = LogLinearSAFFU, dict(block_size=args.block_size, radius=args.radius, block_dim=args.block_dim)
        solver = LogLinearSolver(batch_size=args.batch_size, progress=False)
    else:
        Model = SAFFUTransformer
        model = dict(block_size=args.block_size, radius=args.radius, block_dim=args.block_dim, radial_dim=args.radial_dim,
                     hidden_dim=args.hidden_dim, block_aggregation=args.block_aggregation,
                     radial_aggregation=args.radial_aggregation)
        solver = ExplicitSolver(fold_tokens=args.fold_tokens, tuning_iterations=args.tuning, batch_size=args.batch_size,
                                progress=False)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    net = Model(**dm.model_kwargs(), **model)
    start = time.perf_counter()
    report = solver.solve(net, train)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with FlopCounterMode(display=False) as counter:
        solver.solve(Model(**dm.model_kwargs(), **model), train)
    return {"tokens": len(train), "seconds": seconds, "tokens_per_s": len(train) / seconds, "peak_rss_gib": peak_gib,
            "rss_after_data_gib": rss_before / 2**20, "flops": counter.get_total_flops(), "stages_s": report.seconds,
            "params": sum(p.numel() for p in net.parameters()), "vocab": dm.vocab_size}


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "corpora" / "kjv"), help="a BabyLM-layout folder")
    p.add_argument("--sizes", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    p.add_argument("--model", choices=["transformer", "loglinear"], default="transformer",
                   help="the paper's SAFFU transformer, or the log-linear SAFFU (experiment=explicit_best)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--radius", type=int, default=8)
    p.add_argument("--block-dim", type=int, default=128)
    p.add_argument("--radial-dim", type=int, default=32)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--block-aggregation", default="sum")
    p.add_argument("--radial-aggregation", default="cat")
    p.add_argument("--tuning", type=int, default=1, help="tuning iterations after the start-up")
    p.add_argument("--fold-tokens", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false",
                   help="keep subnormal floats (train.py's flush_denormal=false)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    peak = matmul_flops_per_s()
    print(f"matmul peak (float32, 2048^2, best of 10): {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        r = rows[-1]
        print(f"  {r['tokens']:>9,} targets: {r['seconds']:6.1f} s  {r['tokens_per_s']:>8,.0f} tok/s  peak RSS {r['peak_rss_gib']:.2f} GiB",
              flush=True)
    base = rows[0]["seconds"] / rows[0]["tokens"]
    print("\n| targets | solve s | tokens/s | s per token vs first | peak RSS GiB | counted GFLOP | GFLOP/s | fraction of matmul peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        achieved = r["flops"] / r["seconds"]
        print(f"| {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['seconds'] / r['tokens'] / base:.2f} | "
              f"{r['peak_rss_gib']:.2f} | {r['flops'] / 1e9:.1f} | {achieved / 1e9:.1f} | {achieved / peak:.1%} |")
    if args.model == "loglinear":
        print(f"\nmodel: log-linear SAFFU, b={args.block_size}, r={args.radius}, D_b={args.block_dim}, "
              f"vocab {rows[-1]['vocab']}, {rows[-1]['params']:,} parameters; units, calibration, units again")
    else:
        print(f"\nmodel: b={args.block_size} ({args.block_aggregation}), r={args.radius} ({args.radial_aggregation}), "
              f"D_b={args.block_dim}, D_r={args.radial_dim}, D_H={args.hidden_dim}, vocab {rows[-1]['vocab']}, "
              f"{rows[-1]['params']:,} parameters; start-up + {args.tuning} tuning pass(es); "
              f"flush_denormal={args.flush_denormal}")
    if args.out:
        Path(args.out).write_text(json.dumps({"matmul_flops_per_s": peak, "runs": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
