"""One comparison for every kernel test: max abs error and relative RMS error against a reference, with the
tolerances per dtype kept here (they only ever tighten)."""

from __future__ import annotations

import torch

# dtype of the tested path -> (relative RMS error, max abs error relative to the reference's max magnitude)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),  # fp32 math vs the fp32 naive reference; the GPU runs fp32 dots as IEEE
    torch.bfloat16: (1.5e-2, 6e-2),  # bf16 operands of tensor-core dots, fp32 accumulation
    torch.float16: (5e-3, 2e-2),
}

# Gradients that are sums over all positions (dgamma) are judged by the error relative to the summed magnitude of
# their terms: the terms cancel heavily (exactly, when gamma cancels: softmax alone, or T <= w), so the error
# relative to the result itself says nothing about the kernel. Measured (bf16 emulation): errors ~2e-4 of that
# magnitude, while |dgamma| itself is ~4e-3 of it, so a wrong dgamma cannot pass.
SUM_TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-3,
    torch.float16: 3e-4,
}


def errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative RMS error ||out - ref|| / ||ref||), computed in float64."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    diff = out64 - ref64
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel_rms = (diff.norm() / ref64.norm().clamp_min(1e-30)).item()
    return max_abs, rel_rms


def assert_close(
    name: str, ref: torch.Tensor | None, out: torch.Tensor | None, dtype: torch.dtype, scale: float | None = None
) -> None:
    """Fail with both error measures when ``out`` strays from ``ref`` beyond the tolerance of ``dtype``.

    None stands for a gradient autograd did not produce (input unused): both sides must agree on it.
    ``scale``: for a sum over positions, the summed magnitude of its terms; then max abs err must stay under
    ``SUM_TOLERANCES[dtype] * scale`` instead.
    """
    if ref is None or out is None:
        assert ref is None and out is None, f"{name}: reference is {'None' if ref is None else 'set'}, output is " \
                                            f"{'None' if out is None else 'set'}"
        return
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the output"
    rms_tol, abs_tol = TOLERANCES[dtype]
    max_abs, rel_rms = errors(ref, out)
    if scale is not None:
        tol = SUM_TOLERANCES[dtype] * scale
        msg = (f"{name}: max abs err {max_abs:.3e} (tol {tol:.3e} = {SUM_TOLERANCES[dtype]:.0e} x summed term "
               f"magnitude {scale:.3e}), rel RMS err {rel_rms:.3e}, dtype {dtype}")
        assert max_abs <= tol, msg
        return
    scale = max(ref.detach().abs().max().item(), 1e-30)
    msg = (f"{name}: max abs err {max_abs:.3e} (tol {abs_tol * scale:.3e}), rel RMS err {rel_rms:.3e} "
           f"(tol {rms_tol:.1e}), dtype {dtype}")
    assert rel_rms <= rms_tol and max_abs <= abs_tol * scale, msg
