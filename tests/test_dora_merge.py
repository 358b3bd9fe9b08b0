"""Merging DoRA adapters (lowrank/ops/dora_merge.py, lowrank.merge): one rounding against a float64
reference rounded once by numpy, bit-exact unmerge, merge_and_unload against peft 0.21.2."""
import copy
import warnings

import pytest
import torch

import lowrank
from lowrank.merge import record_fraction
from lowrank.ops.dora_merge import dora_merge_, dora_unmerge_
from tests.helpers import assert_bits_equal, assert_close
from tests.models import SMALL_MODELS, ids
from tests.oracles import round_once

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def problem(n, k, r, dtype, seed, conv1d=False, zero_rows=(), delta=0.3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g).t() if conv1d else torch.randn(n, k, generator=g)
    w[list(zero_rows)] = 0
    w = (w / k ** 0.5).to(dtype)
    if conv1d:  # stored (K, N) like GPT-2's Conv1D, handed over as its (N, K) transpose
        w = w.t().contiguous().t()
    a = torch.randn(r, k, generator=g) / k ** 0.5
    b = delta * torch.randn(n, r, generator=g)
    b[list(zero_rows)] = 0
    m = (w.double() + 2.0 * b.double() @ a.double()).norm(dim=1) * (1 + 0.1 * torch.randn(n, generator=g,
                                                                                            dtype=torch.float64))
    return w, a.to(dtype), b.to(dtype), m.to(dtype)


def merged_reference(w, a, b, m, s):
    """The dense float64 DoRA weight, rounded once by numpy (torch's float64 -> float16 rounds twice);
    scale 0 where the norm is 0 (the op's stated rule)."""
    full = w.double() + s * (b.double() @ a.double())
    n = stored_norms(full.norm(dim=1), m.dtype)
    scale = torch.where(n > 0, m.double() / torch.where(n > 0, n, 1.0), 0.0)
    return round_once(scale[:, None] * full, w.dtype)


def stored_norms(n, dtype):
    """The float64 norms as a magnitude of `dtype` holds them (the op divides m by these): rounded to
    float32, then to a 16-bit dtype; float64 as they are."""
    if dtype == torch.float64:
        return n
    return n.float().to(dtype).double()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("seed", [0, 1])
def test_merge_rounds_once_and_unmerge_is_bit_exact(dtype, conv1d, seed, monkeypatch):
    """Every merged element equals the float64 DoRA weight rounded once (numpy), including two zero
    rows (scale 0 there); unmerge gives the original bits back. Small blocks: several per layer."""
    monkeypatch.setattr("lowrank.ops.dora_merge._BLOCK_ELEMENTS", 2000)
    w, a, b, m = problem(67, 131, 5, dtype, seed, conv1d, zero_rows=(3, 40))
    orig = w.clone()
    scale, idx, val = dora_merge_(w, a, b, m, 2.0, exact=True)
    assert_bits_equal(w.contiguous(), merged_reference(orig, a, b, m, 2.0), "merged weight")
    assert scale.dtype == torch.float64 and torch.equal(scale[[3, 40]], torch.zeros(2, dtype=torch.float64))
    assert 0 < idx.numel() < w.numel()
    dora_unmerge_(w, a, b, 2.0, scale, idx, val)
    assert_bits_equal(w.contiguous(), orig.contiguous(), "unmerged weight")


def test_torch_double_rounding_would_fail_the_reference():
    """Why the reference goes through numpy: torch's float64 -> float16 rounds through float32 and
    differs from one rounding on some elements of a merge of this size; the op does not."""
    w, a, b, m = problem(256, 256, 8, torch.float16, 5)
    full = w.double() + 2.0 * (b.double() @ a.double())
    x64 = (m.double() / stored_norms(full.norm(dim=1), m.dtype))[:, None] * full
    once = round_once(x64, torch.float16)
    assert not torch.equal(x64.to(torch.float16), once)  # torch: two roundings somewhere
    dora_merge_(w, a, b, m, 2.0)
    assert_bits_equal(w, once)


