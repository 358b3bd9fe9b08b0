"""The fused NF4 LoRA matmul (lowrank/kernels/nf4_lora_matmul.py) and the QLoRA op over it
(lowrank/ops/nf4_lora_matmul.py): kernels against float64 (interpreter on the CPU), the op's
gradients on both backends, its memory (no dense W saved for backward), torch.compile, autocast."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank
from lowrank.nf4_format import quantize_nf4
from lowrank.ops.lora_matmul import lora_linear_reference

from tests.helpers import DTYPE_IDS, DTYPES, assert_close, examples, poison_, saved_for_backward
from tests.oracles import lora_linear_f64, lora_linear_grads_f64, nf4_dropout_mask

K = pytest.importorskip("lowrank.kernels.nf4_lora_matmul", reason="needs Triton")
nf4_dequant = pytest.importorskip("lowrank.kernels.nf4_dequant", reason="needs Triton")
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def fused_case(m, n, k, r, dtype, blocksize=64, bias=True, device=DEV):
    w = quantize_nf4(torch.randn(n, k, device=device) / k**0.5, blocksize=blocksize)
    x = torch.randn(m, k, device=device).to(dtype)
    a = (torch.randn(r, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, r, device=device).to(dtype)
    bias_t = torch.randn(n, device=device).to(dtype) if bias else None
    return w, x, a, b, bias_t


@settings(max_examples=examples(20))
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 90), r=st.integers(1, 20),
       dtype=st.sampled_from(DTYPES), blocksize=st.sampled_from([32, 64, 128]), bias=st.booleans(),
       scaling=st.sampled_from([0.5, 2.0]), seed=st.integers(0, 2**16))
def test_fused_forward_kernel(m, n, k, r, dtype, blocksize, bias, scaling, seed):
    torch.manual_seed(seed)  # drawn by hypothesis: a saved failure replays the same tensors
    w, x, a, b, bias_t = fused_case(m, n, k, r, dtype, blocksize, bias)
    wd = w.dequantize(dtype)
    t = x @ a.t()
    out = poison_(torch.empty(m, n, dtype=dtype, device=DEV))
    K.nf4_lora_matmul(x, w, w.block_absmax(), True, t, b.t(), scaling, bias_t, out=out)
    # the kernel takes T in the compute dtype, like the reference path: the oracle uses that T
    ref = torch.einsum("mk,nk->mn", x.double(), wd.double()) + scaling * t.double() @ b.double().t()
    if bias_t is not None:
        ref = ref + bias_t.double()
    baseline = lora_linear_reference(x, wd, a, b, scaling, bias_t)
    assert_close(out, ref, baseline, name="nf4_lora_matmul forward")


@settings(max_examples=examples(20))
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 90), r=st.integers(1, 20),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_fused_dx_kernel(m, n, k, r, dtype, seed):
    """dX = dY @ deq(W) + dT @ A, with W decoded inside the loop over N."""
    torch.manual_seed(seed)
    w, _, a, _, _ = fused_case(m, n, k, r, dtype, bias=False)
    wd = w.dequantize(dtype)
    dy = torch.randn(m, n, device=DEV).to(dtype)
    dt = torch.randn(m, r, device=DEV).to(dtype)
    out = poison_(torch.empty(m, k, dtype=dtype, device=DEV))
    K.nf4_lora_matmul(dy, w, w.block_absmax(), False, dt, a, 1.0, out=out)
    ref = dy.double() @ wd.double() + dt.double() @ a.double()
    baseline = torch.addmm(dy @ wd, dt, a)
    assert_close(out, ref, baseline, name="nf4_lora_matmul dX")


CONFIGS = {
    "interp": dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32, GROUP_M=4, num_warps=4, num_stages=1),
    "small-m": dict(BLOCK_M=16, BLOCK_P=64, BLOCK_Q=256, GROUP_M=1, num_warps=8, num_stages=3),
    "large": dict(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, num_warps=8, num_stages=3),
    "split-q": dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32, GROUP_M=1, num_warps=4, num_stages=1, SPLIT_Q=3),
}


@pytest.mark.parametrize("config", ["small-m", "large"] if HAS_CUDA else list(CONFIGS))
@pytest.mark.parametrize("blocksize,k", [(32, 96), (64, 320), (128, 128)], ids=["bs32", "bs64", "bs128"])
@pytest.mark.parametrize("transposed", [True, False], ids=["fwd", "dx"])
def test_fused_aligned_tiles(config, blocksize, k, transposed):
    """K % blocksize == 0 takes the contiguous-byte tile path; the GPU tile shapes run here too
    (runs of one absmax shorter and longer than a tile, partial tiles at every edge)."""
    m, n, r, dtype = 19, 83, 5, torch.bfloat16
    w, x, a, b, bias_t = fused_case(m, n, k, r, dtype, blocksize, bias=transposed)
    wd = w.dequantize(dtype)
    if transposed:
        t = x @ a.t()
        out = poison_(torch.empty(m, n, dtype=dtype, device=DEV))
        K.nf4_lora_matmul(x, w, w.block_absmax(), True, t, b.t(), 2.0, bias_t, out=out, config=CONFIGS[config])
        ref = x.double() @ wd.double().t() + 2.0 * t.double() @ b.double().t() + bias_t.double()
        baseline = lora_linear_reference(x, wd, a, b, 2.0, bias_t)
    else:
        dy = torch.randn(m, n, device=DEV).to(dtype)
        dt = torch.randn(m, r, device=DEV).to(dtype)
        out = poison_(torch.empty(m, k, dtype=dtype, device=DEV))
        K.nf4_lora_matmul(dy, w, w.block_absmax(), False, dt, a, 1.0, out=out, config=CONFIGS[config])
        ref = dy.double() @ wd.double() + dt.double() @ a.double()
        baseline = torch.addmm(dy @ wd, dt, a)
    assert_close(out, ref, baseline, name=f"nf4_lora_matmul {config}")


def test_fused_aligned_exact_products():
    """With one-hot inputs the kernel returns deq(W) entries themselves: the tile decode is exact
    (catches a nibble-order or absmax-run mistake that a tolerance could hide)."""
    k, n = 128, 40
    w = quantize_nf4(torch.randn(n, k, device=DEV), blocksize=32)
    wd = w.dequantize(torch.float32)
    eye_k = torch.eye(k, device=DEV)
    for name, cfg in CONFIGS.items():
        out = K.nf4_lora_matmul(eye_k, w, w.block_absmax(), True, config=cfg)  # (k, n) = W.T
        assert torch.equal(out, wd.t()), name
        out = K.nf4_lora_matmul(torch.eye(n, device=DEV), w, w.block_absmax(), False, config=cfg)  # W
        assert torch.equal(out, wd), name


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_gpu_shapes(m, dtype):
    """Real tile configs (small-M path included) and Llama-like sizes on the GPU."""
    check_gpu_shape(m, dtype)


@pytest.mark.gpu
def test_autotuned_path_gpu(monkeypatch):
    """The default launch for M > 16 on a GPU picks its tiles by autotuning (gpu_check.sh turns that
    off for the other tests): the chosen tiles give the same result, forward and dX."""
    monkeypatch.setattr(K, "AUTOTUNE", True)
    calls, real = [], K._nf4_lora_matmul_tuned.run
    monkeypatch.setattr(K._nf4_lora_matmul_tuned, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check_gpu_shape(300, torch.bfloat16)
    assert len(calls) == 2, "forward and dX did not go through the autotuner"


def check_gpu_shape(m, dtype):
    n, k, r = 1536, 2048, 16
    w, x, a, b, bias_t = fused_case(m, n, k, r, dtype, device="cuda")
    wd = w.dequantize(dtype)
    assert torch.equal(nf4_dequant.dequantize(w, dtype), wd)
    t = x @ a.t()
    out = poison_(torch.empty(m, n, dtype=dtype, device="cuda"))
    K.nf4_lora_matmul(x, w, w.block_absmax(), True, t, b.t(), 2.0, bias_t, out=out)
    ref = x.double() @ wd.double().t() + 2.0 * t.double() @ b.double().t() + bias_t.double()
    assert_close(out, ref, lora_linear_reference(x, wd, a, b, 2.0, bias_t), name="forward")
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    dx = poison_(torch.empty(m, k, dtype=dtype, device="cuda"))
    K.nf4_lora_matmul(dy, w, w.block_absmax(), False, t, a, 1.0, out=dx)
    assert_close(dx, dy.double() @ wd.double() + t.double() @ a.double(), torch.addmm(dy @ wd, t, a), name="dX")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the autotuned path is exercised by bench_nf4_lora_matmul for real")
@pytest.mark.parametrize("transposed", [True, False], ids=["fwd", "dx"])
def test_autotuned_launch_plumbing(transposed, monkeypatch):
    """The autotuned launch (LOWRANK_AUTOTUNE, on a GPU for M > 16) in the interpreter: every config
    runs (timed by a stand-in for the CUDA benchmarker) and the chosen one gives the right result."""
    import time

    monkeypatch.setattr(K, "AUTOTUNE", True)
    tuned = K._nf4_lora_matmul_tuned

    def wall_clock(kernel_call, quantiles):
        t0 = time.perf_counter()
        kernel_call()
        return [time.perf_counter() - t0] * 3

    monkeypatch.setattr(tuned, "_do_bench", wall_clock)
    monkeypatch.setattr(tuned, "cache", {})
    w = quantize_nf4(torch.randn(70, 128))
    x = torch.randn(40, 128 if transposed else 70)
    t = torch.randn(40, 4)
    r = torch.randn(70, 4).t() if transposed else torch.randn(4, 128)
    out = poison_(torch.empty(40, 70 if transposed else 128))
    K.nf4_lora_matmul(x, w, w.block_absmax(), transposed, t, r, 2.0, out=out)
    wd = w.dequantize(torch.float32).double()
    ref = x.double() @ (wd.t() if transposed else wd) + 2.0 * t.double() @ r.double()
    base = x @ (w.dequantize(torch.float32).t() if transposed else w.dequantize(torch.float32)) + 2.0 * t @ r
    assert_close(out, ref, base, name="autotuned nf4_lora_matmul")


def op_case_grads(m_shape, n, k, r, dtype, scaling, dropout, bias=True, device=DEV):
    w, x2, a, b, bias_t = fused_case(int(torch.tensor(m_shape).prod()), n, k, r, dtype, bias=bias, device=device)
    x = x2.view(*m_shape, k).requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    dy = torch.randn(*m_shape, n, device=device).to(dtype)
    return w, x, a, b, bias_t, dy


def check_op_grads(x, wd, a, b, bias_t, scaling, mask, dy, y):
    """y and the gradients in x, a, b (after y.backward(dy)) against float64 on the dense weight wd,
    each within twice plain torch's error in the same dtype with the same dropout mask."""
    ref = lora_linear_f64(x.detach(), wd, a.detach(), b.detach(), scaling, bias_t, mask)
    dx, da, db = lora_linear_grads_f64(x.detach(), wd, a.detach(), b.detach(), scaling, dy, mask)
    xb, ab, bb = (t.detach().clone().requires_grad_() for t in (x, a, b))
    h = xb * mask.to(x.dtype) if mask is not None else xb
    yb = torch.nn.functional.linear(xb, wd, bias_t) + scaling * (h @ ab.t()) @ bb.t()
    yb.backward(dy)
    assert_close(y, ref, yb, name="y")
    assert_close(x.grad, dx, xb.grad, name="dx")
    assert_close(a.grad, da, ab.grad, name="dA")
    assert_close(b.grad, db, bb.grad, name="dB")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,dropout", [("triton", 0.0), ("triton", 0.3), ("reference", 0.0)],
                         ids=["triton", "triton-dropout", "reference"])
