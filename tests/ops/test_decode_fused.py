"""Fused single-token decode step (decode_fused.py) against the PyTorch reference step (decode.py).

The reference is what ``linearize.cache.attend_recurrent`` does for one new token: ``hybrid_attention_decode`` over
the w cached keys (oldest first) plus the new key with the state as it was, then ``hybrid_state_update`` with the key
that leaves the window; the reference keeps its window as an ordinary list, the kernel a ring buffer. Each test runs
many steps from an empty cache, so the ring wraps several times, early steps have fewer than w keys, and padded
tokens (left padding: the first tokens of one row) must enter neither the window nor the state. Compared every step:
the output, S, z, the ring contents and the position counter. On CPU the kernel runs under TRITON_INTERPRET=1 (set
before the module is imported); on a machine with CUDA these run compiled on the GPU, and the ``gpu`` tier adds the
benchmark's real shapes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_triton_module
from omegaconf import OmegaConf

from linearize.attention import FeatureMap
from linearize.kernels.hybrid_attention.decode import hybrid_attention_decode, hybrid_state_update
from linearize.kernels.hybrid_attention.naive import repeat_kv

from ._testing import assert_close

CUDA = torch.cuda.is_available()





fused = load_triton_module("decode_fused", interpret=not CUDA)
pytestmark = pytest.mark.skipif(fused is None, reason="triton is not installed")
DEVICE = "cuda" if CUDA else "cpu"

MODES = {  # name -> (softmax, linear, attend)
    "hybrid": (True, "outside", True),
    "overlap": (True, "all", True),
    "la_only": (False, "all", True),
    "swa_only": (True, "none", True),
    "no_attention": (True, "outside", False),
}
FEATURE_MAPS = {  # name -> FeatureMap config (feature_dim 8)
    "hedgehog": dict(activation="softmax", signed=True, bias=False, projection=True),
    "exp-signed": dict(activation="exp", signed=True, bias=False, projection=True),
    "relu-bias": dict(activation="relu", signed=False, bias=True, projection=True),
    "elu-noproj": dict(activation="elu", signed=False, bias=False, projection=False),
    "identity": dict(activation="identity", signed=True, bias=True, projection=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Triton reads TRITON_INTERPRET again when a launch first imports its gluon modules: keep it set meanwhile."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def feature_maps(H, D, fmap, seed, feature_dim=8):
    cfg = OmegaConf.create(dict(name=fmap["activation"], feature_dim=feature_dim, match_head_dim=False, **fmap))
    g = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(2):
        m = FeatureMap(H, D, cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        maps.append(m.to(DEVICE))
    return maps


def run_steps(B, H, Hkv, D, w, n_steps, mode, fmap, dtype, pad=(0, 3), seed=0, gamma=True, feature_dim=8):
    """n_steps fused steps vs the reference from an empty cache; row b's first pad[b] tokens are padding."""
    softmax, linear, attend = MODES[mode]
    q_map, k_map = feature_maps(H, D, FEATURE_MAPS[fmap], seed, feature_dim)
    F = k_map.out_features
    g = torch.Generator().manual_seed(seed + 1)
    theta = torch.randn(H, generator=g).to(DEVICE) if gamma else None
    R = w + 1
    keys = torch.zeros(B, Hkv, R, D, dtype=dtype, device=DEVICE)
    values = torch.zeros_like(keys)
    valid = torch.zeros(B, R, dtype=torch.bool, device=DEVICE)
    pos = torch.zeros(B, H, dtype=torch.int64, device=DEVICE)
    S = torch.zeros(B, H, F, D, device=DEVICE)
    z = torch.zeros(B, H, F, device=DEVICE)
    # reference: the window as a list (oldest first), padded with invalid zero keys to w entries
    rk, rv = (
        torch.zeros(B, w, Hkv, D, dtype=dtype, device=DEVICE),
        torch.zeros(B, w, Hkv, D, dtype=dtype, device=DEVICE),
    )
    rvalid = torch.zeros(B, w, dtype=torch.bool, device=DEVICE)
    rS, rz = S.clone(), z.clone()
    scale = D**-0.5
    with torch.no_grad():
        for t in range(n_steps):
            q = torch.randn(B, 1, H, D, generator=g).to(DEVICE, dtype)
            k = torch.randn(B, 1, Hkv, D, generator=g).to(DEVICE, dtype)
            v = torch.randn(B, 1, Hkv, D, generator=g).to(DEVICE, dtype)
            new_valid = torch.tensor([t >= p for p in pad], device=DEVICE)
            # reference step
            kc, vc = torch.cat([rk, k], 1), torch.cat([rv, v], 1)
            vc_valid = torch.cat([rvalid, new_valid[:, None]], 1)
            k_feat = k_map(repeat_kv(kc, H))
            if attend:
                ref = hybrid_attention_decode(
                    q, kc, vc, q_map(q) if linear != "none" else None, k_feat if linear != "none" else None,
                    None if theta is None else torch.sigmoid(theta), (rS, rz), vc_valid, window=w, softmax=softmax,
                    linear=linear, scale=scale,
                )  # fmt: skip
            else:
                ref = torch.zeros(B, 1, H, D, dtype=dtype, device=DEVICE)
            hybrid_state_update(rS, rz, k_feat[:, :1], vc[:, :1], vc_valid[:, :1])
            rk, rv, rvalid = kc[:, 1:], vc[:, 1:], vc_valid[:, 1:]
            # fused step
            out = fused.hybrid_decode_step(
                q, k, v, new_valid if any(pad) else None, (keys, values, valid, pos), (S, z),
                (q_map.weight, q_map.bias), (k_map.weight, k_map.bias), theta, window=w,
                activation=FEATURE_MAPS[fmap]["activation"], signed=FEATURE_MAPS[fmap]["signed"], softmax=softmax,
                linear=linear, attend=attend, scale=scale,
            )  # fmt: skip
            label = f"{mode}-{fmap}-step{t}"
            assert out.dtype == dtype
            if attend:
                assert_close(f"{label} out", ref, out, dtype)
            else:
                assert torch.equal(out, ref), f"{label}: no_attention output is not zero"
            assert_close(f"{label} S", rS, S, torch.float32)
            assert_close(f"{label} z", rz, z, torch.float32)
            assert (pos == t + 1).all(), f"{label}: position counter {pos.tolist()}"
            idx = (t + 1 - w + torch.arange(w, device=DEVICE)) % R  # ring slots of the reference window
            assert torch.equal(keys[:, :, idx].transpose(1, 2), rk), f"{label}: ring keys"
            assert torch.equal(values[:, :, idx].transpose(1, 2), rv), f"{label}: ring values"
            assert torch.equal(valid[:, idx], rvalid), f"{label}: ring validity"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_step_matches_reference_modes(mode, dtype):
    """Hedgehog map, GQA 4/2, w = 5 (not a power of two), 13 steps: the ring wraps twice; row 1 left-padded."""
    run_steps(B=2, H=4, Hkv=2, D=16, w=5, n_steps=13, mode=mode, fmap="hedgehog", dtype=DTYPES[dtype])


