"""The optimisation loop shared by the transfer and finetune stages: gradient accumulation, periodic held-out
evaluation, keep-best, reduce-on-plateau and early stopping, a progress bar and per-step logging."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from linearize.data import PackedData

Metrics = dict[str, float]
LogFn = Callable[[Metrics], None]


@dataclass
class LoopResult:
    steps: int = 0
    tokens: int = 0
    best_val: float = math.inf
    best_step: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0
    history: list[Metrics] = field(default_factory=list)


def total_steps(cfg: DictConfig, data: PackedData) -> int:
    """Optimizer steps of a stage: ``max_steps`` if set, else ``epochs`` passes over the training chunks."""
    per_epoch = len(data.train) // (cfg.batch_size * cfg.grad_accum)
    if per_epoch == 0 and cfg.max_steps < 0:
        raise ValueError(
            f"{len(data.train)} training chunks cannot fill one step of batch_size={cfg.batch_size} x "
            f"grad_accum={cfg.grad_accum}; lower them or add data"
        )
    return cfg.max_steps if cfg.max_steps >= 0 else cfg.epochs * per_epoch


def _micro_batches(data: PackedData, cfg: DictConfig, seed: int) -> Iterable[torch.Tensor]:
    epoch = 0
    while True:
        yielded = False
        for batch in data.batches("train", cfg.batch_size, shuffle=True, seed=seed, epoch=epoch):
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(f"no training batch of size {cfg.batch_size} in {len(data.train)} chunks")
        epoch += 1


def train(
    *,
    params: list[torch.nn.Parameter],
    data: PackedData,
    cfg: DictConfig,
    device: torch.device,
    forward_backward: Callable[[torch.Tensor, float], Metrics],
    validate: Callable[[], float],
    on_improve: Callable[[int, float], None],
    log: LogFn,
    prefix: str,
    seed: int = 0,
    patience: int | None = None,
    plateau: bool = False,
    before_step: Callable[[int, int], Metrics] | None = None,
) -> LoopResult:
    """Runs ``total_steps`` optimizer steps of AdamW over ``params``.

    ``forward_backward(batch, loss_scale)`` must backpropagate ``loss * loss_scale`` and return metrics;
    ``validate()`` returns the held-out loss (lower is better), evaluated every ``cfg.eval_every`` steps and at
    the end; ``on_improve(step, loss)`` saves the best state. ``before_step(step, total)`` (SSD) may change the
    model before each step and returns metrics to log.
    """
    n_steps = total_steps(cfg, data)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = None
    if plateau:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    result = LoopResult()
    start = time.perf_counter()
    batches = iter(_micro_batches(data, cfg, seed))
    stale = 0

    def evaluate(step: int) -> bool:
        nonlocal stale
        val = validate()
        metrics = {f"{prefix}/val_loss": val, f"{prefix}/step": step}
        if val < result.best_val:
            result.best_val, result.best_step, stale = val, step, 0
            on_improve(step, val)
        else:
            stale += 1
        if scheduler is not None:
            scheduler.step(val)
        metrics[f"{prefix}/best_val_loss"] = result.best_val
        log(metrics)
        result.history.append(metrics)
        return patience is not None and stale >= patience

    bar = tqdm(range(1, n_steps + 1), desc=prefix, unit="step", dynamic_ncols=True)
    for step in bar:
        metrics: Metrics = {}
        if before_step is not None:
            metrics.update(before_step(step - 1, n_steps))
        optimizer.zero_grad(set_to_none=True)
        sums: Metrics = {}
        for _ in range(cfg.grad_accum):
            batch = next(batches).to(device)
            for key, value in forward_backward(batch, 1.0 / cfg.grad_accum).items():
                sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
            result.tokens += batch.numel()
        optimizer.step()
        result.steps = step
        metrics.update(sums)
        metrics[f"{prefix}/lr"] = optimizer.param_groups[0]["lr"]
        metrics[f"{prefix}/tokens"] = result.tokens
        metrics[f"{prefix}/step"] = step
        log(metrics)
        bar.set_postfix(loss=f"{sums.get(f'{prefix}/loss', float('nan')):.4g}", refresh=False)
        if step % cfg.eval_every == 0 or step == n_steps:
            if evaluate(step):
                result.stopped_early = True
                break
    bar.close()
    if result.steps == 0:  # a zero-step budget still records the held-out loss of the starting point
        evaluate(0)
    result.wall_s = time.perf_counter() - start
    return result


@torch.no_grad()
def mean_over_val(
    data: PackedData, cfg: DictConfig, device: torch.device, fn: Callable[[torch.Tensor], float]
) -> float:
    """Mean of ``fn(batch)`` over the first ``cfg.val_batches`` validation batches."""
    values = []
    for i, batch in enumerate(data.batches("val", cfg.batch_size)):
        if i >= cfg.val_batches:
            break
        values.append(fn(batch.to(device)))
    if not values:
        raise ValueError(f"no validation batch of size {cfg.batch_size} in {len(data.val)} chunks")
    return sum(values) / len(values)
