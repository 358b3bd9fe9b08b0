"""NF4 dequantization: the dense weight in a float dtype, bit-identical to bitsandbytes.

    lowrank.ops.nf4_dequantize(nf4_weight, dtype=None)

Triton path (`lowrank.backend.backend_for`): one launch of `lowrank.kernels.nf4_dequant`;
reference path: `NF4Weight.dequantize`, pure torch. Not differentiable (the weight is frozen).

Level 2: imports torch and levels 0-1 (the kernel only on the Triton path: Triton is optional).
"""
from __future__ import annotations

import torch

from lowrank.backend import backend_for
from lowrank.nf4_format import NF4Weight


def nf4_dequantize(nf4_weight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out_features, in_features) weight in `dtype` (default: the quantized weight's)."""
    if not isinstance(nf4_weight, NF4Weight):
        raise TypeError(f"nf4_dequantize: nf4_weight must be a lowrank.NF4Weight, got {type(nf4_weight).__name__}")
    if backend_for(nf4_weight.packed) == "triton":
        from lowrank.kernels import nf4_dequant  # the Triton path only: Triton is optional

        return nf4_dequant.dequantize(nf4_weight, dtype)
    return nf4_weight.dequantize(dtype)
