"""Merging on models (lowrank/merge.py): merge / unmerge / merge_and_unload on real architectures
built from configs, dense and NF4, against the float64 merged model; errors leave the model as it
was. The arithmetic itself is tested in test_merge_op.py."""
from __future__ import annotations

import copy
import importlib
import math
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank
from lowrank import native
from lowrank.merge import MergeState, record_fraction

from tests.helpers import assert_bits_equal, assert_close, backends
from tests.models import logits, randomize_lora_
from tests.models import tiny_gpt2 as _tiny_gpt2
from tests.models import tiny_llama as _tiny_llama
from tests.oracles import merged_f64, round_once


def tiny_llama(dtype):
    return _tiny_llama(seed=None, dtype=dtype, hidden=64, intermediate=112)


def tiny_gpt2(dtype):
    return _tiny_gpt2(seed=None, dtype=dtype, hidden=64)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_model_merge_unmerge_and_unload(build, dtype, backend, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    torch.manual_seed(0)
    model = build(dtype)
    ids = torch.randint(0, 97, (2, 11))
    lowrank.patch_linear(model, rank=8)
    randomize_lora_(model)
    weights0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    out_lora = logits(model, ids)
    ref64 = logits(merged_f64(model), ids)

    lowrank.merge(model)
    native_cpu = native.cpu(warn=False) is not None and os.environ.get("LOWRANK_NO_NATIVE") != "1"
    for path, layer in lowrank.lora_layers(model):
        assert layer.merged and layer.merged.adapter == "default"
        assert 0.0 <= record_fraction(layer) < 3.0
        # the CPU library's record lets unmerge take its fast round trip (exact: checked below)
        assert (layer.merged.fast_unmerge is not None) == native_cpu, path
    out_merged = logits(model, ids)
    assert_close(out_merged, ref64, baseline=out_lora, factor=2, name="merged model logits")

    with pytest.raises(ValueError, match="already merged"):
        lowrank.merge(model)
    lowrank.unmerge(model)
    for n, p in model.named_parameters():
        assert_bits_equal(p.detach(), weights0[n], f"{n} after unmerge")
    assert torch.equal(logits(model, ids), out_lora)
    with pytest.raises(ValueError, match="not merged"):
        lowrank.unmerge(model)

    lowrank.merge(model)
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lowrank.unmerge(model)
    plain = lowrank.merge_and_unload(model)
    assert plain is model
    assert not any(isinstance(m, lowrank.LoRALinear) for m in model.modules())
    assert not any("lora_" in n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        key = n.replace(".base_layer", "")
        ref = {k.replace(".base_layer", ""): v for k, v in merged_weights.items()}[key]
        # merge_and_unload merges without a record: same rounding, same bits
        assert_bits_equal(p.detach(), ref, n)
        assert p.requires_grad  # flags restored as by unpatch
    assert torch.equal(logits(model, ids), out_merged)


def test_conv1d_merge_equals_linear_merge_transposed():
    """A GPT-2 Conv1D stores W as (in, out): merged through views of the stored tensor, it must
    give exactly the transpose of the nn.Linear result."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 40).to(torch.bfloat16)  # weight (40, 48) = (in, out)
    lin = nn.Linear(40, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    layers = []
    for base in (conv, lin):
        layer = lowrank.LoRALinear(base)
        layer.add_adapter(lowrank.LoRAConfig(rank=4, alpha=8))
        layers.append(layer)
    with torch.no_grad():
        for p_conv, p_lin in ((layers[0].lora_A["default"], layers[1].lora_A["default"]),
                              (layers[0].lora_B["default"], layers[1].lora_B["default"])):
            p_conv.copy_(torch.randn(p_conv.shape) * 0.1)
            p_lin.copy_(p_conv)
    ptr = conv.weight.data_ptr()
    for layer in layers:
        lowrank.merge(layer)
    assert conv.weight.data_ptr() == ptr and conv.weight.shape == (40, 48)
    assert_bits_equal(conv.weight.detach().t().contiguous(), lin.weight.detach(), "Conv1D vs Linear")
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layers[0](x), conv(x))  # merged layer = its base layer


def test_module_api_errors_leave_weights_unchanged():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    with pytest.raises(ValueError, match="no LoRA layer"):
        lowrank.merge(model)
    with pytest.raises(TypeError, match="nn.Module"):
        lowrank.merge(torch.zeros(3))
    lowrank.patch_linear(model, rank=2)
    randomize_lora_(model)
    w0 = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]
    with pytest.raises(ValueError, match="not merged"):
        lowrank.unmerge(model)
    with pytest.raises(ValueError, match="no adapter"):
        lowrank.merge(model, adapter_name="nope")
    # a bad adapter in the second layer: nothing merged
    with torch.no_grad():
        model[2].lora_A["default"][0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        lowrank.merge(model)
    assert not model[0].merged
    w1 = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    for x, y in zip(w0, w1):
        assert torch.equal(x, y)
    with torch.no_grad():
        model[2].lora_A["default"][0, 0] = 0.1
    lowrank.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lowrank.unpatch(model)  # patch.py's contract: a merged layer is not unpatched
    with torch.no_grad():
        model[0].lora_B["default"].add_(1.0)  # adapter edited while merged
    with pytest.raises(ValueError, match="changed since it was merged"):
        lowrank.unmerge(model)


def test_merge_and_unload_failing_midway_keeps_outputs(monkeypatch):
    """A failure in the second layer's merge (simulated out of memory) leaves the first layer
    merged and flagged merged, so its forward skips the LoRA path: the model's outputs stay those
    of the adapted model instead of adding the delta twice."""
    merge_mod = importlib.import_module("lowrank.merge")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    lowrank.patch_linear(model, rank=2)
    randomize_lora_(model, std=0.3)
    x = torch.randn(5, 12)
    with torch.no_grad():
        out0 = model(x)
    real, calls = merge_mod._merge_layer, []

    def flaky(layer, name, exact):
        if calls:
            raise RuntimeError("simulated out of memory")
        calls.append(name)
        real(layer, name, exact)

    monkeypatch.setattr(merge_mod, "_merge_layer", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        lowrank.merge_and_unload(model)
    assert model[0].merged and not model[2].merged
    with torch.no_grad():
        torch.testing.assert_close(model(x), out0, rtol=1e-5, atol=1e-5)


def test_non_dense_base_weight_is_not_implemented():
    layer = lowrank.LoRALinear(nn.Linear(16, 8))
    layer.add_adapter(lowrank.LoRAConfig(rank=2))
    # stand-in for an unknown quantized layer: packed uint8 storage instead of a float weight
    layer.base_layer.weight = nn.Parameter(torch.zeros(64, 1, dtype=torch.uint8), requires_grad=False)
    model = nn.Sequential(layer)
    with pytest.raises(NotImplementedError, match="not implemented"):
        lowrank.merge(model)
    with pytest.raises(NotImplementedError, match="not implemented"):
        lowrank.merge_and_unload(model)
    assert not layer.merged


def qlora_llama(compute_dtype, model_dtype=torch.float32):
    torch.manual_seed(0)
    model = tiny_llama(model_dtype)
    lowrank.patch_linear(model, rank=8, quantize="nf4", compute_dtype=compute_dtype)
    randomize_lora_(model, std=0.1)
    return model


@pytest.mark.parametrize("model_dtype, compute_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32-model", "fp32-model-bf16-compute", "bf16-model"])
@pytest.mark.parametrize("backend", backends())
def test_qlora_merge_and_unload_dequantizes_and_merges(model_dtype, compute_dtype, backend, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    model = qlora_llama(compute_dtype, model_dtype)
    ids = torch.randint(0, 97, (2, 11))
    ref64 = logits(merged_f64(model), ids)
    out_qlora = logits(model, ids)
    expected = {}
    for path, layer in lowrank.lora_layers(model):  # each merged weight, from float64
        w64 = layer.base_layer.nf4.dequantize().double()  # merged in the quantized weight's dtype
        expected[path] = w64 + layer.scaling() * (layer.lora_B["default"].double() @ layer.lora_A["default"].double())
    with pytest.raises(NotImplementedError, match="merge_and_unload"):
        lowrank.merge(model)  # in place into 4-bit codes: refused, nothing changed
    assert all(not layer.merged for _, layer in lowrank.lora_layers(model))
    plain = lowrank.merge_and_unload(model)
    assert not any(isinstance(m, (lowrank.LoRALinear, lowrank.NF4Linear)) for m in plain.modules())
    for path, w64 in expected.items():
        lin = plain.get_submodule(path)
        assert type(lin) is nn.Linear and lin.weight.dtype == model_dtype and not lin.weight.requires_grad
        if model_dtype == torch.bfloat16:  # one rounding of the exact value (merge's contract)
            assert_bits_equal(lin.weight.detach(), round_once(w64, model_dtype), path)
        else:
            assert_close(lin.weight.detach(), w64, name=path)
    assert_close(logits(plain, ids).float(), ref64, baseline=out_qlora.float(), factor=2, name="merged QLoRA logits")


def test_qlora_merge_and_unload_requantize_reports_its_error():
    model = qlora_llama(torch.bfloat16)
    dense = lowrank.merge_and_unload(copy.deepcopy(model))
    requant, report = lowrank.merge_and_unload(model, requantize=True, return_report=True)
    paths = sorted(report)
    assert paths and paths == sorted(n for n, m in requant.named_modules() if isinstance(m, lowrank.NF4Linear))
    for path in paths:
        merged_w = dense.get_submodule(path).weight.detach()
        q = requant.get_submodule(path)
        # the requantized layer is exactly quantize_nf4 of the merged dense weight
        again = lowrank.quantize_nf4(merged_w, blocksize=q.nf4.blocksize, double_quant=q.nf4.double_quant)
        assert torch.equal(q.nf4.dequantize(torch.float32), again.dequantize(torch.float32))
        err = q.nf4.dequantize(torch.float32) - merged_w.float()
        assert report[path]["rel_fro_error"] == pytest.approx((err.norm() / merged_w.float().norm()).item(), rel=1e-6)
        assert report[path]["max_abs_error"] == pytest.approx(err.abs().max().item(), rel=1e-6)
        assert 0.0 < report[path]["rel_fro_error"] < 0.2  # NF4's ~0.1 relative error, not garbage


@pytest.mark.gpu
def test_cuda_opcheck_and_model_roundtrip():
    w = (torch.randn(64, 72, device="cuda") * 0.02).bfloat16()
    a, b = (torch.randn(8, 72, device="cuda") * 0.05).bfloat16(), (torch.randn(64, 8, device="cuda") * 0.05).bfloat16()
    torch.library.opcheck(torch.ops.lowrank.merge_.default, (w.clone(), a, b, 2.0, True))
    model = tiny_llama(torch.bfloat16).cuda()
    lowrank.patch_linear(model, rank=8)
    randomize_lora_(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lowrank.merge(model)
    lowrank.unmerge(model)
    for n, p in model.named_parameters():
        assert_bits_equal(p.detach(), w0[n], n)


def test_packed_record_round_trips():
    """MergeState packs indices across 64Ki blocks (empty blocks, low bits >= 2^15) losslessly."""
    numel = 5 * 65536 + 123
    idx = torch.tensor([0, 1, 32767, 32768, 65535, 65536, 3 * 65536 + 40000, numel - 1], dtype=torch.int32)
    val = torch.randn(idx.numel()).bfloat16()
    state = MergeState.pack("a", 1.0, True, idx, val, numel, ())
    got_idx, got_val = state.unpack()
    assert torch.equal(got_idx, idx) and torch.equal(got_val, val)
    assert state.record_bytes() == 6 * 4 + idx.numel() * (2 + 2)


# ---------------------------------------------------------------------------------------------
# Tied and shared weights
# ---------------------------------------------------------------------------------------------

def test_merging_a_tied_output_head_is_refused():
    """lm_head tied to the input embeddings: merging its adapter in place used to change the
    embeddings too (logits off by ~36); refused, naming both, and nothing changes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=61, max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lowrank.patch_linear(model, rank=4, targets=["lm_head", "q_proj"])
    randomize_lora_(model, std=0.5)
    x = torch.randint(0, 61, (2, 7))
    before = logits(model, x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for call in (lambda: lowrank.merge(model), lambda: lowrank.merge_and_unload(model)):
        with pytest.raises(ValueError, match=r"layer lm_head's weight shares its storage with model\.embed_tokens\.weight"):
            call()
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
        assert not any(layer.merged for _, layer in lowrank.lora_layers(model))
        assert torch.equal(logits(model, x), before)


def test_merging_two_layers_that_share_one_weight_is_refused():
    """Two nn.Linear given one Parameter used to get the delta twice (and then refuse to unmerge)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))
    model[2].weight = model[0].weight
    lowrank.patch_linear(model, rank=2)
    randomize_lora_(model, std=0.3)
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer 0's weight shares its storage with 2\.base_layer\.weight"):
        lowrank.merge(model)
    assert torch.equal(model[0].weight, w0) and not model[0].merged and not model[2].merged
    # only one of them patched: merging it would silently change the other, unpatched layer
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))
    model[2].weight = model[0].weight
    lowrank.patch_linear(model, rank=2, targets=["0"])
    with pytest.raises(ValueError, match=r"shares its storage with 2\.weight"):
        lowrank.merge(model)


@pytest.mark.parametrize("edit", ["data_mul", "data_copy_permuted", "data_sign_of_zero", "lora_B_data"])
def test_unmerge_sees_edits_that_bypass_version_counters(edit):
    """An in-place edit through `.data` leaves the version counters alone: unmerge used to trust
    them and write W - s B A over the edited weight, giving back neither the original nor the edit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    lowrank.patch_linear(model, rank=2)
    randomize_lora_(model, std=0.3)
    if edit == "data_sign_of_zero":
        with torch.no_grad():
            model[2].base_layer.weight[3, 4] = 0.0
    lowrank.merge(model)
    w = model[2].base_layer.weight  # the last layer: the first must not be unmerged before the check
    with torch.no_grad():
        if edit == "data_mul":
            w.data.mul_(1.5)
        elif edit == "data_copy_permuted":
            w.data.copy_(w.data.flip(0))
        elif edit == "data_sign_of_zero":
            w.data[3, 4] = -0.0
        else:
            model[2].lora_B["default"].data.add_(1e-3)
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="changed since it was merged"):
        lowrank.unmerge(model)
    assert all(torch.equal(p, edited[n]) for n, p in model.named_parameters())
    assert model[0].merged and model[2].merged


def test_a_rank_above_256_patches_merges_and_unmerges():
    """One rank limit: what patches merges (rank 300: the pure-torch merge path), bit-exact back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(320, 40).to(torch.bfloat16))
    lowrank.patch_linear(model, rank=300)
    randomize_lora_(model, std=0.02)
    w0 = model[0].base_layer.weight.detach().clone()
    x = torch.randn(3, 320, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
        ref = merged_f64(model)(x.double())
    lowrank.merge(model)
    with torch.no_grad():
        assert_close(model(x), ref, baseline=y, name="merged rank 300")
    lowrank.unmerge(model)
    assert_bits_equal(model[0].base_layer.weight.detach(), w0, "after unmerge")


def test_merge_and_save_on_the_meta_device_say_so(tmp_path):
    """A model built on the meta device has shapes but no values: merge, merge_and_unload and
    save_adapter used to fail with torch's internal errors; now a ValueError names the layer."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    lowrank.patch_linear(model, rank=2)
    for call in (lambda: lowrank.merge(model), lambda: lowrank.merge_and_unload(model)):
        with pytest.raises(ValueError, match=r"layer 0: weight, lora_A, lora_B on the meta device"):
            call()
    with pytest.raises(ValueError, match=r"save_adapter: .*layer 0 .*meta device"):
        lowrank.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert all(isinstance(m, lowrank.LoRALinear) and not m.merged for m in model)


class _Tied(nn.Module):
    """Four linear slots; each is a new layer, the same module as an earlier slot, or a new layer
    given an earlier slot's weight Parameter."""

    def __init__(self, pattern):
        super().__init__()
        self.slots = nn.ModuleList()
        for kind, j in pattern:
            if kind == "alias" and self.slots:
                self.slots.append(self.slots[j % len(self.slots)])
            else:
                layer = nn.Linear(8, 8)
                if kind == "share" and self.slots:
                    layer.weight = self.slots[j % len(self.slots)].weight
                self.slots.append(layer)

    def forward(self, x):
        return sum(slot(x) for slot in self.slots)


@settings(max_examples=25)
@given(pattern=st.lists(st.tuples(st.sampled_from(["new", "alias", "share"]), st.integers(0, 3)), min_size=4,
                        max_size=4),
       targets=st.sets(st.integers(0, 3), min_size=1), seed=st.integers(0, 2**16))
def test_random_tying_patterns_merge_right_or_refuse(pattern, targets, seed):
    """Random aliasing and weight sharing: a merge either gives the merged model's outputs (each
    delta applied once, unmerge exact) or raises, with every weight as it was."""
    torch.manual_seed(seed)
    model = _Tied(pattern)
    chosen = {f"slots.{i}" for i in targets}
    lowrank.patch_linear(model, rank=2, targets=lambda path, m: path in chosen)
    randomize_lora_(model, std=0.3, seed=seed)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = model(x)
    weights = {id(p): p.detach().clone() for p in model.parameters()}
    try:
        lowrank.merge(model)
    except ValueError as exc:
        assert "shares its storage" in str(exc)
        assert all(torch.equal(p, weights[id(p)]) for p in model.parameters())
        return
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    lowrank.unmerge(model)
    assert all(torch.equal(p, weights[id(p)]) for p in model.parameters())


def _two_adapters(quantize=None):
    """tiny Llama (bf16) with 'default' on every linear layer and 'b' on q_proj only, 'b' active."""
    torch.manual_seed(0)
    model = tiny_llama(torch.bfloat16)
    lowrank.patch_linear(model, rank=8, quantize=quantize, compute_dtype=torch.bfloat16 if quantize else None)
    lowrank.add_adapter(model, "b", rank=4, targets=["q_proj"])
    randomize_lora_(model, std=0.1)
    lowrank.set_adapter(model, "b")
    return model


def test_an_adapter_on_some_layers_merges_into_those_and_leaves_the_rest():
    """merge / merge_and_unload of an adapter that only some layers hold (peft's rule, as its
    merge_and_unload(adapter_names=[...])): those layers get W + s B A rounded once, every other
    weight keeps its bits, and the merged model computes what it computed with the adapter active.
    unmerge undoes the layers that were merged; a name no layer holds is refused, nothing changed."""
    model = _two_adapters()
    ids = torch.randint(0, 97, (2, 11))
    weights0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    out_b, ref64 = logits(model, ids), logits(merged_f64(model), ids)
    holders = {p for p, layer in lowrank.lora_layers(model) if "b" in layer.configs}
    assert holders and all(p.endswith("q_proj") for p in holders)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        lowrank.merge(model, adapter_name="nope")
    for adapter_name in (None, "b"):
        lowrank.merge(model, adapter_name=adapter_name)
        assert {p for p, layer in lowrank.lora_layers(model) if layer.merged} == holders
        for path, layer in lowrank.lora_layers(model):
            w = layer.base_layer.weight.detach()
            if path in holders:
                w64 = weights0[f"{path}.base_layer.weight"].double() + layer.scaling("b") * (
                    layer.lora_B["b"].double() @ layer.lora_A["b"].double())
                assert_bits_equal(w, round_once(w64, torch.bfloat16), path)
            else:
                assert_bits_equal(w, weights0[f"{path}.base_layer.weight"], path)
        assert_close(logits(model, ids).float(), ref64, baseline=out_b.float(), factor=2, name="merged 'b'")
        lowrank.unmerge(model)
        for n, p in model.named_parameters():
            assert_bits_equal(p.detach(), weights0[n], f"{n} after unmerge")
    plain = lowrank.merge_and_unload(copy.deepcopy(model), adapter_name="b")
    assert not any(isinstance(m, lowrank.LoRALinear) for m in plain.modules())
    for path, layer in lowrank.lora_layers(model):
        w = plain.get_submodule(path).weight.detach()
        if path not in holders:
            assert_bits_equal(w, weights0[f"{path}.base_layer.weight"], path)
    assert_close(logits(plain, ids).float(), ref64, baseline=out_b.float(), factor=2, name="merge_and_unload 'b'")


def test_merge_and_unload_of_an_adapter_on_some_nf4_layers_keeps_the_others_quantized():
    """QLoRA: the layers holding the adapter are decoded and merged (dense nn.Linear), the others
    get their NF4 base back, codes untouched, as peft leaves a bitsandbytes layer without it."""
    model = _two_adapters(quantize="nf4")
    ids = torch.randint(0, 97, (2, 11))
    codes = {p: layer.base_layer.nf4.dequantize(torch.float32) for p, layer in lowrank.lora_layers(model)}
    holders = {p for p, layer in lowrank.lora_layers(model) if "b" in layer.configs}
    out_b, ref64 = logits(model, ids), logits(merged_f64(model), ids)
    plain = lowrank.merge_and_unload(model, adapter_name="b")
    for path, w in codes.items():
        module = plain.get_submodule(path)
        if path in holders:
            assert type(module) is nn.Linear and module.weight.dtype == torch.bfloat16, path
        else:
            assert isinstance(module, lowrank.NF4Linear), path
            assert torch.equal(module.nf4.dequantize(torch.float32), w), path
    assert_close(logits(plain, ids).float(), ref64, baseline=out_b.float(), factor=2, name="merged QLoRA 'b'")


@pytest.mark.parametrize("call", ["merge_and_unload", "merge-inexact"])
def test_an_overflow_in_the_last_layer_leaves_every_layer_as_it_was(call):
    """fp16, only the last LoRA layer's merge overflows: merge_and_unload (and merge(exact=False),
    neither able to take an inexact merge back) merged the 13 layers before it in place and then
    raised, naming no layer (found by a new-user audit). Every layer is checked first now: the
    error names the layer and no weight, flag or module changes."""
    model = tiny_llama(torch.float16)
    lowrank.patch_linear(model, rank=2)
    layers = list(lowrank.lora_layers(model))
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_B["default"].normal_(0, 0.01)
        path, last = layers[-1]
        last.lora_B["default"][0, 0], last.lora_A["default"][0, 0] = 1e6, 1e3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"layer {path}: the merged weight would overflow"):
        if call == "merge_and_unload":
            lowrank.merge_and_unload(model)
        else:
            lowrank.merge(model, exact=False)
    assert [p for p, _ in lowrank.lora_layers(model)] == [p for p, _ in layers]
    assert not any(layer.merged for _, layer in layers)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert_bits_equal(after[k], v, k)


def test_a_parametrized_weight_is_not_merged():
    """A parametrized weight (torch.nn.utils.parametrize) is computed on every access: merge wrote into
    a temporary, said nothing, and unmerge then refused for good (found by a new-user audit). Refused,
    naming the layer, nothing changed."""
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    nn.utils.parametrize.register_parametrization(model[0], "weight", Double())
    lowrank.patch_linear(model, rank=2)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            layer.lora_B["default"].normal_()
    x = torch.randn(3, 8)
    want = model(x)
    for call in (lowrank.merge, lowrank.merge_and_unload):
        with pytest.raises(NotImplementedError, match="layer 0: its weight is parametrized"):
            call(model)
        assert not any(layer.merged for _, layer in lowrank.lora_layers(model))
        assert torch.equal(model(x), want)
