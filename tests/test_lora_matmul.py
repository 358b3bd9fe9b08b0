"""The fused LoRA matmul (lowrank/kernels/lora_matmul.py, the op in lowrank/ops/lora_matmul.py) against the
float64 einsum oracles (tests/oracles.py; dropout masks recomputed from Philox itself).

Every kernel output is checked with the flash-attention rule (tests/helpers.assert_close): its
error against float64 may be at most twice that of the same maths done by plain torch in the same
dtype. Buffers the kernels fully write are NaN-poisoned first (`lm._empty` patched), so an
unwritten element fails. Without a GPU the kernels run in Triton's interpreter (conftest); with
one, the same tests run on CUDA, and the `gpu`-marked ones add GPU-sized shapes.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank
from lowrank import ops
from lowrank.kernels import lora_matmul as lm
from lowrank.ops.lora_matmul import lora_linear_reference
from tests.helpers import DTYPE_IDS, DTYPES, assert_close, poison_
from tests.oracles import lora_dropout_mask, lora_linear_f64, lora_linear_grads_f64

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RANKS = [1, 3, 64, 128]


def _nan_empty(shape, dtype, device):
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def make_case(m, k, n, r, dtype, bias=True, x_layout="contiguous", w_layout="contiguous", device=DEV, gen_seed=0):
    """Inputs scaled so that y, T and every gradient are O(1). Layouts: contiguous, "transposed"
    (a .t() view of a column-major buffer), "sliced" (every other column of a wider buffer)."""
    g = torch.Generator().manual_seed(gen_seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    if x_layout == "transposed":
        x = rnd(k, m).t()
    elif x_layout == "sliced":
        x = rnd(m, 2 * k)[:, ::2]
    else:
        x = rnd(m, k)
    w = rnd(k, n, std=k ** -0.5).t() if w_layout == "transposed" else rnd(n, k, std=k ** -0.5)
    a = rnd(r, k, std=k ** -0.5)
    b = rnd(n, r, std=r ** -0.5)
    bb = (rnd(2 * n)[::2] if x_layout == "sliced" else rnd(n)) if bias else None  # strided bias with sliced x
    dy = rnd(m, n)
    return x, w, a, b, bb, dy


def baseline(x, w, a, b, s, bias, mask, dy):
    """The same maths in plain torch, in the inputs' dtype: (y, T, dX, dA, dB)."""
    h = x if mask is None else x * mask.to(x.dtype)
    t = h @ a.t()
    y = F.linear(x, w, bias) + s * (t @ b.t())
    dt = s * (dy @ b)
    db = s * (dy.t() @ t)
    da = dt.t() @ h
    dh = dt @ a
    dx = dy @ w + (dh if mask is None else dh * mask.to(x.dtype))
    return y, t, dx, da, db


def dropout_mask(seed: int, m: int, k: int, p: float) -> torch.Tensor:
    """The kernels' dropout multiplier for `seed`: from the Philox oracle (numpy), except for
    GPU-sized masks on a GPU, which come from the kernels' own mask launcher (numpy Philox takes
    about 2 s for 2048 x 4096; test_kernel_dropout_mask_is_philox pins that launcher to the oracle)."""
    if DEV == "cuda" and m * k > 1 << 16:
        return lm.dropout_mask(torch.tensor([seed], dtype=torch.int64, device=DEV), m, k, p)
    return lora_dropout_mask(seed, m, k, p).to(DEV)


def check_all(m, k, n, r, dtype, bias, dropout, x_layout="contiguous", w_layout="contiguous",
              need_dx=True, split_k=None, split_n=None, split_m=None, scaling=0.75, gen_seed=0, small_m=None):
    x, w, a, b, bb, dy = make_case(m, k, n, r, dtype, bias, x_layout, w_layout, gen_seed=gen_seed)
    seed = torch.tensor([1234 + gen_seed], dtype=torch.int64, device=DEV) if dropout else None
    mask = dropout_mask(1234 + gen_seed, m, k, dropout) if dropout else None
    out = poison_(torch.empty(m, n, dtype=dtype, device=DEV))
    with mock.patch.object(lm, "_empty", _nan_empty):
        y, t = lm.lora_forward(x, w, a, b, scaling, bb, dropout, seed, out=out, split_k=split_k, small_m=small_m)
        dx, da, db = lm.lora_backward(dy, x, w, a, b, t, scaling, dropout, seed, need_dx=need_dx,
                                      split_n=split_n, split_m=split_m)
    assert y.data_ptr() == out.data_ptr()
    y64 = lora_linear_f64(x, w, a, b, scaling, bb, mask)
    dx64, da64, db64 = lora_linear_grads_f64(x, w, a, b, scaling, dy, mask)
    h64 = x.double() if mask is None else x.double() * mask
    yb, tb, dxb, dab, dbb = baseline(x, w, a, b, scaling, bb, mask, dy)
    assert_close(y, y64, yb, name="y")
    assert_close(t, h64 @ a.double().t(), tb, name="T")
    assert_close(da, da64, dab, name="dA")
    assert_close(db, db64, dbb, name="dB")
    if need_dx:
        assert_close(dx, dx64, dxb, name="dX")
    else:
        assert dx is None