def test_overflow_is_refused_before_anything_is_written():
    """|merged_ij| <= |m_i| (a unit direction times m), so only a magnitude wider than the weight can
    overflow it: an fp32 m of 1e6 over an fp16 weight."""
    w, a, b, m = problem(8, 16, 2, torch.float16, 0)
    m = m.float()
    m[5] = 1e6
    orig = w.clone()
    with pytest.raises(ValueError, match="overflow"):
        dora_merge_(w, a, b, m, 2.0)
    assert_bits_equal(w, orig)


def test_nan_in_factors_is_refused():
    w, a, b, m = problem(8, 16, 2, torch.float32, 0)
    m[1] = float("nan")
    orig = w.clone()
    with pytest.raises(ValueError, match="NaN"):
        dora_merge_(w, a, b, m, 2.0)
    assert_bits_equal(w, orig)


# -- the model level ---------------------------------------------------------------------------------
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def dora_model(arch, dtype=torch.float32):
    base = SMALL_MODELS[arch]().to(dtype)
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=8, targets=TARGETS[arch], dora=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, layer in lowrank.lora_layers(model):
            b = layer.lora_B["default"]
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
            layer.lora_magnitude_vector["default"].mul_(1 + 0.1 * torch.randn(b.shape[0], generator=g).to(dtype))
    return base, model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_merge_unmerge_round_trip(arch, dtype):
    """merge: outputs as the unmerged DoRA model's (float64 oracle: the DoRA op in float64); the
    weights are the once-rounded float64 DoRA weights; unmerge: every weight back bit for bit."""
    base, model = dora_model(arch, dtype)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        ref = copy.deepcopy(model).double()(input_ids=x).logits
    weights = {p: layer.base_layer.weight.detach().clone() for p, layer in lowrank.lora_layers(model)}
    lowrank.merge(model)
    for p, layer in lowrank.lora_layers(model):
        w_nk = weights[p].t() if layer.fan_in_fan_out else weights[p]
        expect = merged_reference(w_nk, layer.lora_A["default"], layer.lora_B["default"],
                                  layer.lora_magnitude_vector["default"], layer.scaling())
        assert_bits_equal(layer.base_weight_nk().contiguous(), expect, f"{p} merged")
        assert 0 < record_fraction(layer) < 3
    with torch.no_grad():
        merged = model(input_ids=x).logits
    assert_close(merged, ref, before)
    lowrank.unmerge(model)
    for p, layer in lowrank.lora_layers(model):
        assert_bits_equal(layer.base_layer.weight, weights[p], f"{p} unmerged")
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)


def test_unmerge_refuses_a_changed_magnitude():
    _, model = dora_model("llama")
    lowrank.merge(model)
    layer = next(layer for _, layer in lowrank.lora_layers(model))
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].data[0] += 1.0  # behind the version counter's back
    with pytest.raises(ValueError, match="magnitude"):
        lowrank.unmerge(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_matches_peft(arch):
    """lowrank's merge_and_unload of a DoRA adapter and peft's, from the same weights: plain layers
    whose logits are within twice peft's distance of the float64 DoRA model."""
    peft = pytest.importorskip("peft")
    base, model = dora_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS[arch],
                              fan_in_fan_out=arch == "gpt2")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    sd = {}
    for path, layer in lowrank.lora_layers(model):
        key = f"base_model.model.{path}"
        sd[f"{key}.lora_A.default.weight"] = layer.lora_A["default"].detach()
        sd[f"{key}.lora_B.default.weight"] = layer.lora_B["default"].detach()
        sd[f"{key}.lora_magnitude_vector.default.weight"] = layer.lora_magnitude_vector["default"].detach()
    assert not pm.load_state_dict(sd, strict=False).unexpected_keys
    x = ids()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(input_ids=x).logits
        theirs = pm.merge_and_unload()(input_ids=x).logits
        plain = lowrank.merge_and_unload(model)
        assert not list(lowrank.lora_layers(plain))
        ours = plain(input_ids=x).logits
    assert_close(ours, ref, theirs)


def test_save_pretrained_merged_writes_the_dora_weights(tmp_path):
    """save_pretrained(merged=True) goes through the same merge: the saved weights are the merged
    ones, no magnitude key is written, and the model is left bit for bit as it was."""
    transformers = pytest.importorskip("transformers")
    _, model = dora_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lowrank.save_pretrained(model, tmp_path, merged=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = ids()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(input_ids=x).logits
        assert_close(loaded(input_ids=x).logits, ref, model(input_ids=x).logits)
