"""Stage 2, LoRA finetuning of the converted model with a next-token loss (peft, unchanged).

    python -m linearize.train stages=[transfer,finetune]

Trainable: the LoRA matrices of ``finetune.lora.target_modules`` (optionally only ``finetune.lora.layers``),
plus the feature maps and gamma when ``finetune.train_feature_maps``. Early stopping on the held-out loss;
the best adapter is kept. SSD (``cfg.ssd.stages`` holding ``finetune``) drops sliding windows during training
steps; held-out evaluations run the plain converted model.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from linearize import ssd as ssd_lib
from linearize.attention import hybrid_layers, load_hybrid, save_hybrid
from linearize.data import PackedData
from linearize.training import LogFn, mean_over_val, train

log = logging.getLogger(__name__)

ADAPTER_DIR = "lora"
FEATURE_MAPS = "feature_maps_finetuned.safetensors"


def lora_config(cfg: DictConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(cfg.layers) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap(model, cfg: DictConfig):
    """Adds LoRA adapters through peft; returns the ``PeftModel``. Their random initialisation (lora_A) is drawn
    from ``cfg.seed``, not from the process's random state (torch seeds that anew in every process)."""
    from peft import get_peft_model

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return get_peft_model(model, lora_config(cfg.finetune.lora))
    except ValueError as err:
        raise ValueError(f"finetune.lora.target_modules={list(cfg.finetune.lora.target_modules)}: {err}") from err


def trainable_parameters(model, cfg: DictConfig) -> list[torch.nn.Parameter]:
    """Freezes everything but LoRA (and, if configured, the feature maps and gamma); returns what trains."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or (cfg.finetune.train_feature_maps and ".hybrid." in name))
    return [p for p in model.parameters() if p.requires_grad]


def _next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def run(model, cfg: DictConfig, data: PackedData, *, out_dir: Path | None = None, log_fn: LogFn = lambda m: None):
    """LoRA-tunes ``model`` (wrapped here with peft). Returns ``(peft_model, metrics)``.

    The best adapter (lowest held-out loss) is restored at the end and saved to ``out_dir/lora`` with
    ``save_pretrained``; with ``train_feature_maps`` the tuned maps go to ``feature_maps_finetuned.safetensors``.
    """
    fcfg = cfg.finetune
    peft_model = wrap(model, cfg)
    params = trainable_parameters(peft_model, cfg)
    n_trainable = sum(p.numel() for p in params)
    log.info("finetune: %d trainable parameters", n_trainable)
    device = next(peft_model.parameters()).device
    if fcfg.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    best_state: dict[str, torch.Tensor] = {}

    def forward_backward(batch: torch.Tensor, loss_scale: float):
        loss = _next_token_loss(peft_model, batch)
        (loss * loss_scale).backward()
        return {"finetune/loss": loss.item()}

    def validate() -> float:
        peft_model.eval()
        with ssd.suspended() if ssd is not None else nullcontext():
            value = mean_over_val(data, fcfg, device, lambda b: _next_token_loss(peft_model, b).item())
        peft_model.train()
        return value

    def on_improve(step: int, loss: float) -> None:
        best_state.clear()
        best_state.update({n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad})
        if out_dir is not None:
            save(peft_model, cfg, out_dir)

    peft_model.train()
    try:
        with ssd_lib.schedule(cfg, hybrid_layers(peft_model), "finetune") as ssd:
            result = train(
                params=params,
                data=data,
                cfg=fcfg,
                device=device,
                forward_backward=ssd.wrap(forward_backward) if ssd is not None else forward_backward,
                validate=validate,
                on_improve=on_improve,
                log=log_fn,
                prefix="finetune",
                seed=cfg.seed,
                patience=fcfg.patience,
                before_step=ssd.before_step if ssd is not None else None,
            )
    finally:
        peft_model.eval()
        for p in params:
            p.requires_grad_(False)
        if fcfg.gradient_checkpointing:
            peft_model.gradient_checkpointing_disable()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name in best_state:
                p.copy_(best_state[name])
    metrics = {
        "finetune/best_val_loss": result.best_val,
        "finetune/best_step": result.best_step,
        "finetune/steps": result.steps,
        "finetune/stopped_early": float(result.stopped_early),
        "finetune/tokens": result.tokens,
        "finetune/wall_s": result.wall_s,
        "finetune/tokens_per_s": result.tokens / max(result.wall_s, 1e-9),
        "finetune/trainable_params": n_trainable,
    }
    return peft_model, metrics


def save(peft_model, cfg: DictConfig, out_dir: Path) -> None:
    peft_model.save_pretrained(Path(out_dir) / ADAPTER_DIR)
    if cfg.finetune.train_feature_maps:
        save_hybrid(peft_model, Path(out_dir) / FEATURE_MAPS)


def load(model, cfg: DictConfig, out_dir: Path):
    """Restores a finished finetune stage (resume): the saved adapter on top of ``model``."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, Path(out_dir) / ADAPTER_DIR, is_trainable=False)
    if cfg.finetune.train_feature_maps and hybrid_layers(peft_model):
        load_hybrid(peft_model, Path(out_dir) / FEATURE_MAPS)
    peft_model.eval()
    return peft_model
