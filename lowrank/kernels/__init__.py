"""Triton kernels of lowrank, one op per module, each with its launchers (check, allocate, launch).

Level 1: imports torch, Triton and lowrank's level 0 only; the differentiable ops over these
launchers live in `lowrank.ops`. Installed as `lowrank.kernels` (setup.py maps this folder; there
is no top-level `kernels` package). Importing it requires Triton; `lowrank.ops` imports it only on
the Triton path.

Under Triton's interpreter (TRITON_INTERPRET=1) importing this package patches the interpreter's
bf16 `tl.dot` (`_common.py`), so the kernel sources stay exactly what runs on a GPU.
"""
from ._common import INTERPRET, patch_bf16_dot

if INTERPRET:
    patch_bf16_dot()
