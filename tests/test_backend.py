"""Backend choice (lowrank/backend.py) and the supported dtypes (lowrank/dtypes.py)."""
import pytest
import torch

from lowrank.backend import backend_for, triton_available
from lowrank.dtypes import FLOAT_DTYPES, KERNEL_DTYPES, check_dtype
from tests.helpers import run_python


@pytest.mark.parametrize("value, expected", [(None, "reference"), ("auto", "reference"), ("reference", "reference"),
                                             ("triton", "triton")])
def test_backend_for_a_cpu_tensor(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LOWRANK_BACKEND", value)
    if expected == "triton" and not triton_available():
        expected = "reference"
    assert backend_for(torch.empty(3)) == expected


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"LOWRANK_BACKEND='cuda'.*auto.*triton.*reference"):
        backend_for(torch.empty(3))


def test_without_triton_the_kernels_fall_back_with_one_warning():
    code = (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "import os; os.environ['LOWRANK_BACKEND'] = 'triton'\n"
        "import torch\n"
        "from lowrank.backend import backend_for\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    print(backend_for(torch.empty(1)), backend_for(torch.empty(1)))\n"
        "print(sum('Triton unavailable' in str(w.message) for w in caught))\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "reference", "1"], out.stdout


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.uint8, torch.complex64])
def test_check_dtype_names_where_what_and_which(dtype):
    with pytest.raises(TypeError, match=rf"my_op: weight dtype {dtype} is not supported; use float32, float16 or bfloat16"):
        check_dtype(dtype, "my_op", "weight dtype")


def test_check_dtype_names_a_string_for_what_it_is():
    """adapter_dtype="float32" (a string where a torch.dtype is meant) said 'float32 is not supported;
    use float32': now it asks for a torch.dtype."""
    with pytest.raises(TypeError, match=r"my_op: adapter_dtype must be a torch.dtype .*got str 'float32'"):
        check_dtype("float32", "my_op", "adapter_dtype")


def test_check_dtype_accepts_the_three_and_float64_where_asked():
    for dtype in KERNEL_DTYPES:
        check_dtype(dtype, "op")
    check_dtype(torch.float64, "op", float64=True)
    assert set(FLOAT_DTYPES) - set(KERNEL_DTYPES) == {torch.float64}
    with pytest.raises(TypeError, match=r"float64 on the reference path"):
        check_dtype(torch.int32, "op", float64=True)
