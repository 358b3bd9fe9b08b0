"""The differentiable ops, one module each: its torch.library custom op, fake implementation,
autograd, reference (CPU) path and device dispatch.

| op | module | entry |
| --- | --- | --- |
| LoRA linear | `lora_matmul.py` | `lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout)` |
| DoRA linear | `dora.py` | `dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, ...)` |
| DoRA merge / unmerge | `dora_merge.py` | `dora_merge_(weight, lora_A, lora_B, magnitude, scaling, exact)`, `dora_unmerge_(...)` |
| QLoRA linear | `nf4_lora_matmul.py` | `nf4_lora_linear(x, nf4_weight, lora_A, lora_B, scaling, bias, dropout)` |
| NF4 dequantize | `nf4_dequant.py` | `nf4_dequantize(nf4_weight, dtype)` |
| mixed-adapter LoRA | `sgmv.py` | `sgmv.sgmv(x, out, ids, As, Bs, scalings)` (the module keeps the name) |
| merge / unmerge | `merge.py` (+ `merge_torch.py`) | `merge_(weight, lora_A, lora_B, scaling, exact)`, `unmerge_(...)` |

Level 2: imports levels 0-2.
"""
from .dora import dora_linear
from .lora_matmul import lora_linear
from .merge import merge_, unmerge_
from .nf4_dequant import nf4_dequantize
from .nf4_lora_matmul import nf4_lora_linear
from . import sgmv  # the module: `lowrank.ops.sgmv.sgmv` is the op

__all__ = ["dora_linear", "lora_linear", "merge_", "nf4_dequantize", "nf4_lora_linear", "sgmv", "unmerge_"]