# -- the kernels against float64 -------------------------------------------------------------


@pytest.mark.parametrize("rank", RANKS, ids=[f"r{r}" for r in RANKS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_odd_shapes_every_rank(dtype, rank):
    # 33 x 47 -> 59: no dimension is a multiple of any block; bias and dropout alternate with rank.
    i = RANKS.index(rank)
    check_all(33, 47, 59, rank, dtype, bias=i % 2 == 0, dropout=0.2 if i % 2 else 0.0)


@pytest.mark.parametrize("rank", RANKS, ids=[f"r{r}" for r in RANKS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_small_m_odd_shapes_every_rank(dtype, rank):
    # The small-M forward (Note on small M) at decode sizes, K split 3 ways with a ragged last range
    # (K=111 in 32-steps: ranges 64, 32, 15); M=1 and M=13 alternate with rank.
    i = RANKS.index(rank)
    check_all(1 if i % 2 else 13, 111, 37, rank, dtype, bias=i % 2 == 1, dropout=0.2 if i < 2 else 0.0, small_m=3)


@settings(max_examples=6 * settings.default.max_examples)  # ~0.1 s an example in the interpreter
@given(
    m=st.integers(1, 70), k=st.integers(1, 70), n=st.integers(1, 70),
    r=st.sampled_from([1, 2, 3, 5, 8, 16, 17, 31, 48, 64, 100, 128]),
    dtype=st.sampled_from(DTYPES), bias=st.booleans(), dropout=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
    x_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    w_layout=st.sampled_from(["contiguous", "transposed"]),
    need_dx=st.booleans(), splits=st.tuples(*[st.sampled_from([None, 1, 2, 3])] * 3),
    scaling=st.sampled_from([0.0, 0.5, 2.0]), gen_seed=st.integers(0, 2**16),
    small_m=st.sampled_from([None, None, 1, 2, 5]),  # the small-M forward with a split over K
)
def test_kernels_property(m, k, n, r, dtype, bias, dropout, x_layout, w_layout, need_dx, splits, scaling, gen_seed,
                          small_m):
    split_k, split_n, split_m = splits
    check_all(m, k, n, r, dtype, bias, dropout, x_layout, w_layout, need_dx, split_k, split_n, split_m,
              scaling, gen_seed, small_m)


@pytest.fixture
def deterministic():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old)


@pytest.mark.skipif(DEV == "cuda", reason="watches atomics through Triton's interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic_mode_uses_no_atomics(dtype, deterministic, monkeypatch):
    # Under torch.use_deterministic_algorithms(True) no kernel may sum through atomics (their order
    # varies run to run on a GPU), even where splits are asked for; the results still hold.
    from triton.runtime import interpreter

    def no_atomics(*args, **kwargs):
        raise AssertionError("an atomic add ran in deterministic mode")

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", no_atomics)
    # M=70 is 5 row tiles of 16: dB has a slice per row tile; splits asked for everywhere.
    check_all(70, 45, 38, 5, dtype, bias=True, dropout=0.2, split_k=3, split_n=2, split_m=3)


def test_atomics_watch_can_fail(monkeypatch):
    # The watch above sees atomics: outside deterministic mode the same case uses them.
    from triton.runtime import interpreter

    if DEV == "cuda":
        pytest.skip("watches atomics through Triton's interpreter")
    seen = []
    real = interpreter.InterpreterBuilder.create_atomic_rmw
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw",
                        lambda self, *a, **k: seen.append(1) or real(self, *a, **k))
    check_all(70, 45, 38, 5, torch.float32, bias=True, dropout=0.2, split_k=3, split_n=2, split_m=3)
    assert seen


@pytest.mark.parametrize("seed,m,k,p", [(7, 64, 200, 0.3), (2**62 - 5, 5, 333, 0.5), (0, 70, 33, 0.1)])
def test_kernel_dropout_mask_is_philox(seed, m, k, p):
    """The kernels' keep rule, philox(seed, m*K + k) >= p, is the one the oracle computes from
    Philox4x32-10 itself (numpy, no Triton): the debug launcher returns that very mask."""
    got = lm.dropout_mask(torch.tensor([seed], dtype=torch.int64, device=DEV), m, k, p)
    assert torch.equal(got.cpu(), lora_dropout_mask(seed, m, k, p))


def test_dropout_mask_statistics():
    seed = torch.tensor([7], dtype=torch.int64, device=DEV)
    p = 0.3
    mask = lm.dropout_mask(seed, 64, 200, p)
    assert set(mask.unique().tolist()) <= {0.0, 1.0 / (1.0 - p)}
    keep = (mask > 0).double().mean().item()
    # 12800 Bernoulli(0.7) draws: the standard deviation of the mean is 0.004; 5 sigma.
    assert abs(keep - (1 - p)) < 0.02, keep
    other = lm.dropout_mask(torch.tensor([8], dtype=torch.int64, device=DEV), 64, 200, p)
    assert not torch.equal(mask, other)
    assert torch.equal(mask, lm.dropout_mask(seed, 64, 200, p))
    # A mask for a smaller x is the top-left corner only when K matches (offsets are m*K + k).
    assert torch.equal(mask[:10], lm.dropout_mask(seed, 10, 200, p))


def test_launcher_errors():
    x, w, a, b, bb, dy = make_case(4, 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="seed"):
        lm.lora_forward(x, w, a, b, 1.0, bb, 0.5, None)
    with pytest.raises(ValueError, match="out must be"):
        lm.lora_forward(x, w, a, b, 1.0, bb, out=torch.empty(4, 7, device=DEV))
    with pytest.raises(ValueError, match="2-D"):
        lm.lora_forward(x[None], w, a, b, 1.0)
    y, t = lm.lora_forward(x, w, a, b, 1.0)
    with pytest.raises(ValueError, match="t \\(4, 2\\) float32"):
        lm.lora_backward(dy, x, w, a, b, t.double(), 1.0)


def test_empty_batch():
    x, w, a, b, bb, dy = make_case(0, 8, 6, 2, torch.float32)
    y, t = lm.lora_forward(x, w, a, b, 1.0, bb)
    dx, da, db = lm.lora_backward(dy, x, w, a, b, t, 1.0)
    assert y.shape == (0, 6) and dx.shape == (0, 8)
    assert torch.equal(da, torch.zeros_like(da)) and torch.equal(db, torch.zeros_like(db))


# -- the public op and its wiring --------------------------------------------------------------


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    calls = []
    real = lm.lora_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "lora_forward", spy)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "drop"])
