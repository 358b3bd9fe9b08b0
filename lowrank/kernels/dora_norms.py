"""W A^T and ||W_i||^2 in float64, one pass over W: what DoRA's row norms need (`lowrank.ops.dora`).

    weight_lora_proj(weight, lora_A, want_sq=False)          -> (P (N, r) float64, sq (N,) float64 or None)
    nf4_weight_lora_proj(nf4_weight, lora_A, want_sq=False)  -> the same from the 4-bit storage

P = W A^T and sq_i = ||W_i||^2. Each program owns BLOCK_N rows of W and walks K once: the W tile is
loaded (dense, any strides: a Conv1D weight's transpose) or decoded in the kernel from the NF4
storage by the fused QLoRA matmul's own tile decoders (`nf4_lora_matmul._w_tile_aligned` /
`_w_tile_gather`, then rounded once to the compute dtype: the bits `NF4Weight.dequantize(dtype)`
gives), widened to float64 with the A tile, and P's (BLOCK_N, R_PAD) float64 accumulator takes
tl.sum over K of the broadcast product (BLOCK_N, R_PAD, BLOCK_K); sq is the float64 sum of the squares
of the same tile. No dense W, no float64 copy of W in memory; each W element is read once.

# Note: float64 accumulation
The products of fp32 / fp16 / bf16 values are exact in float64 (at most 48 significant bits) and
every sum is a float64 addition, so each element of P is within K 2^-53 sum_k |W_ik| |A_jk| of the
exact W A^T whatever the order of the sum (likewise sq): the bound `ops.dora`'s cancellation check
assumes. A float64 weight (or A) takes the same path; its products round once more each.
Not `tl.dot`: Triton 3.6 does accept float64 operands with out_dtype=float64 (the float64 MMA,
`mma.sync ... m16n8k16 ... f64` on sm_90a, `m8n8k4` on sm_80, for fp32 loads widened in the
kernel), but with 16-bit loads or an in-register NF4 decode feeding it, its MMAv2 lowering fails
on both targets (assertion "Currently fp64 don't support largeK MMA", then "PassManager::run
failed"). The elementwise form compiles for every variant (`python -m bench.static --families
dora_norms`: 72 variants, no spills); its 2 N K r float64 FLOPs are small next to the layer's 6 M N K.

Tiles: BLOCK_N rows, BLOCK_K columns per step, the rank padded to R_PAD = next_pow2(r) (<= 128).
Chosen by `_config` (not autotuned).

Level 1: imports torch, Triton and level 0 (dtypes, nf4_format), and the NF4 tile decoders of the
fused QLoRA kernel (level 1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank.dtypes import check_dtype
from lowrank.nf4_format import NF4Weight, nf4_code

from ._common import INTERPRET, round_to
from .nf4_lora_matmul import _w_tile_aligned, _w_tile_gather

MAX_RANK = 128  # one register block of the rank (R_PAD); ops.dora keeps larger ranks on torch


@triton.jit
def _dora_norms_kernel(
    w_ptr, packed_ptr, absmax_ptr, code_ptr, a_ptr, p_ptr, sq_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_pn,
    NF4: tl.constexpr, ALIGNED: tl.constexpr, BLOCKSIZE: tl.constexpr,
    HAS_A: tl.constexpr, WANT_SQ: tl.constexpr, INTERPRETED: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """P (N, R) = W (N, K) @ A (R, K)^T and sq (N,) = rowwise sum of W^2, both float64.

    Dense (NF4 False): W at w_ptr with strides (stride_wn, stride_wk). NF4: W decoded from packed /
    absmax (fp32 per block, already decoded) / code, rounded to w_ptr's element type (w_ptr is then
    only a carrier of the compute dtype; it is never read). ALIGNED: K % BLOCKSIZE == 0.
    """
    pid = tl.program_id(0)
    n0 = pid * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float64)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if NF4:
            if ALIGNED:
                w = _w_tile_aligned(packed_ptr, absmax_ptr, code_ptr, n0, k0, offs_n, offs_k, n_ok, k_ok, K,
                                    False, BLOCKSIZE, BLOCK_N, BLOCK_K)
            else:
                w = _w_tile_gather(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, n_ok, k_ok, K, False, BLOCKSIZE)
            w = round_to(w, w_ptr.dtype.element_ty, INTERPRETED).to(tl.float64)  # deq(W)'s bits, widened
            # The aligned decoder leaves code * 0 (+-0) outside W; a masked zero keeps that explicit.
            w = tl.where(n_ok[:, None] & k_ok[None, :], w, 0.0)
        else:
            w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float64)
        if HAS_A:
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float64)  # (R_PAD, BLOCK_K)
            acc += tl.sum(w[:, None, :] * a[None, :, :], axis=2)  # exact products, float64 sums
        if WANT_SQ:
            sq += tl.sum(w * w, axis=1)
    if HAS_A:
        tl.store(p_ptr + offs_n.to(tl.int64)[:, None] * stride_pn + offs_r[None, :], acc,
                 mask=n_ok[:, None] & r_ok[None, :])
    if WANT_SQ:
        tl.store(sq_ptr + offs_n, sq, mask=n_ok)


def _r_pad(r: int) -> int:
    return triton.next_power_of_2(max(r, 1))


def _config(r_pad: int, interpret: bool = INTERPRET) -> dict:
    """Tiles by padded rank: the broadcast product is (BLOCK_N, R_PAD, BLOCK_K) float64 values, kept
    at 8K or 16K elements so that every variant compiles without register spills for sm_90a and sm_80,
    dense and NF4 (`python -m bench.static --families dora_norms`; at r = 128, 16 x 16 and 32 x 8 spilled
    ~400-600 bytes). Not timed on a GPU yet."""
    if interpret:
        return dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
    if r_pad <= 16:
        return dict(BLOCK_N=32, BLOCK_K=16, num_warps=8, num_stages=3)
    if r_pad <= 64:  # r <= 32 at 32 x 8 spilled 16 bytes (bf16, sm_90a)
        return dict(BLOCK_N=16, BLOCK_K=16, num_warps=8, num_stages=3)
    return dict(BLOCK_N=16, BLOCK_K=8, num_warps=8, num_stages=3)


def _empty(shape, device):
    """Every float64 buffer the kernel fully writes comes from here (tests patch it to NaN-fill)."""
    return torch.empty(shape, dtype=torch.float64, device=device)


def _check_a(lora_A, k: int, device, where: str):
    if lora_A is None:
        return 0
    if not isinstance(lora_A, torch.Tensor):
        raise TypeError(f"{where}: lora_A must be a torch.Tensor or None, got {type(lora_A).__name__}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"{where}: lora_A must be (r, {k}) for the weight's {k} columns, got {tuple(lora_A.shape)}")
    check_dtype(lora_A.dtype, where, "lora_A dtype", float64=True)
    if lora_A.device != device:
        raise ValueError(f"{where}: lora_A is on {lora_A.device}, the weight on {device}")
    r = lora_A.shape[0]
    if r > MAX_RANK:
        raise ValueError(f"{where}: rank {r} > {MAX_RANK} is not supported by the kernel")
    return r


def _launch(w_arg, nf4: NF4Weight | None, absmax, lora_A, n: int, k: int, want_sq: bool, config: dict | None,
            w_strides=(0, 0)):
    device = w_arg.device
    r = 0 if lora_A is None else lora_A.shape[0]
    has_a = lora_A is not None
    p = _empty((n, r), device) if has_a else None
    sq = _empty((n,), device) if want_sq else None
    if n == 0 or (not has_a and not want_sq):
        return p, sq
    if k == 0:  # an empty sum: nothing to launch
        return (p.zero_() if has_a else None), (sq.zero_() if want_sq else None)
    r_pad = _r_pad(r)
    cfg = dict(config or _config(r_pad))
    dummy = w_arg
    a = lora_A.detach() if has_a else dummy
    _dora_norms_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        w_arg, nf4.packed if nf4 is not None else dummy, absmax if nf4 is not None else dummy,
        nf4_code(device) if nf4 is not None else dummy, a, p if has_a else dummy, sq if want_sq else dummy,
        n, k, r,
        w_strides[0], w_strides[1], a.stride(0) if has_a else 0, a.stride(1) if has_a else 0,
        p.stride(0) if has_a else 0,
        NF4=nf4 is not None, ALIGNED=nf4 is not None and k % nf4.blocksize == 0,
        BLOCKSIZE=nf4.blocksize if nf4 is not None else 64, HAS_A=has_a, WANT_SQ=want_sq, INTERPRETED=INTERPRET,
        R_PAD=r_pad, **cfg,
    )
    return p, sq


def weight_lora_proj(weight: torch.Tensor, lora_A: torch.Tensor | None, want_sq: bool = False,
                     config: dict | None = None):
    """(W A^T (N, r) float64, ||W_i||^2 (N,) float64 or None), one pass over W.

    weight: (N, K) fp32 / fp16 / bf16 / float64, any strides; lora_A: (r, K), r <= 128, any float dtype
    and strides, on W's device, or None (then only sq, and P is None). config: tiles (BLOCK_N,
    BLOCK_K, num_warps, num_stages); default `_config`."""
    where = "dora_norms.weight_lora_proj"
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D (N, K), got {tuple(weight.shape)}")
    check_dtype(weight.dtype, where, "weight dtype", float64=True)
    n, k = weight.shape
    _check_a(lora_A, k, weight.device, where)
    w = weight.detach()
    return _launch(w, None, None, lora_A, n, k, want_sq, config, w_strides=(w.stride(0), w.stride(1)))


def nf4_weight_lora_proj(nf4_weight: NF4Weight, lora_A: torch.Tensor | None, want_sq: bool = False,
                         dtype: torch.dtype | None = None, absmax: torch.Tensor | None = None,
                         config: dict | None = None):
    """`weight_lora_proj` for W = nf4_weight.dequantize(dtype) (default: its own dtype), decoded tile
    by tile from the 4-bit storage inside the kernel. absmax: the decoded fp32 block scales
    (`nf4_weight.block_absmax()`), when the caller has them."""
    where = "dora_norms.nf4_weight_lora_proj"
    if not isinstance(nf4_weight, NF4Weight):
        raise TypeError(f"{where}: nf4_weight must be a lowrank.NF4Weight, got {type(nf4_weight).__name__}")
    dtype = dtype or nf4_weight.dtype
    check_dtype(dtype, where, "compute dtype")
    n, k = nf4_weight.shape
    _check_a(lora_A, k, nf4_weight.device, where)
    if absmax is None:
        absmax = nf4_weight.block_absmax()
    elif absmax.dtype != torch.float32 or absmax.shape != nf4_weight.absmax.shape:
        raise ValueError(f"{where}: absmax must be the fp32 {tuple(nf4_weight.absmax.shape)} block scales, got "
                         f"{absmax.dtype} {tuple(absmax.shape)}")
    carrier = torch.empty(1, dtype=dtype, device=nf4_weight.device)  # the compute dtype, for the kernel
    return _launch(carrier, nf4_weight, absmax, lora_A, n, k, want_sq, config)
