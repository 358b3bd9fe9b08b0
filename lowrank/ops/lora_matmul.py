"""The LoRA linear op: y = x @ W.T + bias + s * dropout(x) @ A.T @ B.T, differentiable in x, A, B.

    lowrank.ops.lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout=0.0)

Two implementations behind one entry, chosen by `lowrank.backend.backend_for(x)`:
- triton (CUDA, or LOWRANK_BACKEND=triton under the interpreter): the fused kernels of
  `lowrank.kernels.lora_matmul`, wrapped as the torch.library custom ops
  `lowrank::lora_linear_fwd` / `lowrank::lora_linear_bwd` (with fake implementations and
  autograd), so torch.compile traces them without a graph break;
- reference (CPU, float64, rank > 128, or a weight that needs a gradient): `lora_linear_reference`,
  plain torch ops in the input dtype, with no M x N temporary beyond the output (the LoRA term is
  accumulated into the base GEMM's output with `addmm_`) and, in the LoRA training case, a
  backward written for the fewest passes over memory (`_LoRAReference`; autograd otherwise).

Level 2: imports torch and levels 0-1 (the kernels only on the Triton path: Triton is optional).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lowrank.backend import backend_for
from lowrank.dtypes import check_dtype


def _kernels():
    """`lowrank.kernels.lora_matmul`, imported on the Triton path only (Triton is optional)."""
    from lowrank.kernels import lora_matmul

    return lora_matmul


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
    check_dtype(x.dtype, where, "x dtype", float64=True)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {devices}")


def check_dropout(dropout: float, where: str) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: dropout must be in [0, 1), got {dropout}")


def autocast_inputs(x, *tensors):
    """x and tensors cast to the autocast dtype of x's device (None and non-float tensors kept)."""
    dtype = torch.get_autocast_dtype(x.device.type)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors)]


def lora_linear(x, weight, lora_A, lora_B, scaling: float, bias=None, dropout: float = 0.0):
    """y = x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T, differentiable.

    x: (..., K), any strides; weight: (N, K), frozen (no gradient is computed for it on the
    kernel path); lora_A: (r, K); lora_B: (N, r); bias: (N,) or None. Pass dropout=0.0 in eval mode.
    """
    if torch.is_autocast_enabled(x.device.type):
        # Autocast treats this op as it treats F.linear: every float input cast to the autocast
        # dtype (differentiably, so fp32 adapter parameters still get fp32 gradients).
        x, weight, lora_A, lora_B, bias = autocast_inputs(x, weight, lora_A, lora_B, bias)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout)
    check_lora_args(x, weight, lora_A, lora_B, bias)
    check_dropout(dropout, "lora_linear")
    if backend_for(x) == "triton" and supported(x, weight, lora_A, bias):
        seed = _kernels().draw_seed(x.device) if dropout > 0.0 else None
        y, _ = torch.ops.lowrank.lora_linear_fwd(x, weight, lora_A, lora_B, bias, seed, float(scaling),
                                                 float(dropout))
        return y
    return lora_linear_reference(x, weight, lora_A, lora_B, float(scaling), bias, dropout)


def supported(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, bias=None) -> bool:
    """Whether the kernels take these (checked) arguments; else the reference path runs.

    Not supported: float64, a rank above the kernels' MAX_RANK (128), an empty K or N, and a weight
    or bias that needs a gradient (the kernels treat W and bias as frozen).
    """
    if x.dtype == torch.float64:
        return False
    if lora_A.shape[0] > _kernels().MAX_RANK or weight.shape[0] == 0 or weight.shape[1] == 0:
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return True


def lora_linear_reference(x, weight, lora_A, lora_B, scaling: float, bias=None, dropout: float = 0.0):
    """The reference path: plain torch in x's dtype, differentiable.

    x: (..., K); weight: (N, K) (any strides); lora_A: (r, K); lora_B: (N, r); bias: (N,).
    Dropout (a fresh torch mask, p=dropout) applies to the LoRA branch only, as in peft.

    Without dropout, with a frozen weight and bias (the LoRA training case) the backward is written
    out (`_LoRAReference`) for the fewest passes over memory; otherwise autograd differentiates the
    same forward. Passes over the M-row activations beyond the frozen layer's forward (read x and W,
    write y) and input gradient (read dY and W, write dX): forward, read x for T = x @ A.T and
    read+write y for y += s T @ B.T; backward, read dY twice (dT = s dY @ B, dB = s dY.T @ T), read x
    once (dA = dT.T @ x) and read+write dX once (dX += dT @ A, in place): 8 passes over an (M, K) or
    (M, N) activation, no (M, K) temporary. Autograd's own graph for the same forward allocates dT @ A
    as a fresh (M, K) buffer and adds it to dY @ W: two passes and a page-faulting allocation more.
    """
    if (dropout == 0.0 and scaling != 0.0 and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and torch.is_grad_enabled()
            and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)):
        return _LoRAReference.apply(x, weight, lora_A, lora_B, bias, scaling)
    if scaling == 0.0:
        return F.linear(x, weight, bias)
    h = F.dropout(x, dropout, training=True) if dropout > 0.0 else x
    return _lora_forward_into(x, h, weight, lora_A, lora_B, bias, scaling)[0]


