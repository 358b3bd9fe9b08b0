"""Which implementation an op runs: the Triton kernels or the pure-torch reference path.

- CUDA tensors go to the Triton kernels (when Triton imports);
- CPU tensors go to the pure-torch reference path;
- LOWRANK_BACKEND=triton forces the kernels for CPU tensors too (run them under
  TRITON_INTERPRET=1), LOWRANK_BACKEND=reference forces the reference path everywhere.
  The variable is read at every call, so tests and benchmarks can switch it.
A missing Triton degrades to the reference path with one warning.

Level 0: imports torch and the standard library (Triton only to see whether it imports).
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")

_triton_ok: bool | None = None  # a plain global, not lru_cache: torch.compile traces through it quietly


def triton_available() -> bool:
    """Whether Triton imports (checked once; one warning when it does not)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401  (optional dependency: only asked whether it imports)
            import triton.language  # noqa: F401

            _triton_ok = True
        except Exception as exc:  # ImportError, or a broken Triton install
            warnings.warn(f"lowrank: Triton unavailable ({exc}); using the pure-torch reference path",
                          RuntimeWarning, stacklevel=2)
            _triton_ok = False
    return _triton_ok


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'reference' for an op whose main input is t."""
    choice = os.environ.get("LOWRANK_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"LOWRANK_BACKEND={choice!r}; expected one of {BACKENDS}")
    if choice == "reference":
        return "reference"
    if choice == "triton" or t.is_cuda:
        return "triton" if triton_available() else "reference"
    return "reference"
