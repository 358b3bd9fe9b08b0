"""NF4: bit-exactness with bitsandbytes (its CPU backend is the oracle), the Triton dequant and
fused NF4 LoRA kernels (interpreter on CPU), and QLoRA patching."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank
from lowrank import reference
from lowrank.nf4 import BLOCKSIZES, NF4Weight, dynamic_code, nf4_code, quantize_nf4

from tests import models
from tests.helpers import DTYPE_IDS, DTYPES, assert_close, poison_, where_mismatch

try:  # the NF4 oracle; the GPU machine may lack it, and then only the tests that need it skip
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    from bitsandbytes.backends.default import ops as bnb_default
except ImportError:
    bnb = BF = bnb_default = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (the NF4 oracle) is not installed")


@pytest.fixture(autouse=True, scope="module")
def _bnb_without_compile():
    """bitsandbytes wraps its pure-torch dequant in torch.compile (seconds per recompile, and it
    recompiles per shape): use the plain function, whose arithmetic is the same."""
    if bnb_default is None:
        yield
        return
    compiled = bnb_default._dequantize_4bit_compute
    bnb_default._dequantize_4bit_compute = getattr(compiled, "__wrapped__", compiled)
    yield
    bnb_default._dequantize_4bit_compute = compiled


def bnb_quantize(w, blocksize, double_quant):
    return BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_dequantize_format(packed, state, dtype):
    """bitsandbytes' pure-torch dequant (the flattened format its CUDA kernels share)."""
    absmax = state.absmax
    if state.nested:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return bnb_default._dequantize_4bit_compute(packed.reshape(-1), absmax, nf4_code(), state.blocksize,
                                                state.shape, dtype)


def bnb_cpu_dequant_is_right(shape, blocksize):
    """bitsandbytes 0.50.2's AVX-512 CPU dequant mis-indexes blocks that span rows (lowrank/nf4.py,
    `# Note: bitsandbytes' CPU dequantize and blocks that span rows`)."""
    k = shape[-1]
    return not (k % 16 == 0 and k % blocksize != 0)


def assert_same_as_bnb(w, blocksize, double_quant):
    packed, state = bnb_quantize(w, blocksize, double_quant)
    ours = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(ours.packed, packed), "packed codes differ"
    assert ours.absmax.dtype == state.absmax.dtype and torch.equal(ours.absmax, state.absmax), "absmax differs"
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.offset, state.offset), "offset differs"
        assert torch.equal(ours.nested_code, state.state2.code), "nested quant map differs"
    else:
        assert ours.nested_absmax is None
    return packed, state, ours


def weights(shape, dtype, kind):
    w = torch.randn(shape)
    if kind == "tiny":
        w = w * 1e-30  # below fp16's range; fp32 subnormal-adjacent absmax
    elif kind == "huge":
        w = w * 1e30
    elif kind == "zero-blocks":
        w.view(-1)[: w.numel() // 2] = 0  # whole blocks of zeros
    elif kind == "outliers":
        w.view(-1)[::37] *= 1000
    if dtype == torch.float16 and kind in ("tiny", "huge"):
        w = torch.randn(shape) * (1e-6 if kind == "tiny" else 6e4 / 5)
    return w.to(dtype)


# --------------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------------
@needs_bnb
def test_tables_match_bitsandbytes():
    assert torch.equal(nf4_code(), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), BF.create_dynamic_map())


@needs_bnb
@settings(max_examples=40)
@given(out_f=st.integers(1, 70), in_f=st.integers(1, 300), blocksize=st.sampled_from(BLOCKSIZES),
       dtype=st.sampled_from(DTYPES), double_quant=st.booleans(),
       kind=st.sampled_from(["normal", "tiny", "huge", "zero-blocks", "outliers"]))
def test_quantize_dequantize_bit_exact(out_f, in_f, blocksize, dtype, double_quant, kind):
    w = weights((out_f, in_f), dtype, kind)
    packed, state, ours = assert_same_as_bnb(w, blocksize, double_quant)
    for out_dtype in DTYPES:
        mine = ours.dequantize(out_dtype)
        assert mine.dtype == out_dtype and mine.shape == w.shape
        assert torch.equal(mine, bnb_dequantize_format(packed, state, out_dtype)), out_dtype
        if bnb_cpu_dequant_is_right(w.shape, blocksize):
            state.dtype = out_dtype
            theirs = BF.dequantize_4bit(packed, state, quant_type="nf4")
            if packed.shape[0] == 1:  # a 1- or 2-element weight: bitsandbytes reads a 1-row A as
                theirs = theirs.t()   # transposed and returns its output transposed (values equal)
            assert torch.equal(mine, theirs), out_dtype


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,blocksize", [((64, 256), 64), ((97, 111), 64), ((33, 200), 32),
                                             ((300, 520), 256), ((3, 5000), 4096), ((513, 1), 64)])
