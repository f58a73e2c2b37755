"""Shared fixtures: tiny in-memory models and the group configs of conf/ composed with Hydra. Nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = Path(os.environ.get("LINEARIZE_DATA_DIR") or ROOT.parent / "shared" / "data")

requires_data = pytest.mark.skipif(
    not (SHARED_DATA / "alpaca" / "alpaca_data_1k.json").is_file(),
    reason=f"the shared data directory {SHARED_DATA} is absent (set LINEARIZE_DATA_DIR)",
)


def load_triton_module(name: str, interpret: bool):
    """``linearize.kernels.hybrid_attention.<name>`` imported (or re-imported) with Triton's CPU interpreter on or
    off; None without triton. The switch is read when the module builds its @jit functions, and is not leaked."""
    import importlib

    previous = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = importlib.import_module(f"linearize.kernels.hybrid_attention.{name}")
        return mod if mod.INTERPRETED == interpret else importlib.reload(mod)
    except ImportError:
        return None
    finally:
        if interpret:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous


def compose(overrides: list[str] | None = None):
    """The project's config as ``python -m linearize.train <overrides>`` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from linearize.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


def attn_cfg(kind: str = "hybrid", window: int = 8, **kw):
    return OmegaConf.create(dict(kind=kind, window=window, sinks=4, backend="auto", gamma_init=0.1, **kw))


def fm_cfg(activation: str = "softmax", feature_dim: int = 8, **kw):
    base = dict(name=activation, activation=activation, feature_dim=feature_dim, match_head_dim=False, signed=True,
                bias=False, projection=True)
    base.update(kw)
    return OmegaConf.create(base)


def tiny(arch: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64, seed: int = 0):
    from linearize.models import byte_tokenizer, tiny_model

    cfg = OmegaConf.create(dict(arch=arch, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=kv_heads, intermediate_size=2 * hidden,
                                max_position_embeddings=1024, seed=seed))
    tok = byte_tokenizer()
    return tiny_model(cfg, vocab_size=len(tok)).eval(), tok


@pytest.fixture
def tiny_llama():
    return tiny("llama")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
