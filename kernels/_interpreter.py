"""Fixes for Triton's CPU interpreter (TRITON_INTERPRET=1) that leave kernel sources unchanged.

# Note: bf16 tl.dot in the interpreter
The interpreter stores bfloat16 tensors as uint16 numpy arrays, and its `create_dot` hands those
raw bit patterns straight to `np.matmul`, so a bf16 `tl.dot` returns garbage (triton 3.6 and
3.9). We widen bf16 operands to float32 first: a bf16 value is the top half of the float32 with
the same value, so `(bits.astype(uint32) << 16).view(float32)` is exact. The products of two
bf16 values are exact in float32 too, so this matches what a GPU's tensor core computes up to
the fp32 accumulation order.
"""
import numpy as np


def _bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def patch_bf16_dot() -> bool:
    """Patch `InterpreterBuilder.create_dot` once; returns True if the patch is in place."""
    from triton.runtime import interpreter
    import triton.language as tl

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
