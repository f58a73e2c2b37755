"""Recompute the diagnostics of a saved run, without retraining.

    python -m linearize.diagnose run_dir=outputs/<run>/<time>
    python -m linearize.diagnose run_dir=outputs/<run>/<time> diagnostics.num_sequences=16 diagnostics.seq_len=1024

Reloads the run's ``config.yaml``, the base model, the converted layers (the transfer checkpoint) and the LoRA
adapter (the finetune checkpoint), exactly as a resumed ``linearize.train`` does; takes the ablation table from the
run's evaluate stage; runs :func:`linearize.diagnostics.run`; and updates ``diagnostics.json``, the plots,
``metrics.json``, ``report.md`` and the run's W&B run (the same run id, from ``wandb_id.txt``). Further
``key=value`` arguments override the saved config (typically ``diagnostics.*``, ``logger.*``, ``model.device``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from linearize import diagnostics, finetune, transfer
from linearize.config import DiagnosticsConfig, TrainConfig, validate_diagnostics
from linearize.outputs import RunDir, device_name, provenance, write_report
from linearize.tracking import make_tracker

log = logging.getLogger("linearize")

USAGE = "usage: python -m linearize.diagnose run_dir=<run directory> [key=value ...]"


def load_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's saved config, typed by the current schema, with ``overrides`` (``key=value``) applied.

    Runs saved before the diagnose stage existed get the default diagnostics settings, with ``reach_tasks`` and
    ``reach_limit`` taken from their eval settings (as conf/diagnostics/default.yaml interpolates them).
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {run_dir} a run directory written by linearize.train?")
    saved = OmegaConf.load(path)
    if "diagnostics" not in saved:
        defaults = OmegaConf.structured(DiagnosticsConfig)
        defaults.reach_tasks = list(saved.eval.tasks)
        defaults.reach_limit = saved.eval.limit
        saved.diagnostics = defaults
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"argument {item!r} is not key=value; {USAGE}")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved, OmegaConf.from_dotlist(overrides))
    validate_diagnostics(cfg)
    return cfg


def load_run(run: RunDir, cfg: DictConfig):
    """``(model, tokenizer)``: the base model, converted, with the run's finished checkpoints loaded."""
    from linearize.attention import convert
    from linearize.models import load_model

    if cfg.attention.kind == "softmax":
        raise ValueError(f"{run.path} was run with attention.kind=softmax: there is no linear branch to diagnose")
    model, tokenizer = load_model(cfg.model)
    convert(model, cfg.attention, cfg.feature_map)
    if run.done("transfer"):
        transfer.load(model, run.checkpoints)
    else:
        log.warning("%s has no finished transfer stage: the feature maps are at their initialisation", run.path)
    if run.done("finetune"):
        model = finetune.load(model, cfg, run.checkpoints)
    return model, tokenizer


def eval_table(run: RunDir) -> dict[str, dict[str, float]]:
    """The evaluate stage's table (``{row: {task: score}}``), or ``{}`` when the run has none."""
    metrics = run.path / "metrics.json"
    if metrics.is_file():
        results = json.loads(metrics.read_text()).get("results")
        if results:
            return results
    return diagnostics.results_from_metrics(run.stage_metrics("evaluate")) if run.done("evaluate") else {}


def diagnose(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Recomputes and writes the diagnostics of ``run_dir``; returns the ``diagnostics.json`` content."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir} does not exist")
    cfg = load_config(run_dir, list(overrides or []))
    run = RunDir(run_dir)
    model, tokenizer = load_run(run, cfg)
    results = eval_table(run)
    tracker = make_tracker(cfg.logger, run.path, OmegaConf.to_container(cfg, resolve=True), cfg.run_name)
    exit_code = 1
    try:
        diag, metrics = diagnostics.run(model, tokenizer, cfg, results=results, out_dir=run.path, tracker=tracker)
        run.finish("diagnose", metrics)
        path = run.path / "metrics.json"
        if path.is_file():
            payload = json.loads(path.read_text())
            payload.pop("schema_version", None)
        else:  # the training run stopped before its report: write one from what the run directory holds
            device = next(model.parameters()).device
            payload = {
                "run_name": cfg.run_name,
                "method": cfg.method.name,
                "model": cfg.model.name,
                "provenance": provenance(cfg.seed, device_name(device)),
                "config": OmegaConf.to_container(cfg, resolve=True),
                "stages": {s: run.stage_metrics(s) for s in ("transfer", "finetune", "evaluate") if run.done(s)},
                "results": results,
                "eval_details": {},
            }
        payload["stages"]["diagnose"] = metrics
        payload["diagnostics"] = diag
        run.write_metrics(payload)
        report = write_report(run, payload, list(cfg.eval.tasks))
        exit_code = 0
    finally:
        tracker.finish(exit_code)
    print(f"\n{diag['verdict']['text']}\n\ndiagnostics: {run.path / diagnostics.FILE}\nreport: {report}")
    return diag


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    if len(run_dirs) != 1:
        raise SystemExit(USAGE)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    diagnose(run_dirs[0], [a for a in args if not a.startswith("run_dir=")])


if __name__ == "__main__":
    main()
