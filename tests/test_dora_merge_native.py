"""The native DoRA merge / unmerge (csrc/dora_cpu.cpp, lowrank.h lowrank_cpu_dora_merge / _unmerge)
against its oracle, the pure-torch float64 path of lowrank/ops/dora_merge.py: the same bits -- merged
weight, row scale, record indices and values -- for every dtype, layout (rows contiguous, a Conv1D
weight's transpose), rank 1..64, zero-norm and NaN / Inf rows, and the same refusals (overflow:
nothing written). Every record scratch buffer the library gets is poisoned first (NaN values, -7
indices), so a slot it forgets to write fails the comparison. (The float64 reference rounded once by
numpy is tests/test_dora_merge.py's, which now runs on the native path by default.)"""
import ctypes

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank import native
from lowrank.ops import dora_merge as dm
from lowrank.ops.dora_merge import dora_merge_, dora_unmerge_
from tests.helpers import DTYPE_IDS, DTYPES, assert_bits_equal, bits, poison_

pytestmark = pytest.mark.skipif(native.cpu(warn=False) is None, reason="native CPU library not built (g++ missing?)")


def problem(n, k, r, dtype, seed, conv1d=False, delta=0.3, jitter=0.1):
    """W (N, K) with rms 1/sqrt(K) (stored (K, N) and handed over transposed with conv1d), A, B in
    fp32 with s B A's rms `delta` x W's at s = 2, m = the merged rows' norms perturbed by `jitter`."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    if conv1d:
        w = w.t().contiguous().t()
    a = torch.randn(r, k, generator=g) / k ** 0.5
    b = delta / 2.0 / r ** 0.5 * torch.randn(n, r, generator=g)
    m = (w.double() + 2.0 * b.double() @ a.double()).norm(dim=1)
    m = m * (1 + jitter * torch.randn(n, generator=g, dtype=torch.float64))
    return w, a, b, m.float()


def clone_like(w):
    """A copy with w's layout (a transposed view stays one)."""
    if w.dim() == 2 and w.stride(0) == 1 and w.stride(1) != 1:
        return w.t().clone().t()
    return w.clone()


@pytest.fixture(autouse=True)
def poisoned_records(monkeypatch):
    """Every record scratch buffer handed to the library starts as NaN values and -7 indices."""
    made = []
    real = dm._new_record

    def poisoned(cap, weight):
        idx, val = real(cap, weight)
        idx.fill_(-7)
        poison_(val)
        made.append(cap)
        return idx, val

    monkeypatch.setattr(dm, "_new_record", poisoned)
    return made


def torch_path(monkeypatch, fn, *args, **kw):
    """fn(*args) with LOWRANK_NO_NATIVE=1 (the pure-torch path), the variable restored after."""
    with monkeypatch.context() as mp:
        mp.setenv("LOWRANK_NO_NATIVE", "1")
        assert dm._library(args[0]) is None
        return fn(*args, **kw)


def merge_both(monkeypatch, w, a, b, m, s, exact=True):
    """(native weight, native result, torch weight, torch result) from clones of w."""
    wn, wt = clone_like(w), clone_like(w)
    assert dm._library(wn) is not None, "the native path must be taken here"
    out_n = dora_merge_(wn, a, b, m, s, exact=exact)
    out_t = torch_path(monkeypatch, dora_merge_, wt, a, b, m, s, exact=exact)
    return wn, out_n, wt, out_t


def assert_same(wn, out_n, wt, out_t):
    assert_bits_equal(wn, wt, "merged weight")
    assert torch.equal(out_n[0], out_t[0]), "row scale"
    assert out_n[1].dtype == torch.int32 and torch.equal(out_n[1], out_t[1]), "record indices"
    assert_bits_equal(out_n[2], out_t[2], "record values")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("r", [1, 7, 16, 64])
