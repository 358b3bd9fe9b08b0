"""The mixed-adapter op (lowrank/ops/sgmv.py, lowrank/kernels/sgmv.py): reference path and the Triton
kernels (interpreter on CPU) against float64, each row held to its own magnitude."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.backend import triton_available
from lowrank.ops import sgmv as S
from tests.helpers import DTYPE_IDS, DTYPES, assert_close, assert_close_rows, poison_
from tests.oracles import sgmv_f64, sgmv_grads_f64

BACKENDS = ["reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton" and not triton_available():
        pytest.skip("Triton is not installed")
    monkeypatch.setenv("LOWRANK_BACKEND", request.param)
    return request.param


def make(m, k, n, ranks, dtype, base_rows=True, device="cpu", grad=False):
    x = torch.randn(m, k, dtype=dtype, device=device)
    out = torch.randn(m, n, dtype=dtype, device=device)
    lo = -1 if base_rows else 0
    ids = torch.randint(lo, len(ranks), (m,), device=device)
    As = [(torch.randn(r, k, device=device) / k ** 0.5).to(dtype) for r in ranks]
    Bs = [torch.randn(n, r, dtype=dtype, device=device) for r in ranks]
    scal = [0.5 + i for i in range(len(ranks))]
    if grad:
        for t in [x, out, *As, *Bs]:
            t.requires_grad_(True)
    return x, out, ids, As, Bs, scal


def plain_same_dtype(x, out, ids, As, Bs, scal):
    """The same maths by plain torch in the input dtype, row by row (the tolerance baseline)."""
    y = out.detach().clone()
    for i, (a, b, s) in enumerate(zip(As, Bs, scal)):
        rows = ids == i
        y[rows] = y[rows] + s * ((x.detach()[rows] @ a.detach().t()) @ b.detach().t())
    return y


def grads_same_dtype(dy, x, ids, As, Bs, scal):
    xs = x.detach().clone().requires_grad_(True)
    a2 = [a.detach().clone().requires_grad_(True) for a in As]
    b2 = [b.detach().clone().requires_grad_(True) for b in Bs]
    y = torch.zeros_like(dy)
    for i, (a, b, s) in enumerate(zip(a2, b2, scal)):
        sel = (ids == i).to(dy.dtype)[:, None]
        y = y + sel * (s * ((xs @ a.t()) @ b.t()))
    y.backward(dy)
    return xs.grad, [a.grad for a in a2], [b.grad for b in b2]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_ranks_4_8_64_with_base_rows(backend, dtype):
    x, out, ids, As, Bs, scal = make(83, 45, 37, [4, 8, 64], dtype)
    ids[:6] = torch.tensor([0, 1, 2, -1, 7, -5])  # 7 and -5 are out of range: the base model
    y = S.sgmv(x, out, ids, As, Bs, scal)
    ref = sgmv_f64(x, out, ids, As, Bs, scal)
    assert_close_rows(y, ref, plain_same_dtype(x, out, ids, As, Bs, scal))
    base = (ids < 0) | (ids >= 3)
    assert torch.equal(y[base], out[base]), "base rows must be the base output, untouched"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradients_only_into_used_adapters(backend, dtype):
    ranks = [4, 8, 64, 5]
    x, out, ids, As, Bs, scal = make(51, 33, 29, ranks, dtype, grad=True)
    ids[ids == 3] = -1  # adapter 3 unused
    y = S.sgmv(x, out, ids, As, Bs, scal)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx64, da64, db64 = sgmv_grads_f64(dy, x, ids, As, Bs, scal)
    dxb, dab, dbb = grads_same_dtype(dy, x, ids, As, Bs, scal)
    # dx of the whole op = LoRA part (checked) ; d out = dy exactly.
    assert torch.equal(out.grad, dy)
    assert_close_rows(x.grad, dx64, dxb, name="dx")
    for i in range(3):
        assert_close(As[i].grad, da64[i], dab[i], name=f"dA[{i}]")
        assert_close(Bs[i].grad, db64[i], dbb[i], name=f"dB[{i}]")
    assert As[3].grad is None or not As[3].grad.any()
    assert Bs[3].grad is None or not Bs[3].grad.any()


@settings(max_examples=12)
@given(m=st.integers(1, 70), k=st.integers(1, 50), n=st.integers(1, 50),
       ranks=st.lists(st.integers(1, 40), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_kernel_random_shapes(m, k, n, ranks, seed):
    torch.manual_seed(seed)
    x, out, ids, As, Bs, scal = make(m, k, n, ranks, torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWRANK_BACKEND", "triton")
        y = S.sgmv(x, out, ids, As, Bs, scal)
    assert_close_rows(y, sgmv_f64(x, out, ids, As, Bs, scal), plain_same_dtype(x, out, ids, As, Bs, scal))


@settings(max_examples=40)
@given(m=st.integers(0, 300), n=st.integers(1, 9), block=st.sampled_from([1, 16, 64]), seed=st.integers(0, 999))
def test_segment_metadata_covers_every_token_once(m, n, block, seed):
    from lowrank.kernels.sgmv import segment_metadata

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, n, (m,), generator=g)
    ids[ids == n - 1] = n + 3  # out of range: must count as base
    meta = segment_metadata(ids, n, block)
    seen = []
    for t in range(meta["max_tiles"]):
        seg = int(meta["tile_seg"][t])
        if seg > n:
            continue
        m0, start, count = int(meta["tile_m0"][t]), int(meta["seg_start"][seg]), int(meta["seg_len"][seg])
        assert 0 <= m0 < count
        for p in range(m0, min(m0 + block, count)):
            tok = int(meta["order"][start + p])
            want = int(ids[tok]) + 1 if 0 <= int(ids[tok]) < n else 0
            assert want == seg
            seen.append(tok)
    assert sorted(seen) == list(range(m)), "every token in exactly one tile"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernels_write_every_element(dtype):
    """Poisoned T and weight-gradient buffers: each element the kernels own must be written."""
    from lowrank.kernels import sgmv as K

    if not triton_available():
        pytest.skip("Triton is not installed")
    ranks = [4, 8, 64]
    x, out, ids, As, Bs, scal = make(40, 24, 19, ranks, dtype)
    tables = S._tables(As, scal, x.device)
    a_tab, bt_tab = K.weight_table(As, x.device), K.weight_table([b.t() for b in Bs], x.device)
    meta = K.segment_metadata(ids, len(ranks), K._blocks(x.device)["BLOCK_M"])
    t = poison_(torch.empty(40, 64, dtype=torch.float32))
    K.shrink(x, a_tab, t, meta, tables, 64, scaled=False)
    order = meta["order"]
    for i, r in enumerate(ranks):
        s0, c = int(meta["seg_start"][i + 1]), int(meta["seg_len"][i + 1])
        rows = order[s0:s0 + c]
        ref = x[rows].double() @ As[i].double().t()
        assert_close(t[s0:s0 + c, :r], ref, (x[rows] @ As[i].t()).float(), name=f"T[{i}]")
    y = poison_(torch.empty_like(out))
    K.expand(t, bt_tab, out, y, meta, tables, scaled=True)
    assert_close_rows(y, sgmv_f64(x, out, ids, As, Bs, scal), plain_same_dtype(x, out, ids, As, Bs, scal), name="y")
    y0 = poison_(torch.empty_like(out))
    K.expand(t, bt_tab, None, y0, meta, tables, scaled=True)
    assert_close_rows(y0, sgmv_f64(x, torch.zeros_like(out), ids, As, Bs, scal),
                      plain_same_dtype(x, torch.zeros_like(out), ids, As, Bs, scal), name="y without src")
    dy = torch.randn(40, 19, dtype=dtype)
    dbt = poison_(torch.empty(sum(ranks), 19, dtype=dtype))
    K.wgrad(t, dy, dbt, meta, tables, 64, scaled=True)
    _, _, db64 = sgmv_grads_f64(dy, x, ids, As, Bs, scal)
    _, _, dbb = grads_same_dtype(dy, x, ids, As, Bs, scal)
    for i, d in enumerate(torch.split(dbt, ranks, 0)):
        assert_close(d.t(), db64[i], dbb[i], name=f"dB[{i}]")


@pytest.mark.parametrize("split", [1, 2, 3, 9])
def test_wgrad_split_over_rows(split):
    """The weight gradient with each segment's rows cut into `split` parts (fp32 partial sums): every
    element written (poisoned output), equal to float64 for dA and dB, also when parts outnumber a
    segment's tiles (9 parts of <= 3 tiles) and for an adapter no token uses."""
    from lowrank.kernels import sgmv as K

    if not triton_available():
        pytest.skip("Triton is not installed")
    ranks = [4, 20, 6]
    x, out, ids, As, Bs, scal = make(45, 24, 19, ranks, torch.bfloat16)
    ids[ids == 2] = 0  # adapter 2 unused
    tables = S._tables(As, scal, x.device)
    a_tab, bt_tab = K.weight_table(As, x.device), K.weight_table([b.t() for b in Bs], x.device)
    meta = K.segment_metadata(ids, len(ranks), K._blocks(x.device)["BLOCK_M"])
    dy = torch.randn(45, 19, dtype=torch.bfloat16)
    t = torch.empty(45, 20, dtype=torch.float32)
    K.shrink(x, a_tab, t, meta, tables, 20, scaled=False)
    dt = torch.empty_like(t)
    K.shrink(dy, bt_tab, dt, meta, tables, 20, scaled=True)
    da = poison_(torch.empty(sum(ranks), 24, dtype=torch.bfloat16))
    K.wgrad(dt, x, da, meta, tables, 20, scaled=False, split=split)
    dbt = poison_(torch.empty(sum(ranks), 19, dtype=torch.bfloat16))
    K.wgrad(t, dy, dbt, meta, tables, 20, scaled=True, split=split)
    _, da64, db64 = sgmv_grads_f64(dy, x, ids, As, Bs, scal)
    _, dab, dbb = grads_same_dtype(dy, x, ids, As, Bs, scal)
    for i, (a, d) in enumerate(zip(torch.split(da, ranks, 0), torch.split(dbt, ranks, 0))):
        assert_close(a, da64[i], dab[i], name=f"dA[{i}] split={split}")
        assert_close(d.t(), db64[i], dbb[i], name=f"dB[{i}] split={split}")
    assert not da[-6:].any() and not dbt[-6:].any(), "the unused adapter's gradient must be exactly 0"


