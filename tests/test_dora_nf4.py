"""DoRA on NF4 (QLoRA) bases: the row norms from the 4-bit storage a block of rows at a time (never a
dense copy), against the dense float64 norms of the dequantized weight; the layer and a whole model
against the same DoRA over the dequantized weights (dense path, float64), merge_and_unload."""
import copy

import pytest
import torch

import lowrank
import lowrank.ops.dora as dora_mod
from lowrank.nf4_format import quantize_nf4
from lowrank.ops.dora import dora_row_norms, nf4_dora_linear, weight_row_sq_norms
from tests.helpers import assert_close
from tests.models import SMALL_MODELS, ids

DT = [torch.float32, torch.bfloat16]
DT_IDS = ["fp32", "bf16"]


def nf4_problem(n, k, r, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w[3] = 0  # a zero row
    nf4 = quantize_nf4(w.to(dtype))
    a = torch.randn(r, k, generator=g) / k ** 0.5
    b = 0.3 * torch.randn(n, r, generator=g)
    return nf4, a, b


@pytest.mark.parametrize("compute", DT, ids=DT_IDS)
@pytest.mark.parametrize("k", [128, 100], ids=["whole-blocks", "k-not-in-blocks"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-decode"])
def test_nf4_row_norms_equal_the_dense_ones(compute, k, native, monkeypatch):
    """The norms (and ||W_i||^2) decoded block by block equal the dense float64 norms of
    dequantize(compute) to 1e-12; the decoded rows are bit for bit dequantize's (native tile decode,
    or the torch decode when K is not in whole blocks or the library is off)."""
    if not native:
        monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    monkeypatch.setattr(dora_mod, "_CHUNK_ELEMENTS", 700)  # several blocks, rows split across NF4 blocks
    nf4, a, b = nf4_problem(37, k, 4)
    dense = nf4.dequantize_torch(compute)
    rows = dora_mod._Rows(nf4, compute)
    assert torch.equal(torch.cat([rows.block(i, j) for i, j in dora_mod._row_blocks(37, k)]), dense.double())
    assert torch.equal(rows.take(torch.tensor([5, 0, 36])), dense.double()[[5, 0, 36]])
    got = dora_row_norms(nf4, a, b, 2.0, dtype=compute)
    ref = (dense.double() + 2.0 * b.double() @ a.double()).norm(dim=1)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert torch.allclose(weight_row_sq_norms(nf4, compute), dense.double().square().sum(1), rtol=1e-12, atol=0)


class _SizeLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-decode"])
def test_nf4_norms_never_build_the_dense_weight(native, monkeypatch):
    """No tensor of N x K elements while the norms of a 4-bit weight are taken (the QLoRA matmul's own
    tiling is tested with that op)."""
    if not native:
        monkeypatch.setenv("LOWRANK_NO_NATIVE", "1")
    monkeypatch.setattr(dora_mod, "_CHUNK_ELEMENTS", 1024)
    nf4, a, b = nf4_problem(96, 128, 4)
    with _SizeLog() as log:
        weight_row_sq_norms(nf4, torch.bfloat16)
        dora_row_norms(nf4, a, b, 2.0, dtype=torch.bfloat16)
    assert max(log.sizes)[0] < 96 * 128, max(log.sizes)


def dense_twin(nf4_model, compute):
    """The same model with each NF4 LoRA layer's base replaced by an nn.Linear holding its dequantized
    weight (in the compute dtype) and the same adapters: the dense DoRA path (tested against peft)."""
    twin = copy.deepcopy(nf4_model)
    for path, layer in lowrank.lora_layers(twin):
        base = layer.base_layer
        dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=compute)
        with torch.no_grad():
            dense.weight.copy_(base.nf4.dequantize(compute))
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        dense.weight.requires_grad_(False)
        layer.base_layer = dense
        layer.clear_weight_cache()
    return twin


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_qlora_dora_model_equals_dora_over_the_dequantized_weights(dropout):
    """patch_linear(quantize="nf4", dora=True): m starts at the dequantized weight's row norms; the
    logits and the gradients of every A, B, m match DoRA over the dequantized weights in float64 as
    well as the fp32 dense DoRA does (same dropout mask: same seed, same draws)."""
    base = SMALL_MODELS["llama"]()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=8, targets=["q_proj", "down_proj"], dora=True,
                                 quantize="nf4", compute_dtype=torch.float32, dropout=dropout)
    for _, layer in lowrank.lora_layers(model):
        deq = layer.base_layer.nf4.dequantize(torch.float32).double()
        assert torch.equal(layer.lora_magnitude_vector["default"], deq.norm(dim=1).float())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    twin = dense_twin(model, torch.float32)
    twin64 = copy.deepcopy(twin).double()
    x = ids()
    outs = []
    for m in (model, twin, twin64):
        m.train()
        torch.manual_seed(11)
        out = m(input_ids=x).logits
        out.double().square().mean().backward()
        outs.append(out.detach())
    assert_close(outs[0], outs[2], outs[1])
    g_nf4, g_twin, g_64 = grads(model), grads(twin), grads(twin64)
    assert set(g_nf4) == set(g_twin) and any("lora_magnitude_vector" in k for k in g_nf4)
    for key in g_nf4:
        assert_close(g_nf4[key], g_64[key], g_twin[key], factor=4.0, name=key)


def test_qlora_dora_bf16_and_merge_and_unload(tmp_path):
    """bf16 compute: finite outputs close to the float64 DoRA over the dequantized weights; saved and
    loaded back the adapter gives the same outputs; merge_and_unload gives dense layers whose logits
    match (one rounding of the merged weight)."""
    base = SMALL_MODELS["llama"]()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=8, targets=["q_proj", "v_proj"], dora=True,
                                 quantize="nf4")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = ids()
    twin = dense_twin(model, torch.float32)  # fp32 weights holding the bf16-decoded values
    for _, layer in lowrank.lora_layers(twin):
        with torch.no_grad():
            layer.base_layer.weight.copy_(layer.base_layer.weight.bfloat16())
    with torch.no_grad():
        ours = model(input_ids=x).logits
        ref = copy.deepcopy(twin).double()(input_ids=x).logits
        baseline = copy.deepcopy(twin).bfloat16()(input_ids=x).logits.float()  # bf16 throughout
    assert torch.isfinite(ours).all()
    assert_close(ours, ref, baseline)
    lowrank.save_adapter(model, tmp_path)
    fresh = lowrank.patch_linear(copy.deepcopy(base), rank=4, targets=["q_proj", "v_proj"], quantize="nf4")
    lowrank.unpatch(fresh)  # NF4 layers stay; the file's DoRA adapter goes onto them
    loaded = lowrank.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, ours)
    plain = lowrank.merge_and_unload(copy.deepcopy(model))
    assert not list(lowrank.lora_layers(plain))
    with torch.no_grad():
        merged = plain(input_ids=x).logits
    assert_close(merged, ref, baseline)


def test_nf4_dora_linear_checks_its_arguments():
    nf4, a, b = nf4_problem(8, 64, 2)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="magnitude"):
        nf4_dora_linear(x, nf4, a, b, torch.ones(7), 1.0)
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_dora_linear(x, torch.randn(8, 64), a, b, torch.ones(8), 1.0)
