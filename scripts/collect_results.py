"""Collect a multirun's results: a CSV, Markdown tables and heatmaps.

    python scripts/collect_results.py logs/train/multiruns/2026-11-23_18-00-00 [--out DIR]

Reads every job folder of the sweep (``metrics.json`` or ``failed.json``, the resolved config
``config.yaml`` written by the run, and Hydra's ``.hydra/overrides.yaml``) and writes, into
``--out`` (default ``MULTIRUN_DIR/results``):

- ``results.csv``: one row per job: its overrides, the model settings, the metrics, the status;
- ``curves.csv``: every job's validation perplexity by step (from the CSV logger);
- ``results.md``: for a grid over r and b, one table per aggregation combination shaped like
  the paper's appendix D (rows r, columns b, cells "train, dev" perplexity, best cell bold,
  "-" where the job failed or was refused) under the references on the same targets (unigram,
  Kneser-Ney bigram and trigram); otherwise one table of all jobs with those references;
- ``heatmap_<combination>.png``: dev perplexity over (r, b), one per combination;
- ``curves.png``: the validation curves, when any job trained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

# columns taken from each job's resolved config (dotted path -> column)
CONFIG_COLUMNS = {
    "model._target_": "model",
    "model.radius": "r",
    "model.block_size": "b",
    "model.block_aggregation": "block_aggregation",
    "model.radial_aggregation": "radial_aggregation",
    "model.document_model": "document_model",
    "model.hidden_dim": "hidden_dim",
    "ffn.structure": "ffn",
    "regime.regime": "regime",
    "regime.optimizer.lr": "lr",
    "ablation_table": "table",
    "data.train_tokens": "train_tokens",
    "seed": "seed",
}
METRIC_COLUMNS = {
    "explicit/train_ppl": "train_ppl",
    "val/ppl": "dev_ppl",
    "test/ppl": "test_ppl",
    "explicit/val_ppl": "explicit_dev_ppl",
    "unigram/val_ppl": "unigram_dev_ppl",
    "baseline/kn2_val_ppl": "kn2_dev_ppl",
    "baseline/kn3_val_ppl": "kn3_dev_ppl",
    "unigram/test_ppl": "unigram_test_ppl",
    "baseline/kn2_test_ppl": "kn2_test_ppl",
    "baseline/kn3_test_ppl": "kn3_test_ppl",
    "params": "params",
    "tokens_seen": "tokens_seen",
    "global_step": "steps",
    "explicit/solve_s": "solve_s",
    "time/total_s": "total_s",
    "self_guided/dropped_at_step": "guides_dropped_at",
}


def _get(cfg: dict, dotted: str):
    node = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _overrides(job: Path) -> dict:
    path = job / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return dict(o.lstrip("+~").split("=", 1) for o in items or [] if "=" in o)


def read_job(job: Path) -> dict:
    """One row: overrides, config values, metrics, and the status (ok / failed / running)."""
    overrides = _overrides(job)
    row = {"job": job.name, "folder": str(job), "overrides": " ".join(f"{k}={v}" for k, v in overrides.items())}
    cfg_path = job / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    for dotted, column in CONFIG_COLUMNS.items():
        value = _get(cfg, dotted)
        for key in (dotted, column):  # no resolved config (e.g. a job that failed early): the overrides
            if value is None and key in overrides:
                value = yaml.safe_load(overrides[key])
        row[column] = value
    if isinstance(row["model"], str):
        row["model"] = row["model"].rsplit(".", 1)[-1]
    if row["ffn"] is None and (cfg or row["model"]):
        row["ffn"] = "dense"
    if (job / "metrics.json").exists():
        metrics = json.loads((job / "metrics.json").read_text())
        row.update({column: metrics.get(key) for key, column in METRIC_COLUMNS.items()})
        if metrics.get("interrupted"):  # stopped by a signal: re-running the sweep resumes it
            row["status"], row["error"] = "stopped", f"stopped by {metrics.get('signal')} at step {metrics.get('global_step')}"
        else:
            row["status"], row["error"] = "ok", ""
    elif (job / "failed.json").exists():
        row["status"], row["error"] = "failed", json.loads((job / "failed.json").read_text())["error"]
    else:
        row["status"], row["error"] = "incomplete", ""
    return row


def collect(sweep: Path) -> pd.DataFrame:
    jobs = sorted((p.parent for p in sweep.glob("*/.hydra")), key=lambda p: (len(p.name), p.name))
    if not jobs and not (sweep / "plan.json").exists():
        raise SystemExit(f"error: no job folders (*/.hydra) under {sweep}; give a multirun folder (logs/train/multiruns/...)")
    rows = [read_job(j) for j in jobs]
    plan = sweep / "plan.json"  # saffu_lab.hydra_callbacks.SweepPlan: jobs planned but never started
    if plan.exists():
        started = {r["job"] for r in rows}
        rows += [{"job": str(j["num"]), "folder": str(sweep / str(j["num"])), "overrides": " ".join(j["overrides"]),
                  "status": "missing", "error": "planned, never started"}
                 for j in json.loads(plan.read_text())["jobs"] if str(j["num"]) not in started]
    frame = pd.DataFrame(rows)
    for column in CONFIG_COLUMNS.values():
        if column not in frame:
            frame[column] = None
    for column in METRIC_COLUMNS.values():
        if column not in frame:
            frame[column] = float("nan")
    return frame


def read_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """val/ppl by step for every job that logged one (the CSV logger's metrics.csv); a warm run's
    curve starts at its explicit solution (explicit/val_ppl, logged at step 0), as in figure 1."""
    parts = []
    for job, folder in zip(frame["job"], frame["folder"]):
        path = Path(folder) / "csv" / "metrics.csv"
        if not path.exists():
            continue
        log = pd.read_csv(path)
        if "val/ppl" in log and log["val/ppl"].notna().any():
            curve = log.loc[log["val/ppl"].notna(), ["step", "val/ppl"]].rename(columns={"val/ppl": "dev_ppl"})
            # one point per step: the run's closing summary row repeats a value at the last step
            curve = curve.drop_duplicates("step", keep="first")
            if "explicit/val_ppl" in log:  # only before a trained curve: an explicit-only run stays one point
                solved = log.loc[log["explicit/val_ppl"].notna(), ["step", "explicit/val_ppl"]]
                if len(solved) and (curve["step"] > solved["step"].max()).all():
                    curve = pd.concat([solved.rename(columns={"explicit/val_ppl": "dev_ppl"}), curve])
            parts.append(curve.assign(job=job))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["step", "dev_ppl", "job"])


# --- the paper's appendix-D tables ---------------------------------------------------------------

def combination_name(block: str, radial: str, document: bool) -> str:
    return f"block_{block}_radial_{radial}" + ("_document" if document else "")


def _flag(value) -> bool:
    """A config boolean that may be missing (NaN) for a job that failed before writing its config."""
    return bool(pd.notna(value) and value)


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def combinations(frame: pd.DataFrame):
    """(name, jobs, sorted r values, sorted b values) for each aggregation combination of the sweep."""
    keys = ["block_aggregation", "radial_aggregation", "document_model"]
    for (block, radial, document), group in frame.groupby(keys, dropna=False, sort=False):
        rs, bs = sorted(group["r"].dropna().astype(int).unique()), sorted(group["b"].dropna().astype(int).unique())
        yield combination_name(block, radial, _flag(document)), group, rs, bs


def grid_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{combination: DataFrame of "train, dev" cells, rows r, columns b}; the best dev cell in bold."""
    tables = {}
    for name, group, rs, bs in combinations(frame):
        ok = group[group["status"] == "ok"]
        scored = ok.dropna(subset=["dev_ppl"])
        best = scored.loc[scored["dev_ppl"].idxmin()] if len(scored) else None
        cells = pd.DataFrame("-", index=[f"r = {r}" for r in rs], columns=[f"b = {b}" for b in bs])
        for _, job in ok.iterrows():
            text = f"{_fmt(job['train_ppl'])}, {_fmt(job['dev_ppl'])}"
            if best is not None and job["job"] == best["job"]:
                text = f"**{text}**"
            cells.loc[f"r = {int(job['r'])}", f"b = {int(job['b'])}"] = text
        tables[name] = cells
    return tables


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    header = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in frame.iterrows():
        cells = ([str(label)] if index else []) + [_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def is_grid(frame: pd.DataFrame) -> bool:
    return frame["r"].nunique() > 1 and frame["b"].nunique() > 1


REFERENCES = {"unigram_dev_ppl": "unigram", "kn2_dev_ppl": "Kneser-Ney bigram", "kn3_dev_ppl": "Kneser-Ney trigram"}


def references_line(jobs: pd.DataFrame) -> str:
    """The count-based references of these jobs' dev targets (one value, or the range if the jobs
    were scored on different targets)."""
    parts = []
    for column, name in REFERENCES.items():
        values = jobs[column].dropna() if column in jobs else pd.Series(dtype=float)
        if len(values):
            low, high = values.min(), values.max()
            parts.append(f"{name} {_fmt(low)}" if math.isclose(low, high, rel_tol=1e-6) else f"{name} {_fmt(low)}-{_fmt(high)}")
    return "References on the same dev targets: " + (", ".join(parts) if parts else "none recorded") + "."


def write_markdown(frame: pd.DataFrame, out: Path) -> str:
    failed = frame[frame["status"] != "ok"]
    lines = [f"# Results of {len(frame)} jobs ({len(frame) - len(failed)} ok, {len(failed)} failed, stopped, incomplete or missing)", ""]
    if is_grid(frame):
        for (name, cells), (_, group, _, _) in zip(grid_tables(frame).items(), combinations(frame)):
            lines += [f"## {name.replace('_', ' ')}", "",
                      "Cells: train, dev perplexity; the best dev perplexity in bold; - : no result. "
                      + references_line(group[group["status"] == "ok"]), "",
                      markdown_table(cells), ""]
    else:
        varying = [c for c in CONFIG_COLUMNS.values() if frame[c].astype(str).nunique() > 1]
        references = [c for c in ("unigram_dev_ppl", "kn2_dev_ppl", "kn3_dev_ppl") if frame[c].notna().any()]
        shown = frame[["job", *varying, "params", "train_ppl", "dev_ppl", "test_ppl", *references, "steps", "total_s", "status"]]
        shown = shown.dropna(axis=1, how="all")
        lines += [markdown_table(shown, index=False), ""]
    if len(failed):
        lines += ["## Failed jobs", ""] + [f"- job {j}: {e or s}" for j, e, s in zip(failed["job"], failed["error"], failed["status"])]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


# --- pictures ---------------------------------------------------------------------------------

def plot_heatmaps(frame: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, group, rs, bs in combinations(frame):
        ok = group[group["status"] == "ok"]
        if ok.empty:
            continue
        grid = ok.pivot_table(index="r", columns="b", values="dev_ppl").reindex(index=rs, columns=bs)
        fig, ax = plt.subplots(figsize=(6, 5))
        image = ax.imshow(grid.values, cmap="viridis_r")
        ax.set_xticks(range(grid.shape[1]), [str(b) for b in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(r) for r in grid.index])
        ax.set_xlabel("block size b")
        ax.set_ylabel("radius r")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                value = grid.values[i, j]
                if not math.isnan(value):  # dark text on the light (low-perplexity) cells
                    color = "black" if image.norm(value) < 0.5 else "white"
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_title(f"dev perplexity: {name.replace('_', ' ')}")
        fig.colorbar(image, ax=ax, label="dev perplexity")
        fig.tight_layout()
        path = out / f"heatmap_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def curve_labels(frame: pd.DataFrame) -> dict[str, str]:
    """Each job's overrides less those every job shares (the experiment, the data path)."""
    words = {job: overrides.split() for job, overrides in zip(frame["job"], frame["overrides"])}
    shared = set.intersection(*map(set, words.values())) if len(words) > 1 else set()
    return {job: " ".join(w for w in ws if w not in shared) or job for job, ws in words.items()}


def plot_curves(frame: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Path | None:
    curves = curves.groupby("job").filter(lambda c: len(c) > 1)  # explicit solves have a single point
    if curves.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = curve_labels(frame[frame["job"].isin(curves["job"])])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for job, curve in curves.groupby("job", sort=False):
        ax.plot(curve["step"], curve["dev_ppl"], marker="o", markersize=3, label=labels.get(job, job)[:60])
    ax.set_xlabel("training step")
    ax.set_ylabel("dev perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a multirun folder (logs/train/multiruns/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: SWEEP/results)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"error: {args.sweep} is not a folder; give a multirun folder (logs/train/multiruns/<time>)", file=sys.stderr)
        return 2
    out = args.out or args.sweep / "results"
    out.mkdir(parents=True, exist_ok=True)
    frame = collect(args.sweep)
    curves = read_curves(frame)
    frame.to_csv(out / "results.csv", index=False)
    curves.to_csv(out / "curves.csv", index=False)
    write_markdown(frame, out)
    pictures = plot_heatmaps(frame, out) if is_grid(frame) else []
    curve_plot = plot_curves(frame, curves, out)
    pictures += [curve_plot] if curve_plot else []
    counts = frame["status"].value_counts()
    status = ", ".join(f"{counts[s]} {s}" for s in ("ok", "failed", "stopped", "incomplete", "missing") if s in counts)
    planned = "planned jobs" if (args.sweep / "plan.json").exists() else "jobs"
    print(f"{len(frame)} {planned}: {status} -> {out}/results.csv, results.md" + "".join(f", {p.name}" for p in pictures))
    if "stopped" in counts or "missing" in counts:
        print(f"to finish the sweep, re-run its command with hydra.sweep.dir={args.sweep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