def test_bit_exact_fixed_shapes(shape, blocksize, dtype):
    w = weights(shape, dtype, "normal")
    packed, state, ours = assert_same_as_bnb(w, blocksize, True)
    assert torch.equal(ours.dequantize(dtype), bnb_dequantize_format(packed, state, dtype))


@needs_bnb
def test_nested_blocks_span_more_than_256():
    """More than one nested block (>256 absmax values), with a partial last one."""
    w = torch.randn(130, 300)  # 610 blocks of 64
    assert_same_as_bnb(w, 64, True)


@needs_bnb
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_chunked_quantization_same_bytes(blocksize, monkeypatch):
    """Quantization runs in chunks of whole blocks: tiny chunks must give the same bytes."""
    import lowrank.nf4 as nf4_mod

    monkeypatch.setattr(nf4_mod, "_CHUNK", {"cpu": 100, "cuda": 100})
    assert_same_as_bnb(torch.randn(37, 101), blocksize, True)


@needs_bnb
def test_all_zero_weight():
    w = torch.zeros(8, 64)
    _, _, ours = assert_same_as_bnb(w, 64, True)
    assert torch.equal(ours.dequantize(torch.float32), w)


def test_dequant_error_is_bounded():
    """Independent of bitsandbytes: |w - deq(w)| <= half the widest NF4 gap times the block absmax."""
    w = torch.randn(50, 130, dtype=torch.float64).float()
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    gap = (nf4_code()[1:] - nf4_code()[:-1]).max().item() / 2
    flat = w.view(-1)
    am = torch.nn.functional.pad(flat.abs(), (0, (-flat.numel()) % 64)).view(-1, 64).amax(1)
    bound = (gap * am).repeat_interleave(64)[: flat.numel()] * (1 + 1e-6)
    assert bool(((q.dequantize(torch.float32).view(-1) - flat).abs() <= bound).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_raise(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf.*\(2, 5\)"):
        quantize_nf4(w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(torch.randn(64))
    with pytest.raises(TypeError, match="dtype"):
        quantize_nf4(torch.randn(4, 64).double())
    with pytest.raises(TypeError, match="dtype"):
        quantize_nf4(torch.randn(4, 64)).dequantize(torch.float64)


@pytest.mark.parametrize("double_quant,bits", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)])
def test_bits_per_param(double_quant, bits):
    q = quantize_nf4(torch.randn(256, 1024), double_quant=double_quant)
    # + one fp32 offset for the whole weight
    assert q.nbytes == 256 * 1024 / 2 + (4096 if double_quant else 4 * 4096) + (4 * 16 + 4 if double_quant else 0)
    assert abs(q.bits_per_param() - bits) < 1e-3


# --------------------------------------------------------------------------------------------
# bitsandbytes Linear4bit interchange
# --------------------------------------------------------------------------------------------
def make_bnb_linear(in_f, out_f, double_quant=True, blocksize=64, bias=True):
    dense = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4")
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    layer = layer.to("cpu")  # quantizes (bitsandbytes does it on the move to a device)
    layer.train()  # keeps bitsandbytes off its CPU inference repacking path
    return dense, layer


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False])
def test_from_bnb_state_dict_and_module(double_quant):
    dense, layer = make_bnb_linear(96, 40, double_quant)
    sd = layer.state_dict()
    w_sd = NF4Weight.from_bnb(sd)
    w_mod = NF4Weight.from_bnb(layer)
    ours = quantize_nf4(dense.weight.data, double_quant=double_quant)
    for w in (w_sd, w_mod):
        assert torch.equal(w.packed, ours.packed) and torch.equal(w.absmax, ours.absmax)
        assert torch.equal(w.dequantize(torch.float32), ours.dequantize(torch.float32))
    # our state dict has exactly bitsandbytes' weight keys and values
    mine = ours.to_bnb_state_dict()
    theirs = {k: v for k, v in sd.items() if k != "bias"}
    assert set(mine) == set(theirs)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False])