@pytest.mark.parametrize("fmap", [f for f in FEATURE_MAPS if f != "hedgehog"])
def test_fused_step_feature_maps(fmap):
    """The other FeatureMap variants, in the overlap layout (phi of every window key and of the evicted key)."""
    run_steps(B=2, H=4, Hkv=2, D=16, w=5, n_steps=9, mode="overlap", fmap=fmap, dtype=torch.float32, seed=3)


@pytest.mark.parametrize("H,Hkv,D,w", [(3, 1, 32, 4), (2, 2, 16, 16), (6, 3, 64, 7)])
def test_fused_step_shapes(H, Hkv, D, w):
    """MQA, no GQA, and D = 64 (two Dv blocks of 32); no padding, no gamma."""
    run_steps(B=1, H=H, Hkv=Hkv, D=D, w=w, n_steps=2 * w + 3, mode="hybrid", fmap="hedgehog", dtype=torch.float32,
              pad=(0,), gamma=False)  # fmt: skip


def test_all_padding_row_gives_zero_softmax_output():
    """A row whose every key so far is padding: swa_only output is exactly 0 (no NaN), as in the reference."""
    run_steps(B=2, H=2, Hkv=1, D=16, w=4, n_steps=6, mode="swa_only", fmap="hedgehog", dtype=torch.float32,
              pad=(0, 5))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
@pytest.mark.parametrize("mode", ["hybrid", "overlap"])
@pytest.mark.parametrize("shape", ["smollm2", "mistral"])
def test_fused_step_real_shapes_gpu(shape, mode):
    """The benchmark's shapes compiled on the GPU, bf16: w = 64, Hedgehog 2 x 64 features, 140 steps (two wraps)."""
    H, Hkv, D = {"smollm2": (9, 3, 64), "mistral": (32, 8, 128)}[shape]
    run_steps(B=2, H=H, Hkv=Hkv, D=D, w=64, n_steps=140, mode=mode, fmap="hedgehog", dtype=torch.bfloat16,
              feature_dim=64)  # fmt: skip
