"""The floating-point dtypes lowrank computes in, and the one error for any other dtype.

Level 0: imports torch only.
"""
from __future__ import annotations

import torch

# What the kernels, the NF4 format, the merge library and the QLoRA compute dtype take.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The pure-torch LoRA path also takes float64 (gradient checks, float64 oracles of whole models).
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_dtype(dtype: torch.dtype, where: str, what: str = "dtype", float64: bool = False) -> None:
    """TypeError naming `where` and `what` unless dtype is float32, float16 or bfloat16 (or float64
    when the caller's path takes it)."""
    if isinstance(dtype, torch.dtype) and dtype in (FLOAT_DTYPES if float64 else KERNEL_DTYPES):
        return
    also = " (float64 on the reference path)" if float64 else ""
    if not isinstance(dtype, torch.dtype):  # e.g. the string "float32": torch.float32 was meant
        raise TypeError(f"{where}: {what} must be a torch.dtype (torch.float32, torch.float16 or torch.bfloat16"
                        f"{also}), got {type(dtype).__name__} {dtype!r}")
    raise TypeError(f"{where}: {what} {dtype} is not supported; use float32, float16 or bfloat16{also}")