def test_to_bnb_round_trip_outputs_identical(double_quant):
    """Our NF4 -> bnb Linear4bit (from_prequantized) gives bnb's outputs from our weight, and
    back again we read the same bytes."""
    # in_features a multiple of the blocksize: bitsandbytes' own CPU forward is wrong otherwise
    w = torch.randn(48, 192)
    bias = torch.randn(48)
    ours = quantize_nf4(w, double_quant=double_quant)
    sd = ours.to_bnb_state_dict()
    layer = bnb.nn.Linear4bit(192, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        data=sd["weight"], quantized_stats={k: v for k, v in sd.items() if k != "weight"},
        device="cpu", module=layer)
    layer.bias = torch.nn.Parameter(bias.clone())
    layer.train()
    x = torch.randn(5, 192)
    with torch.no_grad():
        y_bnb = layer(x)
    y_ours = torch.nn.functional.linear(x, ours.dequantize(torch.float32), bias)
    assert torch.equal(y_bnb, y_ours)
    back = NF4Weight.from_bnb(layer.state_dict())
    assert torch.equal(back.packed, ours.packed) and torch.equal(back.absmax, ours.absmax)
    if double_quant:
        assert torch.equal(back.offset, ours.offset) and torch.equal(back.nested_absmax, ours.nested_absmax)


@needs_bnb
def test_from_bnb_rejects_fp4():
    layer = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="fp4"):
        NF4Weight.from_bnb(layer)
    with pytest.raises(ValueError, match="fp4"):
        NF4Weight.from_bnb(layer.state_dict())


# --------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU)
# --------------------------------------------------------------------------------------------
kernels_nf4 = pytest.importorskip("lowrank.kernels.nf4", reason="needs Triton")
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# On a GPU every new shape class and flag set is a fresh Triton compile (~1 s): the property
# tests draw fewer examples there (the interpreter runs the same kernel source on many).
GPU_FEW = 6


def examples(n: int) -> int:
    return GPU_FEW if HAS_CUDA else n


@settings(max_examples=examples(30))
@given(out_f=st.integers(1, 40), in_f=st.integers(1, 200), blocksize=st.sampled_from([32, 64, 128, 256, 512]),
       double_quant=st.booleans(), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_dequant_kernel_bit_identical(out_f, in_f, blocksize, double_quant, dtype, scale):
    w = quantize_nf4((torch.randn(out_f, in_f) * scale).to(DEV), blocksize=blocksize, double_quant=double_quant)
    out = poison_(torch.empty(w.shape, dtype=dtype, device=DEV))
    kernels_nf4.dequantize(w, dtype, out=out)
    ref = w.dequantize(dtype)
    assert torch.equal(out, ref), where_mismatch(out, ref, 0.0)


@pytest.mark.parametrize("blocksize", [2048, 4096])
def test_dequant_kernel_blocks_larger_than_a_program(blocksize):
    """Blocks longer than one program's run: several programs share one block's absmax."""
    w = quantize_nf4(torch.randn(3, 3000, device=DEV), blocksize=blocksize)
    out = poison_(torch.empty(w.shape, dtype=torch.bfloat16, device=DEV))
    kernels_nf4.dequantize(w, torch.bfloat16, out=out)
    assert torch.equal(out, w.dequantize(torch.bfloat16))


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
       scaling=st.sampled_from([0.5, 2.0]))
def test_fused_forward_kernel(m, n, k, r, dtype, blocksize, bias, scaling):
    w, x, a, b, bias_t = fused_case(m, n, k, r, dtype, blocksize, bias)
    wd = w.dequantize(dtype)
    t = x @ a.t()
    out = poison_(torch.empty(m, n, dtype=dtype, device=DEV))
    kernels_nf4.nf4_matmul(x, w, w.block_absmax(), True, t, b.t(), scaling, bias_t, out=out)
    # the kernel takes T in the compute dtype, like the reference path: the oracle uses that T
    ref = torch.einsum("mk,nk->mn", x.double(), wd.double()) + scaling * t.double() @ b.double().t()
    if bias_t is not None:
        ref = ref + bias_t.double()
    baseline = reference.lora_linear(x, wd, a, b, scaling, bias_t)
    assert_close(out, ref, baseline, name="nf4_matmul forward")


@settings(max_examples=examples(20))
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 90), r=st.integers(1, 20),
       dtype=st.sampled_from(DTYPES))
def test_fused_dx_kernel(m, n, k, r, dtype):
    """dX = dY @ deq(W) + dT @ A, with W decoded inside the loop over N."""
    w, _, a, _, _ = fused_case(m, n, k, r, dtype, bias=False)
    wd = w.dequantize(dtype)
    dy = torch.randn(m, n, device=DEV).to(dtype)
    dt = torch.randn(m, r, device=DEV).to(dtype)
    out = poison_(torch.empty(m, k, dtype=dtype, device=DEV))
    kernels_nf4.nf4_matmul(dy, w, w.block_absmax(), False, dt, a, 1.0, out=out)
    ref = dy.double() @ wd.double() + dt.double() @ a.double()
    baseline = torch.addmm(dy @ wd, dt, a)
    assert_close(out, ref, baseline, name="nf4_matmul dX")


