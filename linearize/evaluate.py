"""Stage 3, evaluation: lm-eval tasks for the base model and for the converted model under each component
ablation, with Rec. Perf (mean score / base mean x 100).

    python -m linearize.train stages=[evaluate] eval.limit=100

The converted model is handed to lm-eval in-process (``HFLM(pretrained=model)``, through :func:`scoring_lm`, which
runs the LM head only where lm-eval reads logits); the base row runs the same weights with LoRA disabled and
Hugging Face's softmax attention. Each (row, task) result is cached as JSON under
``<run>/eval/`` with the settings that produced it, so a rerun only computes what is missing.

Rows: ``base``; one per ``eval.modes`` entry (component ablations of the model as converted); and one per
``eval.kinds`` entry other than the converted kind, named ``<kind>@<trained kind>`` (e.g. ``hybrid@linear``: a
linear-only conversion run with the sliding window added at inference, no retraining). Only the full model
differs between kinds (``swa_only``, ``la_only``, ``sinks_only``, ``no_attention`` do not depend on the kind),
so an extra kind adds a single row, in mode ``hybrid``.
"""

from __future__ import annotations

import functools
import json
import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from linearize import tasks as task_registry
from linearize.attention import attention_kind, attention_mode, hybrid_layers, softmax_attention
from linearize.models import takes_logits_to_keep
from linearize.training import LogFn

log = logging.getLogger(__name__)

BASE = "base"


@contextmanager
def base_model(model):
    """The unconverted model: LoRA disabled (if any) and softmax attention."""
    with ExitStack() as stack:
        if hasattr(model, "disable_adapter"):
            stack.enter_context(model.disable_adapter())
        if hybrid_layers(model):
            stack.enter_context(softmax_attention(model))
        yield


def kind_rows(model, kinds) -> dict[str, str]:
    """``{"<kind>@<trained kind>": kind}`` for each requested kind other than the one the layers were converted to."""
    trained = {layer.kind for layer in hybrid_layers(model)}
    if len(trained) != 1:
        return {}
    (trained_kind,) = trained
    return {f"{kind}@{trained_kind}": kind for kind in kinds if kind != trained_kind}


@contextmanager
def _row(model, row: str, kinds: dict[str, str]):
    """The model as scored for ``row``: base, a component ablation, or another attention kind."""
    if row == BASE:
        with base_model(model):
            yield
    elif row in kinds:
        with attention_kind(model, kinds[row]), attention_mode(model, "hybrid"):
            yield
    else:
        with attention_mode(model, row):
            yield


@contextmanager
def _no_kv_cache(model):
    """lm-eval scores whole sequences; a KV cache would only cost memory."""
    config = model.config
    previous = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = previous


def logits_kept(rows: list[list[int]], scored: dict[tuple[int, ...], int]) -> int | None:
    """How many trailing positions of a right-padded (with 0) batch hold every logit lm-eval reads, or None (all).

    ``scored`` maps each request's input tokens to its continuation length (lm-eval reads the logits of the last
    ``contlen`` input positions). A row is matched by its tokens, trying each length whose tail is all padding (a
    real input may end in token 0), and every match counts, so the answer covers the row whatever its true length;
    a row that matches nothing makes the whole batch keep every position.
    """
    width = len(rows[0]) if rows else 0
    keep = 0
    for row in rows:
        need, n = 0, width
        while n > 0:
            contlen = scored.get(tuple(row[:n]))
            if contlen is not None:
                need = max(need, width - n + contlen)
            if row[n - 1] != 0:  # the padding starts after position n - 1 at the earliest
                break
            n -= 1
        if need == 0:
            return None
        keep = max(keep, need)
    return keep if keep < width else None


@functools.cache
def _scoring_lm_class():
    from lm_eval.models.huggingface import HFLM

    class ScoringLM(HFLM):
        """``HFLM`` that projects onto the vocabulary only at the positions whose logits lm-eval reads.

        For a multiple-choice request lm-eval keeps the logits of the continuation and drops the context's, but
        ``HFLM`` computes the LM head (and a log-softmax over the vocabulary) at every position of the batch; for
        SmolLM2-135M the 49k-token head is a fifth of the model's FLOPs. Here each batch's forward gets
        ``logits_to_keep`` = the fewest trailing positions that still hold every row's continuation (right padding
        included); lm-eval locates the continuation from the end of the returned logits (its offset for prefix
        tokens), so the scores are the same numbers. Batches that cannot be matched to their requests keep every
        position.
        """

        _scored: dict[tuple[int, ...], int] | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self.backend != "causal" or not takes_logits_to_keep(self.model):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            scored: dict[tuple[int, ...], int] = {}
            for _, context_enc, continuation_enc in requests:  # the input HFLM builds for each request
                key = tuple((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1])
                scored[key] = max(scored.get(key, 0), len(continuation_enc))
            self._scored = scored
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._scored = None

        def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
            keep = None
            if self._scored is not None and attn_mask is None and labels is None:
                keep = logits_kept(inps.tolist(), self._scored)
            if keep is None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            dtype = getattr(self, "mixed_precision_dtype", None)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
                return self.model(inps, logits_to_keep=keep).logits

    return ScoringLM


