"""NF4Linear (lowrank/nf4_linear.py): the frozen 4-bit layer: bitsandbytes' state-dict keys both
ways, dtype casts and device moves that keep the storage, no dense W held for backward."""
from __future__ import annotations

import pytest
import torch

from lowrank.nf4_format import quantize_nf4
from lowrank.nf4_linear import NF4Linear

from tests.bnb_oracle import bnb_without_compile, make_bnb_linear, needs_bnb  # noqa: F401
from tests.helpers import assert_close, saved_for_backward


@needs_bnb
def test_nf4linear_state_dict_is_bitsandbytes():
    dense, layer = make_bnb_linear(128, 40, double_quant=True)
    ours = NF4Linear.from_linear(dense, compute_dtype=torch.float32)
    theirs = layer.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    fresh = NF4Linear(quantize_nf4(torch.randn(40, 128)), torch.zeros(40), torch.float32)
    fresh.load_state_dict(theirs)
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), ours(x))


def test_nf4linear_dtype_cast_keeps_storage():
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 16), compute_dtype=torch.float32)
    absmax = layer.nf4.absmax.clone()
    layer.half()
    assert layer.nf4.absmax.dtype == torch.uint8 and torch.equal(layer.nf4.absmax, absmax)
    assert layer.nf4.nested_absmax.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nf4linear_forward_keeps_no_dense_weight(backend, monkeypatch):
    """An NF4 layer without adapters (disabled adapters, an adopted layer) on an input that needs
    a gradient: no dense W saved either, and the output is x @ deq(W).T + bias."""
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    lin = torch.nn.Linear(128, 96)
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y, saved = saved_for_backward(lambda: layer(x))
    assert not [t for t in saved if t.numel() >= 96 * 128 // 2 and t.dtype != torch.uint8]
    wd = layer.nf4.dequantize(torch.float32)
    ref = torch.einsum("bsk,nk->bsn", x.detach().double(), wd.double()) + lin.bias.detach().double()
    assert_close(y, ref, torch.nn.functional.linear(x.detach(), wd, lin.bias.detach()), name="NF4Linear")
    dy = torch.randn_like(y)
    y.backward(dy)
    dx_ref = torch.einsum("bsn,nk->bsk", dy.double(), wd.double())
    assert_close(x.grad, dx_ref, dy @ wd, name="NF4Linear dx")


@pytest.mark.gpu
def test_nf4linear_moves_between_devices():
    layer = NF4Linear.from_linear(torch.nn.Linear(256, 64), compute_dtype=torch.bfloat16)
    ref = {k: v.clone() for k, v in layer.nf4.tensors().items()}
    layer.cuda()
    assert layer.nf4.device.type == "cuda" and layer.bias.device.type == "cuda"
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.nf4.dequantize(torch.bfloat16), layer.bias.bfloat16()))
    layer.cpu()
    for k, v in layer.nf4.tensors().items():
        assert v.device.type == "cpu" and torch.equal(v, ref[k]), k
