"""Benchmark structured FFNs in the GPT baseline, as ratios to dense measured in one run.

    python scripts/benchmark_ffn.py [--d-model 128 --n-layer 4 --context 128 --batch 32] [--device cuda]

Training: tokens/s of forward + backward + AdamW steps on random tokens, for each structure
at 50% and 25% of the dense FFN parameters. Decoding: latency of one eval forward pass over
a full context at batch 1 and 64, with pre-merge (batches below 16 rows use the merged dense
matrices) and without it. Medians of repeated timings after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saffu_lab.models.ffn import DenseFFN, StructuredFFN  # noqa: E402
from saffu_lab.models.gpt import GPT  # noqa: E402


def median_time(fn, repeats: int, warmup: int = 2, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # GPU work is asynchronous
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(args, structure: str | None, ratio: float | None, premerge: int | None) -> GPT:
    torch.manual_seed(0)
    ffn = DenseFFN if structure is None else (lambda d: StructuredFFN(d, structure, param_ratio=ratio, premerge_below=premerge))
    return GPT(vocab_size=args.vocab, context_length=args.context, n_layer=args.n_layer, n_head=args.n_head,
               d_model=args.d_model, dropout=0.0, ffn=ffn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--vocab", type=int, default=565)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU; synchronised around every timing)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda asks for a CUDA GPU but torch sees none; use --device cpu")

    configs = [("dense", None, None)] + [(s, s, r) for r in (0.5, 0.25) for s in ("lowrank", "blockdense", "blockshuffle")]
    x = torch.randint(0, args.vocab, (args.batch, args.context), device=args.device)
    rows = []
    for name, structure, ratio in configs:
        net = build(args, structure, ratio, premerge=16).to(args.device)
        ffn_params = sum(p.numel() for b in net.blocks for p in b.ffn.parameters())
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step():
            loss = torch.nn.functional.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()

        train_s = median_time(step, args.repeats, device=args.device)
        net.eval()
        latency = {}
        with torch.no_grad():
            for batch in (1, 64):
                idx = torch.randint(0, args.vocab, (batch, args.context), device=args.device)
                latency[batch] = median_time(lambda: net(idx), args.repeats, device=args.device)
                if structure is not None:
                    for block in net.blocks:  # the same weights without pre-merge
                        for layer in (block.ffn.up, block.ffn.down):
                            layer.premerge_below = None
                    latency[(batch, "off")] = median_time(lambda: net(idx), args.repeats, device=args.device)
                    for block in net.blocks:
                        for layer in (block.ffn.up, block.ffn.down):
                            layer.premerge_below = 16
        rows.append((name, ratio, ffn_params, args.batch * (args.context - 1) / train_s, latency))
        print(f"  {name:12s} {ratio or 1.0:.2f}: {rows[-1][3]:,.0f} train tok/s", flush=True)

    dense = rows[0]
    print(f"\nGPT d_model={args.d_model}, {args.n_layer} layers, context {args.context}, training batch {args.batch}, "
          f"device {args.device}; "
          f"decoding = one eval forward over the full context; ratios to dense, one run\n")
    print("| FFN | target fraction | FFN params (x dense) | train tokens/s (x dense) | batch 1 latency, pre-merge (x dense) | "
          "batch 1, no pre-merge | batch 64 latency (x dense) |")
    print("|---|---|---|---|---|---|---|")
    for name, ratio, params, tps, lat in rows:
        if ratio is None:
            print(f"| dense | 1 | {params:,} (1.00) | {tps:,.0f} (1.00) | {lat[1] * 1e3:.2f} ms (1.00) | — | {lat[64] * 1e3:.1f} ms (1.00) |")
            continue
        print(f"| {name} | {ratio} | {params:,} ({params / dense[2]:.2f}) | {tps:,.0f} ({tps / dense[3]:.2f}) | "
              f"{lat[1] * 1e3:.2f} ms ({lat[1] / dense[4][1]:.2f}) | {lat[(1, 'off')] * 1e3:.2f} ms ({lat[(1, 'off')] / dense[4][1]:.2f}) | "
              f"{lat[64] * 1e3:.1f} ms ({lat[64] / dense[4][64]:.2f}) |")


if __name__ == "__main__":
    main()
