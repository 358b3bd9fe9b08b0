"""Merge / unmerge LoRA adapters into their base weights: one rounding, bit-exact unmerge.

    lowrank.merge(model)              # W <- round(W + s * B @ A) in every LoRA layer, in place
    lowrank.unmerge(model)            # gives every W back bit for bit
    model = lowrank.merge_and_unload(model)   # plain nn.Linear / Conv1D with merged weights

Numerics (csrc/merge_math.h has the proof sketch):
- fp16 / bf16 weights: each merged element is the exact W + s * sum_k B[i,k] A[k,j] rounded
  once to the weight dtype (nearest-even) -- equal, element for element, to the float64 result
  rounded once. The one exception: an exact value within ~r * 2^-53 (relative) of a rounding
  midpoint, where the double evaluation decides (probability ~r * 2^-45 per element for
  non-adversarial data).
  (torch's `float64_tensor.to(bfloat16)` is NOT that rounding: it rounds to float32 first, so two
  roundings; the tests use a correct one.)
- fp32 weights: there is no wider format to round into, so the result is the fp32 computation
  itself: acc = fma(B[i,k], A[k,j], acc) over k = 0..r-1, then fma((float)s, acc, W): error at
  most |s| (gamma_r + 2u) sum_k |B[i,k] A[k,j]| + u |result| (u = 2^-24, gamma_r = r u / (1 - r u)).
- Exact unmerge: `round(merged - s * B @ A)` misses the original in a few % of elements. With
  exact=True (the default) the merge also returns a record -- flat int32 index and original
  bits of every element whose round trip would fail (found in the same pass) -- and unmerge
  writes those back: W is restored bit for bit (NaN payloads included). `merge_` returns it as
  int32 indices + values (4 + itemsize bytes per entry); a merged layer keeps it packed (index
  low 16 bits + a count per 64Ki block + the values: 4 bytes per entry for 16-bit weights), and
  `record_fraction` reports that size relative to W's bytes (~15% when the delta's rms is 10%
  of W's, ~32% at 30%).
- NaN / Inf in W stay where they were.

Backends: the native library (csrc/, CPU with OpenMP, CUDA on the current stream) and a
pure-torch fallback with identical results (used, after one warning, when the library is
missing, or always with LOWRANK_NO_NATIVE=1). Both are behind the custom ops
`torch.ops.lowrank.merge_` and `torch.ops.lowrank.unmerge_`.

NF4 (QLoRA) layers: `merge_and_unload` dequantizes them and merges there with one rounding
(optionally quantizing the result back). It dequantizes to the dtype of the weight that was
quantized (`NF4Weight.dtype`), not to the compute dtype the issue named: the two agree in the usual
bf16 QLoRA set-up, and where they differ (an fp32 model trained with bf16 compute) the merged
layer must match the rest of the model to run without casts, and merging in the wider dtype
loses nothing. In-place `merge` / `unmerge` of an NF4 weight raise NotImplementedError (the
4-bit codes cannot hold the delta).
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import os

import torch
import torch.nn as nn

from . import native
from .layers import LoRALinear, is_linear
from .ops import KERNEL_DTYPES

_FLOAT_DTYPES = KERNEL_DTYPES
_U = 2.0 ** -24
MAX_RANK = 256


# ---------------------------------------------------------------------------------------------
# Checks and the factors the kernels take
# ---------------------------------------------------------------------------------------------

def check_merge_args(weight, lora_A, lora_B, scaling, where: str = "merge", values: bool = True) -> None:
    """TypeError / ValueError naming the culprit; called before anything is written. values=False
    skips the NaN/Inf scan of the factors (fake tensors have no values)."""
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"{where}: lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")
    n, k = weight.shape
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, k) or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"{where}: weight {tuple(weight.shape)} needs lora_B (N={n}, r) and lora_A (r, K={k}) "
                         f"with one r; got lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{where}: rank {r} is outside 1..{MAX_RANK}")
    devices = {t.device for t in (weight, lora_A, lora_B)}
    if len(devices) != 1:
        raise ValueError(f"{where}: weight ({weight.device}), lora_A ({lora_A.device}) and lora_B "
                         f"({lora_B.device}) must be on one device")
    if weight.numel() and weight.stride(1) != 1:
        raise ValueError(f"{where}: weight rows must be contiguous (stride(1) == 1), got strides "
                         f"{tuple(weight.stride())}; for a weight stored transposed, merge the stored "
                         f"tensor with transposed factors (B.T, A.T swapped)")
    if weight.shape[0] > 1 and weight.stride(0) < weight.shape[1]:
        raise ValueError(f"{where}: weight rows overlap (strides {tuple(weight.stride())})")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"{where}: scaling must be a finite number, got {scaling!r}")
    if values and not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise ValueError(f"{where}: lora_A / lora_B contain NaN or Inf; merging would destroy the weight")


def _round_up_f32(x64: torch.Tensor) -> torch.Tensor:
    """float32 >= x64 (nearest, then one step up where that rounded down)."""
    f = x64.float()
    return torch.where(f.double() < x64, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def _factors(weight, lora_A, lora_B, scaling):
    """fp32 contiguous B (N, r) and A (r, K), and the error-bound terms of merge_math.h."""
    r = lora_A.shape[0]
    b32 = lora_B.detach().float().contiguous()
    a32 = lora_A.detach().float().contiguous()
    gamma = r * _U / (1 - r * _U)
    c = abs(scaling) * (gamma * (1 + _U) + _U) * (1 + 2.0 ** -18)
    row_bound = _round_up_f32(torch.linalg.vector_norm(b32.double(), dim=1) * c)  # (N,)
    col_bound = _round_up_f32(torch.linalg.vector_norm(a32.double(), dim=0))  # (K,)
    abs_bound = 2.0 ** -126 * max(1.0, r * abs(scaling) * 1.01)
    return b32, a32, row_bound, col_bound, abs_bound


def _native_lib(device: torch.device):
    if os.environ.get("LOWRANK_NO_NATIVE") == "1":
        return None
    if device.type == "cuda":
        return native.cuda()
    if device.type == "cpu":
        return native.cpu()
    return None


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


# ---------------------------------------------------------------------------------------------
# Pure-torch fallback: the same numerics as the library, element for element
# ---------------------------------------------------------------------------------------------

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


def _merge_torch(weight, b32, a32, scaling, exact):
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


def _restore_torch(weight, rec_idx, rec_val):
    n, k = weight.shape
    rows, cols = rec_idx.long() // k, rec_idx.long() % k
    weight[rows, cols] = rec_val


# ---------------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------------

def _shrink(buf: torch.Tensor, m: int) -> torch.Tensor:
    """A right-sized copy of buf[:m] by memmove (a torch copy is a parallel op: see _cpu_merge)."""
    out = torch.empty(m, dtype=buf.dtype)
    if m:
        ctypes.memmove(out.data_ptr(), buf.data_ptr(), m * buf.element_size())
    return out


def _cpu_merge(lib, weight, lora_A, lora_B, scaling, rec=None):
    """lowrank_cpu_merge_strided on the tensors as they are (no torch op: on a loaded 2-core
    machine each small parallel torch op costs tens of ms). rec: (idx, val, count) or None."""
    n, k = weight.shape
    args = (_ptr(weight), n, k, weight.stride(0), native.dtype_code(weight.dtype),
            _ptr(lora_B), lora_B.stride(0), lora_B.stride(1), _ptr(lora_A), lora_A.stride(0), lora_A.stride(1),
            native.dtype_code(lora_A.dtype), lora_A.shape[0], float(scaling))
    if rec is None:
        status = lib.lowrank_cpu_merge_strided(*args, None, None, 0, None)
    else:
        idx, val, count = rec
        status = lib.lowrank_cpu_merge_strided(*args, _ptr(idx), _ptr(val), idx.numel(), ctypes.byref(count))
    if status == native.ERR_NONFINITE:
        raise ValueError("lowrank.ops.merge_: lora_A / lora_B contain NaN or Inf; merging would destroy the weight")
    return status


def _run_merge(weight, lora_A, lora_B, scaling, exact):
    """Merge in place; returns (rec_idx, rec_val) (empty when exact is False)."""
    lib = _native_lib(weight.device)
    cpu_native = lib is not None and weight.device.type == "cpu"
    check_merge_args(weight, lora_A, lora_B, scaling, "lowrank.ops.merge_", values=not cpu_native)
    if exact and weight.numel() >= 2 ** 31:
        raise ValueError(f"merge_: exact=True needs fewer than 2^31 elements (int32 record), weight has "
                         f"{weight.numel()}; use exact=False")
    empty = (weight.new_empty(0, dtype=torch.int32), weight.new_empty(0))
    if weight.numel() == 0:
        return empty
    if cpu_native:
        if not exact:
            native.check(_cpu_merge(lib, weight, lora_A, lora_B, scaling), "lowrank_cpu_merge_strided")
            return empty
        cap = weight.numel() // 8 + 64  # a guess; on overflow the library leaves W untouched
        for _ in range(2):
            rec = (torch.empty(cap, dtype=torch.int32), torch.empty(cap, dtype=weight.dtype), ctypes.c_int64(0))
            status = _cpu_merge(lib, weight, lora_A, lora_B, scaling, rec)
            if status == native.ERR_CAPACITY:
                cap = rec[2].value
                continue
            native.check(status, "lowrank_cpu_merge_strided")
            m = rec[2].value
            return _shrink(rec[0], m), _shrink(rec[1], m)
        raise native.NativeError(native.ERR_CAPACITY, "lowrank_cpu_merge_strided")
    b32, a32, row_bound, col_bound, abs_bound = _factors(weight, lora_A, lora_B, scaling)
    n, k = weight.shape
    if lib is None:
        out = _merge_torch(weight, b32, a32, float(scaling), exact)
        return out if exact else empty
    common = (_ptr(weight), n, k, weight.stride(0), native.dtype_code(weight.dtype), _ptr(b32), _ptr(a32),
              lora_A.shape[0], _ptr(row_bound), _ptr(col_bound), abs_bound, float(scaling))
    stream = ctypes.c_void_p(torch.cuda.current_stream(weight.device).cuda_stream)
    if not exact:
        native.check(lib.lowrank_cuda_merge(*common, None, None, 0, None, stream), "lowrank_cuda_merge")
        return empty
    # The CUDA kernel cannot undo an overflow (csrc/lowrank.h), so its capacity must cover every
    # element it is given. Launched on blocks of rows of at most _CUDA_RECORD_CHUNK elements, one
    # scratch buffer of that size serves them all: temporary memory min(W, 16M elements) x 6 or
    # 8 bytes (96 MiB for bf16) instead of 3x W's bytes (1.4 GB of scratch at Llama-3-70B's
    # 28672 x 8192 bf16), for one host sync per block.
    rows_per = max(1, min(n, _CUDA_RECORD_CHUNK // k))
    cap = rows_per * k
    rec_idx = torch.empty(cap, dtype=torch.int32, device=weight.device)
    rec_val = torch.empty(cap, dtype=weight.dtype, device=weight.device)
    count = torch.zeros(1, dtype=torch.int64, device=weight.device)
    parts_idx, parts_val = [], []
    for r0 in range(0, n, rows_per):
        nr = min(rows_per, n - r0)
        count.zero_()
        block = weight[r0:r0 + nr]
        native.check(lib.lowrank_cuda_merge(_ptr(block), nr, k, weight.stride(0), native.dtype_code(weight.dtype),
                                            _ptr(b32[r0:]), _ptr(a32), lora_A.shape[0], _ptr(row_bound[r0:]),
                                            _ptr(col_bound), abs_bound, float(scaling), _ptr(rec_idx), _ptr(rec_val),
                                            cap, _ptr(count), stream), "lowrank_cuda_merge")
        m = int(count.item())  # (syncs: the scratch is reused by the next block)
        parts_idx.append(rec_idx[:m] + r0 * k)  # block-relative flat index -> W's
        parts_val.append(rec_val[:m].clone())
    idx, val = torch.cat(parts_idx), torch.cat(parts_val)
    order = torch.argsort(idx)  # atomics fill it in any order; sorted = deterministic
    return idx[order], val[order]


_CUDA_RECORD_CHUNK = 1 << 24  # elements of W per exact CUDA merge launch (see _run_merge)


def _check_record(weight, rec_idx, rec_val, where):
    if (rec_idx is None) != (rec_val is None):
        raise ValueError(f"{where}: pass both rec_idx and rec_val, or neither")
    if rec_idx is None:
        return
    if rec_idx.dtype != torch.int32 or rec_idx.dim() != 1:
        raise TypeError(f"{where}: rec_idx must be a 1-D int32 tensor, got {rec_idx.dtype} {tuple(rec_idx.shape)}")
    if rec_val.dtype != weight.dtype or tuple(rec_val.shape) != tuple(rec_idx.shape):
        raise TypeError(f"{where}: rec_val must be {weight.dtype} with rec_idx's shape {tuple(rec_idx.shape)}, "
                        f"got {rec_val.dtype} {tuple(rec_val.shape)}")
    if rec_idx.device != weight.device or rec_val.device != weight.device:
        raise ValueError(f"{where}: the record must be on the weight's device {weight.device}")
    lo_hi = torch.aminmax(rec_idx) if rec_idx.numel() else None
    if lo_hi is not None and (int(lo_hi.min) < 0 or int(lo_hi.max) >= weight.numel()):
        raise ValueError(f"{where}: record indices outside 0..{weight.numel() - 1}: not this weight's record")


def _run_unmerge(weight, lora_A, lora_B, scaling, rec_idx, rec_val):
    lib = _native_lib(weight.device)
    cpu_native = lib is not None and weight.device.type == "cpu"
    check_merge_args(weight, lora_A, lora_B, scaling, "lowrank.ops.unmerge_", values=not cpu_native)
    _check_record(weight, rec_idx, rec_val, "lowrank.ops.unmerge_")
    if weight.numel() == 0:
        return
    n, k = weight.shape
    has_rec = rec_idx is not None and rec_idx.numel() > 0
    if has_rec:
        rec_idx, rec_val = rec_idx.contiguous(), rec_val.contiguous()
    if cpu_native:
        native.check(_cpu_merge(lib, weight, lora_A, lora_B, -float(scaling)), "lowrank_cpu_merge_strided")
        if has_rec:
            native.check(lib.lowrank_cpu_restore(_ptr(weight), n, k, weight.stride(0), native.dtype_code(weight.dtype),
                                                 _ptr(rec_idx), _ptr(rec_val), rec_idx.numel()), "lowrank_cpu_restore")
        return
    b32, a32, row_bound, col_bound, abs_bound = _factors(weight, lora_A, lora_B, scaling)
    if lib is None:
        _merge_torch(weight, b32, a32, -float(scaling), False)
        if has_rec:
            _restore_torch(weight, rec_idx, rec_val)
        return
    dcode = native.dtype_code(weight.dtype)
    stream = ctypes.c_void_p(torch.cuda.current_stream(weight.device).cuda_stream)
    native.check(lib.lowrank_cuda_merge(_ptr(weight), n, k, weight.stride(0), dcode, _ptr(b32), _ptr(a32),
                                        lora_A.shape[0], _ptr(row_bound), _ptr(col_bound), abs_bound,
                                        -float(scaling), None, None, 0, None, stream), "lowrank_cuda_merge")
    if has_rec:
        native.check(lib.lowrank_cuda_restore(_ptr(weight), n, k, weight.stride(0), dcode, _ptr(rec_idx),
                                              _ptr(rec_val), rec_idx.numel(), stream), "lowrank_cuda_restore")


@torch.library.custom_op("lowrank::merge_", mutates_args=("weight",))
def merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
           exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) <- round(weight + scaling * lora_B (N, r) @ lora_A (r, K)), in place.

    Returns the exact-unmerge record (rec_idx int32 (n,), rec_val weight.dtype (n,)); both empty
    when exact is False. Rows of `weight` must be contiguous (any row stride)."""
    return _run_merge(weight, lora_A, lora_B, scaling, exact)


