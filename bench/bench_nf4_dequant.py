"""NF4 quantize / dequantize microbenchmarks (lowrank/nf4_format.py, lowrank/kernels/nf4_dequant.py).

    python -m bench.run --only nf4_dequant [--quick]

CPU: quantize and dequantize, lowrank (the native decode; `lowrank-torch`: its torch twin) vs
bitsandbytes' CPU backend, and a copy of the dense weight as the memory ceiling. CUDA: the Triton dequant kernel vs bitsandbytes' dequantize_4bit and the
measured copy bandwidth.

Bytes counted (minimum traffic): dequant = 4-bit codes + uint8 absmax + nested statistics read,
dense output written; quantize = dense input read, codes + statistics written.
"""
from __future__ import annotations

import torch

from lowrank import native
from lowrank.nf4_format import quantize_nf4
from lowrank.ops import nf4_dequantize

from .harness import Record, bench, derived, device_name, measure_copy_bandwidth, rotating_inputs, versions

BASELINE = "bitsandbytes"


def bnb_modules():
    """(bitsandbytes, bitsandbytes.functional), or (None, None) where it is not installed."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except Exception:  # not installed (e.g. on the GPU machine without its wheel)
        return None, None
    return bnb, bf


def nf4_record(op, shape, dtype, impl, t, dev, flops=None, nbytes=None, **extra):
    """A Record with its derived TFLOP/s and GB/s."""
    return Record(op=op, shape=shape, dtype=str(dtype).removeprefix("torch."), impl=impl, median_s=t,
                  derived=derived(t, flops, nbytes), device=device_name(dev), versions=versions(), extra=extra)


def nf4_bytes(n, k):
    """Bytes of an (n, k) NF4 weight with double quantization at blocksize 64."""
    blocks = n * k // 64
    return n * k // 2 + blocks + 4 * (-(-blocks // 256))


def bench_quant_dequant(quick: bool, device: str) -> list[Record]:
    bnb, bf = bnb_modules()
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    shapes = [(2048, 2048), (4096, 4096)] if quick else [(2048, 2048), (4096, 4096), (4096, 11008)]
    if on_gpu:
        shapes = [(4096, 4096)] if quick else [(4096, 4096), (4096, 11008), (8192, 28672)]
    dtype = torch.bfloat16
    out = []
    copy_gbs = measure_copy_bandwidth(dev)
    repeat = 20 if on_gpu else 5
    for n, k in shapes:
        shape = {"N": n, "K": k}
        w = torch.randn(n, k, device=dev, dtype=dtype)
        q4 = nf4_bytes(n, k)
        dense_bytes = n * k * 2
        # copy of the dense bf16 weight: the ceiling for a pass that writes it
        out.append(nf4_record("nf4_dequantize", shape, dtype, "copy", (2 * dense_bytes) / (copy_gbs * 1e9), dev,
                           nbytes=2 * dense_bytes, note="from measure_copy_bandwidth"))
        t = bench(lambda: quantize_nf4(w), [()], warmup=1, repeat=repeat, device=dev)
        out.append(nf4_record("nf4_quantize", shape, dtype, "lowrank", t, dev, nbytes=dense_bytes + q4))
        if bf is not None:
            t = bench(lambda: bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
                      [()], warmup=1, repeat=repeat, device=dev)
            out.append(nf4_record("nf4_quantize", shape, dtype, "bitsandbytes", t, dev, nbytes=dense_bytes + q4))
        ours = quantize_nf4(w)
        sets = rotating_inputs(lambda: (quantize_nf4(w),), q4 + dense_bytes, max_sets=8 if on_gpu else 1)
        if on_gpu:
            t = bench(lambda q: nf4_dequantize(q, dtype), sets, repeat=repeat, device=dev)
            out.append(nf4_record("nf4_dequantize", shape, dtype, "lowrank", t, dev, nbytes=q4 + dense_bytes,
                               frac_of_copy=(q4 + dense_bytes) / t / 1e9 / copy_gbs))
        else:
            t = bench(lambda q: q.dequantize(dtype), sets, repeat=3 * repeat, device=dev)
            out.append(nf4_record("nf4_dequantize", shape, dtype, "lowrank", t, dev, nbytes=q4 + dense_bytes,
                                  path="native" if native.cpu(warn=False) else "torch (no native library)"))
        t = bench(lambda q: q.dequantize_torch(dtype), sets, repeat=repeat, device=dev)
        out.append(nf4_record("nf4_dequantize", shape, dtype, "lowrank-torch", t, dev, nbytes=q4 + dense_bytes))
        if bf is not None:
            packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(packed, ours.packed) or dev.type == "cuda"
            t = bench(lambda: bf.dequantize_4bit(packed, state, quant_type="nf4"), [()],
                      repeat=repeat if on_gpu else 3 * repeat, device=dev)
            out.append(nf4_record("nf4_dequantize", shape, dtype, "bitsandbytes", t, dev, nbytes=q4 + dense_bytes))
    return out


def run(quick: bool, device: str) -> list[Record]:
    return bench_quant_dequant(quick, device)
