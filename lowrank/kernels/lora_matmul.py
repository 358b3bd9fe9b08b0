"""Fused LoRA matmul: Triton kernels (forward and backward) and their launchers.

    y = x @ W.T + bias + s * dropout(x) @ A.T @ B.T          x: (M, K), W: (N, K), A: (r, K), B: (N, r)

Forward, two launches (for M <= 16 on a GPU, two others: see the Note on small M):
  1. `_lora_shrink_kernel`   T = dropout(x) @ A.T, kept in fp32 (M, r): the only LoRA temporary.
  2. `_lora_fwd_kernel`      the base GEMM; after its K loop one extra block adds s * T @ B.T to the
                        fp32 accumulator, then bias; y is written once (no M x N temporary).
Backward (W and bias frozen), three launches:
  3. `_lora_dt_db_kernel`    one pass over dY for dT = s * dY @ B (M, r) and dB = s * dY.T @ T (N, r).
  4. `_lora_dx_kernel`       dX = dY @ W + mask * (dT @ A): one GEMM whose reduction over N ends with an
                        extra r-block; skipped when x does not need a gradient.
  5. `_lora_da_kernel`       dA = dT.T @ dropout(x).

Dropout lives inside kernels 1, 4 and 5: the keep decision for element (m, k) of x is
`philox(seed, m * K + k) >= p`, regenerated wherever it is needed (`dropout_mask` rebuilds the
very same mask for tests). No mask is ever stored.

Dtypes: fp16, bf16 and fp32 inputs; every accumulator is fp32. fp32 inputs use IEEE fp32 dots
unless `torch.backends.cuda.matmul.allow_tf32` is True, then TF32 (the same rule as torch.matmul).

# Note: fp32 LoRA temporaries in 16-bit dots
T and dT are fp32. A tensor-core dot needs both operands in one 16-bit dtype, so an fp32 operand
t is split as t = hi + lo with hi = round16(t) and lo = round16(t - hi), and both halves are
multiplied (two rank-r dots instead of one). That carries about 16 significant bits of t instead
of 8 (bf16); the split block costs 2r/K of the main GEMM's MMA work (r=16, K=4096: 0.8%).

# Note: atomics
dB sums over M and dT over N while dY is read once, so one of the two sums crosses programs:
each program owns BLOCK_M rows of dY and walks the N columns, keeping dT in registers and adding
its (BLOCK_N, r) share of dB into an fp32 buffer with atomic adds: R / BLOCK_M atomics per dY
element (r=16, BLOCK_M=128: 1 in 8). The shrink (split over K) and dA (split over M) use the same
split-and-add when there are too few output tiles to fill the GPU. Sums that go through atomics
(dB whenever M > BLOCK_M; T, dT, dA when split) are not bitwise reproducible from run to run.
Under `torch.use_deterministic_algorithms(True)` no kernel uses atomics: T, dT and dA are not
split, and each row tile writes its own fp32 dB slice, summed afterwards by torch in a fixed order
(cdiv(M, BLOCK_M) * N * r * 4 bytes: M=16384, N=4096, r=16: 34 MB, a quarter of dY's 134 MB).

# Note: small M
At M <= 16 (decoding) the forward is a stream over W: 2*N*K bytes for 2*M*N*K FLOPs. One program
per output tile leaves the GPU idle when there are few tiles (N=1024 in 32-column tiles: 32
programs for 132 SMs), so the small-M path splits K as well: `_lora_small_m_partial_kernel` writes
fp32 partial sums of x @ W.T per K range (and of dropout(x) @ A.T, so the shrink needs no launch
of its own), and `_lora_small_m_epilogue_kernel` adds them in a fixed order, adds s * T @ B.T and the
bias and writes y. No atomics: the result is bitwise reproducible. The workspaces hold
split*M*(N + r) fp32 (M=16, N=1024, split=8: 0.5 MB, which stays in L2; against 8 MB of W).
It is chosen automatically on a GPU for M <= SMALL_M_MAX (LOWRANK_SMALL_M, default 16; 0 turns it
off) and forced in tests with `lora_forward(..., small_m=split)`.

Block sizes: the two GEMM kernels are autotuned over Hopper and Ampere configs, keyed on
(next_pow2(M), N, K), under the package's policy (`_common.AUTOTUNE`); otherwise
`_heuristic_config`. `lora_forward` / `lora_backward` are the launchers; the differentiable op
over them is `lowrank.ops.lora_matmul`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import AUTOTUNE, INTERPRET, grouped_pid, m_bucket, num_sms, tune_bench

MAX_RANK = 128  # one register block of r; the op falls back to the reference above it

# --------------------------------------------------------------------------------------------
# Autotune configurations (the two GEMM kernels); the small ones use launcher heuristics.
# --------------------------------------------------------------------------------------------


def _gemm_configs():
    cfg = []
    for bm, bn, bk, gm, w, s in [
        # Hopper (H100/H200, 228 KB smem): wide tiles, 3-4 stages.
        (128, 256, 64, 8, 8, 3),
        (256, 128, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 4),
        # Ampere (A100, 164 KB smem): the classic 128x128x32/64 tiles.
        (128, 128, 32, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        # Small M (decode, M <= 64): the GEMM is a weight stream; many narrow N tiles fill the SMs.
        (64, 64, 128, 8, 4, 4),
        (32, 64, 128, 8, 4, 4),
        (16, 64, 256, 8, 4, 3),
        (16, 32, 256, 8, 4, 3),
        # M <= 16 at N = 4096: 256 programs of 16 columns put two W streams on each of 132 SMs.
        (16, 16, 512, 8, 2, 4),
    ]:
        cfg.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                                 num_warps=w, num_stages=s))
    return cfg


# Register budgets, measured with `python -m bench.static` (ptxas -v, no spills allowed): the fp32
# accumulator elements per thread a GEMM tile may hold. The dX kernel also holds its LoRA term's
# operands, and with dropout the Philox keep-mask of its whole tile. sm_90 (wgmma, two warpgroups
# at 8 warps) affords more than sm_80 (mma.sync), where the Hopper tiles above 128x128 also spill.
def acc_limit(cap_major: int, num_warps: int, dx: bool, dropout: bool) -> int:
    if cap_major >= 9:
        if dx and dropout:
            return 64 if num_warps >= 8 else 32
        return 128
    if dx:
        return 32 if dropout or num_warps < 8 else 64
    return 128


def gemm_config_fits(blocks: dict, num_warps: int, num_stages: int, itemsize: int, block_r: int,
                     smem_limit: int, dropout: bool = False, cap_major: int = 9, dx: bool = False,
                     scale: bool = False):
    """True if a GEMM tile (`_lora_fwd_kernel`, or `_lora_dx_kernel` with dx=True) fits the target,
    else why not.

    Shared memory, an upper bound of what Triton allocates: the pipelined operand tiles,
    stages x (BLOCK_M x BLOCK_K + BLOCK_K x BLOCK_N), plus the LoRA term's operands: the r x BLOCK_N
    factor and the BLOCK_M x r fp32 tile as its two 16-bit halves.
    Registers: `acc_limit` accumulator elements per thread; on sm_80 no tile above 128x128.
    DoRA's scale (HAS_SCALE) on sm_80, 16-bit (`python -m bench.static --families lora_matmul`: the
    two tiles below spilled 4-16 bytes, none on sm_90a): the forward at most 64 accumulator elements
    per thread (128x128x32 on 4 warps spilled at r32); the dX kernel, whose scaled dY tile goes
    through fp32 in registers, at most 128 operand elements (dY and W tiles) per thread (16x64x256 on
    4 warps, 160, spilled)."""
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    smem = (num_stages * (bm * bk + bk * bn) + block_r * (bn + 2 * bm)) * itemsize
    if smem > smem_limit:
        return f"needs ~{smem} B of shared memory, the target has {smem_limit}"
    per_thread = bm * bn // (32 * num_warps)
    limit = acc_limit(cap_major, num_warps, dx, dropout)
    if itemsize == 4 and num_warps < 8:
        limit = min(limit, 64)  # fp32 operand fragments are twice as wide: 128x128 on 4 warps spills
    if per_thread > limit:
        return f"{per_thread} accumulator elements per thread (> {limit}{' with dropout' if dropout else ''}) spill"
    if cap_major < 9 and bm * bn > 128 * 128:
        return "Hopper tile: spills on sm_80"
    if scale and cap_major < 9 and itemsize == 2:
        if not dx and per_thread > 64:
            return f"{per_thread} accumulator elements per thread (> 64 with the DoRA scale on sm_80) spill"
        operands = (bm * bk + bk * bn) // (32 * num_warps)
        if dx and operands > 128:
            return f"{operands} operand elements per thread (> 128 with the DoRA scale on sm_80) spill"
    return True


def _device_limits(device) -> tuple[int, int]:
    """(shared memory per block, compute capability major) of a CUDA device."""
    props = triton.runtime.driver.active.utils.get_device_properties(device.index)
    return props["max_shared_mem"], torch.cuda.get_device_capability(device)[0]


def _fitting(configs, itemsize, block_r, dropout, device, dx, scale=False):
    limit, major = _device_limits(device)
    return [c for c in configs if gemm_config_fits(c.kwargs, c.num_warps, c.num_stages, itemsize, block_r, limit,
                                                   dropout, major, dx, scale) is True]


def _prune_gemm(configs, nargs, **kwargs):
    """Drop tiles far taller than M (wasted MMA rows), tiny tiles at large M (re-reads of W), and
    tiles that do not fit the device (`gemm_config_fits`), before any is compiled or launched."""
    m = nargs["M"]
    cap = max(16, triton.next_power_of_2(m))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and (m <= 256 or c.kwargs["BLOCK_M"] >= 64)]
    first = next(v for k, v in nargs.items() if k.endswith("_ptr") and hasattr(v, "element_size"))
    args = (first.element_size(), kwargs.get("BLOCK_R", MAX_RANK), bool(kwargs.get("DROPOUT", False)), first.device,
            "dx_ptr" in nargs, bool(kwargs.get("HAS_SCALE", False)))
    return _fitting(keep or configs, *args) or _fitting(configs, *args)[-1:] or configs[-1:]


def _heuristic_config(m: int) -> dict:
    """Block sizes without autotuning (interpreter, LOWRANK_AUTOTUNE=0): small-M or large-M tiles."""
    if INTERPRET:
        # The interpreter runs every program as numpy: small tiles keep masks exercised and tests fast.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=3)
    if m <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    # 96 KB of shared memory at 3 stages: fits Ampere (164 KB) and Hopper (228 KB).
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _keep(seed, offs_m, offs_k, K, p):
    """Dropout keep decision for elements (offs_m, offs_k) of x: philox(seed, m*K + k) >= p."""
    idx = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    return tl.rand(seed, idx) >= p


@triton.jit
def _dot_f32_lhs(t, b, acc, LOWP: tl.constexpr, PREC: tl.constexpr):
    """acc + t @ b for an fp32 t and b in the input dtype (see the Note on fp32 temporaries)."""
    if LOWP:
        hi = t.to(b.dtype)
        lo = (t - hi.to(tl.float32)).to(b.dtype)
        acc = tl.dot(hi, b, acc)
        acc = tl.dot(lo, b, acc)
    else:
        acc = tl.dot(t, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _dot_f32_rhs(a, t, acc, LOWP: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ t for a in the input dtype and an fp32 t."""
    if LOWP:
        hi = t.to(a.dtype)
        lo = (t - hi.to(tl.float32)).to(a.dtype)
        acc = tl.dot(a, hi, acc)
        acc = tl.dot(a, lo, acc)
    else:
        acc = tl.dot(a, t, acc, input_precision=PREC)
    return acc