@merge_.register_fake
def _merge_fake(weight, lora_A, lora_B, scaling, exact=True):
    check_merge_args(weight, lora_A, lora_B, scaling, "lowrank.ops.merge_", values=False)
    n = torch.library.get_ctx().new_dynamic_size() if exact else 0
    return weight.new_empty((n,), dtype=torch.int32), weight.new_empty((n,))


@torch.library.custom_op("lowrank::unmerge_", mutates_args=("weight",))
def unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
             rec_idx: torch.Tensor | None = None, rec_val: torch.Tensor | None = None) -> None:
    """weight <- round(weight - scaling * lora_B @ lora_A), then the record written back: with the
    record from `merge_` (same factors and scaling) this restores the original bits exactly."""
    _run_unmerge(weight, lora_A, lora_B, scaling, rec_idx, rec_val)


@unmerge_.register_fake
def _unmerge_fake(weight, lora_A, lora_B, scaling, rec_idx=None, rec_val=None):
    check_merge_args(weight, lora_A, lora_B, scaling, "lowrank.ops.unmerge_", values=False)
    return None


# ---------------------------------------------------------------------------------------------
# Module API
# ---------------------------------------------------------------------------------------------

_BLOCK_BITS = 16  # the stored record splits flat indices into 64Ki-element blocks


