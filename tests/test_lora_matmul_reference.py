"""Property tests of lowrank.ops.lora_linear on its reference path (lowrank/ops/lora_matmul.py,
the CPU path) against the float64 einsum oracles."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank
from lowrank.ops.lora_matmul import lora_linear_reference
from tests.helpers import DTYPE_IDS, DTYPES, assert_close
from tests.oracles import lora_linear_f64, lora_linear_grads_f64

ODD = st.sampled_from([1, 7, 59, 123])


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")


def make_x(lead, k, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(*lead, k, generator=g).to(dtype)
    if layout == "sliced":  # every other column of a wider tensor: non-unit last-dim stride
        return torch.randn(*lead, 2 * k, generator=g).to(dtype)[..., ::2]
    # transposed storage: (k, *lead) laid out, viewed as (*lead, k)
    return torch.randn(k, *lead, generator=g).to(dtype).movedim(0, -1)


def unfused(x, w, a, b, s, bias, mask):
    """The same maths as plain torch in x's dtype, another way round: the tolerance baseline."""
    h = x if mask is None else x * mask
    y = x @ w.t()
    if bias is not None:
        y = y + bias
    return y + s * ((h @ a.t()) @ b.t())


@st.composite
def problems(draw):
    lead = draw(st.sampled_from([(), (1,), (5,), (2, 3), (3, 1, 2)]))
    k = draw(st.one_of(ODD, st.integers(1, 130)))
    n = draw(st.one_of(ODD, st.integers(1, 130)))
    r = draw(st.integers(1, 64))
    dtype_i = draw(st.integers(0, 2))
    return dict(lead=lead, k=k, n=n, r=r, dtype=DTYPES[dtype_i], bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
                scaling=draw(st.sampled_from([0.5, 2.0, 1.0 / 3.0])),
                dropout=draw(st.sampled_from([0.0, 0.0, 0.25])), seed=draw(st.integers(0, 2**16)))


def _tensors(p):
    g = torch.Generator().manual_seed(p["seed"] + 1)
    dt = p["dtype"]
    w = (torch.randn(p["n"], p["k"], generator=g) / p["k"] ** 0.5).to(dt)
    a = (torch.randn(p["r"], p["k"], generator=g) / p["k"] ** 0.5).to(dt)
    b = torch.randn(p["n"], p["r"], generator=g).to(dt)
    bias = torch.randn(p["n"], generator=g).to(dt) if p["bias"] else None
    x = make_x(p["lead"], p["k"], dt, p["layout"], p["seed"])
    return x, w, a, b, bias


def _mask_like(x, p, seed):
    """Regenerate the dropout multiplier the reference path draws after torch.manual_seed(seed)."""
    if p == 0.0:
        return None
    torch.manual_seed(seed)
    return F.dropout(torch.ones_like(x), p, training=True)


def _bound(dtype, *magnitudes) -> float:
    """A rounding bound for a result that may cancel (the plain-torch baseline can then be lucky):
    3 roundings in `dtype` (a product of rank r rounded, scaled and rounded, then accumulated and
    rounded; fp32 accumulation inside each matmul, far below) of the terms' magnitudes, not the
    result's, with a 1% margin."""
    u = torch.finfo(dtype).eps / 2
    return 3.03 * u * max((m.max().item() if m.numel() else 0.0) for m in magnitudes)


def _abs64(*ts):
    return [None if t is None else t.detach().double().abs() for t in ts]


@given(problems())
def test_forward_matches_float64(p):
    x, w, a, b, bias = _tensors(p)
    torch.manual_seed(p["seed"])
    out = lowrank.ops.lora_linear(x, w, a, b, p["scaling"], bias, dropout=p["dropout"])
    mask = _mask_like(x, p["dropout"], p["seed"])
    ref = lora_linear_f64(x, w, a, b, p["scaling"], bias, mask)
    assert out.dtype == p["dtype"] and out.shape == (*p["lead"], p["n"])
    x64, w64, a64, b64, h64 = _abs64(x, w, a, b, x if mask is None else x * mask)
    mag = x64 @ w64.t() + p["scaling"] * (h64 @ a64.t()) @ b64.t()
    if bias is not None:
        mag = mag + bias.double().abs()
    assert_close(out, ref, unfused(x, w, a, b, p["scaling"], bias, mask), bound=_bound(p["dtype"], mag))


# found by hypothesis in a CI run: dX = dy W + s (dy B) A over 42 terms of magnitude ~1 cancelling to
# 0.97; fp16 dT's roundings put it 10 ulps off, the plain-torch baseline 1 ulp (lucky): within _bound
@example(dict(lead=(), k=1, n=1, r=42, dtype=torch.float16, bias=False, layout="contiguous",
              scaling=1.0 / 3.0, dropout=0.0, seed=1100))
