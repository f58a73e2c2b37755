"""Stage 1, attention transfer: train the feature maps and gamma so each converted layer reproduces its softmax
layer, teacher-forced.

    python -m linearize.train stages=[transfer]

Every layer sees the *softmax* model's hidden states: in one forward pass each attention call computes the
softmax output (teacher, which the model continues with) and the converted output from the same q, k, v
(student); the layer's loss is backpropagated on the spot into that layer's feature maps and gamma, so no
graph spans layers and memory stays that of one layer. Objective, combinable:

- ``mse_weight`` x MSE of head outputs (LoLCATs ``output_mse``); the student output follows ``attention.kind``
  (the hybrid output for a hybrid, the linear-only output for ``linear``) and the SSD state;
- ``xent_weight`` x KL(softmax row || linear-attention row) over the full causal prefix (Hedgehog / HedgeCATs
  ``weight_xent``): the cross-entropy minus the softmax rows' entropy, so a perfect match scores 0. Only phi
  gets its gradient (q, k are detached; gamma plays no part), and it is computed and backpropagated a chunk of
  query rows at a time (:func:`attention_weight_kl`), so memory is B x H x chunk x T for one layer.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from linearize import ssd as ssd_lib
from linearize.attention import HybridAttention, hybrid_layers, load_hybrid, save_hybrid, softmax_heads
from linearize.data import PackedData
from linearize.kernels.hybrid_attention.naive import repeat_kv
from linearize.models import last_logits_only
from linearize.training import LogFn, mean_over_val, train

log = logging.getLogger(__name__)

CHECKPOINT = "feature_maps.safetensors"


def attention_weight_kl(
    q: torch.Tensor,
    k: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    scale: float,
    *,
    chunk: int = 256,
    backward_scale: float | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Mean over rows (b, h, n) of KL(P_n || A_n), P_n = causal softmax(q_n . k_j * scale), A_nj = phi(q_n) .
    phi(k_j) / sum_{j' <= n} phi(q_n) . phi(k_j'), j <= n.

    Args:
        q: [B, T, H, D] and k: [B, T, Hkv, D] post-RoPE queries / keys (the targets; no gradient is taken).
        q_feat, k_feat: [B, T, H, F] phi(q), phi(k) (phi(k) after the GQA repeat).
        chunk: query rows per chunk; no tensor larger than [B, H, chunk, T] is built.
        backward_scale: if given, backpropagates ``backward_scale x loss`` into q_feat / k_feat one chunk at a time
            (each chunk's graph is freed before the next) and returns the detached loss.

    Returns:
        the scalar loss, >= 0, 0 when every linear-attention row equals its softmax row.
    """
    B, T, H, _ = q.shape
    qs = q.detach().float().transpose(1, 2)  # [B, H, T, D]
    ks = repeat_kv(k.detach(), H).float().transpose(1, 2)
    qf, kf = q_feat, k_feat
    if backward_scale is not None:  # leaves that collect the chunks' gradients; one backward into phi at the end
        qf, kf = q_feat.detach().requires_grad_(True), k_feat.detach().requires_grad_(True)
    qf_t, kf_t = qf.float().transpose(1, 2), kf.float().transpose(1, 2)  # [B, H, T, F]
    n_rows = B * H * T
    total = q.new_zeros((), dtype=torch.float32)
    for n0 in range(0, T, chunk):
        n1 = min(n0 + chunk, T)
        rows = torch.arange(n0, n1, device=q.device)[:, None]
        causal = torch.arange(n1, device=q.device)[None, :] <= rows  # [C, n1]: keys past n1 are never seen
        with torch.no_grad():
            s = torch.einsum("bhnd,bhjd->bhnj", qs[:, :, n0:n1], ks[:, :, :n1]) * scale
            log_p = s.masked_fill(~causal, float("-inf")).log_softmax(-1)
            p = log_p.exp()
            entropy_term = torch.where(causal, p * log_p, torch.zeros_like(p)).sum()
        a = torch.einsum("bhnf,bhjf->bhnj", qf_t[:, :, n0:n1], kf_t[:, :, :n1]) * causal
        log_a = torch.log(a + eps) - torch.log(a.sum(-1, keepdim=True) + eps)
        cross = -(p * torch.where(causal, log_a, torch.zeros_like(log_a))).sum()
        part = (entropy_term + cross) / n_rows
        if backward_scale is not None:
            (backward_scale * part).backward()
            part = part.detach()
        total = total + part
    if backward_scale is not None:
        grads = [
            (t, leaf.grad) for t, leaf in ((q_feat, qf), (k_feat, kf)) if t.requires_grad and leaf.grad is not None
        ]
        if grads:
            torch.autograd.backward([t for t, _ in grads], [g for _, g in grads])
    return total