@dataclasses.dataclass
class MergeState:
    """What a merged LoRALinear remembers: which adapter, and what unmerge needs.

    The exact-unmerge record is kept compact: flat indices (sorted) as a count per block of
    2^16 elements (int32, 4 bytes per 65536 elements of W) plus the index's low 16 bits (2 bytes
    per entry), and the original values (the weight's itemsize per entry) -- 4 bytes per entry
    for fp16 / bf16 instead of 6 with int32 indices."""
    adapter: str
    scaling: float
    exact: bool
    block_counts: torch.Tensor  # int32 (ceil(numel / 2^16),)
    low_bits: torch.Tensor      # int16 (n,): flat index & 0xFFFF
    values: torch.Tensor        # weight.dtype (n,): original bits
    versions: tuple  # (weight, lora_A, lora_B) version counters right after the merge

    @classmethod
    def pack(cls, adapter, scaling, exact, rec_idx, rec_val, numel, versions):
        blocks = -(-numel // (1 << _BLOCK_BITS))
        idx = rec_idx.long()
        counts = torch.bincount(idx >> _BLOCK_BITS, minlength=blocks).to(torch.int32)
        low = (idx & 0xFFFF).to(torch.int32).to(torch.int16)  # wraps to int16: decoded with & 0xFFFF
        return cls(adapter, scaling, exact, counts, low, rec_val, versions)

    def unpack(self):
        """(rec_idx int32 sorted, rec_val) as `merge_` returned them."""
        blocks = torch.arange(self.block_counts.numel(), device=self.low_bits.device, dtype=torch.int64)
        high = torch.repeat_interleave(blocks, self.block_counts.long())
        idx = (high << _BLOCK_BITS) | (self.low_bits.long() & 0xFFFF)
        return idx.to(torch.int32), self.values

    def record_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.block_counts, self.low_bits, self.values))


