"""The native library: built by setup.py, loaded with ctypes, reports its ABI and build."""
import hashlib
import json
import os
import shutil
import subprocess
import warnings

import pytest

from lowrank import native
from tests.helpers import run_python


def test_cpu_library_loads_and_reports_its_build():
    lib = native.cpu()
    assert lib is not None, "setup.py builds the CPU library with g++ on every install"
    assert lib.lowrank_cpu_abi_version() == native.ABI_VERSION
    assert native.info()["cpu"].startswith("cpu g++")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH: the CUDA library is not built")
def test_cuda_library_is_built_for_ampere_and_hopper():
    # Loading needs no driver (cudart is linked statically); nothing here launches a kernel.
    info = native.info()["cuda"]
    assert info is not None and info.startswith("cuda ")
    assert "sm_80" in info.split() and "sm_90" in info.split()


def test_missing_library_degrades_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "LIB_DIR", str(tmp_path))
    native._get.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.cpu() is None and native.cpu() is None
        assert len(caught) == 1 and "pure-torch path" in str(caught[0].message)
        assert native.info()["cpu"] is None
    finally:
        native._get.cache_clear()


def test_status_codes_become_exceptions():
    native.check(native.OK, "noop")
    with pytest.raises(native.NativeError, match="merge: invalid argument"):
        native.check(native.ERR_INVALID_ARGUMENT, "merge")
    with pytest.raises(TypeError, match="float64"):
        native.dtype_code("torch.float64")


def test_import_never_fails_without_triton_or_native(tmp_path):
    """A Python with triton made unimportable still imports lowrank and runs the reference path."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lowrank\n"
        "m = lowrank.patch_linear(torch.nn.Sequential(torch.nn.Linear(4, 3)), rank=2)\n"
        "print(m(torch.randn(2, 4)).shape)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 3])" in out.stdout


def _copy_libs(tmp_path):
    for name in os.listdir(native.LIB_DIR):
        shutil.copy(os.path.join(native.LIB_DIR, name), tmp_path / name)
    return tmp_path


_MERGE_SCRIPT = r"""
import sys, warnings
import torch
from lowrank import native
from tests.helpers import run_python
from lowrank.ops.merge_torch import round_f64
native.LIB_DIR = sys.argv[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w, a, b = torch.randn(8, 16).bfloat16(), torch.randn(2, 16).bfloat16(), torch.randn(8, 2).bfloat16()
    expected = round_f64(w.double() + 0.5 * (b.double() @ a.double()), torch.bfloat16)
    torch.ops.lowrank.merge_(w, a, b, 0.5, True)
print("lib", native.cpu(warn=False) is not None, "merged", torch.equal(w, expected))
print("warnings", [str(x.message) for x in caught if "native cpu library unavailable" in str(x.message)])
"""


def _merge_in_subprocess(lib_dir):
    """Run a merge in a fresh Python whose native library folder is lib_dir: (returncode, stdout)."""
    out = run_python(_MERGE_SCRIPT, str(lib_dir))
    return out.returncode, out.stdout + out.stderr


@pytest.mark.skipif(native.cpu(warn=False) is None, reason="native CPU library not built (g++ missing?)")
def test_truncated_library_is_not_mapped(tmp_path):
    """A truncated liblowrank_cpu.so used to be mapped and kill the process (SIGBUS) at the first
    merge; now it is checked against the build's manifest first and the merge falls back."""
    lib_dir = _copy_libs(tmp_path)
    so = lib_dir / "liblowrank_cpu.so"
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    rc, out = _merge_in_subprocess(lib_dir)
    assert rc == 0, f"the merge killed the process (rc {rc}):\n{out[-2000:]}"
    assert "lib False merged True" in out and "truncated or replaced" in out, out


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on the PATH: cannot build a stand-in library")
def test_library_without_the_entry_points_falls_back(tmp_path):
    """A valid shared library that is not ours (its manifest entry matches it) used to raise
    AttributeError at the first merge; now it falls back with one warning naming the cause."""
    src = tmp_path / "other.c"
    src.write_text("int something_else(void) { return 1; }\n")
    so = tmp_path / "liblowrank_cpu.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(src), "-o", str(so)], check=True, capture_output=True)
    data = so.read_bytes()
    (tmp_path / native.MANIFEST_NAME).write_text(json.dumps(
        {"liblowrank_cpu.so": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))
    rc, out = _merge_in_subprocess(tmp_path)
    assert rc == 0, out[-2000:]
    assert "lib False merged True" in out and "lacks an entry point" in out, out


def test_library_without_a_manifest_is_not_mapped(tmp_path, monkeypatch):
    lib_dir = _copy_libs(tmp_path)
    os.unlink(lib_dir / native.MANIFEST_NAME)
    monkeypatch.setattr(native, "LIB_DIR", str(lib_dir))
    native._get.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.cpu() is None
        assert len(caught) == 1 and "does not vouch for liblowrank_cpu.so" in str(caught[0].message)
    finally:
        native._get.cache_clear()
