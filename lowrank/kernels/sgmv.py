"""SGMV: segmented LoRA shrink / expand for batches whose tokens use different adapters.

Tokens are sorted by adapter id into segments. Segment 0 holds the base-model tokens (id -1, or
any id outside [0, n)) and has rank 0: shrink skips it, expand only copies its rows. Segment
i + 1 is adapter i. Every adapter keeps its own rank, and the kernels read each adapter's own
tensors in place through a table of their addresses and strides (`weight_table`: no packed copy,
so nothing can go stale when a weight is edited, through `.data` or otherwise); each kernel walks
adapter i's r_i rows only, in BLOCK_R steps, so a rank-4 adapter next to a rank-64 one costs a
rank-4 amount of work (one BLOCK_R=16 step, masked), not a rank-64 one.

    shrink: T[p, :r_i]  = (s_i *) X[order[p]] @ W_i.T                  (fp32 T; W_i = A_i, or B_i.T)
    expand: Y[order[p]]  = S[order[p]] + (s_i *) T[p, :r_i] @ W_i      (S or 0; W_i = B_i.T, or A_i)
    wgrad:  G_i         = (s_i *) sum_{p in segment i} T[p, :r_i]^T X[order[p]]   (packed rows roff_i)

T is indexed by sorted position p, with a row stride of max r_i; only its first r_i columns of a
segment-i row are ever written or read.

# Note: metadata on the device
`segment_metadata` builds everything the kernels read (sort order, segment starts and lengths,
the tile -> (segment, first row) map) with torch ops on the ids' device and shapes that depend
only on M and the number of adapters: no `.item()`, no host sync, so the whole forward and
backward can be captured in a CUDA graph. The grid is sized for the worst case,
cdiv(M, BLOCK_M) + n_adapters + 1 tiles (each segment wastes at most one partial tile); tiles
past the last segment exit at once. Expand writes every row of its output (base rows too), so
the op needs no clone of the base output: one read of it and one write of the result, as an
in-place addmm would.

# Note: BLOCK_R
Expand and the weight gradient step through each adapter's rank 16 at a time (the smallest
tl.dot tile), so their work follows the true rank. Shrink reads X, which is M x K and by far its
largest operand: on a GPU it takes the whole rank (up to 64) in one tile so that X is read once
per adapter-tile, not once per 16 ranks; the A rows beyond r_i are masked (no memory traffic),
only tensor-core slots idle. The interpreter uses 16 there too, to test the multi-block path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import num_sms


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, wtab_ptr, t_ptr, scale_ptr,
    order_ptr, seg_start_ptr, seg_len_ptr, rank_ptr, tile_seg_ptr, tile_m0_ptr,
    K, n_segments, stride_wtab,
    stride_xm, stride_xk, stride_tm,
    SCALED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + pid)
    if seg >= n_segments:
        return
    rank = tl.load(rank_ptr + seg)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    m0 = tl.load(tile_m0_ptr + pid)
    start = tl.load(seg_start_ptr + seg)
    count = tl.load(seg_len_ptr + seg)
    # This segment's own weight matrix W_i (r_i, K), read in place: its address and strides.
    w_ptr = tl.load(wtab_ptr + seg).to(tl.pointer_type(x_ptr.dtype.element_ty))
    stride_wr = tl.load(wtab_ptr + stride_wtab + seg)
    stride_wk = tl.load(wtab_ptr + 2 * stride_wtab + seg)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_r[None, :] * stride_wr + offs_k[:, None] * stride_wk,
                    mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_R)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if SCALED:
        acc = acc * tl.load(scale_ptr + seg)
    tl.store(t_ptr + (start + offs_m)[:, None] * stride_tm + offs_r[None, :], acc,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _sgmv_expand_kernel(
    t_ptr, wtab_ptr, src_ptr, y_ptr, scale_ptr,
    order_ptr, seg_start_ptr, seg_len_ptr, rank_ptr, tile_seg_ptr, tile_m0_ptr,
    N, n_segments, stride_wtab,
    stride_tm, stride_sm, stride_sn, stride_ym, stride_yn,
    SCALED: tl.constexpr, HAS_SRC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + pid)
    if seg >= n_segments:
        return
    rank = tl.load(rank_ptr + seg)
    m0 = tl.load(tile_m0_ptr + pid)
    start = tl.load(seg_start_ptr + seg)
    count = tl.load(seg_len_ptr + seg)
    # This segment's own weight matrix W_i (r_i, N), read in place (for B_i: a transposed view).
    w_ptr = tl.load(wtab_ptr + seg).to(tl.pointer_type(y_ptr.dtype.element_ty))
    stride_wr = tl.load(wtab_ptr + stride_wtab + seg)
    stride_wn = tl.load(wtab_ptr + 2 * stride_wtab + seg)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        t = tl.load(t_ptr + (start + offs_m)[:, None] * stride_tm + offs_r[None, :],
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        w = tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wn,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(t, w.to(tl.float32), acc, input_precision=PRECISION)
    if SCALED:
        acc = acc * tl.load(scale_ptr + seg)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_SRC:
        src = tl.load(src_ptr + rows[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        acc += src.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sgmv_wgrad_kernel(
    g_ptr, x_ptr, out_ptr, scale_ptr,
    order_ptr, seg_start_ptr, seg_len_ptr, rank_ptr, roff_ptr,
    K, SPLIT,
    stride_gm, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    SCALED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (seg * SPLIT + sp) sums part sp of segment seg's rows into slice sp of out (see the
    # Note on the weight gradient's split).
    seg = tl.program_id(0) // SPLIT
    sp = tl.program_id(0) % SPLIT
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    rank = tl.load(rank_ptr + seg)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    start = tl.load(seg_start_ptr + seg)
    count = tl.load(seg_len_ptr + seg)
    roff = tl.load(roff_ptr + seg)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    chunk = tl.cdiv(tl.cdiv(count, SPLIT), BLOCK_M) * BLOCK_M  # whole tiles per part
    m_lo = sp * chunk
    m_hi = tl.minimum(count, m_lo + chunk)
    # An unused adapter (count 0), or a part past the segment's end, runs no iteration and stores
    # zeros: every output element is written.
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_hi
        rows = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0)
        g = tl.load(g_ptr + (start + offs_m)[None, :] * stride_gm + offs_r[:, None],
                    mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_R, BLOCK_M) fp32
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(g, x.to(tl.float32), acc, input_precision=PRECISION)
    if SCALED:
        acc = acc * tl.load(scale_ptr + seg)
    tl.store(out_ptr + sp * stride_os + (roff + offs_r)[:, None] * stride_or + offs_k[None, :] * stride_ok,
             acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])


# -- launchers ----------------------------------------------------------------------------------------
def _blocks(device: torch.device, r_max: int = 16) -> dict:
    if device.type == "cuda":
        shrink_r = min(64, max(16, triton.next_power_of_2(r_max)))  # see the Note on BLOCK_R
        return {"BLOCK_M": 64, "BLOCK_R": 16, "SHRINK_R": shrink_r, "BLOCK_K": 64, "BLOCK_N": 128}
    # The interpreter runs each program as numpy ops: small tiles keep test shapes cheap.
    return {"BLOCK_M": 16, "BLOCK_R": 16, "SHRINK_R": 16, "BLOCK_K": 32, "BLOCK_N": 32}


def _precision(dtype: torch.dtype) -> tuple[str, str]:
    """(precision of dots on input-dtype operands, precision of dots on fp32 T operands).

    fp32 models get IEEE fp32 dots (what torch does with allow_tf32 off); 16-bit models get tf32
    for the fp32 intermediate, which keeps 3 more mantissa bits than rounding T to bf16 would."""
    return ("ieee", "ieee") if dtype == torch.float32 else ("tf32", "tf32")


def segment_metadata(ids: torch.Tensor, n_adapters: int, block_m: int) -> dict:
    """Device tensors the kernels read; see the Note above. ids: (M,) int64; -1 (and anything
    outside [0, n_adapters)) is the base model. Segment s = adapter s - 1; segment 0 = base."""
    n_seg = n_adapters + 1
    m = ids.numel()
    dev = ids.device
    key = torch.where((ids >= 0) & (ids < n_adapters), ids + 1, 0)
    sorted_key, order = torch.sort(key, stable=True)
    segments = torch.arange(n_seg, device=dev, dtype=sorted_key.dtype)
    seg_start = torch.searchsorted(sorted_key, segments)
    seg_len = torch.searchsorted(sorted_key, segments, right=True) - seg_start
    tiles = (seg_len + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(m, block_m) + n_seg
    t = torch.arange(max_tiles, device=dev, dtype=tile_end.dtype)
    tile_seg = torch.searchsorted(tile_end, t, right=True)  # n_seg for tiles past the last segment
    first_tile = (tile_end - tiles)[tile_seg.clamp(max=n_seg - 1)]
    tile_m0 = (t - first_tile) * block_m
    return {"order": order, "seg_start": seg_start, "seg_len": seg_len, "tile_seg": tile_seg,
            "tile_m0": tile_m0, "max_tiles": max_tiles}


META_KEYS = ("order", "seg_start", "seg_len", "tile_seg", "tile_m0")


def metadata_from_list(tensors) -> dict:
    """The dict `segment_metadata` returns, from its tensors listed in META_KEYS order."""
    meta = dict(zip(META_KEYS, tensors))
    meta["max_tiles"] = meta["tile_seg"].numel()
    return meta


def weight_table(mats, device) -> torch.Tensor:
    """(3, 1 + n) int64 on `device`: address, row stride and column stride (in elements) of each
    adapter's matrix W_i (r_i, C), column 0 for the base segment (never read). The kernels read the
    adapters' own tensors through it: no packed copy that could go stale. Cached by value, so that
    a CUDA-graph capture (after one warm-up call) never copies from the host."""
    cols = [(0, 0, 0)] + [(m.data_ptr(), m.stride(0), m.stride(1)) for m in mats]
    key = (tuple(cols), str(device))
    hit = _WEIGHT_TABLES.get(key)
    if hit is None:
        hit = torch.tensor(list(zip(*cols)), dtype=torch.int64, device=device)
        if len(_WEIGHT_TABLES) > 1024:
            _WEIGHT_TABLES.clear()
        _WEIGHT_TABLES[key] = hit
    return hit


_WEIGHT_TABLES: dict = {}


def shrink(x, wtab, t, meta, tables, r_max, scaled: bool):
    """t[p, :r_i] = (s_i *) x[order[p]] @ W_i.T for the W_i (r_i, K) of `wtab` (`weight_table`);
    t: (M, r_max) fp32. The W_i have x's dtype."""
    b = _blocks(x.device, r_max)
    prec, _ = _precision(x.dtype)
    k = x.shape[1]
    grid = (meta["max_tiles"], triton.cdiv(r_max, b["SHRINK_R"]))
    _sgmv_shrink_kernel[grid](
        x, wtab, t, tables["scale"],
        meta["order"], meta["seg_start"], meta["seg_len"], tables["rank"],
        meta["tile_seg"], meta["tile_m0"],
        k, len(tables["ranks"]) + 1, wtab.stride(0),
        x.stride(0), x.stride(1), t.stride(0),
        SCALED=scaled, PRECISION=prec, BLOCK_M=b["BLOCK_M"], BLOCK_R=b["SHRINK_R"], BLOCK_K=b["BLOCK_K"],
    )