@pytest.mark.parametrize("shape", [(67, 131), (5, 259), (130, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_native_equals_torch_path_and_round_trips(monkeypatch, dtype, conv1d, r, shape):
    """Bit for bit the torch path's merge (weight, scale, record), and merge + unmerge gives W back."""
    w, a, b, m = problem(*shape, r, dtype, seed=r, conv1d=conv1d)
    orig = clone_like(w)
    wn, out_n, wt, out_t = merge_both(monkeypatch, w, a, b, m, 2.0)
    assert_same(wn, out_n, wt, out_t)
    assert out_n[1].numel() > 0 and not torch.equal(bits(wn), bits(orig)), "the merge changed nothing"
    dora_unmerge_(wn, a, b, 2.0, *out_n)
    assert_bits_equal(wn, orig, "unmerged weight")
    assert wn.stride() == orig.stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_without_record_equals_torch_path(monkeypatch, dtype, poisoned_records):
    w, a, b, m = problem(40, 72, 8, dtype, 3)
    wn, out_n, wt, out_t = merge_both(monkeypatch, w, a, b, m, 2.0, exact=False)
    assert_same(wn, out_n, wt, out_t)
    assert out_n[1].numel() == 0 and not poisoned_records
    # unmerge without a record: round(W / scale - delta) everywhere, the same bits on both paths
    un, ut = clone_like(wn), clone_like(wn)
    dora_unmerge_(un, a, b, 2.0, out_n[0])
    torch_path(monkeypatch, dora_unmerge_, ut, a, b, 2.0, out_t[0])
    assert_bits_equal(un, ut, "unmerged without a record")


@given(n=st.integers(1, 40), k=st.integers(1, 70), r=st.integers(1, 64), dt=st.sampled_from([0, 1, 2]),
       conv1d=st.booleans(), delta=st.sampled_from([0.01, 0.05, 0.3, 3.0]), seed=st.integers(0, 2 ** 16))
def test_property_native_equals_torch_path(n, k, r, dt, conv1d, delta, seed):
    mp = pytest.MonkeyPatch()
    try:
        w, a, b, m = problem(n, k, r, DTYPES[dt], seed, conv1d=conv1d, delta=delta)
        orig = clone_like(w)
        wn, out_n, wt, out_t = merge_both(mp, w, a, b, m, 1.5)
        assert_same(wn, out_n, wt, out_t)
        dora_unmerge_(wn, a, b, 1.5, *out_n)
        assert_bits_equal(wn, orig, "unmerged weight")
    finally:
        mp.undo()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_zero_norm_and_zero_magnitude_rows(monkeypatch, dtype, conv1d):
    """A row of W and B both zero has norm 0 (scale 0): it stays 0, nothing to record. A zero magnitude
    (scale 0 over a nonzero row) zeroes the row: every element is recorded (the unmerge cannot
    recover it). Both as the torch path."""
    w, a, b, m = problem(23, 45, 4, dtype, 1, conv1d=conv1d)
    w[3] = 0
    b[3] = 0
    m[9] = 0
    orig = clone_like(w)
    wn, out_n, wt, out_t = merge_both(monkeypatch, w, a, b, m, 2.0)
    assert_same(wn, out_n, wt, out_t)
    assert out_n[0][3] == 0 and out_n[0][9] == 0
    assert torch.all(wn[9] == 0) and torch.all(wn[3] == 0)
    rows = out_n[1].long() // 45
    assert int((rows == 9).sum()) == 45 and int((rows == 3).sum()) == 0
    dora_unmerge_(wn, a, b, 2.0, *out_n)
    assert_bits_equal(wn, orig, "unmerged weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_nan_and_inf_in_the_weight(monkeypatch, dtype, conv1d):
    """NaN / Inf in W: their rows' norms are NaN / Inf, so scale 0 (the torch path's rule); the bits
    (NaN payloads included) and the record are the torch path's, and the round trip restores them."""
    w, a, b, m = problem(19, 33, 3, dtype, 2, conv1d=conv1d)
    w[2, 5] = float("nan")
    w[7, 0] = float("inf")
    w[11, 32] = -float("inf")
    orig = clone_like(w)
    wn, out_n, wt, out_t = merge_both(monkeypatch, w, a, b, m, 2.0)
    assert_same(wn, out_n, wt, out_t)
    assert out_n[0][2] == 0 and torch.isnan(wn[2, 5]) and int(torch.isnan(wn[2]).sum()) == 1
    assert torch.isnan(wn[7, 0]) and torch.isnan(wn[11, 32])  # 0 * Inf
    dora_unmerge_(wn, a, b, 2.0, *out_n)
    assert_bits_equal(wn, orig, "unmerged weight")


@pytest.mark.parametrize("dtype, tiny", [(torch.float16, 1e-5), (torch.float32, 1e-38), (torch.bfloat16, 1e-38)],
                         ids=DTYPE_IDS)
def test_subnormal_results(monkeypatch, dtype, tiny):
    """Weights near the bottom of the range (fp16 subnormals below 6.1e-5; fp32 / bf16 ones below
    1.2e-38): the rounding into subnormals (and to zero) is the torch path's, and the round trip exact."""
    w, a, b, m = problem(31, 77, 3, dtype, 5)
    w = (w.double() * tiny).to(dtype)
    m = m.double() * tiny  # float64: 1e-38 x ||row|| is below float32's normal range
    b = b * tiny
    assert (w != 0).any()
    orig = clone_like(w)
    wn, out_n, wt, out_t = merge_both(monkeypatch, w, a, b, m, 2.0)
    assert_same(wn, out_n, wt, out_t)
    dora_unmerge_(wn, a, b, 2.0, *out_n)
    assert_bits_equal(wn, orig, "unmerged weight")


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_overflow_is_refused_with_the_weight_untouched(monkeypatch, conv1d):
    """fp32 magnitudes of 1e6 on two rows of an fp16 weight: ValueError naming the first element
    (row-major) that would overflow, the same message as the torch path's; nothing written."""
    w, a, b, m = problem(16, 40, 2, torch.float16, 0, conv1d=conv1d)
    m[5] = 1e6
    m[12] = 1e6
    orig = clone_like(w)
    messages = []
    for exact in (True, False):
        with pytest.raises(ValueError, match="overflow") as err:
            dora_merge_(w, a, b, m, 2.0, exact=exact)
        assert_bits_equal(w, orig, "weight after a refused merge")
        messages.append(str(err.value))
    with pytest.raises(ValueError, match="overflow") as torch_err:
        torch_path(monkeypatch, dora_merge_, w, a, b, m, 2.0)
    assert messages == [str(torch_err.value)] * 2
    assert "at (5, " in messages[0]
    assert_bits_equal(w, orig, "weight after a refused merge")


def test_near_overflow_merges_as_the_torch_path(monkeypatch):
    """A row scaled to just under fp16's largest value: the cheap bound cannot clear it, the exact
    check finds nothing, and the merge is the torch path's."""
    w, a, b, m = problem(16, 40, 2, torch.float16, 0)
    x = w.double() + 2.0 * b.double() @ a.double()
    m[4] = float(65000.0 * x[4].norm() / x[4].abs().max())
    wn, out_n, wt, out_t = merge_both(monkeypatch, w, a, b, m, 2.0)
    assert_same(wn, out_n, wt, out_t)
    assert torch.isfinite(wn).all() and wn[4].abs().max() > 60000


def _raw_merge(lib, w, a, b, m, s, cap):
    """lowrank_cpu_dora_merge called directly: (status, count, idx, val)."""
    a64, b64 = a.double().contiguous(), b.double().contiguous()
    scale = (m.double() * dm.inverse_norms(dm.dora_row_norms(w, a, b, s), m)).contiguous()
    inv = (dm._inverse(scale.abs()) * scale.sign()).contiguous()
    idx, val = torch.full((max(cap, 1),), -7, dtype=torch.int32), poison_(torch.empty(max(cap, 1), dtype=w.dtype))
    count, bad = ctypes.c_int64(-1), ctypes.c_int64(-1)
    status = lib.lowrank_cpu_dora_merge(dm._ptr(w), w.shape[0], w.shape[1], w.stride(0), w.stride(1),
                                        native.dtype_code(w.dtype), dm._ptr(b64), dm._ptr(a64), a.shape[0], s,
                                        dm._ptr(scale), dm._ptr(inv), dm._ptr(idx), dm._ptr(val), cap,
                                        ctypes.byref(count), ctypes.byref(bad))
    return status, count.value, idx, val


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_capacity_overflow_leaves_the_weight_untouched(monkeypatch, dtype, conv1d):
    """Too small a record buffer: ERR_CAPACITY, W bit for bit as it was (the library merged, then
    undid with its full record), the count needed reported; with that capacity the merge succeeds
    and equals the torch path's. Through dora_merge_, a too-small first guess is retried."""
    lib = native.cpu()
    w, a, b, m = problem(37, 61, 5, dtype, 4, conv1d=conv1d)
    orig = clone_like(w)
    status, need, _, _ = _raw_merge(lib, w, a, b, m, 2.0, 3)
    assert status == native.ERR_CAPACITY and need > 3
    assert_bits_equal(w, orig, "weight after a capacity overflow")
    status, count, idx, val = _raw_merge(lib, w, a, b, m, 2.0, need)
    assert status == native.OK and count == need
    wt = clone_like(orig)
    _, ti, tv = torch_path(monkeypatch, dora_merge_, wt, a, b, m, 2.0)
    assert_bits_equal(w, wt, "merged weight")
    assert torch.equal(idx, ti) and torch.equal(bits(val), bits(tv))

    monkeypatch.setattr(dm, "_record_capacity", lambda *args, **kw: 1)
    w2 = clone_like(orig)
    _, i2, v2 = dora_merge_(w2, a, b, m, 2.0)
    assert_bits_equal(w2, wt, "merged weight after a retry")
    assert torch.equal(i2, ti) and torch.equal(bits(v2), bits(tv))


def test_records_are_poisoned_first(poisoned_records):
    w, a, b, m = problem(9, 20, 2, torch.bfloat16, 0)
    dora_merge_(w, a, b, m, 2.0)
    assert poisoned_records, "the library's record buffers did not come from _new_record"


def test_no_native_falls_back_to_the_torch_path(monkeypatch):
    """LOWRANK_NO_NATIVE=1, a missing library and a float64 weight take the torch path: the library
    is never called, the bits are the same."""
    w, a, b, m = problem(21, 30, 3, torch.bfloat16, 0)
    ref_w = clone_like(w)
    ref = dora_merge_(ref_w, a, b, m, 2.0)

    class Boom:
        def __getattr__(self, name):
            raise AssertionError(f"native {name} called")

    for setup in ("env", "missing"):
        with monkeypatch.context() as mp:
            if setup == "env":
                mp.setenv("LOWRANK_NO_NATIVE", "1")
                mp.setattr(native, "cpu", lambda warn=True: Boom())
            else:
                mp.setattr(native, "for_device", lambda device: None)
            w2 = clone_like(w)
            out = dora_merge_(w2, a, b, m, 2.0)
            assert_same(w2, out, ref_w, ref)
            dora_unmerge_(w2, a, b, 2.0, *out)
            assert_bits_equal(w2, w, "unmerged weight")
    w64 = w.double()
    assert dm._library(w64) is None
    orig64 = w64.clone()
    out = dora_merge_(w64, a, b, m, 2.0)
    dora_unmerge_(w64, a, b, 2.0, *out)
    assert torch.equal(w64, orig64)


def test_unmerge_refuses_a_foreign_record():
    w, a, b, m = problem(8, 16, 2, torch.float16, 0)
    scale, idx, val = dora_merge_(w, a, b, m, 2.0)
    merged = w.clone()
    with pytest.raises(ValueError, match="not this weight's record"):
        dora_unmerge_(w, a, b, 2.0, scale, idx + 8 * 16, val)
    with pytest.raises(TypeError, match="record"):
        dora_unmerge_(w, a, b, 2.0, scale, idx, val.float())
    assert_bits_equal(w, merged, "weight after a refused unmerge")


def test_cuda_library_has_the_dora_entry_points():
    """The CUDA half is compiled here (nvcc) but cannot run: it loads (cudart static, no driver
    needed), reports this ABI, and exports both DoRA entry points with their ctypes signatures."""
    lib = native.cuda(warn=False)
    if lib is None:
        pytest.skip("CUDA library not built (no nvcc)")
    assert lib.lowrank_cuda_abi_version() == native.ABI_VERSION
    assert len(lib.lowrank_cuda_dora_merge.argtypes) == 18 and len(lib.lowrank_cuda_dora_unmerge.argtypes) == 15


# (a, s): with W = 1, B = 1, r = K = 1, the exact 1 + a * s lies just above the float32 rounding midpoint
# 2.5 + 2^-23, while the torch path's float64 steps -- p = RN(a * s), then RN(1 + p) -- land exactly on
# it (ties to even: 2.5). A fused multiply-add, RN(1 + a * s) in one step, gives 2.5 + 2^-22 instead.
# Found by an exact (fractions) search; each element's result is decided by the double arithmetic's order.
FMA_TRAPS = [(1.500000238418579, 0.9999999205271531), (1.5000004768371582, 0.9999997615814968),
             (1.5000005960464478, 0.9999996821086877)]


@pytest.mark.parametrize("a_val, s", FMA_TRAPS)
def test_no_fused_multiply_add(monkeypatch, a_val, s):
    """The merge's double arithmetic is the torch path's step for step (no fma contraction): on these
    elements a fused evaluation rounds the other way. m = the row norm, so the row scale is exactly 1."""
    w = torch.ones(1, 1)
    a = torch.tensor([[a_val]], dtype=torch.float32)
    b = torch.ones(1, 1)
    m = dm.dora_row_norms(w, a, b, s)  # float64: scale = m * (1 / m)
    assert float(m[0] * dm._inverse(m)[0]) == 1.0, "precondition: the row scale must be exactly 1"
    wn, out_n, wt, out_t = merge_both(monkeypatch, w, a, b, m, s)
    assert out_n[0][0] == 1.0
    assert wt.item() == 2.5, "the torch path's float64 steps round to the midpoint, then to even"
    assert_same(wn, out_n, wt, out_t)
    # the unmerge's W * inv - s B A, with scaling -s and scale 1: the same trap
    un, ut = torch.ones(1, 1), torch.ones(1, 1)
    one = torch.ones(1, dtype=torch.float64)
    dora_unmerge_(un, a, b, -s, one)
    torch_path(monkeypatch, dora_unmerge_, ut, a, b, -s, one)
    assert ut.item() == 2.5
    assert_bits_equal(un, ut, "unmerged weight")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_cuda_equals_the_cpu_torch_path(monkeypatch, dtype, conv1d):
    """lowrank_cuda_dora_merge / _unmerge (on the GPU machine): the CPU torch path's bits (NaN signs
    aside: 0 x Inf is -NaN on x86, +NaN on the GPU), the same sorted record, a bit-exact round trip, a
    too-small first record buffer retried, and overflow refused with W untouched."""
    if native.cuda(warn=False) is None:
        pytest.fail("the CUDA library is not built: bench/gpu_check.sh builds it first")
    w, a, b, m = problem(67, 131, 16, dtype, 7, conv1d=conv1d)
    w[7, 0] = float("inf")
    ref_w = clone_like(w)
    ref = torch_path(monkeypatch, dora_merge_, ref_w, a, b, m, 2.0)
    wg = clone_like(w).cuda()
    assert wg.stride() == w.stride() and dm._library(wg) is not None
    ag, bg, mg = a.cuda(), b.cuda(), m.cuda()
    monkeypatch.setattr(dm, "_record_capacity", lambda *args, **kw: 5)  # forces the capacity retry
    scale, idx, val = dora_merge_(wg, ag, bg, mg, 2.0)
    assert_bits_equal(wg.cpu(), ref_w, "CUDA merge", nan_payload=False)
    assert torch.equal(idx.cpu(), ref[1]) and idx.numel() > 5
    assert_bits_equal(val.cpu(), ref[2], "record values")
    dora_unmerge_(wg, ag, bg, 2.0, scale, idx, val)
    assert_bits_equal(wg.cpu(), w, "CUDA unmerge")
    m64 = mg.double()
    m64[5] = 1e6 if dtype == torch.float16 else 1e300  # beyond the dtype's range after scaling
    with pytest.raises(ValueError, match="overflow"):
        dora_merge_(wg, ag, bg, m64, 2.0)
    assert_bits_equal(wg.cpu(), w, "CUDA weight after a refused merge")
