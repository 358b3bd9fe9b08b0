"""The native library: built by setup.py, loaded with ctypes, reports its ABI and build."""
import ctypes
import importlib
import shutil
import subprocess
import sys
import warnings

import pytest

from lowrank import native


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 3])" in out.stdout
