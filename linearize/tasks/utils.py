"""Readers for the local copies of the evaluation data, shaped like the Hugging Face rows lm-eval expects.

Every `load_*` function is a `custom_dataset` callable for the task YAMLs in this folder: lm-eval calls it with
the TaskManager metadata as keyword arguments (`data_dir`, `splits`, plus lm-eval's own `version`,
`config_source`, ... which are ignored) and it returns a `datasets.DatasetDict`. The rows have the same fields
as the hub dataset the official task reads, so the official `doc_to_text` / `doc_to_choice` / `doc_to_target`
templates apply unchanged.

lm-eval imports this file by path (not as `linearize.tasks.utils`), so it must not use relative imports.
"""

from __future__ import annotations

import bz2
import csv
import json
import logging
from pathlib import Path
from typing import Any

import datasets

# The official helpers are reused as they are, so these tasks cannot drift from lm-eval's.
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice as winogrande_doc_to_choice  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_doc_to_target  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text as winogrande_doc_to_text  # noqa: F401

from linearize.config import MissingInputError

log = logging.getLogger(__name__)

# Key under which the ARC and MMLU loaders return the split picked in config; their YAMLs set `test_split: eval`.
EVAL_SPLIT = "eval"

# Splits a user may pick per task (config `eval.splits.<task>`); the first one is the default.
SPLIT_CHOICES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("test", "dev"),
    "arc_challenge": ("test", "dev"),
    "mmlu": ("test", "val"),
}

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip

_ARC_FILES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
_ARC_SPLIT_FILE = {"test": "Test", "dev": "Dev"}


# ---------------------------------------------------------------------------------------------- splits and files


def resolve_split(task: str, splits: dict[str, str] | None) -> str:
    """The split of `task` to evaluate: `splits[task]` if given, else the default. Raises ValueError for a bad value."""
    choices = SPLIT_CHOICES.get(task)
    value = (splits or {}).get(task)
    if choices is None:
        if value is not None:
            raise ValueError(f"eval.splits.{task}={value!r}: {task} has a single split here; remove this option.")
        return ""
    if value is None:
        return choices[0]
    if value not in choices:
        raise ValueError(f"eval.splits.{task}={value!r} is not one of {list(choices)}.")
    return value


def mmlu_file(data_dir: Path, subject: str, split: str) -> Path:
    return Path(data_dir) / "mmlu" / split / f"{subject}_{split}.csv"


def required_files(task: str, data_dir: Path, splits: dict[str, str] | None = None) -> list[Path]:
    """Every file the local version of `task` (official name) reads, for the split chosen in `splits`."""
    d = Path(data_dir)
    split = resolve_split(task, splits)
    if task == "piqa":
        return [d / "piqa" / "valid.jsonl", d / "piqa" / "valid-labels.lst"]
    if task in _ARC_FILES:
        name = _ARC_FILES[task]
        return [d / "arc" / name / f"{name}-{_ARC_SPLIT_FILE[split]}.jsonl"]
    if task == "hellaswag":
        return [d / "hellaswag" / "hellaswag_val_full.txt.bz2"]
    if task == "winogrande":
        return [d / "winogrande" / "winogrande_1.1" / "dev.jsonl"]
    if task == "mmlu":
        return [mmlu_file(d, s, sp) for sp in (split, "dev") for s in MMLU_SUBJECTS]
    if task == "lambada_openai":
        return [d / "lambada" / "lambada_test.jsonl"]
    if task == "wikitext":
        return [d / "wikitext-2-raw" / "wiki.test.raw", d / "wikitext-2" / "test.txt"]
    raise ValueError(f"no local data layout is known for task {task!r}")


def check_files(task: str, data_dir: Path, splits: dict[str, str] | None = None) -> None:
    """Raise FileNotFoundError naming the first missing file of `task` and how to pick another split."""
    missing = [p for p in required_files(task, data_dir, splits) if not p.is_file()]
    if not missing:
        return
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    msg = f"{task}: data file {missing[0]}{more} not found in the data directory {data_dir}."
    choices = SPLIT_CHOICES.get(task)
    if choices:
        split = resolve_split(task, splits)
        others = [c for c in choices if c != split]
        msg += (
            f" It holds the {split!r} split; to evaluate another split present there, set "
            + " or ".join(f"eval.splits.{task}={c}" for c in others)
            + "."
        )
    else:
        msg += " Point eval.data_dir (or $LINEARIZE_DATA_DIR) at a directory laid out like ../shared/data."
    raise MissingInputError(msg)