def scoring_lm(model, tokenizer, **kwargs):
    """lm-eval's ``HFLM`` around an in-memory ``model`` (kwargs: ``batch_size``, ``max_length``, ...), computing
    logits only where lm-eval scores them (:func:`logits_kept`)."""
    return _scoring_lm_class()(pretrained=model, tokenizer=tokenizer, **kwargs)


def _score(results: dict, task: str) -> tuple[float, dict]:
    """(the paper's metric for ``task``, every numeric metric lm-eval returned for it)."""
    key, _ = task_registry.primary_metric(task)
    table = results["results"]
    name = next((n for n in table if n == task or n.endswith(task)), None)
    if name is None:
        raise KeyError(f"lm-eval returned no result for {task}; got {sorted(table)}")
    metrics = {k: v for k, v in table[name].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if key not in metrics:
        raise KeyError(f"lm-eval result for {task} has no {key}; got {sorted(metrics)}")
    return float(metrics[key]), metrics


def task_limit(ecfg: DictConfig, task: str) -> int | None:
    """Documents scored for ``task`` (per subject for MMLU): ``eval.task_limits[task]`` if set, else ``eval.limit``."""
    limits = ecfg.get("task_limits") or {}
    return limits[task] if task in limits else ecfg.limit


def evaluate_task(lm, task: str, ecfg: DictConfig, data_dir, seed: int) -> tuple[float, dict]:
    import lm_eval

    names, manager = task_registry.build_tasks([task], data_dir, dict(ecfg.splits))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=manager,
        num_fewshot=task_registry.num_fewshot(task),
        limit=task_limit(ecfg, task),
        bootstrap_iters=0,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        verbosity="WARNING",
    )
    score, metrics = _score(results, names[0])
    return score, {"metrics": metrics, "lm_eval_task": names[0], "versions": results.get("versions", {})}


def summarise(rows: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Adds ``avg`` (mean over the paper's higher-is-better tasks) and ``rec`` (avg / base avg x 100) per row."""
    scored = [t for t in tasks if task_registry.primary_metric(t)[1]]
    out = {}
    base_avg = None
    if BASE in rows and scored:
        base_avg = sum(rows[BASE][t] for t in scored) / len(scored)
    for row, scores in rows.items():
        out[row] = dict(scores)
        if scored:
            avg = sum(scores[t] for t in scored) / len(scored)
            out[row]["avg"] = avg
            if base_avg:
                out[row]["rec"] = 100.0 * avg / base_avg
    return out


def run(model, tokenizer, cfg: DictConfig, *, out_dir: Path | None = None, log_fn: LogFn = lambda m: None):
    """Scores ``cfg.eval.tasks`` for the base row (``cfg.eval.base``), each of ``cfg.eval.modes`` and each extra
    kind of ``cfg.eval.kinds`` (rows ``<kind>@<trained kind>``).

    Returns ``(table, metrics, details)``: ``table[row][task]`` is the paper's metric for that task (plus ``avg``
    and ``rec``); ``metrics`` flattens it as ``eval/<row>/<task>``; ``details[row][task]`` holds every metric
    lm-eval returned, the lm-eval task name and its version.
    """
    ecfg = cfg.eval
    data_dir = task_registry.resolve_data_dir(ecfg.data_dir)
    tasks = list(ecfg.tasks)
    converted = bool(hybrid_layers(model))
    for layer in hybrid_layers(model):  # SSD state belongs to training; evaluating with it would mislabel rows
        assert not layer.drop_swa and layer.drop_mask is None, "SSD's dropped window leaked out of a training stage"
    kinds = kind_rows(model, ecfg.kinds) if converted else {}
    rows = ([BASE] if ecfg.base else []) + (list(ecfg.modes) + list(kinds) if converted else [])
    splits = OmegaConf.to_container(ecfg.splits)
    cache_dir = Path(out_dir) / "eval" if out_dir is not None else None
    lm = scoring_lm(model, tokenizer, batch_size=ecfg.batch_size)
    table: dict[str, dict[str, float]] = {}
    details: dict[str, dict] = {}
    with _no_kv_cache(model):
        for row in rows:
            with _row(model, row, kinds):  # rows other than base exist only for a converted model
                for task in tasks:
                    settings = {"limit": task_limit(ecfg, task), "splits": splits, "data_dir": str(data_dir)}
                    cached = cache_dir / row / f"{task}.json" if cache_dir is not None else None
                    record = json.loads(cached.read_text()) if cached is not None and cached.is_file() else None
                    if record is None or record.get("settings") != settings:
                        log.info("evaluating %s on %s", row, task)
                        score, info = evaluate_task(lm, task, ecfg, data_dir, cfg.seed)
                        record = {"score": score, "settings": settings, **info}
                        if cached is not None:
                            cached.parent.mkdir(parents=True, exist_ok=True)
                            cached.write_text(json.dumps(record, indent=2))
                    table.setdefault(row, {})[task] = record["score"]
                    details.setdefault(row, {})[task] = record
    table = summarise(table, tasks)
    metrics = {f"eval/{row}/{key}": value for row, scores in table.items() for key, value in scores.items()}
    log_fn(metrics)
    return table, metrics, details
