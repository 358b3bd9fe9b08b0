"""Property tests of lowrank.ops.dora_linear and its row norms (lowrank/ops/dora.py) against float64
references that DO build the dense matrix W + s B A; and the proof that the op itself never does."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank.ops.dora as dora_mod
from lowrank.ops.dora import dora_linear, dora_row_norms
from tests.helpers import assert_close, saved_for_backward

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ODD = st.sampled_from([1, 7, 59, 123])


def dense_norms_f64(w, a, b, s):
    """The reference: the dense float64 matrix W + s B A and its row norms."""
    return (w.double() + s * (b.double() @ a.double())).norm(dim=1)


def dora_f64(x, w, a, b, m, s, bias, mask=None):
    """peft's DoRA in float64 with the dense matrix: the norm detached; with a dropout mask, peft's
    dropout formula (x W^T + bias + (scale - 1) h W^T + scale s h A^T B^T)."""
    x, w, a, b, m = (t.double() for t in (x, w, a, b, m))
    scale = m / dense_norms_f64(w, a, b, s).detach()
    if mask is None:
        y = scale * (x @ w.t() + s * (x @ a.t()) @ b.t())
        return y if bias is None else y + bias.double()
    h = x * mask.double()
    y = x @ w.t() + (scale - 1) * (h @ w.t()) + scale * (s * (h @ a.t()) @ b.t())
    return y if bias is None else y + bias.double()


def dora_same_dtype(x, w, a, b, m, s, bias, mask=None):
    """The same computation by plain torch in the low dtype, dense norm as peft takes it (peft's
    formula, with h = x or the dropped-out x): the tolerance baseline."""
    wn = torch.linalg.norm(w + s * (b @ a), dim=1).to(w.dtype).detach()
    scale = m / wn
    h = x if mask is None else x * mask
    y = (scale - 1) * (h @ w.t()) + scale * (s * (h @ a.t()) @ b.t()) + x @ w.t()
    return y if bias is None else y + bias


@st.composite
def problems(draw):
    return dict(lead=draw(st.sampled_from([(), (1,), (5,), (2, 3)])), k=draw(st.one_of(ODD, st.integers(1, 90))),
                n=draw(st.one_of(ODD, st.integers(1, 90))), r=draw(st.integers(1, 24)),
                dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                scaling=draw(st.sampled_from([0.5, 2.0, 1.0 / 3.0])), seed=draw(st.integers(0, 2**16)))


def check(out, ref64, baseline, factor=2.0, name="output"):
    """assert_close; for float64 inputs, where the reference is no wider than the op, a relative
    tolerance of 1e-9 of the largest element (cancelling rows make both differ in the last digits)."""
    if out.dtype == torch.float64:
        assert torch.isfinite(out).all() and out.shape == ref64.shape, name
        tol = 1e-9 * max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
        assert (out - ref64).abs().max().item() <= tol if out.numel() else True, name
        return
    if baseline is not None:  # peft's own formula NaNs where a 16-bit norm rounds to 0: no baseline there
        baseline = torch.where(torch.isfinite(baseline), baseline, ref64.to(baseline.dtype))
    assert_close(out, ref64, baseline, factor, name)


def _tensors(p):
    g = torch.Generator().manual_seed(p["seed"])
    dt = p["dtype"]
    w = (torch.randn(p["n"], p["k"], generator=g) / p["k"] ** 0.5).to(dt)
    a = (torch.randn(p["r"], p["k"], generator=g) / p["k"] ** 0.5).to(dt)
    b = (0.3 * torch.randn(p["n"], p["r"], generator=g)).to(dt)
    # m near ||W + s B A|| (scales near 1, as in training: m starts at ||W|| with B = 0); rows whose
    # norm is a cancellation are the subject of their own tests below.
    m = (dense_norms_f64(w, a, b, p["scaling"]) * (1 + 0.2 * torch.randn(p["n"], generator=g,
                                                                         dtype=torch.float64))).to(dt)
    bias = torch.randn(p["n"], generator=g).to(dt) if p["bias"] else None
    x = torch.randn(*p["lead"], p["k"], generator=g).to(dt)
    return x, w, a, b, m, bias


@given(problems())
def test_row_norms_match_the_dense_float64_norms(p):
    _, w, a, b, _, _ = _tensors(p)
    got = dora_row_norms(w, a, b, p["scaling"])
    ref = dense_norms_f64(w, a, b, p["scaling"])
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    # Bound on the terms' size; the dense float64 reference is itself off by ~(K + r) 2^-53 of it.
    w64, a64, b64 = w.double(), a.double(), b.double()
    mag = w64.norm(dim=1) + abs(p["scaling"]) * (b64.abs() @ a64.norm(dim=1))
    ref_err = 4 * (p["k"] + p["r"]) * 2.0 ** -53 * mag
    err = (got - ref).abs()
    assert (err <= 2.0 ** -27 * ref + ref_err).all(), err.max()  # the stated guarantee
    # Elsewhere float64's own error, amplified by any cancellation (M_i / n_i^2).
    tight = ref > 0
    bound = (p["k"] + p["r"] + 1) * 2.0 ** -50 * mag[tight].square() / ref[tight]
    assert (err[tight] <= bound).all(), (err[tight] / bound).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0])
def test_row_norms_on_a_layer_sized_problem(dtype, delta):
    """A 1024 x 1024 layer, r = 16, s B A of `delta` times W's rms: every norm within 1e-12 of the
    dense float64 one, and no row needs the direct recompute."""
    g = torch.Generator().manual_seed(7)
    n = k = 1024
    r = 16
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    b = (delta / (2.0 * r ** 0.5) * torch.randn(n, r, generator=g)).to(dtype)  # rms(2 B A) ~ delta rms(W)
    got, recomputed = dora_row_norms(w, a, b, 2.0, return_recomputed=True)
    ref = dense_norms_f64(w, a, b, 2.0)
    rel = ((got - ref).abs() / ref).max().item()
    assert rel < 1e-12, rel
    assert recomputed.numel() == 0, recomputed.numel()


@given(problems())
def test_forward_matches_float64(p):
    x, w, a, b, m, bias = _tensors(p)
    out = dora_linear(x, w, a, b, m, p["scaling"], bias)
    ref = dora_f64(x, w, a, b, m, p["scaling"], bias)
    assert out.dtype == p["dtype"] and out.shape == (*p["lead"], p["n"])
    check(out, ref, dora_same_dtype(x, w, a, b, m, p["scaling"], bias))


@given(problems(), st.sampled_from([0.0, 0.25]))
def test_gradients_match_float64(p, dropout):
    x, w, a, b, m, bias = _tensors(p)
    s = p["scaling"]
    x, a, b, m = (t.detach().requires_grad_() for t in (x, a, b, m))
    dy = torch.randn(*p["lead"], p["n"], generator=torch.Generator().manual_seed(p["seed"] + 1)).to(p["dtype"])
    torch.manual_seed(p["seed"])
    out = dora_linear(x, w, a, b, m, s, bias, dropout=dropout)
    out.backward(dy)
    mask = None
    if dropout:
        torch.manual_seed(p["seed"])
        mask = F.dropout(torch.ones_like(x), dropout, training=True)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b, m)]
    ref = dora_f64(leaves[0], w, leaves[1], leaves[2], leaves[3], s, bias, mask)
    check(out, ref.detach(), dora_same_dtype(x, w, a, b, m, s, bias, mask))
    ref.backward(dy.double())
    low = [t.detach().clone().requires_grad_() for t in (x, a, b, m)]
    dora_same_dtype(low[0], w, low[1], low[2], low[3], s, bias, mask).backward(dy)
    sizes = abs_grads(x, w, a, b, m, s, mask, dy)
    for name, got, leaf, base, size in zip(("dX", "dA", "dB", "dm"), (x, a, b, m), leaves, low, sizes):
        assert torch.isfinite(got.grad).all(), name
        if p["dtype"] == torch.float64:
            check(got.grad, leaf.grad, base.grad, name=name)
            continue
        # Tolerance: 4x the error of peft's formula in the same dtype, plus 16 u times the size of the
        # terms each gradient element sums (where W_i + s (BA)_i nearly cancels, every low-precision
        # evaluation, peft's too, is off by about that), plus the usual floor.
        err = (got.grad.double() - leaf.grad).abs()
        base_err = (base.grad.double() - leaf.grad).abs().nan_to_num(0.0, posinf=0.0).max()
        floor = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[p["dtype"]]
        floor *= max(leaf.grad.abs().max().item() if leaf.grad.numel() else 0.0, 1.0)
        tol = 4 * base_err + floor + 16 * torch.finfo(p["dtype"]).eps * size
        assert (err <= tol).all(), f"{name}: max err/tol {(err / tol).max().item():.3g}"


def abs_grads(x, w, a, b, m, s, mask, dy):
    """The gradients of the same computation on absolute values (the true norms kept): for each
    gradient element, the size of the terms it sums -- the scale of any rounding error there."""
    n = dense_norms_f64(w, a.detach(), b.detach(), s)
    xa, aa, ba, ma = (t.detach().double().abs().requires_grad_() for t in (x, a, b, m))
    wa = w.double().abs()
    h = xa if mask is None else xa * mask.double()
    y = (ma / n) * (h @ wa.t() + abs(s) * (h @ aa.t()) @ ba.t()) + xa @ wa.t() + h @ wa.t()
    return torch.autograd.grad(y, (xa, aa, ba, ma), dy.double().abs())


def test_gradcheck_x_m_bias():
    """Float64 gradcheck of the custom backward in x, m and bias (dropout 0, W frozen). A and B are
    left to the reference comparisons: the norm depends on them but is detached by design, which
    finite differences would see."""
    g = torch.Generator().manual_seed(3)
    x, a, b = torch.randn(4, 9, generator=g), torch.randn(3, 9, generator=g), torch.randn(6, 3, generator=g)
    w, m, bias = torch.randn(6, 9, generator=g), torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    args = [t.double().requires_grad_() for t in (x, m, bias)]
    w, a, b = w.double(), a.double().requires_grad_(), b.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, m, bias: dora_linear(x, w, a, b, m, 0.7, bias), args)


def _cancelling_rows(n=40, k=300, r=4, s=2.0, eps=1e-7, rows=(3, 17, 31), dtype=torch.float32):
    """W whose listed rows are -s (B A)_i + a perturbation eps times as large: W + s B A is tiny there."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(r, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    idx = torch.tensor(rows)
    w[idx] = -s * (b[idx] @ a) + eps * torch.randn(len(rows), k, generator=g, dtype=torch.float64) / k ** 0.5
    return w.to(dtype), a.to(dtype), b.to(dtype), s, idx


