"""The NF4 storage format (lowrank/nf4_format.py): bit-exact with bitsandbytes (its CPU backend is
the oracle), and state-dict exchange with bitsandbytes' Linear4bit both ways."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank import native
from lowrank.nf4_format import BLOCKSIZES, NF4Weight, dynamic_code, nf4_code, nf4_nbytes, quantize_nf4

from tests.bnb_oracle import (BF, bnb, bnb_cpu_dequant_is_right, bnb_dequantize_format, bnb_quantize,  # noqa: F401
                              bnb_without_compile, make_bnb_linear, needs_bnb)
from tests.helpers import DTYPE_IDS, DTYPES, assert_bits_equal


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
       kind=st.sampled_from(["normal", "tiny", "huge", "zero-blocks", "outliers"]), seed=st.integers(0, 2**16))
def test_quantize_dequantize_bit_exact(out_f, in_f, blocksize, dtype, double_quant, kind, seed):
    torch.manual_seed(seed)  # drawn by hypothesis: a saved failure replays the same weight
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
    import lowrank.nf4_format as nf4_mod

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
# The ends of float32's range
# --------------------------------------------------------------------------------------------
def _scaled(scale, shape=(16, 192)):
    w = torch.randn(*shape)
    return (w / w.abs().max() * scale).float()


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("scale", [1e-45, 1e-40, 3e-39, 5e36], ids=lambda s: f"{s:g}")
def test_extreme_block_maxima_bit_exact(scale, double_quant):
    """Subnormal block maxima (whose float32 reciprocal overflows: the nested quantizer sees +-Inf
    and 0 * Inf = NaN) and large ones whose mean still fits: bitsandbytes' bytes and decoded
    weights, bit for bit. (The subnormal ones raised IndexError from the nested quantizer.)"""
    w = _scaled(scale)
    packed, state, ours = assert_same_as_bnb(w, 64, double_quant)
    for dtype in DTYPES:
        assert torch.equal(ours.dequantize(dtype), bnb_dequantize_format(packed, state, dtype)), dtype


@pytest.mark.parametrize("scale", [3e38, 1e38], ids=lambda s: f"{s:g}")
def test_double_quant_overflow_is_a_clear_error(scale):
    """Block maxima whose float32 mean overflows: bitsandbytes stores an Inf offset and decodes NaN
    weights; lowrank refuses, names the way out, and quantizes them without double quantization."""
    from lowrank.nf4_format import check_quantizable

    w = _scaled(scale)
    with pytest.raises(ValueError, match=r"\(16, 192\).*double_quant=False"):
        quantize_nf4(w)
    with pytest.raises(ValueError, match=r"layer x.*double_quant=False"):
        check_quantizable(w, 64, True, "layer x")
    check_quantizable(w, 64, False, "layer x")
    q = quantize_nf4(w, double_quant=False)
    assert torch.isfinite(q.dequantize(torch.float32)).all()
    if BF is not None:
        _, state = bnb_quantize(w, 64, True)
        assert not torch.isfinite(state.offset), "bitsandbytes' double quantization overflows here too"


@settings(max_examples=30)
@given(rows=st.integers(1, 20), cols=st.integers(1, 150), blocksize=st.sampled_from([32, 64, 256]),
       double_quant=st.booleans(), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(["normal", "subnormal", "max", "nan", "inf"]), seed=st.integers(0, 2**16))
def test_check_quantizable_agrees_with_quantize(rows, cols, blocksize, double_quant, dtype, kind, seed):
    """check_quantizable (what patch_linear runs on every layer before the first swap) raises exactly
    when quantize_nf4 would, with the same message."""
    from lowrank.nf4_format import check_quantizable

    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    if kind == "subnormal":
        w = w * 1e-40
    elif kind == "max":
        w = w / w.abs().max() * torch.finfo(dtype).max
    elif kind in ("nan", "inf"):
        w.view(-1)[torch.randint(0, w.numel(), (1,))] = float(kind)
    w = w.to(dtype)
    try:
        quantize_nf4(w, blocksize, double_quant)
        expected = None
    except ValueError as exc:
        expected = str(exc).replace("quantize_nf4", "WHERE")
    try:
        check_quantizable(w, blocksize, double_quant, "WHERE")
        got = None
    except ValueError as exc:
        got = str(exc)
    assert got == expected


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 64), (17, 300), (128, 257)])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_nbytes_counts_what_quantize_stores(shape, blocksize, double_quant):
    """The planner's byte count without quantizing equals the storage quantize_nf4 allocates."""
    w = quantize_nf4(torch.randn(shape), blocksize=blocksize, double_quant=double_quant)
    stored = sum(t.numel() * t.element_size() for name, t in w.tensors().items() if name != "nested_code")
    assert nf4_nbytes(w.numel, blocksize, double_quant) == w.nbytes == stored