def _data_dir(data_dir: str | Path | None, task: str) -> Path:
    if not data_dir:
        raise ValueError(
            f"linearize_{task} reads a local data directory but none was given: build the tasks with "
            "linearize.tasks.build_tasks(names, data_dir) (it passes data_dir in the TaskManager metadata)."
        )
    return Path(data_dir)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _single(split: str, rows: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# ---------------------------------------------------------------------------------------------- per-task readers


def read_piqa(data_dir: Path) -> list[dict[str, Any]]:
    """PIQA validation as rows {goal, sol1, sol2, label: int} (the baber/piqa fields)."""
    rows = _read_jsonl(data_dir / "piqa" / "valid.jsonl")
    labels = (data_dir / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()
    if len(labels) != len(rows):
        raise ValueError(f"piqa: {len(rows)} questions but {len(labels)} labels in {data_dir / 'piqa'}")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, labels)]


def read_arc(data_dir: Path, task: str, split: str) -> list[dict[str, Any]]:
    """ARC in the AI2 jsonl format as allenai/ai2_arc rows {id, question, choices: {text, label}, answerKey}."""
    (path,) = required_files(task, data_dir, {task: split})
    rows = []
    for r in _read_jsonl(path):
        choices = r["question"]["choices"]
        rows.append(
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": r["answerKey"],
            }
        )
    return rows


def read_hellaswag(data_dir: Path) -> list[dict[str, Any]]:
    """HellaSwag validation from the derived 6-line text format, as Rowan/hellaswag-like rows.

    Each item is 6 lines: `activity_label + ": " + ctx`, the gold label, then the 4 endings. `ctx` already joins
    ctx_a and ctx_b, so it goes to `ctx_a` with an empty `ctx_b`; the official `process_docs` then rebuilds the same
    query (its trailing space is stripped). ctx_b's first letter is not capitalised in this source (see README).
    """
    path = data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {path} has {len(lines)} lines, not a multiple of 6")
    rows = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        activity_label, sep, ctx = head.partition(": ")
        if not sep or label not in {"0", "1", "2", "3"}:
            raise ValueError(f"hellaswag: item at line {i + 1} of {path} is malformed: {head[:80]!r} / {label!r}")
        rows.append(
            {
                "ind": i // 6,
                "activity_label": activity_label,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "label": label,
            }
        )
    return rows


def read_winogrande(data_dir: Path) -> list[dict[str, Any]]:
    """WinoGrande 1.1 dev (= winogrande_xl validation) as rows {sentence, option1, option2, answer: "1"|"2"}."""
    rows = _read_jsonl(data_dir / "winogrande" / "winogrande_1.1" / "dev.jsonl")
    return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in rows]


def read_mmlu(data_dir: Path, subject: str, split: str) -> list[dict[str, Any]]:
    """One MMLU subject/split (hendrycks CSV, no header) as cais/mmlu rows {question, subject, choices, answer: int}."""
    path = mmlu_file(data_dir, subject, split)
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, rec in enumerate(csv.reader(f), 1):
            if len(rec) != 6 or rec[5] not in ("A", "B", "C", "D"):
                raise ValueError(f"mmlu: row {n} of {path} is not question,A,B,C,D,answer-letter: {rec!r}")
            rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5], "answer": "ABCD".index(rec[5])})
    return rows


