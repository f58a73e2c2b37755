"""Every config option composes; typos, wrong types and contradictions fail at compose/validate time."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CONF_DIR, ROOT, compose
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from linearize.config import validate

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "experiment")


@pytest.mark.parametrize(
    "override",
    [f"{g}={f.stem}" for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))],
)
def test_every_group_option_composes_and_validates(override):
    cfg = compose([override])
    if override == "attention=softmax":  # nothing to transfer in the unconverted model
        cfg = compose([override, "stages=[finetune,evaluate]"])
    validate(cfg)


def test_design_card_command_composes():
    cfg = compose(["model=mistral7b", "ssd=default"])
    validate(cfg)
    assert cfg.model.pretrained == "mistralai/Mistral-7B-v0.1"
    assert cfg.ssd.enabled and list(cfg.ssd.probs) == [0.9, 0.75, 0.5]
    assert cfg.attention.kind == "hybrid" and cfg.attention.window == 64


def test_defaults_follow_lolcats():
    cfg = compose([])
    assert cfg.model.source == "gguf"
    assert cfg.feature_map.activation == "softmax" and cfg.feature_map.feature_dim == 64 and cfg.feature_map.signed
    assert cfg.attention.gamma_init == 0.1
    assert cfg.finetune.lora.r == 8 and cfg.finetune.lora.alpha == 16
    assert list(cfg.finetune.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    paper = compose(["transfer=lolcats", "finetune=lolcats"])
    assert paper.transfer.seq_len == 1024 and paper.transfer.epochs == 2 and paper.transfer.lr == 1e-2


def test_window_is_a_plain_override():
    assert compose(["attention.window=16"]).attention.window == 16


def test_typo_key_fails_at_compose():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose(["attention.windw=16"])


def test_wrong_type_fails_at_compose():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["attention.window=wide"])


def test_unknown_option_fails_at_compose():
    with pytest.raises(ConfigCompositionException):
        compose(["feature_map=cosformer"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["attention.kind=sliding"], "attention.kind"),
        (["attention.window=0"], "attention.window"),
        (["attention.gamma_init=1.5"], "gamma_init"),
        (["feature_map.activation=tanh"], "feature_map.activation"),
        (["eval.modes=[hybrid,swa]"], "eval.modes"),
        (["ssd=default", "ssd.probs=[0.9,1.2]"], "ssd.probs"),
        (["ssd=default", "ssd.boundaries=[0.5]"], "ssd.boundaries"),
        (["ssd=default", "attention=linear"], "ssd.enabled"),
        (["model.source=hub"], "model.pretrained"),
        (["attention=softmax"], "attention.kind=softmax"),
    ],
)
def test_contradictions_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(compose(overrides))


def test_cli_reports_typo_readably():
    """The entrypoint itself: a typo'd key exits non-zero with Hydra's one-line message, no deep traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "linearize.train", "attention.windw=3", "--cfg", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "windw" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_cfg_job_prints_composed_config():
    proc = subprocess.run(
        [sys.executable, "-m", "linearize.train", "model=mistral7b", "ssd=default", "--cfg", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mistralai/Mistral-7B-v0.1" in proc.stdout and "enabled: true" in proc.stdout


def test_task_limits_compose_and_must_name_evaluated_tasks():
    cfg = compose(["eval.tasks=[piqa,mmlu]", "+eval.task_limits.mmlu=10", "+eval.task_limits.piqa=null"])
    validate(cfg)
    assert cfg.eval.task_limits == {"mmlu": 10, "piqa": None}
    with pytest.raises(ValueError, match="eval.task_limits.hellaswag"):
        validate(compose(["+eval.task_limits.hellaswag=10"]))
    with pytest.raises(ValueError, match="must be >= 1"):
        validate(compose(["eval.tasks=[piqa]", "+eval.task_limits.piqa=0"]))
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose(["+eval.task_limits.piqa=many"])
