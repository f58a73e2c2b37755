"""Stage 4, diagnostics: is the linear branch of the hybrid really used?

    python -m linearize.train                                    # runs after evaluate (stage "diagnose")
    python -m linearize.diagnose run_dir=outputs/<run>/<time>    # recompute for a saved run, no retraining

Each metric is a plain function of (model, settings, data); :func:`run` wires them for the pipeline, writes
``diagnostics.json`` and the plots, and logs everything to the tracker. The metrics (docs/diagnostics.md):

- **usage** (:func:`usage`): forward hooks on every :class:`~linearize.attention.HybridAttention` split the op's
  own normaliser and numerator into their sliding-window softmax (SWA) and linear (LA) parts, with the q, k, v
  the op sees (:func:`attention_parts`, the math of ``kernels/hybrid_attention/naive.py``, chunked over query
  positions). Per layer and head, averaged over positions n < window, n >= window and all positions:
  *LA mass share* = Z_n^LA / Z_n and *LA output share* = |A_n^LA| / (|A_n^LA| + |A_n^SWA|) (L2 norms over the
  head dim; the common 1/Z_n cancels).
- **reach** (:func:`task_requests`, :func:`reach`): lm-eval's own requests of a task, tokenised exactly as
  ``HFLM`` does; a scored token is predicted by query position n and reaches the LA branch iff n >= window.
- **passkey** (:func:`passkey`): a 5-digit key hidden in filler text; accuracy of ranking the true key first by
  log-likelihood among random distractor keys, per context length.
- **perplexity by position** (:func:`position_perplexity`): next-token NLL on wikitext-2 grouped by the query
  position n in buckets [0, w), [w, 2w), [2w, 4w), ...
- **ablation deltas** (:func:`ablation_deltas`): hybrid - swa_only and hybrid - la_only from the evaluate stage.
- **verdict** (:func:`verdict`): see the rule in its docstring.

``diagnostics.json`` schema (version 1; :data:`SCHEMA` is the machine-checked form, :func:`validate_schema`)::

    schema_version: 1
    window: int                       attention.window
    attention_kind: str               hybrid | hybrid_overlap | linear
    usage:
      source: str                     "train" (held-out chunks of cfg.data) or an eval task name
      mode: str                       the ablation mode the layers ran in (hybrid = as converted)
      num_sequences, seq_len: int     sequences actually used, their maximum length in tokens
      tokens: {lt_window, ge_window}  query positions seen (per head) on each side of the window
      layers: [int]                   layer indices, L of them
      heads: int                      H
      la_mass_share, la_output_share: {lt_window, ge_window, all: [[float|null] x H] x L}   null: no positions
      overall: {la_mass_share, la_output_share: {lt_window, ge_window, all: float|null}}  mean over layers, heads
      by_position: {bin_size: int, starts: [int], la_mass_share: [float], la_output_share: [float]}
    reach: {task: {requests, items, scored_tokens: int, share_scored_ge_window, share_items_never_reach: float,
                   length: {min, p50, p90, max: int, mean: float}, histogram: {edges: [int], counts: [int]}}}
    passkey: {lengths: [int], trials, distractors: int, chance: float,
              rows: {row: {str(length): {accuracy, share_key_beyond_window, mean_key_distance: float}}}}
    perplexity: {file: str, seq_len, num_sequences: int,
                 rows: {row: {nll, ppl: float, buckets: [{start, end, tokens: int, nll, ppl: float}]}}}
    ablation: {hybrid_minus_swa_only, hybrid_minus_la_only: {task|avg: float}}     absent rows are left out
    verdict: {label: str, text: str, rule: str, inputs: {name: float|null}}
    plots: {name: file name in the run directory}

A section the configuration switched off (empty task list, no probe lengths...) is written as ``null``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from linearize.attention import HybridAttention, attention_mode, hybrid_layers
from linearize.config import MissingInputError
from linearize.kernels.hybrid_attention.naive import repeat_kv
from linearize.models import base_transformers_model, last_logits_only, takes_logits_to_keep

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE = "diagnostics.json"
SIDES = ("lt_window", "ge_window", "all")
BASE = "base"

# ----------------------------------------------------------------------------------------------------------------
# usage: the two parts of the hybrid op




def attention_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor | None,
    k_feat: torch.Tensor | None,
    gamma: torch.Tensor | None,
    *,
    window: int,
    softmax: bool = True,
    linear: str = "outside",
    scale: float | None = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SWA and LA parts of the hybrid op's numerator A_n and normaliser Z_n (``naive.py``'s math, split).

    Args: as ``hybrid_attention_naive`` (q [B, T, H, D], k/v [B, T, Hkv, D], q_feat/k_feat [B, T, H, F] or None,
    gamma [H] or None); ``chunk_size`` query positions are processed at a time: keys older than the chunk's
    window live in a running state S = sum phi(k) v^T, so memory is O(T (C + w)), never T x T.

    Returns ``(a_swa [B, T, H, Dv], z_swa [B, T, H], a_la [B, T, H, Dv], z_la [B, T, H])`` in float32 (float64
    for float64 inputs); the op's output is ``(a_swa + a_la) / (z_swa + z_la + eps)``. Absent parts are zeros.
    """
    if linear not in ("outside", "all", "none"):
        raise ValueError(f"linear must be outside, all or none, got {linear!r}")
    if not softmax and linear == "none":
        raise ValueError("softmax=False with linear='none' leaves no attention terms")
    if chunk_size < 1 or window < 1:
        raise ValueError(f"chunk_size and window must be >= 1, got {chunk_size} and {window}")
    B, T, H, D = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    qf, kf, vf = q.to(dtype), repeat_kv(k, H).to(dtype), repeat_kv(v, H).to(dtype)
    Dv = vf.shape[-1]
    a_swa = torch.zeros(B, T, H, Dv, dtype=dtype, device=q.device)
    a_la = torch.zeros_like(a_swa)
    z_swa = torch.zeros(B, T, H, dtype=dtype, device=q.device)
    z_la = torch.zeros_like(z_swa)
    if linear != "none":
        if q_feat is None or k_feat is None:
            raise ValueError(f"linear={linear!r} needs q_feat and k_feat")
        qp, kp = q_feat.to(dtype), k_feat.to(dtype)
        state = torch.zeros(B, H, kp.shape[-1], Dv, dtype=dtype, device=q.device)
        norm = torch.zeros(B, H, kp.shape[-1], dtype=dtype, device=q.device)
    g = None if gamma is None else gamma.to(dtype).view(1, H, 1, 1)
    consumed = 0  # keys [0, consumed) are summed into the running state
    for n0 in range(0, T, chunk_size):
        n1 = min(T, n0 + chunk_size)
        k0 = max(0, n0 - window + 1)  # older keys are outside every window of this chunk
        offset = torch.arange(n0, n1, device=q.device)[:, None] - torch.arange(k0, n1, device=q.device)[None, :]
        causal = offset >= 0
        if softmax:
            s = torch.einsum("bnhd,bjhd->bhnj", qf[:, n0:n1], kf[:, k0:n1]) * scale
            s = s.masked_fill(~(causal & (offset < window)), float("-inf"))
            p = torch.exp(s - s.amax(dim=-1, keepdim=True))
            if g is not None:
                p = p * g
            a_swa[:, n0:n1] = torch.einsum("bhnj,bjhd->bnhd", p, vf[:, k0:n1])
            z_swa[:, n0:n1] = p.sum(-1).transpose(1, 2)
        if linear != "none":
            if k0 > consumed:  # every key before k0 is in L(n) for all n in the chunk (both spans)
                state += torch.einsum("bjhf,bjhd->bhfd", kp[:, consumed:k0], vf[:, consumed:k0])
                norm += kp[:, consumed:k0].sum(1)
                consumed = k0
            mask = causal & (offset >= window) if linear == "outside" else causal
            a = torch.einsum("bnhf,bjhf->bhnj", qp[:, n0:n1], kp[:, k0:n1]) * mask
            a_la[:, n0:n1] = torch.einsum("bhnj,bjhd->bnhd", a, vf[:, k0:n1]) + torch.einsum(
                "bnhf,bhfd->bnhd", qp[:, n0:n1], state
            )
            z_la[:, n0:n1] = a.sum(-1).transpose(1, 2) + torch.einsum("bnhf,bhf->bnh", qp[:, n0:n1], norm)
    return a_swa, z_swa, a_la, z_la


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (a position without either part)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def shares(a_swa, z_swa, a_la, z_la) -> tuple[torch.Tensor, torch.Tensor]:
    """(LA mass share, LA output share), each [B, T, H], from :func:`attention_parts`."""
    mass = _ratio(z_la, z_swa + z_la)
    n_la, n_swa = a_la.norm(dim=-1), a_swa.norm(dim=-1)
    return mass, _ratio(n_la, n_la + n_swa)


