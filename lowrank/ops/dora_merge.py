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
back after the plain round trip: W comes back bit for bit. A row of scale 0 (zero norm, or m_i = 0)
merges to zeros and is recorded wherever W_ij != round(-delta_ij): all of it for m_i = 0 over a
nonzero row, none of it for a zero row with B_i = 0. The record is not capped: its size is the data's (at most
N * K entries, a row of scale 0 is K of them), and `lowrank.merge.record_fraction` reports it. Measured
(1024 x 4096 and 4096 x 1024, r 16 and 64, W rms 0.02, m = ||W_i|| perturbed by 1%): at a delta
s B A of 5% of W's rms, 4.9-5.0% of the elements (stored as a merged layer keeps it: 9.9% of W's
bytes for fp16 / bf16, 7.4% for fp32); at 30%, 17.2-17.4% of the elements (35% / 26% of W's bytes),
much as the LoRA merge's record. A cap would have to drop elements, and the unmerge then would not
be exact: there is none.

Backends: the native library (csrc/dora_cpu.cpp, OpenMP; csrc/merge_cuda.cu on CUDA tensors:
lowrank.h lowrank_{cpu,cuda}_dora_merge / _unmerge) does the same float64 operations in the same
order (no fused multiply-add) and the same rounding, so its bits are this file's torch path's, which
stays the fallback (library missing, LOWRANK_NO_NATIVE=1, a float64 weight, or a layout that is
neither rows contiguous nor a transposed row-major tensor) and the oracle of
tests/test_dora_merge_native.py. The row scale always comes from `dora_row_norms` here. With a
record, the CPU library first computes every merged element without writing (the overflow check and
the record), then writes W in a second pass that allocates nothing: an overflow, a record buffer
too small (sized from 32 sampled rows; the library says how much room it needs and the merge is
redone) or memory running out all leave W untouched. Without a record it checks for overflow by a
bound first (the exact check when the bound cannot clear a row), then writes.

Nothing is written when some finite element would overflow the dtype (ValueError first). Level 2.
"""
from __future__ import annotations

import ctypes

import torch

from lowrank import native

from .dora import _inverse, dora_row_norms, inverse_norms
from .merge import _ptr
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
    scale = magnitude.detach().double() * inverse_norms(dora_row_norms(weight, lora_A, lora_B, s), magnitude)  # (N,)
    a64, b64 = lora_A.detach().double(), lora_B.detach().double()
    inv = _inverse(scale.abs()) * scale.sign()  # 1 / scale, 0 where scale is 0
    lib = _library(weight)
    if lib is not None:
        idx, val = _native_merge(lib, weight, a64, b64, s, scale, inv, exact, where)
        return scale, idx, val
    dtype = weight.dtype
    idx, val = [], []
    # Pass 1: compute, check for overflow and build the record; nothing is written.
    for i, j in _blocks(n, k):
        w = weight[i:j]
        merged = _merged_block(w, b64[i:j], a64, s, scale[i:j])
        bad = torch.isfinite(w) & ~torch.isfinite(merged)
        if bool(bad.any()):
            r, c = (int(v) for v in bad.nonzero()[0])
            _raise_overflow(where, dtype, i + r, c, scale)
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


def _raise_overflow(where, dtype, i, j, scale):
    raise ValueError(f"{where}: the merged weight would overflow {dtype} at ({i}, {j}) (row scale "
                     f"{scale[i].item():.6g}); nothing was written")


# -- the native library (csrc/dora_cpu.cpp, csrc/merge_cuda.cu) -------------------------------------

def _library(weight: torch.Tensor):
    """The native library for this weight, or None for the torch path: missing or LOWRANK_NO_NATIVE=1
    (native.for_device), a float64 weight, no elements, or a layout that is neither rows contiguous
    nor the transpose of a row-major tensor (the two the library walks; lowrank.h)."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.numel() == 0:
        return None
    (n, k), (s0, s1) = weight.shape, weight.stride()
    if not ((s1 == 1 and (n <= 1 or s0 >= k)) or (s0 == 1 and (k <= 1 or s1 >= n))):
        return None
    return native.for_device(weight.device)


def _call_args(weight, a64, b64, s, stream_needed):
    n, k = weight.shape
    head = (_ptr(weight), n, k, weight.stride(0), weight.stride(1), native.dtype_code(weight.dtype), _ptr(b64),
            _ptr(a64), a64.shape[0], s)
    stream = (ctypes.c_void_p(torch.cuda.current_stream(weight.device).cuda_stream),) if stream_needed else ()
    return head, stream


def _new_record(cap: int, weight: torch.Tensor):
    """Scratch for the library's record: (int32 indices, values in weight's dtype), cap >= 1 slots
    (a tensor of 0 elements may have a null pointer, which the library reads as "no record")."""
    return (torch.empty(cap, dtype=torch.int32, device=weight.device),
            torch.empty(cap, dtype=weight.dtype, device=weight.device))


def _record_capacity(weight, a64, b64, s, scale, inv, sample_rows: int = 32) -> int:
    """Room for the record: the fraction of elements whose round trip fails on `sample_rows` evenly
    spaced rows, with a margin. An estimate: the delta here is one float64 GEMM (a handful of torch
    ops; the exact rank-ordered sum took r of them, ~100 ms on two loaded cores at r = 16). Too small
    costs a second call (the library writes nothing and says how many it needs); too large costs
    memory only."""
    n = weight.shape[0]
    rows = torch.linspace(0, n - 1, steps=min(n, sample_rows)).round().long().unique().to(weight.device)
    w = weight[rows]
    delta = s * (b64[rows] @ a64)  # (rows, K)
    merged = _round(scale[rows, None] * (w.double() + delta), weight.dtype)
    back = _round(merged.double() * inv[rows, None] - delta, weight.dtype)
    frac = (_bits(back) != _bits(w)).double().mean().item()
    return int(weight.numel() * min(1.0, 1.5 * frac + 0.005)) + 64


def _native_merge(lib, weight, a64, b64, s, scale, inv, exact, where):
    """lowrank_{cpu,cuda}_dora_merge: the torch path's bits (a pass that checks and records, then one
    that writes; without a record one pass unless the overflow bound cannot clear W). Returns the
    record (rec_idx sorted, rec_val), empty with exact=False."""
    n, k = weight.shape
    cuda = weight.device.type == "cuda"
    fn = lib.lowrank_cuda_dora_merge if cuda else lib.lowrank_cpu_dora_merge
    a64, b64 = a64.contiguous(), b64.contiguous()
    scale, inv = scale.contiguous(), inv.contiguous()
    head, stream = _call_args(weight, a64, b64, s, cuda)
    head = head + (_ptr(scale), _ptr(inv))
    bad = ctypes.c_int64(-1)
    empty = (weight.new_empty(0, dtype=torch.int32), weight.new_empty(0))
    if not exact:
        status = fn(*head, None, None, 0, None, ctypes.byref(bad), *stream)
        if status == native.ERR_OVERFLOW:
            _raise_overflow(where, weight.dtype, bad.value // k, bad.value % k, scale)
        native.check(status, fn.__name__)
        return empty
    cap = _record_capacity(weight, a64, b64, s, scale, inv)
    for _ in range(2):  # on ERR_CAPACITY the library has written nothing and says how many it needs
        idx, val = _new_record(max(cap, 1), weight)
        count = ctypes.c_int64(0)
        status = fn(*head, _ptr(idx), _ptr(val), idx.numel(), ctypes.byref(count), ctypes.byref(bad), *stream)
        if status == native.ERR_CAPACITY:
            cap = count.value
            continue
        if status == native.ERR_OVERFLOW:
            _raise_overflow(where, weight.dtype, bad.value // k, bad.value % k, scale)
        if status == native.ERR_OUT_OF_MEMORY:
            raise MemoryError(f"{where}: out of memory for the record of weight {tuple(weight.shape)}; nothing was "
                              f"written")
        native.check(status, fn.__name__)
        m = count.value
        idx, val = idx[:m].clone(), val[:m].clone()
        if cuda:  # the kernel's atomics fill the record in any order; sorted, as the CPU gives it
            idx, order = torch.sort(idx)
            val = val[order]
        return idx, val
    raise native.NativeError(native.ERR_CAPACITY, fn.__name__)


def _merged_block(w, b64, a64, s, scale):
    return _round(scale[:, None] * (w.double() + _delta(b64, a64, s)), w.dtype)


@torch.no_grad()
def dora_unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  scale: torch.Tensor, rec_idx: torch.Tensor | None = None,
                  rec_val: torch.Tensor | None = None) -> None:
    """Undo `dora_merge_` in place: round(weight / scale - s B A), then the record's elements written
    back (bit-exact with the record of an exact merge; without one, rows of scale 0 become -s B A).
    ValueError, with weight untouched, for a record that is not this weight's."""
    n, k = weight.shape
    s = float(scaling)
    has_rec = rec_idx is not None and rec_idx.numel() > 0
    if has_rec:
        if rec_val is None or rec_val.shape != rec_idx.shape or rec_val.dtype != weight.dtype \
                or rec_idx.dtype != torch.int32 or rec_idx.dim() != 1:
            raise TypeError(f"dora_unmerge_: the record must be int32 indices (n,) and {weight.dtype} values (n,), "
                            f"got {rec_idx.dtype} {tuple(rec_idx.shape)} and "
                            f"{None if rec_val is None else (rec_val.dtype, tuple(rec_val.shape))}")
        lo, hi = (int(v) for v in torch.aminmax(rec_idx))
        if lo < 0 or hi >= n * k:
            raise ValueError(f"dora_unmerge_: record indices outside 0..{n * k - 1}: not this weight's record; "
                             f"nothing was written")
    a64, b64 = lora_A.detach().double(), lora_B.detach().double()
    scale = scale.to(device=weight.device, dtype=torch.float64)
    inv = _inverse(scale.abs()) * scale.sign()
    lib = _library(weight)
    if lib is not None:
        cuda = weight.device.type == "cuda"
        fn = lib.lowrank_cuda_dora_unmerge if cuda else lib.lowrank_cpu_dora_unmerge
        a64, b64, inv = a64.contiguous(), b64.contiguous(), inv.contiguous()
        head, stream = _call_args(weight, a64, b64, s, cuda)
        if has_rec:
            ri, rv = rec_idx.to(weight.device).contiguous(), rec_val.to(weight.device).contiguous()
            rec = (_ptr(ri), _ptr(rv), ri.numel())
        else:
            rec = (None, None, 0)
        native.check(fn(*head, _ptr(inv), *rec, *stream), fn.__name__)
        return
    for i, j in _blocks(n, k):
        w = weight[i:j]
        w.copy_(_round(w.double() * inv[i:j, None] - _delta(b64[i:j], a64, s), weight.dtype))
    if has_rec:
        flat = rec_idx.long().to(weight.device)
        weight[flat // k, flat % k] = rec_val.to(weight.device)
