"""Typed schemas for every Hydra config group, registered in Hydra's ConfigStore.

Each group file in ``conf/<group>/`` starts from its schema (``defaults: [ <group>_schema ]`` is implied by the
top-level schema), so an unknown key or a wrong type fails when the config is composed. Cross-field checks that a
type system cannot express live in :func:`validate` and raise ``ValueError`` naming the offending values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

ATTENTION_KINDS = ("hybrid", "hybrid_overlap", "linear", "softmax")
ACTIVATIONS = ("softmax", "exp", "relu", "elu", "identity")
MODES = ("hybrid", "swa_only", "la_only", "sinks_only", "no_attention")
STAGES = ("transfer", "finetune", "evaluate", "diagnose")
SSD_GRANULARITIES = ("step", "layer", "sequence")


class MissingInputError(FileNotFoundError):
    """An input the run needs (a data file or directory, a model file) is absent; the message names the fix.
    ``linearize.train`` prints it without a traceback (the other entrypoints still raise it as it is)."""


@dataclass
class TinyModelConfig:
    """A randomly initialised model built in memory (tests, smoke runs). Never downloads."""

    arch: str = "llama"  # llama | mistral | qwen2
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    # gguf: the embedded SmolLM2 file (or gguf_path); hub: a Hugging Face id; local: a directory; tiny: random
    source: str = MISSING
    pretrained: str | None = None
    gguf_path: str | None = None
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class AttentionConfig:
    kind: str = "hybrid"  # hybrid (sw, non-overlap) | hybrid_overlap | linear | softmax
    window: int = 64
    sinks: int = 8  # tokens seen by the `sinks_only` ablation
    backend: str = "auto"  # auto | triton | chunked | naive (see linearize.kernels.hybrid_attention)
    gamma_init: float = 0.1  # sigmoid(theta) at initialisation, LoLCATs' window factor


@dataclass
class FeatureMapConfig:
    name: str = MISSING
    activation: str = "softmax"  # softmax | exp | relu | elu | identity
    feature_dim: int = 64  # columns of the per-head projection W (d x f)
    match_head_dim: bool = False  # f = head_dim ("Hedgehog full"); overrides feature_dim
    signed: bool = True  # phi = [act(z), act(-z)] -> 2f features (Hedgehog); False -> act(z)
    bias: bool = False
    projection: bool = True  # False: phi acts on x itself (no learned W)


@dataclass
class SSDConfig:
    """Scheduled Sliding-window Dropout (``linearize.ssd``): drop the SWA branch with probability p(t)."""

    enabled: bool = False
    probs: list[float] = field(default_factory=lambda: [0.9, 0.75, 0.5])
    # fractions of the stage's steps where each phase starts after the first; empty = equal parts
    boundaries: list[float] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)  # optional window-size schedule, same phases
    granularity: str = "step"  # step (all layers) | layer | sequence
    stages: list[str] = field(default_factory=lambda: ["finetune"])
    seed: int = 0


@dataclass
class TransferConfig:
    enabled: bool = True
    mse_weight: float = 1000.0  # LoLCATs: 1000 x MSE of head outputs
    xent_weight: float = 0.0  # attention-weight KL, softmax rows vs linear-attention rows (Hedgehog / HedgeCATs)
    xent_chunk: int = 256  # query rows per chunk of the attention-weight loss (memory: B x H x chunk x T)
    lr: float = 1e-2
    weight_decay: float = 0.0
    epochs: int = 2
    max_steps: int = -1  # optimizer steps; -1 = epochs x batches
    batch_size: int = 1
    grad_accum: int = 8
    seq_len: int = 1024
    eval_every: int = 50  # optimizer steps between held-out evaluations
    val_batches: int = 8
    plateau_factor: float = 0.1
    plateau_patience: int = 10


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers: list[int] = field(default_factory=list)  # empty = every layer


@dataclass
class FinetuneConfig:
    enabled: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 2
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 8
    seq_len: int = 1024
    eval_every: int = 50
    val_batches: int = 8
    patience: int = 3  # early stopping: held-out evaluations without improvement
    train_feature_maps: bool = False
    gradient_checkpointing: bool = False


@dataclass
class EvalConfig:
    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy"])
    modes: list[str] = field(default_factory=lambda: ["hybrid", "swa_only", "la_only"])
    base: bool = True  # also evaluate the unconverted softmax model
    # extra attention kinds to run the converted model as, no retraining: one row "<kind>@<trained kind>" each
    kinds: list[str] = field(default_factory=list)
    limit: int | None = None  # documents per task (None = all); for MMLU per subject
    # per-task limits instead of `limit` (null = every document), e.g. +eval.task_limits.mmlu=10 (10 per subject)
    task_limits: dict[str, int | None] = field(default_factory=dict)
    batch_size: int = 8
    data_dir: str | None = None  # None: $LINEARIZE_DATA_DIR, else ../shared/data, else the hub
    splits: dict[str, str] = field(default_factory=dict)  # e.g. {arc_easy: dev, mmlu: val}


@dataclass
class DataConfig:
    name: str = MISSING
    local_file: str | None = None  # relative to the data directory
    hub_id: str | None = None
    hub_split: str = "train"
    val_examples: int = 200  # the first examples are held out (LoLCATs: 200)
    max_examples: int | None = None
    data_dir: str | None = "${eval.data_dir}"


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "linearize"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class DiagnosticsConfig:
    """Stage ``diagnose`` (linearize/diagnostics.py): component usage, reach, long-context probes, verdict."""

    enabled: bool = True
    source: str = "train"  # usage sample: train (held-out chunks of cfg.data) | an eval task name (its requests)
    num_sequences: int = 4  # usage sequences (0 = skip the usage metrics)
    seq_len: int = 256  # tokens per usage sequence; must exceed attention.window to see the LA branch
    mode: str = "hybrid"  # ablation mode the layers run in while usage is measured (hybrid = as converted)
    batch_size: int = 1
    chunk_size: int = 128  # query positions per block when splitting the op into its SWA and LA parts
    bin_size: int | None = None  # positions per bin of the share-vs-position profile; None = window / 4
    reach_tasks: list[str] = field(default_factory=list)  # conf/diagnostics/default.yaml: ${eval.tasks}
    reach_limit: int | None = None  # documents per task, as eval.limit (default.yaml: ${eval.limit})
    reach_bins: int = 20
    max_length: int | None = None  # lm-eval's truncation length; None = HFLM's default for the model
    probe_rows: list[str] = field(default_factory=lambda: ["base", "hybrid", "swa_only"])
    passkey_lengths: list[int] = field(default_factory=lambda: [128, 256])  # empty = no passkey probe
    passkey_trials: int = 4
    passkey_distractors: int = 4
    ppl_file: str = "wikitext-2-raw/wiki.test.raw"  # relative to the data directory
    ppl_seq_len: int = 256
    ppl_num_sequences: int = 2  # 0 = no perplexity-by-position probe
    # verdict thresholds (docs/diagnostics.md): LA output share at n >= window, eval avg delta, NLL gain (nats)
    share_threshold: float = 0.05
    min_score_delta: float = 0.01
    min_nll_gain: float = 0.02
    plots: bool = True


@dataclass
class MethodConfig:
    name: str = "lolcats"
    description: str = ""


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    feature_map: FeatureMapConfig = MISSING
    ssd: SSDConfig = MISSING
    transfer: TransferConfig = MISSING
    finetune: FinetuneConfig = MISSING
    eval: EvalConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    diagnostics: DiagnosticsConfig = MISSING
    method: MethodConfig = field(default_factory=MethodConfig)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seed: int = 0
    run_name: str = "${model.name}-${method.name}-${attention.kind}"


SCHEMAS: dict[str, Any] = {
    "model": ModelConfig,
    "attention": AttentionConfig,
    "feature_map": FeatureMapConfig,
    "ssd": SSDConfig,
    "transfer": TransferConfig,
    "finetune": FinetuneConfig,
    "eval": EvalConfig,
    "data": DataConfig,
    "logger": LoggerConfig,
    "method": MethodConfig,
    "diagnostics": DiagnosticsConfig,
}


def register_configs() -> None:
    """Register the top-level schema and one schema per group (``<group>_schema``) with Hydra."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


