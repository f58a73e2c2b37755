"""The paper's lm-eval tasks, online (official task names, data from the hub) or offline (local data directory).

Offline, the YAMLs in this folder define `linearize_<task>` copies of the official tasks: same prompts, choices,
targets and metrics, with a `custom_dataset` reader (utils.py) that takes the data directory and the chosen
splits from the TaskManager metadata, so nothing depends on the process cwd. See README.md for each task's
source file and known differences from the official task.

    names, tm = build_tasks(["piqa", "arc_easy", "mmlu"], resolve_data_dir(cfg.eval.data_dir), {"arc_easy": "dev"})
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=names, task_manager=tm,
                                      num_fewshot=...)  # one call per num_fewshot(name) value
    score = results["results"][names[i]][primary_metric("piqa")[0]]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from linearize.config import MissingInputError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

TASK_DIR = Path(__file__).resolve().parent

# Official lm-eval name -> the metric the paper reports (all 0-shot except MMLU, 5-shot).
PAPER_TASKS: dict[str, str] = {
    "piqa": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "mmlu": "acc",
}
# Further tasks for longer contexts, with their headline metric.
EXTRA_TASKS: dict[str, str] = {"lambada_openai": "acc", "wikitext": "word_perplexity"}
# Metrics where lower is better; every other metric of these tasks is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})
# All metrics each task reports (official name -> metric names).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "piqa": ("acc", "acc_norm"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "hellaswag": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "mmlu": ("acc",),
    "lambada_openai": ("acc", "perplexity"),
    "wikitext": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
# Official lm-eval name -> the local task (or group, for mmlu) defined in this folder.
LOCAL_NAMES: dict[str, str] = {name: f"linearize_{name}" for name in (*PAPER_TASKS, *EXTRA_TASKS)}
KNOWN_TASKS: tuple[str, ...] = tuple(LOCAL_NAMES)
_OFFICIAL_NAMES = {local: name for name, local in LOCAL_NAMES.items()}
_FEWSHOT = {"mmlu": 5}


class _DropMetadataHint(logging.Filter):
    """lm-eval logs a hint about passing `--metadata` for every task with a custom_dataset (64 lines for MMLU);
    build_tasks already passes the metadata these tasks need, so the hint is only noise for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("linearize_") and "Custom kwargs can be passed" in msg)


def _quiet_metadata_hint() -> None:
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropMetadataHint) for f in task_logger.filters):
        task_logger.addFilter(_DropMetadataHint())


def official_name(name: str) -> str:
    """Official lm-eval name for an official or local task name; ValueError listing the known ones otherwise."""
    if name in LOCAL_NAMES:
        return name
    if name in _OFFICIAL_NAMES:
        return _OFFICIAL_NAMES[name]
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}")


def resolve_data_dir(value: str | os.PathLike | None) -> Path | None:
    """The local data directory: `value` (config) > $LINEARIZE_DATA_DIR > ../shared/data > None (use the hub).

    ../shared/data is looked up beside the repository (<repo>/../shared/data) and then from the cwd; it is used
    only if it exists. An explicitly given directory (value or environment) must exist.
    """
    for source, given in (("eval.data_dir", value), ("$LINEARIZE_DATA_DIR", os.environ.get("LINEARIZE_DATA_DIR"))):
        if given not in (None, ""):
            path = Path(given).expanduser().resolve()
            if not path.is_dir():
                raise MissingInputError(f"{source}={given!s}: no such directory")
            return path
    for candidate in (TASK_DIR.parents[1] / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def build_tasks(
    names: list[str], data_dir: Path | None, splits: dict[str, str] | None = None
) -> tuple[list[str], TaskManager]:
    """Task names for `lm_eval.simple_evaluate(tasks=...)` and the TaskManager to pass with them.

    names: official task names (local `linearize_*` names are accepted too). With `data_dir`, the local tasks
    reading that directory, for the splits in `splits` ({"arc_easy": "dev", "mmlu": "val", ...}; defaults: test);
    every file is checked first, so a missing one raises FileNotFoundError naming it and the option that picks
    another split. Without `data_dir`, the official names and lm-eval's default TaskManager (data from the hub),
    where only the default splits exist.
    """
    from lm_eval.tasks import TaskManager

    # Imported here: utils pulls in `datasets` and lm-eval, which resolve_data_dir and the tables do not need.
    from linearize.tasks.utils import SPLIT_CHOICES, check_files, resolve_split

    official = [official_name(n) for n in names]
    splits = dict(splits or {})
    for task in splits:
        if task not in SPLIT_CHOICES:
            choosable = ", ".join(sorted(SPLIT_CHOICES))
            raise ValueError(f"eval.splits.{task}: only these tasks have a choice of split: {choosable}")
    chosen = {task: resolve_split(task, splits) for task in SPLIT_CHOICES}
    if data_dir is None:
        custom = {t: s for t, s in chosen.items() if s != SPLIT_CHOICES[t][0] and t in official}
        if custom:
            raise ValueError(
                f"eval.splits {custom} pick files of a local data directory, but none was found. Set eval.data_dir "
                "(or $LINEARIZE_DATA_DIR), or drop these overrides (eval.splits={}) to run the official hub tasks, "
                "which evaluate the test split"
            )
        return official, TaskManager()
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise MissingInputError(f"data directory {data_dir} does not exist")
    for task in official:
        check_files(task, data_dir, chosen)
    _quiet_metadata_hint()
    # Only our folder is indexed: faster than scanning lm-eval's thousands of YAMLs, and no name can clash.
    manager = TaskManager(
        include_path=str(TASK_DIR),
        include_defaults=False,
        metadata={"data_dir": str(data_dir), "splits": chosen},
    )
    return [LOCAL_NAMES[t] for t in official], manager


def primary_metric(name: str) -> tuple[str, bool]:
    """(lm-eval results key such as "acc,none", higher_is_better) of the metric reported for `name`."""
    task = official_name(name)
    metric = {**PAPER_TASKS, **EXTRA_TASKS}[task]
    return f"{metric},none", metric not in LOWER_IS_BETTER


def num_fewshot(name: str) -> int:
    """Few-shot examples the paper uses: 5 for MMLU, 0 for every other task."""
    return _FEWSHOT.get(official_name(name), 0)


__all__ = [
    "EXTRA_TASKS",
    "KNOWN_TASKS",
    "LOCAL_NAMES",
    "LOWER_IS_BETTER",
    "PAPER_TASKS",
    "TASK_DIR",
    "TASK_METRICS",
    "build_tasks",
    "num_fewshot",
    "official_name",
    "primary_metric",
    "resolve_data_dir",
]
