"""The paper's tables: every experiment config composes and means what its row says, the renderer's cells on fixed
result files (with the paper's numbers for mistral7b), row status and skipping, and a smoke sweep on a tiny model."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import CONF_DIR, ROOT, SHARED_DATA, compose, requires_data

from linearize import paper_numbers, sweep, tables
from linearize.config import validate

EXPERIMENTS = sorted(f"{p.parent.name}/{p.stem}" for p in (CONF_DIR / "experiment").glob("*/*.yaml"))
SIX = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu"]


def test_there_is_one_experiment_per_layout_row():
    assert set(sweep.TABLES) == {p.name for p in (CONF_DIR / "experiment").iterdir() if p.is_dir()}
    for table, layout in tables.LAYOUTS.items():
        files = set(sweep.experiment_rows(table))
        used = {row.experiment for row in layout.rows} | {layout.base}
        assert used == files, f"{table}: layout uses {sorted(used)}, conf/experiment has {sorted(files)}"
        for row in layout.rows:
            if row.paper is not None:  # a paper key names a published row of some model
                assert any(row.paper in by_table.get(table, {}) for by_table in paper_numbers.PAPER.values()), row


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_validates_and_states_its_command(experiment):
    lines = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# python -m linearize.train "), lines[1]
    overrides = shlex.split(lines[1][len("# python -m linearize.train ") :])
    assert f"+experiment={experiment}" in overrides
    validate(compose(overrides))
    for extra in (["model=tiny_llama"], ["model=mistral7b", "transfer=lolcats", "finetune=lolcats", "eval=paper"]):
        cfg = compose([f"+experiment={experiment}", *extra])
        validate(cfg)
        assert list(cfg.eval.tasks) == SIX, "every table has the paper's six columns"
    assert cfg.model.name == "mistral7b" and cfg.eval.limit is None  # command-line budgets reach every row


def _cfg(experiment, *extra):
    return compose([f"+experiment={experiment}", "model=tiny_llama", *extra])


def test_table1_is_one_lolcats_job_with_base_and_five_ablations():
    cfg = _cfg("table1/lolcats")
    assert cfg.method.name == "lolcats" and cfg.attention.kind == "hybrid" and cfg.transfer.mse_weight == 1000
    assert list(cfg.eval.modes) == ["hybrid", "swa_only", "la_only", "sinks_only", "no_attention"] and cfg.eval.base
    assert "finetune" in cfg.stages and not cfg.ssd.enabled


@pytest.mark.parametrize(
    "row,kind,mse,xent,square",
    [
        ("weights_square", "linear", 0, 1, True),
        ("weights_halved", "linear", 0, 1, False),
        ("outputs_square", "linear", 1000, 0, True),
        ("outputs_halved", "linear", 1000, 0, False),
        ("hybrid_outputs_square", "hybrid", 1000, 0, True),
        ("hybrid_outputs_halved", "hybrid", 1000, 0, False),
    ],
)
def test_table2_3_rows(row, kind, mse, xent, square):
    for extra in ([], ["transfer=lolcats"]):  # one epoch also under the paper's budget (which says 2)
        cfg = _cfg(f"table2_3/{row}", *extra)
        assert cfg.attention.kind == kind and cfg.transfer.mse_weight == mse and cfg.transfer.xent_weight == xent
        assert cfg.feature_map.match_head_dim is square and cfg.feature_map.activation == "softmax"
        assert cfg.transfer.epochs == 1 and list(cfg.stages) == ["transfer", "evaluate"]  # no LoRA
        assert list(cfg.eval.modes) == ["la_only"] and not cfg.eval.base
    assert cfg.feature_map.feature_dim == 64  # halved: LoLCATs' d x 64 (square: match_head_dim overrides it)


@pytest.mark.parametrize("row,activation", [("softmax", "softmax"), ("exp", "exp"), ("relu", "relu"),
                                            ("elu", "elu"), ("identity", "identity")])  # fmt: skip
def test_table4_rows(row, activation):
    cfg = _cfg(f"table4/{row}")
    assert cfg.feature_map.activation == activation and cfg.feature_map.match_head_dim
    assert cfg.attention.kind == "linear" and cfg.transfer.xent_weight == 1 and cfg.transfer.mse_weight == 0
    assert list(cfg.stages) == ["transfer", "evaluate"] and list(cfg.eval.modes) == ["la_only"]


def test_base_rows_and_remedies():
    for table in ("table2_3", "table4", "remedies"):
        cfg = _cfg(f"{table}/base")
        assert cfg.attention.kind == "softmax" and list(cfg.stages) == ["evaluate"] and cfg.eval.base
    ih, hc, ssd = (_cfg(f"remedies/{m}") for m in ("inference_hybrid", "hedgecats", "ssd"))
    assert ih.attention.kind == "linear" and list(ih.eval.kinds) == ["hybrid", "hybrid_overlap"]
    assert hc.method.name == "hedgecats" and hc.transfer.xent_weight == 1 and hc.transfer.mse_weight == 0
    assert ssd.ssd.enabled and list(ssd.ssd.probs) == [0.9, 0.75, 0.5]
    for cfg in (ih, hc, ssd):
        assert "diagnose" in cfg.stages and not cfg.eval.base


def test_paper_numbers_are_self_consistent():
    """AVG is the mean of the six published scores; Rec = AVG / base AVG x 100 (Table 1), except for one published
    Rec: Llama3-8B SWA only, 92.26 where 66.08 / 71.32 gives 92.65 (kept as published)."""
    known = {("llama3_8b", "swa_only"): 92.65}
    checked = 0
    for model, by_table in paper_numbers.PAPER.items():
        for rows in by_table.values():
            for key, ref in rows.items():
                if all(t in ref for t in SIX):
                    assert sum(ref[t] for t in SIX) / 6 == pytest.approx(ref["avg"], abs=0.011), (model, key)
                    checked += 1
        base = by_table["table1"]["base"]["avg"]
        for key, ref in by_table["table1"].items():
            tol = 0.6 if model == "llama31_8b" else 0.02  # the Llama-3.1 Recs are published rounded
            rec = 100 * ref["avg"] / base
            if (model, key) in known:
                assert rec == pytest.approx(known[model, key], abs=0.01) and abs(rec - ref["rec"]) > 0.3
            else:
                assert rec == pytest.approx(ref["rec"], abs=tol), (model, key)
    assert checked >= 20


# ---- renderer on fixed result files ---------------------------------------------------------------------------


def _result(results, *, limit=100, tasks=SIX, stages=("transfer", "finetune", "evaluate"), usage=None):
    """A result file as ``linearize.sweep.result_record`` writes it (only what the renderer reads)."""
    return {
        "results": results,
        "budgets": {
            "stages": list(stages),
            "transfer": {"max_steps": 24, "epochs": 1, "batch_size": 1, "grad_accum": 2, "seq_len": 256},
            "finetune": {"max_steps": 24, "epochs": 1, "batch_size": 1, "grad_accum": 2, "seq_len": 256},
            "eval": {"tasks": list(tasks), "limit": limit, "splits": {}},
            "data": {"data_dir": None},
        },
        "stages": {"transfer": {"transfer/steps": 24}},
        "usage": usage,
        "provenance": {
            "git_sha": "0123456789abcdef",
            "git_dirty": False,
            "device": "cpu",
            "seed": 0,
            "created": "2026-11-27T00:00:00+00:00",
        },
    }


def _scores(*values):
    return dict(zip(SIX, values))


def _write(root, model, table, row, payload):
    path = root / model / table / f"{row}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _md_row(text, label):
    lines = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert len(lines) == 1, f"{label!r} in\n{text}"
    return [c.strip() for c in lines[0].strip("|").split("|")][1:]


def test_table1_renders_scores_rec_and_the_papers_numbers(tmp_path):
    base = _scores(0.80, 0.80, 0.50, 0.70, 0.70, 0.50)  # avg 66.67
    hybrid = _scores(0.78, 0.79, 0.49, 0.71, 0.68, 0.45)  # avg 65.00
    _write(tmp_path, "mistral7b", "table1", "lolcats", _result({"base": base, "hybrid": hybrid}))
    md_path, tex_path = tables.write("mistral7b", "table1", tmp_path)
    md, tex = md_path.read_text(), tex_path.read_text()
    assert md_path == tmp_path / "mistral7b" / "table1.md"
    assert _md_row(md, "base")[:8] == ["80.00", "80.00", "50.00", "70.00", "70.00", "50.00", "66.67", "100.00"]
    assert _md_row(md, "SWA+LA")[:8] == ["78.00", "79.00", "49.00", "71.00", "68.00", "45.00", "65.00", "97.50"]
    assert _md_row(md, "*SWA+LA (paper)*")[:8] == ["78.40", "79.50", "49.91", "71.28", "68.35", "45.44", "65.48",
                                                   "95.93"]  # fmt: skip
    assert _md_row(md, "*no attention (paper)*")[6:8] == ["34.40", "50.39"]
    assert _md_row(md, "SWA only")[:8] == ["-"] * 8  # not in the result file
    assert "| PIQA | ARC-E | ARC-C | HS | WG | MMLU | AVG | Rec |" in md
    assert "SWA+LA & 78.00 & 79.00 & 49.00 & 71.00 & 68.00 & 45.00 & 65.00 & 97.50 \\\\" in tex
    assert "\\textit{SWA+LA (paper)} & \\textit{78.40} & \\textit{79.50}" in tex
    assert "\\toprule" in tex and "\\end{tabular}" in tex
    assert "Mistral-7B" in md and "git `0123456789`" in md


def test_separate_base_row_partial_tasks_and_no_paper_for_other_models(tmp_path):
    _write(tmp_path, "smollm2_135m", "table2_3", "base",
           _result({"base": _scores(0.60, 0.50, 0.30, 0.40, 0.50, 0.25)}, stages=("evaluate",)))  # fmt: skip
    _write(tmp_path, "smollm2_135m", "table2_3", "weights_square",
           _result({"la_only": {"piqa": 0.54, "arc_easy": 0.40}}, tasks=["piqa", "arc_easy"]))  # fmt: skip
    _write(tmp_path, "smollm2_135m", "table2_3", "outputs_square", _result({"la_only": _scores(*[0.5] * 6)}, limit=7))
    md = tables.write("smollm2_135m", "table2_3", tmp_path)[0].read_text()
    # two tasks: AVG over those (marked *), Rec against the same two tasks of the base row: 47 / 55 x 100
    assert _md_row(md, "attention weights (xent), square")[:8] == ["54.00", "40.00", "-", "-", "-", "-", "47.00*",
                                                                   "85.45"]  # fmt: skip
    out = _md_row(md, "attention outputs (MSE), square")
    assert out[6:] == ["50.00", "-", "eval settings differ from the base row: no Rec"]  # limit 7 vs 100
    assert _md_row(md, "no attention")[-1] == "not run"
    assert "(paper)" not in md and "\nAVG marked * is over the tasks evaluated" in md


def test_remedies_show_the_la_output_share(tmp_path):
    usage = {"la_output_share": {"lt_window": 0.9, "ge_window": 0.123, "all": 0.5}, "verdict": "used"}
    _write(tmp_path, "mistral7b", "remedies", "base", _result({"base": _scores(*[0.5] * 6)}, stages=("evaluate",)))
    _write(tmp_path, "mistral7b", "remedies", "ssd",
           _result({"hybrid": _scores(*[0.45] * 6), "swa_only": _scores(*[0.4] * 6)}, usage=usage))  # fmt: skip
    md = tables.write("mistral7b", "remedies", tmp_path)[0].read_text()
    assert _md_row(md, "SSD: hybrid") == ["45.00"] * 7 + ["90.00", "LA output share (n >= window, as trained): 0.123"]
    assert _md_row(md, "*SSD: hybrid (paper)*")[6:8] == ["-", "95.20"]
    assert _md_row(md, "SSD: SWA only")[-1] == ""  # the share belongs to the run: shown on its first row only
    assert _md_row(md, "SSD: LA only")[-1] == "no la_only row in the result"


# ---- status, collection, skipping ------------------------------------------------------------------------------


def test_status_collect_and_skip(tmp_path, monkeypatch):
    root, runs = tmp_path / "results", tmp_path / "runs"
    rows = sweep.experiment_rows("table4")
    assert sweep.status("m", "table4", "exp", root, runs) == "missing"
    (sweep.run_dir("m", "table4", "exp", runs)).mkdir(parents=True)
    (sweep.run_dir("m", "table4", "exp", runs) / "failed.json").write_text('{"error": "boom"}')
    assert sweep.status("m", "table4", "exp", root, runs) == "failed"
    # a run that finished but was never collected (the sweep was interrupted): collected without rerunning
    run = sweep.run_dir("m", "table4", "relu", runs)
    run.mkdir(parents=True)
    cfg = compose(["+experiment=table4/relu", "model=tiny_llama"])
    from omegaconf import OmegaConf

    metrics = {"model": "tiny_llama", "method": "transfer_only", "provenance": {"git_sha": "abc", "seed": 0},
               "config": OmegaConf.to_container(cfg, resolve=True), "results": {"la_only": {"piqa": 0.5, "avg": 0.5}},
               "stages": {"transfer": {"transfer/steps": 3, "transfer/val_mse/layer_00": 1.0}}, "diagnostics": None}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    for row in rows:
        if row not in ("exp", "relu"):
            _write(root, "m", "table4", row, _result({}))

    calls = []
    monkeypatch.setattr(
        sweep.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0)
    )
    states = sweep.sweep("table4", "m", ["eval.limit=2"], root=root, runs=runs, render=False)
    assert states == {**dict.fromkeys(rows, "done"), "exp": "failed"}  # the fake multirun did not fix exp
    assert len(calls) == 1 and "+experiment=table4/exp" in calls[0]  # only the unfinished row runs
    assert "hydra.sweep.subdir=${hydra:runtime.choices.experiment}" in calls[0] and "model=m" in calls[0]
    record = json.loads(sweep.result_path("m", "table4", "relu", root).read_text())
    assert record["results"] == metrics["results"] and record["provenance"]["git_sha"] == "abc"
    assert record["budgets"]["transfer"]["epochs"] == 1 and record["setup"]["feature_map"]["activation"] == "relu"
    assert record["stages"]["transfer"] == {"transfer/steps": 3}  # per-layer metrics stay in the run
    assert record["command"].startswith("python -m linearize.train +experiment=table4/relu model=m eval.limit=2")
    assert "table4/exp" in tables.listing("m", root, runs) and "failed" in tables.listing("m", root, runs)
    with pytest.raises(ValueError, match="not in conf/experiment/table4"):
        sweep.sweep("table4", "m", rows=["sigmoid"], root=root, runs=runs)
    with pytest.raises(ValueError, match="diagnostics.enabled=false"):
        sweep.sweep("table4", "m", ["stages=[transfer,evaluate]"], root=root, runs=runs)


# ---- smoke: a real multirun on a tiny model ---------------------------------------------------------------------

TINY = [
    "logger=none", "eval.tasks=[piqa]", "eval.limit=2", "eval.batch_size=4", "attention.window=16",
    "transfer.max_steps=2", "transfer.seq_len=64", "transfer.grad_accum=1", "transfer.eval_every=1",
    "transfer.val_batches=1", "data.max_examples=260", "data.val_examples=20",
]  # fmt: skip


def _sweep(tmp_path, rows, *extra):
    env = {**os.environ, "LINEARIZE_DATA_DIR": str(SHARED_DATA), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "linearize.sweep", "table2_3", "--model", "tiny_llama", "--rows", rows,
           "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), *TINY, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@requires_data
@pytest.mark.slow
def test_smoke_sweep_on_a_tiny_model(tmp_path):
    results = tmp_path / "results" / "tiny_llama"
    # 1. a row that fails at run time (no 10^6-token chunk in the data) does not stop the row after it
    first = _sweep(tmp_path, "weights_square,base", "transfer.seq_len=1000000")
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "table2_3/weights_square: failed" in first.stdout and "table2_3/base: done" in first.stdout
    assert (tmp_path / "runs" / "tiny_llama" / "table2_3" / "weights_square" / "failed.json").is_file()
    # 2. the failed row is retried, the done one skipped
    second = _sweep(tmp_path, "base,no_attention,weights_square")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "table2_3/base: done, skipped" in second.stdout and "running no_attention, weights_square" in second.stdout
    record = json.loads((results / "table2_3" / "weights_square.json").read_text())
    assert set(record["results"]) == {"la_only"} and 0.0 <= record["results"]["la_only"]["piqa"] <= 1.0
    assert record["stages"]["transfer"]["transfer/steps"] == 2 and record["budgets"]["eval"]["limit"] == 2
    prov = record["provenance"]
    assert {"git_sha", "git_dirty", "packages", "device", "seed"} <= set(prov) and prov["packages"]["torch"]
    md = (results / "table2_3.md").read_text()
    cells = _md_row(md, "attention weights (xent), square")
    assert cells[0] == f"{100 * record['results']['la_only']['piqa']:.2f}" and cells[1:6] == ["-"] * 5
    assert _md_row(md, "base")[7] == "100.00" and _md_row(md, "no attention")[0] != "-"
    assert (results / "table2_3.tex").read_text().count("\\\\") == 9  # header + 8 rows
    # 3. a rerun skips every finished row and runs nothing
    stamp = (results / "table2_3" / "base.json").stat().st_mtime_ns
    third = _sweep(tmp_path, "base,no_attention,weights_square")
    assert third.returncode == 0 and "running" not in third.stdout
    assert third.stdout.count(": done, skipped") == 3
    assert (results / "table2_3" / "base.json").stat().st_mtime_ns == stamp


@requires_data
@pytest.mark.slow
def test_smoke_table1_one_job_six_rows(tmp_path):
    """Table 1 is one LoLCATs job (transfer, LoRA) whose base and five ablation rows fill the whole table."""
    env = {**os.environ, "LINEARIZE_DATA_DIR": str(SHARED_DATA), "WANDB_MODE": "disabled"}
    lora = ["finetune.max_steps=2", "finetune.seq_len=64", "finetune.grad_accum=1", "finetune.eval_every=1",
            "finetune.val_batches=1", "diagnostics.enabled=false"]  # fmt: skip
    cmd = [sys.executable, "-m", "linearize.sweep", "table1", "--model", "tiny_llama",
           "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), *TINY, *lora]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "tiny_llama" / "table1" / "lolcats.json").read_text())
    assert set(record["results"]) == {"base", "hybrid", "swa_only", "la_only", "sinks_only", "no_attention"}
    assert record["stages"]["finetune"]["finetune/steps"] == 2 and record["usage"] is None
    md = (tmp_path / "results" / "tiny_llama" / "table1.md").read_text()
    for label, row in [("base", "base"), ("SWA+LA", "hybrid"), ("no attention", "no_attention")]:
        cells = _md_row(md, label)
        scores = record["results"][row]
        assert cells[0] == f"{100 * scores['piqa']:.2f}" and cells[7] == f"{scores['rec']:.2f}"