def test_nf4_lora_linear_forward_backward(dtype, backend, dropout, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    w, x, a, b, bias_t, dy = op_case_grads((3, 13), 45, 70, 6, dtype, 1.5, dropout)
    torch.manual_seed(123)
    y = lowrank.ops.nf4_lora_linear(x, w, a, b, 1.5, bias_t, dropout)
    y.backward(dy)
    mask = None
    if dropout:  # the oracle's own draw from the same generator state: Bernoulli(1 - p) keeps
        torch.manual_seed(123)
        mask = nf4_dropout_mask((39, 70), dtype, dropout, DEV).view(x.shape)
    wd = w.dequantize(dtype)
    check_op_grads(x, wd, a, b, bias_t, 1.5, mask, dy, y)


def test_nf4_lora_linear_fp32_master_adapters(monkeypatch):
    """fp32 LoRA parameters with a bf16 compute dtype: grads come back in fp32."""
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    w, x, a, b, _, dy = op_case_grads((5,), 20, 64, 4, torch.bfloat16, 1.0, 0.0, bias=False)
    a32 = a.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_()
    y = lowrank.ops.nf4_lora_linear(x, w, a32, b32, 1.0)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and a32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32
    assert torch.isfinite(a32.grad).all() and torch.isfinite(b32.grad).all() and (b32.grad != 0).any()


def test_nf4_lora_linear_errors():
    w = quantize_nf4(torch.randn(8, 64))
    x = torch.randn(2, 64)
    a, b = torch.randn(4, 64), torch.randn(8, 4)
    with pytest.raises(TypeError, match="NF4Weight"):
        lowrank.ops.nf4_lora_linear(x, torch.randn(8, 64), a, b, 1.0)
    with pytest.raises(ValueError, match="features"):
        lowrank.ops.nf4_lora_linear(torch.randn(2, 63), w, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lowrank.ops.nf4_lora_linear(x, w, a, torch.randn(9, 4), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        lowrank.ops.nf4_lora_linear(x.double(), w, a, b, 1.0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_nf4_lora_linear_keeps_no_dense_weight(backend, dropout, monkeypatch):
    """Between forward and backward, autograd holds the 4-bit storage, never a dense W, on both
    backends: the CPU path decodes W again in backward."""
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    m, n, k, r = 4, 96, 128, 4
    w, x, a, b, bias_t, dy = op_case_grads((m,), n, k, r, torch.float32, 2.0, dropout)
    a32 = a.detach().requires_grad_()
    y, saved = saved_for_backward(lambda: lowrank.ops.nf4_lora_linear(x, w, a32, b, 2.0, bias_t, dropout))
    dense = n * k * 4
    big = [tuple(t.shape) for t in saved if t.numel() >= n * k // 2 and t.dtype != torch.uint8]
    assert not big, f"dense-sized tensors saved for backward: {big}"
    held = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in saved}.values())
    assert held < dense / 2, (held, dense)
    # nothing derived from the weight either (e.g. its decoded fp32 block scales): only the weight's
    # own storage, the adapters, and per-row tensors of this call (x, T, the dropout multiplier)
    own = {t.untyped_storage().data_ptr() for t in [*w.tensors().values(), a32, b]}
    extra = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in own and t.shape[:1] != (m,)]
    assert not extra, f"tensors derived from the weight saved for backward: {extra}"
    y.backward(dy)  # and the gradients still come out right (checked against float64 above)
    assert torch.isfinite(x.grad).all() and torch.isfinite(a32.grad).all()


def test_nf4_ops_opcheck():
    """The custom ops' schemas, fake implementations and autograd registration agree with the real
    ones (torch.library.opcheck), with and without double quantization, dropout, bias, and with a
    rank-0 adapter."""
    for r, bias, keep, dq in [(4, True, False, True), (3, False, True, False), (0, True, False, True)]:
        w = quantize_nf4(torch.randn(24, 64), blocksize=32, double_quant=dq)
        wt = (w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset)
        x = torch.randn(2, 3, 64, requires_grad=True)
        a = torch.randn(r, 64, requires_grad=True)
        b = torch.randn(24, r, requires_grad=True)
        bt = torch.randn(24) if bias else None
        kp = (torch.rand(6, 64) > 0.3).float() / 0.7 if keep else None
        torch.library.opcheck(torch.ops.lowrank.nf4_lora_fwd, (x, *wt, a, b, bt, kp, 1.5, 32, 256, 24))
        t = x.detach().reshape(-1, 64) @ a.detach().t()
        torch.library.opcheck(torch.ops.lowrank.nf4_lora_bwd,
                              (torch.randn(2, 3, 24), x.detach(), *wt, a.detach(), b.detach(), t, kp,
                               1.5, 32, 256, True))


def test_nf4_lora_linear_under_torch_compile():
    """A QLoRA step traces as one graph (fullgraph=True: a graph break raises) and gives the eager
    results bit for bit (same ops, same order)."""
    w, x, a, b, bias_t, dy = op_case_grads((2, 5), 40, 64, 4, torch.float32, 1.5, 0.0)

    def step(x, a, b):
        return lowrank.ops.nf4_lora_linear(x, w, a, b, 1.5, bias_t)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    xs, as_, bs = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = compiled(xs, as_, bs)
    y.backward(dy)
    y_e = step(x, a, b)
    y_e.backward(dy)
    assert torch.equal(y, y_e) and torch.equal(xs.grad, x.grad)
    assert torch.equal(as_.grad, a.grad) and torch.equal(bs.grad, b.grad)
    # and a QLoRA-patched model (LoRALinear over NF4Linear) as a whole
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    lowrank.patch_linear(model, rank=4, targets="all-linear", quantize="nf4", compute_dtype=torch.float32)
    torch.nn.init.normal_(model[2].lora_B["default"])  # B = 0 at init would hide the LoRA term
    xm = torch.randn(5, 64)
    y_c = torch.compile(model, backend="aot_eager", fullgraph=True)(xm)
    assert torch.equal(y_c, model(xm))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nf4_lora_linear_under_autocast(backend, monkeypatch):
    """Under autocast the op computes in the autocast dtype (as lora_linear and F.linear do): the
    same result as casting x, A, B and bias first; fp32 adapters get fp32 gradients."""
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    w, x, a, b, bias_t, dy = op_case_grads((6,), 24, 64, 4, torch.float32, 1.5, 0.0)
    low = torch.get_autocast_dtype(x.device.type)
    with torch.autocast(x.device.type):
        y = lowrank.ops.nf4_lora_linear(x, w, a, b, 1.5, bias_t)
    assert y.dtype == low
    y.backward(dy.to(low))
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
    xl, al, bl = (t.detach().to(low).requires_grad_() for t in (x, a, b))
    y_ref = lowrank.ops.nf4_lora_linear(xl, w, al, bl, 1.5, bias_t.to(low))
    y_ref.backward(dy.to(low))
    assert torch.equal(y, y_ref) and torch.equal(x.grad, xl.grad.float())
    assert torch.equal(a.grad, al.grad.float()) and torch.equal(b.grad, bl.grad.float())


# Compiling these kernels for sm_90a / sm_80 without a GPU: tests/test_static.py (bench.static).


# -- the CPU path: native fused decode-and-multiply (M <= 8), tiled decode + GEMM otherwise ----------

@pytest.mark.skipif(HAS_CUDA, reason="the CPU path")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m_shape", [(1,), (2, 4), (9,), (3, 14)], ids=["m1", "m8", "m9", "m42"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["", "dropout"])
def test_nf4_lora_linear_cpu_paths(dtype, m_shape, dropout, monkeypatch):
    """The reference backend on the CPU with K in whole blocks: M <= 8 rows take the native fused
    pass, more rows the tiled decode (tiles forced small here: several row tiles and column tiles,
    the last of each partial). Never a dense dequantized W; output and gradients within the plain
    torch baseline's error against float64."""
    from lowrank.nf4_format import NF4Weight
    from lowrank.ops import nf4_lora_matmul as op

    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    monkeypatch.setattr(op, "TILE_BYTES", 1)  # 16-row tiles, 2-block column tiles
    monkeypatch.setattr(op, "MIN_TILE", 1)
    w, x, a, b, bias_t, dy = op_case_grads(m_shape, 45, 320, 6, dtype, 1.5, dropout, device="cpu")
    wd = w.dequantize(dtype)
    monkeypatch.setattr(NF4Weight, "dequantize", lambda *a, **k: pytest.fail("a dense W was decoded"))
    torch.manual_seed(123)
    y = lowrank.ops.nf4_lora_linear(x, w, a, b, 1.5, bias_t, dropout)
    y.backward(dy)
    mask = None
    if dropout:
        torch.manual_seed(123)
        mask = nf4_dropout_mask((x.shape[:-1].numel(), 320), dtype, dropout, "cpu").view(x.shape)
    check_op_grads(x, wd, a, b, bias_t, 1.5, mask, dy, y)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path")
def test_nf4_lora_linear_cpu_tile_buffer_per_thread(monkeypatch):
    """The reused tile buffer is per thread: two threads running different layers at once get each
    its own result (a shared buffer would mix their tiles)."""
    import threading

    from lowrank.ops import nf4_lora_matmul as op

    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    monkeypatch.setattr(op, "TILE_BYTES", 1)
    monkeypatch.setattr(op, "MIN_TILE", 1)
    cases = [fused_case(40, 48, 256, 4, torch.float32, device="cpu") for _ in range(2)]
    expected = [lowrank.ops.nf4_lora_linear(x, w, a, b, 1.0, bias).detach() for w, x, a, b, bias in cases]
    errors = []

    def work(i):
        w, x, a, b, bias = cases[i]
        for _ in range(30):
            if not torch.equal(lowrank.ops.nf4_lora_linear(x, w, a, b, 1.0, bias), expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
