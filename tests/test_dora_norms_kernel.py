"""lowrank/kernels/dora_norms.py: W A^T and ||W_i||^2 in float64 in one pass over W, dense or NF4, and
`dora_row_norms` / `weight_row_sq_norms` on it (the Triton path of lowrank/ops/dora.py).

The oracle is exact up to one rounding: every product of fp32 / fp16 / bf16 values is exact in float64,
and `math.fsum` rounds their sum once, so the kernel is held to its own error bound,
K 2^-53 sum_k |W_ik| |A_jk| (float64 weights: (K + 1) 2^-53 each side, their products round). Every
buffer the kernel writes is NaN-poisoned first (`dora_norms._empty` patched). Without a GPU the kernel
runs in Triton's interpreter (conftest).
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank.kernels import dora_norms as dn
from lowrank.nf4_format import quantize_nf4
from lowrank.ops import dora as dora_mod
from lowrank.ops.dora import dora_row_norms, weight_row_sq_norms
from tests.helpers import poison_

DEV = "cuda" if torch.cuda.is_available() else "cpu"
U = 2.0 ** -53
ALL = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ALL_IDS = ["fp32", "fp16", "bf16", "fp64"]
RANKS = st.one_of(st.sampled_from([1, 3, 16, 17, 100, 128]), st.integers(1, 128))


def _nan_empty(shape, device):
    return poison_(torch.empty(shape, dtype=torch.float64, device=device))


def _poisoned():
    return mock.patch.object(dn, "_empty", _nan_empty)


def _fsum_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(x @ y.T) float64 with each element's sum rounded once (math.fsum of the float64 products)."""
    xs, ys = x.double().cpu().tolist(), y.double().cpu().tolist()
    return torch.tensor([[math.fsum(p * q for p, q in zip(xr, yr)) for yr in ys] for xr in xs],
                        dtype=torch.float64).reshape(x.shape[0], y.shape[0])


def _check(got: torch.Tensor | None, w64: torch.Tensor, a64: torch.Tensor | None, factor: float, name: str):
    """got against the once-rounded W A^T (a64 given) or ||W_i||^2 within factor * 2^-53 of the sum of
    the terms' magnitudes, plus half an ulp of the result (the oracle's own rounding)."""
    assert got is not None and got.dtype == torch.float64, name
    got = got.cpu()
    if a64 is None:
        ref = _fsum_rows(w64, w64).diagonal() if w64.shape[0] else torch.zeros(0, dtype=torch.float64)
        mag = w64.square().sum(1)
    else:
        ref = _fsum_rows(w64, a64) if w64.shape[0] and a64.shape[0] else torch.zeros(w64.shape[0], a64.shape[0],
                                                                                         dtype=torch.float64)
        mag = w64.abs() @ a64.abs().t()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{name}: NaN / Inf (an element the kernel did not write?)"
    tol = factor * U * mag + U * ref.abs()
    err = (got - ref).abs()
    bad = err > tol
    worst = ((err - tol) / tol.clamp_min(1e-300)).max()
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off, worst {worst} at {bad.nonzero()[:5].tolist()}"


def _layout(w: torch.Tensor, how: str) -> torch.Tensor:
    """The same (N, K) values as a contiguous tensor, a Conv1D-style transpose view (strides (1, N)),
    or every other column of a wider tensor (strides (2K, 2))."""
    if how == "transposed":
        return w.t().contiguous().t()
    if how == "strided":
        wide = torch.full((w.shape[0], 2 * w.shape[1]), float("nan"), dtype=w.dtype, device=w.device)
        wide[:, ::2] = w
        return wide[:, ::2]
    return w.contiguous()


# -- the kernel on dense weights ------------------------------------------------------------------


@given(n=st.one_of(st.sampled_from([1, 16, 17, 33]), st.integers(1, 40)),
       k=st.one_of(st.sampled_from([1, 31, 32, 33, 97]), st.integers(1, 100)), r=RANKS,
       dtype=st.sampled_from(ALL), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       a_transposed=st.booleans(), want_sq=st.booleans(), scale=st.sampled_from([1.0, 1e-20, 1e6]),
       seed=st.integers(0, 2 ** 16))
def test_dense_projection_and_square_norms_match_float64(n, k, r, dtype, layout, a_transposed, want_sq, scale,
                                                        seed):
    g = torch.Generator().manual_seed(seed)
    lim = 6e4 if dtype == torch.float16 else 1e30
    w = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).clamp(-lim, lim).to(dtype).to(DEV)
    a = torch.randn(r, k, generator=g).to(DEV)  # fp32: A is kept in fp32 (QLoRA masters) or W's dtype
    if dtype != torch.float32 and seed % 2:
        a = a.to(dtype)
    if a_transposed:
        a = a.t().contiguous().t()
    w = _layout(w, layout)
    with _poisoned():
        p, sq = dn.weight_lora_proj(w, a, want_sq=want_sq)
    factor = k + 1 if dtype == torch.float64 or a.dtype == torch.float64 else k
    if dtype == torch.float64:
        factor *= 2  # the oracle's products round too
    _check(p, w.double(), a.double(), factor, "P")
    if want_sq:
        _check(sq, w.double(), None, factor, "sq")
    else:
        assert sq is None


