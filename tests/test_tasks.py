"""Local lm-eval tasks (linearize.tasks) against the real files in ../shared/data and lm-eval's official configs.

    pytest tests/test_tasks.py

The reference for every prompt is the official task YAML installed with lm_eval, turned into a Task whose
dataset is the same raw record reshaped here, independently of linearize.tasks.utils, into the hub row.
"""

from __future__ import annotations

import bz2
import csv
import json
import math
import os
from pathlib import Path

import datasets
import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
import lm_eval.tasks  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from linearize.tasks import (  # noqa: E402
    EXTRA_TASKS,
    LOCAL_NAMES,
    PAPER_TASKS,
    TASK_METRICS,
    build_tasks,
    num_fewshot,
    primary_metric,
    resolve_data_dir,
)
from linearize.tasks import utils as task_utils  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LINEARIZE_DATA_DIR") or REPO / ".." / "shared" / "data").resolve()
OFFICIAL = Path(lm_eval.tasks.__file__).resolve().parent
ALL_TASKS = [*PAPER_TASKS, *EXTRA_TASKS]
# ../shared/data has only these splits of ARC and MMLU (the test splits are kept aside).
DEV_SPLITS = {"arc_easy": "dev", "arc_challenge": "dev", "mmlu": "val"}

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "piqa" / "valid.jsonl").is_file(),
    reason=f"no evaluation data at {DATA_DIR} (set LINEARIZE_DATA_DIR to a directory laid out like ../shared/data)",
)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def local():
    """All local tasks, loaded once: {"tasks": {name: Task}, "groups": {...}, "group_map": {...}}."""
    if not (DATA_DIR / "piqa" / "valid.jsonl").is_file():
        pytest.skip(f"no evaluation data at {DATA_DIR}")
    names, manager = build_tasks(ALL_TASKS, DATA_DIR, DEV_SPLITS)
    assert names == [LOCAL_NAMES[t] for t in ALL_TASKS]
    return manager.load(names)


def _task(local, name: str):
    return local["tasks"][name]


