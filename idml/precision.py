"""Which floating-point precision the backbone computes in.

bf16 autocast roughly halves the backbone's cost where the hardware computes bf16 natively:
CUDA GPUs with bf16, and CPUs with AVX512-BF16 or AMX (oneDNN's bf16 kernels; on a 2-core
AVX512-BF16 machine a Lite0 training step at 128 px, batch 64, ran 1.2x faster at best and
inference 2-3x, fp32 and bf16 timed alternately in one process by a throwaway probe). Elsewhere bf16 is emulated and slower, so ``auto`` keeps
fp32 there. Only the backbone runs under autocast: the heads, the uncertainty norm and the
losses run in fp32 (``IDMLModel.forward``), so embeddings and losses keep full precision.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: fp32, no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