class TeacherForcing:
    """The transfer hook installed on every :class:`HybridAttention` during the stage."""

    def __init__(self, cfg: DictConfig):
        self.mse_weight = cfg.mse_weight
        self.xent_weight = cfg.xent_weight
        self.xent_chunk = cfg.xent_chunk
        self.backward = False
        self.loss_scale = 1.0
        self.losses: dict[str, dict[int, torch.Tensor]] = {"mse": {}, "xent": {}}

    def __call__(self, hyb: HybridAttention, q, k, v, scale: float) -> torch.Tensor:
        with torch.no_grad():
            teacher = softmax_heads(q, k, v, scale)
        q, k, v = q.detach(), k.detach(), v.detach()
        train_mse = self.backward and self.mse_weight > 0
        with torch.set_grad_enabled(train_mse):  # the MSE is always logged, trained only with a weight
            student = hyb.converted(q, k, v, scale)
            mse = F.mse_loss(student.float(), teacher.float())
            if train_mse:
                (self.mse_weight * self.loss_scale * mse).backward()
        self.losses["mse"][hyb.layer_idx] = mse.detach()
        if self.xent_weight > 0:
            train_xent = self.backward
            with torch.set_grad_enabled(train_xent):
                q_feat, k_feat = hyb.features(q, k)
                xent = attention_weight_kl(
                    q,
                    k,
                    q_feat,
                    k_feat,
                    scale,
                    chunk=self.xent_chunk,
                    backward_scale=self.xent_weight * self.loss_scale if train_xent else None,
                )
            self.losses["xent"][hyb.layer_idx] = xent.detach()
        return teacher

    def collect(self) -> dict[str, torch.Tensor]:
        """Per-layer losses of the last forward, ``{"mse": [L], "xent": [L]}`` (xent only when weighted), and
        clears them."""
        out = {name: torch.stack([values[i] for i in sorted(values)]) for name, values in self.losses.items() if values}
        for values in self.losses.values():
            values.clear()
        return out

    def loss(self, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted objective, per layer [L]."""
        total = self.mse_weight * per_layer["mse"]
        if "xent" in per_layer:
            total = total + self.xent_weight * per_layer["xent"]
        return total


def run(model, cfg: DictConfig, data: PackedData, *, out_dir: Path | None = None, log_fn: LogFn = lambda m: None):
    """Trains phi and gamma of every converted layer; everything else stays frozen.

    Args:
        model: a converted model (``linearize.attention.convert``).
        cfg: the full config (uses ``cfg.transfer``, ``cfg.seed``).
        data: packed token chunks.
        out_dir: where the best checkpoint (``feature_maps.safetensors``) goes; loaded back at the end.

    Returns:
        metrics: ``transfer/best_val_loss``, ``transfer/steps``, per-layer validation MSE (and KL with
        ``xent_weight``), timings. SSD (``cfg.ssd.stages`` holding ``transfer``) drops windows during training
        steps only; validation always runs the plain converted layers.
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
    no_logits = last_logits_only(model)  # the hooks see every layer; the LM head's output is never used
    best_state: dict[str, torch.Tensor] = {}
    last_val: dict[str, list[float]] = {}  # per-layer held-out losses of the latest evaluation
    best_val_layers: dict[str, list[float]] = {}

    def forward_backward(batch: torch.Tensor, loss_scale: float):
        hook.backward, hook.loss_scale = True, loss_scale
        with torch.no_grad():
            model(input_ids=batch, use_cache=False, **no_logits)
        per_layer = hook.collect()
        metrics = {"transfer/loss": hook.loss(per_layer).mean().item()}
        metrics.update({f"transfer/{name}": values.mean().item() for name, values in per_layer.items()})
        return metrics

    def val_batch(batch: torch.Tensor) -> torch.Tensor:
        hook.backward = False
        model(input_ids=batch, use_cache=False, **no_logits)
        per_layer = hook.collect()
        return torch.stack([per_layer["mse"], per_layer.get("xent", torch.zeros_like(per_layer["mse"]))])

    def validate() -> float:
        with ssd.suspended() if ssd is not None else nullcontext():
            mse, xent = mean_over_val(data, tcfg, device, val_batch)
        last_val["mse"] = mse.tolist()
        metrics = {"transfer/val_mse": mse.mean().item()}
        per_layer = {"mse": mse}
        if tcfg.xent_weight > 0:
            last_val["xent"] = xent.tolist()
            metrics["transfer/val_xent"] = xent.mean().item()
            per_layer["xent"] = xent
        log_fn(metrics)
        return hook.loss(per_layer).mean().item()

    def on_improve(step: int, loss: float) -> None:
        best_val_layers.clear()
        best_val_layers.update(last_val)
        best_state.clear()
        best_state.update({n: p.detach().clone() for n, p in model.named_parameters() if ".hybrid." in n})
        if out_dir is not None:
            save_hybrid(model, Path(out_dir) / CHECKPOINT)

    model.train(False)
    try:
        with ssd_lib.schedule(cfg, layers, "transfer") as ssd:
            result = train(
                params=params,
                data=data,
                cfg=tcfg,
                device=device,
                forward_backward=ssd.wrap(forward_backward) if ssd is not None else forward_backward,
                validate=validate,
                on_improve=on_improve,
                log=log_fn,
                prefix="transfer",
                seed=cfg.seed,
                plateau=True,
                before_step=ssd.before_step if ssd is not None else None,
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
    best_layers = {
        f"transfer/val_{name}/layer_{i:02d}": v
        for name, values in best_val_layers.items()
        for i, v in enumerate(values)
    }
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
