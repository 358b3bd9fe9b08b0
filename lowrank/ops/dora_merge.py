"""Merging a DoRA adapter: W <- round(m / ||W + s B A|| (.) (W + s B A)) in place, one rounding, and its
exact undo.

    scale, rec_idx, rec_val = dora_merge_(weight, lora_A, lora_B, magnitude, scaling, exact=True)
    dora_unmerge_(weight, lora_A, lora_B, scaling, scale, rec_idx, rec_val)

weight is the layer's (N, K) weight as a view (a Conv1D weight's transpose is fine), written in place.

Numerics: per block of rows, the delta s sum_t B[i,t] A[t,j] is summed in float64 elementwise in
t order (deterministic: the same bits at merge and unmerge whatever the thread count, where a BLAS
GEMM may not be), the scale m_i / ||W_i + s (BA)_i|| comes from `dora_row_norms` (float64, no N x K
matrix; 0 where the norm is 0, as in the forward), and scale (W + delta) is evaluated in float64 and
rounded once to the weight's dtype (`round_f64`: correct nearest-even, also for float16, which
torch's own float64 -> float16 conversion double-rounds). So the merged weight is the float64
result rounded once (up to float64's own ~1e-16 relative error in the scale and the sum).

Exact unmerge: round(merged / scale - delta) misses the original on part of the elements (the
merge rounded a product). With exact=True the merge returns the record of those elements -- flat
index i * K + j (int32) and the original bits -- found in the same pass, and unmerge writes them
back after the plain round trip: W comes back bit for bit. Rows with scale 0 (zero norm) are
recorded whole. The record's size depends on the data; `lowrank.merge.record_fraction` reports it.

Nothing is written when some finite element would overflow the dtype (ValueError first). Level 2.
"""
from __future__ import annotations

import torch

from .dora import _inverse, dora_row_norms
from .merge_torch import round_f64

_BLOCK_ELEMENTS = 1 << 20  # float64 temporaries per block: a few of these, 8 MiB each


def _blocks(n: int, k: int):
    step = max(1, _BLOCK_ELEMENTS // max(k, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _delta(b64: torch.Tensor, a64: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B @ A for a block of rows, float64, summed elementwise in rank order (deterministic)."""
    acc = torch.zeros(b64.shape[0], a64.shape[1], dtype=torch.float64, device=a64.device)
    for t in range(a64.shape[0]):
        acc += b64[:, t:t + 1] * a64[t:t + 1, :]
    return acc.mul_(scaling)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def _round(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x64 if dtype == torch.float64 else round_f64(x64, dtype)


def _check(weight, lora_A, lora_B, magnitude, scaling, where: str) -> None:
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{where}: weight, lora_A, lora_B must be 2-D")
    n, k = weight.shape
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, k) or tuple(lora_B.shape) != (n, r) or tuple(magnitude.shape) != (n,):
        raise ValueError(f"{where}: weight {tuple(weight.shape)} needs lora_A (r, {k}), lora_B ({n}, r), magnitude "
                         f"({n},); got {tuple(lora_A.shape)}, {tuple(lora_B.shape)}, {tuple(magnitude.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{where}: weight dtype {weight.dtype} is not a floating-point dtype")
    if n * k >= 2 ** 31:
        raise ValueError(f"{where}: weight {tuple(weight.shape)} has 2^31 elements or more (int32 record indices)")
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all() and torch.isfinite(magnitude).all()):
        raise ValueError(f"{where}: lora_A / lora_B / magnitude contain NaN or Inf; merging would destroy the weight")


@torch.no_grad()
def dora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                scaling: float, exact: bool = True):
    """Merge a DoRA adapter into weight (N, K) in place (see the module's doc); returns (scale
    float64 (N,), rec_idx int32, rec_val in weight's dtype), the record empty with exact=False.
    ValueError, with weight untouched, when an argument is wrong or a finite element would overflow."""
    where = "dora_merge_"
    _check(weight, lora_A, lora_B, magnitude, scaling, where)
    n, k = weight.shape
    s = float(scaling)
    scale = magnitude.detach().double() * _inverse(dora_row_norms(weight, lora_A, lora_B, s))  # (N,)
    a64, b64 = lora_A.detach().double(), lora_B.detach().double()
    inv = _inverse(scale.abs()) * scale.sign()  # 1 / scale, 0 where scale is 0
    dtype = weight.dtype
    idx, val = [], []
    # Pass 1: compute, check for overflow and build the record; nothing is written.
    for i, j in _blocks(n, k):
        w = weight[i:j]
        merged = _merged_block(w, b64[i:j], a64, s, scale[i:j])
        bad = torch.isfinite(w) & ~torch.isfinite(merged)
        if bool(bad.any()):
            r, c = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{where}: the merged weight would overflow {dtype} at ({i + r}, {c}) (row scale "
                             f"{scale[i + r].item():.6g}); nothing was written")
        if exact:
            back = _round(merged.double() * inv[i:j, None] - _delta(b64[i:j], a64, s), dtype)
            wc = w.contiguous()
            fails = (_bits(back) != _bits(wc)).flatten().nonzero().squeeze(1)
            idx.append((fails + i * k).to(torch.int32))
            val.append(wc.reshape(-1)[fails])
    # Pass 2: write (the same deterministic arithmetic as pass 1).
    for i, j in _blocks(n, k):
        weight[i:j].copy_(_merged_block(weight[i:j], b64[i:j], a64, s, scale[i:j]))
    if not exact or not idx:
        return scale, weight.new_empty(0, dtype=torch.int32), weight.new_empty(0)
    return scale, torch.cat(idx), torch.cat(val)


def _merged_block(w, b64, a64, s, scale):
    return _round(scale[:, None] * (w.double() + _delta(b64, a64, s)), w.dtype)


@torch.no_grad()
def dora_unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  scale: torch.Tensor, rec_idx: torch.Tensor | None = None,
                  rec_val: torch.Tensor | None = None) -> None:
    """Undo `dora_merge_` in place: round(weight / scale - s B A), then the record's elements written
    back (bit-exact with the record of an exact merge; without one, rows of scale 0 become -s B A)."""
    n, k = weight.shape
    s = float(scaling)
    a64, b64 = lora_A.detach().double(), lora_B.detach().double()
    scale = scale.to(device=weight.device, dtype=torch.float64)
    inv = _inverse(scale.abs()) * scale.sign()
    for i, j in _blocks(n, k):
        w = weight[i:j]
        w.copy_(_round(w.double() * inv[i:j, None] - _delta(b64[i:j], a64, s), weight.dtype))
    if rec_idx is not None and rec_idx.numel():
        flat = rec_idx.long().to(weight.device)
        weight[flat // k, flat % k] = rec_val.to(weight.device)