@triton.jit
def _dora_epilogue(acc, scale_ptr, v_ptr, rows, cols, offs_m, offs_n, M, N, stride_vm, stride_vn,
                   HAS_SCALE: tl.constexpr, STORE_V: tl.constexpr):
    """The DoRA epilogue on an fp32 (BLOCK_M, BLOCK_N) tile before the bias: v written (STORE_V, in
    v's dtype) and the tile scaled per column by the fp32 scale (HAS_SCALE); the tile as is without."""
    if STORE_V:
        tl.store(v_ptr + rows[:, None] * stride_vm + cols[None, :] * stride_vn, acc.to(v_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    if HAS_SCALE:
        sc = tl.load(scale_ptr + cols, mask=offs_n < N, other=0.0)
        acc = acc * sc[None, :]
    return acc


@triton.jit
def _scaled_dy(dy, scale_ptr, offs_n, N, HAS_SCALE: tl.constexpr):
    """dY (.) scale per column, rounded back to dY's dtype (what the torch path's g = dy * scale holds:
    the products are exact in fp32 and rounded once); dY as is without HAS_SCALE."""
    if HAS_SCALE:
        sc = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        dy = (dy.to(tl.float32) * sc[None, :]).to(dy.dtype)
    return dy


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr, seed_ptr,
    M, K, R, split_k,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm,
    p, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ATOMIC: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """T[M, r] (fp32) = dropout(x) @ A.T.

    FLOPs 2*M*K*r; minimum bytes (M*K + r*K) * itemsize + 4*M*r. Grid (cdiv(M, BLOCK_M), split_k):
    a split K range is summed into a zeroed T with atomic adds.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, split_k * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if DROPOUT:
            x = tl.where(_keep(seed, offs_m, offs_k, K, p), x, 0.0)
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R)
        if LOWP:
            acc = tl.dot(x, at, acc)
        else:
            acc = tl.dot(x, at, acc, input_precision=PREC)
    if DROPOUT:
        acc = acc * inv_keep
    t_ptrs = t_ptr + rows[:, None] * stride_tm + offs_r[None, :]
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    if ATOMIC:
        tl.atomic_add(t_ptrs, acc, mask=mask)
    else:
        tl.store(t_ptrs, acc, mask=mask)


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, t_ptr, b_ptr, bias_ptr, y_ptr, scale_ptr, v_ptr,
    M, N, K, R, m_bucket,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_bn, stride_br, stride_ym, stride_yn, stride_bias,
    stride_vm, stride_vn,
    scaling,
    HAS_BIAS: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_SCALE: tl.constexpr = False, STORE_V: tl.constexpr = False,
):
    """y[M, N] = x @ W.T + (s * T) @ B.T + bias, accumulated in fp32 and rounded once; with
    HAS_SCALE, y = scale (.) (x @ W.T + (s * T) @ B.T) + bias (scale: fp32 (N,), DoRA's m / ||.||),
    and with STORE_V the pre-scale v = x @ W.T + (s * T) @ B.T is written to v as well (rounded once).

    FLOPs 2*M*N*K + 2*M*N*r (+ 4*M*N*r of split MMA work for 16-bit dtypes); minimum bytes
    (M*K + N*K + N*r + M*N + N) * itemsize + 4*M*r. The LoRA expand is one more r-deep block
    after the K loop, so y is written exactly once.
    """
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                     mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_N)
        if LOWP:
            acc = tl.dot(x, wt, acc)
        else:
            acc = tl.dot(x, wt, acc, input_precision=PREC)
    # The expand in r-chunks of BLOCK_R (at most 32): a rank-128 adapter would otherwise hold a
    # (BLOCK_M, 128) fp32 tile and its hi/lo halves next to the accumulator (spills on sm_90a).
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :],
                    mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        bt = tl.load(b_ptr + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)  # (BLOCK_R, BLOCK_N)
        acc = _dot_f32_lhs(t * scaling, bt, acc, LOWP, PREC)
    acc = _dora_epilogue(acc, scale_ptr, v_ptr, rows, cols, offs_m, offs_n, M, N, stride_vm, stride_vn,
                         HAS_SCALE, STORE_V)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _lora_dt_db_kernel(
    dy_ptr, b_ptr, t_ptr, dt_ptr, db_ptr, scale_ptr,
    M, N, R, split_n,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_tm, stride_dtm, stride_dbm, stride_dbn,
    scaling,
    LOWP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ATOMIC_DT: tl.constexpr, ATOMIC_DB: tl.constexpr, HAS_SCALE: tl.constexpr = False,
):
    """dT[M, r] = s * dY @ B and dB[N, r] = s * dY.T @ T (both fp32) in one pass over dY; with
    HAS_SCALE, dY (.) scale (per column, `_scaled_dy`) in place of dY.

    FLOPs 4*M*N*r (+ 2*M*N*r split work for 16-bit); minimum bytes (M*N + N*r) * itemsize +
    4*(2*M*r + N*r). Grid (cdiv(M, BLOCK_M), split_n); see the Note on atomics. Without ATOMIC_DB
    each row tile writes its own dB slice db[pid_m] (stride_dbm; the launcher sums the slices).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)
    m_ok = offs_m < M
    r_ok = offs_r < R
    t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :],
                mask=m_ok[:, None] & r_ok[None, :], other=0.0) * scaling
    acc_dt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(pid_n * BLOCK_N, N, split_n * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n.to(tl.int64)[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        dy = _scaled_dy(dy, scale_ptr, offs_n, N, HAS_SCALE)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
        if LOWP:
            acc_dt = tl.dot(dy, b, acc_dt)
        else:
            acc_dt = tl.dot(dy, b, acc_dt, input_precision=PREC)
        part = _dot_f32_rhs(tl.trans(dy), t, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), LOWP, PREC)
        db_ptrs = db_ptr + pid_m.to(tl.int64) * stride_dbm + offs_n.to(tl.int64)[:, None] * stride_dbn + offs_r[None, :]
        if ATOMIC_DB:
            tl.atomic_add(db_ptrs, part, mask=n_ok[:, None] & r_ok[None, :])
        else:
            tl.store(db_ptrs, part, mask=n_ok[:, None] & r_ok[None, :])
    dt_ptrs = dt_ptr + rows[:, None] * stride_dtm + offs_r[None, :]
    if ATOMIC_DT:
        tl.atomic_add(dt_ptrs, acc_dt * scaling, mask=m_ok[:, None] & r_ok[None, :])
    else:
        tl.store(dt_ptrs, acc_dt * scaling, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_dx_kernel(
    dy_ptr, w_ptr, dt_ptr, a_ptr, dx_ptr, seed_ptr, scale_ptr,
    M, N, K, R, m_bucket,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dtm, stride_ar, stride_ak, stride_dxm, stride_dxk,
    p, inv_keep,
    DROPOUT: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_SCALE: tl.constexpr = False,
):
    """dX[M, K] = dY @ W + mask * (dT @ A), fp32 accumulation, one rounding; with HAS_SCALE,
    (dY (.) scale) @ W (`_scaled_dy`, as the dT kernel scales it).

    The output tile is (BLOCK_M, BLOCK_N) over (M, K) and the reduction runs over N in BLOCK_K
    steps (names follow the GEMM roles, not the LoRA ones). FLOPs 2*M*N*K + 2*M*K*r; minimum
    bytes (M*N + N*K + r*K + M*K) * itemsize + 4*M*r.
    """
    pid_m, pid_k = grouped_pid(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_k.to(tl.int64)
    # The LoRA term first, as the accumulator's starting value: with dropout its mask (Philox over
    # the tile) and the masked product are done before the main loop, so the loop carries one
    # fp32 tile, not two (two spilled at 128x256 and 256x128 tiles on sm_90a).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # r-chunks of at most 32, as in the forward
        offs_r = r0 + tl.arange(0, BLOCK_R)
        dt = tl.load(dt_ptr + rows[:, None] * stride_dtm + offs_r[None, :],
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)  # (BLOCK_R, BLOCK_N)
        acc = _dot_f32_lhs(dt, a, acc, LOWP, PREC)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        acc = tl.where(_keep(seed, offs_m, offs_k, K, p), acc * inv_keep, 0.0)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        dy = _scaled_dy(dy, scale_ptr, offs_n, N, HAS_SCALE)
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)  # (BLOCK_K, BLOCK_N)
        if LOWP:
            acc = tl.dot(dy, w, acc)
        else:
            acc = tl.dot(dy, w, acc, input_precision=PREC)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _lora_da_kernel(
    dt_ptr, x_ptr, da_ptr, seed_ptr,
    M, K, R, split_m,
    stride_dtm, stride_xm, stride_xk, stride_dar,
    p, inv_keep,
    DROPOUT: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ATOMIC: tl.constexpr,
):
    """dA[r, K] (fp32) = dT.T @ dropout(x).

    FLOPs 2*M*K*r (+ 2*M*K*r split work for 16-bit); minimum bytes M*K*itemsize + 4*(M*r + r*K).
    Grid (cdiv(K, BLOCK_K), split_m): a split M range is summed into a zeroed dA with atomic adds.
    """
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    r_ok = offs_r < R
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_m * BLOCK_M, M, split_m * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        m_ok = offs_m < M
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep(seed, offs_m, offs_k, K, p), x, 0.0)
        dtt = tl.load(dt_ptr + offs_r[:, None] + rows[None, :] * stride_dtm,
                      mask=r_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_M)
        acc = _dot_f32_lhs(dtt, x, acc, LOWP, PREC)
    if DROPOUT:
        acc = acc * inv_keep
    da_ptrs = da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :]
    if ATOMIC:
        tl.atomic_add(da_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])
    else:
        tl.store(da_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])