def test_ops_lora_linear_3d_autograd(triton_backend, dropout):
    # A 3-D, non-contiguous x through ops.lora_linear and autograd; the mask is regenerated from
    # the seed the op draws (same generator state, same draw).
    dtype, s = torch.float32, 0.5
    x0, w, a, b, bb, _ = make_case(2 * 5, 24, 20, 6, dtype)
    x = x0.view(2, 5, 24).transpose(0, 1).requires_grad_()  # (5, 2, 24), strided
    a.requires_grad_(), b.requires_grad_()
    torch.manual_seed(3)
    y = ops.lora_linear(x, w, a, b, s, bb, dropout)
    assert triton_backend, "ops.lora_linear did not reach the Triton kernels"
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(3)
    mask = lora_dropout_mask(int(lm.draw_seed(DEV)), 10, 24, dropout).to(DEV).view(5, 2, 24) if dropout else None
    y64 = lora_linear_f64(x.detach(), w, a.detach(), b.detach(), s, bb, mask)
    dx64, da64, db64 = lora_linear_grads_f64(x.detach(), w, a.detach(), b.detach(), s, dy, mask)
    xd, ad, bd = x.detach(), a.detach(), b.detach()
    hb = xd if mask is None else xd * mask.to(dtype)
    tb = hb @ ad.t()
    yb = F.linear(xd, w, bb) + s * tb @ bd.t()
    assert_close(y.detach(), y64, yb, name="y")
    dtb = s * dy @ bd
    assert_close(x.grad, dx64, dy @ w + (dtb @ ad if mask is None else (dtb @ ad) * mask.to(dtype)), name="dX")
    assert_close(a.grad, da64, torch.einsum("...r,...k->rk", dtb, hb), name="dA")
    assert_close(b.grad, db64, s * torch.einsum("...n,...r->nr", dy, tb), name="dB")