def record_fraction(layer: LoRALinear) -> float:
    """Size of a merged layer's exact-unmerge record as a fraction of its weight's bytes."""
    state = getattr(layer, "merged", None)
    if not state:
        raise ValueError("record_fraction: the layer is not merged")
    w = layer.base_layer.weight
    return state.record_bytes() / (w.numel() * w.element_size())


def _merge_operands(layer: LoRALinear, name: str):
    """(weight as stored, 'A', 'B') such that stored weight += s * B @ A is the merge: for a Conv1D
    weight stored (in, out), W^T + s B A = (W + s A^T B^T)^T, so the stored tensor is merged with
    transposed, swapped factors (views; the weight is never copied)."""
    w = layer.base_layer.weight.detach()
    a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    if layer.fan_in_fan_out:
        return w, b.t(), a.t()
    return w, a, b


def _check_layer(path: str, layer: LoRALinear, name: str | None):
    base = layer.base_layer
    w = getattr(base, "weight", None)
    if type(layer) is not LoRALinear or not is_linear(base) or not isinstance(w, torch.Tensor) \
            or w.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f"layer {path}: merging into a {type(layer).__name__} over {type(base).__name__} with weight "
            f"{getattr(w, 'dtype', None)} is not implemented (only dense float32/float16/bfloat16 nn.Linear "
            f"and Conv1D weights; for NF4 layers use lowrank.merge_and_unload, which dequantizes and merges)")
    name = name or layer.active_adapter
    if name is None or name not in layer.configs:
        raise ValueError(f"layer {path}: no adapter {name!r} (has {sorted(layer.configs)})")
    w_, a, b = _merge_operands(layer, name)
    check_merge_args(w_, a, b, layer.scaling(name), f"merge: layer {path}")
    return name


