"""Stage functions on tiny in-memory models: exactly the intended parameters train, the best state is kept,
and checkpoints round-trip."""

from __future__ import annotations

import torch
from conftest import compose, tiny

from linearize import attention as A
from linearize import finetune, transfer
from linearize.data import PackedData, format_alpaca, pack
from linearize.models import byte_tokenizer


def small_cfg(**extra):
    overrides = [
        "model=tiny_llama", "attention.window=8", "feature_map.feature_dim=8",
        "transfer.max_steps=4", "transfer.grad_accum=1", "transfer.seq_len=32", "transfer.eval_every=2",
        "transfer.val_batches=2", "finetune.max_steps=4", "finetune.grad_accum=1", "finetune.seq_len=32",
        "finetune.eval_every=2", "finetune.val_batches=2",
    ]
    return compose(overrides + [f"{k}={v}" for k, v in extra.items()])


def random_data(n_train=16, n_val=4, seq_len=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PackedData(
        train=torch.randint(0, 250, (n_train, seq_len), generator=g),
        val=torch.randint(0, 250, (n_val, seq_len), generator=g),
        source="random",
    )


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    after = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, after[n].detach())}


def converted_tiny(cfg):
    model, _ = tiny("llama")
    A.convert(model, cfg.attention, cfg.feature_map)
    return model


def test_transfer_trains_only_feature_maps_and_gamma(tmp_path):
    cfg = small_cfg()
    model = converted_tiny(cfg)
    before = snapshot(model)
    metrics = transfer.run(model, cfg, random_data(), out_dir=tmp_path)
    moved = changed(before, model)
    hybrid_params = {n for n in before if ".hybrid." in n}
    assert moved and moved <= hybrid_params, moved - hybrid_params
    assert {n for n in moved if n.endswith("theta")}, "gamma must train"
    assert not any(p.requires_grad for p in model.parameters()), "everything is frozen after the stage"
    assert all(layer.transfer_hook is None for layer in A.hybrid_layers(model))
    assert metrics["transfer/steps"] == 4 and metrics["transfer/best_val_loss"] > 0
    assert len([k for k in metrics if "/val_mse/layer_" in k]) == 2
    assert (tmp_path / transfer.CHECKPOINT).is_file()


def test_transfer_runs_the_lm_head_on_one_position():
    """Transfer trains on the attention layers' outputs; its forwards (steps and validation) ask for the logits of
    the last position only instead of [B, T, vocab]."""
    cfg = small_cfg()
    model = converted_tiny(cfg)
    positions = []
    model.lm_head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    transfer.run(model, cfg, random_data())
    assert len(positions) == 4 + 2 * 2 and set(positions) == {1}  # 4 steps, 2 validations of 2 batches


def test_transfer_lowers_the_held_out_loss(tmp_path):
    cfg = small_cfg(**{"transfer.max_steps": 12, "transfer.eval_every": 12, "transfer.lr": 0.05})
    model = converted_tiny(cfg)
    data = random_data()
    start = transfer.run(model, small_cfg(**{"transfer.max_steps": 0}), data)["transfer/best_val_loss"]
    end = transfer.run(model, cfg, data)["transfer/best_val_loss"]
    assert end < start


def test_transfer_keeps_best_checkpoint_and_it_round_trips(tmp_path):
    cfg = small_cfg()
    model = converted_tiny(cfg)
    transfer.run(model, cfg, random_data(), out_dir=tmp_path)
    x = torch.randint(0, 250, (1, 40))
    with torch.no_grad():
        want = model(x).logits
    fresh = converted_tiny(cfg)  # same base weights (seeded), untrained feature maps
    with torch.no_grad():
        assert not torch.allclose(fresh(x).logits, want)
        transfer.load(fresh, tmp_path)
        torch.testing.assert_close(fresh(x).logits, want)


def test_finetune_trains_only_lora_and_round_trips(tmp_path):
    cfg = small_cfg()
    model = converted_tiny(cfg)
    before = snapshot(model)
    peft_model, metrics = finetune.run(model, cfg, random_data(), out_dir=tmp_path)
    after = dict(peft_model.named_parameters())
    lora = {n for n in after if "lora_" in n}
    assert lora and all(any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in lora)
    for name, p in before.items():  # base weights and feature maps untouched
        match = [a for a in after if a.endswith(name.replace(".weight", ".base_layer.weight")) or a.endswith(name)]
        assert match, name
        assert torch.equal(p, after[match[0]].detach()), name
    moved_lora = [n for n in lora if "lora_B" in n and after[n].abs().sum() > 0]
    assert moved_lora, "LoRA B starts at zero and must move"
    assert metrics["finetune/steps"] >= 2
    assert not any(p.requires_grad for p in peft_model.parameters())
    x = torch.randint(0, 250, (1, 40))
    with torch.no_grad():
        want = peft_model(x).logits
    reloaded = finetune.load(converted_tiny(cfg), cfg, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, want)


def test_lora_initialisation_follows_the_seed():
    """The adapters' random init comes from cfg.seed, whatever the process's random state (torch seeds it anew in
    every process), and the caller's random state is left as it was."""

    def lora_a(cfg, global_seed):
        base = converted_tiny(cfg)  # (seeds the global generator itself)
        torch.manual_seed(global_seed)
        model = finetune.wrap(base, cfg)
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1)), "wrap must not consume the caller's random numbers"
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, again, other = lora_a(small_cfg(), 1), lora_a(small_cfg(), 2), lora_a(small_cfg(seed=1), 1)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


def test_finetune_with_feature_maps_trains_both():
    cfg = small_cfg(**{"finetune.train_feature_maps": "true"})
    model = converted_tiny(cfg)
    before = snapshot(model)
    peft_model, _ = finetune.run(model, cfg, random_data())
    after = {n.replace("base_model.model.", ""): p for n, p in peft_model.named_parameters()}
    assert any(not torch.equal(before[n], after[n]) for n in before if ".hybrid." in n)


def test_finetune_targets_and_layers_from_config():
    cfg = small_cfg(**{"finetune.lora.target_modules": "[q_proj,v_proj]", "finetune.lora.layers": "[1]"})
    peft_model, _ = finetune.run(converted_tiny(cfg), cfg, random_data(), out_dir=None)
    lora = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(lora) == 2 and all(".layers.1." in n for n in lora)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"}


def test_finetune_stops_early_without_improvement():
    cfg = small_cfg(**{"finetune.max_steps": 40, "finetune.eval_every": 1, "finetune.patience": 2, "finetune.lr": 0.0})
    _, metrics = finetune.run(converted_tiny(cfg), cfg, random_data())
    assert metrics["finetune/stopped_early"] == 1.0 and metrics["finetune/steps"] == 3


def test_packing_and_alpaca_prompt():
    tok = byte_tokenizer()
    record = {"instruction": "Add.", "input": "1 2", "output": "3"}
    text = format_alpaca(record)
    assert "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n3" in text
    assert "### Input" not in format_alpaca({"instruction": "Hi.", "input": "", "output": "Hello"})
    chunks = pack([text, text], tok, 16)
    n_tokens = 2 * (len(text.encode()) + 1)
    assert chunks.shape == (n_tokens // 16, 16)
    assert (chunks == tok.eos_token_id).sum() >= 1
