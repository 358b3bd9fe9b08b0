"""Triton kernels of lowrank, one op per module, each with its launcher.

Installed as `lowrank.kernels` (setup.py maps this folder; there is no top-level `kernels`
package). Importing this package requires Triton; `lowrank.ops` imports it lazily and falls back
to the pure-torch reference when Triton is missing.

Under Triton's interpreter (TRITON_INTERPRET=1) importing this package patches the interpreter's
bf16 `tl.dot` (see `_interpreter.py`), so the kernel sources stay exactly what runs on a GPU.
"""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from ._interpreter import patch_bf16_dot

    patch_bf16_dot()
