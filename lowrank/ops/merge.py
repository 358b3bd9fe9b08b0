"""The merge op: W <- round(W + s * B @ A) in place with one rounding, and its exact undo.

    rec_idx, rec_val = lowrank.ops.merge_(weight, lora_A, lora_B, scaling, exact=True)
    lowrank.ops.unmerge_(weight, lora_A, lora_B, scaling, rec_idx, rec_val)

torch.library custom ops `lowrank::merge_` / `lowrank::unmerge_` (with fake implementations, so
torch.compile and opcheck know them) over two backends: the native library (csrc/, loaded by
`lowrank.native`: CPU with OpenMP, CUDA on the current stream) and the pure-torch fallback with
identical results (`lowrank.ops.merge_torch`).

Numerics (csrc/merge_math.h has the proof sketch):
- fp16 / bf16 weights: each merged element is the exact W + s * sum_k B[i,k] A[k,j] rounded
  once to the weight dtype (nearest-even) -- equal, element for element, to the float64 result
  rounded once. The one exception: an exact value within ~r * 2^-53 (relative) of a rounding
  midpoint, where the double evaluation decides (probability ~r * 2^-45 per element for
  non-adversarial data).
  (torch's `float64_tensor.to(bfloat16)` is NOT that rounding: it rounds to float32 first, so two
  roundings.)
- fp32 weights: there is no wider format to round into, so the result is the fp32 computation
  itself: acc = fma(B[i,k], A[k,j], acc) over k = 0..r-1, then fma((float)s, acc, W): error at
  most |s| (gamma_r + 2u) sum_k |B[i,k] A[k,j]| + u |result| (u = 2^-24, gamma_r = r u / (1 - r u)).
- Exact unmerge: `round(merged - s * B @ A)` misses the original in a few % of elements. With
  exact=True the merge also returns a record -- flat int32 index and original bits of every
  element whose round trip would fail (found in the same pass), 4 + itemsize bytes per entry --
  and unmerge writes those back: W is restored bit for bit (NaN payloads included). The native
  CPU library's record is a superset: it also holds the round trips it could not certify (without
  redoing them in double) and those its fast unmerge (`unmerge_(..., fast=True)`: the fp32 round
  trip of the merge's own accumulation, uncertified) would miss, so it serves both unmerges.
- NaN / Inf in W stay where they were.

Level 2: imports torch and level 0.
"""
from __future__ import annotations

import ctypes
import math
import threading

import torch

from lowrank import native
from lowrank.dtypes import check_dtype

from .merge_torch import merge_torch, restore_torch

_U = 2.0 ** -24
MAX_RANK = 256  # the native entry points take rank 1 .. 256 (csrc/lowrank.h); above, the pure-torch path


def check_merge_args(weight, lora_A, lora_B, scaling, where: str = "merge", values: bool = True) -> None:
    """TypeError / ValueError naming the culprit; called before anything is written. values=False
    skips the NaN/Inf scan of the factors (fake tensors have no values)."""
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D, got shape {tuple(t.shape)}")
        check_dtype(t.dtype, where, f"{name} dtype")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"{where}: lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")
    n, k = weight.shape
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, k) or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"{where}: weight {tuple(weight.shape)} needs lora_B (N={n}, r) and lora_A (r, K={k}) "
                         f"with one r; got lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    if r < 1:
        raise ValueError(f"{where}: rank {r} must be >= 1")
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


def _max_abs(t: torch.Tensor) -> float:
    """max |t| (inf when t holds a NaN), from one aminmax: no |t| temporary (half the time of
    t.abs().amax(): 22 against 51 us for a 1024 x 16 and a 16 x 4096 factor, two threads)."""
    lo_hi = torch.aminmax(t.detach())
    m = max(-float(lo_hi.min), float(lo_hi.max))
    return m if m == m else math.inf


