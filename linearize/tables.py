"""Render the paper's tables from the result files of ``linearize.sweep``, and list the rows' status.

    python -m linearize.tables render --model smollm2_135m            # every table with results -> .md and .tex
    python -m linearize.tables render --model mistral7b table1
    python -m linearize.tables list [--model M]                       # rows: done / failed / missing

Reads ``experiments/results/<model>/<table>/<row>.json`` and writes ``experiments/results/<model>/<table>.md`` and
``.tex`` in the paper's layout: columns PIQA, ARC-E, ARC-C, HS, WG, MMLU, AVG, Rec (scores in %), one line per
row of ``LAYOUTS``; a task that was not evaluated renders as "-". AVG is the mean of the six tasks (marked * when
fewer were evaluated: then it is the mean of those). Rec = AVG / base AVG x 100 over the same tasks, the base being
the table's base row (Table 1: the base row of the LoLCATs run); it is "-" when the base row is missing or was
evaluated with other settings (limit, splits, tasks). For mistral7b, llama3_8b and llama31_8b the paper's
published numbers (``linearize.paper_numbers``) follow each row, labelled "(paper)".
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linearize import paper_numbers
from linearize.sweep import EXPERIMENTS, RESULTS_ROOT, RUNS_ROOT, TABLES, experiment_rows, status

TASKS = paper_numbers.TASKS
HEADERS = ("PIQA", "ARC-E", "ARC-C", "HS", "WG", "MMLU", "AVG", "Rec")


@dataclass(frozen=True)
class Row:
    label: str  # as in the paper
    experiment: str  # conf/experiment/<table>/<experiment>.yaml
    eval_row: str  # key of the run's results: base, hybrid, swa_only, la_only, ..., hybrid@linear
    paper: str | None = None  # key in paper_numbers.PAPER[model][table]


@dataclass(frozen=True)
class Layout:
    title: str
    rows: tuple[Row, ...]
    base: str  # the experiment whose "base" eval row is the denominator of Rec
    usage: bool = False  # add the diagnose stage's LA output share (positions >= window) per experiment


LAYOUTS: dict[str, Layout] = {
    "table1": Layout(
        "Table 1: component ablations of a LoLCATs conversion",
        (
            Row("base", "lolcats", "base", "base"),
            Row("SWA+LA", "lolcats", "hybrid", "hybrid"),
            Row("SWA only", "lolcats", "swa_only", "swa_only"),
            Row("LA only", "lolcats", "la_only", "la_only"),
            Row("sinks only", "lolcats", "sinks_only", "sinks_only"),
            Row("no attention", "lolcats", "no_attention", "no_attention"),
        ),
        base="lolcats",
    ),
    "table2_3": Layout(
        "Tables 2-3: transfer objective x projection, linear-only, one epoch of transfer, no LoRA",
        (
            Row("base", "base", "base"),
            Row("attention weights (xent), square", "weights_square", "la_only", "weights_square"),
            Row("attention outputs (MSE), square", "outputs_square", "la_only", "outputs_square"),
            Row("hybrid outputs (LoLCATs), square", "hybrid_outputs_square", "la_only", "hybrid_outputs_square"),
            Row("attention weights (xent), halved", "weights_halved", "la_only", "weights_halved"),
            Row("attention outputs (MSE), halved", "outputs_halved", "la_only", "outputs_halved"),
            Row("hybrid outputs (LoLCATs), halved", "hybrid_outputs_halved", "la_only", "hybrid_outputs_halved"),
            Row("no attention", "no_attention", "no_attention", "no_attention"),
        ),
        base="base",
    ),
    "table4": Layout(
        "Table 4: activation inside the feature map (Hedgehog-style, linear-only)",
        (
            Row("base", "base", "base"),
            Row("softmax", "softmax", "la_only", "softmax"),
            Row("exponential", "exp", "la_only", "exp"),
            Row("ReLU", "relu", "la_only", "relu"),
            Row("1+ELU", "elu", "la_only", "elu"),
            Row("none", "identity", "la_only", "identity"),
        ),
        base="base",
    ),
    "remedies": Layout(
        "Remedies: inference-time hybridisation, HedgeCATs, SSD (hybrid / SWA only / LA only, LA usage)",
        (
            Row("base", "base", "base"),
            Row("inference hybrid: LA only (as trained)", "inference_hybrid", "hybrid"),
            Row("inference hybrid: SWA only", "inference_hybrid", "swa_only"),
            Row("inference hybrid: + SWA, non-overlap", "inference_hybrid", "hybrid@linear"),
            Row("inference hybrid: + SWA, overlap", "inference_hybrid", "hybrid_overlap@linear"),
            Row("HedgeCATs: hybrid", "hedgecats", "hybrid"),
            Row("HedgeCATs: SWA only", "hedgecats", "swa_only"),
            Row("HedgeCATs: LA only", "hedgecats", "la_only"),
            Row("SSD: hybrid", "ssd", "hybrid", "ssd/hybrid"),
            Row("SSD: SWA only", "ssd", "swa_only"),
            Row("SSD: LA only", "ssd", "la_only"),
        ),
        base="base",
        usage=True,
    ),
}


def load_results(model: str, table: str, root: Path = RESULTS_ROOT) -> dict[str, dict[str, Any]]:
    """``{experiment row: result file content}`` for the rows of ``table`` that have a result file."""
    folder = Path(root) / model / table
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _eval_settings(result: dict[str, Any]) -> tuple:
    ev = result["budgets"]["eval"]
    return (
        ev.get("limit"),
        json.dumps(ev.get("task_limits") or {}, sort_keys=True),
        json.dumps(ev.get("splits") or {}, sort_keys=True),
        result["budgets"]["data"].get("data_dir"),
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Line:
    label: str
    cells: dict[str, float | None]  # TASKS, avg, rec in %
    partial: bool = False  # AVG over fewer than the six tasks
    note: str = ""
    paper: bool = False


def table_lines(model: str, table: str, results: dict[str, dict[str, Any]]) -> tuple[list[Line], list[str]]:
    """The rendered lines of ``table`` (ours, and the paper's where published) and the footnotes."""
    layout = LAYOUTS[table]
    notes: list[str] = []
    base_result = results.get(layout.base)
    base_scores = (base_result or {}).get("results", {}).get("base")
    lines = []
    for row in layout.rows:
        result = results.get(row.experiment)
        scores = (result or {}).get("results", {}).get(row.eval_row)
        cells: dict[str, float | None] = dict.fromkeys([*TASKS, "avg", "rec"])
        partial = False
        note = "" if scores is not None else "not run" if result is None else f"no {row.eval_row} row in the result"
        if scores is not None:
            present = [t for t in TASKS if scores.get(t) is not None]
            for t in present:
                cells[t] = 100.0 * scores[t]
            cells["avg"] = _mean([cells[t] for t in present])
            partial = 0 < len(present) < len(TASKS)
            if base_scores is not None and present:
                if _eval_settings(result) != _eval_settings(base_result):
                    note = "eval settings differ from the base row: no Rec"
                elif all(base_scores.get(t) is not None for t in present):
                    base_avg = _mean([100.0 * base_scores[t] for t in present])
                    cells["rec"] = 100.0 * cells["avg"] / base_avg if base_avg else None
            first = row is next(r for r in layout.rows if r.experiment == row.experiment)  # once per run
            if layout.usage and result.get("usage") and row.eval_row != "base" and first:
                share = (result["usage"].get("la_output_share") or {}).get("ge_window")
                note = "" if share is None else f"LA output share (n >= window, as trained): {share:.3f}"
        lines.append(Line(row.label, cells, partial, note))
        ref = paper_numbers.reference(model, table, row.paper)
        if ref:
            lines.append(Line(f"{row.label} (paper)", {k: ref.get(k) for k in [*TASKS, "avg", "rec"]}, paper=True))
    if any(line.partial for line in lines):
        notes.append(
            "AVG marked * is over the tasks evaluated (fewer than six); Rec compares the same tasks of the base row."
        )
    if any(line.paper for line in lines):
        notes.append(f"(paper): {paper_numbers.SOURCE}, {paper_numbers.MODEL_NAMES[model]}.")
    return lines, notes


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cells(line: Line) -> list[str]:
    out = [_cell(line.cells[t]) for t in TASKS]
    out.append(_cell(line.cells["avg"]) + ("*" if line.partial else ""))
    out.append(_cell(line.cells["rec"]))
    return out


def _runs_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per result file: budget, evaluation limit, provenance."""
    out = []
    for name, r in results.items():
        b, p = r["budgets"], r["provenance"]
        t, f, e = b["transfer"], b["finetune"], b["eval"]
        stages = b["stages"]
        parts = []
        for stage, c in (("transfer", t), ("finetune", f)):
            if stage in stages:
                done = r.get("stages", {}).get(stage, {}).get(f"{stage}/steps", "?")
                parts.append(
                    f"{stage} {done} steps (max_steps {c['max_steps']}, epochs {c['epochs']}) of "
                    f"{c['batch_size']} x {c['grad_accum']} x {c['seq_len']} tokens"
                )
        limits = ", ".join(f"{t} {n if n is not None else 'all'}" for t, n in (e.get("task_limits") or {}).items())
        parts.append(f"eval limit {e['limit'] if e['limit'] is not None else 'all'}" + (f" ({limits})" if limits else ""))
        dirty = " (dirty)" if p.get("git_dirty") else ""
        out.append(
            f"- `{name}`: {', '.join(parts)}; git `{str(p.get('git_sha'))[:10]}`{dirty}, {p.get('device')}, "
            f"seed {p.get('seed')}, {p.get('created')}"
        )
    return out


def markdown(model: str, table: str, results: dict[str, dict[str, Any]]) -> str:
    layout = LAYOUTS[table]
    lines, notes = table_lines(model, table, results)
    extra = ["note"] if any(line.note for line in lines) else []
    header = ["row", *HEADERS, *extra]
    out = [f"# {layout.title} ({model})", "", "Scores in %; Rec = AVG / base AVG x 100.", ""]
    out += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(HEADERS) + "---|" * len(extra)]
    for line in lines:
        label = f"*{line.label}*" if line.paper else line.label
        out.append("| " + " | ".join([label, *_cells(line), *([line.note] if extra else [])]) + " |")
    for note in notes:
        out += ["", note]
    if results:
        out += ["", "Runs:", *_runs_section(results)]
    return "\n".join(out) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("*", r"$^*$")):
        text = text.replace(a, b)
    return text


def latex(model: str, table: str, results: dict[str, dict[str, Any]]) -> str:
    layout = LAYOUTS[table]
    lines, notes = table_lines(model, table, results)
    out = [
        f"% {layout.title} ({model}); generated by python -m linearize.tables render --model {model} {table}",
        r"\begin{tabular}{l" + "r" * len(HEADERS) + "}",
        r"\toprule",
        " & ".join(["", *HEADERS]) + r" \\",
        r"\midrule",
    ]
    for line in lines:
        cells = [_tex(line.label), *(_tex(c) for c in _cells(line))]
        if line.paper:
            cells = [r"\textit{" + c + "}" for c in cells]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += [f"% {note}" for note in notes]
    return "\n".join(out) + "\n"


def write(model: str, table: str, root: Path = RESULTS_ROOT) -> list[Path]:
    """Writes ``<root>/<model>/<table>.md`` and ``.tex`` from the table's result files; nothing when there are none."""
    results = load_results(model, table, root)
    if not results:
        return []
    paths = []
    for suffix, render in ((".md", markdown), (".tex", latex)):
        path = Path(root) / model / f"{table}{suffix}"
        path.write_text(render(model, table, results))
        paths.append(path)
    return paths


def listing(model: str, root: Path = RESULTS_ROOT, runs: Path = RUNS_ROOT) -> str:
    out = [f"model {model}"]
    for table in TABLES:
        for row in experiment_rows(table):
            out.append(f"  {table + '/' + row:<34} {status(model, table, row, root, runs)}")
    return "\n".join(out)


def _models(root: Path, runs: Path) -> list[str]:
    """The conf/model options that have result files or run directories (default: smollm2_135m)."""
    options = {p.stem for p in (EXPERIMENTS.parent / "model").glob("*.yaml")}
    found = {p.name for base in (root, runs) if Path(base).is_dir() for p in Path(base).iterdir() if p.name in options}
    return sorted(found) or ["smollm2_135m"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearize.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["render", "list"])
    parser.add_argument("tables", nargs="*", help=f"some of {', '.join(TABLES)} (default: all)")
    parser.add_argument("--model", default=None, help="a conf/model option (default: every model with results)")
    parser.add_argument("--results", type=Path, default=RESULTS_ROOT)
    parser.add_argument("--runs", type=Path, default=RUNS_ROOT)
    args = parser.parse_intermixed_args(argv)
    unknown = sorted(set(args.tables) - set(TABLES))
    if unknown:
        parser.error(f"unknown tables {unknown}; known: {list(TABLES)}")
    models = [args.model] if args.model else _models(args.results, args.runs)
    for model in models:
        if args.command == "list":
            print(listing(model, args.results, args.runs))
            continue
        for table in args.tables or TABLES:
            paths = write(model, table, args.results)
            print("\n".join(f"wrote {p}" for p in paths) or f"{model}/{table}: no result files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