def _targets(model: nn.Module, what: str):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, LoRALinear):
        return [("", model)]
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA layer (lowrank.patch_linear adds them)")
    return layers


@torch.no_grad()
def _merge_layer(layer: LoRALinear, name: str, exact: bool) -> None:
    w, a, b = _merge_operands(layer, name)
    scaling = layer.scaling(name)
    rec_idx, rec_val = torch.ops.lowrank.merge_(w, a, b, scaling, exact)
    versions = (w._version, layer.lora_A[name]._version, layer.lora_B[name]._version)
    layer.merged = MergeState.pack(name, scaling, exact, rec_idx, rec_val, w.numel(), versions)


@torch.no_grad()
def _unmerge_layer(path: str, layer: LoRALinear) -> None:
    state: MergeState = layer.merged
    w, a, b = _merge_operands(layer, state.adapter)
    now = (w._version, layer.lora_A[state.adapter]._version, layer.lora_B[state.adapter]._version)
    if now != state.versions or layer.scaling(state.adapter) != state.scaling:
        raise ValueError(f"layer {path}: the weight, lora_A, lora_B or scaling of adapter {state.adapter!r} "
                         f"changed since it was merged; unmerging would not give the original weight back")
    if state.exact:
        # The record is plain attributes, not buffers: a merged layer moved with .to() / .cuda()
        # leaves it behind. It follows the weight here (the version check above has already
        # refused a .to(dtype), which rewrites the weight).
        rec_idx, rec_val = state.unpack()
        torch.ops.lowrank.unmerge_(w, a, b, state.scaling, rec_idx.to(w.device), rec_val.to(w.device))
    else:
        torch.ops.lowrank.unmerge_(w, a, b, state.scaling)
    layer.merged = None


