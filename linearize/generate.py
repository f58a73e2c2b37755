"""Chat with, or complete from, a converted run; tokens stream to stdout as they are decoded.

    python -m linearize.generate run_dir=outputs/<run_name>/<time> prompt="Tell me about llamas" \\
        [max_new_tokens=128] [temperature=0.7] [top_p=0.9] [chat=true] [device=auto] [dtype=auto]

Loads the run's ``config.yaml``, the base model (``linearize.models.load_model``), converts its attention as the run
did, loads the trained feature maps (``checkpoints/feature_maps.safetensors``) and the LoRA adapter
(``checkpoints/lora/``) when those stages finished, and decodes with the constant-memory hybrid cache
(``linearize.cache``). ``temperature=0`` is greedy; ``chat=true`` applies the tokenizer's chat template when it has one.
Arguments are ``key=value`` pairs checked against :class:`GenerateConfig` (an unknown key or a wrong type fails).
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    run_dir: str = MISSING
    prompt: str = MISSING
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    chat: bool = True  # apply the tokenizer's chat template (if it has one)
    device: str | None = None  # None: the run's own model.device
    dtype: str | None = None  # None: the run's own model.dtype
    seed: int = 0


def load_run(run_dir: str | Path, device: str | None = None, dtype: str | None = None):
    """The model of a finished (or partly finished) run, ready to ``generate``: returns ``(model, tokenizer)``.

    Raises FileNotFoundError naming the missing file when the run directory, its config or a checkpoint of a
    finished stage is missing.
    """
    from linearize import finetune, transfer
    from linearize.attention import convert, load_hybrid
    from linearize.cache import use_hybrid_cache
    from linearize.models import load_model
    from linearize.outputs import RunDir

    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist (pass run_dir=outputs/<run_name>/<time>)")
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path / 'config.yaml'} is missing: {path} is not a linearize run directory")
    cfg = OmegaConf.load(path / "config.yaml")
    if device is not None:
        cfg.model.device = device
    if dtype is not None:
        cfg.model.dtype = dtype
    run = RunDir(path)
    model, tokenizer = load_model(cfg.model)
    if cfg.attention.kind != "softmax":
        convert(model, cfg.attention, cfg.feature_map)
        maps = run.checkpoints / transfer.CHECKPOINT
        if maps.is_file():
            load_hybrid(model, maps)
        elif run.done("transfer"):
            raise FileNotFoundError(f"{maps} is missing although the run's transfer stage finished")
        else:
            warnings.warn(
                f"{path} has no trained feature maps ({maps}): the converted layers keep their initialisation",
                RuntimeWarning,
                stacklevel=2,
            )
    adapter = run.checkpoints / finetune.ADAPTER_DIR
    if adapter.is_dir():
        model = finetune.load(model, cfg, run.checkpoints)
    elif run.done("finetune"):
        raise FileNotFoundError(f"{adapter} is missing although the run's finetune stage finished")
    model.eval()
    if cfg.attention.kind != "softmax":
        use_hybrid_cache(model)
    return model, tokenizer


def encode_prompt(tokenizer, prompt: str, chat: bool):
    """input_ids [1, T] for ``prompt``, through the chat template when asked for and available."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import TextStreamer

    args = sys.argv[1:] if argv is None else argv
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ValueError(f"arguments must be key=value, got {bad}; see `python -m linearize.generate --help`")
    cfg = OmegaConf.merge(OmegaConf.structured(GenerateConfig), OmegaConf.from_dotlist(args))
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing required argument(s) {', '.join(missing)}:\n{__doc__}")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_run(cfg.run_dir, cfg.device, cfg.dtype)
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, cfg.prompt, cfg.chat).to(device)
    sample = cfg.temperature > 0
    kwargs = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p) if sample else dict(do_sample=False)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **kwargs,
        )


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    logging.basicConfig(level=logging.WARNING)
    main()
