"""The merge op's pure-torch backend: the native library's numerics, element for element.

Used by `lowrank.ops.merge` when the library is missing (after one warning) or with
LOWRANK_NO_NATIVE=1, and checked bit for bit against the library by the tests.
- fp16 / bf16: the delta s * sum_k B[i,k] A[k,j] is summed in float64 (each product exact, the
  sum in the C loop's order), added to W in float64 and rounded once (`round_f64`).
- fp32: the library's fused multiply-adds, emulated exactly (`_fma_f32`).
- The exact-unmerge record: the elements whose plain round trip would not give W back.

Level 2: imports torch only.
"""
from __future__ import annotations

import math

import torch

def round_f64(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correct nearest-even rounding of float64 to float32 / float16 / bfloat16 (one rounding).

    Rounds to float32 with round-to-odd first (an inexact result gets an odd last bit), which
    keeps the second rounding to a 16-bit format exact."""
    f = x64.float()
    if dtype == torch.float32:
        return f
    back = f.double()
    inexact = (back != x64) & torch.isfinite(back) & ~torch.isnan(x64)
    even = (f.view(torch.int32) & 1) == 0
    toward = torch.where(back < x64, torch.full_like(f, math.inf), torch.full_like(f, -math.inf))
    f = torch.where(inexact & even, torch.nextafter(f, toward), f)
    # float32 overflowed to Inf from a finite double: Inf is also the right 16-bit answer.
    out = f.to(dtype)
    nan = torch.isnan(f)
    if bool(nan.any()):  # NaNs as the library writes them (merge_math.h float_to_*_full)
        fb = f.view(torch.int32)
        if dtype == torch.bfloat16:
            nb = ((fb >> 16) | 0x40).to(torch.int16)
        else:
            nb = torch.where(fb < 0, torch.tensor(-512, dtype=torch.int16), torch.tensor(0x7E00, dtype=torch.int16))
        out = torch.where(nan, nb.view(dtype), out)
    return out


def _fma_f32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """fmaf(x, y, z) for float32 tensors: x*y is exact in double; the double sum's error (TwoSum)
    turns its rounding into round-to-odd, so the final float32 rounding is the only one."""
    p = x.double() * y.double()
    q = z.double()
    s = p + q
    bb = s - p
    err = (p - (s - bb)) + (q - bb)
    odd_fix = (err != 0) & torch.isfinite(s) & ((s.view(torch.int64) & 1) == 0)
    toward = torch.where(err > 0, torch.full_like(s, math.inf), torch.full_like(s, -math.inf))
    s = torch.where(odd_fix, torch.nextafter(s, toward), s)
    return s.float()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


_CHUNK = 1 << 22  # elements per fallback chunk: bounds its float64 temporaries to ~100 MiB


def _merge_rows_torch(w: torch.Tensor, b32, a32, scaling: float, exact: bool):
    """Fallback on a block of rows w (n, k) (a view, updated in place); returns the failing
    round-trip mask (n, k) or None."""
    r = a32.shape[0]
    if w.dtype == torch.float32:
        acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for k in range(r):
            acc = _fma_f32(b32[:, k:k + 1].expand_as(acc), a32[k:k + 1, :].expand_as(acc), acc)
        s32 = torch.tensor(scaling, dtype=torch.float32, device=w.device).expand_as(acc)
        orig = w.clone() if exact else None
        merged = _fma_f32(s32, acc, w)
        fails = None
        if exact:
            back = _fma_f32(-s32, acc, merged)
            fails = _bits(back) != _bits(orig)
        w.copy_(merged)
        return fails
    acc = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
    b64, a64 = b32.double(), a32.double()
    for k in range(r):
        acc += b64[:, k:k + 1] * a64[k:k + 1, :]  # products exact: the C loop's order and roundings
    acc.mul_(scaling)  # s * acc, then + W: two roundings, as the library's double path
    merged = round_f64(w.double() + acc, w.dtype)
    fails = None
    if exact:
        back = round_f64(merged.double() - acc, w.dtype)
        fails = _bits(back) != _bits(w)
    w.copy_(merged)
    return fails


def merge_torch(weight, b32, a32, scaling, exact):
    n, k = weight.shape
    rows_per = max(1, _CHUNK // max(k, 1))
    idx, val = [], []
    for i0 in range(0, n, rows_per):
        wv = weight[i0:i0 + rows_per]
        orig = wv.clone() if exact else None
        fails = _merge_rows_torch(wv, b32[i0:i0 + rows_per], a32, scaling, exact)
        if exact:
            where = fails.flatten().nonzero().squeeze(1)
            idx.append((where + i0 * k).to(torch.int32))
            val.append(orig.flatten()[where])
    if not exact:
        return None
    if not idx:
        return weight.new_empty(0, dtype=torch.int32), weight.new_empty(0)
    return torch.cat(idx), torch.cat(val)


def restore_torch(weight, rec_idx, rec_val):
    n, k = weight.shape
    rows, cols = rec_idx.long() // k, rec_idx.long() % k
    weight[rows, cols] = rec_val
