"""The merge op (lowrank/ops/merge.py, csrc/, and the pure-torch lowrank/ops/merge_torch.py): one
rounding against float64, the bit-exact unmerge record, bad inputs, torch.library.

The oracle for fp16 / bf16 is `round_once(W64 + s * B64 @ A64)` (tests/oracles.py: a single
rounding done by numpy, independent of the fallback's own rounding). fp32 weights have no
single-rounding oracle: they are held to the stated error bound and to the pure-torch emulation of
the library's fma sequence, bit for bit.
"""
from __future__ import annotations

import ctypes
import importlib
import contextlib
import math
import os
import shutil
import threading

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank
from lowrank import native
from lowrank.ops.merge import _cpu_merge, _cpu_unmerge_fast, _factors, _ptr, merge_, record_allows_fast_unmerge, unmerge_

from tests.helpers import DTYPE_IDS, DTYPES, assert_bits_equal, bits
from tests.oracles import round_once

HAS_CPU_LIB = native.cpu(warn=False) is not None
needs_cpu_lib = pytest.mark.skipif(not HAS_CPU_LIB, reason="native CPU library not built (g++ missing?)")


def merged_f64(w, a, b, s):
    """The exact merge rounded once to w's dtype: the oracle for fp16 / bf16."""
    return round_once(w.double() + s * torch.einsum("nr,rk->nk", b.double(), a.double()), w.dtype)


def fp32_bound(w, a, b, s, out):
    """The documented fp32 error bound, element-wise."""
    r = a.shape[0]
    u = 2.0 ** -24
    gamma = r * u / (1 - r * u)
    absprod = torch.einsum("nr,rk->nk", b.double().abs(), a.double().abs())
    return abs(s) * (gamma + 2 * u) * absprod + u * out.double().abs() + 2.0 ** -126


