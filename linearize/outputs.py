"""The run directory: resolved config, stage markers for resuming, ``metrics.json`` with provenance, ``report.md``.

Layout of ``outputs/<run_name>/<time>/`` (or wherever ``hydra.run.dir`` points)::

    config.yaml                 resolved config of the latest invocation
    checkpoints/                feature_maps.safetensors (transfer), lora/ (peft adapter), ...
    stages/<stage>.json         written when a stage finishes: its metrics; a rerun skips that stage
    eval/<row>/<task>.json      cached lm-eval results per (row, task)
    metrics.json                everything below, schema METRICS_SCHEMA_VERSION
    diagnostics.json            component usage, reach, probes, verdict (schema: linearize/diagnostics.py)
    *.png                       diagnostics plots (linearize/plots.py)
    report.md                   the summary table and the diagnostics section
    wandb/                      the offline W&B run

``metrics.json`` schema (version 1)::

    schema_version: 1
    run_name, method, model: str
    provenance: {git_sha, git_dirty, created, command, python, platform, device, packages{name: version}, seed}
    config: the resolved config
    stages: {stage: {metric: value}}            e.g. transfer/best_val_loss, finetune/steps
    results: {row: {task: score, avg, rec}}     rows: base, hybrid, swa_only, la_only, sinks_only, no_attention
    eval_details: {row: {task: {score, metrics{}, lm_eval_task, versions, settings}}}
    diagnostics: the content of diagnostics.json, or null when the diagnose stage did not run
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

METRICS_SCHEMA_VERSION = 1
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "lm_eval",
    "datasets",
    "hydra-core",
    "omegaconf",
    "wandb",
    "triton",
    "safetensors",
    "gguf",
    "linearize",
)


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(seed: int, device: str) -> dict[str, Any]:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "packages": packages,
        "seed": seed,
    }


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


class RunDir:
    """Stage markers and result files of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        (self.path / "stages").mkdir(exist_ok=True)

    def _marker(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self._marker(stage).is_file()

    def stage_metrics(self, stage: str) -> dict[str, Any]:
        return json.loads(self._marker(stage).read_text())

    def finish(self, stage: str, metrics: dict[str, Any]) -> None:
        tmp = self._marker(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, indent=2, default=float))
        tmp.replace(self._marker(stage))  # atomic: a crash never leaves a half-written marker

    def write_metrics(self, payload: dict[str, Any]) -> Path:
        path = self.path / "metrics.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema_version": METRICS_SCHEMA_VERSION, **payload}, indent=2, default=float))
        tmp.replace(path)
        return path


def results_table(results: dict[str, dict[str, float]], tasks: list[str]) -> str:
    """Markdown table: one row per model/ablation, one column per task, then AVG and Rec (scores in %)."""
    header = ["row", *tasks, "AVG", "Rec"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, scores in results.items():
        cells = [row]
        for key in [*tasks, "avg"]:
            value = scores.get(key)
            cells.append("-" if value is None else f"{100 * value:.2f}" if value <= 1.0 else f"{value:.2f}")
        rec = scores.get("rec")
        cells.append("-" if rec is None else f"{rec:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run: RunDir, payload: dict[str, Any], tasks: list[str]) -> Path:
    stages = payload.get("stages", {})
    lines = [f"# {payload['run_name']}", ""]
    prov = payload["provenance"]
    dirty = " (dirty)" if prov.get("git_dirty") else ""
    lines += [
        f"- model: `{payload['model']}`, method: `{payload['method']}`",
        f"- git: `{prov.get('git_sha')}`{dirty}, device: {prov.get('device')}, seed: {prov.get('seed')}",
        f"- command: `{prov.get('command')}`",
        "",
    ]
    for stage, metrics in stages.items():
        if stage in ("evaluate", "diagnose"):  # the sections below show them
            continue
        keys = [k for k in metrics if not k.split("/")[-1].startswith("layer_")]
        summary = ", ".join(f"{k.split('/', 1)[-1]}={_fmt(metrics[k])}" for k in keys)
        lines.append(f"- **{stage}**: {summary}")
    if payload.get("results"):
        lines += ["", "## Scores (%; Rec = AVG / base AVG x 100)", "", results_table(payload["results"], tasks)]
    if payload.get("diagnostics"):
        lines += ["", *diagnostics_section(payload["diagnostics"])]
    path = run.path / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _opt(value: Any, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def diagnostics_section(diag: dict[str, Any]) -> list[str]:
    """Markdown lines for report.md from a ``diagnostics.json`` dict (schema in linearize/diagnostics.py)."""
    w = diag["window"]
    verdict = diag["verdict"]
    lines = ["## Is the linear branch used?", "", f"**{verdict['text']}**", "", f"Rule: {verdict['rule']}"]
    u = diag.get("usage")
    if u:
        lines += [
            "",
            f"### Component usage ({u['num_sequences']} sequences of <= {u['seq_len']} tokens from {u['source']}, "
            f"mode {u['mode']}; mean over {len(u['layers'])} layers x {u['heads']} heads)",
            "",
            f"| share | n < {w} | n >= {w} | all |",
            "|---|---|---|---|",
        ]
        for metric in ("la_mass_share", "la_output_share"):
            o = u["overall"][metric]
            lines.append(f"| {metric} | {_opt(o['lt_window'])} | {_opt(o['ge_window'])} | {_opt(o['all'])} |")
    if diag.get("reach"):
        lines += [
            "",
            f"### Reach of the eval tasks (window {w})",
            "",
            f"| task | requests | items | scored tokens at n >= {w} | items never reaching LA | length p50 / p90 / max |",
            "|---|---|---|---|---|---|",
        ]
        for task, r in diag["reach"].items():
            n = r["length"]
            lines.append(
                f"| {task} | {r['requests']} | {r['items']} | {100 * r['share_scored_ge_window']:.1f}% | "
                f"{100 * r['share_items_never_reach']:.1f}% | {n['p50']} / {n['p90']} / {n['max']} |"
            )
    pk = diag.get("passkey")
    if pk:
        lengths = [str(n) for n in pk["lengths"]]
        lines += [
            "",
            f"### Passkey retrieval (accuracy over {pk['trials']} trials, {pk['distractors']} distractor keys, "
            f"chance {pk['chance']:.2f})",
            "",
            "| row | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for row, by_len in pk["rows"].items():
            lines.append(f"| {row} | " + " | ".join(f"{by_len[n]['accuracy']:.2f}" for n in lengths) + " |")
    ppl = diag.get("perplexity")
    if ppl:
        first = next(iter(ppl["rows"].values()))["buckets"]
        heads = [f"[{b['start']}, {b['end']})" for b in first]
        lines += [
            "",
            f"### Perplexity by query position ({ppl['file']}, {ppl['num_sequences']} x {ppl['seq_len']} tokens)",
            "",
            "| row | " + " | ".join(heads) + " | all |",
            "|---|" + "---|" * (len(heads) + 1),
        ]
        for row, r in ppl["rows"].items():
            lines.append(f"| {row} | " + " | ".join(f"{b['ppl']:.2f}" for b in r["buckets"]) + f" | {r['ppl']:.2f} |")
    if diag.get("ablation"):
        keys = list(next(iter(diag["ablation"].values())))
        lines += ["", "### Ablation deltas (points)", "", "| delta | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]  # fmt: skip
        for name, deltas in diag["ablation"].items():
            cells = ["-" if deltas.get(k) is None else f"{100 * deltas[k]:+.2f}" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if diag.get("plots"):
        lines += ["", "### Plots", ""] + [f"![{name}]({file})" for name, file in diag["plots"].items()]
    return lines
