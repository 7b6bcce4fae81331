"""Mixed precision for the pack's trainers: bf16 compute, fp32 trainable tensors and optimizer.

The frozen model keeps its weights as they are; inside :func:`compute_precision` matmuls, convolutions
and attention run in bf16 (torch autocast casts their inputs per op), so the activations kept for the
backward pass are half the size and the CPU's bf16 units do the work. Trainable tensors, their
gradients and AdamW's moments stay fp32 (autocast never changes a parameter's dtype), and losses are
computed in fp32 by the trainers. This is the usual mixed-precision recipe of LoRA trainers; ComfyUI's
own TrainLoraNode trains in bf16 by default too.

``"auto"`` picks bf16 where the hardware runs it natively (CUDA with bf16 support; a CPU with
AVX512-BF16 or AMX) and fp32 elsewhere, where emulated bf16 would be slower.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import InvalidInputError

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(bool(check()) for check in checks if check is not None)
    return False


def check_precision(precision: str) -> str:
    """``precision`` if it is a known setting, else InvalidInputError."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    return precision


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for a precision setting on ``device``; None = plain fp32."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"bf16 training is supported on CPU and CUDA, not on {device.type}; use fp32.")
    return torch.bfloat16


@contextlib.contextmanager
def compute_precision(dtype: torch.dtype | None, device: torch.device | str) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``'s type (nothing when ``dtype`` is None)."""
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield
