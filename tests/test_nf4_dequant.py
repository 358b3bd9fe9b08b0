"""NF4 dequantization (lowrank/kernels/nf4_dequant.py, the dispatch in lowrank/ops/nf4_dequant.py): bit-
identical to the pure-torch format code and to bitsandbytes, every element written; compiled for
sm_90 without a GPU, with no FMA in the nested absmax decode."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank
from lowrank.nf4_format import NF4Weight, quantize_nf4

from tests.bnb_oracle import BF, bnb, bnb_without_compile, needs_bnb  # noqa: F401
from tests.helpers import DTYPE_IDS, DTYPES, examples, poison_, where_mismatch

nf4_dequant = pytest.importorskip("lowrank.kernels.nf4_dequant", reason="needs Triton")
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


@settings(max_examples=examples(30))
@given(out_f=st.integers(1, 40), in_f=st.integers(1, 200), blocksize=st.sampled_from([32, 64, 128, 256, 512]),
       double_quant=st.booleans(), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1e-3, 1.0, 1e4]), seed=st.integers(0, 2**16))
def test_dequant_kernel_bit_identical(out_f, in_f, blocksize, double_quant, dtype, scale, seed):
    torch.manual_seed(seed)
    w = quantize_nf4((torch.randn(out_f, in_f) * scale).to(DEV), blocksize=blocksize, double_quant=double_quant)
    out = poison_(torch.empty(w.shape, dtype=dtype, device=DEV))
    nf4_dequant.dequantize(w, dtype, out=out)
    ref = w.dequantize(dtype)
    assert torch.equal(out, ref), where_mismatch(out, ref, 0.0)


@pytest.mark.parametrize("blocksize", [2048, 4096])
def test_dequant_kernel_blocks_larger_than_a_program(blocksize):
    """Blocks longer than one program's run: several programs share one block's absmax."""
    w = quantize_nf4(torch.randn(3, 3000, device=DEV), blocksize=blocksize)
    out = poison_(torch.empty(w.shape, dtype=torch.bfloat16, device=DEV))
    nf4_dequant.dequantize(w, torch.bfloat16, out=out)
    assert torch.equal(out, w.dequantize(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ops_nf4_dequantize_dispatch(backend, dtype, monkeypatch):
    """lowrank.ops.nf4_dequantize: the kernel on the Triton backend, the format's pure-torch decode on
    the reference one, the same bits either way; a dense tensor is refused by name."""
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    calls, real = [], nf4_dequant.dequantize
    monkeypatch.setattr(nf4_dequant, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = quantize_nf4(torch.randn(37, 96, device=DEV), blocksize=32)
    out = lowrank.ops.nf4_dequantize(w, dtype)
    assert bool(calls) == (backend == "triton")
    assert out.dtype == dtype and torch.equal(out, w.dequantize(dtype))
    with pytest.raises(TypeError, match="NF4Weight"):
        lowrank.ops.nf4_dequantize(torch.randn(4, 4), dtype)


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
        assert torch.equal(nf4_dequant.dequantize(theirs, dtype), BF.dequantize_4bit(packed, state, quant_type="nf4"))


_COMPILE_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowrank.kernels import nf4_dequant as K

target = GPUTarget("cuda", 90, 32)  # the H200
sig = dict(packed_ptr="*u8", absmax_ptr="*u8", nested_absmax_ptr="*fp32", nested_code_ptr="*fp32",
           offset_ptr="*fp32", code_ptr="*fp32", out_ptr="*bf16", n_elements="i64")
fma = {}
for bs in (64, 4096):
    ce = dict(BLOCKSIZE=bs, NESTED_BLOCKSIZE=256, NESTED=True, BLOCK=2048, INTERPRETED=False)
    k = triton.compile(ASTSource(K._nf4_dequant_kernel, {**sig, **{c: "constexpr" for c in ce}}, ce), target=target,
                       options={"enable_fp_fusion": False})
    fma[bs] = len(re.findall(r"\bfma\.\w+\.f32", k.asm["ptx"]))
assert all(v == 0 for v in fma.values()), fma
print("compiled ok")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernel compiles and runs in the tests above")
def test_dequant_kernel_compiles_for_sm90_without_fma():
    """Compile the kernel for sm_90 (Triton's bundled ptxas, no GPU needed): it builds, and the
    nested absmax decode has no FMA (bitsandbytes rounds the product and the sum separately)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
