"""Loader for the native library built from csrc/ (a torch-free C ABI, loaded with ctypes).

Importing this module never fails. `cpu()` / `cuda()` return the loaded `ctypes.CDLL`, or None
after one warning when the library is missing or cannot be loaded; callers then fall back to the
pure-torch path. `for_device(device)` picks one (honouring LOWRANK_NO_NATIVE=1).
`check(status, what)` turns a status code into an exception.

Level 0: imports torch and the standard library.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import warnings

import torch

from .dtypes import check_dtype

ABI_VERSION = 7
LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib")
MANIFEST_NAME = "manifest.json"  # written by setup.py beside the libraries: {file: {size, sha256}}

# Status codes and dtype codes: keep in sync with csrc/lowrank.h.
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_UNSUPPORTED_DTYPE = 2
ERR_CUDA = 3
ERR_OUT_OF_MEMORY = 4
ERR_CAPACITY = 5
ERR_NONFINITE = 6
ERR_OVERFLOW = 7

_STATUS_NAMES = {
    ERR_INVALID_ARGUMENT: "invalid argument",
    ERR_UNSUPPORTED_DTYPE: "unsupported dtype",
    ERR_CUDA: "CUDA error",
    ERR_OUT_OF_MEMORY: "out of memory",
    ERR_CAPACITY: "record capacity exceeded",
    ERR_NONFINITE: "a LoRA factor holds NaN or Inf",
    ERR_OVERFLOW: "a finite weight element would overflow",
}

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


class NativeError(RuntimeError):
    """A native entry point returned a non-zero status."""

    def __init__(self, status: int, what: str, detail: str = ""):
        self.status = status
        msg = f"{what}: {_STATUS_NAMES.get(status, f'status {status}')}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def dtype_code(dtype) -> int:
    """The LOWRANK_DTYPE_* code of a torch dtype; TypeError for anything else."""
    code = DTYPE_CODES.get(str(dtype).replace("torch.", ""))
    if code is None:
        check_dtype(dtype, "native library")  # not one of the three: the package's one TypeError
    return code


def _verify(path: str) -> str | None:
    """Why the file at `path` must not be mapped, or None. The build writes MANIFEST_NAME beside
    the libraries with each one's size and SHA-256: a truncated or replaced file would otherwise be
    mapped and could kill the process (SIGBUS) at its first call, beyond any fallback."""
    name = os.path.basename(path)
    manifest = os.path.join(os.path.dirname(path), MANIFEST_NAME)
    try:
        with open(manifest, encoding="utf-8") as f:
            entry = json.load(f)[name]
        size, digest = int(entry["size"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest} does not vouch for {name} ({type(exc).__name__}: {exc}); rebuild the library"
    actual = os.path.getsize(path)
    if actual != size:
        return f"{path} has {actual} bytes, the build wrote {size} (truncated or replaced); rebuild it"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != digest:
        return f"{path} differs from the file the build wrote (SHA-256 mismatch); rebuild it"
    return None


def _load(kind: str):
    path = os.path.join(LIB_DIR, f"liblowrank_{kind}.so")
    if not os.path.exists(path):
        return None, f"{path} does not exist (the {kind} build was skipped or failed at install)"
    why = _verify(path)
    if why is not None:
        return None, why
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"cannot load {path}: {exc}"
    try:
        version = getattr(lib, f"lowrank_{kind}_abi_version")
        version.restype = ctypes.c_int
        if version() != ABI_VERSION:
            return None, f"{path} has ABI version {version()}, this package expects {ABI_VERSION} (rebuild it)"
        info = getattr(lib, f"lowrank_{kind}_build_info")
        info.restype = ctypes.c_char_p
        if kind == "cuda":
            lib.lowrank_cuda_last_error.restype = ctypes.c_char_p
        _declare(lib, kind)
    except AttributeError as exc:  # a valid library, but not this one: a symbol is missing
        return None, f"{path} lacks an entry point of the ABI ({exc}); rebuild it"
    return lib, None


def _declare(lib, kind: str) -> None:
    """ctypes signatures of the entry points (csrc/lowrank.h): merge, restore, dora_merge,
    dora_unmerge, and on the CPU merge_strided, unmerge_strided, rank_loop_kind, nf4_dequantize,
    nf4_decode_tile and nf4_matmul."""
    p, i64, f32p = ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p
    merge = getattr(lib, f"lowrank_{kind}_merge")
    merge.restype = ctypes.c_int
    merge.argtypes = [p, i64, i64, i64, ctypes.c_int, f32p, f32p, i64, f32p, f32p, ctypes.c_float,
                      ctypes.c_double, p, p, i64, p] + ([p] if kind == "cuda" else [])
    if kind == "cpu":
        lib.lowrank_cpu_nf4_dequantize.restype = ctypes.c_int
        lib.lowrank_cpu_nf4_dequantize.argtypes = [p, p, ctypes.c_int, p, p, ctypes.c_float, p, i64, i64, i64, p,
                                                   ctypes.c_int]
        lib.lowrank_cpu_nf4_decode_tile.restype = ctypes.c_int
        lib.lowrank_cpu_nf4_decode_tile.argtypes = [p, p, ctypes.c_int, p, p, ctypes.c_float, p, i64, i64, i64, i64,
                                                    i64, i64, i64, i64, p, i64, ctypes.c_int]
        lib.lowrank_cpu_nf4_matmul.restype = ctypes.c_int
        lib.lowrank_cpu_nf4_matmul.argtypes = [p, i64, p, p, ctypes.c_int, p, p, ctypes.c_float, p, i64, i64, i64,
                                               i64, p, ctypes.c_int]
        lib.lowrank_cpu_merge_strided.restype = ctypes.c_int
        lib.lowrank_cpu_merge_strided.argtypes = [p, i64, i64, i64, ctypes.c_int, p, i64, i64, p, i64, i64,
                                                  ctypes.c_int, i64, ctypes.c_double, p, p, i64, p]
        if hasattr(lib, "lowrank_cpu_rank_loop_kind"):  # (ABI >= 7; bench.ab_native also loads older builds)
            lib.lowrank_cpu_rank_loop_kind.restype = ctypes.c_int
            lib.lowrank_cpu_rank_loop_kind.argtypes = []
        if hasattr(lib, "lowrank_cpu_unmerge_strided"):  # (ABI >= 6; bench.ab_native also loads older builds)
            lib.lowrank_cpu_unmerge_strided.restype = ctypes.c_int
            lib.lowrank_cpu_unmerge_strided.argtypes = [p, i64, i64, i64, ctypes.c_int, p, i64, i64, p, i64, i64,
                                                        ctypes.c_int, i64, ctypes.c_double, p, p, i64]
    stream = [p] if kind == "cuda" else []
    dora_merge = getattr(lib, f"lowrank_{kind}_dora_merge")
    dora_merge.restype = ctypes.c_int
    dora_merge.argtypes = [p, i64, i64, i64, i64, ctypes.c_int, p, p, i64, ctypes.c_double, p, p, p, p, i64, p,
                           p] + stream
    dora_unmerge = getattr(lib, f"lowrank_{kind}_dora_unmerge")
    dora_unmerge.restype = ctypes.c_int
    dora_unmerge.argtypes = [p, i64, i64, i64, i64, ctypes.c_int, p, p, i64, ctypes.c_double, p, p, p, i64] + stream
    restore = getattr(lib, f"lowrank_{kind}_restore")
    restore.restype = ctypes.c_int
    restore.argtypes = [p, i64, i64, i64, ctypes.c_int, p, p, i64] + ([p] if kind == "cuda" else [])


@functools.lru_cache(maxsize=None)
def _get(kind: str, warn: bool):
    lib, why = _load(kind)
    if lib is None and warn:
        warnings.warn(f"lowrank: native {kind} library unavailable, using the pure-torch path: {why}",
                      RuntimeWarning, stacklevel=3)
    return lib


def cpu(warn: bool = True):
    """The CPU library (ctypes.CDLL), or None after one warning."""
    return _get("cpu", warn)


def cuda(warn: bool = True):
    """The CUDA library (ctypes.CDLL), or None after one warning."""
    return _get("cuda", warn)


def for_device(device: torch.device):
    """The library for tensors on `device` (None: missing, another device type, or
    LOWRANK_NO_NATIVE=1, read at every call; callers then take the pure-torch path)."""
    if os.environ.get("LOWRANK_NO_NATIVE") == "1":
        return None
    if device.type == "cuda":
        return cuda()
    if device.type == "cpu":
        return cpu()
    return None


def info() -> dict:
    """What was built: {'abi': int, 'cpu': build string or None, 'cuda': build string or None}."""
    out = {"abi": ABI_VERSION}
    for kind in ("cpu", "cuda"):
        lib = _get(kind, False)
        out[kind] = None if lib is None else getattr(lib, f"lowrank_{kind}_build_info")().decode()
    return out


def check(status: int, what: str) -> None:
    """Raise NativeError when a native call returned a non-zero status."""
    if status == OK:
        return
    detail = ""
    if status == ERR_CUDA:
        lib = _get("cuda", False)
        if lib is not None:
            detail = lib.lowrank_cuda_last_error().decode()
    raise NativeError(status, what, detail)
