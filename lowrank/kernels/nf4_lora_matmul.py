"""The fused NF4 LoRA matmul: out = a @ op(deq(W)) + lora_scale * lora_l @ lora_r (+ bias).

The NF4 tiles of W (`lowrank.nf4_format`, bitsandbytes' format) are decoded inside the K loop: no
dense W in memory. The LoRA expand is one more tl.dot into the same fp32 accumulator, and the
output is rounded once. Forward: op(W) = W.T (out (M, N), reduce over K); backward: op(W) = W
(dX (M, K), reduce over N). A decoded weight value is fp32(NF4 * absmax) rounded to the compute
dtype: the very bits `NF4Weight.dequantize(dtype)` gives, so the only difference with the
reference path is the order of the fp32 accumulation.

Small M (<= 16): the same kernel with one M tile and wide reduction tiles, so each 4-bit weight
byte is read exactly once, split over the reduction (SPLIT_Q programs per output tile, fp32
atomic adds into a workspace, one rounding at the end) so that a decode-size launch still has two
programs per SM. The split sums in a run-dependent order: not bitwise reproducible.

Tiles: autotuned for M > 16 under the package's policy (`_common.AUTOTUNE`), else `_config`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank.dtypes import check_dtype
from lowrank.nf4_format import NF4Weight, nf4_code

from ._common import AUTOTUNE, INTERPRET, grouped_pid, m_bucket, num_sms, round_to, tune_bench


@triton.jit
def _w_tile_gather(packed_ptr, absmax_ptr, code_ptr, offs_q, offs_p, q_ok, p_ok, K_W,
                   W_TRANSPOSED: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """op(W)[q, p] for any K: one byte, nibble and absmax gather per element (fp32)."""
    if W_TRANSPOSED:
        e = offs_p[None, :].to(tl.int64) * K_W + offs_q[:, None]  # (BLOCK_Q, BLOCK_P)
    else:
        e = offs_q[:, None].to(tl.int64) * K_W + offs_p[None, :]
    w_ok = q_ok[:, None] & p_ok[None, :]
    byte = tl.load(packed_ptr + e // 2, mask=w_ok, other=0).to(tl.int32)
    nib = (byte >> ((1 - (e % 2).to(tl.int32)) * 4)) & 0xF  # even element: high nibble
    scale = tl.load(absmax_ptr + e // BLOCKSIZE, mask=w_ok, other=0.0)
    return tl.load(code_ptr + nib) * scale


@triton.jit
def _w_tile_aligned(packed_ptr, absmax_ptr, code_ptr, q0, p0, offs_q, offs_p, q_ok, p_ok, K_W,
                    W_TRANSPOSED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """op(W)[q, p] when K % blocksize == 0 (every real model): no block spans rows, so a row's
    bytes are loaded contiguously, both nibbles of a byte are used, and each run of
    min(blocksize, tile) elements of a row shares one absmax, loaded once (fp32)."""
    if W_TRANSPOSED:
        # tile (BLOCK_Q over K, BLOCK_P over N): bytes (BLOCK_Q/2, BLOCK_P), contiguous along K
        HALF: tl.constexpr = BLOCK_Q // 2
        SPAN: tl.constexpr = BLOCK_Q if BLOCKSIZE > BLOCK_Q else BLOCKSIZE
        G: tl.constexpr = BLOCK_Q // SPAN
        offs_b = q0 // 2 + tl.arange(0, HALF)
        rows = offs_p[None, :].to(tl.int64)
        byte = tl.load(packed_ptr + rows * (K_W // 2) + offs_b[:, None],
                       mask=(offs_b[:, None] < K_W // 2) & p_ok[None, :], other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 0xF))
        vals = tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (BLOCK_Q, BLOCK_P))  # k = 2i + j
        start = q0 + tl.arange(0, G) * SPAN  # (G,) first k of each run
        scale = tl.load(absmax_ptr + (rows * K_W + start[:, None]) // BLOCKSIZE,
                        mask=(start[:, None] < K_W) & p_ok[None, :], other=0.0)  # (G, BLOCK_P)
        vals = tl.reshape(tl.reshape(vals, (G, SPAN, BLOCK_P)) * scale[:, None, :], (BLOCK_Q, BLOCK_P))
    else:
        # tile (BLOCK_Q over N, BLOCK_P over K): bytes (BLOCK_Q, BLOCK_P/2), contiguous along K
        HALF: tl.constexpr = BLOCK_P // 2
        SPAN: tl.constexpr = BLOCK_P if BLOCKSIZE > BLOCK_P else BLOCKSIZE
        G: tl.constexpr = BLOCK_P // SPAN
        offs_b = p0 // 2 + tl.arange(0, HALF)
        rows = offs_q[:, None].to(tl.int64)
        byte = tl.load(packed_ptr + rows * (K_W // 2) + offs_b[None, :],
                       mask=q_ok[:, None] & (offs_b[None, :] < K_W // 2), other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 0xF))
        vals = tl.reshape(tl.join(hi, lo), (BLOCK_Q, BLOCK_P))  # k = 2i + j
        start = p0 + tl.arange(0, G) * SPAN
        scale = tl.load(absmax_ptr + (rows * K_W + start[None, :]) // BLOCKSIZE,
                        mask=q_ok[:, None] & (start[None, :] < K_W), other=0.0)  # (BLOCK_Q, G)
        vals = tl.reshape(tl.reshape(vals, (BLOCK_Q, G, SPAN)) * scale[:, :, None], (BLOCK_Q, BLOCK_P))
    return vals


@triton.jit
def _nf4_lora_matmul_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, l_ptr, r_ptr, bias_ptr, out_ptr, scale_ptr, v_ptr,
    M, P, Q, K_W, lora_scale, q_per_split, m_bucket,
    stride_am, stride_aq, stride_lm, stride_lr, stride_rr, stride_rp, stride_om, stride_op, stride_vm, stride_vp,
    W_TRANSPOSED: tl.constexpr, ALIGNED: tl.constexpr, BLOCKSIZE: tl.constexpr,
    HAS_LORA: tl.constexpr, R_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_Q: tl.constexpr, HAS_SCALE: tl.constexpr = False, STORE_V: tl.constexpr = False,
):
    """out (M, P) = a (M, Q) @ op(W) (Q, P) + lora_scale * l (M, r) @ r (r, P) + bias (P,).

    W is (N, K_W) in NF4. Forward (W_TRANSPOSED): P = N, Q = K_W, op(W)[q, p] = W[p, q].
    Backward: P = K_W, Q = N, op(W)[q, p] = W[q, p]. absmax: decoded fp32 per block.
    SPLIT_Q > 1 (small M): program_id(1) takes q_per_split of Q and atomically adds its fp32
    partial sum into out (an fp32 workspace); split 0 alone adds the LoRA term and the bias.
    DoRA (HAS_SCALE, scale: fp32 (N,)): forward, out = scale (.) (a @ W.T + lora) + bias, the fp32
    accumulator scaled per column before the bias, and with STORE_V the pre-scale value written to v
    too (SPLIT_Q > 1: each split's partial sum scaled before its atomic add, and its pre-scale
    partial added into v, an fp32 workspace); backward, a = dY is read as dY (.) scale per column,
    rounded to its dtype as loaded (the torch path's g = dy * scale), never written. Without them
    the code is compiled out.
    """
    pid_m, pid_p = grouped_pid(M, P, BLOCK_M, BLOCK_P, GROUP_M)
    pid_s = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_ok = offs_m < M
    p_ok = offs_p < P
    compute_ty = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    q_start = pid_s * q_per_split
    q_end = tl.minimum(Q, q_start + q_per_split)
    for q0 in range(q_start, q_end, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < Q
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_q[None, :] * stride_aq,
                    mask=m_ok[:, None] & q_ok[None, :], other=0.0)
        if HAS_SCALE and not W_TRANSPOSED:
            sc = tl.load(scale_ptr + offs_q, mask=q_ok, other=0.0)
            a = round_to(a.to(tl.float32) * sc[None, :], compute_ty, INTERPRETED)
        if ALIGNED:
            w = _w_tile_aligned(packed_ptr, absmax_ptr, code_ptr, q0, pid_p * BLOCK_P, offs_q, offs_p, q_ok, p_ok, K_W,
                                W_TRANSPOSED, BLOCKSIZE, BLOCK_Q, BLOCK_P)
        else:
            w = _w_tile_gather(packed_ptr, absmax_ptr, code_ptr, offs_q, offs_p, q_ok, p_ok, K_W,
                               W_TRANSPOSED, BLOCKSIZE)
        w = round_to(w, compute_ty, INTERPRETED)  # deq(W)'s bits in the compute dtype
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        ll = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                    mask=m_ok[:, None] & (pid_s == 0), other=0.0)
        rr = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp,
                     mask=p_ok[None, :], other=0.0)
        if IEEE:
            lora = tl.dot(ll, rr, input_precision="ieee")
        else:
            lora = tl.dot(ll, rr)
        acc += lora_scale * lora
    if STORE_V and W_TRANSPOSED:
        v_ptrs = v_ptr + offs_m[:, None] * stride_vm + offs_p[None, :] * stride_vp
        if SPLIT_Q > 1:
            tl.atomic_add(v_ptrs, acc, mask=m_ok[:, None] & p_ok[None, :])
        else:
            tl.store(v_ptrs, round_to(acc, v_ptr.dtype.element_ty, INTERPRETED), mask=m_ok[:, None] & p_ok[None, :])
    if HAS_SCALE and W_TRANSPOSED:
        acc = acc * tl.load(scale_ptr + offs_p, mask=p_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=p_ok & (pid_s == 0), other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
    if SPLIT_Q > 1:
        tl.atomic_add(out_ptrs, acc, mask=m_ok[:, None] & p_ok[None, :])
    else:
        tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=m_ok[:, None] & p_ok[None, :])


# Autotuned tiles for M > 16 (`_common.AUTOTUNE`): `_config`'s two large-M tiles and neighbours,
# adapted per launch by `_prune_tuned` to the shared-memory rules `_config` follows (every pruned
# set is compiled for sm_90 by the tests).
_TUNE_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, GROUP_M=8), num_warps=nw, num_stages=ns)
    # Each compiles without register spills for sm_90a in both directions, aligned and gather
    # (`python -m bench.static`); 128x128x64 (8 warps) and 4-warp 128x64 / 64x128 tiles spilled.
    for bm, bp, bq, nw, ns in [(128, 128, 32, 8, 4), (128, 128, 32, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 8, 4),
                               (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
]


def _capability(nargs, kwargs) -> int:
    """The launch's compute capability (major): CAP when given (bench.static), else the device's."""
    if "CAP" in kwargs:
        return kwargs["CAP"]
    a = nargs.get("a_ptr")
    return torch.cuda.get_device_capability(a.device)[0] if a is not None and a.is_cuda else 9


# The IEEE fp32 candidates (see `_config`): spill-free on both targets, both directions.
_IEEE_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, GROUP_M=8), num_warps=nw, num_stages=2)
    for bm, bp, bq, nw in [(128, 64, 16, 8), (64, 64, 32, 8), (64, 32, 32, 4)]
]


def _prune_tuned(configs, nargs, **kwargs):
    """The candidates for one launch, held to `_config`'s rules: fp32 operands (IEEE) take their own
    tiles at 2 stages; the unaligned gather tile at BLOCK_Q <= 64 and 2 stages. On sm_80 the gather tile
    and 4-warp tiles take BLOCK_Q 32: wider ones spill there (bench.static); the 16-bit gather dX tile
    with DoRA's scaled dY at 128x128 takes BLOCK_Q 16 (`_config`)."""
    out = []
    cap = _capability(nargs, kwargs)
    if kwargs.get("IEEE"):
        configs = _IEEE_CONFIGS
    for c in configs:
        kw, stages = dict(c.kwargs), c.num_stages
        if kwargs.get("IEEE"):
            stages = 2
        if not kwargs.get("ALIGNED", True):
            kw["BLOCK_Q"], stages = min(kw["BLOCK_Q"], 64), 2
        if cap < 9 and (not kwargs.get("ALIGNED", True) or c.num_warps < 8):
            kw["BLOCK_Q"] = min(kw["BLOCK_Q"], 32)
        if cap < 9 and _scaled_gather_dx_spills(kw, kwargs.get("ALIGNED", True), bool(kwargs.get("IEEE")),
                                                bool(kwargs.get("HAS_SCALE")) and not kwargs.get("W_TRANSPOSED")):
            kw["BLOCK_Q"] = 16
        cfg = triton.Config(kw, num_warps=c.num_warps, num_stages=stages)
        if all(cfg.kwargs != o.kwargs or (cfg.num_warps, cfg.num_stages) != (o.num_warps, o.num_stages) for o in out):
            out.append(cfg)
    return out


_nf4_lora_matmul_tuned = triton.autotune(
    configs=_TUNE_CONFIGS, key=["m_bucket", "P", "Q", "W_TRANSPOSED", "ALIGNED", "HAS_LORA", "HAS_SCALE"],
    prune_configs_by={"early_config_prune": _prune_tuned}, do_bench=tune_bench)(_nf4_lora_matmul_kernel)


def _pad_rank(t: torch.Tensor, dim: int, r_pad: int) -> torch.Tensor:
    """Zero-pad the rank dimension to r_pad (tl.dot needs >= 16 and a power of two)."""
    r = t.shape[dim]
    if r == r_pad:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, r_pad - r]
    return torch.nn.functional.pad(t, pad)