def test_cancelling_rows_are_recomputed_and_accurate():
    """Rows where ||W_i + s (BA)_i|| is ~1e-7 of ||W_i||: the expansion alone loses every digit there,
    even in float64 (checked: its error is above 1% on such rows); the op's fallback recomputes those
    rows (and no well-conditioned one) and matches the dense float64 norms to 1e-9 relative."""
    w, a, b, s, idx = _cancelling_rows()
    ref = dense_norms_f64(w, a, b, s)
    got, recomputed = dora_row_norms(w, a, b, s, return_recomputed=True)
    assert set(recomputed.tolist()) == set(idx.tolist())
    rel = ((got - ref).abs() / ref)
    assert rel.max() < 1e-9, rel.max()
    # Without the fallback, the expansion is useless on these rows: the test can fail.
    w64, a64, b64 = w.double(), a.double(), b.double()
    n2 = (w64 * w64).sum(1) + 2 * s * (b64 * (w64 @ a64.t())).sum(1) + s * s * ((b64 @ (a64 @ a64.t())) * b64).sum(1)
    naive = n2.clamp_min(0).sqrt()
    assert (((naive - ref).abs() / ref)[idx] > 1e-2).any()


def test_cancelling_rows_forward_and_gradients_are_finite_and_close():
    """The op on the cancelling rows: output equals the float64 dense reference as well as plain
    torch in fp32 does (the pre-scale output there is itself a cancellation: peft has it too)."""
    w, a, b, s, idx = _cancelling_rows(eps=1e-3)
    m = w.double().norm(dim=1).float()
    x = torch.randn(8, w.shape[1])
    out = dora_linear(x, w, a, b, m, s)
    ref = dora_f64(x, w, a, b, m, s, None)
    assert torch.isfinite(out).all()
    rel = ((out.double() - ref).abs() / ref.abs().max(0).values)[:, idx]
    assert rel.max() < 1e-2, rel.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_rows_give_finite_outputs_and_gradients(dtype):
    """Rows of W that are all zero, m initialised to ||W_i|| = 0 and B = 0 there (peft: 0/0 = NaN):
    the rule 1/n = 0 where n = 0 gives the bias there, finite gradients everywhere, and the other
    rows are unaffected (equal to the float64 reference)."""
    g = torch.Generator().manual_seed(1)
    n, k, r = 12, 20, 3
    w = torch.randn(n, k, generator=g)
    w[[2, 7]] = 0
    a, b = torch.randn(r, k, generator=g), 0.1 * torch.randn(n, r, generator=g)
    b[[2, 7]] = 0
    m = w.norm(dim=1)
    bias = torch.randn(n, generator=g)
    x, a, b, m = (t.to(dtype).requires_grad_() for t in (torch.randn(5, k, generator=g), a, b, m))
    w, bias = w.to(dtype), bias.to(dtype)
    out = dora_linear(x, w, a, b, m, 2.0, bias)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all()
    for t in (x, a, b, m):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(out[:, [2, 7]], bias[[2, 7]].expand(5, 2))
    assert torch.equal(m.grad[[2, 7]], torch.zeros(2, dtype=dtype))
    keep = [i for i in range(n) if i not in (2, 7)]
    ref = dora_f64(x.detach(), w, a.detach(), b.detach(), m.detach(), 2.0, bias)
    assert_close(out[:, keep].detach(), ref[:, keep], dora_same_dtype(x, w, a, b, m, 2.0, bias)[:, keep].detach())


