"""Scheduled Sliding-window Dropout (SSD): during training, drop the sliding-window softmax branch of a hybrid
layer with probability p(t), so that the layer computes linear attention over the whole prefix and the linear
branch has to carry the output on its own.

    python -m linearize.train ssd=default                       # p = 0.9 -> 0.75 -> 0.5 during LoRA
    python -m linearize.train method=ssd                        # the preset: SSD in transfer and LoRA

Schedule (``cfg.ssd``): phase i uses ``probs[i]`` (and ``windows[i]`` when a window schedule is given); phase
i >= 1 starts at optimizer step ``round(boundaries[i-1] x total)`` of the stage (steps counted from 0), default
boundaries = equal parts. Granularity: ``step`` (one coin for every layer), ``layer`` (one coin per layer) or
``sequence`` (one coin per sequence of each micro-batch, honoured by ``HybridAttention.drop_mask``). Coins come
from a ``torch.Generator`` seeded by ``ssd.seed`` and the stage, so a run is reproducible.

The stage wires it through ``training.train(before_step=...)``; :func:`schedule` is a context manager that
restores every layer (drop flags, masks, windows) when the stage ends, whatever happens, so nothing leaks into
validation or evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig

from linearize.attention import HybridAttention

Metrics = dict[str, float]
_STAGE_SEED = {"transfer": 0, "finetune": 1}


class Schedule:
    """p(t) and the optional window w(t) of one stage, as piecewise-constant phases over its optimizer steps."""

    def __init__(self, probs: list[float], boundaries: list[float] = (), windows: list[int] = ()):
        probs, boundaries, windows = [float(p) for p in probs], [float(b) for b in boundaries], list(windows)
        if not probs or any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"ssd.probs must be a non-empty list of values in [0, 1], got {probs}")
        if not boundaries:
            boundaries = [i / len(probs) for i in range(1, len(probs))]
        if len(boundaries) != len(probs) - 1:
            raise ValueError(f"ssd.boundaries needs {len(probs) - 1} values for {len(probs)} phases, got {boundaries}")
        if boundaries != sorted(boundaries) or any(not 0.0 < b < 1.0 for b in boundaries):
            raise ValueError(f"ssd.boundaries must be increasing fractions in (0, 1), got {boundaries}")
        if windows and (len(windows) != len(probs) or any(w < 1 for w in windows)):
            raise ValueError(f"ssd.windows needs one window >= 1 per phase ({len(probs)}), got {windows}")
        self.probs, self.boundaries, self.windows = probs, boundaries, windows

    def starts(self, total: int) -> list[int]:
        """First step of each phase for a stage of ``total`` optimizer steps."""
        return [0] + [round(b * total) for b in self.boundaries]

    def phase(self, step: int, total: int) -> int:
        return sum(step >= s for s in self.starts(total)[1:])

    def p(self, step: int, total: int) -> float:
        return self.probs[self.phase(step, total)]

    def window(self, step: int, total: int) -> int | None:
        return self.windows[self.phase(step, total)] if self.windows else None


class SSD:
    """Draws the drop decisions before each optimizer step and applies them to the hybrid layers.

    Args:
        cfg: ``cfg.ssd``.
        layers: the model's :class:`HybridAttention` modules.
        stage: ``transfer`` or ``finetune`` (seeds the generator, so the two stages draw different coins).
        micro_batches: micro-batches per optimizer step (``grad_accum``); with ``sequence`` granularity the coins
            of a whole step are drawn up front, ``[micro_batches, batch_size]``.
        batch_size: sequences per micro-batch.
    """

    def __init__(
        self, cfg: DictConfig, layers: list[HybridAttention], stage: str, *, micro_batches: int = 1, batch_size: int = 1
    ):
        if cfg.granularity not in ("step", "layer", "sequence"):
            raise ValueError(f"ssd.granularity={cfg.granularity!r} is not one of step, layer, sequence")
        if not layers:
            raise ValueError("SSD needs a converted model: there are no hybrid layers to drop a window from")
        kinds = sorted({layer.kind for layer in layers} - {"hybrid", "hybrid_overlap"})
        if kinds:
            raise ValueError(f"SSD drops the sliding window of a hybrid, but the layers are attention.kind={kinds}")
        self.schedule = Schedule(list(cfg.probs), list(cfg.boundaries), list(cfg.windows))
        self.granularity = cfg.granularity
        self.layers = layers
        self.micro_batches, self.batch_size = micro_batches, batch_size
        self.generator = torch.Generator().manual_seed(int(cfg.seed) * 1009 + _STAGE_SEED[stage])
        self._windows = [layer.window for layer in layers]
        self._masks: list[torch.Tensor] = []

    def before_step(self, step: int, total: int) -> Metrics:
        """Sets the drop state for optimizer step ``step`` (0-based) of ``total``; returns ``ssd/p``,
        ``ssd/drop_rate`` (the share of coins that came up "drop" this step) and ``ssd/window`` if scheduled."""
        p = self.schedule.p(step, total)
        window = self.schedule.window(step, total)
        if window is not None:
            for layer in self.layers:
                layer.window = window
        if self.granularity == "sequence":
            coins = torch.rand(self.micro_batches, self.batch_size, generator=self.generator) < p
            self._masks = list(coins)
            for layer in self.layers:
                layer.drop_swa = False
        else:
            n = 1 if self.granularity == "step" else len(self.layers)
            coins = torch.rand(n, generator=self.generator) < p
            for layer, drop in zip(self.layers, coins.expand(len(self.layers))):
                layer.drop_swa, layer.drop_mask = bool(drop), None
        metrics = {"ssd/p": p, "ssd/drop_rate": coins.float().mean().item()}
        if window is not None:
            metrics["ssd/window"] = float(window)
        return metrics

    def next_micro_batch(self, batch_size: int) -> None:
        """Sequence granularity: hands the next micro-batch's [B] coins to every layer (no-op otherwise)."""
        if self.granularity != "sequence":
            return
        if not self._masks:
            raise RuntimeError("SSD: more micro-batches in this step than drawn in before_step")
        mask = self._masks.pop(0)
        if mask.numel() != batch_size:
            raise ValueError(f"SSD drew {mask.numel()} coins per micro-batch, but the batch holds {batch_size}")
        for layer in self.layers:
            layer.drop_mask = mask

    def wrap(self, forward_backward: Callable) -> Callable:
        """``forward_backward(batch, scale)`` that first applies the micro-batch's per-sequence coins."""

        def wrapped(batch: torch.Tensor, loss_scale: float):
            self.next_micro_batch(batch.shape[0])
            return forward_backward(batch, loss_scale)

        return wrapped

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Runs a block (held-out validation) as the plain hybrid, then restores this step's drop state."""
        saved = [(layer.drop_swa, layer.drop_mask, layer.window) for layer in self.layers]
        self.reset()
        try:
            yield
        finally:
            for layer, (drop, mask, window) in zip(self.layers, saved):
                layer.drop_swa, layer.drop_mask, layer.window = drop, mask, window

    def reset(self) -> None:
        """No dropped windows, no masks, the converted windows."""
        for layer, window in zip(self.layers, self._windows):
            layer.drop_swa, layer.drop_mask, layer.window = False, None, window


@contextmanager
def schedule(cfg: DictConfig, layers: list[HybridAttention], stage: str) -> Iterator[SSD | None]:
    """The stage's :class:`SSD`, or None when SSD is off or not configured for ``stage``; always resets the layers.

    ``cfg`` is the full config (uses ``cfg.ssd`` and the stage's ``batch_size`` / ``grad_accum``).
    """
    if not cfg.ssd.enabled or stage not in cfg.ssd.stages:
        yield None
        return
    scfg = cfg[stage]
    ssd = SSD(cfg.ssd, layers, stage, micro_batches=scfg.grad_accum, batch_size=scfg.batch_size)
    try:
        yield ssd
    finally:
        ssd.reset()