def op_case_grads(m_shape, n, k, r, dtype, scaling, dropout, bias=True, device=DEV):
    w, x2, a, b, bias_t = fused_case(int(torch.tensor(m_shape).prod()), n, k, r, dtype, bias=bias, device=device)
    x = x2.view(*m_shape, k).requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    dy = torch.randn(*m_shape, n, device=device).to(dtype)
    return w, x, a, b, bias_t, dy


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
    if dropout:
        torch.manual_seed(123)
        mask = kernels_nf4.dropout_keep(x.detach().view(-1, 70), dropout).view(x.shape)
    wd = w.dequantize(dtype)
    ref = reference.lora_linear_f64(x.detach(), wd, a.detach(), b.detach(), 1.5, bias_t, mask)
    dx, da, db = reference.lora_linear_grads_f64(x.detach(), wd, a.detach(), b.detach(), 1.5, dy, mask)
    # baseline: plain torch in the same dtype, with the same mask
    xb, ab, bb = (t.detach().clone().requires_grad_() for t in (x, a, b))
    h = xb * mask if mask is not None else xb
    yb = torch.nn.functional.linear(xb, wd, bias_t) + 1.5 * (h @ ab.t()) @ bb.t()
    yb.backward(dy)
    assert_close(y, ref, yb, name="y")
    assert_close(x.grad, dx, xb.grad, name="dx")
    assert_close(a.grad, da, ab.grad, name="dA")
    assert_close(b.grad, db, bb.grad, name="dB")


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


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_gpu_shapes(m, dtype):
    """Real tile configs (small-M path included) and Llama-like sizes on the GPU."""
    n, k, r = 1536, 2048, 16
    w, x, a, b, bias_t = fused_case(m, n, k, r, dtype, device="cuda")
    wd = w.dequantize(dtype)
    assert torch.equal(kernels_nf4.dequantize(w, dtype), wd)
    t = x @ a.t()
    out = poison_(torch.empty(m, n, dtype=dtype, device="cuda"))
    kernels_nf4.nf4_matmul(x, w, w.block_absmax(), True, t, b.t(), 2.0, bias_t, out=out)
    ref = x.double() @ wd.double().t() + 2.0 * t.double() @ b.double().t() + bias_t.double()
    assert_close(out, ref, reference.lora_linear(x, wd, a, b, 2.0, bias_t), name="forward")
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    dx = poison_(torch.empty(m, k, dtype=dtype, device="cuda"))
    kernels_nf4.nf4_matmul(dy, w, w.block_absmax(), False, t, a, 1.0, out=dx)
    assert_close(dx, dy.double() @ wd.double() + t.double() @ a.double(), torch.addmm(dy @ wd, t, a), name="dX")


# --------------------------------------------------------------------------------------------
# QLoRA patching
# --------------------------------------------------------------------------------------------
from lowrank.qlora import NF4Linear, quantized_layers  # noqa: E402