# -- the native decode (csrc/nf4_cpu.cpp) against its torch twin ----------------------------------

needs_native = pytest.mark.skipif(native.cpu(warn=False) is None, reason="native CPU library not built")


@needs_native
@settings(max_examples=60)
@given(out_f=st.integers(1, 70), in_f=st.integers(1, 300), blocksize=st.sampled_from(BLOCKSIZES),
       dtype=st.sampled_from(DTYPES), double_quant=st.booleans(),
       kind=st.sampled_from(["normal", "tiny", "huge", "zero-blocks", "outliers"]), seed=st.integers(0, 2**16))
def test_native_decode_is_the_torch_path_bit_for_bit(out_f, in_f, blocksize, dtype, double_quant, kind, seed):
    """Every output dtype, whole and partial blocks, odd sizes: the native library's one-pass decode
    (AVX-512 permutes for whole blocks of 64+ where the CPU has them, loops elsewhere) writes the
    torch path's bits, into a buffer poisoned with NaN first."""
    torch.manual_seed(seed)
    w = quantize_nf4(weights((out_f, in_f), dtype, kind), blocksize=blocksize, double_quant=double_quant)
    lib = native.cpu()
    for out_dtype in DTYPES:
        out = torch.full(w.shape, float("nan"), dtype=out_dtype)
        nested = (w.nested_absmax.data_ptr(), w.nested_code.data_ptr(), float(w.offset)) if double_quant else (
            None, None, 0.0)
        status = lib.lowrank_cpu_nf4_dequantize(w.packed.data_ptr(), w.absmax.data_ptr(), int(double_quant), *nested,
                                                nf4_code().data_ptr(), w.numel, blocksize, w.nested_blocksize,
                                                out.data_ptr(), native.dtype_code(out_dtype))
        assert status == native.OK
        assert_bits_equal(out, w.dequantize_torch(out_dtype), f"native decode {out_dtype}")
        assert_bits_equal(w.dequantize(out_dtype), out, "NF4Weight.dequantize")


@needs_native
def test_native_decode_refuses_bad_arguments():
    w = quantize_nf4(torch.randn(8, 64))
    lib, out = native.cpu(), torch.empty(8, 64)
    args = [w.packed.data_ptr(), w.absmax.data_ptr(), 1, w.nested_absmax.data_ptr(), w.nested_code.data_ptr(),
            float(w.offset), nf4_code().data_ptr(), w.numel, 64, 256, out.data_ptr(), native.dtype_code(out.dtype)]
    assert lib.lowrank_cpu_nf4_dequantize(*args) == native.OK
    for i, bad in [(8, 48), (8, 16), (7, -1), (11, 7), (3, None)]:
        wrong = list(args)
        wrong[i] = bad
        assert lib.lowrank_cpu_nf4_dequantize(*wrong) != native.OK, (i, bad)


def test_without_the_native_library_the_torch_path_decodes(monkeypatch):
    w = quantize_nf4(torch.randn(16, 128))
    expected = w.dequantize_torch(torch.bfloat16)
    monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    monkeypatch.setattr(NF4Weight, "_dequantize_native", lambda *a: pytest.fail("native path taken"))
    assert_bits_equal(w.dequantize(torch.bfloat16), expected)


# -- the native tile decode and fused decode-and-multiply (the QLoRA op's CPU path) ------------------

@needs_native
@settings(max_examples=40)
@given(out_f=st.integers(1, 40), blocks=st.integers(1, 5), blocksize=st.sampled_from(BLOCKSIZES),
       dtype=st.sampled_from(DTYPES), double_quant=st.booleans(), data=st.data())
def test_native_decode_tile_is_dequantize_bit_for_bit(out_f, blocks, blocksize, dtype, double_quant, data):
    """Any rows x whole-block columns of the weight, into a strided window of a NaN-poisoned buffer:
    the tile's bits are the same elements of the torch decode, and nothing outside it is touched."""
    in_f = blocks * blocksize
    w = quantize_nf4(weights((out_f, in_f), dtype, "normal"), blocksize=blocksize, double_quant=double_quant)
    r0 = data.draw(st.integers(0, out_f))
    r1 = data.draw(st.integers(r0, out_f))
    b0 = data.draw(st.integers(0, blocks))
    b1 = data.draw(st.integers(b0, blocks))
    c0, c1 = b0 * blocksize, b1 * blocksize
    for out_dtype in DTYPES:
        buf = torch.full((r1 - r0 + 1, c1 - c0 + 3), float("nan"), dtype=out_dtype)
        tile = buf[: r1 - r0, 1: 1 + c1 - c0]
        assert w.decode_tile_native((r0, r1), (c0, c1), tile)
        assert_bits_equal(tile, w.dequantize_torch(out_dtype)[r0:r1, c0:c1], f"tile {out_dtype}")
        rest = buf.clone()
        rest[: r1 - r0, 1: 1 + c1 - c0] = float("nan")
        assert rest.isnan().all(), "the tile decode wrote outside its window"