def _docs(task):
    """task.eval_docs, computed once per task (lm-eval re-runs process_docs on every access)."""
    if not hasattr(task, "_cached_eval_docs"):
        task._cached_eval_docs = task.eval_docs
    return task._cached_eval_docs


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _official_task(yaml_rel: str, splits: dict[str, list[dict]]):
    """The official task from lm-eval's own YAML, reading `splits` instead of the hub."""
    cfg = load_yaml(OFFICIAL / yaml_rel, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    data = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    cfg["custom_dataset"] = lambda **_: data
    return ConfigurableTask(config=cfg)


def _assert_same_prompt(local_task, local_doc, official_task, official_doc):
    assert local_task.doc_to_text(local_doc) == official_task.doc_to_text(official_doc)
    assert local_task.doc_to_target(local_doc) == official_task.doc_to_target(official_doc)
    if official_task.OUTPUT_TYPE == "multiple_choice":
        assert local_task.doc_to_choice(local_doc) == official_task.doc_to_choice(official_doc)
    assert local_task.OUTPUT_TYPE == official_task.OUTPUT_TYPE
    assert local_task.config.target_delimiter == official_task.config.target_delimiter
    assert local_task.config.fewshot_delimiter == official_task.config.fewshot_delimiter
    assert sorted(local_task._metric_fn_list) == sorted(official_task._metric_fn_list)
    assert local_task.higher_is_better() == official_task.higher_is_better()


# ---------------------------------------------------------------------------------------------- counts and labels

EXPECTED_COUNTS = {
    "piqa": 1838,
    "arc_easy": 570,
    "arc_challenge": 299,
    "hellaswag": 10042,
    "winogrande": 1267,
    "lambada_openai": 5153,
    "wikitext": 62,  # articles of the wikitext-2-raw-v1 test split, as in lm-eval's document-level dataset
}


@needs_data
@pytest.mark.parametrize("task", list(EXPECTED_COUNTS))
def test_document_counts(local, task):
    assert len(_docs(_task(local, LOCAL_NAMES[task]))) == EXPECTED_COUNTS[task]


@needs_data
def test_mmlu_counts(local):
    subjects = local["group_map"]["linearize_mmlu"]
    assert len(subjects) == 57 and all(s.startswith("linearize_mmlu::") for s in subjects)
    assert sum(len(_docs(local["tasks"][s])) for s in subjects) == 1531
    for s in subjects:
        task = local["tasks"][s]
        dev = task.dataset["dev"]
        assert len(dev) == 5, s
        assert all(0 <= a <= 3 for a in [*dev["answer"], *_docs(task)["answer"]]), s
    assert len(_docs(local["tasks"]["linearize_mmlu::professional_law"])) == 170


@needs_data
def test_label_ranges(local):
    piqa = _docs(_task(local, "linearize_piqa"))
    assert set(piqa["label"]) == {0, 1}
    for task in ("linearize_arc_easy", "linearize_arc_challenge"):
        t = _task(local, task)
        n_choices = set()
        for doc in _docs(t):
            n_choices.add(len(t.doc_to_choice(doc)))
            assert 0 <= t.doc_to_target(doc) < len(t.doc_to_choice(doc))
        assert n_choices >= {4} and n_choices <= {3, 4, 5}
    arc = _docs(_task(local, "linearize_arc_easy"))
    assert any(k.isdigit() for k in list(arc["answerKey"])), "ARC-Easy dev has numeric answer keys"
    hs = _docs(_task(local, "linearize_hellaswag"))
    assert [list(hs["gold"]).count(i) for i in range(4)] == [2515, 2485, 2584, 2458]
    assert all(len(c) == 4 for c in hs["choices"])
    wg = _task(local, "linearize_winogrande")
    assert {wg.doc_to_text(d) for d in _docs(wg)} == {0, 1}


# ---------------------------------------------------------------------------------------------- prompts vs official


@needs_data
def test_piqa_prompt_matches_official(local):
    i = 1  # "dresser": double spaces and a trailing space in the solutions
    raw = _read_jsonl(DATA_DIR / "piqa" / "valid.jsonl")[i]
    label = int((DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()[i])
    row = {**raw, "label": label}
    official = _official_task("piqa/piqa.yaml", {"train": [row], "validation": [row]})
    task = _task(local, "linearize_piqa")
    _assert_same_prompt(task, _docs(task)[i], official, official.eval_docs[0])
    assert task.doc_to_choice(_docs(task)[i]) == [raw["sol1"], raw["sol2"]]


def _arc_row(raw: dict) -> dict:
    choices = raw["question"]["choices"]
    return {
        "id": raw["id"],
        "question": raw["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": raw["answerKey"],
    }


@needs_data
@pytest.mark.parametrize("task,folder", [("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")])
def test_arc_prompt_matches_official(local, task, folder):
    raws = _read_jsonl(DATA_DIR / "arc" / folder / f"{folder}-Dev.jsonl")
    numeric = next(i for i, r in enumerate(raws) if r["answerKey"].isdigit())
    for i in (0, numeric):
        row = _arc_row(raws[i])
        official = _official_task(f"arc/{task}.yaml", {s: [row] for s in ("train", "validation", "test")})
        t = _task(local, LOCAL_NAMES[task])
        _assert_same_prompt(t, _docs(t)[i], official, official.eval_docs[0])


@needs_data
def test_hellaswag_prompt_matches_official(local):
    lines = bz2.open(DATA_DIR / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().split("\n")
    # An item whose text still holds a bracketed WikiHow artifact, which lm-eval's preprocessing removes.
    i = next(k for k in range(0, len(lines) - 5, 6) if any("[" in x for x in lines[k : k + 6]))
    for start in (0, i):
        head, label, *endings = lines[start : start + 6]
        activity_label, _, ctx = head.partition(": ")
        # The derived file has ctx = ctx_a + " " + ctx_b already joined; ctx_b is empty in the rebuilt row.
        row = {
            "activity_label": activity_label,
            "ctx_a": ctx,
            "ctx_b": "",
            "ctx": ctx,
            "endings": endings,
            "label": label,
        }
        official = _official_task("hellaswag/hellaswag.yaml", {"train": [row], "validation": [row]})
        t = _task(local, "linearize_hellaswag")
        doc = _docs(t)[start // 6]
        _assert_same_prompt(t, doc, official, official.eval_docs[0])
        assert "[" not in t.doc_to_text(doc) + "".join(t.doc_to_choice(doc))
    assert _task(local, "linearize_hellaswag").doc_to_text(_docs(_task(local, "linearize_hellaswag"))[0]) == (
        "Roof shingle removal: A man is sitting on a roof. he"  # lm-eval's hub row gives "... roof. He"
    )


@needs_data
def test_winogrande_prompt_matches_official(local):
    raw = _read_jsonl(DATA_DIR / "winogrande" / "winogrande_1.1" / "dev.jsonl")[0]
    row = {k: raw[k] for k in ("sentence", "option1", "option2", "answer")}
    official = _official_task("winogrande/default.yaml", {"train": [row], "validation": [row]})
    t = _task(local, "linearize_winogrande")
    doc = _docs(t)[0]
    _assert_same_prompt(t, doc, official, official.eval_docs[0])
    # Partial scoring: the prompt is the index of the gold option, the choices are the two contexts.
    assert t.doc_to_text(doc) == 1
    assert t.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert t.doc_to_target(doc) == "always got the easier cases."


def _mmlu_rows(subject: str, split: str) -> list[dict]:
    with open(DATA_DIR / "mmlu" / split / f"{subject}_{split}.csv", encoding="utf-8", newline="") as f:
        return [
            {"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(y)}
            for q, a, b, c, d, y in csv.reader(f)
        ]


@needs_data
def test_mmlu_prompt_matches_official(local):
    subject = "high_school_us_history"  # long passages with quotes, commas and newlines inside CSV fields
    rows, dev = _mmlu_rows(subject, "val"), _mmlu_rows(subject, "dev")
    official = _official_task(f"mmlu/default/mmlu_{subject}.yaml", {"test": rows[:1], "dev": dev})
    t = _task(local, f"linearize_mmlu::{subject}")
    doc = _docs(t)[0]
    _assert_same_prompt(t, doc, official, official.eval_docs[0])
    assert t.config.description == official.config.description
    shots = num_fewshot("mmlu")
    assert shots == 5
    local_ctx = t.fewshot_context(doc, num_fewshot=shots)
    assert local_ctx == official.fewshot_context(official.eval_docs[0], num_fewshot=shots)
    assert local_ctx.startswith(
        "The following are multiple choice questions (with answers) about high school us history."
    )
    assert local_ctx.count("\nAnswer:") == 6


@needs_data
def test_lambada_prompt_matches_official(local):
    raw = _read_jsonl(DATA_DIR / "lambada" / "lambada_test.jsonl")[0]
    official = _official_task("lambada/lambada_openai.yaml", {"test": [raw]})
    t = _task(local, "linearize_lambada_openai")
    doc = _docs(t)[0]
    _assert_same_prompt(t, doc, official, official.eval_docs[0])
    assert t.doc_to_target(doc) == " signs"


@needs_data
def test_wikitext_documents(local):
    t = _task(local, "linearize_wikitext")
    pages = _docs(t)["page"]
    # wikitext-2-raw-v1 test has 4358 lines, 1467 of them blank (" "), restored from wikitext-2/test.txt.
    lines = task_utils.wikitext_lines(DATA_DIR)
    assert len(lines) == 4358 and lines.count(" ") == 1467
    # The pages hold every line but the blank one before the first heading, and end with the file's last newline.
    assert "\n".join(pages).split("\n") == lines[1:] + [""]
    assert pages[0].startswith(" = Robert Boulter = \n \n Robert Boulter is an English film")
    assert all(p.startswith(" = ") and not p.startswith(" = = ") for p in pages)
    official = _official_task(
        "wikitext/wikitext.yaml", {s: [{"page": pages[0]}] for s in ("train", "validation", "test")}
    )
    _assert_same_prompt(t, _docs(t)[0], official, official.eval_docs[0])
    target = t.doc_to_target(_docs(t)[0])
    assert target.startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor.")
    doc = _docs(t)[0]
    assert t.process_results(doc, [-1.0]) == official.process_results(official.eval_docs[0], [-1.0])


# ---------------------------------------------------------------------------------------------- errors and API


@needs_data
@pytest.mark.parametrize(
    "task,missing,fix", [("arc_easy", "ARC-Easy-Test.jsonl", "eval.splits.arc_easy=dev"),
                         ("arc_challenge", "ARC-Challenge-Test.jsonl", "eval.splits.arc_challenge=dev"),
                         ("mmlu", "abstract_algebra_test.csv", "eval.splits.mmlu=val")],
)  # fmt: skip
def test_missing_split_file_is_named(task, missing, fix):
    if (DATA_DIR / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl").exists():
        pytest.skip("this data directory holds the test splits")
    with pytest.raises(FileNotFoundError) as err:
        build_tasks([task], DATA_DIR)
    assert missing in str(err.value) and fix in str(err.value)
    # The reader itself (as lm-eval calls it) fails the same way, never silently on another split.
    loader = {"arc_easy": task_utils.load_arc_easy, "arc_challenge": task_utils.load_arc_challenge}.get(task)
    if loader:
        with pytest.raises(FileNotFoundError, match=missing):
            loader(data_dir=str(DATA_DIR), splits={})


def test_missing_file_in_other_directory(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"valid-labels\.lst"):
        build_tasks(["piqa"], tmp_path)


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_tasks(["piqa", "boolq"], None)
    assert "boolq" in str(err.value)
    assert all(name in str(err.value) for name in ALL_TASKS)


def test_bad_split_values(tmp_path):
    with pytest.raises(ValueError, match="eval.splits.arc_easy='validation'"):
        build_tasks(["arc_easy"], tmp_path, {"arc_easy": "validation"})
    with pytest.raises(ValueError, match="eval.splits.piqa"):
        build_tasks(["piqa"], tmp_path, {"piqa": "test"})
    with pytest.raises(ValueError, match="local data directory"):
        build_tasks(["mmlu"], None, {"mmlu": "val"})


def test_online_uses_official_names(monkeypatch):
    created = []

    class RecordingTaskManager:  # the real one indexes lm-eval's thousands of YAMLs (seconds)
        def __init__(self, **kwargs):
            created.append(kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", RecordingTaskManager)
    names, manager = build_tasks(["piqa", "mmlu", "linearize_wikitext"], None)
    assert names == ["piqa", "mmlu", "wikitext"]
    assert isinstance(manager, RecordingTaskManager) and created == [{}]  # lm-eval's defaults, official tasks
    for name in names:
        assert (OFFICIAL / name).is_dir()


def test_metrics_and_fewshot():
    assert primary_metric("arc_challenge") == ("acc_norm,none", True)
    assert primary_metric("linearize_mmlu") == ("acc,none", True)
    assert primary_metric("wikitext") == ("word_perplexity,none", False)
    assert primary_metric("lambada_openai") == ("acc,none", True)
    assert {t: num_fewshot(t) for t in ALL_TASKS} == {t: 5 if t == "mmlu" else 0 for t in ALL_TASKS}
    assert all(m in TASK_METRICS[t] for t, m in {**PAPER_TASKS, **EXTRA_TASKS}.items())
    with pytest.raises(ValueError, match="known tasks"):
        primary_metric("boolq")


def test_resolve_data_dir(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv("LINEARIZE_DATA_DIR", str(env_dir))
    assert resolve_data_dir(str(tmp_path)) == tmp_path.resolve()
    assert resolve_data_dir(None) == env_dir.resolve()
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_data_dir(str(tmp_path / "absent"))
    monkeypatch.delenv("LINEARIZE_DATA_DIR")
    shared = (REPO / ".." / "shared" / "data").resolve()
    assert resolve_data_dir(None) == (shared if shared.is_dir() else None)


@needs_data
def test_mmlu_group_is_macro_average(local):
    (group,) = [g for name, g in local["groups"].items() if name == "linearize_mmlu"]
    (agg,) = group.aggregate_metric_list
    assert agg.metric == "acc" and agg.weight_by_size is False
    official = load_yaml(OFFICIAL / "mmlu" / "default" / "_mmlu.yaml", resolve_func=False)
    assert official["aggregate_metric_list"][0]["weight_by_size"] is True  # lm-eval: mean over all questions


# ---------------------------------------------------------------------------------------------- tiny end-to-end run


def _tiny_model_and_tokenizer():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["Question: What is the answer?\nAnswer: the water bottle and a food dish."], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok


@needs_data
def test_simple_evaluate_tiny_llama(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    model, tok = _tiny_model_and_tokenizer()
    monkeypatch.chdir(tmp_path)  # the tasks must not depend on the working directory
    names, manager = build_tasks(["piqa", "arc_easy"], DATA_DIR, {"arc_easy": "dev"})
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
        tasks=names,
        task_manager=manager,
        limit=4,
        bootstrap_iters=0,
    )
    for name in names:
        res = results["results"][name]
        for metric in ("acc,none", "acc_norm,none"):
            assert 0.0 <= res[metric] <= 1.0, (name, metric, res)
    key, higher = primary_metric("arc_easy")
    assert key in results["results"]["linearize_arc_easy"] and higher
    assert results["configs"]["linearize_arc_easy"]["metadata"]["splits"]["arc_easy"] == "dev"
    assert not math.isnan(results["results"]["linearize_piqa"]["acc,none"])


@needs_data
@pytest.mark.slow
def test_simple_evaluate_every_task(tmp_path, monkeypatch):
    """Every local task through lm-eval end to end (2 documents each; MMLU 5-shot, 1 per subject)."""
    from lm_eval.models.huggingface import HFLM

    model, tok = _tiny_model_and_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    monkeypatch.chdir(tmp_path)
    for task in ALL_TASKS:
        names, manager = build_tasks([task], DATA_DIR, DEV_SPLITS)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=1 if task == "mmlu" else 2,
            num_fewshot=num_fewshot(task),
            bootstrap_iters=0,
        )["results"]
        got = results[LOCAL_NAMES[task]]
        assert all(f"{m},none" in got for m in TASK_METRICS[task]), (task, got)
        key, higher = primary_metric(task)
        value = got[key]
        assert (0.0 <= value <= 1.0) if higher else (value >= 1.0), (task, key, value)
        if task == "mmlu":
            subjects = [v["acc,none"] for k, v in results.items() if k.startswith("linearize_mmlu::")]
            assert len(subjects) == 57
            assert got["acc,none"] == pytest.approx(sum(subjects) / 57)


@needs_data
def test_task_limits_override_limit_per_task(tmp_path, monkeypatch):
    """eval.task_limits sets one task's document count; the others keep eval.limit; the cache records each."""
    from omegaconf import OmegaConf

    from linearize import evaluate

    model, tok = _tiny_model_and_tokenizer()
    monkeypatch.chdir(tmp_path)
    ecfg = {"tasks": ["piqa", "arc_easy"], "modes": [], "base": True, "kinds": [], "limit": 5, "batch_size": 4,
            "task_limits": {"arc_easy": 3}, "data_dir": str(DATA_DIR), "splits": {"arc_easy": "dev"}}  # fmt: skip
    cfg = OmegaConf.create({"eval": ecfg, "seed": 0})
    _, _, details = evaluate.run(model, tok, cfg, out_dir=tmp_path)
    assert details["base"]["piqa"]["metrics"]["sample_len"] == 5
    assert details["base"]["arc_easy"]["metrics"]["sample_len"] == 3
    cached = json.loads((tmp_path / "eval" / "base" / "arc_easy.json").read_text())
    assert cached["settings"]["limit"] == 3
    # a changed task limit is a different setting: the cached score is not reused
    cfg.eval.task_limits.arc_easy = 2
    _, _, details = evaluate.run(model, tok, cfg, out_dir=tmp_path)
    assert details["base"]["arc_easy"]["metrics"]["sample_len"] == 2
    assert details["base"]["piqa"]["metrics"]["sample_len"] == 5



def test_logits_kept_covers_every_scored_position():
    from linearize.evaluate import logits_kept

    scored = {(5, 6, 7, 8): 2, (9, 10): 1, (3, 0): 1}  # input tokens -> continuation length
    # width 6: row 0 scores positions 2-3 (within the last 4), row 1 position 1 (the last 5)
    assert logits_kept([[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0]], scored) == 5
    assert logits_kept([[5, 6, 7, 8]], scored) == 2
    assert logits_kept([[3, 0, 0]], scored) == 2  # an input that ends in token 0, which is also the padding
    assert logits_kept([[3, 0, 0]], {**scored, (3,): 1}) is None  # both readings count: position 0 as well
    assert logits_kept([[5, 6, 7, 8], [1, 2, 3, 4]], scored) is None  # a row matching no request: all positions


@needs_data
def test_scoring_lm_matches_hflm_with_fewer_logits(tmp_path, monkeypatch):
    """evaluate's lm-eval model gives HFLM's log-likelihoods and greedy flags while the LM head sees fewer
    positions (logits_to_keep), on batches of mixed lengths with right padding."""
    from lm_eval.models.huggingface import HFLM

    from linearize import evaluate

    model, tok = _tiny_model_and_tokenizer()
    monkeypatch.chdir(tmp_path)
    positions: list[int] = []
    model.lm_head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[0] * args[0].shape[1]))
    for task in ("piqa", "arc_easy"):
        names, manager = build_tasks([task], DATA_DIR, {"arc_easy": "dev"})
        (task_obj,) = manager.load(names)["tasks"].values()
        task_obj.build_all_requests(limit=6, rank=0, world_size=1)
        want = HFLM(pretrained=model, tokenizer=tok, batch_size=4).loglikelihood(task_obj.instances, disable_tqdm=True)
        full, positions[:] = sum(positions), []
        got = evaluate.scoring_lm(model, tok, batch_size=4).loglikelihood(task_obj.instances, disable_tqdm=True)
        kept, positions[:] = sum(positions), []
        assert [flag for _, flag in got] == [flag for _, flag in want]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-5)
        assert kept < full, (task, kept, full)


def test_training_data_without_a_data_directory_or_the_hub_names_the_fix(monkeypatch):
    """No data directory anywhere and the hub unreachable (an offline machine): the error names the variable and
    the option that fix it, not the frames of datasets."""
    from omegaconf import OmegaConf

    from linearize import data
    from linearize.config import MissingInputError

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'yahma/alpaca-cleaned' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(data, "resolve_data_dir", lambda value: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = OmegaConf.create({"data_dir": None, "local_file": "alpaca/alpaca_data_1k.json",
                            "hub_id": "yahma/alpaca-cleaned", "hub_split": "train", "max_examples": None})
    with pytest.raises(MissingInputError) as info:
        data.load_examples(cfg)
    msg = str(info.value)
    assert "$LINEARIZE_DATA_DIR" in msg and "eval.data_dir" in msg and "alpaca/alpaca_data_1k.json" in msg
    assert "yahma/alpaca-cleaned" in msg and "ConnectionError" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
