"""NF4 dequantization in one launch, bit-identical to bitsandbytes.

Storage (`lowrank.nf4_format`, bitsandbytes' format): element e of the row-major (N, K) weight is
the high (e even) or low (e odd) nibble of packed[e // 2], scaled by absmax[e // blocksize].
Each program writes a run of whole quantization blocks (or part of one when blocksize > BLOCK),
decodes the nested absmax of each block once, and stores the interleaved high/low nibbles
contiguously.

# Note: no FMA in the nested absmax decode
bitsandbytes decodes absmax as fp32(fp32(code2[q] * absmax2) + offset): two roundings. Triton
fuses such a multiply-add into one FMA (one rounding) by default, which changes the last bit of
some absmax values and then of every weight in the block. The kernel is therefore compiled with
enable_fp_fusion=False (checked in the sm_90 PTX: `mul.rn.f32` then `add.rn.f32`, no `fma`).
libdevice's `mul_rn` would also block the fusion, but Triton links it with flush-to-zero
(`mul.rn.ftz.f32`), which breaks subnormal absmax values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank.dtypes import check_dtype
from lowrank.nf4_format import NF4Weight, nf4_code

from ._common import INTERPRET, round_to


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
    n_elements,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # The program's BLOCK elements as a (ROWS, SPAN) tile: one row per quantization block (or one
    # row inside a block larger than BLOCK), so each block's absmax is decoded once.
    SPAN: tl.constexpr = BLOCK if BLOCKSIZE > BLOCK else BLOCKSIZE
    ROWS: tl.constexpr = BLOCK // SPAN
    HALF: tl.constexpr = SPAN // 2
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * BLOCK + tl.arange(0, ROWS).to(tl.int64) * SPAN  # (ROWS,) first element
    blk = row_start // BLOCKSIZE
    row_ok = row_start < n_elements
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=row_ok, other=0).to(tl.int32)
        scale2 = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=row_ok, other=0.0)
        decoded = tl.load(nested_code_ptr + q, mask=row_ok, other=0.0) * scale2
        absmax = decoded + tl.load(offset_ptr)  # a separate rounding: see the Note on FMA
    else:
        absmax = tl.load(absmax_ptr + blk, mask=row_ok, other=0.0)
    byte_idx = row_start[:, None] // 2 + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    n_bytes = (n_elements + 1) // 2
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < n_bytes, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4)) * absmax[:, None]
    lo = tl.load(code_ptr + (byte & 0xF)) * absmax[:, None]
    vals = tl.interleave(hi, lo)  # (ROWS, SPAN), element order: hi then lo
    offs = row_start[:, None] + tl.arange(0, SPAN)[None, :]
    tl.store(out_ptr + offs, round_to(vals, out_ptr.dtype.element_ty, INTERPRETED), mask=offs < n_elements)


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (N, K) weight, bit-identical to `w.dequantize(dtype)`, in one launch."""
    dtype = dtype or w.dtype
    check_dtype(dtype, "nf4 dequantize")
    n = w.numel
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
    elif out.shape != torch.Size(w.shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"nf4 dequantize: out must be a contiguous {tuple(w.shape)} {dtype} tensor, "
                         f"got {tuple(out.shape)} {out.dtype}")
    block = 256 if INTERPRET else 2048
    grid = (triton.cdiv(n, block),)
    nested = w.double_quant
    dummy = w.absmax
    _nf4_dequant_kernel[grid](
        w.packed, w.absmax, w.nested_absmax if nested else dummy, w.nested_code if nested else dummy,
        w.offset if nested else dummy, nf4_code(w.device), out,
        n,
        BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize, NESTED=nested, BLOCK=block,
        INTERPRETED=INTERPRET, enable_fp_fusion=False,
    )
    return out
