"""bitsandbytes as the NF4 oracle: its CPU quantizer and dequantizer, its pure-torch dequantize
(the flattened format its CUDA kernels share), and Linear4bit layers built from dense ones.

The GPU machine may lack bitsandbytes: then only the tests marked `needs_bnb` skip.
"""
from __future__ import annotations

import pytest
import torch

from lowrank.nf4_format import nf4_code

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    from bitsandbytes.backends.default import ops as bnb_default
except ImportError:
    bnb = BF = bnb_default = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (the NF4 oracle) is not installed")


@pytest.fixture(autouse=True, scope="module")
def bnb_without_compile():
    """bitsandbytes wraps its pure-torch dequant in torch.compile (seconds per recompile, and it
    recompiles per shape): use the plain function, whose arithmetic is the same. Autouse in every
    test module that imports it."""
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
    """bitsandbytes 0.50.2's AVX-512 CPU dequant mis-indexes blocks that span rows (lowrank/nf4_format.py,
    `# Note: bitsandbytes' CPU dequantize and blocks that span rows`)."""
    k = shape[-1]
    return not (k % 16 == 0 and k % blocksize != 0)


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