def _one_of(value: Any, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def validate(cfg: Any) -> None:
    """Checks a composed config beyond types; raises ``ValueError`` naming the offending values."""
    _one_of(cfg.model.source, ("gguf", "hub", "local", "tiny"), "model.source")
    if cfg.model.source in ("hub", "local") and not cfg.model.pretrained:
        raise ValueError(f"model.source={cfg.model.source} needs model.pretrained (a hub id or a directory)")
    _one_of(cfg.model.dtype, ("auto", "float32", "bfloat16", "float16"), "model.dtype")
    _one_of(cfg.attention.kind, ATTENTION_KINDS, "attention.kind")
    if cfg.attention.window < 1:
        raise ValueError(f"attention.window must be >= 1, got {cfg.attention.window}")
    if not 0.0 < cfg.attention.gamma_init < 1.0:
        raise ValueError(f"attention.gamma_init must lie in (0, 1), got {cfg.attention.gamma_init}")
    _one_of(cfg.attention.backend, ("auto", "triton", "chunked", "naive"), "attention.backend")
    _one_of(cfg.feature_map.activation, ACTIVATIONS, "feature_map.activation")
    if cfg.feature_map.feature_dim < 1:
        raise ValueError(f"feature_map.feature_dim must be >= 1, got {cfg.feature_map.feature_dim}")
    if not cfg.feature_map.projection and (cfg.feature_map.bias or cfg.feature_map.match_head_dim):
        raise ValueError("feature_map.projection=false leaves no W: bias and match_head_dim must be false")
    for stage in cfg.stages:
        _one_of(stage, STAGES, "stages[]")
    for mode in cfg.eval.modes:
        _one_of(mode, MODES, "eval.modes[]")
    for kind in cfg.eval.kinds:
        _one_of(kind, ("hybrid", "hybrid_overlap", "linear"), "eval.kinds[]")
    for task, limit in (cfg.eval.get("task_limits") or {}).items():
        if task not in cfg.eval.tasks:
            raise ValueError(f"eval.task_limits.{task}: {task} is not in eval.tasks {list(cfg.eval.tasks)}")
        if limit is not None and limit < 1:
            raise ValueError(f"eval.task_limits.{task}={limit} must be >= 1 (or null for every document)")
    if cfg.transfer.mse_weight < 0 or cfg.transfer.xent_weight < 0:
        raise ValueError(
            f"transfer.mse_weight={cfg.transfer.mse_weight} and transfer.xent_weight={cfg.transfer.xent_weight} "
            "must be >= 0"
        )
    if cfg.transfer.mse_weight == 0 and cfg.transfer.xent_weight == 0 and cfg.transfer.enabled:
        raise ValueError("transfer.mse_weight=0 and transfer.xent_weight=0 leave the transfer stage nothing to train")
    if cfg.transfer.xent_chunk < 1:
        raise ValueError(f"transfer.xent_chunk must be >= 1, got {cfg.transfer.xent_chunk}")
    ssd = cfg.ssd
    _one_of(ssd.granularity, SSD_GRANULARITIES, "ssd.granularity")
    if any(not 0.0 <= p <= 1.0 for p in ssd.probs):
        raise ValueError(f"ssd.probs must lie in [0, 1], got {list(ssd.probs)}")
    if ssd.boundaries and len(ssd.boundaries) != len(ssd.probs) - 1:
        raise ValueError(
            f"ssd.boundaries needs {len(ssd.probs) - 1} values for {len(ssd.probs)} phases, got {list(ssd.boundaries)}"
        )
    if list(ssd.boundaries) != sorted(ssd.boundaries) or any(not 0.0 < b < 1.0 for b in ssd.boundaries):
        raise ValueError(f"ssd.boundaries must be increasing fractions in (0, 1), got {list(ssd.boundaries)}")
    if ssd.windows and len(ssd.windows) != len(ssd.probs):
        raise ValueError(f"ssd.windows needs one window per phase ({len(ssd.probs)}), got {list(ssd.windows)}")
    for stage in ssd.stages:
        _one_of(stage, ("transfer", "finetune"), "ssd.stages[]")
    if ssd.enabled and cfg.attention.kind not in ("hybrid", "hybrid_overlap"):
        raise ValueError(
            f"ssd.enabled=true drops the sliding window of a hybrid, but attention.kind={cfg.attention.kind}"
        )
    if cfg.attention.kind == "softmax" and any(s in cfg.stages for s in ("transfer", "finetune")):
        if cfg.transfer.enabled and "transfer" in cfg.stages:
            raise ValueError("attention.kind=softmax has no feature maps to transfer: drop 'transfer' from stages")
    _one_of(cfg.logger.mode, ("offline", "online", "disabled"), "logger.mode")
    if "diagnose" in cfg.stages and cfg.diagnostics.enabled:
        validate_diagnostics(cfg)


def validate_diagnostics(cfg: Any) -> None:
    """Cross-field checks of ``cfg.diagnostics`` (also used by ``python -m linearize.diagnose``)."""
    from linearize.tasks import KNOWN_TASKS

    d = cfg.diagnostics
    _one_of(d.source, ("train", *KNOWN_TASKS), "diagnostics.source")
    _one_of(d.mode, ("hybrid", "swa_only", "la_only"), "diagnostics.mode")
    for row in d.probe_rows:
        _one_of(row, ("base", *MODES), "diagnostics.probe_rows[]")
    for task in d.reach_tasks:
        _one_of(task, KNOWN_TASKS, "diagnostics.reach_tasks[]")
    for key in ("num_sequences", "passkey_trials", "passkey_distractors", "ppl_num_sequences"):
        if d[key] < 0:
            raise ValueError(f"diagnostics.{key} must be >= 0, got {d[key]}")
    for key in ("seq_len", "batch_size", "chunk_size", "reach_bins", "ppl_seq_len"):
        if d[key] < 1:
            raise ValueError(f"diagnostics.{key} must be >= 1, got {d[key]}")
    if d.bin_size is not None and d.bin_size < 1:
        raise ValueError(f"diagnostics.bin_size must be >= 1 or null, got {d.bin_size}")
    if d.num_sequences and d.seq_len <= cfg.attention.window:
        raise ValueError(
            f"diagnostics.seq_len={d.seq_len} <= attention.window={cfg.attention.window}: no position reaches "
            "the linear branch; raise diagnostics.seq_len"
        )
    if d.passkey_lengths and (d.passkey_trials < 1 or d.passkey_distractors < 1):
        raise ValueError("diagnostics.passkey_lengths needs passkey_trials >= 1 and passkey_distractors >= 1")
    if d.ppl_num_sequences and d.ppl_seq_len < 2:
        raise ValueError(f"diagnostics.ppl_seq_len must be >= 2, got {d.ppl_seq_len}")
    if not 0.0 <= d.share_threshold <= 1.0:
        raise ValueError(f"diagnostics.share_threshold must lie in [0, 1], got {d.share_threshold}")