def test_frozen_x_and_trainable_weight_fallback(triton_backend):
    x, w, a, b, bb, dy = make_case(9, 16, 12, 4, torch.float32)
    a.requires_grad_(), b.requires_grad_()
    ops.lora_linear(x, w, a, b, 1.0, bb).backward(dy)  # x needs no grad: dX is skipped
    assert x.grad is None and a.grad is not None
    _, da64, db64 = lora_linear_grads_f64(x, w, a.detach(), b.detach(), 1.0, dy)
    assert_close(a.grad, da64, name="dA")
    assert_close(b.grad, db64, name="dB")
    # A trainable weight is not the kernels' contract: the reference path computes dW.
    triton_backend.clear()
    w.requires_grad_()
    ops.lora_linear(x, w, a.detach(), b.detach(), 1.0, bb).backward(dy)
    assert not triton_backend and w.grad is not None
    assert_close(w.grad, dy.double().t() @ x.double(), name="dW")


def test_lora_linear_layer_uses_kernels(triton_backend):
    torch.manual_seed(0)
    base = nn.Linear(40, 28).to(DEV)
    model = nn.Sequential(base)
    lowrank.patch_linear(model, rank=5, dropout=0.1)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 7, 40, device=DEV, requires_grad=True)
    layer.eval()
    y = layer(x)
    assert triton_backend
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    s = layer.scaling()
    y64 = lora_linear_f64(x.detach(), base.weight.detach(), a.detach(), b.detach(), s, base.bias.detach())
    assert_close(y.detach(), y64, lora_linear_reference(x.detach(), base.weight, a.detach(), b.detach(), s, base.bias))
    layer.train()
    torch.manual_seed(11)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(11)
    mask = lora_dropout_mask(int(lm.draw_seed(DEV)), 21, 40, 0.1).to(DEV).view(3, 7, 40)
    dx64, da64, db64 = lora_linear_grads_f64(x.detach(), base.weight.detach(), a.detach(), b.detach(),
                                                       s, dy, mask)
    assert_close(a.grad, da64, name="dA")
    assert_close(b.grad, db64, name="dB")
    assert_close(x.grad, dx64, name="dX")


def test_patched_gpt2_matches_reference(monkeypatch):
    # GPT-2's Conv1D stores W as (in, out): LoRALinear hands the kernels weight.t(), a strided W.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(DEV).eval()
    lowrank.patch_linear(model, rank=4)
    for _, layer in lowrank.lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].normal_(std=0.1)
    ids = torch.randint(0, 64, (2, 9), device=DEV)

    lora_linear_module = importlib.import_module("lowrank.lora_linear")  # LoRALinear's module
    real_op = lora_linear_module.lora_linear

    def f64_op(x, w, a, b, s, bias=None, dropout=0.0):
        return lora_linear_f64(x, w, a, b, s, bias)

    def run(backend, dtype):
        monkeypatch.setenv("LOWRANK_BACKEND", backend)
        # ops.lora_linear takes 16/32-bit floats only: the float64 oracle is the einsum reference.
        monkeypatch.setattr(lora_linear_module, "lora_linear", f64_op if dtype == torch.float64 else real_op)
        m = model.to(dtype)
        m.zero_grad()
        logits = m(ids).logits
        logits.float().square().mean().backward()
        grads = [p.grad.clone() for p in m.parameters() if p.requires_grad]
        return logits.detach(), grads

    ref_logits, ref_grads = run("reference", torch.float64)
    base_logits, base_grads = run("reference", torch.float32)
    calls = []
    real = lm.lora_forward
    monkeypatch.setattr(lm, "lora_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits, grads = run("triton", torch.float32)
    assert len(calls) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert_close(logits, ref_logits, base_logits, name="logits")
    for i, (g, g64, gb) in enumerate(zip(grads, ref_grads, base_grads)):
        assert_close(g, g64, gb, name=f"grad {i}")


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_torch_compile_fullgraph(triton_backend, dropout):
    x, w, a, b, bb, dy = make_case(6, 16, 10, 3, torch.float32)
    a.requires_grad_(), b.requires_grad_()
    x.requires_grad_()

    def f(x, a, b):
        return ops.lora_linear(x, w, a, b, 0.5, bb, dropout).sin()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    torch.manual_seed(5)  # the seed draw is traced: the same generator state gives the same mask
    out = compiled(x, a, b)
    grads = torch.autograd.grad(out, (x, a, b), dy)
    torch.manual_seed(5)
    eager = f(x, a, b)
    eager_grads = torch.autograd.grad(eager, (x, a, b), dy)
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_patched_model_inductor(triton_backend):
    # A whole patched model through Inductor, fullgraph (a graph break raises), dropout on: the
    # kernels stay opaque custom ops inside the compiled graph. fallback_random makes Inductor draw
    # the dropout seed from torch's generator as eager does (its own RNG would draw other masks).
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).to(DEV)
    lowrank.patch_linear(model, rank=4, dropout=0.1)
    for _, layer in lowrank.lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].normal_()
    x = torch.randn(2, 5, 32, device=DEV)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        torch.manual_seed(1)
        out = fn(x)
        return out.detach(), torch.autograd.grad(out.square().mean(), params)

    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        y, grads = loss_and_grads(compiled)
    assert len(triton_backend) == 2, "the compiled model did not run the kernels"
    y_eager, grads_eager = loss_and_grads(model)
    torch.testing.assert_close(y, y_eager)
    for g, e in zip(grads, grads_eager):
        torch.testing.assert_close(g, e)


