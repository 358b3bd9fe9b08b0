"""Public differentiable ops and their device dispatch.

Dispatch (DESIGN.md):
- CUDA tensors go to the Triton kernels (when Triton is importable);
- CPU tensors go to the pure-torch reference (`lowrank.reference`);
- LOWRANK_BACKEND=triton forces the Triton kernels for CPU tensors too (run them under
  TRITON_INTERPRET=1), LOWRANK_BACKEND=reference forces the reference everywhere.
A missing Triton degrades to the reference path with one warning.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference

BACKENDS = ("auto", "triton", "reference")
# The kernels take the three training dtypes; the reference path also takes float64 (gradient checks).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


_triton_ok: bool | None = None  # a plain global, not lru_cache: torch.compile traces through it quietly


def triton_available() -> bool:
    """Whether Triton and lowrank.kernels import (checked once; one warning when they do not)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            from . import kernels  # noqa: F401
            _triton_ok = True
        except Exception as exc:  # ImportError, or a broken Triton install
            warnings.warn(f"lowrank: Triton unavailable ({exc}); using the pure-torch reference path",
                          RuntimeWarning, stacklevel=2)
            _triton_ok = False
    return _triton_ok


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'reference' for an op whose main input is t."""
    choice = os.environ.get("LOWRANK_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"LOWRANK_BACKEND={choice!r}; expected one of {BACKENDS}")
    if choice == "reference":
        return "reference"
    if choice == "triton" or t.is_cuda:
        return "triton" if triton_available() else "reference"
    return "reference"


def check_lora_args(x, weight, lora_A, lora_B, bias=None, where: str = "lora_linear") -> None:
    """Shape, dtype and device checks shared by the LoRA ops; TypeError/ValueError naming the culprit."""
    if x.dim() < 1:
        raise ValueError(f"{where}: x must have at least one dimension, got a scalar")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{where}: weight, lora_A and lora_B must be 2-D, got shapes "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    n, k = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"{where}: x has {x.shape[-1]} features (shape {tuple(x.shape)}), weight expects {k} "
                         f"(weight shape {tuple(weight.shape)})")
    if tuple(lora_A.shape) != (r, k):
        raise ValueError(f"{where}: lora_A must be (rank, {k}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"{where}: lora_B must be ({n}, {r}) for weight {tuple(weight.shape)} and "
                         f"lora_A {tuple(lora_A.shape)}, got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias must be ({n},), got {tuple(bias.shape)}")
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"{where}: all tensors must share one dtype, got {dtypes}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype {x.dtype} is not supported; use float32, float16 or bfloat16 "
                        f"(float64 on the reference path)")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {devices}")


def autocast_inputs(x, *tensors):
    """x and tensors cast to the autocast dtype of x's device (None and non-float tensors kept)."""
    dtype = torch.get_autocast_dtype(x.device.type)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors)]


def lora_linear(x, weight, lora_A, lora_B, scaling: float, bias=None, dropout: float = 0.0):
    """y = x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T, differentiable.

    x: (..., K), any strides; weight: (N, K), frozen (no gradient is computed for it);
    lora_A: (r, K); lora_B: (N, r); bias: (N,) or None, frozen. Pass dropout=0.0 in eval mode.
    """
    if torch.is_autocast_enabled(x.device.type):
        # Autocast treats this op as it treats F.linear: every float input cast to the autocast
        # dtype (differentiably, so fp32 adapter parameters still get fp32 gradients).
        x, weight, lora_A, lora_B, bias = autocast_inputs(x, weight, lora_A, lora_B, bias)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout)
    check_lora_args(x, weight, lora_A, lora_B, bias)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout}")
    if backend_for(x) == "triton":
        # Fused kernels (kernels/lora_matmul.py), a torch.library custom op with autograd; ranks
        # above 128 and a weight or bias that needs a gradient stay on the reference path.
        from .kernels import lora_matmul

        if lora_matmul.supported(x, weight, lora_A, bias):
            return lora_matmul.lora_linear(x, weight, lora_A, lora_B, float(scaling), bias, float(dropout))
    return reference.lora_linear(x, weight, lora_A, lora_B, float(scaling), bias, dropout)


def nf4_lora_linear(x, nf4_weight, lora_A, lora_B, scaling: float, bias=None, dropout: float = 0.0):
    """QLoRA: y = x @ deq(W).T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T, differentiable.

    nf4_weight: a `lowrank.NF4Weight` (N, K), frozen; x: (..., K) in the compute dtype (float32,
    float16 or bfloat16); lora_A (r, K) and lora_B (N, r) are cast to x's dtype (their gradients
    come back in their own dtype, e.g. float32 master weights); bias: (N,) or None, frozen.
    Triton (CUDA): W is decoded tile by tile inside the GEMMs, never as a dense copy. Reference
    (CPU): W is dequantized inside the forward and again inside the backward, never kept between.
    """
    from .nf4 import NF4Weight

    if torch.is_autocast_enabled(x.device.type):
        # As lora_linear (and bitsandbytes' 4-bit matmul, whose F.linear autocast casts): x, the
        # adapters and the bias in the autocast dtype; the 4-bit weight is decoded straight to it.
        x, lora_A, lora_B, bias = autocast_inputs(x, lora_A, lora_B, bias)
        with torch.autocast(x.device.type, enabled=False):
            return nf4_lora_linear(x, nf4_weight, lora_A, lora_B, scaling, bias, dropout)
    if not isinstance(nf4_weight, NF4Weight):
        raise TypeError(f"nf4_lora_linear: nf4_weight must be a lowrank.NF4Weight, got {type(nf4_weight).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"nf4_lora_linear: x dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    if x.device != nf4_weight.device:
        raise ValueError(f"nf4_lora_linear: x is on {x.device}, the NF4 weight on {nf4_weight.device}")
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    n, k = nf4_weight.shape
    # Shape checks against a (N, K) stand-in: the NF4 weight has no dense tensor to check.
    check_lora_args(x, x.new_empty(()).expand(n, k), lora_A, lora_B, bias, where="nf4_lora_linear")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"nf4_lora_linear: dropout must be in [0, 1), got {dropout}")
    # One torch.library op for both backends (lowrank/nf4_op.py): saves only the 4-bit storage for
    # backward (no dense W on any path) and traces under torch.compile.
    from .nf4_op import nf4_lora_linear as _nf4_op

    return _nf4_op(x, nf4_weight, lora_A, lora_B, float(scaling), bias, float(dropout))


def __getattr__(name: str):
    """`lowrank.ops.merge_` / `lowrank.ops.unmerge_`: the merge custom ops, defined in
    lowrank/merge.py (imported lazily: merge.py imports layers.py, which imports this module)."""
    if name in ("merge_", "unmerge_"):
        import importlib

        return getattr(importlib.import_module("lowrank.merge"), name)
    raise AttributeError(f"module 'lowrank.ops' has no attribute {name!r}")
