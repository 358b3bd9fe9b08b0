"""What the three kernel families share: the interpreter flag, the autotuning policy, the SM count,
grouped program order, round-to-nearest in the interpreter, and the interpreter's bf16 fix.

Environment, read once when `lowrank.kernels` is first imported:
- TRITON_INTERPRET=1: Triton's CPU interpreter (small tiles everywhere, the bf16 `tl.dot` fix below).
- LOWRANK_AUTOTUNE (default 1): the GEMM-shaped kernels (the LoRA forward and dX GEMMs, the fused
  NF4 LoRA matmul at M > 16) pick their tiles with Triton's autotuner, keyed on (M rounded up to a
  power of two, N, K); 0 uses each launcher's fixed heuristic tiles (tests, and any run that must
  not spend time tuning). Never on in the interpreter. The small kernels (LoRA shrink / dT-dB /
  dA, the small-M paths, NF4 dequantize, SGMV) always use fixed tiles chosen by shape.

# Note: bf16 tl.dot in the interpreter
The interpreter stores bfloat16 tensors as uint16 numpy arrays, and its `create_dot` hands those
raw bit patterns straight to `np.matmul`, so a bf16 `tl.dot` returns garbage (triton 3.6 and
3.9). We widen bf16 operands to float32 first: a bf16 value is the top half of the float32 with
the same value, so `(bits.astype(uint32) << 16).view(float32)` is exact. The products of two
bf16 values are exact in float32 too, so this matches what a GPU's tensor core computes up to
the fp32 accumulation order.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = not INTERPRET and os.environ.get("LOWRANK_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 in the interpreter (parallelism is irrelevant
    there: a small count keeps splits rare, and tests force them where they matter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def m_bucket(m: int) -> int:
    """Autotune key for M: a power of two, so that a new batch size does not retune."""
    return min(triton.next_power_of_2(max(m, 1)), 16384)


def tune_bench(kernel_call, quantiles):
    """Triton's benchmarker with 5 ms of warm-up and 25 ms of repeats instead of 25 + 100: a new
    key then tunes in ~0.2 s for 7 configs, and these GEMMs run 10 us to 5 ms."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n) in groups of GROUP_M row tiles, so that the weight tiles a group
    reads are reused from L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def round_to(x, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """fp32 -> dtype, round to nearest even. The interpreter truncates fp32 -> bf16 (and its
    "rtne" mode rounds half up without carrying into the exponent), so there we do it on the bits:
    exact for finite values, which is all a decoded weight can be."""
    if MANUAL_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def patch_bf16_dot() -> bool:
    """Patch the interpreter's `InterpreterBuilder.create_dot` once (see the Note above); returns
    True if the patch is in place. numpy and the interpreter are imported here: a GPU run of the
    kernels needs neither."""
    import numpy as np
    from triton.runtime import interpreter

    def _bf16_bits_to_f32(bits):
        return (bits.astype(np.uint32) << 16).view(np.float32)

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_lowrank_bf16_patch", False):
        return True
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a_data = _bf16_bits_to_f32(a.data) if a.dtype == tl.bfloat16 else a.data.astype(np.float32)
            b_data = _bf16_bits_to_f32(b.data) if b.dtype == tl.bfloat16 else b.data.astype(np.float32)
            acc = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(acc, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._lowrank_bf16_patch = True
    builder.create_dot = create_dot
    return True