def _matmul_bound(x: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """The fp32 summation error bound of x @ wd.T (K terms, products exact in float64): K * u * |x| @ |wd|.T."""
    k = x.shape[1]
    return (k + 2) * 2.0**-24 * (x.double().abs() @ wd.double().abs().t()) + 1e-30


@needs_native
@settings(max_examples=40)
@given(m=st.integers(1, 20), n=st.integers(1, 50), blocks=st.integers(1, 4), blocksize=st.sampled_from(BLOCKSIZES),
       dtype=st.sampled_from(DTYPES), double_quant=st.booleans(),
       kind=st.sampled_from(["normal", "tiny", "huge", "zero-blocks", "outliers"]), seed=st.integers(0, 2**16))
def test_native_matmul_against_float64(m, n, blocks, blocksize, dtype, double_quant, kind, seed):
    """y = x @ deq(W).T in one fused pass: within the fp32 summation bound of the float64 product
    of x and the weight as `dequantize(x.dtype)` holds it (each value rounded to x's dtype), in
    every compute dtype, with the output poisoned first."""
    torch.manual_seed(seed)
    k = blocks * blocksize
    w = quantize_nf4(weights((n, k), dtype, kind), blocksize=blocksize, double_quant=double_quant)
    for x_dtype in DTYPES:
        x = torch.randn(m, k).to(x_dtype)
        out = torch.full((m, n), float("nan"))
        y = w.matmul_native(x, out=out)
        assert y is out
        wd = w.dequantize(x_dtype)
        ref = x.double() @ wd.double().t()
        bound = _matmul_bound(x, wd)
        # where fp32 can represent every partial sum the bound holds; beyond it (weights near the
        # dtype's limit, decoded to inf in fp16) the float64 product's NaNs must be NaN here too
        fits = bound < torch.finfo(torch.float32).max * 2.0**-26
        err = (y.double() - ref).abs()
        assert not y[fits].isnan().any() and (err[fits] <= bound[fits]).all(), (x_dtype, err[fits].max())
        assert y[ref.isnan()].isnan().all()
        assert fits.any() or kind == "huge"


@needs_native
def test_native_matmul_and_tiles_refuse_or_decline():
    w = quantize_nf4(torch.randn(8, 96), blocksize=64)  # K = 96: not whole blocks of 64
    assert w.matmul_native(torch.randn(2, 96)) is None
    assert not w.decode_tile_native((0, 8), (0, 64), torch.empty(8, 64))
    w = quantize_nf4(torch.randn(8, 128))
    assert not w.decode_tile_native((0, 8), (0, 96), torch.empty(8, 96))  # columns not in whole blocks
    with pytest.raises(ValueError, match=r"rows \(0, 9\)"):
        w.decode_tile_native((0, 9), (0, 64), torch.empty(9, 64))
    with pytest.raises(ValueError, match="unit column stride"):
        w.decode_tile_native((0, 8), (0, 64), torch.empty(64, 8).t())
    with pytest.raises(ValueError, match=r"\(M, 128\)"):
        w.matmul_native(torch.randn(2, 64))
    with pytest.raises(ValueError, match="float32"):
        w.matmul_native(torch.randn(2, 128), out=torch.empty(2, 8, dtype=torch.float64))
    lib = native.cpu()
    x, y, code = torch.randn(2, 128), torch.empty(2, 8), nf4_code()  # held: the library writes y
    args = [x.data_ptr(), 2, w.packed.data_ptr(), w.absmax.data_ptr(), 1, w.nested_absmax.data_ptr(),
            w.nested_code.data_ptr(), float(w.offset), code.data_ptr(), 8, 128, 64, 256, y.data_ptr(), 0]
    assert lib.lowrank_cpu_nf4_matmul(*args) == native.OK
    for i, bad in [(10, 96), (11, 48), (10, 0), (0, None), (14, 9)]:
        wrong = list(args)
        wrong[i] = bad
        assert lib.lowrank_cpu_nf4_matmul(*wrong) != native.OK, (i, bad)


def test_without_the_native_library_no_fused_cpu_path(monkeypatch):
    w = quantize_nf4(torch.randn(8, 128))
    monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    assert w.matmul_native(torch.randn(2, 128)) is None
    assert not w.decode_tile_native((0, 8), (0, 64), torch.empty(8, 64))