def make_weight(n, k, dtype, pad=0, specials=False, scale=0.02, gen=None):
    """A (n, k) weight with row stride k + pad (padding filled with a sentinel), optionally with
    NaN / Inf / zero / subnormal / huge entries."""
    store = torch.empty(n, k + pad, dtype=dtype)
    store[:, k:] = -7.25  # sentinel: must survive the merge untouched
    w = store[:, :k]
    w.copy_(torch.randn(n, k, generator=gen) * scale)
    if specials and w.numel() >= 6:
        idx = torch.randperm(n * k, generator=gen)[:6]
        vals = [math.nan, math.inf, -math.inf, 0.0, torch.finfo(dtype).tiny / 4, torch.finfo(dtype).max / 2]
        for i, v in zip(idx.tolist(), vals):
            w[i // k, i % k] = v
    return store, w


def factors(n, k, r, dtype, mag=0.05, gen=None):
    a = (torch.randn(r, k, generator=gen) * mag).to(dtype)
    b = (torch.randn(n, r, generator=gen) * mag).to(dtype)
    return a, b


SCALES = [2.0, 0.5, -1.25, 1.0 / math.sqrt(7), 16.0 / math.sqrt(13), 1e-3, 40.0]


def covers(rec, ref):
    """True when record `rec` holds every entry of record `ref` (same index, same value bits): the
    native CPU library's record is a superset of the elements whose exact round trip fails."""
    pos = torch.searchsorted(rec[0], ref[0])
    if ref[0].numel() and int(pos.max()) >= rec[0].numel():
        return False
    return torch.equal(rec[0][pos], ref[0]) and torch.equal(bits(rec[1][pos]), bits(ref[1]))


def check_record(w0, merged, a, b, s, rec, max_extra=0.1):
    """The merge_ record against the weight before (w0) and after (merged) the merge: sorted and
    unique, the original bits at its indices, a superset of the elements whose round trip fails
    (exactly that set unless the native CPU library made it), and every unmerge restores w0 with
    it: the certified one, and on the native CPU library the fast one. max_extra: the largest
    fraction of the elements recorded beyond the failing ones (uncertified round trips: few on
    ordinary data). Returns the fraction of elements recorded."""
    rec_idx, rec_val = rec
    assert rec_idx.dtype == torch.int32 and rec_val.dtype == w0.dtype
    assert bool((rec_idx[1:] > rec_idx[:-1]).all())
    assert_bits_equal(rec_val, w0.flatten()[rec_idx.long()], "record values")
    plain = merged.clone()
    unmerge_(plain, a, b, s)
    fails = (bits(plain) != bits(w0)).flatten().nonzero().squeeze(1).to(torch.int32)
    native_cpu = record_allows_fast_unmerge(w0, a)
    if native_cpu:
        assert covers(rec, (fails, w0.flatten()[fails.long()])), "record misses a failing round trip"
        # the additions are the round trips it could not certify and the fast unmerge's misses: few
        assert rec_idx.numel() - fails.numel() <= max_extra * w0.numel() + 8, (rec_idx.numel(), fails.numel())
    else:
        assert torch.equal(fails, rec_idx), "record is not exactly the set of failing round trips"
    for fast in (False, True) if native_cpu else (False,):
        back = merged.clone()
        unmerge_(back, a, b, s, rec_idx, rec_val, fast=fast)
        assert_bits_equal(back, w0, f"unmerged with the record (fast={fast})")
    return rec_idx.numel() / max(w0.numel(), 1)


def run_merge_unmerge(n, k, r, dtype, s, pad, specials, seed, mag=0.05, factor_dtype=None, w_scale=0.02):
    """merge_ + the checks above + the fast unmerge. factor_dtype: the factors drawn in it (default:
    the weight's), e.g. "bf16-in-fp32" (bf16 values widened to fp32: a saved bf16 adapter loaded as
    fp32 master weights)."""
    gen = torch.Generator().manual_seed(seed)
    store, w = make_weight(n, k, dtype, pad, specials, scale=w_scale, gen=gen)
    if factor_dtype == "bf16-in-fp32":
        a, b = (t.float() for t in factors(n, k, r, torch.bfloat16, mag, gen))
    else:
        a, b = factors(n, k, r, factor_dtype or dtype, mag, gen)
    orig_store = store.clone()
    w0 = w.clone()
    rec_idx, rec_val = merge_(w, a, b, s, True)
    # padding of the row stride untouched
    assert_bits_equal(store[:, k:], orig_store[:, k:], "row padding")
    if dtype == torch.float32:
        err = (w.double() - (w0.double() + s * (b.double() @ a.double()))).abs()
        finite = torch.isfinite(w0) & torch.isfinite(w)
        bound = fp32_bound(w0, a, b, s, w)
        assert bool((err[finite] <= bound[finite]).all()), f"fp32 merge outside its bound: max err {err[finite].max()}"
    else:
        assert_bits_equal(w, merged_f64(w0, a, b, s), "merged vs float64 rounded once", nan_payload=False)
    # NaN / Inf stay where they were
    assert torch.equal(torch.isnan(w), torch.isnan(w0))
    inf0 = torch.isinf(w0)
    assert torch.equal(w[inf0], w0[inf0])
    # (weights near the underflow threshold: the bound's underflow slack leaves most round trips
    # uncertified, and those are recorded outright)
    frac = check_record(w0, w, a, b, s, (rec_idx, rec_val), max_extra=1.0 if w_scale < 1e-30 else 0.1)
    unmerge_(w, a, b, s, rec_idx, rec_val, fast=True)
    assert_bits_equal(store, orig_store, "after unmerge")
    return frac

# ---------------------------------------------------------------------------------------------
# The library against float64
# ---------------------------------------------------------------------------------------------

@needs_cpu_lib
@settings(max_examples=60)
@given(n=st.integers(1, 70), k=st.integers(1, 300), r=st.sampled_from([1, 2, 3, 5, 8, 16, 31, 64]),
       dtype=st.sampled_from(DTYPES), s=st.sampled_from(SCALES), pad=st.sampled_from([0, 0, 3, 8]),
       specials=st.booleans(), mag=st.sampled_from([0.05, 0.01, 1.0]), seed=st.integers(0, 2**16))
def test_merge_matches_float64_and_unmerge_is_exact(n, k, r, dtype, s, pad, specials, mag, seed):
    run_merge_unmerge(n, k, r, dtype, s, pad, specials, seed, mag)


PAIR_LOOP = HAS_CPU_LIB and native.cpu(warn=False).lowrank_cpu_rank_loop_kind() == 1
needs_pair_loop = pytest.mark.skipif(not PAIR_LOOP, reason="the CPU lacks AVX512_BF16: no bf16 pair loop to test")


@needs_cpu_lib
@settings(max_examples=60)
@given(n=st.integers(4, 40), k=st.integers(1, 300), r=st.sampled_from([1, 2, 3, 16, 31, 64, 256]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), factor_dtype=st.sampled_from(["bf16-in-fp32", None]),
       s=st.sampled_from(SCALES), pad=st.sampled_from([0, 3]), specials=st.booleans(),
       mag=st.sampled_from([0.05, 1.0, 1e-19]), seed=st.integers(0, 2**16))
def test_merge_with_bf16_factors_matches_float64_and_unmerge_is_exact(n, k, r, dtype, factor_dtype, s, pad,
                                                                      specials, mag, seed):
    """Factors whose values are all bf16 numbers (a bf16 adapter, as it is or widened to fp32): on a
    CPU with AVX512_BF16 the library's bf16 pair loop accumulates them (csrc/merge_cpu.cpp,
    rank_rows4_pairs: its own bits, subnormal sums flushed to zero), so the merge is still the
    float64 result rounded once and both unmerges restore W with the record. mag = 1e-19 puts the
    products at ~2^-126, where the flushes happen, and a bf16 weight is then drawn at that scale (the
    underflow slack covers them; the certification is what this checks there, not the slack's size)."""
    w_scale = 1e-37 if mag == 1e-19 and dtype == torch.bfloat16 else 0.02
    run_merge_unmerge(n, k, r, dtype, s, pad, specials, seed, mag, factor_dtype, w_scale)


@needs_cpu_lib
@pytest.mark.parametrize("s", [300.0, 360.0, 420.0, 500.0])
def test_merge_where_the_partial_sums_dwarf_the_result(s):
    """Partial sums that climb to 16 and come back to ~0 while each small product (just under half an
    ulp of the running sum) is lost to rounding: the accumulation error is ~u times the sum of the
    partial-sum magnitudes, far above u (|acc| + ||B_i|| ||A_j||). The tracked bound must see those
    magnitudes (the pair loop's ceil(r/2) * max |s'|; a build that dropped the factor ceil(r/2)
    certified 2040 of these 2048 elements wrongly, as the review found), so the merge is still the
    float64 result rounded once, and both unmerges restore W."""
    u, r, n, k = 2.0 ** -24, 64, 4, 512
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(r, k)
    level = 0.0
    for kk in range(r // 2):
        big = 1.0 if kk < 16 else -1.0
        a[2 * kk + 1] = big
        level += big
        half = u * 2.0 ** math.floor(math.log2(max(level, 1.0)))
        a[2 * kk] = 0.98 * half * (1 + 0.01 * torch.rand(k, generator=g))
    a = a.bfloat16().float()  # bf16 values: the pair loop where the CPU has it, else the fp32 loop
    b = torch.ones(n, r)
    w0 = (1 + torch.rand(n, k, generator=g)).bfloat16()
    w = w0.clone()
    rec = merge_(w, a, b, s, True)
    assert_bits_equal(w, merged_f64(w0, a, b, s), "merged vs float64 rounded once")
    for fast in (False, True):
        back = w.clone()
        unmerge_(back, a, b, s, *rec, fast=fast)
        assert_bits_equal(back, w0, f"unmerged (fast={fast})")


@needs_cpu_lib
@pytest.mark.parametrize("loop", ["pair loop", "fp32 loop"])
@pytest.mark.parametrize("s", [0.99 * 2.0 ** -150, 1e-44, -1e-40, 1e-38, 3e-35, -1e-31, 1e-30])
def test_merge_with_a_scale_below_floats_range(s, loop):
    """|scale| down to below float's smallest subnormal with huge factors (the delta still moves W by
    several ulps): the merge is the float64 result rounded once and both unmerges restore W. fp32(s)
    is subnormal or 0 there (the bound's |acc| term assumed |s - fp32(s)| <= u |s|) and the bound's
    other terms saturated to Inf: an AVX-512 fp16 certification took the NaN bound (0 * Inf) as
    certified and left W unchanged (found by the review; the same with either loop)."""
    g = torch.Generator().manual_seed(3)
    f = (1e-3 / abs(s)) ** 0.5  # factors whose product, times s, is ~5% of W
    cases = [(torch.bfloat16, 9, 17, 3), (torch.float16, 7, 40, 17), (torch.float16, 8, 33, 64)]
    if abs(s) < 1e-43:  # and the review's case: one product at bf16's largest value, W = 2^-14
        cases.append((torch.float16, 4, 8, 1))
    for dtype, n, k, r in cases:
        if r == 1:
            a, b = torch.full((1, k), 2.0 ** 127 * 255 / 128), torch.ones(n, 1)
            w0 = torch.full((n, k), 2.0 ** -14, dtype=dtype)
        else:
            a = (torch.randn(r, k, generator=g) * f / r ** 0.5).bfloat16().float()
            b = (torch.randn(n, r, generator=g) * f).bfloat16().float()
            w0 = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
        if loop == "fp32 loop":  # one value off the bf16 grid: the fp32 loop
            a[0, 0] = float(torch.nextafter(a[0, 0], torch.tensor(math.inf)))
        w = w0.clone()
        rec = merge_(w, a, b, s, True)
        assert_bits_equal(w, merged_f64(w0, a, b, s), f"{dtype} r={r}: merged vs float64 rounded once")
        for fast in (False, True):
            back = w.clone()
            unmerge_(back, a, b, s, *rec, fast=fast)
            assert_bits_equal(back, w0, f"{dtype} r={r}: unmerged (fast={fast})")


@needs_pair_loop
def test_pair_loop_records_need_their_own_fast_unmerge(tmp_path, monkeypatch):
    """A merge with bf16 factors takes the pair loop where the CPU has it and the fp32 loop where it
    does not (LOWRANK_NO_BF16_DOT=1, read at load: a fresh process): the merged bits are the same
    (one rounding), the records are not (each holds its own loop's fast-unmerge misses), so the
    fast unmerge of one kind cannot take the other's record. lowrank.merge keeps the key
    (ops.merge.fast_unmerge_key) with the record, and a merged layer unmerged under another key
    (a model moved to a CPU without the instruction) takes the certified unmerge, exact with any
    record."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from lowrank.ops.merge import fast_unmerge_key, merge_\n"
            "def merged():\n"
            "    g = torch.Generator().manual_seed(5)\n"
            "    w = (torch.randn(64, 1000, generator=g) * 0.02).half()\n"
            "    a = (torch.randn(32, 1000, generator=g) * 0.3).bfloat16().float()\n"
            "    b = (torch.randn(64, 32, generator=g) * 0.3).bfloat16().float()\n"
            "    w0 = w.clone()\n"
            "    idx, val = merge_(w, a, b, 0.75, True)\n"
            "    return {'w0': w0, 'a': a, 'b': b, 'w': w, 'idx': idx, 'val': val, 'key': fast_unmerge_key(w, a)}\n")
    script = tmp_path / "merge_kind.py"
    script.write_text(code + "import sys\ntorch.save(merged(), sys.argv[1])\n")
    subprocess.run([sys.executable, str(script), str(tmp_path / "fp32.pt")], check=True,
                   env={**os.environ, "LOWRANK_NO_BF16_DOT": "1"})
    fp32 = torch.load(tmp_path / "fp32.pt")
    here = {}
    exec(code, here)
    pair = here["merged"]()
    assert (fp32["key"], pair["key"]) == (0, 1)
    assert_bits_equal(fp32["w"], pair["w"], "merged weight, fp32 loop vs pair loop")
    assert_bits_equal(pair["w"], merged_f64(pair["w0"], pair["a"], pair["b"], 0.75), "merged vs float64")
    assert not torch.equal(fp32["idx"], pair["idx"]), "the two loops' records should differ (their misses do)"
    for made in (fp32, pair):  # the certified unmerge is exact with either record
        back = made["w"].clone()
        unmerge_(back, made["a"], made["b"], 0.75, made["idx"], made["val"])
        assert_bits_equal(back, made["w0"], "certified unmerge")
    # here (the pair loop): the fast unmerge recomputes the merge's own accumulation (on this data
    # a fast unmerge by the fp32 loop missed 25 elements that the pair loop's record leaves out)
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(256, 4096, generator=g) * 0.02).half()
    a = (torch.randn(256, 4096, generator=g) * 0.3).bfloat16().float()
    b = (torch.randn(256, 256, generator=g) * 0.3).bfloat16().float()
    w0 = w.clone()
    rec = merge_(w, a, b, 0.75, True)
    unmerge_(w, a, b, 0.75, *rec, fast=True)
    assert_bits_equal(w, w0, "fast unmerge after a pair-loop merge")

    # lowrank.merge / unmerge: the key kept at the merge decides
    layer = nn.Linear(1000, 64, bias=False).half()
    with torch.no_grad():
        layer.weight.copy_(pair["w0"])
    holder = nn.Sequential(layer)
    lowrank.patch_linear(holder, rank=32, alpha=24, targets=["0"])
    lora = holder[0]
    with torch.no_grad():
        lora.lora_A["default"].copy_(pair["a"])
        lora.lora_B["default"].copy_(pair["b"])
    lowrank.merge(holder)
    assert lora.merged.fast_unmerge == 1
    assert_bits_equal(lora.base_layer.weight, pair["w"], "lowrank.merge's merged weight")
    merge_mod = importlib.import_module("lowrank.merge")
    from lowrank.ops import merge as ops_merge

    calls = []
    monkeypatch.setattr(merge_mod, "fast_unmerge_key", lambda w, a: 0)  # "moved to a CPU without the pair loop"
    monkeypatch.setattr(ops_merge, "_cpu_unmerge_fast", lambda *args: calls.append(args))
    lowrank.unmerge(holder)
    assert calls == [], "the fast unmerge ran with a record made under another key"
    assert_bits_equal(lora.base_layer.weight, pair["w0"], "unmerged under another key")


@contextlib.contextmanager
def merge_path(f64: bool):
    """Force the library's f64 path (merge_tile_f64: the double rank loop for every element of a
    16-bit weight, AVX-512) on or off for the calls inside; LOWRANK_MERGE_F64 is read per merge."""
    old = os.environ.get("LOWRANK_MERGE_F64")
    os.environ["LOWRANK_MERGE_F64"] = "1" if f64 else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOWRANK_MERGE_F64"]
        else:
            os.environ["LOWRANK_MERGE_F64"] = old


@needs_cpu_lib
@settings(max_examples=40)
@given(n=st.integers(4, 40), k=st.integers(1, 300), r=st.sampled_from([1, 3, 16, 32, 64, 256]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), s=st.sampled_from(SCALES),
       pad=st.sampled_from([0, 3]), specials=st.booleans(), mag=st.sampled_from([0.05, 1.0]),
       seed=st.integers(0, 2**16))
def test_merge_f64_path_matches_float64_and_the_fast_path(n, k, r, dtype, s, pad, specials, mag, seed):
    """Both paths of a 16-bit merge against the float64 oracle (rounded once, records checked), the
    same bits from each, and the fast path's record a superset of the f64 path's (which has no
    uncertified round trips to add) (NaN, Inf, subnormal and huge weights included; column counts
    that end inside a panel and inside 8 lanes)."""
    out = {}
    for f64 in (False, True):
        with merge_path(f64):
            run_merge_unmerge(n, k, r, dtype, s, pad, specials, seed, mag)
            gen = torch.Generator().manual_seed(seed)
            _, w = make_weight(n, k, dtype, pad, specials, gen=gen)
            a, b = factors(n, k, r, dtype, mag, gen)
            rec = merge_(w, a, b, s, True)
            out[f64] = (w, *rec)
    assert_bits_equal(out[True][0], out[False][0], "f64 path vs fast path")
    assert covers(out[False][1:], out[True][1:]), "the fast path's record misses an entry of the f64 path's"


@needs_cpu_lib
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (97, 59, 256), (33, 1025, 17), (300, 7, 4)], ids=str)
def test_merge_odd_shapes_and_max_rank(shape, dtype):
    n, k, r = shape
    run_merge_unmerge(n, k, r, dtype, 2.0, 0, True, seed=n * k + r)


@needs_cpu_lib
@pytest.mark.parametrize("f64", [False, True], ids=["fast", "f64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(70, 2100, 64), (21, 600, 256)], ids=str)
def test_merge_column_blocked_order(shape, dtype, f64):
    """A's panels over 32 KiB (r x K x 4 bytes): the library visits each task's rows one column
    block at a time (32-128 columns, the last one partial; 21 rows leave a tail of one) and
    prefetches W. Same oracle, records checked (both unmerges), on both paths."""
    n, k, r = shape
    with merge_path(f64):
        run_merge_unmerge(n, k, r, dtype, 2.0, 3, True, seed=n + k + r, mag=1.0)


@pytest.mark.parametrize("backend", [pytest.param("library", marks=needs_cpu_lib),
                                     pytest.param("library-f64", marks=needs_cpu_lib), "fallback"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_merge_near_rounding_midpoints(dtype, backend, monkeypatch):
    """Weights and deltas built so that W + s*delta lands exactly on, or a hair off, rounding
    midpoints: the library's certified fast path must send these to its exact path, and neither
    backend may round twice. The third term nudges some ties by 2^-30, below float32's resolution
    at these magnitudes: rounding to float32 first would land on the tie and round it to even."""
    if backend == "fallback":
        monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    monkeypatch.setenv("LOWRANK_MERGE_F64", "1" if backend == "library-f64" else "0")
    n, k, r = 64, 128, 4
    gen = torch.Generator().manual_seed(1)
    w = (torch.randint(-64, 64, (n, k), generator=gen).float() / 32).to(dtype)  # coarse values
    a = torch.zeros(r, k, dtype=dtype)
    b = torch.zeros(n, r, dtype=dtype)
    eps = torch.finfo(dtype).eps
    a[0] = eps / 2  # half an ulp at 1.0: exact ties
    a[1] = (torch.randint(-3, 4, (k,), generator=gen) * eps / 64).to(dtype)  # nudges
    a[2] = (torch.randint(0, 2, (k,), generator=gen) * 2 - 1) * 2.0 ** -15  # times b[:, 2]: +-2^-30
    b[:, 0] = torch.randint(-2, 3, (n,), generator=gen).to(dtype)
    b[:, 1] = (torch.arange(n) % 2).to(dtype)  # rows with the coarse nudges, and rows without
    b[:, 2] = torch.randint(-1, 2, (n,), generator=gen) * 2.0 ** -15  # +-2^-30 on a third of the rows
    w0 = w.clone()
    rec = merge_(w, a, b, 1.0, True)
    assert_bits_equal(w, merged_f64(w0, a, b, 1.0), "midpoint cases")
    check_record(w0, w, a, b, 1.0, rec)  # both unmerges restore the ties and near-ties
    unmerge_(w, a, b, 1.0, *rec)
    assert_bits_equal(w, w0, "midpoint cases after unmerge")


@pytest.mark.parametrize("backend", [pytest.param("library", marks=needs_cpu_lib), "fallback"])
def test_merge_near_fp16_subnormal_midpoints(backend, monkeypatch):
    """fp16 results below 2^-14 (zero and subnormal: spacing 2^-24), which the AVX-512 epilogue
    certifies on their own grid: exact ties (n + 1/2) 2^-24, nudges of +-2^-30 and +-2^-31 off them,
    zeros, values crossing into the normal range, and rows whose fp32 sum is off by up to half a
    step (a +-1/2 that cancels). One rounding against float64, and both unmerges restore W."""
    if backend == "fallback":
        monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    n, k, r = 64, 160, 5
    gen = torch.Generator().manual_seed(2)
    m = torch.randint(-1100, 1100, (n, k), generator=gen).double()
    m[torch.rand(n, k, generator=gen) < 0.2] = 0.0  # zeros
    w = (m * 2.0 ** -24).to(torch.float16)  # subnormal, zero, and a few just past 2^-14
    a = torch.zeros(r, k, dtype=torch.float16)
    b = torch.zeros(n, r, dtype=torch.float16)
    a[0] = 2.0 ** -24  # one subnormal step (the smallest fp16), times b[:, 0] in halves: ties
    a[1] = (torch.randint(-3, 4, (k,), generator=gen) * 2.0 ** -16).to(torch.float16)  # times b[:, 1] = 2^-14 or 2^-15
    a[2] = (torch.randint(-4, 5, (k,), generator=gen) * 2.0 ** -24).to(torch.float16)  # whole steps
    b[:, 0] = (torch.randint(-3, 4, (n,), generator=gen) * 0.5).to(torch.float16)
    b[:, 1] = torch.where(torch.arange(n) % 3 == 0, 2.0 ** -14, torch.where(torch.arange(n) % 3 == 1, 2.0 ** -15, 0.0))
    b[:, 2] = torch.randint(-2, 3, (n,), generator=gen).to(torch.float16)
    # +-1/2 added and taken away again on half of the rows: exact in float64, but fp32's running
    # sum loses bits down to 2^-25 (half a step) on the way: only the bound can tell
    a[3], a[4] = 1.0, -1.0
    b[:, 3] = b[:, 4] = torch.where(torch.arange(n) % 2 == 0, 0.5, 0.0) * torch.sign(torch.randn(n, generator=gen))
    w0 = w.clone()
    rec = merge_(w, a, b, 1.0, True)
    assert_bits_equal(w, merged_f64(w0, a, b, 1.0), "subnormal midpoint cases")
    check_record(w0, w, a, b, 1.0, rec)
    unmerge_(w, a, b, 1.0, *rec)
    assert_bits_equal(w, w0, "subnormal midpoint cases after unmerge")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("backend", [pytest.param("library", marks=needs_cpu_lib), "fallback"])
def test_merge_zero_results_keep_the_exact_sign(dtype, backend, monkeypatch):
    """W = 0 plus a delta of -2^-41 that fp32 loses: the running sum -2^-41 - 2^-16 rounds to
    -2^-16, and + 2^-16 then gives +0, so the fp32 result is +0 while the exact one rounds to -0
    (and the mirror image). Every certified path must leave such an element to the exact one: an
    error bound tiny against the rounding grid says nothing about the sign of a zero."""
    if backend == "fallback":
        monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    n, k = 16, 96
    gen = torch.Generator().manual_seed(9)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    w = torch.zeros(n, k, dtype=dtype)
    w[::4] = -0.0
    a = torch.zeros(3, k, dtype=dtype)
    b = torch.zeros(n, 3, dtype=dtype)
    a[0], a[1], a[2] = 2.0 ** -20, 1.0, -1.0
    b[:, 0] = -(2.0 ** -21) * sign
    b[:, 1] = b[:, 2] = -(2.0 ** -16) * sign
    b[n // 2:, 0] *= torch.randint(1, 4, (n - n // 2,), generator=gen).to(dtype)  # a few other tiny terms
    w0 = w.clone()
    rec = merge_(w, a, b, 1.0, True)
    assert_bits_equal(w, merged_f64(w0, a, b, 1.0), "signed zero results")
    check_record(w0, w, a, b, 1.0, rec, max_extra=1.0)  # (every round trip here is near a zero: uncertified)


# ---------------------------------------------------------------------------------------------
# The pure-torch fallback: same numerics, forced
# ---------------------------------------------------------------------------------------------

@needs_cpu_lib
@settings(max_examples=20)
@given(n=st.integers(1, 40), k=st.integers(1, 120), r=st.sampled_from([1, 4, 16]),
       dtype=st.sampled_from(DTYPES), s=st.sampled_from(SCALES), specials=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fallback_is_bit_identical_to_library(n, k, r, dtype, s, specials, seed):
    gen = torch.Generator().manual_seed(seed)
    _, w = make_weight(n, k, dtype, 0, specials, gen=gen)
    a, b = factors(n, k, r, dtype, gen=gen)
    w_lib, w_ref = w.clone(), w.clone()
    rec_lib = merge_(w_lib, a, b, s, True)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LOWRANK_NO_NATIVE", "1")
        rec_ref = merge_(w_ref, a, b, s, True)
        assert_bits_equal(w_ref, w_lib, "fallback merge vs library", nan_payload=False)
        assert covers(rec_lib, rec_ref), "the library's record misses an entry of the fallback's"
        unmerge_(w_ref, a, b, s, *rec_ref)
    assert_bits_equal(w_ref, w, "fallback unmerge")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fallback_alone_matches_float64(dtype, monkeypatch):
    """The fallback on its own (no library at all) against the oracle and the bound."""
    monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    frac = run_merge_unmerge(45, 70, 6, dtype, 1.5, 2, True, seed=3)
    assert frac < 1.0

# ---------------------------------------------------------------------------------------------
# Cycles, record size, capacity overflow
# ---------------------------------------------------------------------------------------------

@needs_cpu_lib
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_100_cycles_two_adapters_restore_bit_for_bit(dtype):
    n, k = 48, 80
    gen = torch.Generator().manual_seed(7)
    _, w = make_weight(n, k, dtype, 0, True, gen=gen)
    adapters = [factors(n, k, 8, dtype, gen=gen) + (2.0,), factors(n, k, 16, dtype, gen=gen) + (0.7,)]
    w0 = w.clone()
    merged_once = []
    for cycle in range(100):
        a, b, s = adapters[cycle % 2]
        rec = merge_(w, a, b, s, True)
        if cycle < 2:
            merged_once.append(w.clone())
        else:  # merging the same adapter into the same W gives the same bits every time
            assert_bits_equal(w, merged_once[cycle % 2], f"merge in cycle {cycle}")
        unmerge_(w, a, b, s, *rec)
        assert_bits_equal(w, w0, f"cycle {cycle}")


@needs_cpu_lib
def test_capacity_overflow_leaves_weight_unchanged():
    lib = native.cpu()
    n, k, r = 64, 96, 8
    _, w = make_weight(n, k, torch.bfloat16)
    a, b = factors(n, k, r, torch.bfloat16)
    w0 = w.clone()
    b32, a32, rb, cb, ab = _factors(w, a, b, 2.0)
    idx = torch.empty(4, dtype=torch.int32)
    val = torch.empty(4, dtype=torch.bfloat16)
    count = ctypes.c_int64(0)
    status = lib.lowrank_cpu_merge(_ptr(w), n, k, k, 2, _ptr(b32), _ptr(a32), r, _ptr(rb), _ptr(cb), ab, 2.0,
                                   _ptr(idx), _ptr(val), 4, ctypes.byref(count))
    assert status == native.ERR_CAPACITY
    assert count.value > 4
    assert_bits_equal(w, w0, "after a capacity overflow")
    rec = merge_(w.clone(), a, b, 2.0, True)
    assert rec[0].numel() == count.value


@needs_cpu_lib
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mag", [0.02, 0.3, 3.0])
@pytest.mark.parametrize("path", ["kept", "estimate"])
def test_record_capacity_covers_a_large_delta_in_one_pass(dtype, mag, path, monkeypatch):
    """One library call up to a delta 150x W's rms (the old fixed guess, 1/8 of the elements,
    overflowed past ~30% of W's rms, and an overflow costs an undo and a second merge), without
    touching torch's random state: a weight of at most twice the kept scratch's slots gets the
    scratch whole with no estimate ("kept": all 81,920 elements fit, so only the no-estimate check
    can fail there), a larger one (here: a kept scratch of 1,000 slots) a buffer sized from a
    sample of rows (_record_capacity, every estimate here above 1,000: a fresh buffer)."""
    from lowrank.ops import merge as merge_op

    if path == "estimate":
        monkeypatch.setattr(merge_op, "_kept_slots", lambda dtype: 1000)
        monkeypatch.setattr(merge_op, "_scratch", threading.local())
    n, k, r = 256, 320, 16
    gen = torch.Generator().manual_seed(5)
    _, w = make_weight(n, k, dtype, gen=gen)
    a, b = factors(n, k, r, dtype, mag=mag, gen=gen)
    w0 = w.clone()
    calls, estimates = [], []
    real, real_cap = merge_op._cpu_merge, merge_op._record_capacity
    monkeypatch.setattr(merge_op, "_cpu_merge", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(merge_op, "_record_capacity", lambda *args: estimates.append(1) or real_cap(*args))
    state = torch.get_rng_state()
    rec = merge_(w, a, b, 2.0, True)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(calls) == 1, f"{len(calls)} library calls for {rec[0].numel()} records of {w.numel()}"
    assert len(estimates) == (path == "estimate")
    unmerge_(w, a, b, 2.0, *rec)
    assert_bits_equal(w, w0, "after unmerge")


@needs_cpu_lib
@pytest.mark.parametrize("path", ["kept", "estimate"])
def test_record_capacity_short_estimate_retries(path, monkeypatch):
    """A capacity that falls short costs exactly a second call, never a wrong or partial merge:
    "kept", a kept scratch of half W's elements (no estimate) and a delta that needs a record for
    nearly every element; "estimate", a kept scratch of 4 slots and an estimate of 4."""
    from lowrank.ops import merge as merge_op

    n, k, r = 64, 96, 8
    _, w = make_weight(n, k, torch.float16)
    a, b = factors(n, k, r, torch.float16, mag=3.0 if path == "kept" else 0.3)
    ref = w.clone()
    ref_rec = merge_(ref, a, b, 2.0, True)
    slots = w.numel() // 2 if path == "kept" else 4
    assert ref_rec[0].numel() > slots
    monkeypatch.setattr(merge_op, "_kept_slots", lambda dtype: slots)
    monkeypatch.setattr(merge_op, "_scratch", threading.local())
    estimates, calls = [], []
    monkeypatch.setattr(merge_op, "_record_capacity", lambda *args: estimates.append(1) or 4)
    real = merge_op._cpu_merge
    monkeypatch.setattr(merge_op, "_cpu_merge", lambda *args: calls.append(1) or real(*args))
    w0 = w.clone()
    rec = merge_(w, a, b, 2.0, True)
    assert len(calls) == 2 and len(estimates) == (path == "estimate"), (calls, estimates)
    assert_bits_equal(w, ref, "merged after a retry")
    assert torch.equal(rec[0], ref_rec[0]) and torch.equal(rec[1].view(torch.int16), ref_rec[1].view(torch.int16))
    unmerge_(w, a, b, 2.0, *rec)
    assert_bits_equal(w, w0, "after unmerge")


@needs_cpu_lib
@pytest.mark.parametrize("fail_at", [0, 3, 20, 70, 90, 400])
def test_out_of_memory_mid_merge_leaves_the_weight_as_it_was(fail_at, monkeypatch):
    """An allocation that fails inside the library's exact merge (LOWRANK_TEST_OOM_AFTER=n fails
    the n-th: first the per-row record lists, reserved before a task writes W, then the spill
    pushes, after it has): the merge raises and leaves every bit of W as it was, whichever task
    and thread it hit; past the last allocation the merge succeeds and unmerges exactly. Records
    crowded into the first rows with a buffer of exactly their size, so the first share spills."""
    lib = native.cpu()
    n, k, r = 64, 512, 8
    gen = torch.Generator().manual_seed(5)
    _, w = make_weight(n, k, torch.float16, gen=gen)
    a, b = factors(n, k, r, torch.float16, mag=0.3, gen=gen)
    b[4:] = 0
    w0 = w.clone()
    ref_w = w.clone()
    ref_idx, ref_val = merge_(ref_w, a, b, 2.0, True)
    m = ref_idx.numel()
    assert m > 400  # enough spill pushes past the 64 reserves for every fail_at
    monkeypatch.setenv("LOWRANK_TEST_OOM_AFTER", str(fail_at))
    idx = torch.full((m,), -1, dtype=torch.int32)
    val = torch.zeros(m, dtype=torch.float16)
    count = ctypes.c_int64(0)
    status = _cpu_merge(lib, w, a, b, 2.0, (idx, val, count))
    assert status == native.ERR_OUT_OF_MEMORY
    assert_bits_equal(w, w0, f"after a failed allocation (#{fail_at})")
    monkeypatch.delenv("LOWRANK_TEST_OOM_AFTER")
    assert _cpu_merge(lib, w, a, b, 2.0, (idx, val, count)) == native.OK
    assert_bits_equal(w, ref_w, "merged after the failure")
    assert torch.equal(idx, ref_idx)
    unmerge_(w, a, b, 2.0, idx, val)
    assert_bits_equal(w, w0, "unmerged")


@needs_cpu_lib
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_records_crowded_into_one_threads_rows(dtype):
    """Each OpenMP thread writes its records into its share of the caller's buffer (capacity x
    t / threads on) and spills what does not fit: with every record in the first rows and a
    buffer of exactly the records' size, the first share overflows and the spill must come back
    in index order, the result identical to a merge with ample room."""
    lib = native.cpu()
    n, k, r = 64, 96, 8
    gen = torch.Generator().manual_seed(11)
    _, w = make_weight(n, k, dtype, gen=gen)
    a, b = factors(n, k, r, dtype, mag=0.3, gen=gen)
    b[8:] = 0  # rows 8.. unchanged by the merge: no record there
    w0 = w.clone()
    ref_w = w.clone()
    ref_idx, ref_val = merge_(ref_w, a, b, 2.0, True)
    m = ref_idx.numel()
    assert m > 8 and int(ref_idx.max()) < 8 * k
    idx = torch.full((m,), -1, dtype=torch.int32)
    val = torch.zeros(m, dtype=dtype)
    count = ctypes.c_int64(0)
    status = _cpu_merge(lib, w, a, b, 2.0, (idx, val, count))
    assert status == native.OK and count.value == m
    assert torch.equal(idx, ref_idx)
    assert_bits_equal(val, ref_val, "record values")
    assert_bits_equal(w, ref_w, "merged weight")
    unmerge_(w, a, b, 2.0, idx, val)
    assert_bits_equal(w, w0, "after unmerge")

@needs_cpu_lib
@pytest.mark.parametrize("fast", [False, True], ids=["certified", "fast"])
def test_unmerge_with_a_shuffled_record_on_a_padded_weight(fast):
    """The library's restore finds each record's row by a division only when the index leaves the
    current row (records come sorted); a record in any order, on rows with a stride beyond the
    row, is written back as well."""
    gen = torch.Generator().manual_seed(4)
    store, w = make_weight(37, 130, torch.float16, pad=5, gen=gen)
    a, b = factors(37, 130, 8, torch.float16, mag=0.3, gen=gen)
    orig = store.clone()
    idx, val = merge_(w, a, b, 2.0, True)
    assert idx.numel() > 100
    perm = torch.randperm(idx.numel(), generator=gen)
    unmerge_(w, a, b, 2.0, idx[perm], val[perm], fast=fast)
    assert_bits_equal(store, orig, "after unmerge with a shuffled record")


@needs_cpu_lib
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("k,r", [(130, 8), (700, 16)], ids=["whole-rows", "column-blocked"])
def test_fast_unmerge_writes_a_sorted_record_back_as_restore_does(k, r, dtype):
    """The fast CPU unmerge writes a strictly increasing record back tile by tile, in its own pass
    over W: for any such record (random indices, the first and last element included, and random
    values: not a merge's), the bits of the fast unmerge without a record followed by
    lowrank_cpu_restore, on a padded weight of several tasks (the last one short of a 4-row tile),
    in both visiting orders (700 columns at r = 16: A's panels over 32 KiB, column blocks)."""
    lib = native.cpu()
    gen = torch.Generator().manual_seed(7)
    store, w = make_weight(70, k, dtype, pad=3, gen=gen)
    a, b = factors(70, k, r, dtype, mag=0.3, gen=gen)
    n = w.numel()
    pick = torch.cat([torch.randperm(n, generator=gen)[: n // 7], torch.tensor([0, n - 1])])
    idx = torch.unique(pick).to(torch.int32)
    val = (torch.randn(idx.numel(), generator=gen) * 0.02).to(dtype)
    stores = {}
    for way in ("fused", "two-pass"):
        st_, wv = store.clone(), None
        wv = st_[:, :k]
        if way == "fused":
            status = _cpu_unmerge_fast(lib, wv, a, b, 1.5, idx, val, idx.numel())
        else:
            status = _cpu_unmerge_fast(lib, wv, a, b, 1.5, idx[:0], val[:0], 0)
            native.check(status, "unmerge")
            status = lib.lowrank_cpu_restore(_ptr(wv), 70, k, wv.stride(0), native.dtype_code(dtype), _ptr(idx),
                                             _ptr(val), idx.numel())
        native.check(status, way)
        stores[way] = st_
    assert_bits_equal(stores["fused"], stores["two-pass"], "fused write-back vs unmerge + restore")
    assert_bits_equal(stores["fused"][:, :k].flatten()[idx.long()], val, "the record's values in place")
    assert_bits_equal(stores["fused"][:, k:], store[:, k:], "row padding")


@pytest.mark.parametrize("fast", [False, True], ids=["certified", "fast"])
@pytest.mark.parametrize("bad", [-1, "numel"], ids=["negative", "past-the-end"])
def test_unmerge_with_a_record_of_another_weight_raises_and_leaves_weight_unchanged(fast, bad):
    """A record index outside the weight: ValueError naming the record, before anything is written
    (the fast CPU unmerge leaves the range check to the library, which checks before it writes)."""
    gen = torch.Generator().manual_seed(5)
    store, w = make_weight(40, 96, torch.bfloat16, pad=3, gen=gen)
    a, b = factors(40, 96, 8, torch.bfloat16, mag=0.3, gen=gen)
    idx, val = merge_(w, a, b, 2.0, True)
    assert idx.numel() > 10
    idx = idx.clone()
    idx[idx.numel() // 2] = -1 if bad == -1 else w.numel()
    before = store.clone()
    with pytest.raises(ValueError, match="not this weight's record"):
        unmerge_(w, a, b, 2.0, idx, val, fast=fast)
    assert_bits_equal(store, before, "after a rejected unmerge")


@needs_cpu_lib
@pytest.mark.parametrize("threads", [1, 2])
def test_restore_of_a_large_record_in_threads_and_with_repeats(threads):
    """lowrank_cpu_restore writes a strictly increasing record (every record merge_ makes) with all
    threads, each a contiguous share, when it holds 65536 entries or more; any other record serially,
    in its order (a repeated index: the last value wins). Both on rows padded beyond their length."""
    gen = torch.Generator().manual_seed(11)
    lib = native.cpu()
    rows, cols, pad = 400, 700, 9
    store = torch.randn(rows, cols + pad, generator=gen).half()
    w = store[:, :cols]

    def restore(idx, val):
        out = store.clone()
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            status = lib.lowrank_cpu_restore(_ptr(out), rows, cols, cols + pad, native.dtype_code(out.dtype), _ptr(idx),
                                             _ptr(val), idx.numel())
        finally:
            torch.set_num_threads(old)
        assert status == 0
        return out

    def expected(*parts):
        out = store.clone()
        for idx, val in parts:  # each part's indices are distinct: index_put_ is deterministic
            r, c = (idx.long() // cols), (idx.long() % cols)
            out[r, c] = val
        return out

    n = w.numel()
    pick = torch.randperm(n, generator=gen)[:150_000].sort().values.int()
    val = torch.randn(pick.numel(), generator=gen).half()
    assert_bits_equal(restore(pick, val), expected((pick, val)), "increasing record")
    # two increasing records one after the other (overlapping indices, other values): not increasing
    # as a whole, so written in order, and the second one's value wins where both hold an index
    pick2 = torch.randperm(n, generator=gen)[:90_000].sort().values.int()
    val2 = torch.randn(pick2.numel(), generator=gen).half()
    assert int(torch.isin(pick2, pick).sum()) > 10_000
    both_idx, both_val = torch.cat([pick, pick2]), torch.cat([val, val2])
    assert_bits_equal(restore(both_idx, both_val), expected((pick, val), (pick2, val2)), "record with repeats")
    # the padding columns are never written
    assert_bits_equal(restore(pick, val)[:, cols:], store[:, cols:], "padding")


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error and W unchanged
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    w = torch.randn(16, 24).bfloat16()
    a = torch.randn(4, 24).bfloat16() * 0.1
    b = torch.randn(16, 4).bfloat16() * 0.1
    return [
        ("lora_A shape", w, torch.randn(4, 23).bfloat16(), b, 1.0, ValueError, "lora_A"),
        ("lora_B shape", w, a, torch.randn(15, 4).bfloat16(), 1.0, ValueError, "lora_B"),
        ("rank mismatch", w, a, torch.randn(16, 5).bfloat16(), 1.0, ValueError, "one r"),
        ("factor dtypes", w, a, b.half(), 1.0, TypeError, "share a dtype"),
        ("float64 weight", w.double(), a, b, 1.0, TypeError, "float64"),
        ("int weight", w.to(torch.int8), a, b, 1.0, TypeError, "int8"),
        ("device", w, a.to("meta"), b, 1.0, ValueError, "one device"),
        ("non-contiguous rows", torch.randn(24, 16).bfloat16().t(), a, b, 1.0, ValueError, "contiguous"),
        ("NaN factor", w, a.clone().fill_(math.nan), b, 1.0, ValueError, "NaN"),
        ("Inf scaling", w, a, b, math.inf, ValueError, "scaling"),
        ("rank 0", w, torch.randn(0, 24).bfloat16(), torch.randn(16, 0).bfloat16(), 1.0, ValueError, "rank 0"),
        ("3-D weight", w[None], a, b, 1.0, ValueError, "2-D"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_and_leave_weight_unchanged(case):
    _, w, a, b, s, exc, match = case
    w0 = w.clone()
    with pytest.raises(exc, match=match):
        merge_(w, a, b, s, True)
    with pytest.raises(exc, match=match):
        unmerge_(w, a, b, s)
    assert torch.equal(bits(w) if w.dtype.is_floating_point else w, bits(w0) if w.dtype.is_floating_point else w0)


def test_bad_record_raises_and_leaves_weight_unchanged():
    w = torch.randn(8, 8).bfloat16()
    a, b = factors(8, 8, 2, torch.bfloat16)
    w0 = w.clone()
    for idx, val, exc in [(torch.tensor([0, 64], dtype=torch.int32), torch.zeros(2, dtype=torch.bfloat16), ValueError),
                          (torch.tensor([0], dtype=torch.int64), torch.zeros(1, dtype=torch.bfloat16), TypeError),
                          (torch.tensor([0], dtype=torch.int32), torch.zeros(1, dtype=torch.float16), TypeError)]:
        for fast in (False, True):
            with pytest.raises(exc):
                unmerge_(w, a, b, 1.0, idx, val, fast=fast)
            assert_bits_equal(w, w0, "after a bad record")

# ---------------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------------

def test_ops_namespace():
    assert lowrank.ops.merge_ is merge_ and lowrank.ops.unmerge_ is unmerge_
    assert torch.ops.lowrank.merge_.default is not None and torch.ops.lowrank.unmerge_.default is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck(dtype):
    w = (torch.randn(20, 36) * 0.02).to(dtype)
    a, b = factors(20, 36, 4, dtype)
    torch.library.opcheck(torch.ops.lowrank.merge_.default, (w.clone(), a, b, 2.0, True))
    torch.library.opcheck(torch.ops.lowrank.merge_.default, (w.clone(), a, b, 2.0, False))
    rec = merge_(w, a, b, 2.0, True)
    torch.library.opcheck(torch.ops.lowrank.unmerge_.default, (w.clone(), a, b, 2.0, *rec))
    torch.library.opcheck(torch.ops.lowrank.unmerge_.default, (w.clone(), a, b, 2.0, *rec, True))
    torch.library.opcheck(torch.ops.lowrank.unmerge_.default, (w.clone(), a, b, 2.0, None, None))

# ---------------------------------------------------------------------------------------------
# The CUDA library: built and loadable here, run on the GPU machine
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("LOWRANK_NO_CUDA") == "1",
                    reason="nvcc not on PATH: setup.py skips the CUDA build")
def test_cuda_library_built_for_sm80_sm90_and_validates_arguments():
    lib = native.cuda(warn=False)
    assert lib is not None, "liblowrank_cuda.so missing or not loadable"
    info = native.info()["cuda"]
    assert "sm_80" in info and "sm_90" in info, info
    # argument checks run before any CUDA call: they work without a driver
    args = dict(w=ctypes.c_void_p(16), rows=4, cols=4, ldw=4, dtype=2, b=ctypes.c_void_p(16), a=ctypes.c_void_p(16),
                rank=1, rb=ctypes.c_void_p(16), cb=ctypes.c_void_p(16), ab=0.0, s=1.0)
    for change, status in [({"rank": 0}, native.ERR_INVALID_ARGUMENT), ({"rank": 257}, native.ERR_INVALID_ARGUMENT),
                           ({"ldw": 3}, native.ERR_INVALID_ARGUMENT), ({"dtype": 7}, native.ERR_UNSUPPORTED_DTYPE),
                           ({"s": math.nan}, native.ERR_INVALID_ARGUMENT)]:
        kw = {**args, **change}
        got = lib.lowrank_cuda_merge(*kw.values(), None, None, 0, None, None)
        assert got == status, (change, got)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (97, 59, 16), (256, 512, 64), (333, 1000, 256), (4096, 4104, 16)],
                         ids=str)
def test_cuda_merge_matches_cpu_library_bit_for_bit(shape, dtype):
    n, k, r = shape
    gen = torch.Generator().manual_seed(n + k + r)
    store, w = make_weight(n, k, dtype, pad=8, specials=True, gen=gen)
    a, b = factors(n, k, r, dtype, gen=gen)
    w_cpu = w.clone()
    rec_cpu = merge_(w_cpu, a, b, 1.7, True)
    store_gpu = store.cuda()
    w_gpu = store_gpu[:, :k]
    rec_gpu = merge_(w_gpu, a.cuda(), b.cuda(), 1.7, True)
    assert_bits_equal(w_gpu.cpu(), w_cpu, "CUDA vs CPU merge", nan_payload=False)
    assert covers(rec_cpu, tuple(t.cpu() for t in rec_gpu)), "the CPU record misses an entry of the CUDA one"
    unmerge_(w_gpu, a.cuda(), b.cuda(), 1.7, *rec_gpu)
    assert_bits_equal(store_gpu.cpu(), store, "CUDA unmerge")


@pytest.mark.gpu
def test_cuda_record_in_row_blocks_and_merged_layer_moved_to_gpu(monkeypatch):
    """The exact CUDA merge launches on blocks of rows with one reused scratch buffer (forced
    small here: 7 blocks); and a layer merged on the CPU, then moved with .cuda(), unmerges
    bit-exactly there (its record follows the weight)."""
    merge_mod = importlib.import_module("lowrank.ops.merge")

    n, k, r = 200, 136, 16
    gen = torch.Generator().manual_seed(5)
    _, w = make_weight(n, k, torch.bfloat16, specials=True, gen=gen)
    a, b = factors(n, k, r, torch.bfloat16, mag=0.2, gen=gen)
    w_cpu = w.clone()
    rec_cpu = merge_(w_cpu, a, b, 1.5, True)
    monkeypatch.setattr(merge_mod, "_CUDA_RECORD_CHUNK", 30 * k + 5)
    w_gpu = w.cuda()
    rec_gpu = merge_(w_gpu, a.cuda(), b.cuda(), 1.5, True)
    assert_bits_equal(w_gpu.cpu(), w_cpu, "CUDA (row blocks) vs CPU merge", nan_payload=False)
    assert covers(rec_cpu, tuple(t.cpu() for t in rec_gpu)), "the CPU record misses an entry of the CUDA one"

    layer = lowrank.LoRALinear(nn.Linear(k, n, bias=False).to(torch.bfloat16))
    layer.add_adapter(lowrank.LoRAConfig(rank=r, alpha=2 * r))
    with torch.no_grad():
        layer.base_layer.weight.copy_(w)
        layer.lora_A["default"].copy_(a)
        layer.lora_B["default"].copy_(b)
    lowrank.merge(layer)
    layer.cuda()
    lowrank.unmerge(layer)
    assert_bits_equal(layer.base_layer.weight.detach().cpu(), w, "unmerged on the GPU")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ranks_above_the_library_limit_merge_on_the_torch_path(dtype):
    """One rank limit for the library: every rank that patches merges. Above the native entry
    points' 256 the pure-torch path runs, with the same one-rounding result and exact unmerge.
    (Rank 257 used to patch and train, then raise at merge.)"""
    run_merge_unmerge(40, 300, 300, dtype, 0.5, 0, True, seed=257)


@pytest.mark.parametrize("backend", [pytest.param("library", marks=needs_cpu_lib), "fallback"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_a_merge_that_would_overflow_is_refused_before_writing(dtype, backend, monkeypatch):
    """A finite weight whose merge would round to Inf (fp16 near 65504, an extreme scaling): refused,
    naming the element, with the weight unchanged; the same weights with a sane scaling merge.
    (The merge used to write Inf.)"""
    if backend == "fallback":
        monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    big = torch.finfo(dtype).max / 2
    w = torch.full((6, 8), big, dtype=dtype)
    w[2, 3] = -big
    a, b = torch.ones(2, 8, dtype=dtype), torch.ones(6, 2, dtype=dtype)
    w0 = w.clone()
    with pytest.raises(ValueError, match=r"would overflow .* at \(0, 0\).*nothing was written"):
        merge_(w, a, b, big, True)
    assert_bits_equal(w, w0, "after a refused merge")
    with pytest.raises(ValueError, match=r"would overflow .* at \(2, 3\)"):
        unmerge_(w, a, b, big)
    assert_bits_equal(w, w0, "after a refused unmerge")
    rec = merge_(w, a, b, 1.0, True)
    unmerge_(w, a, b, 1.0, *rec)
    assert_bits_equal(w, w0, "a sane scaling")


@needs_cpu_lib
def test_avx2_rank_loop_gives_the_avx512_bits(tmp_path):
    """The fp32 rank loop has an AVX-512 kernel and an AVX2 one (LOWRANK_NO_AVX512=1, read at load,
    picks the latter in a fresh process): both run the same fma sequence per element, so the merged bits
    are the same, for every dtype and a column count that ends inside a panel; and the fast unmerge,
    which relies on that sequence, restores W in either process from a record the other one made
    (the records themselves differ: AVX2 certifies with the looser Cauchy-Schwarz bound)."""
    import subprocess
    import sys

    script = tmp_path / "merge_bits.py"
    script.write_text(
        "import sys, torch\n"
        "from lowrank.ops.merge import merge_, unmerge_\n"
        "def inputs(dt):\n"
        "    g = torch.Generator().manual_seed(3)\n"
        "    w = (torch.randn(37, 300, generator=g) * 0.02).to(dt)\n"
        "    a = (torch.randn(24, 300, generator=g) * 0.05).to(dt)\n"
        "    b = (torch.randn(37, 24, generator=g) * 0.05).to(dt)\n"
        "    return w, a, b\n"
        "out = {}\n"
        "other = torch.load(sys.argv[2]) if len(sys.argv) > 2 else {}\n"
        "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    w, a, b = inputs(dt)\n"
        "    w0 = w.clone()\n"
        "    idx, val = merge_(w, a, b, 1.7, True)\n"
        "    back = None\n"
        "    if str(dt) in other:\n"
        "        back, oidx, oval = (t.clone() for t in other[str(dt)])\n"
        "        unmerge_(back, a, b, 1.7, oidx, oval, fast=True)\n"
        "    out[str(dt)] = (w, idx, val, w0, back)\n"
        "torch.save(out, sys.argv[1])\n")
    # (environment, whose record to unmerge); the bf16 pair loop, which has bits of its own, off
    # (test_pair_loop_records_need_their_own_fast_unmerge)
    fp32_loop = {"LOWRANK_NO_BF16_DOT": "1"}
    runs = [(fp32_loop, None), ({"LOWRANK_NO_AVX512": "1"}, 0), (fp32_loop, 1)]
    results = []
    for i, (env, other) in enumerate(runs):
        path = tmp_path / f"out{i}.pt"
        if other is not None:
            torch.save({dt: v[:3] for dt, v in results[other].items()}, tmp_path / "other.pt")
        args = [sys.executable, str(script), str(path)] + ([str(tmp_path / "other.pt")] if other is not None else [])
        subprocess.run(args, check=True, env={**os.environ, **env})
        results.append(torch.load(path))
    for dt, (w, idx, val, w0, _) in results[0].items():
        w2, idx2, val2, _, back2 = results[1][dt]
        back3 = results[2][dt][4]
        assert_bits_equal(w, w2, f"{dt} merged weight")
        assert_bits_equal(back2, w0, f"{dt} AVX-512 record, fast unmerge on AVX2")
        assert_bits_equal(back3, w0, f"{dt} AVX2 record, fast unmerge on AVX-512")
        assert idx.numel() > 0 and idx2.numel() > 0
