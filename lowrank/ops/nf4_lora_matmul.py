"""The QLoRA op: y = x @ deq(W).T + bias + s * dropout(x) @ A.T @ B.T with W stored as NF4.

    lowrank.ops.nf4_lora_linear(x, nf4_weight, lora_A, lora_B, scaling, bias=None, dropout=0.0)

One pair of torch.library custom ops, `lowrank::nf4_lora_fwd` / `lowrank::nf4_lora_bwd`, for both
backends (`lowrank.backend.backend_for(x)`): on the Triton path W is decoded tile by tile inside
the GEMMs (`lowrank.kernels.nf4_lora_matmul`); on the CPU the native library decodes tiles of
about 16 MiB (at least 512 rows / columns wide: see TILE_BYTES) into one reused buffer that torch's
GEMM consumes (forward: tiles of rows; backward's dX: tiles of whole-block columns), or for
M <= 8 decodes and multiplies in one pass (`_cpu_forward`, `_cpu_input_grad`); without the native
library W is dequantized inside the forward and again inside the backward. W is decoded again in
backward, never kept from forward. Why custom ops and not an
autograd.Function over `lora_linear_reference`:
- memory: autograd around `F.linear(x, deq(W))` saves the dense W from forward to backward (for a
  4096 x 4096 bf16 layer that is 32 MiB held per layer, 8x the 4-bit storage it came from).
  Here only the weight's own 4-bit storage is saved; the fp32 block scales are recomputed in
  forward and in backward (they are 1/16 of a bf16 weight's bytes), never kept between.
- torch.compile: the ops carry fake (meta) implementations, so a compiled QLoRA model traces
  through them without a graph break (the NF4Weight dataclass is unpacked into tensors outside).
Dropout: the keep multiplier (0 or 1/(1-p), x's dtype, shaped (M, K)) is drawn outside the ops
(`dropout_keep`, from torch's generator), so both backends apply the same mask.

Level 2: imports torch and levels 0-2 (the kernels only on the Triton path: Triton is optional).
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from lowrank.backend import backend_for
from lowrank.dtypes import check_dtype
from lowrank.nf4_format import NF4Weight

from .lora_matmul import autocast_inputs, check_dropout, check_lora_args


def _kernels():
    """`lowrank.kernels.nf4_lora_matmul`, imported on the Triton path only (Triton is optional)."""
    from lowrank.kernels import nf4_lora_matmul

    return nf4_lora_matmul


def nf4_lora_linear(x, nf4_weight, lora_A, lora_B, scaling: float, bias=None, dropout: float = 0.0):
    """QLoRA: y = x @ deq(W).T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T, differentiable.

    nf4_weight: a `lowrank.NF4Weight` (N, K), frozen; x: (..., K) in the compute dtype (float32,
    float16 or bfloat16); lora_A (r, K) and lora_B (N, r) are cast to x's dtype (their gradients
    come back in their own dtype, e.g. float32 master weights); bias: (N,) or None, frozen.
    """
    if torch.is_autocast_enabled(x.device.type):
        # As lora_linear (and bitsandbytes' 4-bit matmul, whose F.linear autocast casts): x, the
        # adapters and the bias in the autocast dtype; the 4-bit weight is decoded straight to it.
        x, lora_A, lora_B, bias = autocast_inputs(x, lora_A, lora_B, bias)
        with torch.autocast(x.device.type, enabled=False):
            return nf4_lora_linear(x, nf4_weight, lora_A, lora_B, scaling, bias, dropout)
    if not isinstance(nf4_weight, NF4Weight):
        raise TypeError(f"nf4_lora_linear: nf4_weight must be a lowrank.NF4Weight, got {type(nf4_weight).__name__}")
    check_dtype(x.dtype, "nf4_lora_linear", "x dtype")
    if x.device != nf4_weight.device:
        raise ValueError(f"nf4_lora_linear: x is on {x.device}, the NF4 weight on {nf4_weight.device}")
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    n, k = nf4_weight.shape
    # Shape checks against a (N, K) stand-in: the NF4 weight has no dense tensor to check.
    check_lora_args(x, x.new_empty(()).expand(n, k), lora_A, lora_B, bias, where="nf4_lora_linear")
    check_dropout(dropout, "nf4_lora_linear")
    w = nf4_weight
    keep = dropout_keep(x.reshape(-1, k), dropout) if dropout > 0.0 else None
    y, _ = torch.ops.lowrank.nf4_lora_fwd(x, w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, lora_A,
                                          lora_B, bias, keep, float(scaling), w.blocksize, w.nested_blocksize, n)
    return y


def dropout_keep(x2: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p), in x's dtype): keep each element with probability 1 - p,
    drawn from torch's generator for x's device."""
    return torch.empty_like(x2).bernoulli_(1.0 - p) * (1.0 / (1.0 - p))


