"""Diagnostics (linearize/diagnostics.py) against hand-computed and independent references, on tiny in-memory
models: LA shares, reach of lm-eval requests, passkey prompts, perplexity by position, the verdict rule, the
diagnostics.json schema and the keys of an offline W&B run."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, attn_cfg, compose, fm_cfg, requires_data, tiny

from linearize import attention as A
from linearize import diagnostics as D
from linearize.kernels.hybrid_attention import hybrid_attention_naive


def converted(window: int, kind: str = "hybrid", seed: int = 0):
    model, tok = tiny("llama", seed=seed)
    A.convert(model, attn_cfg(kind=kind, window=window), fm_cfg())
    for layer in A.hybrid_layers(model):  # non-trivial feature maps and gamma
        g = torch.Generator().manual_seed(layer.layer_idx)
        for p in layer.parameters():
            p.data = p.data + 0.3 * torch.randn(p.shape, generator=g)
    return model, tok


def token_batch(n: int, T: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 250, (n, T), generator=g))


# ---------------------------------------------------------------------------------------------------------------
# the split of the op into its parts


@pytest.mark.parametrize("softmax,linear", [(True, "outside"), (True, "all"), (False, "all"), (True, "none")])
@pytest.mark.parametrize("chunk", [5, 64])
def test_parts_reassemble_the_naive_op(softmax, linear, chunk):
    g = torch.Generator().manual_seed(1)
    B, T, H, Hkv, D_, F_ = 2, 23, 4, 2, 8, 6
    q, k, v = (torch.randn(B, T, h, D_, generator=g) for h in (H, Hkv, Hkv))
    qf, kf = (torch.rand(B, T, H, F_, generator=g) for _ in range(2))
    gamma = torch.rand(H, generator=g)
    a_s, z_s, a_l, z_l = D.attention_parts(q, k, v, qf, kf, gamma, window=7, softmax=softmax, linear=linear,
                                           chunk_size=chunk)  # fmt: skip
    y = (a_s + a_l) / (z_s + z_l + 1e-12)[..., None]
    ref = hybrid_attention_naive(q, k, v, qf, kf, gamma, window=7, softmax=softmax, linear=linear)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    if linear == "none":
        assert torch.count_nonzero(z_l) == 0 and torch.count_nonzero(a_l) == 0
    if not softmax:
        assert torch.count_nonzero(z_s) == 0


def test_mass_and_output_share_against_a_float64_loop():
    """Per position, per head: the formulas of DESIGN.md section 5 written out with Python loops."""
    g = torch.Generator().manual_seed(3)
    T, H, D_, F_, w = 9, 2, 3, 4, 3
    q, k, v = (torch.randn(1, T, H, D_, generator=g, dtype=torch.float64) for _ in range(3))
    qf, kf = (torch.rand(1, T, H, F_, generator=g, dtype=torch.float64) for _ in range(2))
    gamma = torch.tensor([0.2, 0.7], dtype=torch.float64)
    mass, out = D.shares(*D.attention_parts(q, k, v, qf, kf, gamma, window=w, linear="outside", chunk_size=2))
    scale = D_**-0.5
    for h in range(H):
        for n in range(T):
            win = [j for j in range(T) if n - w < j <= n]
            old = [j for j in range(T) if j <= n - w]
            s = {j: float(q[0, n, h] @ k[0, j, h]) * scale for j in win}
            c = max(s.values())
            z_swa = sum(float(gamma[h]) * math.exp(s[j] - c) for j in win)
            a_swa = sum(
                (float(gamma[h]) * math.exp(s[j] - c) * v[0, j, h] for j in win), torch.zeros(D_, dtype=torch.float64)
            )
            z_la = sum(float(qf[0, n, h] @ kf[0, j, h]) for j in old)
            a_la = sum(
                (float(qf[0, n, h] @ kf[0, j, h]) * v[0, j, h] for j in old), torch.zeros(D_, dtype=torch.float64)
            )
            assert mass[0, n, h].item() == pytest.approx(z_la / (z_swa + z_la), abs=1e-12)
            n_la, n_swa = float(a_la.norm()), float(a_swa.norm())
            assert out[0, n, h].item() == pytest.approx(n_la / (n_la + n_swa), abs=1e-12)
    assert (mass[0, :w] == 0).all() and (mass[0, w:] > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# usage on a converted model


def test_window_at_least_T_gives_exactly_zero_share():
    model, _ = converted(window=64)
    u = D.usage(model, token_batch(2, 40), window=64, bin_size=8)
    for metric in ("la_mass_share", "la_output_share"):
        assert u["overall"][metric]["lt_window"] == 0.0 and u["overall"][metric]["all"] == 0.0
        assert u["overall"][metric]["ge_window"] is None  # no position reaches the window
        assert all(v == 0.0 for row in u[metric]["all"] for v in row)
    assert u["tokens"] == {"lt_window": 80, "ge_window": 0}


def test_window_below_T_gives_positive_share_only_beyond_it():
    model, _ = converted(window=8)
    u = D.usage(model, token_batch(2, 40), window=8, bin_size=8)
    assert u["overall"]["la_mass_share"]["lt_window"] == 0.0
    assert 0.0 < u["overall"]["la_mass_share"]["ge_window"] < 1.0
    assert all(v > 0 for row in u["la_output_share"]["ge_window"] for v in row)
    assert u["by_position"]["la_mass_share"][0] == 0.0 and u["by_position"]["la_mass_share"][-1] > 0.0
    assert len(u["layers"]) == 2 and u["heads"] == 4


def test_usage_runs_the_lm_head_on_one_position():
    """The recorder reads the attention layers; the usage forwards do not build [B, T, vocab] logits."""
    model, _ = converted(window=8)
    positions = []
    model.lm_head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    D.usage(model, token_batch(3, 40), window=8, batch_size=2)
    assert positions == [1, 1]


def test_la_only_share_is_one():
    model, _ = converted(window=8)
    with A.attention_mode(model, "la_only"):
        u = D.usage(model, token_batch(2, 30), window=8)
    assert u["mode"] == "la_only"
    for metric in ("la_mass_share", "la_output_share"):
        for side in D.SIDES:
            assert u["overall"][metric][side] == pytest.approx(1.0, abs=1e-12)
    with A.attention_mode(model, "swa_only"):
        assert D.usage(model, token_batch(1, 30), window=8)["overall"]["la_mass_share"]["all"] == 0.0


def test_recorder_sees_the_ops_own_inputs():
    """The hook's table equals shares computed directly from captured q, k, v of layer 0, padding excluded."""
    model, _ = converted(window=6)
    seqs = [token_batch(1, 20, seed=1)[0], token_batch(1, 13, seed=2)[0]]
    captured = []
    layer = A.hybrid_layers(model)[0]
    handle = layer.register_forward_hook(lambda m, args, out: captured.append(args))
    u = D.usage(model, seqs, window=6, batch_size=2)
    handle.remove()
    q, k, v, scale = captured[0]
    qf, kf = layer.features(q, k)
    mass, _ = D.shares(*D.attention_parts(q.double(), k.double(), v.double(), qf.double(), kf.double(),
                                          layer.gamma.double(), window=6, scale=scale))  # fmt: skip
    ge = torch.cat([mass[0, 6:20], mass[1, 6:13]])  # the second sequence has 13 real tokens
    expected = ge.mean(0)
    got = torch.tensor(u["la_mass_share"]["ge_window"][0], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# reach


@pytest.fixture(scope="module")
def hflm():
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny("llama")
    return HFLM(pretrained=model, tokenizer=tok, batch_size=1)


def _instance(context: str, continuation: str, doc_id: int = 0):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=0,
                    metadata=("t", doc_id, 1))  # fmt: skip


