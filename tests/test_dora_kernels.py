"""DoRA on the fused LoRA kernels (lowrank/kernels/lora_matmul.py: the `scale` / `v_out` epilogue and the
scaled dY of the backward; lowrank/ops/dora.py: `_DoRATriton`, the Triton path of `dora_linear`).

Kernel outputs against float64 with the flash-attention rule (tests/helpers.assert_close: at most
twice the error of the same maths in plain torch in the same dtype), every buffer the kernels write
NaN-poisoned first (`lm._empty` patched, `out` / `v_out` poisoned). Without a GPU the kernels run in
Triton's interpreter (conftest; bf16 dots through the interpreter fix in lowrank/kernels/_common.py).
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.kernels import lora_matmul as lm
from lowrank.ops.dora import dora_linear
from tests.helpers import DTYPE_IDS, DTYPES, assert_bits_equal, assert_close, dora_factors, poison_
from tests.test_dora_op import _tensors, dense_norms_f64, dora_f64, problems

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RANKS = [4, 16]
SHAPE = (37, 45, 29)  # M, K, N: no dimension a multiple of any interpreter block (16, 32)


def _nan_empty(shape, dtype, device):
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def _case(m, k, n, r, dtype, seed=0):
    """x, W, A, B, bias, dY O(1); a per-column fp32 scale with a zero, a negative and a large entry."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(DEV)

    x, w = rnd(m, k), rnd(n, k, std=k ** -0.5)
    a, b = rnd(r, k, std=k ** -0.5), rnd(n, r, std=r ** -0.5)
    bias, dy = rnd(n), rnd(m, n)
    scale = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).float().to(DEV)
    scale[0], scale[1], scale[2] = 0.0, -1.25, 3.0
    return x, w, a, b, bias, dy, scale