def test_float64_runs_the_reference_path_on_every_backend(backend):
    """float64 (a model's double() copy as a test oracle) goes to the reference path even under
    LOWRANK_BACKEND=triton: the kernels accumulate in fp32 and tl.dot has no float64 form."""
    x, out, ids, As, Bs, scal = make(9, 16, 12, [2, 4], torch.float64, grad=True)
    y = S.sgmv(x, out, ids, As, Bs, scal)
    ref = S.reference_forward(x.detach(), out.detach(), ids, [a.detach() for a in As], [b.detach() for b in Bs],
                              scal)
    assert y.dtype == torch.float64 and torch.equal(y.detach(), ref)
    y.sum().backward()
    assert all(a.grad is not None and a.grad.dtype == torch.float64 for a in As)


def test_errors():
    x, out, ids, As, Bs, scal = make(8, 6, 5, [2, 3], torch.float32)
    with pytest.raises(ValueError, match="same number of rows"):
        S.sgmv(x, out, ids[:7], As, Bs, scal)
    with pytest.raises(ValueError, match="adapter 1"):
        S.sgmv(x, out, ids, As, [Bs[0], Bs[0]], scal)
    with pytest.raises(TypeError, match="adapter 0"):
        S.sgmv(x, out, ids, [As[0].half(), As[1]], Bs, scal)
    with pytest.raises(ValueError, match="as many A, B and scalings"):
        S.sgmv(x, out, ids, As, Bs, scal[:1])
    with pytest.raises(TypeError, match="int32 or int64"):
        S.sgmv(x, out, ids.float(), As, Bs, scal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_kernel_matches_reference(dtype):
    ranks = [8, 16, 64, 32]
    x, out, ids, As, Bs, scal = make(1031, 512, 768, ranks, dtype, device="cuda", grad=True)
    y = S.sgmv(x, out, ids, As, Bs, scal)
    assert_close_rows(y, sgmv_f64(x, out, ids, As, Bs, scal), plain_same_dtype(x, out, ids, As, Bs, scal))
    dy = torch.randn_like(y)
    y.backward(dy)
    dx64, da64, db64 = sgmv_grads_f64(dy, x, ids, As, Bs, scal)
    dxb, dab, dbb = grads_same_dtype(dy, x, ids, As, Bs, scal)
    assert_close_rows(x.grad, dx64, dxb, name="dx")
    for i in range(len(ranks)):
        assert_close(As[i].grad, da64[i], dab[i], name=f"dA[{i}]")
        assert_close(Bs[i].grad, db64[i], dbb[i], name=f"dB[{i}]")


@pytest.mark.gpu
def test_cuda_graph_capture():
    """Metadata is built on the device: a captured mixed-adapter forward replays with new ids."""
    x, out, ids, As, Bs, scal = make(300, 256, 256, [8, 64], torch.bfloat16, device="cuda")
    S.sgmv(x, out, ids, As, Bs, scal)  # warm-up: compiles the kernels and caches the tables
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        S.sgmv(x, out, ids, As, Bs, scal)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = S.sgmv(x, out, ids, As, Bs, scal)
    ids.copy_(torch.randint(-1, 2, ids.shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rows(y, sgmv_f64(x, out, ids, As, Bs, scal), plain_same_dtype(x, out, ids, As, Bs, scal))


# Compiling these kernels for sm_90a / sm_80 without a GPU: tests/test_static.py (bench.static).