def expand(t, wtab, src, y, meta, tables, scaled: bool):
    """y[order[p]] = src[order[p]] (or 0 when src is None) + (s_i *) t[p, :r_i] @ W_i for the W_i
    (r_i, N) of `wtab` (y's dtype). Writes every row of y (rows of base tokens get src, or 0)."""
    b = _blocks(y.device)
    _, prec = _precision(y.dtype)
    n = y.shape[1]
    grid = (meta["max_tiles"], triton.cdiv(n, b["BLOCK_N"]))
    s = y if src is None else src
    _sgmv_expand_kernel[grid](
        t, wtab, s, y, tables["scale"],
        meta["order"], meta["seg_start"], meta["seg_len"], tables["rank"],
        meta["tile_seg"], meta["tile_m0"],
        n, len(tables["ranks"]) + 1, wtab.stride(0),
        t.stride(0), s.stride(0), s.stride(1), y.stride(0), y.stride(1),
        SCALED=scaled, HAS_SRC=src is not None, PRECISION=prec,
        BLOCK_M=b["BLOCK_M"], BLOCK_R=b["BLOCK_R"], BLOCK_N=b["BLOCK_N"],
    )


def wgrad_split(device: torch.device, m: int, programs: int, block_m: int) -> int:
    """How many parts the weight gradient splits each segment's rows into (see the Note)."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: more of them only cost time
    target = 4 * num_sms(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    # at least 4 row tiles per part, so the partial sums stay a small fraction of the traffic
    return max(1, min(target // max(programs, 1), m // (4 * block_m)))


def wgrad(g, x, out, meta, tables, r_max, scaled: bool, split: int | None = None):
    """out[roff_i : roff_i + r_i] = (s_i *) g[segment i, :r_i].T @ x[order[segment i]] for every adapter.

    # Note: the weight gradient's split
    One program per (segment, rank block, K block) walks all of its segment's rows. With few
    adapters and a small rank that is few programs (1 adapter, r=16, K=4096: 128, under one per
    SM of an H200) each with a long serial loop over M. `split` > 1 cuts each segment's rows into
    that many parts (whole BLOCK_M tiles), one program each, writing fp32 partial sums that one
    torch.sum adds: deterministic (no atomics), and the choice depends on M and the grid only, not
    on the ids, so it is CUDA-graph safe. Default: `wgrad_split`, enough programs for ~4 per SM."""
    b = _blocks(x.device)
    _, prec = _precision(x.dtype)
    k, m = x.shape[1], x.shape[0]
    n_seg = len(tables["ranks"]) + 1
    rk = (triton.cdiv(r_max, b["BLOCK_R"]), triton.cdiv(k, b["BLOCK_K"]))
    if split is None:
        split = wgrad_split(x.device, m, n_seg * rk[0] * rk[1], b["BLOCK_M"])
    if split < 1:
        raise ValueError(f"sgmv wgrad: split must be >= 1, got {split}")
    dest = out if split == 1 else torch.empty((split, *out.shape), device=out.device, dtype=torch.float32)
    _sgmv_wgrad_kernel[(n_seg * split, *rk)](
        g, x, dest, tables["scale"],
        meta["order"], meta["seg_start"], meta["seg_len"], tables["rank"], tables["roff"],
        k, split,
        g.stride(0), x.stride(0), x.stride(1), 0 if split == 1 else dest.stride(0), dest.stride(-2),
        dest.stride(-1),
        SCALED=scaled, PRECISION=prec, BLOCK_M=b["BLOCK_M"], BLOCK_R=b["BLOCK_R"], BLOCK_K=b["BLOCK_K"],
    )
    if split > 1:
        out.copy_(dest.sum(0))