@pytest.mark.parametrize("dtype", ALL, ids=ALL_IDS)
def test_dense_several_row_blocks_and_k_tiles_at_rank_128(dtype):
    """A shape with ragged last row block and K tile (interpreter tiles 16 x 32), rank 128 and 100,
    both outputs, values spanning 1e-9 .. 1e9 in a row (fp16: 1e-4 .. 1e4)."""
    g = torch.Generator().manual_seed(1)
    n, k = 53, 131
    span = 4 if dtype == torch.float16 else 9
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.logspace(-span, span, k, dtype=torch.float64)
    w = w.to(dtype).to(DEV)
    for r in (128, 100):
        a = torch.randn(r, k, generator=g).to(dtype).to(DEV)
        with _poisoned():
            p, sq = dn.weight_lora_proj(w, a, want_sq=True)
        factor = 2 * (k + 1) if dtype == torch.float64 else k
        _check(p, w.double(), a.double(), factor, f"P r{r}")
        _check(sq, w.double(), None, factor, f"sq r{r}")


def test_square_norms_alone_and_degenerate_sizes():
    w = torch.randn(19, 45).to(DEV)
    with _poisoned():
        p, sq = dn.weight_lora_proj(w, None, want_sq=True)
    assert p is None
    _check(sq, w.double(), None, 45, "sq")
    with _poisoned():
        p, sq = dn.weight_lora_proj(torch.empty(4, 0, device=DEV), torch.empty(3, 0, device=DEV), want_sq=True)
    assert torch.equal(p, torch.zeros(4, 3, dtype=torch.float64, device=DEV))
    assert torch.equal(sq, torch.zeros(4, dtype=torch.float64, device=DEV))
    p, sq = dn.weight_lora_proj(torch.empty(0, 5, device=DEV), torch.randn(2, 5, device=DEV), want_sq=True)
    assert p.shape == (0, 2) and sq.shape == (0,)


def test_bad_arguments_raise_naming_the_culprit():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"rank 129 > 128"):
        dn.weight_lora_proj(w, torch.randn(129, 16))
    with pytest.raises(ValueError, match=r"lora_A must be \(r, 16\)"):
        dn.weight_lora_proj(w, torch.randn(4, 15))
    with pytest.raises(TypeError, match=r"weight dtype torch.int32"):
        dn.weight_lora_proj(w.int(), torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"2-D"):
        dn.weight_lora_proj(w[0], torch.randn(4, 16))
    with pytest.raises(TypeError, match=r"NF4Weight"):
        dn.nf4_weight_lora_proj(w, torch.randn(4, 16))
    q = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(TypeError, match=r"compute dtype torch.float64"):
        dn.nf4_weight_lora_proj(q, torch.randn(4, 64), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"absmax"):
        dn.nf4_weight_lora_proj(q, torch.randn(4, 64), absmax=q.block_absmax().double())


# -- the kernel on NF4 weights --------------------------------------------------------------------


@given(n=st.integers(1, 24), k=st.one_of(st.sampled_from([32, 64, 96, 128, 256]), st.integers(1, 150)),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(),
       compute=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), r=RANKS, want_sq=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_nf4_projection_matches_float64_of_the_dequantized_weight(n, k, blocksize, double_quant, compute, r,
                                                                  want_sq, seed):
    """Whole blocks per row (the aligned decoder) and blocks that span rows or an odd element count (the
    gather decoder), with and without double quantization, against dequantize_torch(compute)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    if n > 2:
        w[1] = 0  # an all-zero row (blocks of absmax 0 when K is a multiple of the blocksize)
    q = quantize_nf4(w.to(DEV), blocksize=blocksize, double_quant=double_quant)
    a = torch.randn(r, k, generator=g).to(DEV)
    with _poisoned():
        p, sq = dn.nf4_weight_lora_proj(q, a, want_sq=want_sq, dtype=compute)
    w64 = q.dequantize_torch(compute).double()
    _check(p, w64, a.double(), k, "P")
    if want_sq:
        _check(sq, w64, None, k, "sq")
    else:
        assert sq is None


def test_nf4_decode_is_rounded_to_the_compute_dtype():
    """bf16 and fp32 decodes differ, and each matches its own dequantize (the rounding is in the kernel)."""
    q = quantize_nf4(torch.randn(20, 128).to(DEV))
    a = torch.randn(5, 128).to(DEV)
    outs = {}
    for compute in (torch.float32, torch.bfloat16):
        with _poisoned():
            outs[compute], sq = dn.nf4_weight_lora_proj(q, a, want_sq=True, dtype=compute)
        _check(outs[compute], q.dequantize_torch(compute).double(), a.double(), 128, str(compute))
        _check(sq, q.dequantize_torch(compute).double(), None, 128, str(compute))
    assert not torch.equal(outs[torch.float32], outs[torch.bfloat16])


# -- dora_row_norms / weight_row_sq_norms on the kernel -------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """LOWRANK_BACKEND=triton, the kernel's launchers counted and their outputs NaN-poisoned first."""
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    monkeypatch.setattr(dn, "_empty", _nan_empty)
    calls = []
    for name in ("weight_lora_proj", "nf4_weight_lora_proj"):
        real = getattr(dn, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args[1] is not None, kwargs.get("want_sq", args[2] if len(args) > 2 else False)))
            return _real(*args, **kwargs)

        monkeypatch.setattr(dn, name, spy)
    return calls