def test_huge_scale_stays_finite():
    """m / n beyond fp16's range is clamped to its largest finite value (stated rule)."""
    w = torch.full((2, 4), 1e-3).half()
    a, b = torch.zeros(1, 4).half(), torch.zeros(2, 1).half()
    m = torch.tensor([60000.0, 1.0]).half()
    x = torch.full((1, 4), 1e-3).half()
    out = dora_linear(x, w, a, b, m, 1.0)
    assert torch.isfinite(out).all()


class _SizeLog(TorchDispatchMode):
    """(numel, op, storage pointer) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func), t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d-view"])
def test_no_n_by_k_tensor_in_forward_or_backward(monkeypatch, dropout, conv1d):
    """No tensor of N x K elements (or more) is created by the op, forward or backward, and nothing
    of that size is saved for backward but W itself; the row blocks converted to float64 are at most
    `_CHUNK_ELEMENTS` (made small here so that several blocks and the recompute path run)."""
    monkeypatch.setattr(dora_mod, "_CHUNK_ELEMENTS", 600)
    m_rows, n, k, r = 8, 96, 80, 4  # N*K = 7680 dwarfs M*N, M*K and the rest
    g = torch.Generator().manual_seed(0)
    w = torch.randn(k, n, generator=g).t() if conv1d else torch.randn(n, k, generator=g)
    w[5] = 0  # a zero row
    a = torch.randn(r, k, generator=g).requires_grad_()
    b = torch.randn(n, r, generator=g)
    w[9] = -2.0 * (b[9] @ a.detach())  # a cancelling row: recomputed directly
    b.requires_grad_()
    mag = (w.norm(dim=1) + 0.1).requires_grad_()
    x = torch.randn(m_rows, k, generator=g, requires_grad=True)
    with _SizeLog() as log:
        out, saved = saved_for_backward(lambda: dora_linear(x, w, a, b, mag, 2.0, dropout=dropout))
        out.sum().backward()
    w_ptr = w.untyped_storage().data_ptr()  # views of W (its transpose for a GEMM) allocate nothing
    new = [row for row in log.sizes if row[2] != w_ptr]
    assert max(new)[0] < n * k, max(new)
    assert all(t.numel() < n * k or t.untyped_storage().data_ptr() == w_ptr for t in saved)
    assert torch.isfinite(x.grad).all() and torch.isfinite(a.grad).all() and torch.isfinite(mag.grad).all()


def test_norms_use_blocks_smaller_than_w(monkeypatch):
    """The float64 blocks of W are bounded by _CHUNK_ELEMENTS, whatever the layer's size: on a
    1024 x 1024 layer no float64 temporary reaches N*K / 4."""
    monkeypatch.setattr(dora_mod, "_CHUNK_ELEMENTS", 1 << 16)
    w, a, b = torch.randn(1024, 1024), torch.randn(8, 1024), torch.randn(1024, 8)
    with _SizeLog() as log:
        dora_row_norms(w, a, b, 1.0)
    w_ptr = w.untyped_storage().data_ptr()
    assert max(row for row in log.sizes if row[2] != w_ptr)[0] <= 1 << 16


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(m=torch.randn(7)), ValueError, "magnitude must be"),
    (dict(m=torch.randn(8).double()), TypeError, "magnitude"),
    (dict(x=torch.randn(2, 5)), ValueError, "features"),
    (dict(dropout=1.0), ValueError, "dropout"),
], ids=["m-shape", "m-dtype", "x-features", "dropout"])
def test_bad_arguments_are_named(kwargs, exc, words):
    args = dict(x=torch.randn(2, 6), w=torch.randn(8, 6), a=torch.randn(4, 6), b=torch.randn(8, 4),
                m=torch.rand(8), dropout=0.0)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        dora_linear(args["x"], args["w"], args["a"], args["b"], args["m"], 1.0, dropout=args["dropout"])


def test_autocast_bf16_gives_fp32_adapter_gradients():
    x, w = torch.randn(5, 24), torch.randn(16, 24)
    a, b = torch.randn(4, 24, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    m = (w.norm(dim=1) * 1.1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dora_linear(x, w, a, b, m, 2.0)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == m.grad.dtype == torch.float32
    assert torch.isfinite(m.grad).all() and m.grad.abs().sum() > 0
