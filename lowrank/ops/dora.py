"""The DoRA linear op without the dense matrix: y = m / ||W + s B A|| (.) (x W^T + s dropout(x) A^T B^T) + bias.

    lowrank.ops.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, dropout=0.0)
    lowrank.ops.dora.dora_row_norms(weight, lora_A, lora_B, scaling)    # ||W_i + s (B A)_i||, float64
    lowrank.ops.dora.nf4_dora_linear(x, nf4_weight, lora_A, lora_B, magnitude, scaling, bias=None, dropout=0.0)

DoRA (weight-decomposed LoRA) rescales each output row of the LoRA layer by m_i / ||W_i + s (BA)_i||.
Every implementation in use forms the N x K matrix W + s B A to take those norms; this one never
forms an N x K tensor (tested with a dispatch-mode probe on every allocation): by the expansion

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s sum_j B_ij (W A^T)_ij + s^2 sum_j (B (A A^T))_ij B_ij

the norms need W A^T (N x r, one pass over W), the r x r Gram matrix A A^T, and ||W_i||^2.

# Note: accuracy of the row norms
All terms are accumulated in float64. W A^T: W is read in blocks of rows (at most `_CHUNK_ELEMENTS`
elements each) converted to float64; ||W_i||^2 likewise, once (W is frozen: `LoRALinear` caches it
while the weight's storage and version counter stay the same; `weight_row_sq_norms`). On one CPU
thread at 4096 x 4096, r = 16 this costs ~17 ms against ~7 ms for an fp32 W A^T (a sgemm and the
float64 tail), ~1% of a 1024-token forward + backward; and an fp32 W A^T would leave each norm
~sqrt(K) 2^-24 off (~4e-6 at K = 4096), several times peft's dense fp32 norm's error. The float64
evaluation of the expansion has an error of at most about 3 (K + r + 1) 2^-53 M_i with
M_i = (||W_i|| + |s| sum_j |B_ij| ||A_j||)^2, a bound on every term's magnitude. Where the terms
cancel (the row of W + s B A much smaller than W's), that is large relative to the result: every row
whose computed square norm is below 2^26 times that bound (so that its relative error could exceed
2^-26, i.e. the norm's 2^-27, under half an fp32 ulp) is recomputed directly, W_i + s B_i A formed in
float64 for those rows only (again in blocks of at most `_CHUNK_ELEMENTS`). With trained adapters
such rows are rare; a row that is exactly zero in W and B (M_i = 0) is exactly zero and needs none.
On the Triton path W A^T and ||W_i||^2 come from a kernel instead (see the Note: the Triton path),
with the same float64 accumulation and error bound; the rest (Gram matrix, expansion, the check and
the direct recompute) is the same float64 torch code on both paths.

# Note: zero norms
peft 0.21.2 divides m by the norm as is: a zero row (Llama-3.1-8B's o_proj has 511 of them, where
m is initialised to ||W_i|| = 0) gives 0 / 0 = NaN at step 0. Here the scale is m_i / n_i where
n_i > 0 and 0 where n_i = 0 (1/n taken as 0: the row outputs its bias, and neither m_i nor the
adapter get a gradient through it -- the row's direction is undefined), computed in float64 and
clamped to the largest finite value of the compute dtype, then rounded once. Outputs and
gradients stay finite wherever x, W, A, B and m are.

# Note: what matches peft
The norm is detached, as in peft's default and the DoRA paper's section 4.3: it gets no gradient,
so the gradients of x, A, B and m are peft's. Without dropout y = scale (.) (x W^T + s x A^T B^T) + bias
(`_DoRALinear`: one GEMM over W forward, one backward, as LoRA; the pre-scale output v is saved
for m's gradient when m needs one: an (M, N) activation). With dropout peft's own formula, which
is not the same function: y = x W^T + bias + (scale - 1) (.) (h W^T) + scale (.) s h A^T B^T with h =
dropout(x), a second GEMM over W, differentiated by autograd.

# Note: the Triton path
Where `backend_for(x)` is "triton" (CUDA tensors, or LOWRANK_BACKEND=triton) and the LoRA kernels
take the arguments (`lora_matmul.supported`: not float64, rank <= 128, W and bias frozen), without
dropout, `dora_linear` runs `_DoRATriton`: the norms as above, then ONE fused LoRA
forward launch whose epilogue multiplies the fp32 accumulator by the fp32 scale before the bias
(`lora_forward(..., scale=, v_out=)`) and, when m needs a gradient, also writes the pre-scale v from
the same accumulator; the backward kernels read dY (.) scale wherever they read dY (g is never
written), and m's gradient is sum over rows of dY (.) v, times 1 / n, in torch. The scale stays fp32
there (clamped to the compute dtype's finite range as above, but not rounded to a 16-bit dtype:
one rounding less than the torch path), y = round(scale (.) v32 + bias) with v32 the fp32
accumulator. The launches are the custom ops `lowrank::dora_linear_fwd` / `_bwd` (fake
implementations registered), so torch.compile traces ops, not Triton launches. With dropout, the
torch path runs (peft's formula needs a second GEMM over W).
The row norms on that backend (`dora_row_norms` / `weight_row_sq_norms` wherever `backend_for` says
"triton", dense or NF4 weight, rank <= 128, any path that calls them): W A^T (N, r) and ||W_i||^2 in one
pass over W by `lowrank.kernels.dora_norms` (float64 products and sums in the kernel; an NF4 weight
decoded tile by tile in the kernel by the QLoRA matmul's own decoders, rounded to the compute dtype:
no dense or float64 copy of W), through `_Rows.kernel_proj` and the custom ops `lowrank::dora_norms_dense` /
`_nf4` (fakes registered); the CPU default stays the torch path.

NF4 (QLoRA) bases: `nf4_dora_linear` takes the norms from the 4-bit storage, a block of rows decoded
at a time (`_Rows`). On the Triton backend without dropout (`_NF4DoRATriton`, the custom ops
`lowrank::nf4_dora_linear_fwd` / `_bwd`, fake implementations registered) the matmuls run on the
fused NF4-decode LoRA kernel (`lowrank/kernels/nf4_lora_matmul.py`) as on dense bases: T = x A^T in x's dtype
(as the QLoRA op takes it), then ONE fused launch whose epilogue scales the fp32 accumulator by the
fp32 scale before the bias (`nf4_lora_matmul(..., scale=, v_out=)`, v written when m trains); the
backward's dX launch reads dY (.) scale as it loads dY, and dT = s dY (scale (.) B), dB = s scale (.)
(dY^T T) carry the scale on the (N, r) side, so g = dY (.) scale is never written; m's gradient as
above, in m's own dtype (fp32 master weights). Only the 4-bit storage is saved, never a dense W.
Otherwise (dropout, or the CPU backend) the matmuls run through `nf4_lora_linear` (tile-by-tile decode)
and autograd.

Level 2: imports torch, level 0 (nf4_format, backend, dtypes) and level 2 (lora_matmul's argument checks and
kernel loader, the QLoRA op and its kernel loader); level 1 (the LoRA and NF4 LoRA kernels, the norms kernel)
only on the Triton path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lowrank.backend import backend_for
from lowrank.dtypes import check_dtype
from lowrank.nf4_format import NF4Weight, nf4_code

from .lora_matmul import (_flat, _kernels, autocast_inputs, check_dropout, check_lora_args, lora_input_grads,
                          supported)
from .nf4_lora_matmul import _kernels as _nf4_kernels
from .nf4_lora_matmul import _weight, nf4_lora_linear

_CHUNK_ELEMENTS = 1 << 18  # elements of W converted to float64 at a time (2 MiB)
_U64 = 2.0 ** -53
_RECOMPUTE_FACTOR = 2.0 ** 26  # recompute a row whose square norm's error bound exceeds 2^-26 of it


def _row_blocks(n: int, k: int):
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


class _Rows:
    """Rows of a weight as float64 blocks: a dense (N, K) tensor (any strides), or an NF4Weight decoded
    from its 4-bit storage a block of rows at a time (each value as `dequantize(dtype)` holds it: the
    fp32 product code * absmax rounded once to `dtype`, the compute dtype), never the whole matrix."""

    def __init__(self, weight, dtype: torch.dtype | None = None):
        self.weight = weight
        self.nf4 = isinstance(weight, NF4Weight)
        self.shape = tuple(weight.shape)
        self.device = weight.device
        self.dtype = (dtype or weight.dtype) if self.nf4 else weight.dtype
        self._absmax = weight.block_absmax() if self.nf4 else None  # fp32 (blocks,): 1/16 of W's bytes in fp32
        self._buf = None

    def block(self, i: int, j: int) -> torch.Tensor:
        """Rows i:j as float64 (j - i, K), in a buffer reused by the next call (a fresh block each time
        costs its allocation: ~15% of the norms' time at 4096 x 4096)."""
        if self.nf4:
            return self._nf4_rows(i, j).to(torch.float64)
        if self._buf is None or self._buf.shape[0] < j - i:
            self._buf = torch.empty(j - i, self.shape[1], dtype=torch.float64, device=self.device)
        return self._buf[:j - i].copy_(self.weight[i:j].detach())

    def kernel_proj(self, lora_A: torch.Tensor | None, want_sq: bool):
        """(W A^T (N, r) or None when lora_A is None, ||W_i||^2 (N,) or None unless want_sq), float64,
        from `lowrank.kernels.dora_norms` in one pass over W (dense, or NF4 decoded in the kernel) where
        `backend_for` says "triton" and the kernel takes the rank; else None (the torch path)."""
        if backend_for(self.weight.packed if self.nf4 else self.weight) != "triton":
            return None
        from lowrank.kernels import dora_norms  # Triton is optional: imported on its path only

        if lora_A is not None and lora_A.shape[0] > dora_norms.MAX_RANK:
            return None
        a = None if lora_A is None else lora_A.detach()
        if self.nf4:
            w = self.weight
            p, sq = torch.ops.lowrank.dora_norms_nf4(w.packed, self._absmax, list(self.shape), w.blocksize, self.dtype,
                                                     a, want_sq)
        else:
            p, sq = torch.ops.lowrank.dora_norms_dense(self.weight.detach(), a, want_sq)
        return (p if lora_A is not None else None), (sq if want_sq else None)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows listed in idx as float64 (len(idx), K)."""
        if not self.nf4:
            return self.weight.detach()[idx].to(torch.float64)
        return torch.cat([self._nf4_rows(i, i + 1) for i in idx.tolist()]).to(torch.float64)

    def _nf4_rows(self, i: int, j: int) -> torch.Tensor:
        w, (n, k) = self.weight, self.shape
        out = torch.empty(j - i, k, dtype=self.dtype, device=self.device)
        if w.decode_tile_native((i, j), (0, k), out):  # the CPU library: whole blocks per row
            return out
        start, stop = i * k, j * k  # rows are a contiguous range of the flat, blocked storage
        flat = w.packed.reshape(-1)[start // 2:(stop + 1) // 2]
        nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[start % 2:start % 2 + stop - start]
        blocks = torch.arange(start, stop, device=self.device) // w.blocksize
        vals = nf4_code(self.device)[nibbles.long()] * self._absmax[blocks]  # fp32, rounded once
        return out.copy_(vals.view(j - i, k))  # the one rounding to the compute dtype


# The norms kernel as custom ops (torch.compile sees ops, not Triton launches): (W A^T (N, r), or an empty
# (N, 0) without lora_A; ||W_i||^2 (N,), or an empty (0,) unless want_sq), float64.
@torch.library.custom_op("lowrank::dora_norms_dense", mutates_args=())
def dora_norms_dense(weight: torch.Tensor, lora_A: Optional[torch.Tensor],
                     want_sq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from lowrank.kernels import dora_norms  # Triton is optional: imported on its path only

    p, sq = dora_norms.weight_lora_proj(weight, lora_A, want_sq)
    return _proj_outputs(p, sq, weight.shape[0], weight.device)


@dora_norms_dense.register_fake
def _(weight, lora_A, want_sq):
    return _fake_proj(weight.shape[0], lora_A, want_sq, weight)


@torch.library.custom_op("lowrank::dora_norms_nf4", mutates_args=())
def dora_norms_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: list[int], blocksize: int,
                   dtype: torch.dtype, lora_A: Optional[torch.Tensor],
                   want_sq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax: the decoded fp32 block scales (an NF4Weight without double quantization, the same W)."""
    from lowrank.kernels import dora_norms  # Triton is optional: imported on its path only

    w = NF4Weight(packed=packed, absmax=absmax, shape=tuple(shape), dtype=dtype, blocksize=blocksize)
    p, sq = dora_norms.nf4_weight_lora_proj(w, lora_A, want_sq, dtype=dtype, absmax=absmax)
    return _proj_outputs(p, sq, shape[0], packed.device)


@dora_norms_nf4.register_fake
def _(packed, absmax, shape, blocksize, dtype, lora_A, want_sq):
    return _fake_proj(shape[0], lora_A, want_sq, packed)


def _proj_outputs(p, sq, n: int, device):
    return (torch.empty(n, 0, dtype=torch.float64, device=device) if p is None else p,
            torch.empty(0, dtype=torch.float64, device=device) if sq is None else sq)


def _fake_proj(n: int, lora_A, want_sq: bool, like: torch.Tensor):
    r = 0 if lora_A is None else lora_A.shape[0]
    return (like.new_empty((n, r), dtype=torch.float64), like.new_empty((n,) if want_sq else (0,), dtype=torch.float64))


@torch.no_grad()
def weight_row_sq_norms(weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """||W_i||^2 for each row of weight (N, K), float64 (N,), accumulated in float64 in blocks of rows.
    weight: a dense tensor, or an NF4Weight whose rows are decoded to `dtype` (default its own dtype)
    a block at a time. Where `backend_for` says "triton": the norms kernel, float64 in one pass over W."""
    rows = _Rows(weight, dtype)
    proj = rows.kernel_proj(None, want_sq=True)
    if proj is not None:
        return proj[1]
    n, k = rows.shape
    out = torch.empty(n, dtype=torch.float64, device=rows.device)
    for i, j in _row_blocks(n, k):
        wc = rows.block(i, j)
        out[i:j] = (wc * wc).sum(1)
    return out


def _torch_proj(rows: _Rows, weight, a64: torch.Tensor) -> torch.Tensor:
    """W A^T (N, r) float64 on the torch path: W's rows converted to float64 a block at a time."""
    n, k = rows.shape
    if rows.dtype == torch.float64 and not rows.nf4:
        return weight.detach() @ a64.t()
    p = torch.empty(n, a64.shape[0], dtype=torch.float64, device=rows.device)
    a64t = a64.t().contiguous()  # (K, r): the GEMM reads it faster than a transposed view
    for i, j in _row_blocks(n, k):
        torch.mm(rows.block(i, j), a64t, out=p[i:j])
    return p


@torch.no_grad()
def dora_row_norms(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   weight_sq: torch.Tensor | None = None, return_recomputed: bool = False,
                   dtype: torch.dtype | None = None):
    """||W_i + scaling * (B A)_i|| for every row i, float64 (N,), without an N x K tensor, each within
    2^-27 relative (see the Note on accuracy: float64 throughout; rows where the terms cancel are
    recomputed directly).

    weight: (N, K), any strides (a Conv1D weight's transpose), or an NF4Weight, its rows decoded to
    `dtype` (the compute dtype; default its own) a block at a time from the 4-bit storage;
    lora_A: (r, K); lora_B: (N, r). weight_sq: ||W_i||^2 as float64 (N,) (`weight_row_sq_norms`),
    when the caller caches it. return_recomputed=True returns (norms, the int64 indices of the rows
    recomputed directly)."""
    rows = _Rows(weight, dtype)
    n, k = rows.shape
    r = lora_A.shape[0]
    s = float(scaling)
    a64 = lora_A.detach().to(torch.float64)  # (r, K)
    b64 = lora_B.detach().to(torch.float64)  # (N, r)
    proj = rows.kernel_proj(lora_A, want_sq=weight_sq is None)  # the Triton path: W read once for both
    if proj is not None:
        p, w2 = proj[0], (proj[1] if weight_sq is None else weight_sq)
    else:
        w2 = weight_row_sq_norms(weight, dtype) if weight_sq is None else weight_sq
        p = _torch_proj(rows, weight, a64)
    gram = a64 @ a64.t()  # (r, r)
    cross = (b64 * p).sum(1)
    quad = ((b64 @ gram) * b64).sum(1)
    n2 = w2 + (2.0 * s) * cross + (s * s) * quad
    # Bound on every term's magnitude, and the evaluation's error bound (Note: accuracy).
    mag = (w2.sqrt() + abs(s) * (b64.abs() @ a64.norm(dim=1))).square()
    bound = 3.0 * (k + r + 1) * _U64 * mag
    bad = torch.nonzero(n2 < _RECOMPUTE_FACTOR * bound).flatten()
    norms = n2.clamp_min(0.0).sqrt()
    if bad.numel():
        rows_per = max(1, _CHUNK_ELEMENTS // max(k, 1))
        for c in range(0, bad.numel(), rows_per):
            idx = bad[c:c + rows_per]
            direct = rows.take(idx)  # (rows, K) float64
            direct.addmm_(b64[idx], a64, alpha=s)
            norms[idx] = direct.norm(dim=1)
    return (norms, bad) if return_recomputed else norms


@torch.library.custom_op("lowrank::dora_row_norms", mutates_args=())
def dora_row_norms_op(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      weight_sq: Optional[torch.Tensor]) -> torch.Tensor:
    """`dora_row_norms` of a dense weight as one op, for torch.compile: its recompute of the rows
    where the terms cancel (a nonzero, then a loop over those rows) has a data-dependent size that a
    graph cannot hold; inside an op the graph sees an (N,) float64 result."""
    return dora_row_norms(weight, lora_A, lora_B, scaling, weight_sq=weight_sq)


@dora_row_norms_op.register_fake
def _(weight, lora_A, lora_B, scaling, weight_sq):
    return weight.new_empty((weight.shape[0],), dtype=torch.float64)


@torch.library.custom_op("lowrank::nf4_dora_row_norms", mutates_args=())
def nf4_dora_row_norms_op(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                          nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], shape: list[int],
                          dtype: torch.dtype, blocksize: int, nested_blocksize: int, lora_A: torch.Tensor,
                          lora_B: torch.Tensor, scaling: float, weight_sq: Optional[torch.Tensor],
                          compute_dtype: torch.dtype) -> torch.Tensor:
    """`dora_row_norms_op` for an NF4 weight, given as its tensors (an op takes no NF4Weight)."""
    w = NF4Weight(packed=packed, absmax=absmax, shape=tuple(shape), dtype=dtype, blocksize=blocksize,
                  nested_absmax=nested_absmax, nested_code=nested_code, offset=offset,
                  nested_blocksize=nested_blocksize)
    return dora_row_norms(w, lora_A, lora_B, scaling, weight_sq=weight_sq, dtype=compute_dtype)


@nf4_dora_row_norms_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, shape, dtype, blocksize, nested_blocksize, lora_A, lora_B,
      scaling, weight_sq, compute_dtype):
    return packed.new_empty((shape[0],), dtype=torch.float64)


def _nf4_row_norms(w: NF4Weight, lora_A, lora_B, s: float, weight_sq, dtype: torch.dtype) -> torch.Tensor:
    """dora_row_norms of an NF4 weight decoded to `dtype`; through the op while torch.compile traces."""
    if not torch.compiler.is_compiling():
        return dora_row_norms(w, lora_A, lora_B, s, weight_sq=weight_sq, dtype=dtype)
    return nf4_dora_row_norms_op(w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, list(w.shape),
                                 w.dtype, w.blocksize, w.nested_blocksize, lora_A.detach(), lora_B.detach(), s,
                                 weight_sq, dtype)


def row_norms(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, weight_sq, dtype) -> torch.Tensor:
    """dora_row_norms of a dense weight or an NF4Weight (decoded to `dtype`), through the custom ops
    while torch.compile traces (dora_row_norms branches on values: a graph break, and a recompile
    per layer)."""
    if isinstance(weight, NF4Weight):
        return _nf4_row_norms(weight, lora_A, lora_B, scaling, weight_sq, dtype)
    if torch.compiler.is_compiling():  # the norms are detached: the op sees no autograd
        return dora_row_norms_op(weight.detach(), lora_A.detach(), lora_B.detach(), scaling, weight_sq)
    return dora_row_norms(weight, lora_A, lora_B, scaling, weight_sq=weight_sq)


def dora_scale(magnitude: torch.Tensor, norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """m / n per row, detached, in `dtype` (see the Note on zero norms): float64 m / n where n > 0,
    0 where n == 0, clamped to dtype's finite range, rounded once. Differentiable in m (the gradient
    of m is the upstream gradient times 1 / n, 0 where n == 0)."""
    inv = inverse_norms(norms, magnitude)  # (N,) float64
    big = torch.finfo(dtype).max
    return (magnitude.to(torch.float64) * inv).clamp(-big, big).to(dtype)


def check_magnitude(magnitude, weight, where: str) -> None:
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"{where}: magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: magnitude must be ({weight.shape[0]},) for weight {tuple(weight.shape)}, got "
                         f"{tuple(magnitude.shape)}")
    if magnitude.dtype != weight.dtype or magnitude.device != weight.device:
        raise TypeError(f"{where}: magnitude ({magnitude.dtype}, {magnitude.device}) must share the weight's dtype "
                        f"and device ({weight.dtype}, {weight.device})")


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling: float, bias=None, dropout: float = 0.0,
                weight_sq=None):
    """y = (m / ||W + s B A||) (.) (x W^T + s dropout(x) A^T B^T) + bias as peft's DoRA computes it,
    differentiable in x, lora_A, lora_B, magnitude (and bias, weight if they require grad), the
    norm detached. With dropout > 0, peft's formula (see the module's Note: what matches peft).

    x: (..., K); weight: (N, K), any strides; lora_A: (r, K); lora_B: (N, r); magnitude: (N,);
    bias: (N,) or None; all one dtype and device. Pass dropout=0.0 in eval mode. weight_sq: the
    weight's ||W_i||^2, float64 (N,), when the caller caches it (`weight_row_sq_norms`; computed here
    when None). No N x K tensor is created in forward or backward."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = weight.dtype
        x, weight, lora_A, lora_B, bias, magnitude = autocast_inputs(x, weight, lora_A, lora_B, bias, magnitude)
        if weight.dtype != dtype:  # the cached ||W||^2 is of the uncast weight: the GEMMs see the cast one
            weight_sq = None
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout, weight_sq)
    check_lora_args(x, weight, lora_A, lora_B, bias, where="dora_linear")
    check_magnitude(magnitude, weight, "dora_linear")
    check_dropout(dropout, "dora_linear")
    s = float(scaling)
    if not math.isfinite(s):
        raise ValueError(f"dora_linear: scaling must be finite, got {scaling!r}")
    if weight_sq is not None and (tuple(weight_sq.shape) != (weight.shape[0],) or weight_sq.dtype != torch.float64):
        raise ValueError(f"dora_linear: weight_sq must be float64 ({weight.shape[0]},), got {weight_sq.dtype} "
                         f"{tuple(weight_sq.shape)}")
    norms = row_norms(weight, lora_A, lora_B, s, weight_sq, None)  # (the op while compiling: detached)
    if dropout == 0.0 and backend_for(x) == "triton" and supported(x, weight, lora_A, bias):
        if torch.is_grad_enabled():
            return _DoRATriton.apply(x, weight, lora_A, lora_B, magnitude, bias, s, norms)
        return _dora_triton_forward(x, weight, lora_A, lora_B, magnitude, bias, s, norms, need_v=False)[0]
    if dropout == 0.0 and not weight.requires_grad and torch.is_grad_enabled():
        return _DoRALinear.apply(x, weight, lora_A, lora_B, magnitude, bias, s, norms)
    scale = dora_scale(magnitude, norms, x.dtype)  # (N,), differentiable in m
    if dropout == 0.0:  # grad disabled, or a weight that needs a gradient: plain ops
        v = F.linear(x, weight) + s * F.linear(F.linear(x, lora_A), lora_B)
        y = v * scale
        return y if bias is None else y + bias
    # peft's formula, arranged so that m's gradient reads one pre-scale tensor v (as without dropout):
    # x W^T + bias + (scale - 1) h W^T + scale s h A^T B^T = x W^T + bias + scale v - h W^T.
    h = F.dropout(x, dropout, training=True)
    hw = F.linear(h, weight)
    v = hw + s * F.linear(F.linear(h, lora_A), lora_B)
    return F.linear(x, weight, bias) + scale * v - hw


def nf4_dora_linear(x, nf4_weight, lora_A, lora_B, magnitude, scaling: float, bias=None, dropout: float = 0.0,
                    weight_sq=None):
    """DoRA over an NF4 (QLoRA) weight: `dora_linear` with W = deq(nf4_weight) in x's dtype, never a
    dense W, the row norms from the 4-bit storage a block of rows at a time (`dora_row_norms`).
    x: (..., K) in the compute dtype; lora_A, lora_B, magnitude (N,) are used in x's dtype, their
    gradients come back in their own (fp32 master weights); bias: (N,) or None, frozen; weight_sq:
    the cached ||W_i||^2 (float64). On the Triton backend without dropout: the fused NF4 kernels with
    the DoRA epilogue (`_NF4DoRATriton`, the module's NF4 paragraph). Otherwise differentiable by
    autograd around the QLoRA op: y = scale (.) v + bias with v = x W^T + s x A^T B^T (mul keeps v
    for m's gradient); with dropout, peft's formula (see the module's Note)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = x.dtype
        x, lora_A, lora_B, bias, magnitude = autocast_inputs(x, lora_A, lora_B, bias, magnitude)
        if x.dtype != dtype:  # W is decoded to the new dtype: a cached ||W||^2 was of the other one
            weight_sq = None
        with torch.autocast(x.device.type, enabled=False):
            return nf4_dora_linear(x, nf4_weight, lora_A, lora_B, magnitude, scaling, bias, dropout, weight_sq)
    if not isinstance(nf4_weight, NF4Weight):
        raise TypeError(f"nf4_dora_linear: nf4_weight must be a lowrank.NF4Weight, got {type(nf4_weight).__name__}")
    n, k = nf4_weight.shape
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (n,):
        raise ValueError(f"nf4_dora_linear: magnitude must be a ({n},) tensor for the NF4 weight {(n, k)}, got "
                         f"{tuple(getattr(magnitude, 'shape', ()))}")
    check_dropout(dropout, "nf4_dora_linear")
    s = float(scaling)
    if dropout == 0.0 and backend_for(x) == "triton":
        # the QLoRA op's own argument checks, before any work (its Triton path takes what they pass)
        check_dtype(x.dtype, "nf4_dora_linear", "x dtype")
        if x.device != nf4_weight.device:
            raise ValueError(f"nf4_dora_linear: x is on {x.device}, the NF4 weight on {nf4_weight.device}")
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # gradients come back in their own dtype
        bias = None if bias is None else bias.to(x.dtype)
        check_lora_args(x, x.new_empty(()).expand(n, k), lora_A, lora_B, bias, where="nf4_dora_linear")
        norms = _nf4_row_norms(nf4_weight, lora_A, lora_B, s, weight_sq, x.dtype)
        w = nf4_weight
        args = (x, w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, lora_A, lora_B, magnitude, bias,
                s, w.blocksize, w.nested_blocksize, norms)
        if torch.is_grad_enabled():
            return _NF4DoRATriton.apply(*args)
        return _nf4_dora_triton_forward(*args, need_v=False)[0]
    norms = _nf4_row_norms(nf4_weight, lora_A, lora_B, s, weight_sq, x.dtype)
    scale = dora_scale(magnitude, norms, x.dtype)  # (N,), differentiable in m
    if dropout == 0.0:
        v = nf4_lora_linear(x, nf4_weight, lora_A, lora_B, s)
        return v * scale if bias is None else torch.addcmul(bias.to(x.dtype), v, scale)
    h = F.dropout(x, dropout, training=True)
    no_a, no_b = x.new_empty((0, k)), x.new_empty((n, 0))
    v = nf4_lora_linear(h, nf4_weight, lora_A, lora_B, s)
    hw = nf4_lora_linear(h, nf4_weight, no_a, no_b, 0.0)
    return nf4_lora_linear(x, nf4_weight, no_a, no_b, 0.0, bias) + scale * v - hw


def _inverse(norms: torch.Tensor) -> torch.Tensor:
    """1 / n, float64, 0 where n == 0 (the Note on zero norms)."""
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def magnitude_rounded(norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 row norms rounded as a magnitude of `dtype` holds them (float64 again): to float32,
    then to `dtype` when it is a 16-bit type (float64: as they are). A new DoRA adapter's m is W's row
    norms rounded so (`LoRALinear.new_factors`), and an fp32 master m reaches the op cast to a 16-bit
    weight's dtype the same way, so that m / magnitude_rounded(n) is exactly 1 at initialisation:
    the DoRA layer's output is then the base layer's, bit for bit, as peft's is."""
    if dtype == torch.float64:
        return norms
    r = norms.to(torch.float32)
    return (r if dtype == torch.float32 else r.to(dtype)).to(torch.float64)


def inverse_norms(norms: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """1 / n (float64, 0 where n == 0) with n rounded as `magnitude` holds norms (`magnitude_rounded`):
    the scale m / n of every DoRA path (forward, backward's dm, merge) divides by it."""
    return _inverse(magnitude_rounded(norms, magnitude.dtype))


def _scaled_grad_and_dm(dy2: torch.Tensor, scale: torch.Tensor, v2: torch.Tensor | None):
    """(g = dy (.) scale (M, N), sum over rows of dy (.) v (N,) float64, or None without v) in one pass
    over dy and v, a block of rows at a time: the products for the sum stay in cache (a plain
    (dy * v).sum(0) writes and reads an (M, N) temporary: two more passes over memory)."""
    g = torch.empty_like(dy2)
    acc = None if v2 is None else torch.zeros(dy2.shape[1], dtype=torch.float64, device=dy2.device)
    rows = max(1, _CHUNK_ELEMENTS // max(dy2.shape[1], 1))
    for i in range(0, dy2.shape[0], rows):
        blk = dy2[i:i + rows]
        torch.mul(blk, scale, out=g[i:i + rows])
        if acc is not None:
            acc += (blk * v2[i:i + rows]).sum(0)  # a block's sum in dy's dtype, the blocks' in float64
    return g, acc


class _DoRALinear(torch.autograd.Function):
    """`dora_linear` without dropout, W frozen: y = scale (.) v + bias, v = x W^T + s (x A^T) B^T.
    Backward with g = dy (.) scale: dT = s g B, dA = dT^T x, dB = s g^T T, dx = g W + dT A,
    dm = (sum over rows of dy (.) v) / n (0 where n == 0), dbias = sum over rows of dy."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, norms):
        n = weight.shape[0]
        inv = inverse_norms(norms, magnitude)  # (N,) float64
        big = torch.finfo(x.dtype).max
        scale = (magnitude.detach().to(torch.float64) * inv).clamp(-big, big).to(x.dtype)  # (N,)
        v = F.linear(x, weight)
        if not v.is_contiguous():
            v = v.contiguous()
        t = F.linear(x, lora_A)  # (..., r)
        v.view(-1, n).addmm_(t.reshape(-1, t.shape[-1]), lora_B.t(), alpha=scaling)
        need_m = ctx.needs_input_grad[4]
        if need_m:  # v is kept for m's gradient: y in a new buffer, one pass
            y = v * scale if bias is None else torch.addcmul(bias, v, scale)
        else:
            y = v.mul_(scale) if bias is None else v.mul_(scale).add_(bias)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, scale, inv if need_m else None,
                              v if need_m else None)
        ctx.scaling = scaling
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, scale, inv, v = ctx.saved_tensors
        need_x, _, need_a, need_b, need_m, need_bias, _, _ = ctx.needs_input_grad
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n)
        g, d_m = _scaled_grad_and_dm(dy2, scale, v.reshape(-1, n) if need_m else None)
        dx, d_a, d_b = lora_input_grads(g, x, weight, lora_A, lora_B, t, ctx.scaling, need_x, need_a, need_b)
        if need_m:
            d_m = d_m.mul_(inv).to(dy.dtype)
        d_bias = dy2.sum(0) if need_bias else None
        return dx, None, d_a, d_b, d_m, d_bias, None, None


# -- the Triton path: custom ops over the kernels (torch.compile sees ops, not Triton launches) ------
@torch.library.custom_op("lowrank::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    bias: Optional[torch.Tensor], scale: torch.Tensor, scaling: float,
                    need_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (..., N), T (M, r) fp32, v (M, N) in x's dtype, or an empty (0,) tensor when need_v is False):
    one fused LoRA forward launch with the DoRA epilogue, scale (N,) fp32."""
    lm = _kernels()
    n = weight.shape[0]
    x2 = _flat(x)  # (M, K)
    v = lm._empty((x2.shape[0], n), x.dtype, x.device) if need_v else None
    y, t = lm.lora_forward(x2, weight, lora_A, lora_B, scaling, bias, scale=scale, v_out=v)
    return y.view(*x.shape[:-1], n), t, (v if need_v else x.new_empty((0,)))


@dora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, scale, scaling, need_v):
    m, n = math.prod(x.shape[:-1]), weight.shape[0]
    return (x.new_empty((*x.shape[:-1], n)), x.new_empty((m, lora_A.shape[0]), dtype=torch.float32),
            x.new_empty((m, n) if need_v else (0,)))


@torch.library.custom_op("lowrank::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, scaling: float,
                    need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX shaped like x, or an empty (0,) tensor when need_dx is False; dA; dB) from dY (.) scale."""
    dx, da, db = _kernels().lora_backward(_flat(dy), _flat(x), weight, lora_A, lora_B, t, scaling,
                                          need_dx=need_dx, scale=scale)
    return (dx.view(x.shape) if need_dx else x.new_empty((0,))), da, db


@dora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scale, scaling, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _fp32_scale(magnitude, norms, dtype: torch.dtype):
    """(scale = m / n (N,) fp32, clamped to dtype's finite range; 1 / n (N,) float64): the Triton
    path's scale (the module's Note: the Triton path)."""
    inv = inverse_norms(norms, magnitude)  # (N,) float64
    big = torch.finfo(dtype).max
    return (magnitude.detach().to(torch.float64) * inv).clamp(-big, big).to(torch.float32), inv


def _dora_triton_forward(x, weight, lora_A, lora_B, magnitude, bias, scaling: float, norms, need_v: bool):
    """(y (..., N), T (M, r) fp32, scale (N,) fp32, 1 / n (N,) float64, v (M, N) or None): one fused
    LoRA forward launch with the DoRA epilogue (the module's Note: the Triton path)."""
    scale, inv = _fp32_scale(magnitude, norms, x.dtype)
    y, t, v = torch.ops.lowrank.dora_linear_fwd(x, weight, lora_A, lora_B, bias, scale, scaling, need_v)
    return y, t, scale, inv, (v if need_v else None)


def _dm_sum(dy2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """sum over rows of dy (.) v, float64 (N,), a block of rows at a time (as `_scaled_grad_and_dm`)."""
    acc = torch.zeros(dy2.shape[1], dtype=torch.float64, device=dy2.device)
    rows = max(1, _CHUNK_ELEMENTS // max(dy2.shape[1], 1))
    for i in range(0, dy2.shape[0], rows):
        acc += (dy2[i:i + rows] * v2[i:i + rows]).sum(0)
    return acc


class _DoRATriton(torch.autograd.Function):
    """`dora_linear` on the LoRA kernels (the module's Note: the Triton path), W and bias frozen,
    no dropout. Backward: `lora_backward(..., scale=scale)` gives dX, dA, dB from dY (.) scale;
    dm = (sum over rows of dY (.) v) / n (0 where n == 0)."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, norms):
        need_m = ctx.needs_input_grad[4]
        y, t, scale, inv, v = _dora_triton_forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, norms,
                                                   need_v=need_m)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, scale, inv if need_m else None, v)
        ctx.scaling = scaling
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, scale, inv, v = ctx.saved_tensors
        need_x, _, need_a, need_b, need_m, need_bias, _, _ = ctx.needs_input_grad
        dx, d_a, d_b = torch.ops.lowrank.dora_linear_bwd(dy, x, weight, lora_A, lora_B, t, scale, ctx.scaling,
                                                         need_x)
        dy2 = _flat(dy)  # (M, N)
        d_m = _dm_sum(dy2, v).mul_(inv).to(dy.dtype) if need_m else None
        d_bias = dy2.sum(0) if need_bias else None
        return (dx if need_x else None, None, d_a if need_a else None, d_b if need_b else None, d_m,
                d_bias, None, None)


# -- NF4 bases on the kernels: the fused NF4-decode LoRA matmul with the same epilogue -------------
@torch.library.custom_op("lowrank::nf4_dora_linear_fwd", mutates_args=())
def nf4_dora_linear_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                        nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                        offset: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                        bias: Optional[torch.Tensor], scale: torch.Tensor, scaling: float, blocksize: int,
                        nested_blocksize: int, need_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (..., N), T = x @ A.T (M, r) in x's dtype, v (M, N) in x's dtype or an empty (0,) tensor when
    need_v is False): T as the QLoRA op takes it, then ONE fused NF4 launch with the DoRA epilogue,
    scale (N,) fp32."""
    n, k = lora_B.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K)
    w = _weight(packed, absmax, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize, x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # the caller already chose the dtype
        t = x2 @ lora_A.t()  # (M, r), rounded to x's dtype as the QLoRA op's T
    has_lora = lora_A.shape[0] > 0 and scaling != 0.0
    v = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device) if need_v else None
    y = _nf4_kernels().nf4_lora_matmul(x2, w, w.block_absmax(), True, t if has_lora else None,
                                       lora_B.t() if has_lora else None, scaling, bias, scale=scale, v_out=v)
    return y.view(*x.shape[:-1], n), t, (v if need_v else x.new_empty((0,)))


@nf4_dora_linear_fwd.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, bias, scale, scaling, blocksize,
      nested_blocksize, need_v):
    m, n = math.prod(x.shape[:-1]), lora_B.shape[0]
    return (x.new_empty((*x.shape[:-1], n)), x.new_empty((m, lora_A.shape[0])),
            x.new_empty((m, n) if need_v else (0,)))


@torch.library.custom_op("lowrank::nf4_dora_linear_bwd", mutates_args=())
def nf4_dora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                        nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                        offset: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                        t: torch.Tensor, scale: torch.Tensor, scaling: float, blocksize: int, nested_blocksize: int,
                        need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX shaped like x, or an empty (0,) tensor when need_dx is False; dA; dB) with g = dY (.) scale
    never written: dT = s dY @ (scale (.) B) and dB = s scale (.) (dY.T @ T) carry the scale on the
    (N, r) side (each product rounded once from fp32, as g's elements are on the torch path), dA =
    dT.T @ x, and dX = (dY (.) scale) @ deq(W) + dT @ A in one NF4 launch that scales dY as it
    loads it."""
    n, k = lora_B.shape[0], x.shape[-1]
    dy2 = dy.reshape(-1, n)
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    x2 = x.reshape(-1, k)
    sc = scale[:, None]  # (N, 1) fp32
    with torch.autocast(x.device.type, enabled=False):
        dt = (dy2 @ (lora_B.float() * sc).to(x.dtype)) * scaling  # (M, r)
        d_b = ((dy2.t() @ t).float() * (sc * scaling)).to(x.dtype)  # (N, r)
        d_a = dt.t() @ x2
    if not need_dx:
        return x.new_empty((0,)), d_a, d_b
    w = _weight(packed, absmax, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize, x.dtype)
    fuse = lora_A.shape[0] > 0
    dx = _nf4_kernels().nf4_lora_matmul(dy2, w, w.block_absmax(), False, dt if fuse else None,
                                        lora_A if fuse else None, 1.0, scale=scale)
    return dx.view(x.shape), d_a, d_b


@nf4_dora_linear_bwd.register_fake
def _(dy, x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, t, scale, scaling, blocksize,
      nested_blocksize, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _nf4_dora_triton_forward(x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, magnitude,
                             bias, scaling: float, blocksize: int, nested_blocksize: int, norms, need_v: bool):
    """(y (..., N), T (M, r), scale (N,) fp32, 1 / n (N,) float64, v (M, N) or None): one fused NF4
    forward launch with the DoRA epilogue."""
    scale, inv = _fp32_scale(magnitude, norms, x.dtype)
    y, t, v = torch.ops.lowrank.nf4_dora_linear_fwd(x, packed, absmax, nested_absmax, nested_code, offset, lora_A,
                                                    lora_B, bias, scale, scaling, blocksize, nested_blocksize,
                                                    need_v)
    return y, t, scale, inv, (v if need_v else None)


class _NF4DoRATriton(torch.autograd.Function):
    """`nf4_dora_linear` on the NF4 kernels, no dropout: the 4-bit storage saved, never a dense W.
    Backward: `lowrank::nf4_dora_linear_bwd` gives dX, dA, dB from dY (.) scale; dm = (sum over rows
    of dY (.) v) / n (0 where n == 0), in m's dtype; dbias = sum over rows of dY."""

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, magnitude, bias,
                scaling, blocksize, nested_blocksize, norms):
        need_m = ctx.needs_input_grad[8]
        y, t, scale, inv, v = _nf4_dora_triton_forward(x, packed, absmax, nested_absmax, nested_code, offset,
                                                       lora_A, lora_B, magnitude, bias, scaling, blocksize,
                                                       nested_blocksize, norms, need_v=need_m)
        ctx.save_for_backward(x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, t, scale,
                              inv if need_m else None, v)
        ctx.scaling, ctx.blocksize, ctx.nested_blocksize = scaling, blocksize, nested_blocksize
        ctx.m_dtype = magnitude.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, t, scale, inv, v = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_a, need_b, need_m, need_bias = need[0], need[6], need[7], need[8], need[9]
        dx, d_a, d_b = torch.ops.lowrank.nf4_dora_linear_bwd(dy, x, packed, absmax, nested_absmax, nested_code,
                                                             offset, lora_A, lora_B, t, scale, ctx.scaling,
                                                             ctx.blocksize, ctx.nested_blocksize, need_x)
        dy2 = _flat(dy)  # (M, N)
        d_m = _dm_sum(dy2, v).mul_(inv).to(ctx.m_dtype) if need_m else None
        d_bias = dy2.sum(0) if need_bias else None
        return (dx if need_x else None, None, None, None, None, None, d_a if need_a else None,
                d_b if need_b else None, d_m, d_bias, None, None, None, None)
