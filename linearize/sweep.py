"""Run one of the paper's tables as a Hydra multirun (one job per row), collect each row's result JSON, render.

    python -m linearize.sweep table4 --model smollm2_135m               # the missing rows, then the table
    python -m linearize.sweep table1 --model mistral7b transfer=lolcats finetune=lolcats eval=paper
    python -m linearize.sweep table2_3 --rows base,weights_square eval.limit=2 logger=none   # some rows only
    python -m linearize.sweep all --model smollm2_135m                  # every table (make tables)

Rows are the files ``conf/experiment/<table>/<row>.yaml``. The missing rows of a table run as **one** Hydra
multirun::

    python -m linearize.train -m +experiment=table4/base,table4/softmax,... model=<model> [overrides] \
        hydra.sweep.dir=outputs/tables/<model> hydra.sweep.subdir='${hydra:runtime.choices.experiment}'

so each row has a stable run directory ``outputs/tables/<model>/<table>/<row>/``: rerunning after a crash resumes
that row's finished stages and cached eval results. A row is **done** when its result file
``experiments/results/<model>/<table>/<row>.json`` exists; done rows are never rerun (delete the file to redo a
row). A failed job writes ``failed.json`` into its run directory and the multirun goes on with the other rows
(``linearize/train.py``); the row is then reported ``failed`` and retried by the next sweep.

A result file holds the row's scores (``results``: ``{eval row: {task: score, avg, rec}}``, scores in [0, 1]),
the budgets and the set-up it ran with, the stage metrics, the usage summary of the diagnose stage when it ran, the
provenance of ``metrics.json`` (git sha, dirty flag, package versions, device, seed, command) and the command that
reruns that row alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "conf" / "experiment"
RESULTS_ROOT = ROOT / "experiments" / "results"
RUNS_ROOT = ROOT / "outputs" / "tables"
TABLES = ("table1", "table2_3", "table4", "remedies")
RESULT_SCHEMA_VERSION = 1

log = logging.getLogger("linearize.sweep")


def experiment_rows(table: str) -> list[str]:
    """The rows of ``table``: the stems of ``conf/experiment/<table>/*.yaml``, sorted."""
    folder = EXPERIMENTS / table
    if not folder.is_dir():
        known = sorted(p.name for p in EXPERIMENTS.iterdir() if p.is_dir())
        raise ValueError(f"no experiment configs for table {table!r} (conf/experiment/{table}/); known: {known}")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def result_path(model: str, table: str, row: str, root: Path = RESULTS_ROOT) -> Path:
    return Path(root) / model / table / f"{row}.json"


def run_dir(model: str, table: str, row: str, runs: Path = RUNS_ROOT) -> Path:
    return Path(runs) / model / table / row


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it, so result files name no machine-specific location."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def status(model: str, table: str, row: str, root: Path = RESULTS_ROOT, runs: Path = RUNS_ROOT) -> str:
    """``done`` (result file), ``failed`` (the last attempt wrote failed.json) or ``missing``."""
    if result_path(model, table, row, root).is_file():
        return "done"
    if (run_dir(model, table, row, runs) / "failed.json").is_file():
        return "failed"
    return "missing"


def multirun_command(
    table: str, rows: list[str], model: str, overrides: list[str], runs: Path = RUNS_ROOT
) -> list[str]:
    """The Hydra multirun that runs ``rows`` of ``table``, one job each, in stable per-row run directories."""
    return [
        sys.executable, "-m", "linearize.train", "-m",
        "+experiment=" + ",".join(f"{table}/{row}" for row in rows),
        f"model={model}",
        *overrides,
        f"hydra.sweep.dir={Path(runs) / model}",
        "hydra.sweep.subdir=${hydra:runtime.choices.experiment}",
    ]  # fmt: skip


def row_command(table: str, row: str, model: str, overrides: list[str], runs: Path = RUNS_ROOT) -> str:
    """The single-run command equivalent to one job of the multirun (same config, same run directory)."""
    args = [
        f"+experiment={table}/{row}",
        f"model={model}",
        *overrides,
        f"hydra.run.dir={_shown(run_dir(model, table, row, runs))}",
    ]
    return "python -m linearize.train " + " ".join(args)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Stage metrics without the per-layer entries and the eval table (the result file has it as ``results``)."""
    return {
        k: v
        for k, v in metrics.items()
        if not k.split("/")[-1].startswith("layer_") and not k.startswith("eval/") and not isinstance(v, (dict, list))
    }


def usage_summary(diagnostics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The overall LA mass / output shares (below and beyond the window) and the verdict of ``diagnostics.json``."""
    if not diagnostics:
        return None
    out: dict[str, Any] = {"window": diagnostics.get("window")}
    usage = diagnostics.get("usage")
    if usage:
        out.update(usage["overall"])
        out["num_sequences"], out["seq_len"] = usage.get("num_sequences"), usage.get("seq_len")
    verdict = diagnostics.get("verdict")
    if verdict:
        out["verdict"] = verdict.get("label")
    return out


def result_record(metrics: dict[str, Any], table: str, row: str, command: str, run: Path) -> dict[str, Any]:
    """The result file of one row, derived from its run's ``metrics.json`` (schema: linearize/outputs.py)."""
    cfg = metrics["config"]
    ev = cfg["eval"]
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "table": table,
        "row": row,
        "experiment": f"{table}/{row}",
        "model": metrics["model"],
        "method": metrics["method"],
        "command": command,
        "run_dir": _shown(run),
        "results": metrics["results"],
        "budgets": {
            "stages": cfg["stages"],
            "transfer": cfg["transfer"],
            "finetune": cfg["finetune"],
            "eval": {k: ev.get(k) for k in ("tasks", "modes", "kinds", "base", "limit", "task_limits", "splits", "batch_size")},
            "data": cfg["data"],
        },
        "setup": {k: cfg[k] for k in ("attention", "feature_map", "ssd", "method", "seed")},
        "stages": {stage: _scalars(m) for stage, m in metrics.get("stages", {}).items()},
        "usage": usage_summary(metrics.get("diagnostics")),
        "provenance": metrics["provenance"],
    }


def collect(
    model: str, table: str, row: str, command: str, root: Path = RESULTS_ROOT, runs: Path = RUNS_ROOT
) -> Path | None:
    """Writes the row's result file from its run directory's ``metrics.json``; None when the run did not finish."""
    run = run_dir(model, table, row, runs)
    metrics_file = run / "metrics.json"
    if (run / "failed.json").is_file() or not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    if not metrics.get("results"):
        return None
    out = result_path(model, table, row, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result_record(metrics, table, row, command, run), indent=2, default=float) + "\n")
    tmp.replace(out)
    return out


def sweep(
    table: str,
    model: str,
    overrides: list[str] | None = None,
    rows: list[str] | None = None,
    root: Path = RESULTS_ROOT,
    runs: Path = RUNS_ROOT,
    render: bool = True,
    env: dict[str, str] | None = None,
) -> dict[str, str]:
    """Runs the rows of ``table`` that have no result file as one multirun, collects them, renders the table.

    Returns ``{row: status}`` after the sweep.
    """
    overrides = list(overrides or [])
    root, runs = Path(root).absolute(), Path(runs).absolute()  # the multirun's working directory is ROOT
    for override in overrides:
        if override.lstrip("+~").split("=")[0] == "stages":
            # rows differ in their stages (no LoRA in Tables 2-4, evaluation only for base rows): one value for all
            # would change what the rows mean
            raise ValueError(
                f"{override!r}: each row sets its own stages; skip a stage with diagnostics.enabled=false, "
                "finetune.enabled=false or transfer.enabled=false instead"
            )
    every = experiment_rows(table)
    rows = list(rows or every)
    unknown = sorted(set(rows) - set(every))
    if unknown:
        raise ValueError(f"rows {unknown} are not in conf/experiment/{table}/; known: {every}")
    todo = []
    for row in rows:
        if status(model, table, row, root, runs) == "done":
            print(f"{table}/{row}: done, skipped ({result_path(model, table, row, root)})")
        elif collect(model, table, row, row_command(table, row, model, overrides, runs), root, runs):
            print(f"{table}/{row}: finished earlier, result collected")  # the sweep stopped before collecting it
        else:
            todo.append(row)
    if todo:
        cmd = multirun_command(table, todo, model, overrides, runs)
        print(f"{table}: running {', '.join(todo)}\n  " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            print(f"{table}: the multirun exited with {proc.returncode}; rows without a result stay missing/failed")
        for row in todo:
            collect(model, table, row, row_command(table, row, model, overrides, runs), root, runs)
    states = {row: status(model, table, row, root, runs) for row in rows}
    for row, state in states.items():
        print(f"{table}/{row}: {state}")
    if render:
        from linearize import tables

        for path in tables.write(model, table, root):
            print(f"wrote {path}")
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearize.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=[*TABLES, "all"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row, e.g. eval.limit=100")
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model option (default: smollm2_135m)")
    parser.add_argument("--rows", default=None, help="comma-separated subset of the table's rows")
    parser.add_argument("--results", type=Path, default=RESULTS_ROOT, help="where result files go")
    parser.add_argument("--runs", type=Path, default=RUNS_ROOT, help="where run directories go")
    args = parser.parse_intermixed_args(argv)
    tables = TABLES if args.table == "all" else (args.table,)
    if args.rows and len(tables) > 1:
        parser.error("--rows needs one table")
    ok = True
    for table in tables:
        rows = args.rows.split(",") if args.rows else None
        states = sweep(table, args.model, args.overrides, rows, args.results, args.runs)
        ok = ok and all(s == "done" for s in states.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