def test_opcheck():
    x, w, a, b, bb, dy = make_case(5, 16, 8, 3, torch.float32)
    seed = torch.tensor([5], dtype=torch.int64, device=DEV)
    a.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(torch.ops.lowrank.lora_linear_fwd.default, (x, w, a, b, bb, seed, 0.5, 0.1),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    t = lm.lora_forward(x, w, a, b, 0.5, bb, 0.1, seed)[1]
    torch.library.opcheck(torch.ops.lowrank.lora_linear_bwd.default, (dy, x, w, a, b, t, seed, 0.5, 0.1, True),
                          test_utils=("test_schema", "test_faketensor"))


# Compiling for real GPUs without one (sm_90a, sm_80: every variant the launchers can choose, its
# registers, spills, shared memory and tensor-core instructions) is tests/test_static.py's job.


# -- GPU-sized shapes (the GPU machine) ----------------------------------------------------------

GPU_SHAPES = [(1, 4096, 4096), (16, 4096, 1024), (511, 1000, 3000), (2048, 4096, 4096), (4097, 1024, 14336 // 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 16, 64, 100, 128], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_shapes(dtype, shape, rank):
    m, k, n = shape
    i = GPU_SHAPES.index(shape)
    check_all(m, k, n, rank, dtype, bias=i % 2 == 1, dropout=0.1 if (i + rank) % 2 else 0.0,
              w_layout="transposed" if i == 2 else "contiguous", x_layout="sliced" if i == 3 else "contiguous")


@pytest.mark.gpu
@settings(max_examples=60)
@given(m=st.integers(1, 600), k=st.integers(1, 600), n=st.integers(1, 600),
       r=st.sampled_from([1, 7, 16, 33, 64, 100, 128]),  # every BLOCK_R: each one is a compile
       dtype=st.sampled_from(DTYPES), dropout=st.sampled_from([0.0, 0.3]), bias=st.booleans(),
       splits=st.tuples(*[st.sampled_from([None, 1, 4])] * 3), gen_seed=st.integers(0, 2**16))
def test_gpu_property(m, k, n, r, dtype, dropout, bias, splits, gen_seed):
    check_all(m, k, n, r, dtype, bias, dropout, split_k=splits[0], split_n=splits[1], split_m=splits[2],
              gen_seed=gen_seed)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4096, 1024), (16, 4096, 1024), (16, 14336, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_small_m_path_is_chosen_and_reproducible(shape):
    # At M <= 16 the automatic choice is the split-K path (no atomics: two runs agree bit for bit),
    # and it agrees with the plain GEMM path to the tolerance rule.
    m, k, n = shape
    x, w, a, b, bb, _ = make_case(m, k, n, 16, torch.bfloat16)
    assert lm._small_m_split(m, n, k, lm.num_sms(x.device)) >= 1
    calls, real = [], lm._small_m_forward
    with mock.patch.object(lm, "_small_m_forward", side_effect=lambda *a: calls.append(1) or real(*a)):
        y1, t1 = lm.lora_forward(x, w, a, b, 0.5, bb)
    assert calls, "M <= 16 did not take the small-M path"
    y2, t2 = lm.lora_forward(x, w, a, b, 0.5, bb)
    assert torch.equal(y1, y2) and torch.equal(t1, t2)
    y64 = lora_linear_f64(x, w, a, b, 0.5, bb)
    assert_close(y1, y64, baseline(x, w, a, b, 0.5, bb, None, torch.zeros_like(y1))[0], name="y")


@contextlib.contextmanager
def allow_tf32(flag: bool):
    # Not monkeypatch: torch.backends.cuda.matmul answers allow_tf32 through __getattr__, so
    # monkeypatch's undo tries delattr and raises AttributeError at teardown.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_gpu_tf32_follows_torch():
    # With TF32 allowed (torch's own switch), fp32 dots use it: still within TF32's ~1e-3 of float64.
    x, w, a, b, bb, dy = make_case(300, 512, 256, 16, torch.float32)
    with allow_tf32(True):
        y, _ = lm.lora_forward(x, w, a, b, 0.5, bb)
    y64 = lora_linear_f64(x, w, a, b, 0.5, bb)
    assert (y.double() - y64).abs().max().item() < 2e-2 * max(1.0, y64.abs().max().item())
    assert not math.isnan(y.double().sum().item())


# -- the fp32 temporaries keep ~16 bits in 16-bit dots (Note: fp32 LoRA temporaries) -----------


def _exact_case(which, dtype):
    """Small-integer-like inputs whose every product and sum is exact in fp32, built so that one
    fp32 temporary needs more bits than the 16-bit dtype holds and the output cancels down to those
    low bits. Rounding T (or dT) to 16 bits before its dot changes the output by 100% or 2 ulps."""
    e = 2.0 ** -12
    if which == "T":  # T[0] = [1 + 2^-12, 1], T[1] = [1, 1]: y[0] = T[0] @ [1, -1] = 2^-12; dB too
        x = [[1.0, e], [1.0, 0.0]]
        a = [[1.0, 1.0], [1.0, 0.0]]
        b = [[1.0, -1.0]]
        dy = [[1.0], [-1.0]]
    else:  # dT[0] = [(1 + 2^-6)(1 - 2^-6), 1] = [1 - 2^-12, 1]: dX[0] = -2^-12, dA[0] = 2^-6 - 2^-12
        x = [[1.0], [-1.0]]
        a = [[1.0], [-1.0]]
        b = [[1.0 - 2 ** -6, 0.0], [0.0, 1.0]]
        dy = [[1.0 + 2 ** -6, 1.0], [1.0, 0.0]]
    x, a, b, dy = (torch.tensor(v, dtype=dtype, device=DEV) for v in (x, a, b, dy))
    w = torch.zeros(b.shape[0], x.shape[1], dtype=dtype, device=DEV)
    return x, w, a, b, dy


@pytest.mark.parametrize("which", ["T", "dT"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("small_m", [0, 1], ids=["gemm", "small_m"])
def test_fp32_temporaries_are_not_rounded_to_16_bits(dtype, which, small_m):
    # Plain torch in bf16/fp16 rounds T to the dtype and gets these outputs wrong; the hi/lo split
    # (or fp32 IEEE dots for fp32) gets them exactly, so the kernel must equal the float64 result
    # rounded once to the output dtype. fp32 is checked with TF32 off, its documented exact mode.
    x, w, a, b, dy = _exact_case(which, dtype)
    with mock.patch.object(lm, "_empty", _nan_empty), allow_tf32(False):
        y, t = lm.lora_forward(x, w, a, b, 1.0, small_m=small_m)
        dx, da, db = lm.lora_backward(dy, x, w, a, b, t, 1.0)
    y64 = lora_linear_f64(x, w, a, b, 1.0)
    dx64, da64, db64 = lora_linear_grads_f64(x, w, a, b, 1.0, dy)
    for name, out, ref in [("y", y, y64), ("dX", dx, dx64), ("dA", da, da64), ("dB", db, db64)]:
        assert torch.equal(out, ref.to(dtype)), f"{name} ({dtype}): {out.tolist()} != {ref.tolist()}"