def test_reach_of_short_and_long_prompts(hflm):
    # byte tokenizer: one ASCII character = one token
    short = D.requests_of(hflm, [_instance("abcde", "fghij")], "t")
    assert len(short[0].tokens) == 9  # 10 tokens, the last is only a target
    r = D.reach(short, window=64)
    assert r["share_scored_ge_window"] == 0.0 and r["share_items_never_reach"] == 1.0

    long = D.requests_of(hflm, [_instance("a" * 60, "b" * 40, doc_id=1)], "t")
    assert len(long[0].tokens) == 99 and long[0].score_start == 59
    r = D.reach(long, window=64)
    # targets 60..99 are predicted by query positions 59..98; 64..98 are >= the window: 35 of 40
    assert r["scored_tokens"] == 40
    assert r["share_scored_ge_window"] == 35 / 40
    assert r["share_items_never_reach"] == 0.0
    both = D.reach(short + long, window=64)
    assert both["share_scored_ge_window"] == 35 / 45 and both["share_items_never_reach"] == 0.5  # 5 + 40 scored
    assert 64 in both["histogram"]["edges"] and sum(both["histogram"]["counts"]) == 2


def test_reach_respects_lm_eval_truncation(hflm):
    req = D.requests_of(hflm, [_instance("x" * (hflm.max_length + 50), "yy")], "t")[0]
    assert len(req.tokens) == hflm.max_length and req.scored == 2