def read_lambada(data_dir: Path) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI version) test as rows {text}."""
    return [{"text": r["text"]} for r in _read_jsonl(data_dir / "lambada" / "lambada_test.jsonl")]


_BLANK = " "  # how WikiText marks an empty line: a single space


def wikitext_lines(data_dir: Path) -> list[str]:
    """The lines of wikitext-2-raw-v1 test, blank lines included.

    The local wiki.test.raw dropped the blank lines (and has CRLF endings). Its non-blank lines align one-to-one
    with the non-blank lines of wikitext-2/test.txt (the tokenized release of the same articles), so the blank
    lines are put back where test.txt has them. A raw file that still has its blank lines is used as it is.
    """
    raw = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    raw_lines = raw.split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()
    if any(not line.strip() for line in raw_lines):
        return raw_lines
    layout = (data_dir / "wikitext-2" / "test.txt").read_text(encoding="utf-8").split("\n")
    if layout and layout[-1] == "":
        layout.pop()
    n_text = sum(1 for line in layout if line.strip())
    if n_text != len(raw_lines):
        raise ValueError(
            f"wikitext: {len(raw_lines)} lines in wiki.test.raw but {n_text} non-blank lines in wikitext-2/test.txt; "
            "cannot restore the blank lines"
        )
    it = iter(raw_lines)
    return [next(it) if line.strip() else _BLANK for line in layout]


def split_wikitext_pages(lines: list[str]) -> list[str]:
    """Group lines into articles the way EleutherAI/wikitext_document_level does: a page starts at each top-level
    heading (` = Title = `, not ` = = Section = = `); lines are joined with "\\n"; an all-blank page is dropped."""
    pages, page = [], []
    for line in lines + [""]:  # the raw file ends with a newline, i.e. a last empty line
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.endswith(" ="):
            text = "\n".join(page)
            if text.strip():
                pages.append(text)
            page = []
        page.append(line)
    pages.append("\n".join(page))
    return pages


def read_wikitext(data_dir: Path) -> list[dict[str, Any]]:
    """WikiText-2 raw test as one row {page} per article."""
    return [{"page": p} for p in split_wikitext_pages(wikitext_lines(data_dir))]


# ---------------------------------------------------------------------------------------------- custom_dataset hooks


def load_piqa(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    d = _data_dir(data_dir, "piqa")
    check_files("piqa", d)
    return _single("validation", read_piqa(d))


def _load_arc(task: str, data_dir: str | None, splits: dict[str, str] | None) -> datasets.DatasetDict:
    d = _data_dir(data_dir, task)
    check_files(task, d, splits)
    split = resolve_split(task, splits)
    log.info("linearize_%s: evaluating the %s split (%s)", task, split, required_files(task, d, splits)[0])
    return _single(EVAL_SPLIT, read_arc(d, task, split))


def load_arc_easy(data_dir: str | None = None, splits: dict[str, str] | None = None, **_: Any) -> datasets.DatasetDict:
    return _load_arc("arc_easy", data_dir, splits)


def load_arc_challenge(
    data_dir: str | None = None, splits: dict[str, str] | None = None, **_: Any
) -> datasets.DatasetDict:
    return _load_arc("arc_challenge", data_dir, splits)


def load_hellaswag(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    d = _data_dir(data_dir, "hellaswag")
    check_files("hellaswag", d)
    return _single("validation", read_hellaswag(d))


def load_winogrande(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    d = _data_dir(data_dir, "winogrande")
    check_files("winogrande", d)
    return _single("validation", read_winogrande(d))


def load_mmlu(
    data_dir: str | None = None, splits: dict[str, str] | None = None, subject: str | None = None, **_: Any
) -> datasets.DatasetDict:
    """One subject: the chosen split (test or val) under `eval`, and the few-shot exemplars under `dev`."""
    if subject not in MMLU_SUBJECTS:
        raise ValueError(f"mmlu: unknown subject {subject!r}")
    d = _data_dir(data_dir, "mmlu")
    split = resolve_split("mmlu", splits)
    for path in (mmlu_file(d, subject, split), mmlu_file(d, subject, "dev")):
        if not path.is_file():
            check_files("mmlu", d, splits)  # raises, naming the first missing file of the whole benchmark
    return datasets.DatasetDict(
        {
            EVAL_SPLIT: datasets.Dataset.from_list(read_mmlu(d, subject, split)),
            "dev": datasets.Dataset.from_list(read_mmlu(d, subject, "dev")),
        }
    )


def load_lambada_openai(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    d = _data_dir(data_dir, "lambada_openai")
    check_files("lambada_openai", d)
    return _single("test", read_lambada(d))


def load_wikitext(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    d = _data_dir(data_dir, "wikitext")
    check_files("wikitext", d)
    return _single("test", read_wikitext(d))
