"""DoRA on the fused NF4 LoRA kernel (lowrank/kernels/nf4_lora_matmul.py: the `scale` / `v_out` epilogue of the
forward and the scaled dY of the dX direction; lowrank/ops/dora.py: `_NF4DoRATriton`, the Triton path
of `nf4_dora_linear`).

Kernel outputs against float64 on the dequantized weight with the flash-attention rule
(tests/helpers.assert_close: at most twice the error of the same maths in plain torch in the same
dtype), every output NaN-poisoned first. Without a GPU the kernels run in Triton's interpreter
(conftest; bf16 dots through the interpreter fix in lowrank/kernels/_common.py).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from lowrank.nf4_format import quantize_nf4
from lowrank.ops.dora import nf4_dora_linear
from tests.helpers import DTYPE_IDS, DTYPES, assert_bits_equal, assert_close, dora_factors, poison_
from tests.test_dora_op import dora_f64

K = pytest.importorskip("lowrank.kernels.nf4_lora_matmul", reason="needs Triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit of lowrank/kernels/nf4_lora_matmul.py before the DoRA epilogue: scale=None must be it exactly.
BEFORE_DORA = "652eb21cbe02b8fe7014e42153a8201a0916bfb3"
INTERP = dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32, GROUP_M=4, num_warps=4, num_stages=1)
CONFIGS = {"tiles": None, "split-q": dict(INTERP, GROUP_M=1, SPLIT_Q=3)}  # split-q: GPU's small-M path
# (K, config): whole NF4 blocks per row on the launcher's tiles; a gather tile (K % 64 != 0) split 3 ways.
CASES = {"aligned": (128, "tiles"), "gather-split-q": (100, "split-q")}


def _case(m, n, k, r, dtype, blocksize=64, seed=0):
    """W in NF4, x, T = x A^T, B, bias, dY, dT; a per-row fp32 scale with a zero, a negative and a
    large entry."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(DEV)

    w = quantize_nf4((torch.randn(n, k, generator=g) / k ** 0.5).to(DEV), blocksize=blocksize)
    x, a, b = rnd(m, k), rnd(r, k, std=k ** -0.5), rnd(n, r, std=r ** -0.5)
    bias, dy, dt = rnd(n), rnd(m, n), rnd(m, r)
    scale = (0.5 + torch.rand(n, generator=g)).to(DEV)
    scale[0], scale[1], scale[2] = 0.0, -1.25, 3.0
    return w, x, x @ a.t(), a, b, bias, dy, dt, scale


# -- the kernel -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_scale_epilogue_v_out_and_scaled_dx(dtype, case):
    m, n, r, s = 19, 37, 5, 0.75
    k, config = CASES[case]
    w, x, t, a, b, bias, dy, dt, scale = _case(m, n, k, r, dtype)
    wd = w.dequantize(dtype)
    cfg = CONFIGS[config]
    y = poison_(torch.empty(m, n, dtype=dtype, device=DEV))
    v = poison_(torch.empty(m, 2 * n, dtype=dtype, device=DEV))[:, ::2]  # (M, N), column stride 2
    dx = poison_(torch.empty(m, k, dtype=dtype, device=DEV))
    K.nf4_lora_matmul(x, w, w.block_absmax(), True, t, b.t(), s, bias, out=y, config=cfg, scale=scale, v_out=v)
    K.nf4_lora_matmul(dy, w, w.block_absmax(), False, dt, a, 1.0, out=dx, config=cfg, scale=scale)
    w64, sc64 = wd.double(), scale.double()
    v64 = x.double() @ w64.t() + s * t.double() @ b.double().t()
    g64 = dy.double() * sc64
    # plain torch in the inputs' dtype, the scale rounded to it (as the torch path of the op holds it)
    sc = scale.to(dtype)
    vb = x @ wd.t() + s * t @ b.t()
    assert_close(v, v64, vb, name="v")
    assert_close(y, sc64 * v64 + bias.double(), vb * sc + bias, name="y")
    assert_close(dx, g64 @ w64 + dt.double() @ a.double(), (dy * sc) @ wd + dt @ a, name="dX")
    assert torch.equal(y[:, 0], bias[0].expand(m))  # a zero scale gives the bias exactly


