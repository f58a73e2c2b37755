"""The entrypoint: load a model, convert its attention, then run transfer -> finetune -> evaluate -> diagnose.

    python -m linearize.train                                   # embedded SmolLM2-135M, small budgets
    python -m linearize.train model=mistral7b ssd=default       # SSD on a 7B model
    python -m linearize.train hydra.run.dir=outputs/my_run      # rerun: resumes after the last finished stage
    python -m linearize.train -m feature_map=hedgehog,exp       # a Hydra multirun sweep

This module only wires the stages (each a plain function in its own module) and the run directory.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from linearize import diagnostics, evaluate, finetune, transfer
from linearize.config import MissingInputError, register_configs, validate
from linearize.outputs import RunDir, device_name, provenance, results_table, write_report
from linearize.tracking import Tracker, make_tracker

log = logging.getLogger("linearize")

register_configs()

# Sections that decide what a checkpoint in the run directory means; a resume with other values is refused.
CHECKPOINT_KEYS = ("model", "attention.kind", "feature_map", "finetune.lora")


def _check_resume(run: RunDir, cfg: DictConfig) -> None:
    saved_path = run.path / "config.yaml"
    if not saved_path.is_file() or not any(run.done(s) for s in ("transfer", "finetune")):
        return
    saved = OmegaConf.load(saved_path)
    for key in CHECKPOINT_KEYS:
        old, new = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        old = OmegaConf.to_container(old, resolve=True) if OmegaConf.is_config(old) else old
        new = OmegaConf.to_container(new, resolve=True) if OmegaConf.is_config(new) else new
        if old != new:
            raise ValueError(
                f"{run.path} holds checkpoints made with {key}={old}, but this run asks for {key}={new}. "
                "Use another hydra.run.dir, or delete the run directory's stages/ to start over."
            )


def pipeline(cfg: DictConfig, run: RunDir, tracker: Tracker) -> dict[str, Any]:
    """Runs (or resumes) every stage; returns the metrics.json payload."""
    from linearize.attention import convert
    from linearize.data import load_packed
    from linearize.models import load_model

    model, tokenizer = load_model(cfg.model)
    device = next(model.parameters()).device
    if cfg.attention.kind != "softmax":
        convert(model, cfg.attention, cfg.feature_map)
    stages: dict[str, dict] = {}
    packed: dict[int, Any] = {}

    def data_for(seq_len: int):
        if seq_len not in packed:
            packed[seq_len] = load_packed(cfg.data, tokenizer, seq_len)
        return packed[seq_len]

    converted = cfg.attention.kind != "softmax"
    if run.done("transfer"):
        log.info("transfer: finished earlier, loading %s", run.checkpoints / transfer.CHECKPOINT)
        transfer.load(model, run.checkpoints)
        stages["transfer"] = run.stage_metrics("transfer")
    elif "transfer" in cfg.stages and cfg.transfer.enabled and converted:
        stages["transfer"] = transfer.run(
            model, cfg, data_for(cfg.transfer.seq_len), out_dir=run.checkpoints, log_fn=tracker.log
        )
        run.finish("transfer", stages["transfer"])

    if run.done("finetune"):
        log.info("finetune: finished earlier, loading %s", run.checkpoints / finetune.ADAPTER_DIR)
        model = finetune.load(model, cfg, run.checkpoints)
        stages["finetune"] = run.stage_metrics("finetune")
    elif "finetune" in cfg.stages and cfg.finetune.enabled:
        model, stages["finetune"] = finetune.run(
            model, cfg, data_for(cfg.finetune.seq_len), out_dir=run.checkpoints, log_fn=tracker.log
        )
        run.finish("finetune", stages["finetune"])

    results, details = {}, {}
    if "evaluate" in cfg.stages and cfg.eval.enabled:
        results, stages["evaluate"], details = evaluate.run(model, tokenizer, cfg, out_dir=run.path, log_fn=tracker.log)
        run.finish("evaluate", stages["evaluate"])

    diagnosis = None
    if "diagnose" in cfg.stages and cfg.diagnostics.enabled:
        if converted:
            # ablation deltas come from this run's evaluate stage, or from an earlier one in the same run dir
            table = results or (diagnostics.results_from_metrics(run.stage_metrics("evaluate")) if run.done("evaluate") else {})
            diagnosis, stages["diagnose"] = diagnostics.run(
                model, tokenizer, cfg, results=table, out_dir=run.path, tracker=tracker
            )
            run.finish("diagnose", stages["diagnose"])
        else:
            log.info("diagnose: skipped, attention.kind=softmax has no linear branch")

    return {
        "run_name": cfg.run_name,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "provenance": provenance(cfg.seed, device_name(device)),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "stages": stages,
        "results": results,
        "eval_details": details,
        "diagnostics": diagnosis,
    }


def report(cfg: DictConfig, run: RunDir, payload: dict[str, Any], tracker: Tracker) -> None:
    run.write_metrics(payload)
    path = write_report(run, payload, list(cfg.eval.tasks))
    tracker.summary({k: v for stage in payload["stages"].values() for k, v in stage.items()})
    if payload["results"]:
        tasks = list(cfg.eval.tasks)
        rows = [[row] + [scores.get(k) for k in [*tasks, "avg", "rec"]] for row, scores in payload["results"].items()]
        tracker.table("eval/table", ["row", *tasks, "avg", "rec"], rows)
        print("\n" + results_table(payload["results"], tasks))
    if payload.get("diagnostics"):
        print("\n" + payload["diagnostics"]["verdict"]["text"])
    print(f"\nrun directory: {run.path}\nreport: {path}")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    validate(cfg)
    hydra_cfg = HydraConfig.get()
    run = RunDir(hydra_cfg.runtime.output_dir)
    _check_resume(run, cfg)
    OmegaConf.save(cfg, run.path / "config.yaml", resolve=True)
    OmegaConf.set_readonly(cfg, True)
    tracker = make_tracker(cfg.logger, run.path, OmegaConf.to_container(cfg, resolve=True), cfg.run_name)
    exit_code = 1
    try:
        payload = pipeline(cfg, run, tracker)
        report(cfg, run, payload, tracker)
        exit_code = 0
    except Exception as err:
        (run.path / "failed.json").write_text(json.dumps({"error": repr(err)}))
        missing = isinstance(err, MissingInputError)  # its message names the fix: no traceback
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if missing:
                raise SystemExit(f"linearize: run failed: {err}") from None
            log.exception("run failed: %s", err)
            raise
        # in a sweep, one failed job is recorded and the others go on
        (log.error if missing else log.exception)("run failed: %s", err)
    finally:
        tracker.finish(exit_code)
    failed = run.path / "failed.json"
    if exit_code == 0 and failed.is_file():
        failed.unlink()


if __name__ == "__main__":
    main()