class UsageRecorder:
    """Forward hooks on the hybrid layers that accumulate per-position share sums while the model runs.

    ``sums[layer]`` is [2, H, T_max] (mass, output share summed over the batch), ``counts`` [T_max] the number of
    sequences that covered each position; ``lengths`` gives each sequence's real length (padding excluded).
    """

    def __init__(self, layers: list[HybridAttention], chunk_size: int = 128):
        if not layers:
            raise ValueError("usage metrics need a converted model (attention.kind != softmax)")
        self.layers = layers
        self.chunk_size = chunk_size
        self.sums: dict[int, torch.Tensor] = {}
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.lengths: list[int] | None = None
        self.mode = layers[0].mode
        self._handles: list = []

    def _hook(self, module: HybridAttention, args, kwargs, output) -> None:
        q, k, v, scale = (*args, *(kwargs[name] for name in ("q", "k", "v", "scale")[len(args) :]))
        if module.mode in ("sinks_only", "no_attention"):
            raise ValueError(f"usage metrics need an LA or SWA branch; the layers run in mode {module.mode!r}")
        if module.drop_swa or getattr(module, "drop_mask", None) is not None:
            raise ValueError("usage metrics are measured at inference: SSD's sliding-window dropout is active")
        softmax, linear = module.spans()
        q_feat = k_feat = None
        if linear != "none":
            q_feat, k_feat = module.features(q, k)
        parts = attention_parts(
            q, k, v, q_feat, k_feat, module.gamma, window=module.window, softmax=softmax, linear=linear,
            scale=scale, chunk_size=self.chunk_size,
        )  # fmt: skip
        mass, out = shares(*parts)  # [B, T, H]
        B, T, H = mass.shape
        lengths = self.lengths or [T] * B
        valid = torch.arange(T, device=mass.device)[None, :] < torch.tensor(lengths, device=mass.device)[:, None]
        both = torch.stack([mass, out]) * valid[None, :, :, None]  # [2, B, T, H]
        summed = both.sum(1).transpose(1, 2).double().cpu()  # [2, H, T]
        idx = module.layer_idx
        if idx not in self.sums or self.sums[idx].shape[-1] < T:
            grown = torch.zeros(2, H, max(T, self.sums[idx].shape[-1] if idx in self.sums else 0), dtype=torch.float64)
            if idx in self.sums:
                grown[..., : self.sums[idx].shape[-1]] = self.sums[idx]
            self.sums[idx] = grown
        self.sums[idx][..., :T] += summed

    def observe(self, lengths: list[int]) -> None:
        """Call before each forward: the real lengths of the batch's sequences."""
        self.lengths = list(lengths)
        T = max(lengths)
        if self.counts.shape[0] < T:
            self.counts = torch.cat([self.counts, torch.zeros(T - self.counts.shape[0], dtype=torch.float64)])
        for n in lengths:
            self.counts[:n] += 1

    def __enter__(self) -> UsageRecorder:
        self._handles = [layer.register_forward_hook(self._hook, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def summary(self, window: int, bin_size: int) -> dict[str, Any]:
        """Per layer x head means on each side of the window, overall means and the by-position profile."""
        if not self.sums:
            raise RuntimeError("no hybrid layer ran while recording: was the model's attention switched to sdpa?")
        layers = sorted(self.sums)
        T = self.counts.shape[0]
        counts = self.counts
        sides = {
            "lt_window": torch.arange(T) < window,
            "ge_window": torch.arange(T) >= window,
            "all": torch.ones(T, dtype=torch.bool),
        }
        out: dict[str, Any] = {"layers": layers, "heads": int(self.sums[layers[0]].shape[1])}
        out["tokens"] = {s: int(counts[sides[s]].sum()) for s in ("lt_window", "ge_window")}
        overall: dict[str, dict] = {}
        for i, metric in enumerate(("la_mass_share", "la_output_share")):
            per_side: dict[str, list] = {}
            overall[metric] = {}
            for side, mask in sides.items():
                n = counts[mask].sum()
                if n == 0:
                    per_side[side] = [[None] * out["heads"] for _ in layers]
                    overall[metric][side] = None
                    continue
                table = torch.stack([self.sums[layer][i][:, mask].sum(-1) for layer in layers]) / n
                per_side[side] = table.tolist()
                overall[metric][side] = float(table.mean())
            out[metric] = per_side
        out["overall"] = overall
        starts = list(range(0, T, bin_size))
        profile: dict[str, Any] = {"bin_size": bin_size, "starts": starts}
        total = torch.stack([self.sums[layer] for layer in layers]).sum(0).sum(1)  # [2, T] over layers, heads
        denominator = counts * len(layers) * out["heads"]
        for i, metric in enumerate(("la_mass_share", "la_output_share")):
            profile[metric] = [
                float(total[i, s : s + bin_size].sum() / denominator[s : s + bin_size].sum()) for s in starts
            ]
        out["by_position"] = profile
        return out


def _batches(sequences: list[torch.Tensor], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Right-padded batches of 1-D token tensors (causal attention ignores right padding)."""
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        lengths = [len(s) for s in chunk]
        batch = torch.full((len(chunk), max(lengths)), pad_id, dtype=torch.long)
        for row, seq in enumerate(chunk):
            batch[row, : len(seq)] = seq
        yield batch, lengths


@torch.no_grad()
def usage(
    model,
    sequences: list[torch.Tensor],
    *,
    window: int,
    batch_size: int = 1,
    chunk_size: int = 128,
    bin_size: int = 16,
    pad_id: int = 0,
) -> dict[str, Any]:
    """LA mass and output shares per layer and head on ``sequences`` (1-D token tensors), in the layers' mode."""
    if not sequences:
        raise ValueError("usage metrics need at least one sequence")
    device = next(model.parameters()).device
    layers = hybrid_layers(model)
    recorder = UsageRecorder(layers, chunk_size=chunk_size)
    no_logits = last_logits_only(model)  # the hooks record; the logits are not needed
    with recorder:
        for batch, lengths in _batches(sequences, batch_size, pad_id):
            recorder.observe(lengths)
            model(input_ids=batch.to(device), use_cache=False, **no_logits)
    out = recorder.summary(window, bin_size)
    out.update(mode=recorder.mode, num_sequences=len(sequences), seq_len=max(len(s) for s in sequences))
    return out


# ----------------------------------------------------------------------------------------------------------------
# reach: lm-eval's requests against the window


@dataclass
class Request:
    """One model call lm-eval makes: ``tokens`` is the input it feeds (after its own truncation); the scored tokens
    are predicted by the query positions ``[score_start, len(tokens))``."""

    task: str
    doc_id: int
    tokens: list[int]
    score_start: int

    @property
    def scored(self) -> int:
        return len(self.tokens) - self.score_start


def _windows(lm, context_enc: list[int], continuation_enc: list[int], task: str, doc_id: int) -> Request:
    """The input HFLM._loglikelihood_tokens builds: (context + continuation)[-(max_length + 1):][:-1]."""
    whole = (context_enc + continuation_enc)[-(lm.max_length + 1) :]
    tokens = whole[:-1]
    return Request(task, doc_id, tokens, len(tokens) - len(continuation_enc))


def requests_of(lm, instances: Iterable, task: str) -> list[Request]:
    """Token-level requests of lm-eval ``Instance`` objects, tokenised as ``HFLM`` does (``lm`` is an HFLM)."""
    from lm_eval import utils as lm_utils

    out = []
    for inst in instances:
        if inst.request_type == "loglikelihood":
            context, continuation = inst.args[:2]
            if context == "":
                ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation)
            else:
                ctx, cont = lm._encode_pair(context, continuation)
            out.append(_windows(lm, ctx, cont, task, inst.doc_id))
        elif inst.request_type == "loglikelihood_rolling":
            windows = lm_utils.get_rolling_token_windows(
                token_list=lm.tok_encode(inst.args[0]),
                prefix_token=lm.prefix_token_id,
                max_seq_len=lm.max_length,
                context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, windows):
                out.append(_windows(lm, list(ctx), list(cont), task, inst.doc_id))
        else:
            raise ValueError(f"{task}: reach is defined for loglikelihood tasks, got {inst.request_type}")
    return out


def task_requests(lm, task: str, data_dir: Path | None, splits: dict, limit: int | float | None, seed: int = 0):
    """Every request lm-eval would make for ``task`` (official name) with ``limit`` documents per (sub)task."""
    from lm_eval.evaluator_utils import get_sample_size

    from linearize import tasks as task_registry

    names, manager = task_registry.build_tasks([task], data_dir, splits)
    loaded = manager.load(names)
    requests: list[Request] = []
    for name, task_obj in loaded["tasks"].items():
        # the overrides simple_evaluate applies (evaluate.evaluate_task passes num_fewshot and the seed)
        if task_obj.get_config("num_fewshot") != 0:
            task_obj.set_config(key="num_fewshot", value=task_registry.num_fewshot(task))
        task_obj.set_fewshot_seed(seed=seed)
        task_obj.build_all_requests(limit=get_sample_size(task_obj, limit), rank=0, world_size=1)
        requests += requests_of(lm, task_obj.instances, name)
    return requests


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def reach(requests: list[Request], window: int, bins: int = 20) -> dict[str, Any]:
    """Share of scored tokens whose query position is >= ``window``, share of items (documents) none of whose
    requests reaches the window, and the distribution of input lengths (tokens) with histogram edges that
    include the window."""
    if not requests:
        raise ValueError("reach needs at least one request")
    scored = sum(r.scored for r in requests)
    beyond = sum(max(0, len(r.tokens) - max(r.score_start, window)) for r in requests)
    items: dict[tuple[str, int], int] = {}
    for r in requests:
        key = (r.task, r.doc_id)
        items[key] = max(items.get(key, 0), len(r.tokens))
    lengths = [len(r.tokens) for r in requests]
    top = max(max(lengths), window + 1)
    step = max(1, math.ceil(top / bins))
    edges = sorted(set(range(0, top + step, step)) | {window})
    counts = [sum(lo <= n < hi for n in lengths) for lo, hi in zip(edges[:-1], edges[1:])]
    return {
        "requests": len(requests),
        "items": len(items),
        "scored_tokens": scored,
        "share_scored_ge_window": beyond / scored if scored else 0.0,
        # an item never reaches LA when no query position of any of its requests is >= window
        "share_items_never_reach": sum(n <= window for n in items.values()) / len(items),
        "length": {
            "min": min(lengths),
            "p50": _percentile(lengths, 0.5),
            "p90": _percentile(lengths, 0.9),
            "max": max(lengths),
            "mean": sum(lengths) / len(lengths),
        },
        "histogram": {"edges": edges, "counts": counts},
    }


# ----------------------------------------------------------------------------------------------------------------
# long-context probes

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, length: int, key: str, depth: float) -> tuple[list[int], int]:
    """Context ids of exactly ``length`` tokens (filler, the key sentence at relative ``depth``, the question)
    and the number of tokens from the key sentence's end to the context's end (the distance to retrieve)."""
    key_ids = _encode(tokenizer, PASSKEY_KEY.format(key=key))
    question = _encode(tokenizer, PASSKEY_QUESTION)
    n_filler = length - len(key_ids) - len(question)
    if n_filler < 0:
        raise ValueError(
            f"passkey length {length} is shorter than the key sentence and question ({len(key_ids) + len(question)} "
            "tokens); raise diagnostics.passkey_lengths"
        )
    unit = _encode(tokenizer, PASSKEY_FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    at = int(round(depth * n_filler))
    ids = filler[:at] + key_ids + filler[at:] + question
    return ids, length - (at + len(key_ids))


def _prefix_cache(model):
    """A cache that can carry a shared context into several continuations, or None when none serves the model as it
    runs now: the hybrid cache (``linearize.cache``) for converted layers, transformers' DynamicCache for softmax
    attention (the base row or an unconverted model); ``sinks_only`` needs the whole prefix and gets none."""
    from transformers.cache_utils import DynamicCache

    from linearize.attention import IMPLEMENTATION
    from linearize.cache import HybridCache

    base = base_transformers_model(model)
    if base.config._attn_implementation == IMPLEMENTATION:
        return None if any(layer.mode == "sinks_only" for layer in hybrid_layers(model)) else HybridCache(model)
    if hybrid_layers(model) and base.config._attn_implementation not in ("sdpa", "eager"):
        return None
    return DynamicCache(config=base.config)


@torch.no_grad()
def continuation_logprobs(model, context: list[int], candidates: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Sum of log p(candidate tokens | context) for each candidate: [N].

    The context runs once; its cache (:func:`_prefix_cache`) is repeated for the candidates, which then run as one
    right-padded batch, so the context is not recomputed per candidate. Without such a cache (``sinks_only``) each
    candidate runs after its own copy of the context in one batched full forward. Only the scored positions go
    through the LM head.
    """
    from linearize.cache import cache_kwargs

    device = next(model.parameters()).device
    longest = max(len(c) for c in candidates)
    keep = {"logits_to_keep": longest} if takes_logits_to_keep(model) else {}
    cache = _prefix_cache(model)
    if cache is None or not keep:
        width = len(context) + longest - 1
        batch = torch.full((len(candidates), width), pad_id, dtype=torch.long)
        for i, cand in enumerate(candidates):
            seq = context + cand[:-1]
            batch[i, : len(seq)] = torch.tensor(seq)
        logits = model(input_ids=batch.to(device), use_cache=False, **keep).logits
        logprobs = logits[:, -longest:].float().log_softmax(-1).cpu()  # from the context's last position on
    else:
        # the context's cache, then every candidate's tokens but its last as a batch: the logit before token t
        # predicts it, the first from the context's last position
        kw = cache_kwargs(base_transformers_model(model), cache)
        first = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1, **kw).logits
        logprobs = first.float().log_softmax(-1).cpu().expand(len(candidates), -1, -1)
        if longest > 1:
            cache.batch_repeat_interleave(len(candidates))
            batch = torch.full((len(candidates), longest - 1), pad_id, dtype=torch.long)
            for i, cand in enumerate(candidates):
                batch[i, : len(cand) - 1] = torch.tensor(cand[:-1])
            rest = model(input_ids=batch.to(device), use_cache=True, **kw).logits.float().log_softmax(-1).cpu()
            logprobs = torch.cat([logprobs, rest], dim=1)
    scores = torch.zeros(len(candidates), dtype=torch.float64)  # logprobs[i, t] predicts candidate i's token t
    for i, cand in enumerate(candidates):
        scores[i] = logprobs[i, torch.arange(len(cand)), torch.tensor(cand)].double().sum()
    return scores


def passkey(
    model, tokenizer, *, lengths: list[int], trials: int, distractors: int, window: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Passkey retrieval accuracy per context length: the true 5-digit key must have the highest log-likelihood
    among ``distractors`` other random keys (chance = 1 / (distractors + 1)). Same prompts for every call with
    the same seed, so rows (base, hybrid, swa_only) are compared on identical inputs."""
    if trials < 1 or distractors < 1:
        raise ValueError(f"passkey needs trials >= 1 and distractors >= 1, got {trials} and {distractors}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        correct, beyond, distance = 0, 0, 0.0
        for _ in range(trials):
            keys = rng.sample(range(10000, 100000), distractors + 1)  # keys[0] is the true one
            context, dist = passkey_prompt(tokenizer, length, str(keys[0]), rng.random())
            candidates = [_encode(tokenizer, f" {key}.") for key in keys]
            scores = continuation_logprobs(model, context, candidates, pad)
            correct += int(scores.argmax()) == 0 and bool((scores[1:] < scores[0]).all())
            beyond += dist >= window
            distance += dist
        out[str(length)] = {
            "accuracy": correct / trials,
            "share_key_beyond_window": beyond / trials,
            "mean_key_distance": distance / trials,
        }
    return out


def position_buckets(length: int, window: int) -> list[tuple[int, int]]:
    """[0, w), [w, 2w), [2w, 4w), [4w, 8w), ... cut at ``length`` (query positions)."""
    edges = [0, window]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    edges = [min(e, length) for e in edges]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


@torch.no_grad()
def position_perplexity(model, sequences: torch.Tensor, window: int, batch_size: int = 1) -> dict[str, Any]:
    """Next-token NLL of ``sequences`` [N, T] grouped by the predicting query position n (target token n + 1)."""
    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise ValueError(f"position_perplexity needs [N, T >= 2] token ids, got shape {tuple(sequences.shape)}")
    device = next(model.parameters()).device
    T = sequences.shape[1]
    nll_sum = torch.zeros(T - 1, dtype=torch.float64)
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [B, T-1]
        nll_sum += nll.double().sum(0).cpu()
    n = len(sequences)
    buckets = []
    for lo, hi in position_buckets(T - 1, window):
        tokens = n * (hi - lo)
        mean = float(nll_sum[lo:hi].sum() / tokens)
        buckets.append({"start": lo, "end": hi, "tokens": tokens, "nll": mean, "ppl": _exp(mean)})
    total = float(nll_sum.sum() / (n * (T - 1)))
    return {"nll": total, "ppl": _exp(total), "buckets": buckets}


def _exp(nll: float) -> float:
    return math.exp(nll) if nll < 700 else float("inf")  # math.exp overflows past ~709


def text_chunks(tokenizer, path: Path, seq_len: int, num_sequences: int) -> torch.Tensor:
    """The first ``num_sequences`` consecutive ``seq_len``-token chunks of a raw text file: [N, seq_len]."""
    if not path.is_file():
        raise MissingInputError(f"{path} is missing: set diagnostics.ppl_file (relative to the data directory)")
    text = path.read_text(encoding="utf-8")
    need = seq_len * num_sequences
    ids: list[int] = []
    step = max(4096, need * 8)  # tokenise a prefix first: the whole file is ~1.3 MB
    for end in range(step, len(text) + step, step):
        ids = _encode(tokenizer, text[:end])
        if len(ids) > need:
            break
    if len(ids) < need:
        raise ValueError(f"{path} holds {len(ids)} tokens, fewer than {num_sequences} x {seq_len}")
    return torch.tensor(ids[:need], dtype=torch.long).view(num_sequences, seq_len)


# ----------------------------------------------------------------------------------------------------------------
# ablation deltas and the verdict


def ablation_deltas(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """hybrid - swa_only and hybrid - la_only per task (and avg) from the evaluate table; absent rows left out."""
    out = {}
    if "hybrid" not in results:
        return out
    for other in ("swa_only", "la_only"):
        if other in results:
            keys = [k for k in results["hybrid"] if k != "rec" and k in results[other]]
            out[f"hybrid_minus_{other}"] = {k: results["hybrid"][k] - results[other][k] for k in keys}
    return out


def results_from_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The evaluate table ``{row: {task|avg|rec: score}}`` from the flat ``eval/<row>/<key>`` stage metrics."""
    table: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and isinstance(value, (int, float)):
            table.setdefault(parts[1], {})[parts[2]] = float(value)
    return table


VERDICT_RULE = (
    "unused if the mean LA output share at positions >= window is below share_threshold; otherwise used if "
    "switching LA off costs something measurable: hybrid - swa_only >= min_score_delta on the eval average, or "
    "NLL(swa_only) - NLL(hybrid) >= min_nll_gain nats on positions >= window; present_not_needed if neither "
    "does; present if no such comparison was run; undetermined without positions >= window."
)


def verdict(
    *,
    output_share_ge: float | None,
    score_delta: float | None,
    nll_gain: float | None,
    reach_share: float | None,
    window: int,
    share_threshold: float,
    min_score_delta: float,
    min_nll_gain: float,
) -> dict[str, Any]:
    """Answers "is the linear branch used?" with a label and one line of text (rule: :data:`VERDICT_RULE`)."""
    inputs = {
        "la_output_share_ge_window": output_share_ge,
        "hybrid_minus_swa_only_avg": score_delta,
        "nll_gain_ge_window": nll_gain,
        "eval_reach_share": reach_share,
    }
    facts = []
    if output_share_ge is not None:
        facts.append(f"LA output share {output_share_ge:.3f} at positions >= {window}")
    if score_delta is not None:
        facts.append(f"hybrid - swa_only {100 * score_delta:+.2f} pts avg")
    if nll_gain is not None:
        facts.append(f"NLL(swa_only) - NLL(hybrid) {nll_gain:+.3f} nats at >= {window}")
    if reach_share is not None:
        facts.append(f"eval tasks score {100 * reach_share:.1f}% of tokens at >= {window}")
    effects = [e for e in ((score_delta, min_score_delta), (nll_gain, min_nll_gain)) if e[0] is not None]
    if output_share_ge is None:
        label = "undetermined"
    elif output_share_ge < share_threshold:
        label = "unused"
    elif any(value >= threshold for value, threshold in effects):
        label = "used"
    elif effects:
        label = "present_not_needed"
    else:
        label = "present"
    answer = {
        "used": "yes",
        "unused": "no",
        "present_not_needed": "no (it contributes, but switching it off costs nothing measurable)",
        "present": "it contributes; no ablation was measured",
        "undetermined": "undetermined (no positions >= window in the usage sample; raise diagnostics.seq_len)",
    }[label]
    text = f"Is the linear branch used? {answer}" + (f" — {'; '.join(facts)}" if facts else "")
    return {"label": label, "text": text, "rule": VERDICT_RULE, "inputs": inputs}


# ----------------------------------------------------------------------------------------------------------------
# schema of diagnostics.json


class _MapOf:
    """Schema node: a dict with arbitrary string keys whose values match ``value``."""

    def __init__(self, value):
        self.value = value


class _ListOf:
    def __init__(self, value):
        self.value = value


class _Optional:
    def __init__(self, value):
        self.value = value


NUMBER = (int, float)
_SHARE_TABLE = {side: _ListOf(_ListOf(_Optional(NUMBER))) for side in SIDES}
_SIDE_VALUES = {side: _Optional(NUMBER) for side in SIDES}
SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "window": int,
    "attention_kind": str,
    "usage": _Optional(
        {
            "source": str,
            "mode": str,
            "num_sequences": int,
            "seq_len": int,
            "tokens": {"lt_window": int, "ge_window": int},
            "layers": _ListOf(int),
            "heads": int,
            "la_mass_share": _SHARE_TABLE,
            "la_output_share": _SHARE_TABLE,
            "overall": {"la_mass_share": _SIDE_VALUES, "la_output_share": _SIDE_VALUES},
            "by_position": {
                "bin_size": int,
                "starts": _ListOf(int),
                "la_mass_share": _ListOf(NUMBER),
                "la_output_share": _ListOf(NUMBER),
            },
        }
    ),
    "reach": _Optional(
        _MapOf(
            {
                "requests": int,
                "items": int,
                "scored_tokens": int,
                "share_scored_ge_window": NUMBER,
                "share_items_never_reach": NUMBER,
                "length": {"min": int, "p50": int, "p90": int, "max": int, "mean": NUMBER},
                "histogram": {"edges": _ListOf(int), "counts": _ListOf(int)},
            }
        )
    ),
    "passkey": _Optional(
        {
            "lengths": _ListOf(int),
            "trials": int,
            "distractors": int,
            "chance": NUMBER,
            "rows": _MapOf(
                _MapOf({"accuracy": NUMBER, "share_key_beyond_window": NUMBER, "mean_key_distance": NUMBER})
            ),
        }
    ),
    "perplexity": _Optional(
        {
            "file": str,
            "seq_len": int,
            "num_sequences": int,
            "rows": _MapOf(
                {
                    "nll": NUMBER,
                    "ppl": NUMBER,
                    "buckets": _ListOf({"start": int, "end": int, "tokens": int, "nll": NUMBER, "ppl": NUMBER}),
                }
            ),
        }
    ),
    "ablation": _MapOf(_MapOf(NUMBER)),
    "verdict": {"label": str, "text": str, "rule": str, "inputs": _MapOf(_Optional(NUMBER))},
    "plots": _MapOf(str),
}
SHARE_KEYS = ("share_scored_ge_window", "share_items_never_reach", "accuracy", "share_key_beyond_window")


def _check(value: Any, node: Any, path: str) -> None:
    if isinstance(node, _Optional):
        if value is not None:
            _check(value, node.value, path)
        return
    if isinstance(node, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected an object, got {type(value).__name__}")
        missing, extra = sorted(set(node) - set(value)), sorted(set(value) - set(node))
        if missing or extra:
            raise ValueError(f"{path}: missing keys {missing}, unexpected keys {extra}")
        for key, sub in node.items():
            _check(value[key], sub, f"{path}.{key}")
        return
    if isinstance(node, _MapOf):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{path}: expected an object with string keys")
        for key, sub in value.items():
            _check(sub, node.value, f"{path}.{key}")
        return
    if isinstance(node, _ListOf):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {type(value).__name__}")
        for i, sub in enumerate(value):
            _check(sub, node.value, f"{path}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, node):
        raise ValueError(f"{path}: expected {node}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value) and not path.endswith("ppl"):
        raise ValueError(f"{path}: {value} is not finite")
    if path.rsplit(".", 1)[-1] in SHARE_KEYS and not 0.0 <= value <= 1.0:
        raise ValueError(f"{path}: a share must lie in [0, 1], got {value}")


def validate_schema(diagnostics: dict[str, Any]) -> None:
    """Raises ``ValueError`` naming the first place where ``diagnostics`` departs from :data:`SCHEMA`."""
    _check(diagnostics, SCHEMA, "diagnostics")
    if diagnostics["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"diagnostics.schema_version={diagnostics['schema_version']}, expected {SCHEMA_VERSION}")
    usage_ = diagnostics["usage"]
    if usage_ is not None:
        for metric in ("la_mass_share", "la_output_share"):
            for side in SIDES:
                table = usage_[metric][side]
                if len(table) != len(usage_["layers"]) or any(len(row) != usage_["heads"] for row in table):
                    raise ValueError(
                        f"diagnostics.usage.{metric}.{side}: expected {len(usage_['layers'])} x "
                        f"{usage_['heads']} values"
                    )
                if any(v is not None and not 0.0 <= v <= 1.0 + 1e-9 for row in table for v in row):
                    raise ValueError(f"diagnostics.usage.{metric}.{side}: shares must lie in [0, 1]")


# ----------------------------------------------------------------------------------------------------------------
# the stage


@contextmanager
def _row(model, row: str) -> Iterator[None]:
    """The model as a row of the ablation table: ``base`` (softmax, no LoRA) or a component mode."""
    from linearize.evaluate import base_model

    with base_model(model) if row == BASE else attention_mode(model, row):
        yield


def usage_sequences(cfg: DictConfig, tokenizer, lm=None) -> list[torch.Tensor]:
    """The usage sample: held-out training chunks (``source=train``) or an eval task's requests (first request
    of each document, truncated to ``seq_len``)."""
    d = cfg.diagnostics
    if d.source == "train":
        from linearize.data import load_packed

        chunks = load_packed(cfg.data, tokenizer, d.seq_len).val
        if len(chunks) < d.num_sequences:
            log.warning(
                "usage: only %d held-out chunks of %d tokens (asked for %d)", len(chunks), d.seq_len, d.num_sequences
            )
        return list(chunks[: d.num_sequences])
    from linearize import tasks as task_registry

    data_dir = task_registry.resolve_data_dir(cfg.eval.data_dir)
    requests = task_requests(lm, d.source, data_dir, dict(cfg.eval.splits), d.num_sequences, cfg.seed)
    seen, out = set(), []
    for r in requests:
        if (r.task, r.doc_id) not in seen and len(out) < d.num_sequences:
            seen.add((r.task, r.doc_id))
            out.append(torch.tensor(r.tokens[: d.seq_len], dtype=torch.long))
    return out


def _flat(diag: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(headline scalars, per-layer scalars) for the tracker and the stage marker."""
    scalars: dict[str, float] = {}
    per_layer: dict[str, float] = {}
    u = diag["usage"]
    if u is not None:
        for metric in ("la_mass_share", "la_output_share"):
            values = u["overall"][metric]
            if values["ge_window"] is not None:
                scalars[f"usage/{metric}"] = values["ge_window"]  # the headline: where LA can act
            for side in SIDES:
                if values[side] is not None:
                    scalars[f"usage/{metric}_{side}"] = values[side]
            for layer, row in zip(u["layers"], u[metric]["ge_window"]):
                if row and row[0] is not None:
                    per_layer[f"usage/{metric}/layer_{layer}"] = sum(row) / len(row)
    for task, r in (diag["reach"] or {}).items():
        scalars[f"reach/{task}/share_scored_ge_window"] = r["share_scored_ge_window"]
        scalars[f"reach/{task}/share_items_never_reach"] = r["share_items_never_reach"]
    if diag["passkey"] is not None:
        for row, by_len in diag["passkey"]["rows"].items():
            for length, r in by_len.items():
                scalars[f"passkey/{row}/len_{length}"] = r["accuracy"]
    if diag["perplexity"] is not None:
        for row, r in diag["perplexity"]["rows"].items():
            for b in r["buckets"]:
                scalars[f"ppl/{row}/{b['start']}_{b['end']}"] = b["ppl"]
    for name, deltas in diag["ablation"].items():
        for task, value in deltas.items():
            scalars[f"ablation/{name}/{task}"] = value
    return scalars, per_layer


def _log_tables(diag: dict[str, Any], tracker) -> None:
    u = diag["usage"]
    if u is not None:
        rows = []
        for li, layer in enumerate(u["layers"]):
            for h in range(u["heads"]):
                rows.append([layer, h] + [u[m][s][li][h] for m in ("la_mass_share", "la_output_share") for s in SIDES])
        columns = ["layer", "head"] + [f"{m}_{s}" for m in ("la_mass_share", "la_output_share") for s in SIDES]
        tracker.table("usage/table", columns, rows)
    if diag["reach"]:
        tracker.table(
            "reach/table",
            ["task", "requests", "items", "share_scored_ge_window", "share_items_never_reach", "p50", "p90", "max"],
            [[t, r["requests"], r["items"], r["share_scored_ge_window"], r["share_items_never_reach"],
              r["length"]["p50"], r["length"]["p90"], r["length"]["max"]] for t, r in diag["reach"].items()],
        )  # fmt: skip
    if diag["passkey"] is not None:
        tracker.table(
            "passkey/table",
            ["row", "length", "accuracy", "share_key_beyond_window"],
            [[row, int(n), r["accuracy"], r["share_key_beyond_window"]]
             for row, by_len in diag["passkey"]["rows"].items() for n, r in by_len.items()],
        )  # fmt: skip
    if diag["perplexity"] is not None:
        tracker.table(
            "ppl/table",
            ["row", "start", "end", "tokens", "nll", "ppl"],
            [[row, b["start"], b["end"], b["tokens"], b["nll"], b["ppl"]]
             for row, r in diag["perplexity"]["rows"].items() for b in r["buckets"]],
        )  # fmt: skip
    if diag["ablation"]:
        tracker.table(
            "ablation/table",
            ["delta", "task", "value"],
            [[name, task, value] for name, deltas in diag["ablation"].items() for task, value in deltas.items()],
        )


def run(
    model,
    tokenizer,
    cfg: DictConfig,
    *,
    results: dict[str, dict[str, float]] | None = None,
    out_dir: Path | None = None,
    tracker=None,
    progress: Callable[[str], None] = log.info,
) -> tuple[dict[str, Any], dict[str, float]]:
    """All diagnostics of ``cfg.diagnostics`` for a converted ``model``; ``results`` is the evaluate table.

    Writes ``diagnostics.json`` and the plots into ``out_dir`` (if given), logs scalars, tables, images and the
    summary key ``usage/verdict`` to ``tracker``. Returns ``(diagnostics, metrics)`` (metrics: flat scalars).
    """
    from lm_eval.models.huggingface import HFLM

    from linearize import tasks as task_registry

    d = cfg.diagnostics
    layers = hybrid_layers(model)
    if not layers:
        raise ValueError("diagnostics need a converted model: attention.kind=softmax has no linear branch")
    window = int(cfg.attention.window)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=d.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    diag: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "window": window, "attention_kind": cfg.attention.kind}
    model.eval()

    usage_out = None
    if d.num_sequences > 0:
        progress(f"diagnose: usage on {d.num_sequences} sequences from {d.source}")
        sequences = usage_sequences(cfg, tokenizer, lm)
        with attention_mode(model, d.mode):
            usage_out = usage(model, sequences, window=window, batch_size=d.batch_size, chunk_size=d.chunk_size,
                              bin_size=d.bin_size or max(1, window // 4), pad_id=pad)  # fmt: skip
        usage_out = {"source": d.source, **usage_out}
    diag["usage"] = usage_out

    reach_out = None
    if d.reach_tasks:
        data_dir = task_registry.resolve_data_dir(cfg.eval.data_dir)
        reach_out = {}
        for task in d.reach_tasks:
            progress(f"diagnose: reach of {task}")
            requests = task_requests(lm, task, data_dir, dict(cfg.eval.splits), d.reach_limit, cfg.seed)
            reach_out[task] = reach(requests, window, bins=d.reach_bins)
    diag["reach"] = reach_out

    passkey_out = None
    if d.passkey_lengths:
        rows = {}
        for row in d.probe_rows:
            progress(f"diagnose: passkey, {row}")
            with _row(model, row):
                rows[row] = passkey(model, tokenizer, lengths=list(d.passkey_lengths), trials=d.passkey_trials,
                                    distractors=d.passkey_distractors, window=window, seed=cfg.seed)  # fmt: skip
        passkey_out = {
            "lengths": list(d.passkey_lengths),
            "trials": d.passkey_trials,
            "distractors": d.passkey_distractors,
            "chance": 1.0 / (d.passkey_distractors + 1),
            "rows": rows,
        }
    diag["passkey"] = passkey_out

    ppl_out = None
    if d.ppl_num_sequences > 0:
        data_dir = task_registry.resolve_data_dir(cfg.eval.data_dir)
        if data_dir is None:
            raise MissingInputError(
                "perplexity by position needs a data directory (eval.data_dir) holding "
                f"{d.ppl_file}; or set diagnostics.ppl_num_sequences=0"
            )
        chunks = text_chunks(tokenizer, Path(data_dir) / d.ppl_file, d.ppl_seq_len, d.ppl_num_sequences)
        rows = {}
        for row in d.probe_rows:
            progress(f"diagnose: perplexity by position, {row}")
            with _row(model, row):
                rows[row] = position_perplexity(model, chunks, window, batch_size=d.batch_size)
        ppl_out = {"file": d.ppl_file, "seq_len": d.ppl_seq_len, "num_sequences": d.ppl_num_sequences, "rows": rows}
    diag["perplexity"] = ppl_out

    diag["ablation"] = ablation_deltas(results or {})
    nll_gain = None
    if ppl_out is not None and {"hybrid", "swa_only"} <= set(ppl_out["rows"]):

        def beyond(row: str) -> float | None:
            buckets = [b for b in ppl_out["rows"][row]["buckets"] if b["start"] >= window]
            tokens = sum(b["tokens"] for b in buckets)
            return sum(b["nll"] * b["tokens"] for b in buckets) / tokens if tokens else None

        hyb, swa = beyond("hybrid"), beyond("swa_only")
        nll_gain = None if hyb is None else swa - hyb
    reach_share = None
    if reach_out:
        scored = sum(r["scored_tokens"] for r in reach_out.values())
        reach_share = sum(r["share_scored_ge_window"] * r["scored_tokens"] for r in reach_out.values()) / scored
    diag["verdict"] = verdict(
        output_share_ge=None if usage_out is None else usage_out["overall"]["la_output_share"]["ge_window"],
        score_delta=diag["ablation"].get("hybrid_minus_swa_only", {}).get("avg"),
        nll_gain=nll_gain,
        reach_share=reach_share,
        window=window,
        share_threshold=d.share_threshold,
        min_score_delta=d.min_score_delta,
        min_nll_gain=d.min_nll_gain,
    )
    diag["plots"] = {}
    if out_dir is not None and d.plots:
        from linearize import plots

        diag["plots"] = plots.write_all(diag, results or {}, Path(out_dir))
    validate_schema(diag)
    if out_dir is not None:
        path = Path(out_dir) / FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(diag, indent=2))
        tmp.replace(path)

    scalars, per_layer = _flat(diag)
    if tracker is not None:
        tracker.log({**scalars, **per_layer})
        _log_tables(diag, tracker)
        for name, file in diag["plots"].items():
            tracker.image(f"plots/{name}", Path(out_dir) / file)
        tracker.summary(
            {**scalars, "usage/verdict": diag["verdict"]["text"], "usage/verdict_label": diag["verdict"]["label"]}
        )
    progress(diag["verdict"]["text"])
    return diag, {**scalars, **per_layer, "diagnose/verdict": diag["verdict"]["label"]}


__all__ = [
    "FILE",
    "SCHEMA",
    "SCHEMA_VERSION",
    "VERDICT_RULE",
    "ablation_deltas",
    "attention_parts",
    "passkey",
    "position_buckets",
    "position_perplexity",
    "reach",
    "requests_of",
    "results_from_metrics",
    "run",
    "shares",
    "task_requests",
    "usage",
    "validate_schema",
    "verdict",
]
