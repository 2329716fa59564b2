"""Sweeps: launcher and search configs, a multirun that survives a failing job (W&B group and
tags, shared caches), an Optuna search, the results collector and the analysis notebook."""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, ROOT, TINY_DATA

sys.path.insert(0, str(ROOT / "scripts"))
import collect_results  # noqa: E402

TINY_GRID = [o for o in TINY_DATA if not o.startswith("callbacks.samples")] + ["model.block_dim=32", "model.radial_dim=16", "model.hidden_dim=64", "data.batch_size=256"]


def _compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("launcher,target", [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher, target):
    cfg = _compose_with_hydra([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.timeout_min > 0 and cfg.hydra.launcher.array_parallelism > 0


def test_optuna_search_and_sweep_grids_compose():
    cfg = _compose_with_hydra(["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {"model.radius", "model.block_size", "model.hidden_dim", "regime.optimizer.lr"}
    assert cfg.optimized_metric == "val/ppl"
    grid = _compose_with_hydra(["experiment=paper_ablation"]).hydra.sweeper.params
    assert grid["model.radius"] == grid["model.block_size"] == "2,4,8,16,32,64,128"
    assert grid["ablation"] == "table1,table2,table3,table4,table5"  # 5 x 7 x 7 = 245 jobs
    tables = {t: _compose_with_hydra(["experiment=paper_ablation", f"ablation={t}"]) for t in ("table2", "table5")}
    assert (tables["table2"].model.block_aggregation, tables["table2"].model.radial_aggregation) == ("cat", "sum")
    assert tables["table5"].model.document_model and tables["table5"].model.radial_aggregation == "cat"
    figure = _compose_with_hydra(["experiment=paper_warm_vs_cold"]).hydra.sweeper.params
    assert figure == {"model.radius": "8,128", "regime": "warm_as_cold,cold"}


def test_figure_1_trains_warm_and_cold_alike():
    """regime=warm_as_cold is regime=cold's training (optimiser, schedule, embeddings) after the solve."""
    warm, cold = (_compose_with_hydra(["experiment=paper_warm_vs_cold", f"regime={r}"]) for r in ("warm_as_cold", "cold"))
    assert {**warm.regime, "regime": "cold"} == cold.regime
    assert warm.regime.regime == "warm_as_cold" and "explicit_solve" in warm.callbacks and "explicit_solve" not in cold.callbacks


def _multirun(args: list[str], sweep_dir: Path, cache_dir: Path, timeout: int = 600):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache_dir}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ablation_sweep(tmp_path_factory):
    """A 2 x 2 corner of the ablation grid, run with joblib: b = 1 is refused (a block needs a start
    token and a target), r = 8 > b = 4 is solved (the radius reads across blocks)."""
    root = tmp_path_factory.mktemp("sweep")
    proc = _multirun(["experiment=paper_ablation", "ablation=table3,table5", "model.radius=2,8", "model.block_size=1,4",
                      "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY_GRID], root / "sweep", root / "cache")
    return proc, root / "sweep"


def test_a_failing_job_is_recorded_and_the_others_finish(ablation_sweep):
    proc, sweep = ablation_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {p.parent.name: p.parent for p in sweep.glob("*/.hydra")}
    assert len(jobs) == 8
    failed = sorted(p.parent.name for p in sweep.glob("*/failed.json"))
    finished = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert len(failed) == 4 and len(finished) == 4  # b = 1 in both tables and both radii; the rest ran
    record = json.loads((sweep / failed[0] / "failed.json").read_text())
    assert "block_size=1" in record["error"] and record["user_error"] and "model.block_size=1" in record["overrides"]
    assert "4 of 8 jobs failed" in proc.stderr
    assert len(json.loads((sweep / "failures.json").read_text())) == 4
    solved = [json.loads((sweep / j / "metrics.json").read_text()) for j in finished]
    assert any(m["explicit/passes"] == 3 for m in solved)  # start-up only: attention, decoders, final layer


def test_sweep_jobs_are_grouped_and_tagged_in_wandb_and_share_the_cache(ablation_sweep):
    from saffu_lab.wandb_offline import run_info

    _, sweep = ablation_sweep
    job = next(p.parent for p in sweep.glob("*/metrics.json"))
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    info = run_info(job / "wandb")
    assert info["group"] == "paper_ablation" and info["job_type"] == "sweep"
    assert {"paper_ablation", *[o for o in overrides if o.startswith(("model.radius", "model.block_size", "ablation"))]} <= set(info["tags"])
    metrics = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    # one tokenisation for the whole sweep: every job read the same cache folder
    assert len({m["data/cache"] for m in metrics}) == 1
    assert all(m["threads"] == 1 for m in metrics)  # the experiment runs one torch thread per job


def test_collector_on_the_sweep(ablation_sweep, tmp_path):
    _, sweep = ablation_sweep
    assert collect_results.main([str(sweep), "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "results.csv")
    assert len(frame) == 8 and (frame.status == "ok").sum() == 4
    assert frame.loc[frame.status == "ok", ["train_ppl", "dev_ppl", "kn2_dev_ppl", "kn3_dev_ppl"]].notna().all().all()
    assert len(frame[(frame.r == 8) & (frame.b == 4) & (frame.status == "ok")]) == 2  # r > b solved in both tables
    text = (tmp_path / "results.md").read_text()
    assert "## block sum radial cat document" in text and text.count("| r = 8 | - |") == 2
    assert "Kneser-Ney bigram" in text
    assert {p.name for p in tmp_path.glob("heatmap_*.png")} == {"heatmap_block_sum_radial_cat.png",
                                                               "heatmap_block_sum_radial_cat_document.png"}
    assert not (tmp_path / "curves.png").exists()  # explicit solves have no learning curve


# --- the collector and the notebook on a hand-made fixture ---------------------------------------

def _fake_job(sweep: Path, num: int, overrides: dict, config: dict, metrics: dict | None, curve: list | None = None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is None:
        (job / "failed.json").write_text(json.dumps({"error": "ConfigError: model.block_size=1 must be >= 2"}))
    else:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if curve:
        (job / "csv").mkdir()
        rows = [{"epoch": 0, "step": s, "val/ppl": v, "train/loss": ""} for s, v in curve]
        pd.DataFrame(rows).to_csv(job / "csv" / "metrics.csv", index=False)


@pytest.fixture()
def fixture_sweep(tmp_path) -> Path:
    """A 2 x 2 (r, b) grid for two aggregation combinations (one cell failed), plus warm/cold curves."""
    sweep, num = tmp_path / "sweep", 0
    for block, radial in (("sum", "cat"), ("cat", "sum")):
        for r in (2, 8):
            for b in (4, 8):
                model = {"_target_": "saffu_lab.models.saffu.SAFFUTransformer", "radius": r, "block_size": b,
                         "block_aggregation": block, "radial_aggregation": radial, "document_model": False}
                config = {"model": model, "regime": {"regime": "explicit"}, "seed": 0}
                dev = 100 - r - b + (5 if block == "cat" else 0)
                metrics = None if r > b else {"val/ppl": float(dev), "explicit/train_ppl": dev - 10.0, "params": 1000}
                _fake_job(sweep, num, {"model.radius": r, "model.block_size": b}, config, metrics)
                num += 1
    return sweep


def test_collector_tables_are_shaped_like_appendix_d(fixture_sweep, tmp_path):
    assert collect_results.main([str(fixture_sweep), "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "results.csv")
    assert len(frame) == 8 and list(frame.status).count("failed") == 2
    tables = collect_results.grid_tables(collect_results.collect(fixture_sweep))
    sum_cat = tables["block_sum_radial_cat"]
    assert list(sum_cat.index) == ["r = 2", "r = 8"] and list(sum_cat.columns) == ["b = 4", "b = 8"]
    assert sum_cat.loc["r = 2", "b = 4"] == "84.0, 94.0"
    assert sum_cat.loc["r = 8", "b = 8"] == "**74.0, 84.0**"  # the lowest dev perplexity, in bold
    assert sum_cat.loc["r = 8", "b = 4"] == "-"  # the failed cell
    assert tables["block_cat_radial_sum"].loc["r = 8", "b = 8"] == "**79.0, 89.0**"
    text = (tmp_path / "results.md").read_text()
    assert "| r = 8 | - | **74.0, 84.0** |" in text and "## Failed jobs" in text
    assert (tmp_path / "heatmap_block_sum_radial_cat.png").stat().st_size > 1000


def test_collector_survives_jobs_without_config_or_dev_perplexity(fixture_sweep, tmp_path):
    early = fixture_sweep / "8"  # failed before writing its config
    (early / ".hydra").mkdir(parents=True)
    (early / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.radius=16", "model.block_size=8"]))
    (early / "failed.json").write_text(json.dumps({"error": "ConfigError: no value for data.path"}))
    diverged = json.loads((fixture_sweep / "1" / "metrics.json").read_text())
    (fixture_sweep / "1" / "metrics.json").write_text(json.dumps({**diverged, "val/ppl": float("nan")}))
    assert collect_results.main([str(fixture_sweep), "--out", str(tmp_path)]) == 0
    tables = collect_results.grid_tables(collect_results.collect(fixture_sweep))
    assert not any(name.endswith("_document") for name in tables)  # no phantom table from the config-less job
    assert tables["block_sum_radial_cat"].loc["r = 2", "b = 8"] == "80.0, -"  # train kept, dev NaN


def test_warm_curves_start_at_the_explicit_solution_and_labels_show_what_varies(tmp_path):
    sweep = tmp_path / "sweep"
    shared = {"experiment": "paper_warm_vs_cold", "data.path": "/corpus"}
    for num, regime in enumerate(("warm", "cold")):
        config = {"model": {"radius": 8, "block_size": 8}, "regime": {"regime": regime}}
        _fake_job(sweep, num, {**shared, "regime": regime}, config, {"val/ppl": 50.0}, [(10, 60.0), (20, 50.0)])
    log = sweep / "0" / "csv" / "metrics.csv"  # the warm run also logged its explicit solution at step 0
    pd.concat([pd.DataFrame([{"step": 0, "explicit/val_ppl": 70.0}]), pd.read_csv(log)]).to_csv(log, index=False)
    frame = collect_results.collect(sweep)
    curves = collect_results.read_curves(frame)
    assert curves[curves.job == "0"][["step", "dev_ppl"]].values.tolist() == [[0, 70.0], [10, 60.0], [20, 50.0]]
    assert curves[curves.job == "1"]["step"].tolist() == [10, 20]
    assert collect_results.curve_labels(frame) == {"0": "regime=warm", "1": "regime=cold"}


def test_collector_refuses_a_folder_without_jobs(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no job folders"):
        collect_results.main([str(tmp_path)])
    assert collect_results.main([str(tmp_path / "missing")]) == 2


def test_analysis_notebook_runs_end_to_end(fixture_sweep, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # add warm and cold runs with learning curves, so every section of the notebook has data
    for num, regime, curve in ((8, "warm", [(10, 90.0), (20, 80.0), (30, 75.0)]), (9, "cold", [(10, 400.0), (20, 300.0), (30, 250.0)])):
        config = {"model": {"_target_": "saffu_lab.models.saffu.SAFFUTransformer", "radius": 8, "block_size": 8,
                            "block_aggregation": "sum", "radial_aggregation": "cat", "document_model": False},
                  "regime": {"regime": regime}}
        _fake_job(fixture_sweep, num, {"regime": regime}, config, {"val/ppl": curve[-1][1], "params": 1000}, curve)
    results = tmp_path / "results"
    assert collect_results.main([str(fixture_sweep), "--out", str(results)]) == 0
    assert len(pd.read_csv(results / "curves.csv")) == 6
    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    monkeypatch.setenv("SAFFU_LAB_ROOT", str(tmp_path))  # the repository root, as the kernel in notebooks/ sees it
    monkeypatch.setenv("SAFFU_RESULTS", "results")  # relative to that root
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "10 jobs" in text and "best: r=8 b=8 block sum radial cat: dev 75.0" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # heatmaps and learning curves
    assert {p.name for p in results.glob("notebook_*.png")} >= {"notebook_appendix_d.png", "notebook_warm_vs_cold.png"}


def test_analysis_notebook_runs_headless_with_the_readme_command(fixture_sweep, tmp_path):
    """notebooks/README.md: `SAFFU_RESULTS=... jupyter execute notebooks/analysis.ipynb`, from the
    repository root, with what requirements.txt installs (nbclient's jupyter-execute)."""
    results = tmp_path / "results"
    assert collect_results.main([str(fixture_sweep), "--out", str(results)]) == 0
    jupyter_execute = Path(sys.executable).parent / "jupyter-execute"
    env = {**os.environ, "SAFFU_RESULTS": str(results)}
    proc = subprocess.run([str(jupyter_execute), "notebooks/analysis.ipynb"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (results / "notebook_appendix_d.png").exists()


def test_optuna_search_runs_and_records_the_best_trial(tmp_path):
    # command-line ranges replace the config's search space (small models for a test)
    space = ["model.radius=choice(2,4)", "model.block_size=choice(8,16)", "model.hidden_dim=choice(32,64)"]
    tiny = [o for o in TINY_GRID if not o.startswith("model.hidden_dim")]
    proc = _multirun(["hparams_search=optuna", "regime=explicit", "hydra.sweeper.n_trials=3", *space,
                      *tiny, "logger=csv", "callbacks.samples=null"], tmp_path / "optuna", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optuna" / "optimization_results.yaml").read_text())
    values = [json.loads(p.read_text())["val/ppl"] for p in (tmp_path / "optuna").glob("*/metrics.json")]
    assert len(values) == 3 and math.isclose(best["best_value"], min(values), rel_tol=1e-6)