def _kernel_before_dora(tmp_path):
    """lowrank/kernels/nf4_lora_matmul.py as it was before the DoRA epilogue (git), imported as a module."""
    try:
        src = subprocess.run(["git", "show", f"{BEFORE_DORA}:kernels/nf4_lora_matmul.py"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except OSError:
        src = None
    if src is None or src.returncode != 0:
        pytest.skip("needs the git history of the kernel (the commit before the DoRA epilogue)")
    path = os.path.join(str(tmp_path), f"_nf4_kernel_{BEFORE_DORA[:8]}.py")
    with open(path, "w") as f:  # a real file: triton.jit reads the kernel's source
        f.write(src.stdout.replace("from ._common import", "from lowrank.kernels._common import"))
    try:
        spec = importlib.util.spec_from_file_location(f"_nf4_kernel_{BEFORE_DORA[:8]}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        os.unlink(path)
    return mod


def test_scale_none_is_the_kernel_before_dora_bit_for_bit(tmp_path):
    """scale=None (the plain QLoRA launches) gives exactly what the kernel gave before the DoRA
    epilogue existed: forward (with bias) and dX, aligned tiles and split-Q gather tiles, each dtype."""
    old = _kernel_before_dora(tmp_path)
    for dtype in DTYPES:
        for k, config in CASES.values():
            w, x, t, a, b, bias, dy, dt, _ = _case(13, 20, k // 2, 4, dtype, blocksize=32, seed=3)
            cfg = CONFIGS[config]
            for args in ((x, w, w.block_absmax(), True, t, b.t(), 0.5, bias), (dy, w, w.block_absmax(), False, dt, a)):
                new_out = K.nf4_lora_matmul(*args, config=cfg)
                old_out = old.nf4_lora_matmul(*args, config=cfg)
                assert_bits_equal(new_out, old_out, f"{dtype} k={k // 2} {config} transposed={args[3]}")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scale_of_ones_is_scale_none_bit_for_bit(dtype, config):
    """scale = 1 multiplies the fp32 accumulator and dY exactly: y and dX equal scale=None's bit for
    bit, and v (before the bias) equals the bias-free output."""
    w, x, t, a, b, bias, dy, dt, _ = _case(13, 20, 64, 4, dtype, seed=1)
    cfg, ones = CONFIGS[config], torch.ones(20, device=DEV)
    v = poison_(torch.empty(13, 20, dtype=dtype, device=DEV))
    fwd = (x, w, w.block_absmax(), True, t, b.t(), 0.5)
    assert_bits_equal(K.nf4_lora_matmul(*fwd, bias, config=cfg, scale=ones, v_out=v),
                      K.nf4_lora_matmul(*fwd, bias, config=cfg), "y")
    assert_bits_equal(v, K.nf4_lora_matmul(*fwd, config=cfg), "v")
    bwd = (dy, w, w.block_absmax(), False, dt, a)
    assert_bits_equal(K.nf4_lora_matmul(*bwd, config=cfg, scale=ones), K.nf4_lora_matmul(*bwd, config=cfg), "dX")


def test_launcher_rejects_bad_scale_and_v_out():
    w, x, t, a, b, bias, dy, dt, scale = _case(5, 6, 64, 2, torch.float32)
    fwd = (x, w, w.block_absmax(), True, t, b.t())
    with pytest.raises(ValueError, match=r"scale must be a contiguous \(6,\) float32"):
        K.nf4_lora_matmul(*fwd, scale=scale.half())
    with pytest.raises(ValueError, match=r"scale must be a contiguous \(6,\) float32"):
        K.nf4_lora_matmul(*fwd, scale=scale[:5])
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        K.nf4_lora_matmul(*fwd, scale=[1.0] * 6)
    with pytest.raises(ValueError, match=r"v_out must be \(5, 6\) torch.float32"):
        K.nf4_lora_matmul(*fwd, scale=scale, v_out=torch.empty(5, 6, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="v_out is the forward's"):
        K.nf4_lora_matmul(dy, w, w.block_absmax(), False, scale=scale, v_out=torch.empty(5, 64, device=DEV))


# -- the op on the Triton backend ----------------------------------------------------------------


@pytest.fixture
def triton_nf4(monkeypatch):
    """LOWRANK_BACKEND=triton; the kernel launcher spied: (transposed, scale given, v_out given) per call."""
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    calls = []
    real = K.nf4_lora_matmul

    def spy(*args, **kwargs):
        calls.append((args[3], kwargs.get("scale") is not None, kwargs.get("v_out") is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "nf4_lora_matmul", spy)
    return calls


def _dora_case(lead, n, k, r, compute, s, seed=0, zero_rows=(), bias=True):
    """An NF4 weight, fp32 master A, B, m (m near the rows' norms), x and dY in the compute dtype."""
    g, w, a, b = dora_factors(n, k, r, seed, zero_rows)
    nf4 = quantize_nf4(w.to(DEV))
    wd = nf4.dequantize(compute)
    norms = (wd.double() + s * b.to(compute).double().to(DEV) @ a.to(compute).double().to(DEV)).norm(dim=1).cpu()
    m = (norms * (1 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64))).float()
    bias_t = torch.randn(n, generator=g).to(compute) if bias else None
    x = torch.randn(*lead, k, generator=g).to(compute)
    dy = torch.randn(*lead, n, generator=g).to(compute)
    return nf4, wd, *[t if t is None else t.to(DEV) for t in (x, a, b, m, bias_t, dy)]


def _run(nf4, x, a, b, m, bias, s, dy, frozen_m=False):
    """(y, [dX, dA, dB, dm]) of nf4_dora_linear on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(not (frozen_m and i == 3)) for i, t in enumerate((x, a, b, m))]
    y = nf4_dora_linear(leaves[0], nf4, leaves[1], leaves[2], leaves[3], s, bias)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("frozen_m", [False, True], ids=["train-m", "frozen-m"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4_dora_linear_on_the_kernels_matches_float64(triton_nf4, monkeypatch, compute, bias, frozen_m):
    """Outputs and the gradients of x, A, B, m (fp32 masters) against DoRA in float64 over the
    dequantized weight (the adapters as the op uses them, in the compute dtype), each within 2x the
    error of the torch path of the same op (LOWRANK_BACKEND=reference); one fused launch forward
    (with v only when m trains), one scaled dX launch backward."""
    s = 0.5
    nf4, wd, x, a, b, m, bias_t, dy = _dora_case((3, 7), 29, 128, 4, compute, s, bias=bias)
    y, grads = _run(nf4, x, a, b, m, bias_t, s, dy, frozen_m)
    assert triton_nf4 == [(True, True, not frozen_m), (False, True, False)], triton_nf4
    # the adapters as the op uses them (cast to the compute dtype); m as it is (the scale is taken in float64)
    leaves = [t.detach().to(c).double().requires_grad_() for t, c in ((x, compute), (a, compute), (b, compute),
                                                                     (m, m.dtype))]
    ref = dora_f64(leaves[0], wd, leaves[1], leaves[2], leaves[3], s, bias_t)
    ref.backward(dy.double())
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    yb, grads_b = _run(nf4, x, a, b, m, bias_t, s, dy, frozen_m)
    assert len(triton_nf4) == 2
    assert y.shape == (3, 7, 29) and y.dtype == compute
    assert_close(y, ref.detach(), yb, name="y")
    for name, got, leaf, base, own in zip(("dX", "dA", "dB", "dm"), grads, leaves, grads_b, (x, a, b, m)):
        if name == "dm" and frozen_m:
            assert got is None
            continue
        assert got.dtype == own.dtype, name  # fp32 master weights get fp32 gradients
        assert_close(got, leaf.grad, base, name=name)


def test_fp16_compute(triton_nf4, monkeypatch):
    """fp16 compute, fp16 adapters and magnitude: as above."""
    s = 2.0
    nf4, wd, x, a, b, m, bias_t, dy = _dora_case((11,), 24, 64, 3, torch.float16, s, seed=2)
    a, b, m = a.half(), b.half(), m.half()
    y, grads = _run(nf4, x, a, b, m, bias_t, s, dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b, m)]
    ref = dora_f64(leaves[0], wd, leaves[1], leaves[2], leaves[3], s, bias_t)
    ref.backward(dy.double())
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    yb, grads_b = _run(nf4, x, a, b, m, bias_t, s, dy)
    assert_close(y, ref.detach(), yb, name="y")
    for name, got, leaf, base in zip(("dX", "dA", "dB", "dm"), grads, leaves, grads_b):
        assert_close(got, leaf.grad, base, name=name)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_norm_rows_on_the_kernels(triton_nf4, compute):
    """Rows with W_i = 0 and B_i = 0 (the norm is 0): they output their bias exactly, m gets no
    gradient there, everything is finite, the other rows match float64."""
    s, zero = 2.0, [2, 7]
    nf4, wd, x, a, b, m, bias_t, dy = _dora_case((9,), 12, 64, 3, compute, s, seed=1, zero_rows=zero)
    y, grads = _run(nf4, x, a, b, m, bias_t, s, dy)
    assert triton_nf4 and triton_nf4[0][1]
    assert torch.isfinite(y).all() and all(torch.isfinite(gr).all() for gr in grads)
    assert torch.equal(y[:, zero], bias_t[zero].expand(9, 2))
    assert torch.equal(grads[3][zero], torch.zeros(2, device=DEV))
    keep = [i for i in range(12) if i not in zero]
    ref = dora_f64(x, wd, a.to(compute), b.to(compute), m, s, bias_t)
    with mock.patch.dict("os.environ", {"LOWRANK_BACKEND": "reference"}):
        yb = nf4_dora_linear(x, nf4, a, b, m, s, bias_t)
    assert_close(y[:, keep], ref[:, keep], yb[:, keep], name="y")


def test_no_grad_and_dropout(triton_nf4):
    """Under no_grad: the one fused launch, no v. With dropout: the torch path (peft's formula needs
    a second GEMM over W: the plain QLoRA launches, no scale)."""
    nf4, wd, x, a, b, m, bias_t, dy = _dora_case((6,), 16, 64, 2, torch.float32, 1.0)
    with torch.no_grad():
        y = nf4_dora_linear(x, nf4, a, b, m.requires_grad_(), 1.0, bias_t)
    assert triton_nf4 == [(True, True, False)]
    assert_close(y, dora_f64(x, wd, a, b, m.detach(), 1.0, bias_t), name="y")
    nf4_dora_linear(x, nf4, a, b, m, 1.0, bias_t, dropout=0.25).sum().backward()
    assert all(not scaled for _, scaled, _ in triton_nf4[1:]) and len(triton_nf4) > 1


@pytest.mark.parametrize("need", [True, False], ids=["v-dx", "no-v-dx"])
def test_opcheck(need):
    """The custom ops' schemas and fake implementations agree with the real ones (double quantization
    on and off, bias on and off)."""
    for dq, bias in ((True, True), (False, False)):
        w = quantize_nf4(torch.randn(24, 64, device=DEV), blocksize=32, double_quant=dq)
        wt = (w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset)
        x = torch.randn(2, 3, 64, device=DEV)
        a, b = torch.randn(3, 64, device=DEV) / 8, torch.randn(24, 3, device=DEV)
        bt = torch.randn(24, device=DEV) if bias else None
        scale = torch.rand(24, device=DEV) + 0.5
        torch.library.opcheck(torch.ops.lowrank.nf4_dora_linear_fwd.default,
                              (x, *wt, a, b, bt, scale, 1.5, 32, 256, need),
                              test_utils=("test_schema", "test_faketensor"))
        t = x.reshape(-1, 64) @ a.t()
        torch.library.opcheck(torch.ops.lowrank.nf4_dora_linear_bwd.default,
                              (torch.randn(2, 3, 24, device=DEV), x, *wt, a, b, t, scale, 1.5, 32, 256, need),
                              test_utils=("test_schema", "test_faketensor"))


def test_scaled_gather_dx_tile_that_spills_on_sm80_is_pruned():
    """The one scaled variant bench.static measured spilling (sm_80, 16-bit, gather dX 128x128x32 with
    DoRA's scaled dY: 64 bytes) takes BLOCK_Q 16 there, by `_config` and in the autotuner's pruned
    set; without the scale, in the forward, on sm_90a or aligned the tiles are as before."""
    a100 = 163 * 1024
    bq = lambda **kw: K._config(4096, False, kw.pop("dtype", torch.bfloat16), **kw)["BLOCK_Q"]  # noqa: E731
    assert bq(aligned=False, smem_limit=a100, scaled_dy=True) == 16
    assert bq(aligned=False, smem_limit=a100) == bq(aligned=False) == bq(aligned=False, scaled_dy=True) == 32
    assert bq(aligned=True, smem_limit=a100, scaled_dy=True) == bq(aligned=True, smem_limit=a100)
    assert bq(aligned=False, smem_limit=a100, scaled_dy=True, dtype=torch.float32) == \
        bq(aligned=False, smem_limit=a100, dtype=torch.float32)

    def tiles(**kw):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"])
                for c in K._prune_tuned(K._TUNE_CONFIGS, {}, ALIGNED=False, **kw)}

    scaled = tiles(CAP=8, HAS_SCALE=True, W_TRANSPOSED=False)
    assert (128, 128, 16) in scaled and (128, 128, 32) not in scaled
    assert (128, 128, 32) in tiles(CAP=8) and (128, 128, 32) in tiles(CAP=8, HAS_SCALE=True, W_TRANSPOSED=True)
    assert (128, 128, 32) in tiles(CAP=9, HAS_SCALE=True, W_TRANSPOSED=False)


def test_torch_compile_matches_eager(triton_nf4):
    """torch.compile sees the NF4 kernels as the custom ops lowrank::nf4_dora_linear_fwd / _bwd (the
    norms' data-dependent recompute check is a graph break, as on the dense path)."""
    nf4, wd, x, a, b, m, bias_t, dy = _dora_case((6,), 16, 64, 3, torch.float32, 0.5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, m)]

    def f(x, a, b, m):
        return nf4_dora_linear(x, nf4, a, b, m, 0.5, bias_t).sin()

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves, dy)
    assert [c[1] for c in triton_nf4] == [True] * 4  # two forward, two dX launches, all scaled
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
