"""Stage 1, attention transfer: train the feature maps and gamma so each converted layer reproduces its softmax
layer, teacher-forced.

    python -m linearize.train stages=[transfer]

Every layer sees the *softmax* model's hidden states: in one forward pass each attention call computes the
softmax output (teacher, which the model continues with) and the converted output from the same q, k, v
(student); the layer's loss is backpropagated on the spot into that layer's feature maps and gamma, so no
graph spans layers and memory stays that of one layer. Objective: ``mse_weight`` x MSE of head outputs
(LoLCATs ``output_mse``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from linearize.attention import HybridAttention, hybrid_layers, load_hybrid, save_hybrid
from linearize.data import PackedData
from linearize.training import LogFn, mean_over_val, train

log = logging.getLogger(__name__)

CHECKPOINT = "feature_maps.safetensors"


def softmax_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention, [B, T, H, D] q and [B, T, Hkv, D] k/v -> [B, T, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)


class TeacherForcing:
    """The transfer hook installed on every :class:`HybridAttention` during the stage."""

    def __init__(self, cfg: DictConfig):
        self.mse_weight = cfg.mse_weight
        self.backward = False
        self.loss_scale = 1.0
        self.losses: dict[int, torch.Tensor] = {}

    def __call__(self, hyb: HybridAttention, q, k, v, scale: float) -> torch.Tensor:
        with torch.no_grad():
            teacher = softmax_heads(q, k, v, scale)
        with torch.enable_grad():
            softmax, linear = hyb.spans()
            student = hyb.attend(q.detach(), k.detach(), v.detach(), scale, softmax, linear)
            mse = F.mse_loss(student.float(), teacher.float())
            if self.backward:
                (self.mse_weight * self.loss_scale * mse).backward()
        self.losses[hyb.layer_idx] = mse.detach()
        return teacher

    def collect(self) -> torch.Tensor:
        """Per-layer MSE of the last forward, [L], and clears it."""
        values = torch.stack([self.losses[i] for i in sorted(self.losses)])
        self.losses.clear()
        return values


def run(model, cfg: DictConfig, data: PackedData, *, out_dir: Path | None = None, log_fn: LogFn = lambda m: None):
    """Trains phi and gamma of every converted layer; everything else stays frozen.

    Args:
        model: a converted model (``linearize.attention.convert``).
        cfg: the full config (uses ``cfg.transfer``, ``cfg.seed``).
        data: packed token chunks.
        out_dir: where the best checkpoint (``feature_maps.safetensors``) goes; loaded back at the end.

    Returns:
        metrics: ``transfer/best_val_loss``, ``transfer/steps``, per-layer validation MSE, timings.
    """
    tcfg = cfg.transfer
    layers = hybrid_layers(model)
    if not layers:
        raise ValueError("transfer needs a converted model: attention.kind=softmax has no feature maps to train")
    device = next(model.parameters()).device
    model.requires_grad_(False)
    params = [p for layer in layers for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    hook = TeacherForcing(tcfg)
    for layer in layers:
        layer.transfer_hook = hook
    best_state: dict[str, torch.Tensor] = {}
    last_val: list[float] = []  # per-layer held-out MSE of the latest evaluation
    best_val_layers: list[float] = []

    def forward_backward(batch: torch.Tensor, loss_scale: float):
        hook.backward, hook.loss_scale = True, loss_scale
        with torch.no_grad():
            model(input_ids=batch, use_cache=False)
        per_layer = hook.collect()
        return {"transfer/loss": tcfg.mse_weight * per_layer.mean().item()}

    def val_batch(batch: torch.Tensor) -> torch.Tensor:
        hook.backward = False
        model(input_ids=batch, use_cache=False)
        return hook.collect()

    def validate() -> float:
        per_layer = mean_over_val(data, tcfg, device, val_batch)
        last_val[:] = per_layer.tolist()
        return tcfg.mse_weight * per_layer.mean().item()

    def on_improve(step: int, loss: float) -> None:
        best_val_layers[:] = last_val
        best_state.clear()
        best_state.update({n: p.detach().clone() for n, p in model.named_parameters() if ".hybrid." in n})
        if out_dir is not None:
            save_hybrid(model, Path(out_dir) / CHECKPOINT)

    model.train(False)
    try:
        result = train(
            params=params,
            data=data,
            cfg=tcfg,
            device=device,
            forward_backward=forward_backward,
            validate=validate,
            on_improve=on_improve,
            log=log_fn,
            prefix="transfer",
            seed=cfg.seed,
            plateau=True,
        )
    finally:
        for layer in layers:
            layer.transfer_hook = None
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():  # keep the best parameters, not the last
        for name, p in model.named_parameters():
            if name in best_state:
                p.copy_(best_state[name])
    best_layers = {f"transfer/val_mse/layer_{i:02d}": v for i, v in enumerate(best_val_layers)}
    log.info("transfer: best held-out loss %.4g at step %d of %d", result.best_val, result.best_step, result.steps)
    return {
        "transfer/best_val_loss": result.best_val,
        "transfer/best_step": result.best_step,
        "transfer/steps": result.steps,
        "transfer/tokens": result.tokens,
        "transfer/wall_s": result.wall_s,
        "transfer/tokens_per_s": result.tokens / max(result.wall_s, 1e-9),
        **best_layers,
    }


def load(model, out_dir: Path) -> None:
    """Restores a finished transfer stage from its checkpoint (resume)."""
    load_hybrid(model, Path(out_dir) / CHECKPOINT)