@requires_data
def test_reach_of_a_real_task_follows_eval_limit(hflm):
    requests = D.task_requests(hflm, "piqa", SHARED_DATA, {}, limit=3)
    assert len(requests) == 6 and len({r.doc_id for r in requests}) == 3  # two solutions per PIQA item
    r = D.reach(requests, window=64)
    assert r["items"] == 3 and r["requests"] == 6


# ---------------------------------------------------------------------------------------------------------------
# long-context probes


def test_position_buckets_and_loss_consistency():
    assert D.position_buckets(100, 16) == [(0, 16), (16, 32), (32, 64), (64, 100)]
    model, _ = converted(window=8)
    seqs = torch.stack(token_batch(3, 41))
    out = D.position_perplexity(model, seqs, window=8, batch_size=2)
    assert [(b["start"], b["end"]) for b in out["buckets"]] == [(0, 8), (8, 16), (16, 32), (32, 40)]
    with torch.no_grad():
        loss = model(input_ids=seqs, labels=seqs, use_cache=False).loss.item()
        logits = model(input_ids=seqs, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none")
    assert out["nll"] == pytest.approx(loss, rel=1e-5)
    weighted = sum(b["nll"] * b["tokens"] for b in out["buckets"]) / sum(b["tokens"] for b in out["buckets"])
    assert weighted == pytest.approx(loss, rel=1e-5)
    assert out["buckets"][1]["nll"] == pytest.approx(nll[:, 8:16].mean().item(), rel=1e-5)


def test_passkey_prompt_has_the_length_and_the_key():
    _, tok = tiny("llama")
    ids, distance = D.passkey_prompt(tok, 200, "12345", depth=0.25)
    assert len(ids) == 200
    text = tok.decode(ids)
    key_end = text.index("12345 is the pass key. ") + len("12345 is the pass key. ")
    assert len(text) - key_end == distance  # byte tokens: characters = tokens
    with pytest.raises(ValueError, match="passkey length"):
        D.passkey_prompt(tok, 20, "12345", depth=0.5)


@pytest.mark.parametrize("row", ["base", "hybrid", "swa_only", "la_only", "sinks_only", "no_attention"])
@pytest.mark.parametrize("lora", [False, True])
def test_candidate_scores_match_separate_forwards(row, lora):
    """Each candidate's score equals the log-likelihood of a full forward of context + candidate. The context runs
    once (batch 1) and its cache serves the candidates, except for sinks_only, which no cache can serve."""
    model, tok = converted(window=8)
    if lora:
        from linearize import finetune

        model = finetune.wrap(model, compose(["model=tiny_llama"])).eval()
        with torch.no_grad():  # a non-zero adapter, so that the base row (adapter off) differs
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    context = token_batch(1, 30)[0].tolist()
    candidates = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    batches = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    with D._row(model, row):
        scores = D.continuation_logprobs(model, context, candidates)
        hook.remove()
        for i, cand in enumerate(candidates):
            seq = torch.tensor([context + cand])
            with torch.no_grad():
                lp = model(input_ids=seq, use_cache=False).logits.log_softmax(-1)[0]
            ref = sum(lp[len(context) - 1 + t, c].item() for t, c in enumerate(cand))
            assert scores[i].item() == pytest.approx(ref, abs=1e-4), (row, i)
    if row == "sinks_only":
        assert batches == [(4, 33)]
    else:
        assert batches == [(1, 30), (4, 3)]


# ---------------------------------------------------------------------------------------------------------------
# deltas and verdict


def test_ablation_deltas():
    results = {"base": {"piqa": 0.7, "avg": 0.7}, "hybrid": {"piqa": 0.65, "avg": 0.65, "rec": 93.0},
               "swa_only": {"piqa": 0.6, "avg": 0.6, "rec": 85.0}}  # fmt: skip
    deltas = D.ablation_deltas(results)
    assert set(deltas) == {"hybrid_minus_swa_only"}
    assert deltas["hybrid_minus_swa_only"] == {"piqa": pytest.approx(0.05), "avg": pytest.approx(0.05)}
    flat = {"eval/hybrid/piqa": 0.65, "eval/hybrid/avg": 0.65, "eval/swa_only/piqa": 0.6}
    assert D.results_from_metrics(flat) == {"hybrid": {"piqa": 0.65, "avg": 0.65}, "swa_only": {"piqa": 0.6}}


@pytest.mark.parametrize(
    "share,delta,gain,label",
    [
        (0.01, 0.10, 1.0, "unused"),
        (0.30, 0.02, None, "used"),
        (0.30, 0.00, 0.05, "used"),
        (0.30, 0.00, 0.00, "present_not_needed"),
        (0.30, None, None, "present"),
        (None, 0.05, 0.05, "undetermined"),
    ],
)
def test_verdict_rule(share, delta, gain, label):
    v = D.verdict(output_share_ge=share, score_delta=delta, nll_gain=gain, reach_share=0.1, window=64,
                  share_threshold=0.05, min_score_delta=0.01, min_nll_gain=0.02)  # fmt: skip
    assert v["label"] == label
    assert v["text"].startswith("Is the linear branch used?")


# ---------------------------------------------------------------------------------------------------------------
# the stage: diagnostics.json, report, W&B


def small_cfg(**extra):
    overrides = [
        "model=tiny_llama",
        "attention.window=16",
        "feature_map.feature_dim=8",
        "eval.tasks=[piqa]",
        "eval.limit=2",
        "diagnostics.num_sequences=2",
        "diagnostics.seq_len=48",
        "diagnostics.passkey_lengths=[120]",
        "diagnostics.passkey_trials=1",
        "diagnostics.passkey_distractors=2",
        "diagnostics.ppl_seq_len=40",
        "diagnostics.ppl_num_sequences=1",
        "diagnostics.probe_rows=[base,hybrid,swa_only]",
        "data.max_examples=260",
        "data.val_examples=20",
        f"eval.data_dir={SHARED_DATA}",
    ]
    return compose(overrides + [f"{k}={v}" for k, v in extra.items()])


def test_config_has_the_stage_and_validates():
    from linearize.config import validate

    cfg = compose(["model=tiny_llama"])
    assert "diagnose" in cfg.stages and cfg.diagnostics.reach_tasks == cfg.eval.tasks
    assert cfg.diagnostics.reach_limit == cfg.eval.limit
    validate(cfg)
    with pytest.raises(ValueError, match="diagnostics.seq_len"):
        validate(compose(["model=tiny_llama", "diagnostics.seq_len=64"]))
    with pytest.raises(ValueError, match="diagnostics.probe_rows"):
        validate(compose(["model=tiny_llama", "diagnostics.probe_rows=[hybird]"]))
    with pytest.raises(ValueError, match="diagnostics.source"):
        validate(compose(["model=tiny_llama", "diagnostics.source=alpacca"]))


@requires_data
def test_stage_writes_valid_json_and_logs_wandb_keys(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from linearize.models import load_model
    from linearize.outputs import diagnostics_section
    from linearize.tracking import make_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = small_cfg()
    model, tok = load_model(cfg.model)
    A.convert(model, cfg.attention, cfg.feature_map)
    results = {"base": {"piqa": 0.5, "avg": 0.5}, "hybrid": {"piqa": 0.5, "avg": 0.5},
               "swa_only": {"piqa": 0.25, "avg": 0.25}, "la_only": {"piqa": 0.5, "avg": 0.5}}  # fmt: skip
    tracker = make_tracker(cfg.logger, tmp_path, OmegaConf.to_container(cfg, resolve=True), "test")
    try:
        diag, metrics = D.run(model, tok, cfg, results=results, out_dir=tmp_path, tracker=tracker)
    finally:
        tracker.finish()
    saved = json.loads((tmp_path / D.FILE).read_text())
    D.validate_schema(saved)
    assert saved == json.loads(json.dumps(diag))
    assert saved["verdict"]["label"] == "used"  # hybrid - swa_only = 25 points
    assert saved["ablation"]["hybrid_minus_swa_only"]["avg"] == pytest.approx(0.25)
    assert set(saved["passkey"]["rows"]) == {"base", "hybrid", "swa_only"}
    assert saved["reach"]["piqa"]["items"] == 2
    for name, file in saved["plots"].items():
        assert (tmp_path / file).stat().st_size > 1000, name
    assert {"usage_heatmap", "usage_by_position", "reach", "ablation"} <= set(saved["plots"])
    assert "usage/la_mass_share" in metrics and "usage/la_output_share/layer_0" in metrics
    assert any("Is the linear branch used?" in line for line in diagnostics_section(saved))

    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    record_file = next(run_dirs[0].glob("*.wandb"))
    for _ in range(60):  # W&B's service process may still be flushing the file after finish() returns
        history, summary = _wandb_keys(record_file)
        if "usage/verdict" in summary:
            break
        time.sleep(0.5)
    for key in (
        "usage/verdict",
        "usage/verdict_label",
        "usage/la_mass_share",
        "usage/la_output_share",
        "reach/piqa/share_scored_ge_window",
        "passkey/hybrid/len_120",
        "ablation/hybrid_minus_swa_only/avg",
    ):
        assert key in summary, key  # fmt: skip
    assert json.loads(summary["usage/verdict"]) == saved["verdict"]["text"]
    for key in (
        "usage/la_mass_share/layer_0",
        "usage/la_output_share/layer_1",
        "usage/table",
        "reach/table",
        "plots/usage_heatmap",
        "ppl/table",
        "passkey/table",
        "ablation/table",
    ):
        assert key in history, key  # fmt: skip


def _wandb_records(path):
    """Protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: a 7-byte file header, then
    32 KiB blocks of chunks, each with a 7-byte header crc32 / length / type = FULL 1, FIRST 2, MIDDLE 3, LAST 4)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B record file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_keys(path) -> tuple[set[str], dict[str, str]]:
    """(keys logged with run.log, {summary key: JSON value}) read back from an offline run."""
    history, summary = set(), {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or item.nested_key[0] for item in record.history.item}  # tables, images: nested
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): item.value_json for item in record.summary.update})
    return history, summary


def test_schema_rejects_broken_files():
    good = {
        "schema_version": 1, "window": 4, "attention_kind": "hybrid", "usage": None, "reach": None,
        "passkey": None, "perplexity": None, "ablation": {},
        "verdict": {"label": "undetermined", "text": "t", "rule": "r", "inputs": {"x": None}}, "plots": {},
    }  # fmt: skip
    D.validate_schema(good)
    missing = copy.deepcopy(good)
    del missing["verdict"]
    with pytest.raises(ValueError, match="missing keys"):
        D.validate_schema(missing)
    wrong = copy.deepcopy(good)
    wrong["reach"] = {"piqa": {"requests": 1}}
    with pytest.raises(ValueError, match="diagnostics.reach.piqa"):
        D.validate_schema(wrong)
    typed = copy.deepcopy(good)
    typed["window"] = "64"
    with pytest.raises(ValueError, match="diagnostics.window"):
        D.validate_schema(typed)


@requires_data
def test_standalone_command_reloads_a_saved_run(tmp_path):
    """A run directory saved before the diagnose stage existed: diagnose reloads its feature maps and eval table."""
    from omegaconf import OmegaConf

    from linearize import diagnose
    from linearize.models import load_model
    from linearize.outputs import RunDir

    cfg = small_cfg()
    run = RunDir(tmp_path)
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["diagnostics"]
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    model, tok = load_model(cfg.model)
    A.convert(model, cfg.attention, cfg.feature_map)
    for layer in A.hybrid_layers(model):  # trained-looking maps that differ from the initial ones
        for p in layer.parameters():
            p.data = p.data + 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
    A.save_hybrid(model, run.checkpoints / "feature_maps.safetensors")
    run.finish("transfer", {"transfer/steps": 1})
    run.finish("evaluate", {"eval/hybrid/piqa": 0.5, "eval/hybrid/avg": 0.5, "eval/swa_only/piqa": 0.25,
                            "eval/swa_only/avg": 0.25})  # fmt: skip
    overrides = ["logger.wandb=false", "diagnostics.num_sequences=2", "diagnostics.seq_len=48",
                 "diagnostics.reach_tasks=[]", "diagnostics.passkey_lengths=[]", "diagnostics.ppl_num_sequences=0"]  # fmt: skip
    diag = diagnose.diagnose(tmp_path, overrides)

    expected = D.usage(model, D.usage_sequences(diagnose.load_config(tmp_path, overrides), tok), window=16)
    for side in D.SIDES:
        torch.testing.assert_close(torch.tensor(diag["usage"]["la_output_share"][side]),
                                   torch.tensor(expected["la_output_share"][side]))  # fmt: skip
    assert diag["ablation"]["hybrid_minus_swa_only"]["avg"] == pytest.approx(0.25)
    assert diag["reach"] is None and diag["passkey"] is None and diag["perplexity"] is None
    D.validate_schema(json.loads((tmp_path / D.FILE).read_text()))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["diagnostics"]["verdict"] == diag["verdict"] and "diagnose" in metrics["stages"]
    assert "## Is the linear branch used?" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="diagnostics.seq_len"):
        diagnose.load_config(tmp_path, ["diagnostics.seq_len=8"])
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        diagnose.diagnose(tmp_path / "checkpoints", [])


@requires_data
def test_usage_sample_from_an_eval_task(hflm):
    """source=<task>: the first request of each document, as lm-eval tokenises it, cut at seq_len."""
    cfg = small_cfg(**{"diagnostics.source": "arc_easy", "diagnostics.num_sequences": 3, "diagnostics.seq_len": 40,
                       "eval.splits": "{arc_easy: dev}"})  # fmt: skip
    seqs = D.usage_sequences(cfg, hflm.tokenizer, hflm)
    requests = D.task_requests(hflm, "arc_easy", SHARED_DATA, {"arc_easy": "dev"}, limit=3)
    firsts = {}
    for r in requests:
        firsts.setdefault(r.doc_id, r.tokens)
    assert len(seqs) == 3
    for seq, tokens in zip(seqs, firsts.values()):
        assert seq.tolist() == tokens[:40]