@triton.jit
def _lora_small_m_partial_kernel(
    x_ptr, w_ptr, a_ptr, ws_ptr, wst_ptr, seed_ptr,
    M, N, K, R, chunk,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_wss, stride_wsts,
    p, inv_keep,
    DROPOUT: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Small-M forward, part 1 (see the Note on small M): program (tile, s) sums K range
    [s * chunk, (s + 1) * chunk) of x @ W.T for its (BLOCK_M, BLOCK_N) tile into ws[s] (fp32), and
    the programs of the first N tile also that range of dropout(x) @ A.T into wst[s] (fp32).

    FLOPs 2*M*N*K + 2*M*K*r; minimum bytes (M*K + N*K + r*K) * itemsize + 4*split*M*(N + r).
    """
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_ok = offs_m < M
    k_lo = pid_k * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & (offs_k[None, :] < k_hi), other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                     mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_hi), other=0.0)  # (BLOCK_K, BLOCK_N)
        if LOWP:
            acc = tl.dot(x, wt, acc)
        else:
            acc = tl.dot(x, wt, acc, input_precision=PREC)
    ws = ws_ptr + pid_k * stride_wss  # ws (split, M, N) and wst (split, M, R): contiguous
    tl.store(ws + rows[:, None] * N + cols[None, :], acc, mask=m_ok[:, None] & (offs_n[None, :] < N))
    if pid_n == 0:
        offs_r = tl.arange(0, BLOCK_R)
        if DROPOUT:
            seed = tl.load(seed_ptr)
        acc_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & (offs_k[None, :] < k_hi), other=0.0)
            if DROPOUT:
                x = tl.where(_keep(seed, offs_m, offs_k, K, p), x, 0.0)
            at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                         mask=(offs_r[None, :] < R) & (offs_k[:, None] < k_hi), other=0.0)  # (BLOCK_K, BLOCK_R)
            if LOWP:
                acc_t = tl.dot(x, at, acc_t)
            else:
                acc_t = tl.dot(x, at, acc_t, input_precision=PREC)
        if DROPOUT:
            acc_t = acc_t * inv_keep
        wst = wst_ptr + pid_k * stride_wsts
        tl.store(wst + rows[:, None] * R + offs_r[None, :], acc_t, mask=m_ok[:, None] & (offs_r[None, :] < R))


@triton.jit
def _lora_small_m_epilogue_kernel(
    ws_ptr, wst_ptr, b_ptr, bias_ptr, t_ptr, y_ptr, scale_ptr, v_ptr,
    M, N, R, split,
    stride_wss, stride_wsts, stride_bn, stride_br, stride_tm, stride_ym, stride_yn, stride_bias,
    stride_vm, stride_vn,
    scaling,
    HAS_BIAS: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCALE: tl.constexpr = False, STORE_V: tl.constexpr = False,
):
    """Small-M forward, part 2: y = sum_s ws[s] + (s * T) @ B.T + bias with T = sum_s wst[s], the
    split sums taken in a fixed order (bitwise reproducible); the first N tile also writes T.
    HAS_SCALE / STORE_V: the DoRA epilogue, as in `_lora_fwd_kernel`.

    FLOPs 2*M*N*r; minimum bytes (N*r + M*N + N) * itemsize + 4*split*M*(N + r) + 4*M*r.
    """
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mn_ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    mr_ok = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for sk in range(0, split):
        acc += tl.load(ws_ptr + sk * stride_wss + rows[:, None] * N + cols[None, :], mask=mn_ok, other=0.0)
        t += tl.load(wst_ptr + sk * stride_wsts + rows[:, None] * R + offs_r[None, :], mask=mr_ok, other=0.0)
    if pid_n == 0:
        tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :], t, mask=mr_ok)
    bt = tl.load(b_ptr + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                 mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)  # (BLOCK_R, BLOCK_N)
    acc = _dot_f32_lhs(t * scaling, bt, acc, LOWP, PREC)
    acc = _dora_epilogue(acc, scale_ptr, v_ptr, rows, cols, offs_m, offs_n, M, N, stride_vm, stride_vn,
                         HAS_SCALE, STORE_V)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mn_ok)


def _tuned(kernel):
    return triton.autotune(configs=_gemm_configs(), key=["m_bucket", "N", "K", "DROPOUT", "BLOCK_R"],
                           prune_configs_by={"early_config_prune": _prune_gemm}, do_bench=tune_bench)(kernel)


_lora_fwd_kernel_tuned = _tuned(_lora_fwd_kernel)
_lora_dx_kernel_tuned = _tuned(_lora_dx_kernel)


def _launch_gemm(kernel, tuned, m, cols, args, meta):
    """Launch one of the two GEMM kernels: autotuned, or with `_heuristic_config` block sizes."""
    if AUTOTUNE:
        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_N"]),)

        tuned[grid](*args, **meta)
    else:
        cfg = _heuristic_config(m)
        if not INTERPRET:
            blocks = {k: v for k, v in cfg.items() if k.isupper()}
            c = triton.Config(blocks, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))
            fit = (args[0].element_size(), meta["BLOCK_R"], bool(meta.get("DROPOUT", False)), args[0].device,
                   kernel is _lora_dx_kernel, bool(meta.get("HAS_SCALE", False)))
            if not _fitting([c], *fit):
                # the largest autotune tile no taller than M that fits (the list runs large to small)
                tall = max(16, triton.next_power_of_2(m))
                ok = _fitting([c for c in _gemm_configs() if c.kwargs["BLOCK_M"] <= tall], *fit)
                c = ok[0] if ok else _gemm_configs()[-1]
                cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        kernel[(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_N"]),)](*args, **meta, **cfg)


@triton.jit
def _lora_dropout_mask_kernel(keep_ptr, seed_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """keep[M, K] (int8) as the kernels above decide it (for tests and debugging only)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), offs_m, offs_k, K, p)
    tl.store(keep_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# --------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch
# --------------------------------------------------------------------------------------------


def _empty(shape, dtype, device):
    """Every buffer a kernel fully writes comes from here (tests patch it to NaN-fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


# The GEMM kernels walk the rank in chunks of at most this (their LoRA term is a short loop).
GEMM_R_CHUNK = 32


def _gemm_block_r(r: int) -> int:
    return min(_block_r(r), GEMM_R_CHUNK)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    lowp = dtype != torch.float32
    prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return lowp, prec


# Block sizes of the three small kernels (3 stages). At r=128 they fit A100's 163 KB of shared
# memory: fp32 halves the tiles because dt_db at 128x64 would need 176 KB there (sm_80 cubin).
def _shrink_blocks(m: int) -> tuple[int, int]:
    if INTERPRET:
        return 16, 32
    return (16, 128) if m <= 16 else (32, 128) if m <= 32 else (64, 64)


def _dt_db_blocks(m: int, lowp: bool, block_r: int = 16) -> tuple[int, int]:
    if INTERPRET:
        return 16, 32
    if block_r >= 128 and m > 16:
        return 64, 32  # rank 128: dT, the dB part and T at 128 rows spill on sm_80 (bench.static)
    return (16, 64) if m <= 16 else (64, 64) if m < 4096 or not lowp else (128, 64)


def _da_blocks(lowp: bool, block_r: int = 16) -> tuple[int, int]:
    if INTERPRET:
        return 16, 32
    if block_r >= 128:
        return 64, 32  # a (128, BLOCK_K) fp32 dA tile next to the dropout mask spills above 32 (bench.static)
    return (64, 128) if lowp else (64, 64)


def _split(tiles: int, steps: int, sms: int) -> int:
    """How many programs share one output tile's reduction: enough for ~2 waves, >= 4 steps each."""
    if tiles >= 2 * sms:
        return 1
    return max(1, min(-(-2 * sms // max(tiles, 1)), steps // 4))


# Small-M path (Note on small M): blocks and split over K. BLOCK_K=256 reads 512 contiguous bytes
# of each bf16 W row a step; BLOCK_N=32 gives N=1024 32 column tiles, N=4096 128. fp32 takes
# BLOCK_K=64: at 256 the (256, 128) fp32 A tile of r=128 alone needs 448 KB of shared memory
# over 4 stages (sm_90 cubin), against 73 KB for bf16.
SMALL_M_MAX = int(os.environ.get("LOWRANK_SMALL_M", "16"))


def _small_m_blocks(lowp: bool = True, block_r: int = 16) -> tuple[int, int, int]:
    if INTERPRET:
        return 16, 16, 32
    if block_r >= 128:
        return 16, 32, 32  # A's (128, BLOCK_K) tile spills at rank 128 above BLOCK_K 32 (bench.static)
    return 16, 32, 256 if lowp else 64


def _small_m_split(m: int, n: int, k: int, sms: int, lowp: bool = True, block_r: int = 16) -> int:
    """Programs per output tile: ~2 waves over the SMs, each program >= 2 K steps."""
    bm, bn, bk = _small_m_blocks(lowp, block_r)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return max(1, min(-(-2 * sms // tiles), triton.cdiv(k, bk) // 2))


def _small_m_forward(x, weight, lora_A, lora_B, scaling, bias, dropout, seed, y, split, scale=None, v=None):
    """Two launches: partial sums over K ranges into fp32 workspaces, then their fixed-order sum
    with the LoRA expand and bias (`_lora_small_m_partial_kernel`, `_lora_small_m_epilogue_kernel`)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    lowp, prec = _precision(x.dtype)
    bm, bn, bk = _small_m_blocks(lowp, _block_r(R))
    chunk = triton.cdiv(triton.cdiv(K, bk), split) * bk  # whole BLOCK_K steps per program
    split = triton.cdiv(K, chunk)  # no program without K work
    ws = _empty((split, M, N), torch.float32, x.device)
    wst = _empty((split, M, R), torch.float32, x.device)
    t = _empty((M, R), torch.float32, x.device)
    drop = dropout > 0.0
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    _lora_small_m_partial_kernel[(tiles, split)](
        x, weight, lora_A, ws, wst, seed if drop else t,
        M, N, K, R, chunk,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        ws.stride(0), wst.stride(0),
        float(dropout), 1.0 / (1.0 - dropout),
        DROPOUT=drop, LOWP=lowp, PREC=prec, BLOCK_R=_block_r(R), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=4, num_stages=4,
    )
    _lora_small_m_epilogue_kernel[(tiles,)](
        ws, wst, lora_B, bias if bias is not None else y, t, y, scale if scale is not None else y,
        v if v is not None else y,
        M, N, R, split,
        ws.stride(0), wst.stride(0), lora_B.stride(0), lora_B.stride(1), t.stride(0), y.stride(0), y.stride(1),
        bias.stride(0) if bias is not None else 0,
        v.stride(0) if v is not None else 0, v.stride(1) if v is not None else 0,
        float(scaling),
        HAS_BIAS=bias is not None, LOWP=lowp, PREC=prec, BLOCK_R=_block_r(R), BLOCK_M=bm, BLOCK_N=bn,
        HAS_SCALE=scale is not None, STORE_V=v is not None,
        num_warps=4, num_stages=2,
    )
    return y, t


def _check_seed(seed, dropout, device):
    if dropout == 0.0:
        return
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError(f"lora_matmul: dropout={dropout} needs a 1-element int64 seed tensor on {device}, "
                         f"got {None if seed is None else (tuple(seed.shape), seed.dtype, seed.device)}")


def _check_scale(scale, n, device, where):
    """DoRA's per-column scale: a contiguous fp32 (N,) tensor on the inputs' device, or None."""
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{where}: scale must be a torch.Tensor or None, got {type(scale).__name__}")
    if tuple(scale.shape) != (n,) or scale.dtype != torch.float32 or scale.device != device or scale.stride(0) != 1:
        raise ValueError(f"{where}: scale must be a contiguous ({n},) float32 tensor on {device}, got "
                         f"{tuple(scale.shape)} {scale.dtype} on {scale.device} (stride {tuple(scale.stride())})")


def draw_seed(device) -> torch.Tensor:
    """A fresh dropout seed from torch's generator for `device` (no host sync on CUDA)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_mask(seed: torch.Tensor, m: int, k: int, dropout: float) -> torch.Tensor:
    """The (m, k) float64 multiplier (0 or 1/(1-p)) that the kernels apply for `seed`, for debugging
    (the tests derive the mask independently, from Philox itself)."""
    keep = torch.empty((m, k), dtype=torch.int8, device=seed.device)
    if m and k:
        _lora_dropout_mask_kernel[(triton.cdiv(m, 32), triton.cdiv(k, 32))](keep, seed, m, k, dropout, BLOCK_M=32, BLOCK_K=32)
    return keep.double() / (1.0 - dropout)


def lora_forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, bias: Optional[torch.Tensor] = None, dropout: float = 0.0,
                 seed: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                 split_k: Optional[int] = None, small_m: Optional[int] = None,
                 scale: Optional[torch.Tensor] = None, v_out: Optional[torch.Tensor] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, T) for a 2-D x (M, K), any strides; weight (N, K) any strides (e.g. a Conv1D weight.t()).

    DoRA (`lowrank.ops.dora`): scale, a contiguous fp32 (N,) tensor, multiplies the fp32 accumulator
    column by column before the bias: y = scale (.) (x W^T + s T B^T) + bias, rounded once, in the
    same launch (no extra pass over y). v_out, an (M, N) tensor in x's dtype (any strides), receives
    the pre-scale v = x W^T + s T B^T from the same epilogue (m's gradient needs it). Both None:
    the plain LoRA kernel (the epilogue code is compiled out).

    y (M, N) in x's dtype (written into `out` when given); T = dropout(x) @ A.T (M, r) fp32, what
    the backward needs. FLOPs 2*M*K*r + 2*M*N*K + 2*M*N*r; minimum bytes
    (M*K + N*K + r*K + N*r + M*N [+ N]) * itemsize.

    split_k: the shrink's split over K (None: automatic). small_m: the small-M path (see the Note
    on small M) with this split over K (None: automatic, on a GPU for M <= SMALL_M_MAX; 0: never).
    """
    if x.dim() != 2:
        raise ValueError(f"lora_forward: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if R > MAX_RANK:
        raise ValueError(f"lora_forward: rank {R} > {MAX_RANK} is not supported by the kernels")
    _check_seed(seed, dropout, x.device)
    if out is not None and (tuple(out.shape) != (M, N) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"lora_forward: out must be ({M}, {N}) {x.dtype} on {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    _check_scale(scale, N, x.device, "lora_forward")
    if v_out is not None and (tuple(v_out.shape) != (M, N) or v_out.dtype != x.dtype or v_out.device != x.device):
        raise ValueError(f"lora_forward: v_out must be ({M}, {N}) {x.dtype} on {x.device}, "
                         f"got {tuple(v_out.shape)} {v_out.dtype} on {v_out.device}")
    y = out if out is not None else _empty((M, N), x.dtype, x.device)
    sms = num_sms(x.device)
    if small_m is None:
        small_m = (_small_m_split(M, N, K, sms, x.dtype != torch.float32, _block_r(lora_A.shape[0]))
                   if not INTERPRET and 0 < M <= SMALL_M_MAX and N > 0 else 0)
    if small_m > 0 and M > 0 and N > 0 and K > 0:
        return _small_m_forward(x, weight, lora_A, lora_B, scaling, bias, dropout, seed, y, small_m, scale, v_out)
    bm, bk = _shrink_blocks(M)
    tiles, steps = triton.cdiv(M, bm), triton.cdiv(K, bk)
    sk = 1 if torch.are_deterministic_algorithms_enabled() else split_k or _split(tiles, steps, sms)
    t = torch.zeros((M, R), dtype=torch.float32, device=x.device) if sk > 1 else _empty((M, R), torch.float32, x.device)
    lowp, prec = _precision(x.dtype)
    if M == 0:
        return y, t
    drop = dropout > 0.0
    seed_arg = seed if drop else t
    inv_keep = 1.0 / (1.0 - dropout)
    _lora_shrink_kernel[(tiles, sk)](
        x, lora_A, t, seed_arg, M, K, R, sk,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), t.stride(0),
        float(dropout), inv_keep,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=_block_r(R), ATOMIC=sk > 1, DROPOUT=drop, LOWP=lowp, PREC=prec,
        num_warps=4, num_stages=3,
    )
    if N == 0:
        return y, t
    _launch_gemm(_lora_fwd_kernel, _lora_fwd_kernel_tuned, M, N, (
        x, weight, t, lora_B, bias if bias is not None else y, y, scale if scale is not None else y,
        v_out if v_out is not None else y,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), t.stride(0),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), bias.stride(0) if bias is not None else 0,
        v_out.stride(0) if v_out is not None else 0, v_out.stride(1) if v_out is not None else 0,
        float(scaling),
    ), dict(HAS_BIAS=bias is not None, LOWP=lowp, PREC=prec, BLOCK_R=_gemm_block_r(R),
            HAS_SCALE=scale is not None, STORE_V=v_out is not None))
    return y, t


def lora_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                  lora_B: torch.Tensor, t: torch.Tensor, scaling: float, dropout: float = 0.0,
                  seed: Optional[torch.Tensor] = None, need_dx: bool = True,
                  dx_out: Optional[torch.Tensor] = None, split_n: Optional[int] = None,
                  split_m: Optional[int] = None, scale: Optional[torch.Tensor] = None,
                  ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(dX or None, dA, dB) for 2-D dy (M, N) and x (M, K), T from `lora_forward`, W frozen.

    scale (DoRA, as in `lora_forward`): the kernels read dY (.) scale (per column, rounded to dY's
    dtype as it is loaded) wherever they read dY, so g = dY (.) scale is never written.

    FLOPs 4*M*N*r (dT, dB) + 2*M*K*r (dA) [+ 2*M*N*K + 2*M*K*r (dX)]; minimum bytes
    (M*N + M*K + r*K + N*r [+ N*K + M*K]) * itemsize + 4*M*r.
    """
    if dy.dim() != 2 or x.dim() != 2:
        raise ValueError(f"lora_backward: dy and x must be 2-D, got {tuple(dy.shape)} and {tuple(x.shape)}")
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if tuple(dy.shape) != (M, N) or tuple(t.shape) != (M, R) or t.dtype != torch.float32:
        raise ValueError(f"lora_backward: dy must be ({M}, {N}) and t ({M}, {R}) float32, got "
                         f"{tuple(dy.shape)} and {tuple(t.shape)} {t.dtype}")
    if dy.dtype != x.dtype:
        raise TypeError(f"lora_backward: dy dtype {dy.dtype} != x dtype {x.dtype}")
    _check_seed(seed, dropout, x.device)
    _check_scale(scale, N, x.device, "lora_backward")
    dev, dtype = x.device, x.dtype
    sms = num_sms(dev)
    lowp, prec = _precision(dtype)
    drop = dropout > 0.0
    inv_keep = 1.0 / (1.0 - dropout)
    br = _block_r(R)

    # dT and dB: one pass over dY.
    bm, bn = _dt_db_blocks(M, lowp, br)
    tiles_m = triton.cdiv(M, bm)
    det = torch.are_deterministic_algorithms_enabled()
    sn = 1 if det else split_n or _split(tiles_m, triton.cdiv(N, bn), sms)
    atomic_db = tiles_m > 1 and not det
    dt = torch.zeros((M, R), dtype=torch.float32, device=dev) if sn > 1 else _empty((M, R), torch.float32, dev)
    if atomic_db:
        db32 = torch.zeros((N, R), dtype=torch.float32, device=dev)
    else:  # (tiles_m, N, R): one dB slice per row tile, summed below (deterministic mode)
        db32 = _empty((max(tiles_m, 1), N, R), torch.float32, dev)
    if M and N:
        _lora_dt_db_kernel[(tiles_m, sn)](
            dy, lora_B, t, dt, db32, scale if scale is not None else dt, M, N, R, sn,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), t.stride(0), dt.stride(0),
            0 if atomic_db else db32.stride(0), db32.stride(-2),
            float(scaling),
            LOWP=lowp, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, ATOMIC_DT=sn > 1, ATOMIC_DB=atomic_db,
            HAS_SCALE=scale is not None,
            num_warps=8 if bm == 128 else 4, num_stages=3,
        )
    elif M == 0:
        db32.zero_()
    if N == 0:
        dt.zero_()
    if not atomic_db:
        db32 = db32[0] if db32.shape[0] == 1 else db32.sum(0)  # (N, R), in a fixed order

    # dA = dT.T @ dropout(x).
    bm_a, bk_a = _da_blocks(lowp, br)
    tiles_k = triton.cdiv(K, bk_a)
    sm = 1 if det else split_m or _split(tiles_k, triton.cdiv(M, bm_a), sms)
    da32 = torch.zeros((R, K), dtype=torch.float32, device=dev) if sm > 1 else _empty((R, K), torch.float32, dev)
    seed_arg = seed if drop else dt
    if M and K:
        _lora_da_kernel[(tiles_k, sm)](
            dt, x, da32, seed_arg, M, K, R, sm,
            dt.stride(0), x.stride(0), x.stride(1), da32.stride(0),
            float(dropout), inv_keep,
            DROPOUT=drop, LOWP=lowp, PREC=prec, BLOCK_M=bm_a, BLOCK_K=bk_a, BLOCK_R=br, ATOMIC=sm > 1,
            num_warps=4, num_stages=3,
        )
    elif M == 0:
        da32.zero_()

    dx = None
    if need_dx:
        if dx_out is not None and (tuple(dx_out.shape) != (M, K) or dx_out.dtype != dtype or dx_out.device != dev):
            raise ValueError(f"lora_backward: dx_out must be ({M}, {K}) {dtype} on {dev}, "
                             f"got {tuple(dx_out.shape)} {dx_out.dtype} on {dx_out.device}")
        dx = dx_out if dx_out is not None else _empty((M, K), dtype, dev)
        if M and K:
            _launch_gemm(_lora_dx_kernel, _lora_dx_kernel_tuned, M, K, (
                dy, weight, dt, lora_A, dx, seed_arg, scale if scale is not None else dt,
                M, N, K, R, m_bucket(M),
                dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), dt.stride(0),
                lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
                float(dropout), inv_keep,
            ), dict(DROPOUT=drop, LOWP=lowp, PREC=prec, BLOCK_R=_gemm_block_r(R), HAS_SCALE=scale is not None))
    return dx, da32.to(dtype), db32.to(dtype)