def _lora_forward_into(x, h, weight, lora_A, lora_B, bias, scaling: float):
    """(y, T): y = x @ W.T + bias + s T @ B.T with T = h @ A.T (h: x or dropout(x)), the LoRA term
    added into y in place: y (..., N) is the only M x N buffer."""
    out = F.linear(x, weight, bias)
    t = F.linear(h, lora_A)  # (..., r)
    if not out.is_contiguous():
        out = out.contiguous()
    out.view(-1, out.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]), lora_B.t(), alpha=scaling)
    return out, t


class _LoRAReference(torch.autograd.Function):
    """`lora_linear_reference` without dropout, W and bias frozen: the backward in place (see there)."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling):
        out, t = _lora_forward_into(x, x, weight, lora_A, lora_B, bias, scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t)
        ctx.scaling = scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, weight.shape[0])
        dx, d_a, d_b = lora_input_grads(dy2, x, weight, lora_A, lora_B, t, ctx.scaling, need_x, need_a, need_b)
        d_bias = dy2.sum(0) if need_bias else None
        return dx, None, d_a, d_b, d_bias, None


def lora_input_grads(g, x, weight, lora_A, lora_B, t, scaling: float, need_x: bool, need_a: bool, need_b: bool):
    """(dX, dA, dB) of y = x W^T + s (x A^T) B^T for the output gradient g (M, N), W frozen, t = x A^T
    saved from forward: dT = s g B, dA = dT^T x, dB = s g^T t, dX = g W then += dT A in place (no
    (M, K) temporary beyond dX). None where not needed. DoRA's backward calls it with g = dY (.) scale."""
    n, k = weight.shape
    dt = torch.mm(g, lora_B).mul_(scaling)  # (M, r), rounded as autograd's addmm backward rounds it
    d_a = torch.mm(dt.t(), x.reshape(-1, k)) if need_a else None
    d_b = torch.mm(g.t(), t.reshape(-1, t.shape[-1])).mul_(scaling) if need_b else None
    dx = None
    if need_x:
        dx = torch.mm(g, weight)
        dx.addmm_(dt, lora_A)
        dx = dx.view(x.shape)
    return dx, d_a, d_b


# -- the custom ops over the kernels -----------------------------------------------------------------
def _flat(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (M, C): a view when the strides allow it, else a copy."""
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("lowrank::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], scaling: float,
                    dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (..., N), T (M, r) fp32): the kernels' forward on x flattened to 2-D."""
    y, t = _kernels().lora_forward(_flat(x), weight, lora_A, lora_B, scaling, bias, dropout, seed)
    return y.view(*x.shape[:-1], weight.shape[0]), t


@lora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, seed, scaling, dropout):
    m = math.prod(x.shape[:-1])
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((m, lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("lowrank::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, t: torch.Tensor, seed: Optional[torch.Tensor], scaling: float,
                    dropout: float, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX shaped like x, or an empty (0,) tensor when need_dx is False; dA; dB)."""
    dx, da, db = _kernels().lora_backward(_flat(dy), _flat(x), weight, lora_A, lora_B, t, scaling, dropout, seed,
                                          need_dx)
    dx = dx.view(x.shape) if need_dx else x.new_empty((0,))
    return dx, da, db


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, t, seed, scaling, dropout, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, seed, scaling, dropout = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout = scaling, dropout


def _backward(ctx, dy, _dt):
    x, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = torch.ops.lowrank.lora_linear_bwd(dy, x, weight, lora_A, lora_B, t, seed, ctx.scaling,
                                                   ctx.dropout, need_dx)
    return (dx if need_dx else None), None, da, db, None, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