# -- the kernels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("small_m", [0, 3], ids=["gemm", "small_m"])
@pytest.mark.parametrize("rank", RANKS, ids=[f"r{r}" for r in RANKS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernels_scale_epilogue_and_scaled_backward(dtype, rank, small_m):
    m, k, n = SHAPE if not small_m else (13, 111, 37)  # small-M: K split 3 ways, a ragged last range
    s = 0.75
    x, w, a, b, bias, dy, scale = _case(m, k, n, rank, dtype)
    y = poison_(torch.empty(m, n, dtype=dtype, device=DEV))
    v = poison_(torch.empty(m, 2 * n, dtype=dtype, device=DEV))[:, ::2]  # (M, N), column stride 2
    with mock.patch.object(lm, "_empty", _nan_empty):
        y_out, t = lm.lora_forward(x, w, a, b, s, bias, out=y, small_m=small_m, scale=scale, v_out=v)
        dx, da, db = lm.lora_backward(dy, x, w, a, b, t, s, scale=scale)
    assert y_out.data_ptr() == y.data_ptr()
    x64, w64, a64, b64, sc64 = x.double(), w.double(), a.double(), b.double(), scale.double()
    v64 = x64 @ w64.t() + s * (x64 @ a64.t()) @ b64.t()
    g64 = dy.double() * sc64
    dt64 = s * g64 @ b64
    # Plain torch in the inputs' dtype: the scale rounded to it, as the torch path of the op holds it.
    sc = scale.to(dtype)
    vb = F.linear(x, w) + s * (x @ a.t()) @ b.t()
    gb = dy * sc
    dtb = s * (gb @ b)
    assert_close(v, v64, vb, name="v")
    assert_close(y, sc64 * v64 + bias.double(), vb * sc + bias, name="y")
    assert_close(dx, g64 @ w64 + dt64 @ a64, gb @ w + dtb @ a, name="dX")
    assert_close(da, dt64.t() @ x64, dtb.t() @ x, name="dA")
    assert_close(db, s * g64.t() @ (x64 @ a64.t()), s * (gb.t() @ (x @ a.t())), name="dB")
    assert torch.equal(y[:, 0], bias[0].expand(m))  # a zero scale gives the bias exactly


@pytest.mark.parametrize("small_m", [0, 3], ids=["gemm", "small_m"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scale_of_ones_is_the_plain_kernel_bit_for_bit(dtype, small_m):
    """scale = 1 multiplies the fp32 accumulator and dY exactly: every output equals scale=None's
    bit for bit, so the epilogue changes nothing else (the scale=None kernels are compiled without it)."""
    x, w, a, b, bias, dy, _ = _case(*SHAPE, 16, dtype, seed=1)
    ones = torch.ones(SHAPE[2], dtype=torch.float32, device=DEV)
    y0, t0 = lm.lora_forward(x, w, a, b, 0.5, bias, small_m=small_m)
    y1, t1 = lm.lora_forward(x, w, a, b, 0.5, bias, small_m=small_m, scale=ones)
    grads0 = lm.lora_backward(dy, x, w, a, b, t0, 0.5)
    grads1 = lm.lora_backward(dy, x, w, a, b, t1, 0.5, scale=ones)
    for name, p, q in zip(("y", "T", "dX", "dA", "dB"), (y0, t0, *grads0), (y1, t1, *grads1)):
        assert_bits_equal(p, q, name)


def test_launcher_rejects_bad_scale_and_v_out():
    x, w, a, b, bias, dy, scale = _case(5, 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match=r"scale must be a contiguous \(6,\) float32"):
        lm.lora_forward(x, w, a, b, 1.0, scale=scale.half())
    with pytest.raises(ValueError, match=r"scale must be a contiguous \(6,\) float32"):
        lm.lora_forward(x, w, a, b, 1.0, scale=scale[:5])
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        lm.lora_forward(x, w, a, b, 1.0, scale=[1.0] * 6)
    with pytest.raises(ValueError, match=r"v_out must be \(5, 6\) torch.float32"):
        lm.lora_forward(x, w, a, b, 1.0, scale=scale, v_out=torch.empty(5, 6, dtype=torch.float16, device=DEV))
    _, t = lm.lora_forward(x, w, a, b, 1.0)
    with pytest.raises(ValueError, match=r"scale must be a contiguous \(6,\) float32"):
        lm.lora_backward(dy, x, w, a, b, t, 1.0, scale=torch.ones(1, device=DEV))


# -- the op on the Triton backend ----------------------------------------------------------------


@pytest.fixture
def triton_dora(monkeypatch):
    """LOWRANK_BACKEND=triton, `lm.lora_forward` spied (the scales it was called with), every
    kernel buffer NaN-poisoned."""
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    calls = []
    real = lm.lora_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "lora_forward", spy)
    monkeypatch.setattr(lm, "_empty", _nan_empty)
    return calls


def _dora_case(lead, k, n, r, dtype, s, seed=0, zero_rows=()):
    g, w, a, b = dora_factors(n, k, r, seed, zero_rows)
    w, a, b = w.to(dtype), a.to(dtype), b.to(dtype)
    m = (dense_norms_f64(w, a, b, s) * (1 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64))).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    dy = torch.randn(*lead, n, generator=g).to(dtype)
    return [t.to(DEV) for t in (x, w, a, b, m, bias, dy)]


def _run(x, w, a, b, m, bias, s, dy):
    """(y, [dX, dA, dB, dm]) of dora_linear on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, m)]
    y = dora_linear(leaves[0], w, leaves[1], leaves[2], leaves[3], s, bias)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("lead", [(37,), (5, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("rank", RANKS, ids=[f"r{r}" for r in RANKS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dora_linear_on_the_kernels_matches_float64(triton_dora, monkeypatch, dtype, rank, lead):
    """Outputs and the gradients of x, A, B, m against peft's DoRA in float64 (the dense norm), each
    within 2x the error of the torch path of the same op in the same dtype (LOWRANK_BACKEND=reference)."""
    s = 0.5
    x, w, a, b, m, bias, dy = _dora_case(lead, 45, 29, rank, dtype, s)
    y, grads = _run(x, w, a, b, m, bias, s, dy)
    assert len(triton_dora) == 1 and triton_dora[0] is not None, "dora_linear did not reach the fused kernel"
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b, m)]
    ref = dora_f64(leaves[0], w, leaves[1], leaves[2], leaves[3], s, bias)
    ref.backward(dy.double())
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    yb, grads_b = _run(x, w, a, b, m, bias, s, dy)
    assert len(triton_dora) == 1
    assert y.shape == (*lead, 29) and y.dtype == dtype
    assert_close(y, ref.detach(), yb, name="y")
    for name, got, leaf, base in zip(("dX", "dA", "dB", "dm"), grads, leaves, grads_b):
        assert got.dtype == dtype
        assert_close(got, leaf.grad, base, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_norm_rows_on_the_kernels(triton_dora, dtype):
    """The zero-norm rule on the kernel path: rows with W_i = 0 and B_i = 0 output their bias
    exactly, m gets no gradient there, everything is finite, the other rows match float64."""
    s, zero = 2.0, (2, 7)
    x, w, a, b, m, bias, dy = _dora_case((9,), 20, 12, 3, dtype, s, seed=1, zero_rows=zero)
    y, grads = _run(x, w, a, b, m, bias, s, dy)
    assert triton_dora and triton_dora[0] is not None
    assert torch.isfinite(y).all() and all(torch.isfinite(gr).all() for gr in grads)
    assert torch.equal(y[:, list(zero)], bias[list(zero)].expand(9, 2))
    assert torch.equal(grads[3][list(zero)], torch.zeros(2, dtype=dtype, device=DEV))
    keep = [i for i in range(12) if i not in zero]
    ref = dora_f64(x, w, a, b, m, s, bias)
    with mock.patch.dict("os.environ", {"LOWRANK_BACKEND": "reference"}):
        yb = dora_linear(x, w, a, b, m, s, bias)
    assert_close(y[:, keep], ref[:, keep], yb[:, keep], name="y")


def test_frozen_magnitude_writes_no_v_and_no_grad_mode(triton_dora):
    """m frozen: the kernel is not asked for v (no (M, N) activation beyond y); under no_grad the
    same single launch runs without autograd."""
    x, w, a, b, m, bias, dy = _dora_case((11,), 24, 10, 4, torch.float32, 1.0)
    calls = []
    real = lm.lora_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("v_out"))
        return real(*args, **kwargs)

    with mock.patch.object(lm, "lora_forward", spy):
        a.requires_grad_()
        dora_linear(x, w, a, b, m, 1.0, bias).backward(dy)
        with torch.no_grad():
            y = dora_linear(x, w, a, b.requires_grad_(), m.requires_grad_(), 1.0, bias)
    assert calls == [None, None]
    assert_close(y, dora_f64(x, w, a.detach(), b.detach(), m.detach(), 1.0, bias), name="y")


def test_what_stays_on_the_torch_path(triton_dora):
    """Dropout (peft's formula needs a second GEMM over W), a trainable weight, float64: torch path."""
    x, w, a, b, m, bias, dy = _dora_case((6,), 16, 8, 2, torch.float32, 1.0)
    dora_linear(x, w, a, b, m, 1.0, bias, dropout=0.25)
    dora_linear(x, w.clone().requires_grad_(), a, b, m, 1.0, bias).backward(dy)
    dora_linear(*(t.double() for t in (x, w, a, b, m)), 1.0, bias.double())
    assert triton_dora == []
    dora_linear(x, w, a, b, m, 1.0, bias)
    assert len(triton_dora) == 1


@settings(max_examples=2 * settings.default.max_examples)
@given(problems().filter(lambda p: p["dtype"] != torch.float64), st.booleans())
def test_dora_linear_on_the_kernels_property(p, frozen_m):
    """Drawn shapes (K, N in 1..123, rank 1..24, 0-2 leading dims), dtypes and scalings: the op on
    the kernels against float64, within 2x the torch path's error in the same dtype."""
    x, w, a, b, m, bias = (t if t is None else t.to(DEV) for t in _tensors(p))
    s = p["scaling"]
    dy = torch.randn(*p["lead"], p["n"], generator=torch.Generator().manual_seed(p["seed"] + 1)).to(p["dtype"]).to(DEV)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b, m)]
    ref = dora_f64(leaves[0], w, leaves[1], leaves[2], leaves[3], s, bias)
    ref.backward(dy.double())
    out = {}
    for backend in ("triton", "reference"):
        with mock.patch.dict("os.environ", {"LOWRANK_BACKEND": backend}), \
                mock.patch.object(lm, "_empty", _nan_empty):
            xs, as_, bs, ms = (t.detach().clone().requires_grad_(not (frozen_m and t is m)) for t in (x, a, b, m))
            y = dora_linear(xs, w, as_, bs, ms, s, bias)
            y.backward(dy)
            out[backend] = (y.detach(), xs.grad, as_.grad, bs.grad, ms.grad)
    kern, base = out["triton"], out["reference"]
    assert_close(kern[0], ref.detach(), base[0], name="y")
    # m's gradient, sum over rows of dy (.) v / n, can cancel: its bound is the rounding of each v (r + 2
    # terms accumulated in fp32, rounded once to the dtype) and of the sum's products and additions in
    # the dtype, against the terms' magnitudes, not the result's.
    u, u32 = torch.finfo(p["dtype"]).eps / 2, torch.finfo(torch.float32).eps / 2
    with torch.no_grad():
        x64, w64, a64, b64 = (t.detach().double().abs() for t in (x, w, a, b))
        v_mag = (x64 @ w64.t() + abs(s) * (x64 @ a64.t()) @ b64.t()).reshape(-1, p["n"])
        n_dy = dy.double().abs().reshape(-1, p["n"])
        norms = dense_norms_f64(w, a, b, s)
        terms = (n_dy * v_mag).sum(0) / torch.where(norms > 0, norms, torch.inf)
        dm_bound = 2 * ((2 + n_dy.shape[0]) * u + (p["r"] + 2) * u32) * terms.max().item()
    for name, got, leaf, bg in zip(("dX", "dA", "dB", "dm"), kern[1:], leaves, base[1:]):
        if name == "dm" and frozen_m:
            assert got is None
            continue
        assert_close(got, leaf.grad, bg, name=name, bound=dm_bound if name == "dm" else 0.0)


@pytest.mark.parametrize("need", [True, False], ids=["v-dx", "no-v-dx"])
def test_opcheck(need):
    x, w, a, b, bias, dy, scale = _case(5, 16, 8, 3, torch.float32)
    x3 = x.view(5, 1, 16)
    torch.library.opcheck(torch.ops.lowrank.dora_linear_fwd.default, (x3, w, a, b, bias, scale, 0.5, need),
                          test_utils=("test_schema", "test_faketensor"))
    t = lm.lora_forward(x, w, a, b, 0.5, bias)[1]
    torch.library.opcheck(torch.ops.lowrank.dora_linear_bwd.default,
                          (dy.view(5, 1, 8), x3, w, a, b, t, scale, 0.5, need),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_matches_eager(triton_dora):
    """torch.compile sees the kernels as the custom ops lowrank::dora_linear_fwd / _bwd (a Triton
    launch traced by dynamo fails: the interpreter's numpy, or a graph break on a GPU); the norms'
    data-dependent recompute check is a graph break (no fullgraph), as on the torch path."""
    x, w, a, b, m, bias, dy = _dora_case((6,), 16, 10, 3, torch.float32, 0.5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, m)]

    def f(x, a, b, m):
        return dora_linear(x, w, a, b, m, 0.5, bias).sin()

    out = torch.compile(f, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves, dy)
    assert len(triton_dora) == 2
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_dora_tiles_that_spill_on_sm80_are_pruned():
    """The two 16-bit tiles bench.static measured spilling with the DoRA scale on sm_80 are refused
    there with it (and kept without it, and on sm_90a); the launcher then picks the next tile."""
    fwd = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)
    dx = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8)
    for blocks, warps, stages, is_dx in ((fwd, 4, 4, False), (dx, 4, 3, True)):
        args = (blocks, warps, stages, 2, 32, 163 * 1024)
        assert lm.gemm_config_fits(*args, cap_major=8, dx=is_dx) is True
        assert lm.gemm_config_fits(*args, cap_major=9, dx=is_dx, scale=True) is True
        assert "DoRA scale on sm_80" in lm.gemm_config_fits(*args, cap_major=8, dx=is_dx, scale=True)
