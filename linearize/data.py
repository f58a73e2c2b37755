"""Training text: Alpaca-format instructions, tokenised and packed into fixed-length chunks.

The first ``val_examples`` examples are held out for validation (LoLCATs: 200), the rest train.
Offline the file comes from the data directory (``data.local_file`` under it); online from the hub.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from linearize.config import MissingInputError
from linearize.tasks import resolve_data_dir

log = logging.getLogger(__name__)

# The Stanford Alpaca prompt, as LoLCATs trains with it.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


def format_alpaca(example: dict) -> str:
    template = PROMPT_INPUT if example.get("input") else PROMPT_NO_INPUT
    return template.format(**{k: example.get(k, "") for k in ("instruction", "input", "output")})


@dataclass
class PackedData:
    """Token chunks ``[N, seq_len]`` for training and validation."""

    train: torch.Tensor
    val: torch.Tensor
    source: str

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        chunks = self.train if split == "train" else self.val
        order = torch.arange(len(chunks))
        if shuffle:
            order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(chunks) - batch_size + 1, batch_size):
            yield chunks[order[i : i + batch_size]]


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenates ``text + eos`` token streams and cuts them into ``[N, seq_len]`` chunks (the tail is dropped)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens cannot fill one chunk of seq_len={seq_len}; lower the stage's seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_examples(cfg: DictConfig) -> tuple[list[dict], str]:
    """Alpaca-format records from the data directory (offline) or the hub (online)."""
    from datasets import load_dataset

    data_dir = resolve_data_dir(cfg.data_dir)
    if data_dir is not None and cfg.local_file:
        path = Path(data_dir) / cfg.local_file
        if not path.is_file():
            raise MissingInputError(
                f"Training data {path} is missing. Point eval.data_dir (or $LINEARIZE_DATA_DIR) at a folder that "
                f"holds {cfg.local_file}, or set data.local_file=null to read {cfg.hub_id} from the hub."
            )
        ds = load_dataset("json", data_files=str(path), split="train")
        source = str(path)
    elif cfg.hub_id:
        try:
            ds = load_dataset(cfg.hub_id, split=cfg.hub_split)
        except Exception as err:  # offline, a wrong id, ...: the fix, not the frames of datasets
            raise MissingInputError(
                f"No data directory was found (data.data_dir / eval.data_dir and $LINEARIZE_DATA_DIR are unset, and "
                f"there is no ../shared/data beside the project), and the hub copy of the training data, "
                f"{cfg.hub_id}, could not be read ({type(err).__name__}: {err}). Point $LINEARIZE_DATA_DIR (or "
                f"eval.data_dir=...) at a folder laid out like ../shared/data, with {cfg.local_file}, or go online."
            ) from None
        source = f"hf://{cfg.hub_id}:{cfg.hub_split}"
    else:
        raise ValueError("data: no data directory found and no data.hub_id set")
    if cfg.max_examples:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    return list(ds), source


def load_packed(cfg: DictConfig, tokenizer, seq_len: int) -> PackedData:
    examples, source = load_examples(cfg)
    if len(examples) <= cfg.val_examples:
        raise ValueError(f"data.val_examples={cfg.val_examples} leaves no training examples of {len(examples)}")
    texts = [format_alpaca(e) for e in examples]
    val = pack(texts[: cfg.val_examples], tokenizer, seq_len)
    train = pack(texts[cfg.val_examples :], tokenizer, seq_len)
    log.info("data %s: %d train / %d val chunks of %d tokens", source, len(train), len(val), seq_len)
    return PackedData(train=train, val=val, source=source)