def _split_for(tiles: int, q: int, block_q: int, device) -> int:
    """Splits of the reduction so that a small-M launch has >= 2 programs per SM (a GEMV is
    bandwidth-bound: it needs every SM streaming weight bytes)."""
    return max(1, min(triton.cdiv(2 * num_sms(device), tiles), triton.cdiv(q, block_q)))


# Shared memory per block of the H100/H200; devices with less (A100: 163 KB) get 2 stages at small M.
HOPPER_SMEM = 232448


def _scaled_gather_dx_spills(blocks: dict, aligned: bool, ieee: bool, scaled_dy: bool) -> bool:
    """Whether an sm_80 tile needs BLOCK_Q 16 for DoRA's scaled dY: the 16-bit gather dX tile at
    128x128x32 (8 warps, 2 stages) spilled 64 bytes (255 registers) with it, 128x128x16 none (214;
    `python -m bench.static`, sm_80); every other scaled variant compiles without spills."""
    return (scaled_dy and not aligned and not ieee and blocks["BLOCK_M"] * blocks["BLOCK_P"] >= 128 * 128
            and blocks["BLOCK_Q"] > 16)


def _config(m: int, interpret: bool, dtype: torch.dtype = torch.bfloat16, aligned: bool = True,
            smem_limit: int = HOPPER_SMEM, scaled_dy: bool = False) -> dict:
    """Tile sizes by M, chosen (before any GPU run) as the largest tiles for which sm_90a ptxas
    reports no register spills in either direction, aligned or gather (`python -m bench.static`);
    8 warps where 4 spilled. scaled_dy: the dX direction with DoRA's scale (sm_80 prunes one tile)."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32, GROUP_M=4, num_warps=4, num_stages=1)
    if m <= 16:
        # One M tile: each 4-bit weight byte is read once (split over Q: `_split_for`).
        cfg = dict(BLOCK_M=16, BLOCK_P=64, BLOCK_Q=256, GROUP_M=1, num_warps=8, num_stages=3)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        # 128x128x64 spilled 20 bytes in the forward (sm_90a); 128x128x32 at 4 stages does not.
        cfg = dict(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=32, GROUP_M=8, num_warps=8, num_stages=4)
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with thin K steps: these tiles compile without spills on
        # sm_90a and sm_80 in both directions (bench.static; the 16-bit tiles spilled kilobytes, at
        # -O3 ptxas gave them 32 registers). Two stages: fp32 operands double the staged bytes.
        bm, bp, bq, nw = (16, 64, 16, 4) if m <= 16 else (64, 64, 32, 8) if m <= 64 else (128, 64, 16, 8)
        cfg = dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, GROUP_M=cfg["GROUP_M"], num_warps=nw, num_stages=2)
    if not aligned:
        # The per-element gather tile goes through shared memory for its layout change: the
        # aligned path's 16x64x256 tile would not fit in 227 KB.
        cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], 64 if m > 16 else 32)  # 16x64x64 spilled 8 bytes
        cfg["num_stages"] = 2
    if smem_limit < HOPPER_SMEM:  # an A100-class device (sm_80)
        if m <= 16:
            # 3 stages of the small-M tile need 174 KB (bench.static): more than an A100 block has.
            cfg["num_stages"] = 2
        if not aligned:
            cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], 32)  # the gather tile spills above 32 on sm_80
        if _scaled_gather_dx_spills(cfg, aligned, dtype == torch.float32, scaled_dy):
            cfg["BLOCK_Q"] = 16
    return cfg


def nf4_lora_matmul(a: torch.Tensor, w: NF4Weight, absmax: torch.Tensor, transposed: bool,
                    lora_l: torch.Tensor | None = None, lora_r: torch.Tensor | None = None,
                    lora_scale: float = 1.0, bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, config: dict | None = None,
                    scale: torch.Tensor | None = None, v_out: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, Q) @ op(deq(W)) + lora_scale * lora_l (M, r) @ lora_r (r, P) + bias, in a's dtype.

    transposed=True: op(W) = W.T (the forward, Q = in_features, P = out_features);
    transposed=False: op(W) = W (dX in the backward, Q = out_features, P = in_features).
    absmax: the fp32 (blocks,) decoded block scales (`NF4Weight.block_absmax()`).
    config: tile sizes (BLOCK_M, BLOCK_P, BLOCK_Q, GROUP_M, num_warps, num_stages); default by M.

    DoRA (`lowrank.ops.dora`): scale, a contiguous fp32 (N,) tensor (N = out_features). Forward: the
    fp32 accumulator is multiplied column by column before the bias, out = scale (.) (a W^T + lora)
    + bias, rounded once, in the same launch; v_out, an (M, N) tensor in a's dtype (any strides),
    receives the pre-scale a W^T + lora from the same accumulator (m's gradient needs it). Backward:
    a (dY) is read as dY (.) scale per column, rounded to a's dtype as it is loaded (what the torch
    path's g = dy * scale holds), never written. Both None: the plain kernel (the code compiled out).
    """
    n_w, k_w = w.shape
    m, q = a.shape
    p, q_expect = (n_w, k_w) if transposed else (k_w, n_w)
    if q != q_expect:
        raise ValueError(f"nf4_lora_matmul: a has {q} columns, the NF4 weight {tuple(w.shape)} needs {q_expect}")
    check_dtype(a.dtype, "nf4_lora_matmul", "a dtype")
    if scale is not None:
        if not isinstance(scale, torch.Tensor):
            raise TypeError(f"nf4_lora_matmul: scale must be a torch.Tensor or None, got {type(scale).__name__}")
        if tuple(scale.shape) != (n_w,) or scale.dtype != torch.float32 or scale.device != a.device \
                or scale.stride(0) != 1:
            raise ValueError(f"nf4_lora_matmul: scale must be a contiguous ({n_w},) float32 tensor on {a.device}, "
                             f"got {tuple(scale.shape)} {scale.dtype} on {scale.device} "
                             f"(stride {tuple(scale.stride())})")
    if v_out is not None:
        if not transposed or scale is None:
            raise ValueError("nf4_lora_matmul: v_out is the forward's (transposed=True) pre-scale output: it needs "
                             "transposed=True and a scale")
        if tuple(v_out.shape) != (m, p) or v_out.dtype != a.dtype or v_out.device != a.device:
            raise ValueError(f"nf4_lora_matmul: v_out must be ({m}, {p}) {a.dtype} on {a.device}, got "
                             f"{tuple(v_out.shape)} {v_out.dtype} on {v_out.device}")
    has_lora = lora_l is not None
    r_pad = 16
    if has_lora:
        r = lora_l.shape[1]
        if lora_r.shape != (r, p) or lora_l.shape[0] != m:
            raise ValueError(f"nf4_lora_matmul: lora_l {tuple(lora_l.shape)} and lora_r {tuple(lora_r.shape)} do not "
                             f"fit ({m}, r) and (r, {p})")
        r_pad = max(16, triton.next_power_of_2(r))
        lora_l = _pad_rank(lora_l.to(a.dtype), 1, r_pad)
        lora_r = _pad_rank(lora_r.to(a.dtype), 0, r_pad)
    if out is None:
        out = torch.empty(m, p, dtype=a.dtype, device=a.device)
    if m == 0 or p == 0:
        return out
    aligned = k_w % w.blocksize == 0
    dummy = a
    args = [a, w.packed, absmax, nf4_code(a.device),
            lora_l if has_lora else dummy, lora_r if has_lora else dummy, bias if bias is not None else dummy]
    lora_strides = [lora_l.stride(0), lora_l.stride(1), lora_r.stride(0), lora_r.stride(1)] if has_lora else [0] * 4
    consts = dict(W_TRANSPOSED=transposed, ALIGNED=aligned, BLOCKSIZE=w.blocksize, HAS_LORA=has_lora, R_PAD=r_pad,
                  HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32, INTERPRETED=INTERPRET)
    if scale is not None:  # absent: the kernel's defaults, the plain kernel exactly as before
        consts.update(HAS_SCALE=True, STORE_V=v_out is not None)
    dora = [scale if scale is not None else dummy, v_out if v_out is not None else dummy]
    v_strides = [v_out.stride(0), v_out.stride(1)] if v_out is not None else [0, 0]
    if config is None and m > 16 and AUTOTUNE:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]), 1)

        _nf4_lora_matmul_tuned[grid](
            *args, out, *dora, m, p, q, k_w, float(lora_scale), q, m_bucket(m),
            a.stride(0), a.stride(1), *lora_strides, out.stride(0), out.stride(1), *v_strides, **consts, SPLIT_Q=1)
        return out
    smem = HOPPER_SMEM if INTERPRET else triton.runtime.driver.active.utils.get_device_properties(
        a.device.index)["max_shared_mem"]
    cfg = dict(config or _config(m, INTERPRET, a.dtype, aligned, smem, scaled_dy=scale is not None and not transposed))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"])
    split = cfg.pop("SPLIT_Q", None)
    if split is None:
        split = _split_for(tiles, q, cfg["BLOCK_Q"], a.device) if m <= 16 and not INTERPRET else 1
    q_per_split = triton.cdiv(triton.cdiv(q, split), cfg["BLOCK_Q"]) * cfg["BLOCK_Q"]
    split = triton.cdiv(q, q_per_split)
    target = out if split == 1 else torch.zeros(m, p, dtype=torch.float32, device=a.device)
    v_target = v_out
    if split > 1 and v_out is not None:  # the split partial sums of v, added in fp32 as the output's
        v_target = torch.zeros(m, p, dtype=torch.float32, device=a.device)
        dora[1], v_strides = v_target, [v_target.stride(0), v_target.stride(1)]
    _nf4_lora_matmul_kernel[(tiles, split)](
        *args, target, *dora, m, p, q, k_w, float(lora_scale), q_per_split, m_bucket(m),
        a.stride(0), a.stride(1), *lora_strides, target.stride(0), target.stride(1), *v_strides,
        **consts, SPLIT_Q=split, **cfg,
    )
    if split > 1:
        out.copy_(target)  # the one rounding of the split-Q sum
        if v_out is not None:
            v_out.copy_(v_target)
    return out