@given(problems())
def test_gradients_match_float64(p):
    x, w, a, b, bias = _tensors(p)
    x, a, b = (t.detach().requires_grad_() for t in (x, a, b))
    dy = torch.randn(*p["lead"], p["n"], generator=torch.Generator().manual_seed(p["seed"] + 2)).to(p["dtype"])
    torch.manual_seed(p["seed"])
    lowrank.ops.lora_linear(x, w, a, b, p["scaling"], bias, dropout=p["dropout"]).backward(dy)
    mask = _mask_like(x, p["dropout"], p["seed"])
    dx_ref, da_ref, db_ref = lora_linear_grads_f64(x, w, a, b, p["scaling"], dy, mask)
    xb, ab, bb = (t.detach().clone().requires_grad_() for t in (x, a, b))
    unfused(xb, w, ab, bb, p["scaling"], bias, mask).backward(dy)
    s, k, r = p["scaling"], p["k"], p["r"]
    g64, w64, a64, b64, h64 = _abs64(dy.reshape(-1, p["n"]), w, a, b, (x if mask is None else x * mask).reshape(-1, k))
    dt = s * (g64 @ b64)  # |dT| bound, (M, r)
    assert_close(x.grad, dx_ref, xb.grad, name="dX", bound=_bound(p["dtype"], g64 @ w64 + dt @ a64))
    assert_close(a.grad, da_ref, ab.grad, name="dA", bound=_bound(p["dtype"], dt.t() @ h64))
    assert_close(b.grad, db_ref, bb.grad, name="dB", bound=_bound(p["dtype"], s * g64.t() @ (h64 @ a64.t())))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_scaling_is_the_base_layer_exactly(dtype):
    x = torch.randn(3, 5, 59).to(dtype)
    w, bias = torch.randn(7, 59).to(dtype), torch.randn(7).to(dtype)
    a, b = torch.randn(4, 59).to(dtype), torch.randn(7, 4).to(dtype)
    assert torch.equal(lowrank.ops.lora_linear(x, w, a, b, 0.0, bias), F.linear(x, w, bias))


class _AllocationLog(TorchDispatchMode):
    """Records (op, numel, storage pointer) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.rows.append((str(func), t.numel(), t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_no_mxn_temporary_beyond_the_output(dropout):
    """Forward and backward allocate no M x N buffer beyond the output (and dY's own grad path):
    the LoRA term is accumulated into F.linear's output in place."""
    m, k, n, r = 64, 16, 48, 4  # M*N = 3072 dwarfs M*K, N*K, M*r, N*r
    x = torch.randn(m, k)
    w, a, b = torch.randn(n, k), torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    with _AllocationLog() as log:
        out = lowrank.ops.lora_linear(x, w, a, b, 2.0, dropout=dropout)
    big = {ptr for _, numel, ptr in log.rows if numel >= m * n}
    assert big == {out.untyped_storage().data_ptr()}, log.rows


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(x=torch.randn(2, 5)), ValueError, "features"),
        (dict(a=torch.randn(3, 6)), ValueError, "lora_A"),
        (dict(b=torch.randn(7, 3)), ValueError, "lora_B"),
        (dict(bias=torch.randn(9)), ValueError, "bias"),
        (dict(x=torch.randint(0, 5, (2, 6))), TypeError, "dtype"),
        (dict(x=torch.randn(2, 6).half()), TypeError, "float16"),
    ],
    ids=["x-features", "A-shape", "B-shape", "bias-shape", "int-x", "mixed-dtypes"],
)
def test_bad_arguments_are_named(kwargs, exc, words):
    args = dict(x=torch.randn(2, 6), w=torch.randn(8, 6), a=torch.randn(4, 6), b=torch.randn(8, 4), bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        lowrank.ops.lora_linear(args["x"], args["w"], args["a"], args["b"], 1.0, args["bias"])


def test_autocast_runs_the_op_in_the_autocast_dtype():
    """fp32 model under torch.autocast(bf16): same result as casting everything to bf16 by hand,
    and fp32 gradients for the fp32 adapter parameters."""
    x, w, bias = torch.randn(5, 24), torch.randn(16, 24), torch.randn(16)
    a, b = torch.randn(4, 24, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lowrank.ops.lora_linear(x, w, a, b, 2.0, bias)
    bf = [t.detach().bfloat16() for t in (x, w, a, b, bias)]
    expected = lora_linear_reference(bf[0], bf[1], bf[2], bf[3], 2.0, bf[4])
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and b.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
def test_backward_writes_dx_once(bias):
    """The LoRA training case (no dropout, W and bias frozen): the backward allocates one (M, K)
    buffer, dX, and adds dT @ A into it in place (autograd's graph for the same forward allocates
    dT @ A apart and sums the two); the gradients are still the float64 oracle's."""
    m, k, n, r = 64, 48, 16, 4  # M*K = 3072 dwarfs M*N, N*K, M*r, K*r
    x = torch.randn(m, k, requires_grad=True)
    w, a, b = torch.randn(n, k) / k**0.5, torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    bias_t = torch.randn(n) if bias else None
    dy = torch.randn(m, n)
    out = lowrank.ops.lora_linear(x, w, a, b, 2.0, bias_t)
    with _AllocationLog() as log:
        out.backward(dy)
    x_ptr = x.untyped_storage().data_ptr()  # views of x (x.reshape for dA) allocate nothing
    big = {ptr for _, numel, ptr in log.rows if numel >= m * k and ptr != x_ptr}
    assert big == {x.grad.untyped_storage().data_ptr()}, log.rows
    dx_ref, da_ref, db_ref = lora_linear_grads_f64(x, w, a, b, 2.0, dy, None)
    xb, ab, bb = (t.detach().clone().requires_grad_() for t in (x, a, b))
    unfused(xb, w, ab, bb, 2.0, bias_t, None).backward(dy)
    assert_close(x.grad, dx_ref, xb.grad, name="dX")
    assert_close(a.grad, da_ref, ab.grad, name="dA")
    assert_close(b.grad, db_ref, bb.grad, name="dB")


def test_trainable_weight_and_bias_still_get_gradients():
    """A weight or bias that needs a gradient takes autograd's path: its gradient is right too."""
    m, k, n, r = 6, 10, 8, 3
    x = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lowrank.ops.lora_linear(*t[:4], 1.5, t[4]), (x, w, a, b, bias))
    w.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda *t: lowrank.ops.lora_linear(t[0], w, t[1], t[2], 1.5, t[3]),
                                    (x, a, b, bias))
    bias.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda *t: lowrank.ops.lora_linear(t[0], w, t[1], t[2], 1.5, bias), (x, a, b))