def merge(model: nn.Module, adapter_name: str | None = None, exact: bool = True) -> nn.Module:
    """Merge an adapter (default: each layer's active one) into every LoRA layer's weight, in place.

    Merged layers compute base_layer(x) only. exact=True keeps the record that makes `unmerge`
    bit-exact (see `record_fraction`); exact=False skips it (unmerge then only rounds back).
    Everything is checked before any weight is written; a failure midway unmerges what was done.
    Raises ValueError if a layer is already merged, NotImplementedError for non-dense weights."""
    layers = _targets(model, "merge")
    names = []
    for path, layer in layers:
        if getattr(layer, "merged", None):
            raise ValueError(f"layer {path or type(layer).__name__} is already merged "
                             f"(adapter {layer.merged.adapter!r}); unmerge it first")
        names.append(_check_layer(path, layer, adapter_name))
    done = []
    try:
        for (path, layer), name in zip(layers, names):
            _merge_layer(layer, name, exact)
            done.append((path, layer))
    except BaseException:
        for path, layer in reversed(done):
            if layer.merged.exact:
                _unmerge_layer(path, layer)
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` in every LoRA layer, in place: bit-exact for layers merged with exact=True.
    Raises ValueError, changing nothing, if any LoRA layer is not merged."""
    layers = _targets(model, "unmerge")
    for path, layer in layers:
        if not getattr(layer, "merged", None):
            raise ValueError(f"layer {path or type(layer).__name__} is not merged")
    for path, layer in layers:
        _unmerge_layer(path, layer)
    return model


def merge_and_unload(model: nn.Module, adapter_name: str | None = None, requantize: bool = False,
                     return_report: bool = False):
    """Merge (without a record) and put plain layers back: returns `model` with no LoRA module left
    and the original requires_grad flags (as lowrank.unpatch).

    Dense layers get their merged nn.Linear / Conv1D back. NF4 (QLoRA) layers are dequantized to
    a dense dtype and merged there with one rounding (the recipe the QLoRA authors recommend:
    merging into 4-bit codes would lose most of the delta), becoming dense nn.Linear layers in the
    dtype of the weight that was quantized (`NF4Weight.dtype`, the dtype the rest of the model
    was in; bitsandbytes records it too), so the merged model runs without casts; with
    `requantize=True` the merged weight is quantized back to an NF4Linear with the same blocksize
    and double quantization. `return_report=True` returns `(model, report)` where report maps each
    NF4 layer's path to the error requantizing added, relative to the merged dense weight:
    {"rel_fro_error": |deq(q(W')) - W'|_F / |W'|_F, "max_abs_error": ...} (empty without NF4
    layers or without requantize)."""
    from .patch import unpatch
    from .qlora import NF4Linear

    if isinstance(model, LoRALinear):
        raise TypeError("merge_and_unload the model that contains the LoRALinear, not the layer itself")
    layers = _targets(model, "merge_and_unload")
    dense, quantized = [], []
    for path, layer in layers:
        if getattr(layer, "merged", None):
            raise ValueError(f"layer {path} is merged already; unmerge it first (or call merge_and_unload "
                             f"on an unmerged model)")
        if isinstance(layer.base_layer, NF4Linear):
            name = adapter_name or layer.active_adapter
            if name not in layer.configs:
                raise ValueError(f"layer {path}: no adapter {name!r} (has {sorted(layer.configs)})")
            a, b = layer.lora_A[name], layer.lora_B[name]
            if a.shape[0] > MAX_RANK:
                raise ValueError(f"merge_and_unload: layer {path}: rank {a.shape[0]} is outside 1..{MAX_RANK}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"merge_and_unload: layer {path}: lora_A / lora_B contain NaN or Inf")
            quantized.append((path, layer, name))
        else:
            dense.append((path, layer, _check_layer(path, layer, adapter_name)))
    # NF4 layers first: they are built aside (nothing changes in place), so a failure there (out
    # of memory) leaves the model untouched. Dense layers keep their `merged` flag until all are
    # done: if one fails, the ones before it are merged (without a record) and flagged so, and
    # their forward skips the LoRA path: outputs stay right, never W + 2 s B A.
    report, new_bases = {}, []
    for path, layer, name in quantized:
        base, report_row = _merged_nf4(layer, name, requantize)
        new_bases.append((layer, base))
        if report_row is not None:
            report[path] = report_row
    for path, layer, name in dense:
        _merge_layer(layer, name, exact=False)
    for layer, base in new_bases:
        layer.base_layer = base
    for path, layer, name in dense:
        layer.merged = None  # the wrapper is discarded next; its base layer keeps the merged weight
    unpatch(model)
    return (model, report) if return_report else model


@torch.no_grad()
def _merged_nf4(layer: LoRALinear, name: str, requantize: bool):
    """(new base layer, requantization error or None) for an NF4 LoRA layer."""
    from .qlora import NF4Linear

    base: NF4Linear = layer.base_layer
    dtype = base.nf4.dtype if base.nf4.dtype in _FLOAT_DTYPES else base.compute_dtype
    w = base.dequantize(dtype).contiguous()  # (out, in)
    a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    torch.ops.lowrank.merge_(w, a, b, layer.scaling(name), False)  # factors in their own dtype (fp32)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().to(w.dtype), requires_grad=False)
    if not requantize:
        return linear, None
    q = NF4Linear.from_linear(linear, compute_dtype=base.compute_dtype, blocksize=base.nf4.blocksize,
                              double_quant=base.nf4.double_quant)
    err = (q.dequantize(torch.float32) - w.float())
    row = {"rel_fro_error": (err.norm() / w.float().norm().clamp_min(1e-30)).item(),
           "max_abs_error": err.abs().max().item()}
    if base.bias is not None:
        q.bias = base.bias  # keep the original (frozen) bias parameter and dtype
    return q, row