def _weight(packed, absmax, nested_absmax, nested_code, offset, n: int, k: int, blocksize: int,
            nested_blocksize: int, dtype: torch.dtype) -> NF4Weight:
    """The NF4Weight these tensors are (no copy)."""
    return NF4Weight(packed, absmax, (n, k), dtype, blocksize, nested_absmax, nested_code, offset, nested_blocksize)


@torch.library.custom_op("lowrank::nf4_lora_fwd", mutates_args=())
def nf4_lora_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                 nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], lora_A: torch.Tensor,
                 lora_B: torch.Tensor, bias: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                 scaling: float, blocksize: int, nested_blocksize: int,
                 out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (..., N), T = dropout(x) @ A.T (M, r) in x's dtype). A rank-0 adapter is the plain NF4 linear."""
    n, k = out_features, x.shape[-1]
    x2 = x.reshape(-1, k)
    w = _weight(packed, absmax, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize, x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # the caller already chose the dtype
        h = x2 if keep is None else x2 * keep
        t = h @ lora_A.t()  # (M, r), rounded to x's dtype as the reference does
        has_lora = lora_A.shape[0] > 0 and scaling != 0.0
        if backend_for(x) == "triton":
            y = _kernels().nf4_lora_matmul(x2, w, w.block_absmax(), True, t if has_lora else None,
                                           lora_B.t() if has_lora else None, scaling, bias)
        else:
            y = _cpu_forward(x2, w, bias, t if has_lora else None, lora_B, scaling)
            if y is None:  # no native library, or K not in whole blocks
                y = F.linear(x2, w.dequantize(x.dtype), bias)  # the dense W dies with this call
                if has_lora:
                    y.addmm_(t, lora_B.t(), alpha=scaling)
    return y.view(*x.shape[:-1], n), t


# -- the CPU path: the native library decodes (csrc/nf4_cpu.cpp), torch's GEMM multiplies ------------
SMALL_M = 8  # at most this many rows of x: decode and multiply in one pass (the 4-bit weight read once)
# The decoded tile. Its GEMM is one torch matmul per tile, and that call's efficiency, not the
# decode, sets the cost: measured on two Ice Lake cores (fp32, forward + dX, interleaved against
# the frozen dense layer), 4 MiB tiles (256 rows at K = 4096) cost 1.34-1.41x the frozen layer at
# 512x4096x4096 and 1.57x at 256x11008x4096 (down_proj), 16 MiB tiles 1.20x / 1.21-1.23x; torch's
# GEMM alone loses 17% at 256 output columns and 5-11% at 512 (M = 512-2048, K = 4096) against
# one full-width call. So a tile is about TILE_BYTES, and never narrower than MIN_TILE rows of W
# (forward) or columns (dX) unless W is.
TILE_BYTES = 16 << 20
MIN_TILE = 512
KEEP_BYTES = 32 << 20  # the largest tile buffer kept between calls (one per thread and dtype)


_scratch = threading.local()


def _tile_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of `numel` elements for decoded tiles, one per thread and dtype, kept between
    calls: a fresh buffer would cost page faults on every call, more than the decode itself. Only
    buffers up to KEEP_BYTES are kept (a tile is larger than TILE_BYTES when MIN_TILE rows or
    columns of W are: up to 32 MiB at K = 16384 in fp32; a vocabulary-sized layer's dX tiles can be
    larger), so a thread holds at most that per dtype."""
    if numel * dtype.itemsize > KEEP_BYTES:
        return torch.empty(numel, dtype=dtype)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _cpu_forward(x2, w: NF4Weight, bias, t, lora_B, scaling: float):
    """y = x2 @ deq(W).T + bias + scaling * t @ lora_B.T (t None: no LoRA term), or None when the
    native path does not apply. M <= SMALL_M: one fused decode-and-multiply pass in fp32, bias and
    LoRA added in fp32, rounded once to x's dtype (SMALL_M = 8: measured on two cores, the tiled
    path is as fast from M = 16 in fp32 and faster in bf16). Otherwise W is decoded a tile of rows
    at a time into one reused buffer of about TILE_BYTES (at least MIN_TILE rows), and each tile's
    output columns get the GEMM, the bias and the LoRA term while they are in cache: no dense copy
    of W is allocated and no fresh pages are touched per call (a full dequantize pays its page
    faults every time)."""
    m = x2.shape[0]
    n, k = w.shape
    if m <= SMALL_M:
        y = w.matmul_native(x2)
        if y is None:
            return None
        if bias is not None:
            y += bias
        if t is not None:
            y.addmm_(t.float(), lora_B.t().float(), alpha=scaling)
        return y.to(x2.dtype)
    rows = min(n, max(16, MIN_TILE, TILE_BYTES // (k * x2.element_size()) // 16 * 16))
    buf = _tile_buffer(rows * k, x2.dtype).view(rows, k)
    y = torch.empty((m, n), dtype=x2.dtype)
    for n0 in range(0, n, rows):
        n1 = min(n0 + rows, n)
        tile = buf[: n1 - n0]
        if not w.decode_tile_native((n0, n1), (0, k), tile):
            return None
        out = y[:, n0:n1]
        if bias is None:
            torch.mm(x2, tile.t(), out=out)
        else:
            torch.addmm(bias[n0:n1], x2, tile.t(), out=out)
        if t is not None:
            out.addmm_(t, lora_B[n0:n1].t(), alpha=scaling)
    return y


def _cpu_input_grad(dy2, w: NF4Weight, dt, lora_A):
    """dX = dy2 @ deq(W) + dt @ lora_A (dt None: no LoRA term), or None when the native path does
    not apply: W decoded a tile of whole-block columns at a time into one reused buffer, each tile's
    dX columns written by the GEMM and given the LoRA term while in cache."""
    n, k = w.shape
    bs = w.blocksize
    if k % bs:
        return None
    cols = min(k, max(2 * bs, -(-MIN_TILE // bs) * bs, TILE_BYTES // (n * dy2.element_size()) // bs * bs))
    buf = _tile_buffer(n * cols, dy2.dtype).view(n, cols)
    dx = torch.empty((dy2.shape[0], k), dtype=dy2.dtype)
    for c0 in range(0, k, cols):
        c1 = min(c0 + cols, k)
        tile = buf[:, : c1 - c0]
        if not w.decode_tile_native((0, n), (c0, c1), tile):
            return None
        out = dx[:, c0:c1]
        torch.mm(dy2, tile, out=out)
        if dt is not None:
            out.addmm_(dt, lora_A[:, c0:c1])
    return dx


@nf4_lora_fwd.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, bias, keep, scaling, blocksize,
      nested_blocksize, out_features):
    m = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((m, lora_A.shape[0]))


@torch.library.custom_op("lowrank::nf4_lora_bwd", mutates_args=())
def nf4_lora_bwd(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                 nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                 offset: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor, t: torch.Tensor,
                 keep: Optional[torch.Tensor], scaling: float, blocksize: int, nested_blocksize: int,
                 need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX shaped like x, or an empty (0,) tensor when need_dx is False; dA; dB).

    dT = s dY @ B, dB = s dY.T @ T, dA = dT.T @ H (H = dropout(x)); dX = dY @ deq(W) + dT @ A, the
    dT @ A term through the same dropout multiplier when there is one."""
    n, k = lora_B.shape[0], x.shape[-1]
    dy2 = dy.reshape(-1, n)
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    x2 = x.reshape(-1, k)
    with torch.autocast(x.device.type, enabled=False):
        h = x2 if keep is None else x2 * keep
        dt = (dy2 @ lora_B) * scaling  # (M, r)
        d_b = (dy2.t() @ t) * scaling
        d_a = dt.t() @ h
        if not need_dx:
            return x.new_empty((0,)), d_a, d_b
        w = _weight(packed, absmax, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize, x.dtype)
        fuse = keep is None and lora_A.shape[0] > 0
        if backend_for(x) == "triton":
            dx = _kernels().nf4_lora_matmul(dy2, w, w.block_absmax(), False, dt if fuse else None,
                                            lora_A if fuse else None, 1.0)
        else:
            dx = _cpu_input_grad(dy2, w, dt if fuse else None, lora_A)
            if dx is None:  # no native library, or K not in whole blocks
                dx = dy2 @ w.dequantize(x.dtype)  # decoded again: nothing dense was kept from forward
                if fuse:
                    dx.addmm_(dt, lora_A)
        if keep is not None and lora_A.shape[0] > 0:
            dx = dx + (dt @ lora_A) * keep  # H = x * keep: dH flows back through the same multiplier
    return dx.view(x.shape), d_a, d_b


@nf4_lora_bwd.register_fake
def _(dy, x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, t, keep, scaling, blocksize,
      nested_blocksize, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, bias, keep, scaling, blocksize,
     nested_blocksize, out_features) = inputs
    # the weight's own 4-bit storage and statistics: never a dense W (see the module docstring)
    ctx.save_for_backward(x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, output[1], keep)
    ctx.scaling, ctx.blocksize, ctx.nested_blocksize = scaling, blocksize, nested_blocksize


def _backward(ctx, dy, _dt):
    x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, t, keep = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, d_a, d_b = torch.ops.lowrank.nf4_lora_bwd(dy, x, packed, absmax, nested_absmax, nested_code, offset, lora_A,
                                                  lora_B, t, keep, ctx.scaling, ctx.blocksize, ctx.nested_blocksize,
                                                  need_dx)
    d_bias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[8] else None
    return (dx if need_dx else None), None, None, None, None, None, d_a, d_b, d_bias, None, None, None, None, None


nf4_lora_fwd.register_autograd(_backward, setup_context=_setup_context)

