"""Dev perplexity against CPU wall-clock, in one run on one corpus: warm SAFFU, the same SAFFU
cold, the GPT baseline cold, and Kneser-Ney n-grams as horizontal lines with their fitting time.

    python scripts/benchmark_time_to_ppl.py --data ../shared/corpora/kjv --minutes 60
    python scripts/benchmark_time_to_ppl.py --data ../shared/corpora/kjv --minutes 10 --runs warm gpt

Each model run is ``python train.py`` in its own process, stopped by ``trainer.max_time`` after
``--minutes`` of training, validated ``--vals`` times per epoch; ``time/elapsed_s``
(callbacks.WallClock) gives each validation's time since fit started, the explicit solve included.
``max_time`` starts after the solve, so a solved run goes on past the budget by the solve's
seconds: the table reads only the points within the budget. The runs go one after another, so
they share the machine with nothing of this script.

    warm  experiment=explicit_best regime=warm   the log-linear SAFFU solved, then backprop
    cold  experiment=explicit_best regime=cold   the same SAFFU from its cold initialisation
    gpt   model=gpt regime=cold                  the GPT baseline, cold (--gpt-lr, its sweep's best)
    residual  experiment=residual_warm           the log-linear SAFFU solved, plus a transformer of the
                                                 GPT's size that starts at zero; backprop on both
    mixture   experiment=mixture_warm            the log-linear SAFFU solved and kept, interpolated per
                                                 context with the GPT baseline (its optimiser, its own
                                                 loss plus the mixture's)

``--replot`` rebuilds the table and figure from the ``curves.csv`` of an earlier ``--out``.

Writes ``curves.csv`` (run, elapsed_s, step, val_ppl), ``time_to_ppl.csv`` (the first time each
run reaches each ``--targets`` perplexity), ``time_to_ppl.png`` and ``time_to_ppl.md`` into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RUNS = {
    "warm": ["experiment=explicit_best", "regime=warm"],
    "cold": ["experiment=explicit_best", "regime=cold"],
    "gpt": ["model=gpt", "regime=cold"],
    "residual": ["experiment=residual_warm"],
    "mixture": ["experiment=mixture_warm"],
}
LABELS = {"warm": "log-linear SAFFU, warm (solve + backprop)", "cold": "log-linear SAFFU, cold",
          "gpt": "GPT baseline, cold", "residual": "residual SAFFU, warm (solve + backprop with a transformer)",
          "mixture": "SAFFU-GPT mixture, warm (solve, then backprop on the GPT)"}


def run_model(name: str, args, out: Path) -> list[dict]:
    """One ``train.py`` run; its validations as (elapsed_s, step, val_ppl) rows."""
    folder = out / "runs" / name
    hh, mm = divmod(args.minutes, 60)
    cmd = [sys.executable, str(ROOT / "train.py"), *RUNS[name], "data=text_dir", f"data.path={args.data}",
           "logger=csv", f"trainer.max_time=00:{int(hh):02d}:{int(mm):02d}:00", f"trainer.max_epochs={args.max_epochs}",
           f"trainer.val_check_interval={1 / args.vals}", f"hydra.run.dir={folder}", f"seed={args.seed}",
           "callbacks.early_stopping.max_rises=1000000", *args.extra]
    if name == "gpt":
        cmd += [f"regime.optimizer.lr={args.gpt_lr}", f"model.d_model={args.gpt_d_model}", f"model.n_layer={args.gpt_layers}"]
    if name in ("residual", "mixture"):  # its transformer is the GPT baseline's size
        cmd += [f"model.transformer.d_model={args.gpt_d_model}", f"model.transformer.n_layer={args.gpt_layers}"]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"error: the {name} run failed (exit {done.returncode}); see {out / f'{name}.log'}")
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = []
    if "explicit/val_ppl" in metrics:  # the solved model, before any backprop
        rows.append({"run": name, "elapsed_s": metrics["explicit/wall_s"], "step": 0, "val_ppl": metrics["explicit/val_ppl"]})
    for path in sorted(folder.glob("csv/**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("val/ppl") and row.get("time/elapsed_s"):
                    rows.append({"run": name, "elapsed_s": float(row["time/elapsed_s"]), "step": int(row["step"]),
                                 "val_ppl": float(row["val/ppl"])})
    print(f"[{name}] {len(rows)} points in {time.perf_counter() - start:.0f} s; best dev "
          f"{min(r['val_ppl'] for r in rows):.2f}" if rows else f"[{name}] no validation", flush=True)
    return rows


def read_curves(path: Path) -> dict[str, list[dict]]:
    """``curves.csv`` of an earlier run, as run_model returns its rows."""
    if not path.is_file():
        raise SystemExit(f"error: --replot reads {path}, which does not exist; give --out the folder of an earlier run")
    curves: dict[str, list[dict]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["run"] not in LABELS:
                raise SystemExit(f"error: {path} names run {row['run']!r}; expected one of {', '.join(LABELS)}")
            curves.setdefault(row["run"], []).append(
                {"run": row["run"], "elapsed_s": float(row["elapsed_s"]), "step": int(row["step"]), "val_ppl": float(row["val_ppl"])})
    return curves


def kneser_ney_lines(args) -> list[dict]:
    """Each order's dev perplexity and fitting time (counting and scoring), on the tokens the
    runs use (the same cache, the same framing of targets)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=text_dir", f"data.path={args.data}", *args.extra])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    lines = []
    for n in args.orders:
        start = time.perf_counter()
        ppl = dm.kneser_ney_perplexity(n, "train", "dev")
        lines.append({"order": n, "val_ppl": ppl, "fit_s": time.perf_counter() - start})
        print(f"[kn{n}] dev {ppl:.2f} in {lines[-1]['fit_s']:.2f} s", flush=True)
    return lines