def expected_nf4_bytes(numel, blocksize=64, double_quant=True):
    blocks = -(-numel // blocksize)
    if double_quant:
        return (numel + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4
    return (numel + 1) // 2 + 4 * blocks


def tiny_llama(seed=0):
    return models.tiny_llama(seed=seed, hidden=64, intermediate=128, vocab=128)


def test_qlora_llama_trains_and_only_lora_changes():
    model = tiny_llama()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    lowrank.patch_linear(model, rank=8, alpha=16, quantize="nf4", compute_dtype=torch.float32)
    lowrank.prepare_for_qlora_training(model, gradient_checkpointing=False)
    layers = dict(quantized_layers(model))
    assert len(layers) == 14  # 7 projections x 2 layers; lm_head stays dense
    total_numel = total_bytes = 0
    for name, layer in layers.items():
        path = name.removesuffix(".base_layer")
        ref = quantize_nf4(dense[path], blocksize=64)
        assert torch.equal(layer.nf4.packed, ref.packed) and torch.equal(layer.nf4.absmax, ref.absmax)
        assert layer.nf4.nbytes == expected_nf4_bytes(dense[path].numel())
        total_numel += dense[path].numel()
        total_bytes += layer.nf4.nbytes
    assert 4.12 < 8 * total_bytes / total_numel < 4.2
    trainable_n, total_n = lowrank.trainable_parameters(model)
    lora_n = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable_n == lora_n
    assert total_n == sum(p.numel() for p in tiny_llama().parameters()) + lora_n
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stored = {n: {k: v.clone() for k, v in m.nf4.tensors().items()} for n, m in layers.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-2] in ("lora_A", "lora_B") for n, p in model.named_parameters()
                             if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == p.requires_grad, f"{n}: changed={changed}, trainable={p.requires_grad}"
    for n, m in layers.items():
        for k, v in m.nf4.tensors().items():
            assert torch.equal(v, stored[n][k]), f"{n}.{k} changed"


def test_qlora_patch_matches_nf4_reference_forward():
    """Zero-initialised B: the patched model computes exactly x @ deq(W).T (+ bias) per layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32, bias=False))
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    b0 = model[0].bias.detach().clone()
    old = model[0]
    lowrank.patch_linear(model, rank=4, targets=["0", "2"], quantize="nf4", compute_dtype=torch.float32)
    assert old.weight.numel() == 0, "the dense weight must be released"
    x = torch.randn(5, 64)
    h = torch.relu(torch.nn.functional.linear(x, quantize_nf4(w0).dequantize(torch.float32), b0))
    ref = torch.nn.functional.linear(h, quantize_nf4(w2).dequantize(torch.float32))
    assert torch.equal(model(x), ref)


def test_qlora_patch_errors_leave_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1.*NaN/Inf"):
        lowrank.patch_linear(model, rank=4, targets=["0", "1"], quantize="nf4")
    assert type(model[0]) is torch.nn.Linear and model[0].weight.numel() == 64 * 64
    with pytest.raises(ValueError, match="quantize"):
        lowrank.patch_linear(model, rank=4, targets=["0"], quantize="int4")
    with pytest.raises(ValueError, match="blocksize"):
        lowrank.patch_linear(model, rank=4, targets=["0"], quantize="nf4", blocksize=48)
    assert type(model[0]) is torch.nn.Linear


@needs_bnb
def test_adopts_bnb_linear4bit_without_requantizing():
    _, layer = make_bnb_linear(128, 48, double_quant=True)
    model = torch.nn.Sequential(layer)
    packed_ptr = layer.weight.data.data_ptr()
    x = torch.randn(3, 128)
    with torch.no_grad():
        y_bnb = layer(x)
    lowrank.patch_linear(model, rank=4, targets=["0"], compute_dtype=torch.float32)
    base = model[0].base_layer
    assert isinstance(base, NF4Linear) and base.nf4.packed.data_ptr() == packed_ptr
    assert torch.equal(model(x), y_bnb)  # B = 0: LoRA adds exactly nothing


@needs_bnb
def test_nf4linear_state_dict_is_bitsandbytes():
    dense, layer = make_bnb_linear(128, 40, double_quant=True)
    ours = NF4Linear.from_linear(dense, compute_dtype=torch.float32)
    theirs = layer.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    fresh = NF4Linear(quantize_nf4(torch.randn(40, 128)), torch.zeros(40), torch.float32)
    fresh.load_state_dict(theirs)
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), ours(x))


def test_nf4linear_dtype_cast_keeps_storage():
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 16), compute_dtype=torch.float32)
    absmax = layer.nf4.absmax.clone()
    layer.half()
    assert layer.nf4.absmax.dtype == torch.uint8 and torch.equal(layer.nf4.absmax, absmax)
    assert layer.nf4.nested_absmax.dtype == torch.float32


def test_qlora_llama_triton_path_matches_reference(monkeypatch):
    """The patched model through the Triton kernels (interpreter here) gives the reference's loss
    and LoRA gradients."""
    model = tiny_llama().to(DEV)
    lowrank.patch_linear(model, rank=4, quantize="nf4", compute_dtype=torch.float32, init="gaussian")
    with torch.no_grad():
        for _, m in lowrank.lora_layers(model):
            m.lora_B["default"].normal_(0, 0.05)  # non-zero B so the LoRA branch counts
    ids = torch.randint(0, 128, (2, 8), device=DEV)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("LOWRANK_BACKEND", backend)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    (l_ref, g_ref), (l_tri, g_tri) = results["reference"], results["triton"]
    assert torch.allclose(l_tri, l_ref, rtol=1e-5, atol=1e-5), (l_tri, l_ref)
    for a, b in zip(g_tri, g_ref):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * b.abs().max().item() + 1e-8)


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
        kernels_nf4.nf4_matmul(x, w, w.block_absmax(), True, t, b.t(), 2.0, bias_t, out=out, config=CONFIGS[config])
        ref = x.double() @ wd.double().t() + 2.0 * t.double() @ b.double().t() + bias_t.double()
        baseline = reference.lora_linear(x, wd, a, b, 2.0, bias_t)
    else:
        dy = torch.randn(m, n, device=DEV).to(dtype)
        dt = torch.randn(m, r, device=DEV).to(dtype)
        out = poison_(torch.empty(m, k, dtype=dtype, device=DEV))
        kernels_nf4.nf4_matmul(dy, w, w.block_absmax(), False, dt, a, 1.0, out=out, config=CONFIGS[config])
        ref = dy.double() @ wd.double() + dt.double() @ a.double()
        baseline = torch.addmm(dy @ wd, dt, a)
    assert_close(out, ref, baseline, name=f"nf4_matmul {config}")


def test_fused_aligned_exact_products():
    """With one-hot inputs the kernel returns deq(W) entries themselves: the tile decode is exact
    (catches a nibble-order or absmax-run mistake that a tolerance could hide)."""
    k, n = 128, 40
    w = quantize_nf4(torch.randn(n, k, device=DEV), blocksize=32)
    wd = w.dequantize(torch.float32)
    eye_k = torch.eye(k, device=DEV)
    for name, cfg in CONFIGS.items():
        out = kernels_nf4.nf4_matmul(eye_k, w, w.block_absmax(), True, config=cfg)  # (k, n) = W.T
        assert torch.equal(out, wd.t()), name
        out = kernels_nf4.nf4_matmul(torch.eye(n, device=DEV), w, w.block_absmax(), False, config=cfg)  # W
        assert torch.equal(out, wd), name


def test_prepare_for_qlora_training_checkpointing_same_grads():
    """Norms go to fp32; with gradient checkpointing (inputs made to require grad) the LoRA
    gradients equal those without it."""
    grads = []
    for gc in (False, True):
        model = tiny_llama().to(torch.bfloat16)
        lowrank.patch_linear(model, rank=4, quantize="nf4", compute_dtype=torch.float32, init="gaussian")
        lowrank.prepare_for_qlora_training(model, gradient_checkpointing=gc)
        norms = [m for m in model.modules() if type(m).__name__.endswith("Norm")]
        assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        with torch.no_grad():
            for _, m in lowrank.lora_layers(model):
                m.lora_B["default"].fill_(0.01)
        model.train()
        ids = torch.arange(16).view(2, 8)
        model(input_ids=ids, labels=ids).loss.backward()
        g = [p.grad for n, p in model.named_parameters() if p.requires_grad]
        assert all(x is not None and torch.isfinite(x).all() and (x != 0).any() for x in g)
        grads.append(g)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-6)


@pytest.mark.gpu
def test_patch_peak_memory_one_layer():
    """Quantizing while patching: peak memory stays near one dense layer above the final model."""
    layers, d = 8, 4096
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)]).to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    lowrank.patch_linear(model, rank=16, targets="all-linear", quantize="nf4")
    torch.cuda.synchronize()
    peak, end = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    layer = d * d * 2
    assert end < start / 3  # 4-bit + LoRA instead of bf16
    # the dense model itself is freed as we go: the peak never exceeds the start
    assert peak <= start + 1.5 * layer, (peak - start) / layer


_COMPILE_SCRIPT = r"""
import re, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowrank.kernels import nf4 as K

target = GPUTarget("cuda", 90, 32)  # the H200
ptx = {}
deq = dict(packed_ptr="*u8", absmax_ptr="*u8", nested_absmax_ptr="*fp32", nested_code_ptr="*fp32",
           offset_ptr="*fp32", code_ptr="*fp32", out_ptr="*bf16", n_elements="i64")
for bs in (64, 4096):
    ce = dict(BLOCKSIZE=bs, NESTED_BLOCKSIZE=256, NESTED=True, BLOCK=2048, INTERPRETED=False)
    k = triton.compile(ASTSource(K._nf4_dequant_kernel, {**deq, **{c: "constexpr" for c in ce}}, ce), target=target,
                       options={"enable_fp_fusion": False})
    ptx[f"dequant{bs}"] = k.asm["ptx"]
mm = ["a_ptr", "packed_ptr", "absmax_ptr", "code_ptr", "l_ptr", "r_ptr", "bias_ptr", "out_ptr"]
ints = ["M", "P", "Q", "K_W"]
strides = ["stride_am", "stride_aq", "stride_lm", "stride_lr", "stride_rr", "stride_rp", "stride_om", "stride_op"]
variants = [("bf16", t, a, m) for t in (True, False) for a in (True, False) for m in (1, 4096)]
variants += [("fp16", True, True, 64), ("fp32", False, True, 4096), ("fp32", True, True, 1), ("fp32", True, False, 1)]
for dtype, transposed, aligned, m in variants:
    cfg = K._config(m, False, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype], aligned)
    split = 3 if m == 1 else 1
    sig = {"a_ptr": f"*{dtype}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
           "l_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
           "out_ptr": "*fp32" if split > 1 else f"*{dtype}",
           **{i: "i32" for i in ints}, "lora_scale": "fp32", "q_per_split": "i32",
           **{s: "i32" for s in strides}}
    ce = dict(W_TRANSPOSED=transposed, ALIGNED=aligned, BLOCKSIZE=64, HAS_LORA=True, R_PAD=16,
              HAS_BIAS=True, IEEE=dtype == "fp32", INTERPRETED=False, SPLIT_Q=split,
              **{k: v for k, v in cfg.items() if k.isupper()})
    sig.update({c: "constexpr" for c in ce})
    opts = {k: v for k, v in cfg.items() if not k.isupper()}
    k = triton.compile(ASTSource(K._nf4_lora_matmul_kernel, sig, ce), target=target, options=opts)
    assert k.asm["cubin"], (dtype, transposed, aligned, m)
    assert k.metadata.shared <= 232448, (dtype, transposed, aligned, m, k.metadata.shared)  # sm_90: 227 KB
fma = {n: len(re.findall(r"\bfma\.\w+\.f32", p)) for n, p in ptx.items()}
assert all(v == 0 for v in fma.values()), fma
print("compiled ok")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels compile and run in the tests above")
def test_kernels_compile_for_sm90():
    """Compile every kernel variant for sm_90 (Triton's bundled ptxas, no GPU needed): the paths
    the interpreter never takes (tensor-core dots, real layouts, atomics) at least build, and the
    dequant kernel's nested decode has no FMA."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@needs_bnb
@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_gpu_matches_bitsandbytes_cuda(double_quant):
    """On the GPU: our codes and absmax equal bitsandbytes' CUDA quantizer's (the nested 8-bit
    codes come from bitsandbytes' CPU rule, so with double quantization we compare decoding: our
    kernel on bitsandbytes' own CUDA state must give its dequantize_4bit bits)."""
    w = torch.randn(1000, 3000, device="cuda", dtype=torch.bfloat16)
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    if not double_quant:
        ours = quantize_nf4(w, double_quant=False)
        assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
        on_cpu = quantize_nf4(w.cpu(), double_quant=False)
        assert torch.equal(ours.packed.cpu(), on_cpu.packed) and torch.equal(ours.absmax.cpu(), on_cpu.absmax)
    theirs = NF4Weight.from_bnb(bnb.nn.Params4bit(packed, quant_state=state, bnb_quantized=True, quant_type="nf4"))
    for dtype in DTYPES:
        state.dtype = dtype
        assert torch.equal(kernels_nf4.dequantize(theirs, dtype), BF.dequantize_4bit(packed, state, quant_type="nf4"))


def test_quantize_an_already_patched_model_keeps_adapters():
    """patch_linear(quantize="nf4") on a dense LoRA model quantizes the bases under the existing
    adapters (GPT-2 Conv1D included: NF4 stores (out, in))."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(48, 64)  # weight (in=64, out=48)
    model = torch.nn.Sequential(conv)
    w_nk = conv.weight.detach().t().clone()
    lowrank.patch_linear(model, rank=4, targets=["0"], adapter_name="first")
    with torch.no_grad():
        model[0].lora_B["first"].normal_()
    a, b = model[0].lora_A["first"].detach().clone(), model[0].lora_B["first"].detach().clone()
    lowrank.patch_linear(model, rank=4, targets=["0"], adapter_name="second", quantize="nf4",
                         compute_dtype=torch.float32)
    layer = model[0]
    assert isinstance(layer.base_layer, NF4Linear) and not layer.fan_in_fan_out
    assert torch.equal(layer.base_layer.nf4.packed, quantize_nf4(w_nk).packed)
    layer.active_adapter = "first"
    x = torch.randn(3, 64)
    ref = reference.lora_linear_f64(x, quantize_nf4(w_nk).dequantize(torch.float32), a, b, layer.scaling("first"),
                                    conv.bias)
    assert_close(model(x), ref, reference.lora_linear(x, quantize_nf4(w_nk).dequantize(torch.float32), a, b,
                                                      layer.scaling("first"), conv.bias))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the autotuned path is exercised by bench_nf4 for real")
@pytest.mark.parametrize("transposed", [True, False], ids=["fwd", "dx"])
def test_autotuned_launch_plumbing(transposed, monkeypatch):
    """LOWRANK_NF4_AUTOTUNE=1 (GPU-only, M > 16) in the interpreter: every config runs (timed by a
    stand-in for the CUDA benchmarker) and the chosen one gives the right fp32 result."""
    import time

    monkeypatch.setattr(kernels_nf4, "INTERPRET", False)
    monkeypatch.setenv("LOWRANK_NF4_AUTOTUNE", "1")
    tuned = kernels_nf4._nf4_lora_matmul_tuned

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
    kernels_nf4.nf4_matmul(x, w, w.block_absmax(), transposed, t, r, 2.0, out=out)
    wd = w.dequantize(torch.float32).double()
    ref = x.double() @ (wd.t() if transposed else wd) + 2.0 * t.double() @ r.double()
    base = x @ (w.dequantize(torch.float32).t() if transposed else w.dequantize(torch.float32)) + 2.0 * t @ r
    assert_close(out, ref, base, name="autotuned nf4_matmul")


@pytest.mark.gpu
def test_nf4linear_moves_between_devices():
    layer = NF4Linear.from_linear(torch.nn.Linear(256, 64), compute_dtype=torch.bfloat16)
    ref = {k: v.clone() for k, v in layer.nf4.tensors().items()}
    layer.cuda()
    assert layer.nf4.device.type == "cuda" and layer.bias.device.type == "cuda"
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.nf4.dequantize(torch.bfloat16), layer.bias.bfloat16()))
    layer.cpu()
    for k, v in layer.nf4.tensors().items():
        assert v.device.type == "cpu" and torch.equal(v, ref[k]), k


# --------------------------------------------------------------------------------------------
# The op's memory and torch.compile (lowrank/nf4_op.py)
# --------------------------------------------------------------------------------------------
def saved_for_backward(fn):
    """(result, [saved tensors]) of fn() under saved_tensors_hooks: what autograd holds from
    forward to backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


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


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nf4linear_forward_keeps_no_dense_weight(backend, monkeypatch):
    """An NF4 layer without adapters (disabled adapters, an adopted layer) on an input that needs
    a gradient: no dense W saved either, and the output is x @ deq(W).T + bias."""
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    lin = torch.nn.Linear(128, 96)
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y, saved = saved_for_backward(lambda: layer(x))
    assert not [t for t in saved if t.numel() >= 96 * 128 // 2 and t.dtype != torch.uint8]
    wd = layer.nf4.dequantize(torch.float32)
    ref = torch.einsum("bsk,nk->bsn", x.detach().double(), wd.double()) + lin.bias.detach().double()
    assert_close(y, ref, torch.nn.functional.linear(x.detach(), wd, lin.bias.detach()), name="NF4Linear")
    dy = torch.randn_like(y)
    y.backward(dy)
    dx_ref = torch.einsum("bsn,nk->bsk", dy.double(), wd.double())
    assert_close(x.grad, dx_ref, dy @ wd, name="NF4Linear dx")


def test_nf4_ops_opcheck():
    """The custom ops' schemas, fake implementations and autograd registration agree with the real
    ones (torch.library.opcheck), with and without double quantization, dropout, bias, and with a
    rank-0 adapter."""
    import lowrank.nf4_op  # noqa: F401  (registers the ops)

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


def test_patch_quantize_frees_each_dense_weight_before_the_next():
    """patch_linear(quantize="nf4") on CPU: when layer i is quantized, the dense weights of layers
    0..i-1 are already freed (even though this test still refers to them), so the peak stays near
    one dense layer beyond the result."""
    import lowrank.qlora as Q

    d, layers = 256, 5
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)])
    dense = [lin.weight for lin in model]  # outside references: must not keep the memory alive
    layer_bytes = d * d * 4
    alive_at_call = []
    real = Q.quantize_nf4

    def spy(weight, *args, **kwargs):
        alive_at_call.append(sum(p.untyped_storage().nbytes() for p in dense))
        return real(weight, *args, **kwargs)

    Q.quantize_nf4 = spy
    try:
        lowrank.patch_linear(model, rank=4, targets="all-linear", quantize="nf4")
    finally:
        Q.quantize_nf4 = real
    # call i sees layers i..L-1 still dense (the input), never one more
    assert alive_at_call == [(layers - i) * layer_bytes for i in range(layers)], alive_at_call
    assert all(p.untyped_storage().nbytes() == 0 for p in dense)
    assert len(list(quantized_layers(model))) == layers


_PEAK_SCRIPT = r"""
import gc, torch, lowrank
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
d, layers = 2048, 6
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)]).to(torch.bfloat16)
lowrank.quantize_nf4(torch.randn(64, 64))  # the code tables, built once
gc.collect()
start = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM (the peak) to the current RSS
lowrank.patch_linear(model, rank=16, targets="all-linear", quantize="nf4")
print((rss("VmHWM:") - start) / (d * d * 2))
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU test_patch_peak_memory_one_layer measures the CUDA allocator")
def test_patch_quantize_peak_memory_cpu():
    """patch_linear(quantize="nf4") on the CPU: the process's peak resident memory while patching
    stays within 1.25 dense layers above the start (16M-element quantization chunks peaked at 6.5).
    A fixed glibc mmap threshold makes freed tensors leave RSS at once, so the peak counts live
    bytes, not the allocator's cache."""
    import os
    import subprocess
    import sys

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here ({exc})")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_layers = float(proc.stdout.strip().splitlines()[-1])
    assert peak_layers <= 1.25, f"peak {peak_layers:.2f} dense layers above the start"


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