def check_no_overflow(weight, lora_A, lora_B, scaling, where: str) -> None:
    """ValueError, before anything is written, if some finite element of weight + scaling * lora_B @
    lora_A would round to Inf in the weight's dtype (an extreme alpha, or fp16 weights near 65504).
    Usually free: when |scaling| * max_i ||B_i|| * max_j ||A_:,j|| (which bounds every |delta_ij|) is
    under half an ulp of the dtype's largest value, no finite element can overflow. Otherwise the
    exact sums are checked in float64, a block of rows at a time."""
    info = torch.finfo(weight.dtype)
    half_ulp = info.eps * info.max / (2.0 * (2.0 - info.eps))  # half the spacing just below max
    if weight.numel() == 0:
        return
    # First the cheapest bound, |scaling| r max|B| max|A| >= |delta_ij| (the maxima are exact, the
    # float64 products round at most 3 times: the 1 + 2^-40 covers them): two reductions over the
    # factors as they are, 0.04-0.1 ms where the norms below took 0.6-2 ms (1024x4096, r 16 / 64,
    # one thread), and enough for every adapter short of extreme.
    cheap = abs(scaling) * lora_A.shape[0] * _max_abs(lora_B) * _max_abs(lora_A) * (1.0 + 2.0 ** -40)
    if cheap < half_ulp:
        return
    b64, a64 = lora_B.detach().double(), lora_A.detach().double()
    bound = abs(scaling) * float(torch.linalg.vector_norm(b64, dim=1).amax()) \
        * float(torch.linalg.vector_norm(a64, dim=0).amax())
    if bound < half_ulp or weight.numel() == 0:
        return
    n, k = weight.shape
    rows_per = max(1, (1 << 20) // max(k, 1))
    for r0 in range(0, n, rows_per):
        w = weight[r0:r0 + rows_per].detach()
        exact = w.double() + scaling * (b64[r0:r0 + rows_per] @ a64)
        bad = torch.isfinite(w) & (exact.abs() >= info.max + half_ulp)
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{where}: the merged weight would overflow {weight.dtype} at ({r0 + i}, {j}): "
                             f"{w[i, j].item():.6g} + delta = {exact[i, j].item():.6g}, beyond its largest "
                             f"value {info.max:.6g}; nothing was written (is scaling {scaling!r} intended?)")


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
    b_norms = torch.linalg.vector_norm(b32.double(), dim=1)  # (N,)
    a_norms = torch.linalg.vector_norm(a32.double(), dim=0)  # (K,)
    row_bound = _round_up_f32(b_norms * c)
    col_bound = _round_up_f32(a_norms)
    abs_bound = 2.0 ** -126 * max(1.0, r * abs(scaling) * 1.01)
    if abs(scaling) < 2.0 ** -100 and b_norms.numel() and a_norms.numel():
        # the per-element bound's terms saturate or fail to cover fp32(s) != s: the slack takes the
        # whole accumulation error for every element (csrc/merge_cpu.cpp, merge_strided)
        s32 = float(torch.tensor(float(scaling), dtype=torch.float32))
        abs_bound += (abs(scaling) * (r + 1) * _U * 1.01 + abs(float(scaling) - s32)) \
            * float(b_norms.max()) * float(a_norms.max()) * 1.02
    return b32, a32, row_bound, col_bound, abs_bound


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


_SCRATCH_KEEP = 16 << 20  # bytes of record scratch kept per thread and dtype between exact CPU merges
_scratch = threading.local()


def _kept_slots(dtype: torch.dtype) -> int:
    """Record slots of the kept scratch (int32 index + a value each): 2.8M for a 16-bit weight."""
    return _SCRATCH_KEEP // (4 + dtype.itemsize)