def first_time_below(rows: list[dict], target: float) -> float | None:
    hits = [r["elapsed_s"] for r in sorted(rows, key=lambda r: r["elapsed_s"]) if r["val_ppl"] <= target]
    return hits[0] if hits else None


def plot(curves: dict, lines: list[dict], path: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["elapsed_s"])
        ax.plot([r["elapsed_s"] / 60 for r in rows], [r["val_ppl"] for r in rows], marker="o", ms=3, label=LABELS[name])
    for line, style in zip(lines, ["--", "-.", ":"]):
        ax.axhline(line["val_ppl"], color="grey", ls=style,
                   label=f"Kneser-Ney {line['order']}-gram ({line['val_ppl']:.1f}; fitted in {line['fit_s']:.1f} s)")
    ax.set_yscale("log")
    ax.set_xlim(0, minutes * 1.02)
    ax.set_xlabel("CPU wall-clock since fit start (minutes)")
    ax.set_ylabel("dev perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "corpora" / "kjv"), help="a corpus folder (data=text_dir)")
    p.add_argument("--minutes", type=float, default=60.0, help="fit budget of each run")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--vals", type=int, default=4, help="validations per epoch")
    p.add_argument("--max-epochs", type=int, default=100, help="an upper bound; max_time ends the runs")
    p.add_argument("--orders", type=int, nargs="*", default=[2, 3, 4], help="Kneser-Ney orders drawn as lines")
    p.add_argument("--targets", type=float, nargs="*",
                   help="perplexities to time (default: 100 and each Kneser-Ney line's dev perplexity)")
    p.add_argument("--gpt-lr", type=float, default=3e-3)
    p.add_argument("--gpt-d-model", type=int, default=256)
    p.add_argument("--gpt-layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "logs" / "benchmark_time_to_ppl"))
    p.add_argument("--replot", action="store_true",
                   help="no runs: rebuild the table and figure from --out's curves.csv (--data and --minutes as in that run)")
    p.add_argument("extra", nargs="*", help="more overrides for every run (e.g. trainer.precision=32-true)")
    args = p.parse_args()
    if args.minutes <= 0 or args.vals < 1:
        raise SystemExit(f"error: --minutes={args.minutes} and --vals={args.vals} must be positive")
    if not Path(args.data).is_dir():
        raise SystemExit(f"error: --data {args.data} is not a folder; give a corpus folder, e.g. ../shared/corpora/kjv")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = kneser_ney_lines(args)
    if args.targets is None:
        args.targets = [100.0] + [round(line["val_ppl"], 1) for line in lines]
    if args.replot:  # the curves of an earlier run; the Kneser-Ney lines above are refitted (seconds)
        curves = read_curves(out / "curves.csv")
    else:
        curves = {name: run_model(name, args, out) for name in args.runs}
        with open(out / "curves.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["run", "elapsed_s", "step", "val_ppl"])
            w.writeheader()
            for rows in curves.values():
                w.writerows(sorted(rows, key=lambda r: r["elapsed_s"]))
    # trainer.max_time starts after the explicit solve (Lightning's Timer starts at on_train_start), so a
    # solved run goes on for the solve's seconds past the budget: the table reads only points within it
    within = {name: [r for r in rows if r["elapsed_s"] <= args.minutes * 60] for name, rows in curves.items()}
    table = [{"run": name, **{f"ppl<={t:g}": first_time_below(rows, t) for t in args.targets},
              "best_val_ppl": min((r["val_ppl"] for r in rows), default=math.nan)} for name, rows in within.items()]
    with open(out / "time_to_ppl.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    fmt = lambda s: "not reached" if s is None else f"{s / 60:.1f} min"  # noqa: E731
    md = [f"Budget {args.minutes:g} min of training per run (points within {args.minutes:g} min since fit start); corpus {args.data}.", "",
          "| run | " + " | ".join(f"time to dev ppl {t:g}" for t in args.targets) + " | best dev ppl in the budget |",
          "|---|" + "---|" * (len(args.targets) + 1)]
    md += [f"| {LABELS[r['run']]} | " + " | ".join(fmt(r[f'ppl<={t:g}']) for t in args.targets) + f" | {r['best_val_ppl']:.2f} |"
           for r in table]
    gap = " |" * (len(args.targets) - 1)
    md += [f"| Kneser-Ney {line['order']}-gram | fitted and scored in {line['fit_s']:.1f} s |{gap} {line['val_ppl']:.2f} |"
           for line in lines]
    (out / "time_to_ppl.md").write_text("\n".join(md) + "\n")
    plot(curves, lines, out / "time_to_ppl.png", args.minutes)
    print("\n".join(md))
    print(f"-> {out}/time_to_ppl.png, curves.csv, time_to_ppl.csv")


if __name__ == "__main__":
    main()
