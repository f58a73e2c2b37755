"""The entrypoint end to end on a tiny random model: a valid metrics.json, resume after finished stages,
readable failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA, requires_data

TINY = [
    "model=tiny_llama", "attention.window=16", "feature_map.feature_dim=8",
    "transfer.max_steps=2", "transfer.seq_len=64", "transfer.grad_accum=1", "transfer.eval_every=1",
    "transfer.val_batches=1", "finetune.max_steps=2", "finetune.seq_len=64", "finetune.grad_accum=1",
    "finetune.eval_every=1", "finetune.val_batches=1", "data.max_examples=260", "data.val_examples=20",
    "eval.limit=3", "eval.batch_size=4",
]


def run_train(run_dir, *extra, env_extra=None):
    env = {**os.environ, "LINEARIZE_DATA_DIR": str(SHARED_DATA), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "linearize.train", *TINY, f"hydra.run.dir={run_dir}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )


@requires_data
@pytest.mark.slow
def test_entrypoint_writes_metrics_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["schema_version"] == 1
    prov = metrics["provenance"]
    assert {"git_sha", "git_dirty", "packages", "device", "seed", "created", "command"} <= set(prov)
    assert prov["packages"]["torch"] and prov["packages"]["transformers"]
    assert set(metrics["stages"]) >= {"transfer", "finetune", "evaluate"}
    assert set(metrics["results"]) == {"base", "hybrid", "swa_only", "la_only", "sinks_only", "no_attention"}
    for row in metrics["results"].values():
        assert {"piqa", "arc_easy", "avg", "rec"} <= set(row)
        assert 0.0 <= row["piqa"] <= 1.0
    assert metrics["results"]["base"]["rec"] == pytest.approx(100.0)
    assert (run_dir / "checkpoints" / "feature_maps.safetensors").is_file()
    assert (run_dir / "checkpoints" / "lora" / "adapter_model.safetensors").is_file()
    assert "| base |" in (run_dir / "report.md").read_text() and "| la_only |" in proc.stdout
    assert list((run_dir / "wandb").glob("offline-run-*")), "an offline W&B run"
    # Resume: finished stages are loaded, not retrained; cached eval results are reused.
    fm = run_dir / "checkpoints" / "feature_maps.safetensors"
    stamp = fm.stat().st_mtime_ns
    again = run_train(run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr  # Hydra's log handler writes to the console
    assert "transfer: finished earlier" in out and "finetune: finished earlier" in out
    assert not any(f"evaluating {row} on" in out for row in ("base", "hybrid", "swa_only", "la_only"))
    assert fm.stat().st_mtime_ns == stamp
    assert json.loads((run_dir / "metrics.json").read_text())["results"] == metrics["results"]


@requires_data
def test_resume_with_another_feature_map_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, "stages=[transfer]", "logger=none").returncode == 0
    proc = run_train(run_dir, "feature_map=relu", "stages=[transfer]", "logger=none")
    assert proc.returncode != 0
    assert "feature_map" in proc.stderr and "another hydra.run.dir" in proc.stderr


def test_missing_data_names_the_fix(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    proc = run_train(tmp_path / "run", "stages=[transfer]", "logger=none", env_extra={"LINEARIZE_DATA_DIR": str(empty)})
    assert proc.returncode != 0
    assert "alpaca_data_1k.json" in proc.stderr and "data.local_file" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, "a missing input must print its message, not a traceback"
    assert (tmp_path / "run" / "failed.json").is_file()