def _record_scratch(cap: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Record buffers (int32 indices, values) of at least `cap` slots for the library to fill: the
    whole buffer is its scratch (thread t writes its records from slot len * t / threads on), so
    fresh memory would be paged in on every merge (~400 page faults at 1024x4096 fp16, 3% of a
    merge + unmerge). Up to _kept_slots(dtype) slots the kept buffer of this thread and dtype is
    returned whole, at its full length (with the same thread count the shares then start at the same
    slots on every merge, so the records rarely reach pages they have not touched before); beyond,
    a fresh one. The memory kept is at most _SCRATCH_KEEP bytes per thread and dtype, as before.
    merge_ returns right-sized copies."""
    if cap > _kept_slots(dtype):
        return torch.empty(cap, dtype=torch.int32), torch.empty(cap, dtype=dtype)
    kept = getattr(_scratch, "buffers", None)
    if kept is None:
        kept = _scratch.buffers = {}
    bufs = kept.get(dtype)
    slots = _kept_slots(dtype)
    if bufs is None or bufs[0].numel() != slots:  # (a retry needs more slots than this length)
        bufs = kept[dtype] = (torch.empty(slots, dtype=torch.int32), torch.empty(slots, dtype=dtype))
    return bufs


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


def _cpu_unmerge_fast(lib, weight, lora_A, lora_B, scaling, rec_idx, rec_val, count):
    """lowrank_cpu_unmerge_strided on the tensors as they are: the fast unmerge with the CPU
    library's own record (its first `count` entries), then the record written back."""
    n, k = weight.shape
    return lib.lowrank_cpu_unmerge_strided(
        _ptr(weight), n, k, weight.stride(0), native.dtype_code(weight.dtype), _ptr(lora_B), lora_B.stride(0),
        lora_B.stride(1), _ptr(lora_A), lora_A.stride(0), lora_A.stride(1), native.dtype_code(lora_A.dtype),
        lora_A.shape[0], float(scaling), _ptr(rec_idx), _ptr(rec_val), count)


def _library(weight, lora_A):
    """The native library for this merge, or None: missing, or a rank above its MAX_RANK (the
    pure-torch path has the same numerics at any rank, so every rank that patches merges)."""
    return native.for_device(weight.device) if lora_A.shape[0] <= MAX_RANK else None


def _record_capacity(weight, lora_A, lora_B, scaling, sample_rows: int = 8, sample_cols: int = 1024) -> int:
    """How many records to make room for: the fraction of elements a round trip does not restore,
    measured on a grid of `sample_rows` x `sample_cols` evenly spaced elements (an fp32 round trip,
    no random draw), with a margin. A record buffer too small makes the library undo the merge and
    the caller redo it (three passes over W instead of one: at a delta of 30% of W's rms, fp16, 16%
    of the elements need a record); too large costs memory only (6 bytes per slot for a 16-bit
    weight). An estimate, not the record (which also holds the library's uncertified round trips,
    0.1-0.3% of the elements: inside the margin): 8 x 1024 elements (the fraction's standard
    error < 0.5%, a tenth of the margin at 5% and above) from strided views, with A's sampled columns
    only, cost ~0.3 ms where whole rows and A took 0.6 ms (1024x4096 r = 64, two threads). Run only
    for weights above twice the kept scratch's slots (_kept_slots: 5.6M elements for 16-bit, 4.2M for
    fp32, e.g. Llama's q / gate / down projections); smaller ones get the kept scratch whole."""
    n, k = weight.shape
    rs, cs = max(1, n // sample_rows), max(1, k // sample_cols)
    w = weight[::rs, ::cs][:sample_rows, :sample_cols]
    delta = (lora_B[::rs][:sample_rows].float() @ lora_A[:, ::cs][:, :sample_cols].float()).mul_(float(scaling))
    merged = (w.float() + delta).to(weight.dtype)
    back = merged.float().sub_(delta).to(weight.dtype)
    iv = torch.int32 if weight.element_size() == 4 else torch.int16
    frac = int(torch.count_nonzero(back.view(iv) != w.view(iv))) / max(1, back.numel())
    return int(weight.numel() * min(1.0, 1.5 * frac + 0.005)) + 64


def _run_merge(weight, lora_A, lora_B, scaling, exact):
    """Merge in place; returns (rec_idx, rec_val) (empty when exact is False)."""
    lib = _library(weight, lora_A)
    cpu_native = lib is not None and weight.device.type == "cpu"
    check_merge_args(weight, lora_A, lora_B, scaling, "lowrank.ops.merge_", values=not cpu_native)
    if exact and weight.numel() >= 2 ** 31:
        raise ValueError(f"merge_: exact=True needs fewer than 2^31 elements (int32 record), weight has "
                         f"{weight.numel()}; use exact=False")
    empty = (weight.new_empty(0, dtype=torch.int32), weight.new_empty(0))
    if weight.numel() == 0:
        return empty
    check_no_overflow(weight, lora_A, lora_B, scaling, "lowrank.ops.merge_")
    if cpu_native:
        if not exact:
            native.check(_cpu_merge(lib, weight, lora_A, lora_B, scaling), "lowrank_cpu_merge_strided")
            return empty
        # No estimate where the kept scratch holds half of W's elements or more (a record that
        # outgrows it, every second element, costs an undo and a second call): at 1024x4096 the
        # estimate cost ~0.1-0.45 ms, 1-4% of an exact merge + unmerge at r = 16.
        small = weight.numel() <= 2 * _kept_slots(weight.dtype)
        cap = 0 if small else _record_capacity(weight, lora_A, lora_B, scaling)  # on overflow W is left as it was
        for _ in range(2):
            rec = (*_record_scratch(cap, weight.dtype), ctypes.c_int64(0))
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
        out = merge_torch(weight, b32, a32, float(scaling), exact)
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


def _check_record(weight, rec_idx, rec_val, where, indices: bool = True):
    """TypeError / ValueError for a malformed record; indices=False leaves the indices' range to the
    caller (the native CPU library checks it before it writes anything: see _run_unmerge)."""
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
    if indices:
        _check_record_indices(weight, rec_idx, where)


def _check_record_indices(weight, rec_idx, where):
    lo_hi = torch.aminmax(rec_idx) if rec_idx.numel() else None
    if lo_hi is not None and (int(lo_hi.min) < 0 or int(lo_hi.max) >= weight.numel()):
        raise ValueError(f"{where}: record indices outside 0..{weight.numel() - 1}: not this weight's record")


def record_allows_fast_unmerge(weight, lora_A) -> bool:
    """Whether an exact merge_ of this weight and factors, here, runs on the native CPU library: its
    record then also serves unmerge_(..., fast=True) here (see unmerge_ and fast_unmerge_key)."""
    return fast_unmerge_key(weight, lora_A) is not None


def fast_unmerge_key(weight, lora_A) -> int | None:
    """None where an exact merge_ of this weight and factors would not run on the native CPU
    library; else which rank loops that library has here (csrc/lowrank.h,
    lowrank_cpu_rank_loop_kind: 1 with the bf16 pair loop of AVX512_BF16, 0 without). The fast
    unmerge recomputes the merge's accumulation, so a record serves it only where the key is the
    one the merge saw; lowrank.merge keeps the key and unmerges with the certified path under
    another (a guard: a merged layer does not reach another process today -- a pickled or copied
    one fails unmerge's version check first)."""
    if weight.device.type != "cpu":
        return None
    lib = _library(weight, lora_A)
    if lib is None:
        return None
    kind = getattr(lib, "lowrank_cpu_rank_loop_kind", None)
    return int(kind()) if kind is not None else 0


def _run_unmerge(weight, lora_A, lora_B, scaling, rec_idx, rec_val, fast=False):
    lib = _library(weight, lora_A)
    cpu_native = lib is not None and weight.device.type == "cpu"
    check_merge_args(weight, lora_A, lora_B, scaling, "lowrank.ops.unmerge_", values=not cpu_native)
    # The fast CPU unmerge checks the indices' range itself before it writes anything (a scan of
    # the record: 0.24 ms per round trip at 682k records in torch); elsewhere they are checked here.
    native_range = cpu_native and fast
    _check_record(weight, rec_idx, rec_val, "lowrank.ops.unmerge_", indices=not native_range)
    if weight.numel() == 0:
        return
    n, k = weight.shape
    has_rec = rec_idx is not None and rec_idx.numel() > 0
    if not has_rec:
        check_no_overflow(weight, lora_A, lora_B, -scaling, "lowrank.ops.unmerge_")
    if has_rec:
        rec_idx, rec_val = rec_idx.contiguous(), rec_val.contiguous()
    if cpu_native and fast and has_rec:
        status = _cpu_unmerge_fast(lib, weight, lora_A, lora_B, scaling, rec_idx, rec_val, rec_idx.numel())
        if status == native.ERR_INVALID_ARGUMENT:  # W untouched: name what is wrong, if it is the record
            _check_record_indices(weight, rec_idx, "lowrank.ops.unmerge_")
        native.check(status, "lowrank_cpu_unmerge_strided")
        return
    if cpu_native:
        native.check(_cpu_merge(lib, weight, lora_A, lora_B, -float(scaling)), "lowrank_cpu_merge_strided")
        if has_rec:
            native.check(lib.lowrank_cpu_restore(_ptr(weight), n, k, weight.stride(0), native.dtype_code(weight.dtype),
                                                 _ptr(rec_idx), _ptr(rec_val), rec_idx.numel()), "lowrank_cpu_restore")
        return
    b32, a32, row_bound, col_bound, abs_bound = _factors(weight, lora_A, lora_B, scaling)
    if lib is None:
        merge_torch(weight, b32, a32, -float(scaling), False)
        if has_rec:
            restore_torch(weight, rec_idx, rec_val)
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
             rec_idx: torch.Tensor | None = None, rec_val: torch.Tensor | None = None, fast: bool = False) -> None:
    """weight <- round(weight - scaling * lora_B @ lora_A), then the record written back: with the
    record from `merge_` (same factors and scaling) this restores the original bits exactly.

    fast=True, for a record made by `merge_` on the native CPU library (`record_allows_fast_unmerge`)
    and a CPU weight: the round trip is the fp32 one of the merge's own accumulation, uncertified
    (about half the work at rank 64); exact with that record only, made where `fast_unmerge_key`
    was what it is here -- with a record made on CUDA, by the pure-torch path or under another
    key the result is undefined. Elsewhere (another device, no library) fast is
    ignored: the certified unmerge is exact with any merge_ record."""
    _run_unmerge(weight, lora_A, lora_B, scaling, rec_idx, rec_val, fast)


@unmerge_.register_fake
def _unmerge_fake(weight, lora_A, lora_B, scaling, rec_idx=None, rec_val=None, fast=False):
    check_merge_args(weight, lora_A, lora_B, scaling, "lowrank.ops.unmerge_", values=False)
    return None