def _cancel_row(row64: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, i: int = 2) -> None:
    """Make row i of W + s B A cancel to 2^-20 s A_1 (~1e-6 of ||W_i||): B_i = (1, 2^-20, 0, ...) and
    A_0 = -W_i / s, both exact in their dtypes (s = 2), row64 the weight row as the op sees it."""
    b[i] = 0.0
    b[i, 0], b[i, 1] = 1.0, 2.0 ** -20
    a[0] = (-row64 / s).to(a.dtype)


def _norm_case(n, k, r, dtype, s, seed=0):
    """W, A, B with row 0 zero in W and B, and row 2 cancelling (`_cancel_row`)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5).to(dtype)
    a = (torch.randn(r, k, generator=g, dtype=torch.float64) / k ** 0.5).to(dtype)
    b = (0.3 * torch.randn(n, r, generator=g, dtype=torch.float64)).to(dtype)
    w[0], b[0] = 0.0, 0.0
    _cancel_row(w[2].double(), a, b, s)
    return w.to(DEV), a.to(DEV), b.to(DEV)


def _both_paths(monkeypatch, fn):
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    ref = fn()
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    return ref, fn()


def _rel(a, b):
    return ((a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float64).tiny)).where(b != 0, (a - b).abs())


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", ALL, ids=ALL_IDS)
def test_row_norms_on_the_kernel_equal_the_torch_path(kernel_calls, monkeypatch, dtype, layout):
    """Within 2^-40 relative of the torch path, the cancelling row recomputed on both (to the same
    bits: the recompute is torch on both), the zero row exactly 0; the kernel did run, and with a cached
    ||W||^2 it computes P alone."""
    s = 2.0
    w, a, b = _norm_case(45, 70, 6, dtype, s)
    w = _layout(w, layout)
    (n_ref, bad_ref), (n_k, bad_k) = _both_paths(
        monkeypatch, lambda: dora_row_norms(w, a, b, s, return_recomputed=True))
    assert kernel_calls == [("weight_lora_proj", True, True)]
    assert 2 in bad_ref.tolist() and torch.equal(bad_ref, bad_k)
    assert n_k[0] == 0 and n_ref[0] == 0
    assert n_k[2] == n_ref[2]
    assert (_rel(n_k, n_ref) <= 2.0 ** -40).all(), _rel(n_k, n_ref).max()
    sq_ref, sq_k = _both_paths(monkeypatch, lambda: weight_row_sq_norms(w))
    assert kernel_calls[-1] == ("weight_lora_proj", False, True)
    assert (_rel(sq_k, sq_ref) <= 2.0 ** -40).all()
    kernel_calls.clear()
    cached = dora_row_norms(w, a, b, s, weight_sq=sq_k)
    assert kernel_calls == [("weight_lora_proj", True, False)]
    assert (_rel(cached, n_ref) <= 2.0 ** -40).all()


@pytest.mark.parametrize("k, blocksize", [(128, 64), (100, 64), (96, 32)], ids=["aligned", "spanning", "bs32"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4_row_norms_on_the_kernel_equal_the_torch_path(kernel_calls, monkeypatch, compute, k, blocksize):
    s = 2.0
    w, a, b = _norm_case(37, k, 5, torch.float32, s)
    q = quantize_nf4(w, blocksize=blocksize)
    _cancel_row(q.dequantize_torch(compute)[2].double(), a, b, s)  # against the decoded row
    (n_ref, bad_ref), (n_k, bad_k) = _both_paths(
        monkeypatch, lambda: dora_row_norms(q, a, b, s, return_recomputed=True, dtype=compute))
    assert kernel_calls == [("nf4_weight_lora_proj", True, True)]
    assert 2 in bad_ref.tolist() and torch.equal(bad_ref, bad_k)
    assert n_k[0] == 0 and n_ref[0] == 0
    assert (_rel(n_k, n_ref) <= 2.0 ** -40).all(), _rel(n_k, n_ref).max()
    sq_ref, sq_k = _both_paths(monkeypatch, lambda: weight_row_sq_norms(q, compute))
    assert (_rel(sq_k, sq_ref) <= 2.0 ** -40).all()


def test_the_torch_path_stays_the_cpu_default_and_large_ranks_stay_on_torch(kernel_calls, monkeypatch):
    w, a, b = _norm_case(20, 30, 4, torch.float32, 1.0)
    if DEV == "cpu":
        monkeypatch.setenv("LOWRANK_BACKEND", "auto")
        dora_row_norms(w, a, b, 1.0)
        weight_row_sq_norms(w)
        assert kernel_calls == []
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    g = torch.Generator().manual_seed(3)
    a_big, b_big = torch.randn(129, 30, generator=g).to(DEV), torch.randn(20, 129, generator=g).to(DEV)
    got = dora_row_norms(w, a_big, b_big, 0.5)
    assert [c[0:2] for c in kernel_calls] == [("weight_lora_proj", False)]  # ||W||^2 only
    ref = (w.double() + 0.5 * b_big.double() @ a_big.double()).norm(dim=1)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert dora_mod._Rows(w).kernel_proj(a_big, True) is None


@pytest.mark.parametrize("want_sq", [True, False], ids=["sq", "no-sq"])
def test_opcheck(want_sq):
    """The custom ops over the kernel (`lowrank::dora_norms_dense` / `_nf4`: torch.compile sees ops, not
    Triton launches) pass torch.library.opcheck, fakes included; without lora_A, an empty (N, 0) P."""
    w = torch.randn(13, 40, device=DEV)
    a = torch.randn(5, 40, device=DEV)
    torch.library.opcheck(torch.ops.lowrank.dora_norms_dense, (w, a, want_sq))
    torch.library.opcheck(torch.ops.lowrank.dora_norms_dense, (w.t().contiguous().t(), None, True))
    q = quantize_nf4(torch.randn(13, 64, device=DEV))
    a64 = torch.randn(5, 64, device=DEV)
    torch.library.opcheck(torch.ops.lowrank.dora_norms_nf4,
                          (q.packed, q.block_absmax(), [13, 64], q.blocksize, torch.bfloat16, a64, want_sq))
    p, sq = torch.ops.lowrank.dora_norms_dense(w, None, True)
    assert p.shape == (13, 0) and sq.shape == (13,)


def test_torch_compile_sees_the_ops(kernel_calls):
    """dora_row_norms under torch.compile on the Triton backend runs the kernel (as a custom op) and
    gives the eager bits (the recompute check is a graph break, as on the torch path)."""
    w, a, b = _norm_case(20, 48, 4, torch.float32, 2.0)
    eager = dora_row_norms(w, a, b, 2.0)
    compiled = torch.compile(lambda w, a, b: dora_row_norms(w, a, b, 2.0), backend="aot_eager")(w, a, b)
    assert len(kernel_calls) >= 2
    assert torch.equal(compiled, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 128])
def test_layer_sized_on_the_gpu(r, monkeypatch):
    """4096 x 4096 on the GPU's compiled kernel, dense bf16 and NF4: P and sq against the float64 torch
    matmul (itself within K 2^-53 of the terms: twice the kernel's bound), and the norms against the
    torch path within 2^-40 relative."""
    g = torch.Generator().manual_seed(11)
    n = k = 4096
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16).cuda()
    a = (torch.randn(r, k, generator=g) / k ** 0.5).cuda()
    b = (0.1 * torch.randn(n, r, generator=g)).cuda()
    q = quantize_nf4(w)
    for name, run, w64 in (("dense", lambda: dn.weight_lora_proj(w, a, want_sq=True), w.double()),
                           ("nf4", lambda: dn.nf4_weight_lora_proj(q, a, want_sq=True), q.dequantize().double())):
        with _poisoned():
            p, sq = run()
        mag = w64.abs() @ a.double().abs().t()
        assert torch.isfinite(p).all() and torch.isfinite(sq).all(), name
        assert ((p - w64 @ a.double().t()).abs() <= 2 * k * U * mag).all(), name
        assert ((sq - w64.square().sum(1)).abs() <= 2 * k * U * w64.square().sum(1)).all(), name
    for weight, kw in ((w, {}), (q, dict(dtype=torch.bfloat16))):
        ref, got = _both_paths(monkeypatch, lambda: dora_row_norms(weight, a, b, 2.0, **kw))
        assert (_rel(got, ref) <= 2.0 ** -40).all(), _rel(got, ref).max()
