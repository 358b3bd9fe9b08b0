"""The module layer: patch_linear / unpatch / trainable_parameters on real architectures."""
import math

import pytest
import torch
import torch.nn as nn

import lowrank
from lowrank import LoRALinear
from tests.helpers import backends
from tests.models import MODELS, assert_same_snapshot, input_ids, snapshot, tiny_gpt2, tiny_llama


class Toy(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16, bias=bias), nn.ReLU(), nn.Linear(16, 16, bias=bias))
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "v_proj": nn.Linear(16, 16)})
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.encoder(x)
        h = self.norm(self.attn["q_proj"](h) + self.attn["v_proj"](h))
        return self.lm_head(h)


def patched_paths(model):
    return sorted(name for name, _ in lowrank.lora_layers(model))


# -- init, forward, backward, unpatch on real architectures ----------------------------------------

@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_real_architecture_patch_train_unpatch(arch, dtype):
    model = MODELS[arch](dtype=dtype)
    ids = input_ids()
    with torch.no_grad():
        before = model(input_ids=ids)[0]
    snap = snapshot(model)
    lowrank.patch_linear(model, rank=4)
    assert patched_paths(model), "nothing patched"
    with torch.no_grad():
        at_init = model(input_ids=ids)[0]
    assert torch.equal(before, at_init), "B = 0 at init: outputs must be bit-identical to the base model"

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    model.train()
    out = model(input_ids=ids)
    sum(o.float().square().mean() for o in out.values() if torch.is_tensor(o) and o.is_floating_point()).backward()
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        elif not p.requires_grad:
            assert p.grad is None, name

    lowrank.unpatch(model)
    for p in model.parameters():
        p.grad = None
    model.eval()
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert_same_snapshot(snap, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids)[0], before)


def test_trained_adapter_changes_outputs_and_unpatch_restores():
    model = tiny_llama()
    ids = input_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lowrank.patch_linear(model, rank=8)
    for _, layer in lowrank.lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].normal_()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before)
    lowrank.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_all_linear_skips_the_output_head_and_conv1d_is_patched():
    gpt2 = lowrank.patch_linear(tiny_gpt2(), rank=2)
    paths = patched_paths(gpt2)
    assert "lm_head" not in paths and len(paths) == 2 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    layer = gpt2.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_A["default"].shape == (2, 48) and layer.lora_B["default"].shape == (144, 2)
    toy = lowrank.patch_linear(Toy(), rank=2)
    assert patched_paths(toy) == ["attn.q_proj", "attn.v_proj", "encoder.0", "encoder.2"]


# -- the count peft reports for Llama-3-8B, on the meta device ------------------------------------

@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]], ids=["all-linear", "seven-names"])
def test_llama3_8b_trainable_count_on_meta(targets):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    base_total = sum(p.numel() for p in model.parameters())
    lowrank.patch_linear(model, rank=16, targets=targets)
    trainable, total = lowrank.trainable_parameters(model)
    # per layer: r * (in + out) summed over the seven projections
    per_layer = 16 * ((4096 + 4096) + (4096 + 1024) * 2 + (4096 + 4096) + (4096 + 14336) * 2 + (14336 + 4096))
    assert trainable == 32 * per_layer == 41_943_040
    assert total == base_total + trainable


def test_llama3_8b_qlora_r64_count_matches_peft_on_meta():
    """QLoRA's usual r=64 on q, k, v, o: the count peft reports for the same model (54,525,952)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    with torch.device("meta"):
        ours, theirs = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    lowrank.patch_linear(ours, rank=64, targets=targets)
    peft_trainable, peft_total = get_peft_model(theirs, LoraConfig(r=64, target_modules=targets)).get_nb_trainable_parameters()
    assert lowrank.trainable_parameters(ours) == (peft_trainable, peft_total)
    assert peft_trainable == 32 * 64 * (2 * (4096 + 4096) + 2 * (4096 + 1024)) == 54_525_952


# -- the peft oracle ---------------------------------------------------------------------------

# fp32 with alpha 8 (scaling 2 or 4: exact in any order of rounding) must agree to 1e-6; float64
# with alpha 12 (scaling 3 or 6) to 1e-12. In fp32 with scaling 3 the two libraries round
# s * (T @ B^T) in a different order and the gradients of the first layer differ by ~1.2e-6. The
# Triton kernels also sum in another order (K tiles, the LoRA term folded into the accumulator):
# a few more fp32 ulps (1.3e-6 seen on GPT-2's c_attn dB), held to 5e-6.
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("dtype, alpha, tol, backend",
                         [(torch.float32, 8, 1e-6 if b == "reference" else 5e-6, b) for b in backends()]
                         + [(torch.float64, 12, 1e-12, "reference")],
                         ids=[f"fp32-{b}" for b in backends()] + ["fp64-reference"])
def test_matches_peft_outputs_and_gradients(arch, rslora, dtype, alpha, tol, backend, monkeypatch):
    """float64 runs the reference path only: the kernels take 16/32-bit floats."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("LOWRANK_BACKEND", backend)

    ids = input_ids()
    ours = MODELS[arch](seed=3, dtype=dtype)
    theirs = MODELS[arch](seed=3, dtype=dtype)
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    lowrank.patch_linear(ours, rank=4, alpha=alpha, targets=targets, rslora=rslora)
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                                               fan_in_fan_out=arch == "gpt2"), autocast_adapter_dtype=False)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    g = torch.Generator().manual_seed(5)
    for path, layer in lowrank.lora_layers(ours):
        a = (torch.randn(layer.lora_A["default"].shape, generator=g) * 0.1).to(dtype)
        b = (torch.randn(layer.lora_B["default"].shape, generator=g) * 0.1).to(dtype)
        with torch.no_grad():
            layer.lora_A["default"].copy_(a)
            layer.lora_B["default"].copy_(b)
            peft_layers[path].lora_A["default"].weight.copy_(a)
            peft_layers[path].lora_B["default"].weight.copy_(b)
    assert len(peft_layers) == len(list(lowrank.lora_layers(ours)))
    out_ours, out_theirs = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    rel = ((out_ours - out_theirs).norm() / out_theirs.norm()).item()
    assert rel <= tol, rel
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for path, layer in lowrank.lora_layers(ours):
        for which in ("lora_A", "lora_B"):
            mine = getattr(layer, which)["default"].grad
            ref = getattr(peft_layers[path], which)["default"].weight.grad
            err = ((mine - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            assert err <= tol, (path, which, err)


# -- hyper-parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("rank, alpha, rslora, expected", [
    (8, None, False, 2.0), (8, 4, False, 0.5), (16, 8, True, 2.0), (7, None, True, 14 / math.sqrt(7)),
])
def test_scaling(rank, alpha, rslora, expected):
    model = lowrank.patch_linear(Toy(), rank=rank, alpha=alpha, rslora=rslora)
    for _, layer in lowrank.lora_layers(model):
        assert layer.scaling() == pytest.approx(expected, rel=1e-12)


def test_kaiming_and_gaussian_init():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(1024, 8))
    layer = lowrank.patch_linear(big, rank=64)[0]
    a = layer.lora_A["default"]
    bound = 1 / math.sqrt(1024)  # kaiming-uniform with a=sqrt(5): bound = sqrt(6 / (6 * fan_in))
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    big = nn.Sequential(nn.Linear(1024, 8))
    a = lowrank.patch_linear(big, rank=32, init="gaussian")[0].lora_A["default"]
    assert a.std().item() == pytest.approx(1 / 32, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_over_a_16_bit_base_are_float32_as_in_peft(dtype):
    """Factors default to float32 over a float16 / bfloat16 base, as peft's autocast_adapter_dtype
    makes them (they took the base's dtype: a bf16 lora_A trained with AdamW at lr 1e-4 kept most of
    its elements, found by a new-user trial); adapter_dtype= chooses; outputs keep the base's dtype;
    gradients reach the fp32 factors, and a step moves every element of A."""
    torch.manual_seed(0)
    model = Toy().to(dtype)
    lowrank.patch_linear(model, rank=3)
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(Toy().to(dtype), peft.LoraConfig(r=3, target_modules="all-linear"))
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    for _, layer in lowrank.lora_layers(model):
        assert layer.lora_A["default"].dtype == torch.float32 and layer.lora_B["default"].dtype == torch.float32
        with torch.no_grad():
            layer.lora_B["default"].normal_()
    out = model(torch.randn(2, 8).to(dtype))
    assert out.dtype == dtype
    a0 = {p: layer.lora_A["default"].detach().clone() for p, layer in lowrank.lora_layers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out.float().square().sum().backward()
    opt.step()
    for p, layer in lowrank.lora_layers(model):
        assert bool((layer.lora_A["default"].detach() != a0[p]).all()), p
    same = lowrank.patch_linear(Toy().to(dtype), rank=3, adapter_dtype=dtype)
    assert {layer.lora_A["default"].dtype for _, layer in lowrank.lora_layers(same)} == {dtype}


def test_weight_is_not_copied():
    model = Toy()
    w = model.attn["q_proj"].weight
    lowrank.patch_linear(model, rank=2)
    assert model.attn["q_proj"].base_layer.weight is w and model.attn["q_proj"].weight is w


# -- targets and exclude ---------------------------------------------------------------------

@pytest.mark.parametrize("targets, exclude, expected", [
    (["q_proj"], None, ["attn.q_proj"]),
    (["attn.v_proj", "encoder.2"], None, ["attn.v_proj", "encoder.2"]),
    (r"attn\..*", None, ["attn.q_proj", "attn.v_proj"]),
    (r"encoder\.\d", None, ["encoder.0", "encoder.2"]),
    (lambda name, m: m.out_features == 16 and m.in_features == 16, None, ["attn.q_proj", "attn.v_proj", "encoder.2"]),
    ("all-linear", ["q_proj"], ["attn.v_proj", "encoder.0", "encoder.2"]),
    ("all-linear", r"encoder\..*", ["attn.q_proj", "attn.v_proj"]),
    (["lm_head"], None, ["lm_head"]),
], ids=["suffix", "dotted-suffix", "regex", "regex-digits", "callable", "exclude-list", "exclude-regex", "head"])
def test_target_forms(targets, exclude, expected):
    model = lowrank.patch_linear(Toy(), rank=2, targets=targets, exclude=exclude)
    assert patched_paths(model) == expected


def test_suffix_matching_is_per_component():
    with pytest.raises(ValueError, match="matched no linear layer"):
        lowrank.patch_linear(Toy(), rank=2, targets=["proj"])  # "q_proj" does not end in ".proj"


def test_second_adapter_on_patched_layers():
    model = lowrank.patch_linear(Toy(), rank=2)
    lowrank.patch_linear(model, rank=5, targets=["q_proj"], adapter_name="other")
    q = model.attn["q_proj"]
    assert set(q.configs) == {"default", "other"} and q.lora_A["other"].shape == (5, 16)
    assert not isinstance(q.base_layer, LoRALinear)


# -- bad input: a clear error and the model exactly as it was ------------------------------------

@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(rank=0), ValueError, "rank must be >= 1"),
    (dict(rank=-3), ValueError, "rank must be >= 1"),
    (dict(rank=4.0), TypeError, "rank must be an int"),
    (dict(rank=True), TypeError, "rank must be an int"),
    (dict(alpha=0), ValueError, "alpha"),
    (dict(alpha=-1.5), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha="16"), TypeError, "alpha"),
    (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(init="xavier"), ValueError, "init"),
    (dict(targets=["nope"]), ValueError, r"matched no linear layer.*q_proj"),
    (dict(targets=r"decoder\..*"), ValueError, "matched no linear layer"),
    (dict(targets=lambda n, m: False), ValueError, "matched no linear layer"),
    (dict(targets="all-linear", exclude=r".*"), ValueError, "matched no linear layer"),
    (dict(targets="(unclosed"), ValueError, "regular expression"),
    (dict(targets=[]), ValueError, "empty"),
    (dict(targets=[3]), TypeError, "module names"),
    (dict(targets=3), TypeError, "targets"),
    (dict(exclude="all-linear"), ValueError, "exclude"),
    (dict(adapter_name=""), ValueError, "adapter_name"),
    (dict(adapter_name="a.b"), ValueError, "adapter_name"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]!r}"[:24] for k in v))
def test_bad_arguments_leave_the_model_untouched(kwargs, exc, words):
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(exc, match=words):
        lowrank.patch_linear(model, **{"rank": 2, **kwargs})
    assert_same_snapshot(snap, snapshot(model))


def test_patching_twice_under_one_name_raises_and_changes_nothing():
    model = lowrank.patch_linear(Toy(), rank=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="'default' already exists"):
        lowrank.patch_linear(model, rank=4, targets=["q_proj", "lm_head"])
    assert_same_snapshot(snap, snapshot(model))
    assert "default" not in model.lm_head.__dict__.get("configs", {})


@pytest.mark.parametrize("thing", [torch.randn(3, 3), "model", None, [nn.Linear(2, 2)]],
                         ids=["tensor", "str", "None", "list"])
def test_non_module_is_a_type_error(thing):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lowrank.patch_linear(thing, rank=2)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lowrank.unpatch(thing)


def test_model_without_linear_layers_lists_nothing_to_patch():
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D"):
        lowrank.patch_linear(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), rank=2)


def test_unpatch_restores_requires_grad_flags():
    model = Toy()
    model.norm.weight.requires_grad_(False)
    snap = snapshot(model)
    lowrank.patch_linear(model, rank=2)
    assert not model.encoder[0].weight.requires_grad
    lowrank.unpatch(model)
    assert_same_snapshot(snap, snapshot(model))


# -- one module under several paths ------------------------------------------------------------

class TwoPaths(nn.Module):
    """One nn.Linear held twice by one parent and once more by a child: three paths, one module."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.a = shared
        self.b = shared  # named_children reports only `a`
        self.inner = nn.ModuleDict({"c": shared})
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.inner["c"](x) + self.other(x)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_a_module_under_several_paths_gets_one_lora_layer_everywhere(quantize):
    """It used to be wrapped under one path only (the others ran without the adapter)."""
    torch.manual_seed(0)
    model = TwoPaths()
    shared, other = model.a, model.other
    x = torch.randn(3, 8)
    lowrank.patch_linear(model, rank=2, quantize=quantize, compute_dtype=torch.float32)
    assert model.a is model.b is model.inner["c"] and isinstance(model.a, LoRALinear)
    assert sum(1 for _ in lowrank.lora_layers(model)) == 2  # the shared one counts once
    with torch.no_grad():
        model.a.lora_B["default"].normal_()
        expected = 3 * model.a(x) + model.other(x)
    assert torch.equal(model(x), expected)
    if quantize is None:
        lowrank.merge(model)
        with torch.no_grad():
            assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)  # merged once, not three times
        lowrank.unmerge(model)
    lowrank.unpatch(model)
    if quantize is None:
        assert model.a is model.b is model.inner["c"] is shared and model.other is other
    else:
        assert model.a is model.b is model.inner["c"] and type(model.a).__name__ == "NF4Linear"


def test_running_out_of_memory_while_adding_an_adapter_changes_nothing(monkeypatch):
    """Every new factor is allocated before any layer gets one: a failure in the allocation (out of
    memory) on the fourth layer used to leave the first three with the adapter."""
    model = lowrank.patch_linear(Toy(), rank=2)
    snap = snapshot(model)
    real, calls = LoRALinear.new_factors, []

    def flaky(self, config, *args, **kwargs):
        if len(calls) == 3:
            raise MemoryError("simulated out of memory")
        calls.append(1)
        return real(self, config, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "new_factors", flaky)
    with pytest.raises(MemoryError):
        lowrank.add_adapter(model, "second", rank=4)
    assert_same_snapshot(snap, snapshot(model))
    assert all(set(layer.configs) == {"default"} for _, layer in lowrank.lora_layers(model))


# -- peft's names and configs ----------------------------------------------------------------------

def _factors(model):
    return {p: (m.lora_A["default"].detach().clone(), m.lora_B["default"].detach().clone(), m.configs["default"])
            for p, m in lowrank.lora_layers(model)}


def test_peft_argument_names_are_aliases():
    """r, lora_alpha, lora_dropout, target_modules, exclude_modules, use_rslora do what rank, alpha,
    dropout, targets, exclude, rslora do: same layers, same settings, same initial factors."""
    out = []
    for kwargs in (dict(rank=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj"], exclude=["layers.1.self_attn.q_proj"],
                        rslora=True),
                   dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        exclude_modules=["layers.1.self_attn.q_proj"], use_rslora=True)):
        torch.manual_seed(0)
        model = tiny_llama()
        lowrank.patch_linear(model, **kwargs)
        out.append(_factors(model))
    assert out[0].keys() == out[1].keys() and len(out[0]) == 3
    for p in out[0]:
        assert torch.equal(out[0][p][0], out[1][p][0]) and out[0][p][2] == out[1][p][2]
    model = tiny_llama()
    lowrank.add_adapter(model, "second", r=2, target_modules=["k_proj"])
    assert {m.configs["second"].rank for _, m in lowrank.lora_layers(model)} == {2}


@pytest.mark.parametrize("kwargs,words", [
    (dict(rank=4, r=8), "both rank= and r="),
    (dict(alpha=4, lora_alpha=8), "both alpha= and lora_alpha="),
    (dict(targets=["q_proj"], target_modules=["v_proj"]), "both targets= and target_modules="),
    (dict(rank_of_lora=4), "unexpected keyword"),
])
def test_peft_names_given_twice_or_unknown_are_refused(kwargs, words):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match=words):
        lowrank.patch_linear(model, **kwargs)
    assert_same_snapshot(snapshot(model), before)


def test_no_match_lists_linear_layers_and_embeddings_apart():
    """The error for targets that match nothing lists the linear layers (the output head among them:
    it can be named) and, apart, the embeddings (adapted only when named)."""
    model = tiny_llama()
    with pytest.raises(ValueError) as info:
        lowrank.patch_linear(model, targets=["foo_proj"])
    msg = str(info.value)
    linear = msg.split("linear layers are named ", 1)[1].split("]", 1)[0]
    assert "'q_proj'" in linear and "'lm_head'" in linear and "embed_tokens" not in linear
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert f"({n_linear} layers," in msg
    assert "embeddings, adapted only when named, ['embed_tokens']" in msg


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_an_integer_input_is_a_type_error_as_for_nn_linear(quantize):
    """nn.Linear raises on an int64 input (token ids passed to the wrong module); LoRALinear cast it
    to the weight's dtype and computed. Now a TypeError naming the dtype, dense and NF4."""
    model = lowrank.patch_linear(nn.Sequential(nn.Linear(64, 32)), rank=4, quantize=quantize,
                                 compute_dtype=torch.float32 if quantize else None)
    with pytest.raises(TypeError, match="input of dtype torch.int64"):
        model(torch.ones(2, 64, dtype=torch.int64))
    assert model(torch.ones(2, 64)).dtype == torch.float32


def test_all_linear_names_the_weights_it_leaves_frozen():
    """transformers 5's Mixtral: the router (MixtralTopKRouter, a 2-D weight) and the fused experts
    (3-D parameters) are no nn.Linear; "all-linear" leaves them without LoRA, where peft adapts
    them, and now says so, naming them. A Llama (every weight a linear layer's or an embedding's)
    gets no such warning."""
    import warnings

    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=64)
    moe = transformers.MixtralForCausalLM(config)
    fused = [n for n, p in moe.named_parameters() if p.dim() == 3]
    with pytest.warns(UserWarning, match=r"3 other weight\(s\) stay frozen without LoRA, e.g\. "
                                         r"model\.layers\.0\.mlp\.gate\.weight, .*experts"):
        lowrank.patch_linear(moe, rank=2)
    assert fused and all("lora" not in n for n in fused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.patch_linear(tiny_llama(), rank=2)


def test_config_from_peft_selects_what_peft_selects():
    """patch_linear(config=LoraConfig(...)): the layers peft's get_peft_model adapts, at its rank,
    alpha, dropout and scaling; the same from the config's dict, with peft not imported by lowrank."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.05, target_modules=["q_proj", "down_proj"],
                          exclude_modules=["model.layers.0.mlp.down_proj"], use_rslora=True)
    reference = peft.get_peft_model(tiny_llama(), cfg)
    peft_layers = {n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for config in (cfg, cfg.to_dict(), {"r": 4, "lora_alpha": 12, "lora_dropout": 0.05, "use_rslora": True,
                                        "target_modules": ["q_proj", "down_proj"],
                                        "exclude_modules": ["model.layers.0.mlp.down_proj"]}):
        model = tiny_llama()
        lowrank.patch_linear(model, config=config)
        layers = dict(lowrank.lora_layers(model))
        assert set(layers) == peft_layers
        for p, layer in layers.items():
            c = layer.configs["default"]
            assert (c.rank, c.alpha, c.dropout, c.rslora) == (4, 12, 0.05, True)
            assert layer.scaling("default") == reference.get_submodule("base_model.model." + p).scaling["default"]


@pytest.mark.parametrize("fields", [{"target_modules": ["q_proj"]}, {"r": 16, "target_modules": ["q_proj"]},
                                    {"lora_alpha": 32, "target_modules": ["q_proj"]}],
                         ids=["no-r-no-alpha", "no-alpha", "no-r"])
def test_a_config_dict_without_r_or_lora_alpha_takes_peft_defaults(fields):
    """A dict of LoraConfig fields that leaves out r / lora_alpha: peft's defaults (r = 8,
    lora_alpha = 8, not lowrank's 2 x rank), the rank and scaling LoraConfig(**fields) gives."""
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**fields))
    model = lowrank.patch_linear(tiny_llama(), config=dict(fields))
    layers = dict(lowrank.lora_layers(model))
    assert layers
    for p, layer in layers.items():
        theirs = reference.get_submodule("base_model.model." + p)
        assert layer.configs["default"].rank == theirs.r["default"]
        assert layer.scaling("default") == theirs.scaling["default"]


def test_config_from_a_lowrank_config_and_conflicts():
    model = tiny_llama()
    lowrank.patch_linear(model, config=lowrank.LoRAConfig(rank=3, targets=["o_proj"], adapter_name="mine"))
    assert {(p.rsplit(".", 1)[-1], tuple(m.configs)) for p, m in lowrank.lora_layers(model)} == {("o_proj", ("mine",))}
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match="rank given both"):
        lowrank.patch_linear(model, rank=8, config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    with pytest.raises(TypeError, match="config must be a peft LoraConfig"):
        lowrank.patch_linear(model, config=["q_proj"])
    assert_same_snapshot(snapshot(model), before)


@pytest.mark.parametrize("field,value", [
    ("use_dora", "yes"), ("modules_to_save", "lm_head"), ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("rank_pattern", {"q_proj": 0}),
    ("alpha_pattern", {"(": 8}), ("init_lora_weights", "pissa"), ("bias", "all"),
    ("layers_to_transform", ["0"]), ("layers_pattern", "("), ("target_modules", None), ("peft_type", "LOHA"), ("lora_dropout", 1.5),
    ("r", 0), ("some_future_field", {"enabled": True}),
])
def test_config_fields_lowrank_does_not_do_are_named(field, value):
    """A config that asks for what lowrank does not do fails naming the field, model untouched;
    fields left at peft's 'off' default (None, false, {}) pass, whatever they are."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": False, "loftq_config": {},
              "megatron_config": None, "task_type": "CAUSAL_LM", "some_future_flag": False, field: value}
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=field):
        lowrank.patch_linear(model, config=config)
    assert_same_snapshot(snapshot(model), before)
    del config[field]
    config.setdefault("target_modules", ["q_proj"])
    config.setdefault("r", 4)
    lowrank.patch_linear(model, config=config)



@pytest.mark.parametrize("model_fn,config", [
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj", "model.layers.0.mlp.down_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[], layers_pattern="layers")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern=["blocks", "h"])),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[0, 1], layers_pattern="h")),
], ids=["list", "int-with-pattern", "whole-path-kept", "empty-list", "gpt2-patterns", "gpt2-both"])
def test_layers_to_transform_selects_the_layers_peft_selects(model_fn, config):
    """layers_to_transform / layers_pattern (lowrank: layers=, layers_pattern=): the layers that carry
    LoRA are those peft's get_peft_model adapts for the same config, through config= and through
    the arguments, and the patched model computes what peft's does."""
    peft = pytest.importorskip("peft")
    build = tiny_llama if model_fn == "llama" else tiny_gpt2
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", **config)
    reference = peft.get_peft_model(build(), cfg)
    want = sorted(p.removeprefix("base_model.model.") for p, m in reference.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))
    ours = lowrank.patch_linear(build(), config=cfg)
    assert sorted(p for p, _ in lowrank.lora_layers(ours)) == want
    args = dict(layers=config["layers_to_transform"], layers_pattern=config.get("layers_pattern"))
    by_args = lowrank.patch_linear(build(), rank=4, alpha=8, targets=config["target_modules"], **args)
    assert sorted(p for p, _ in lowrank.lora_layers(by_args)) == want
    # the same factors: the same outputs
    mods = dict(reference.named_modules())
    with torch.no_grad():
        for path, layer in lowrank.lora_layers(ours):
            src = mods["base_model.model." + path]
            layer.lora_A["default"].copy_(src.lora_A["default"].weight)
            layer.lora_B["default"].copy_(torch.randn_like(layer.lora_B["default"]))
            src.lora_B["default"].weight.copy_(layer.lora_B["default"])
    ids = torch.randint(0, 90, (2, 7))
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_layers_with_all_linear():
    """layers= also narrows "all-linear" (peft's LoraConfig refuses a string target_modules with
    layers_to_transform; lowrank reads "all-linear" as the list of names it stands for)."""
    model = lowrank.patch_linear(tiny_llama(), rank=4, layers=1)
    paths = [p for p, _ in lowrank.lora_layers(model)]
    assert paths and all(p.startswith("model.layers.1.") for p in paths)
    assert len(paths) == 7  # q, k, v, o, gate, up, down


def test_layers_to_transform_errors_name_the_problem():
    """layers= with a regex or callable targets, indices no target has, bad types, and a pattern alone
    are refused with the reason, the model untouched."""
    model = tiny_llama()
    before = snapshot(model)
    cases = [(dict(targets=r".*q_proj", layers=[0]), ValueError, "put the layer index in the expression"),
             (dict(targets=["q_proj"], layers=[7]), ValueError, r"leaves none of the 2 targeted layer\(s\); their "
                                                                  r"layer indices: \[0, 1\]"),
             (dict(targets=["q_proj"], layers=[0], layers_pattern="blocks"), ValueError, "none found"),
             (dict(targets=["q_proj"], layers=["0"]), TypeError, "layer index or a list"),
             (dict(targets=["q_proj"], layers=[-1]), ValueError, "negative"),
             (dict(targets=["q_proj"], layers=[0], layers_pattern="("), ValueError, "not a valid regular"),
             (dict(targets=["q_proj"], layers_pattern="layers"), ValueError, "without layers")]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            lowrank.patch_linear(model, rank=4, **kwargs)
        assert_same_snapshot(snapshot(model), before)


def test_rank_and_alpha_patterns_follow_pefts_matching_rule():
    """rank_pattern / alpha_pattern: per layer the rank and scaling peft's get_peft_model gives for
    the same config (first matching key in order, matched at the end of the path on a name boundary:
    "proj" matches nothing), through config= and through the arguments."""
    peft = pytest.importorskip("peft")
    rank_pattern = {r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 6, "proj": 99, r"mlp\..*": 3}
    alpha_pattern = {"v_proj": 5, r"layers\.1\..*": 7}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern)
    reference = peft.get_peft_model(tiny_llama(), cfg)
    expected = {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
                for n, m in reference.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for how in ("config", "arguments"):
        model = tiny_llama()
        if how == "config":
            lowrank.patch_linear(model, config=cfg)
        else:
            lowrank.patch_linear(model, r=4, lora_alpha=8, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        got = {p: (m.configs["default"].rank, m.scaling("default")) for p, m in lowrank.lora_layers(model)}
        assert got == expected
        assert {r for r, _ in got.values()} == {2, 3, 4, 6}
    model = tiny_llama()  # alpha left to lowrank's default: 2 * each layer's own rank
    lowrank.patch_linear(model, rank=4, rank_pattern={"q_proj": 8})
    assert {m.scaling("default") for _, m in lowrank.lora_layers(model)} == {2.0}
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] = 0"):
        lowrank.patch_linear(tiny_llama(), rank_pattern={"q_proj": 0})


def test_fp32_adapters_over_a_bf16_model():
    """adapter_dtype=float32 over a bfloat16 model (mixed precision, as peft's autocast_adapter_dtype):
    fp32 factors and gradients, outputs in bf16 and as close to a float64 reference as plain bf16
    LoRA, merge and merge_and_unload work."""
    from tests.helpers import assert_close

    model = lowrank.patch_linear(tiny_llama(dtype=torch.bfloat16), r=4, targets=["q_proj", "embed_tokens"],
                                 adapter_dtype=torch.float32)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling()
    ref = x.double() @ layer.base_layer.weight.double().t() + s * x.double() @ a.double().t() @ b.double().t()
    plain = x @ layer.base_layer.weight.t() + s * (x @ a.to(torch.bfloat16).t()) @ b.to(torch.bfloat16).t()
    assert_close(y.detach(), ref, plain)
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and a.grad.abs().sum() > 0
    emb = model.model.embed_tokens
    assert emb(torch.tensor([[1, 2]])).dtype == torch.bfloat16
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lowrank.merge(model)
    lowrank.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    with pytest.raises(TypeError, match="adapter_dtype"):
        lowrank.patch_linear(tiny_llama(), r=2, adapter_dtype=torch.int8)


class _Doubled(nn.Linear):
    """An nn.Linear subclass with a forward of its own."""

    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize("kind", ["subclass", "forward-hook", "pre-hook", "instance-forward"])
def test_a_base_layer_with_its_own_forward_is_called(kind):
    """A LoRA layer computed x @ W.T + b from the base layer's weight, so an nn.Linear subclass's own
    forward, forward hooks and a forward replaced on the instance (accelerate's hooks) were skipped
    (found by a new-user audit): the output at B = 0 was not the base model's. Now such a layer is
    called, and the LoRA branch added: base(x) + s B A x against float64, gradients to A and B."""
    torch.manual_seed(0)
    base = _Doubled(8, 6) if kind == "subclass" else nn.Linear(8, 6)
    calls = []
    if kind == "forward-hook":
        base.register_forward_hook(lambda mod, inp, out: calls.append(1) or out + 1.0)
    elif kind == "pre-hook":
        base.register_forward_pre_hook(lambda mod, inp: calls.append(1) or (inp[0] * 0.5,))
    elif kind == "instance-forward":
        plain = base.forward
        base.forward = lambda x: calls.append(1) or plain(x) - 3.0
    model = nn.Sequential(base)
    x = torch.randn(5, 8)
    want0 = model(x)
    lowrank.patch_linear(model, rank=2, alpha=4)
    assert torch.equal(model(x), want0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        ref = want0.double() + 2.0 * (x.double() @ a.double().t() @ b.double().t())
    out = model(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0
    if kind != "subclass":
        assert len(calls) == 3  # before patching, at B = 0, with B: once a forward
    if kind == "subclass":
        with pytest.raises(NotImplementedError, match="a _Doubled, has a forward of its own"):
            lowrank.merge(model)
        assert not layer.merged
        with pytest.raises(ValueError, match="0: DoRA over a _Doubled"):  # at patching, naming the layer
            lowrank.patch_linear(nn.Sequential(_Doubled(8, 6)), rank=2, dora=True)
        dora = lowrank.patch_linear(nn.Sequential(nn.Linear(8, 6)), rank=2, dora=True)
        dora[0].base_layer.register_forward_hook(lambda mod, inp, out: out)  # a hook added after patching
        with pytest.raises(NotImplementedError, match="DoRA over a Linear"):
            dora(x)


def test_falcon_linear_is_a_plain_linear():
    """transformers' FalconLinear (every Falcon projection) overrides forward with input @ W.T + b:
    LoRA keeps the fused op over it, and merge / DoRA work (the own-forward rule refused them; found
    in review). merge_and_unload gives the LoRA model's logits."""
    transformers = pytest.importorskip("transformers")
    from lowrank.layer_types import runs_own_forward

    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True, bias=False)
    model = transformers.FalconForCausalLM(cfg).eval()
    lowrank.patch_linear(model, rank=2, dora=True)
    layers = list(lowrank.lora_layers(model))
    assert layers and all(type(l.base_layer).__name__ == "FalconLinear" for _, l in layers)
    assert not any(runs_own_forward(l.base_layer) for _, l in layers)
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_B["default"].normal_(0, 0.1)
        x = torch.randint(0, 61, (2, 5))
        want = model(input_ids=x).logits
        merged = lowrank.merge_and_unload(model)
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-5)


def test_multihead_attention_is_not_adapted_through_its_out_proj():
    """nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj: "all-linear"
    patched it anyway, a LoRA layer that changed no output and got no gradient while counted as
    trainable (found by a new-user audit). It is left out, and the warning names it."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match=r"self_attn \(nn.MultiheadAttention\)"):
        lowrank.patch_linear(model, rank=2)
    assert sorted(path for path, _ in lowrank.lora_layers(model)) == ["linear1", "linear2"]
    assert type(model.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(ValueError, match="matched no linear layer"):
        lowrank.patch_linear(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), rank=2, targets=["out_proj"])


def test_a_model_with_peft_adapters_is_refused():
    """patch_linear on a get_peft_model result put LoRA on peft's own lora_A / lora_B Linears and
    froze peft's adapter, without a word (found by a new-user audit): refused, the model unchanged."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"is peft's PeftModel.*lowrank.load_adapter"):
        lowrank.patch_linear(model, rank=2)
    with pytest.raises(ValueError, match=r"q_proj is peft's"):
        lowrank.patch_linear(model.base_model.model, rank=2)
    assert_same_snapshot(snapshot(model), before)


def test_a_target_that_selects_a_layer_lora_cannot_adapt_is_refused():
    """targets=["projection", "q_proj"] on a model whose "projection" is an nn.Conv2d adapted q_proj
    and left the convolution out without a word (found by a new-user trial: peft adapts it); a
    MultiheadAttention's out_proj the same. Refused now, naming the module; the model unchanged."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.projection = nn.Conv2d(3, 8, 2)
            self.q_proj = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2)

    model = Net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"selects 'projection', a Conv2d, not an nn.Linear"):
        lowrank.patch_linear(model, rank=2, targets=["projection", "q_proj"])
    with pytest.raises(ValueError, match=r"selects 'attn.out_proj', the out_proj of the nn.MultiheadAttention"):
        lowrank.patch_linear(model, rank=2, targets=r".*(q|out)_proj")
    assert_same_snapshot(snapshot(model), before)
    lowrank.patch_linear(model, rank=2, targets=["projection", "q_proj"], exclude=["projection"])
    assert [p for p, _ in lowrank.lora_layers(model)] == ["q_proj"]
    # not what is inside an adaptable layer (the parametrization of a weight-normed q_proj), nor a norm
    net = nn.ModuleDict({"q_proj": nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)),
                         "q_norm": nn.LayerNorm(8)})
    lowrank.patch_linear(net, rank=2, targets=r".*q_.*")
    assert [p for p, _ in lowrank.lora_layers(net)] == ["q_proj"]


def test_a_linear_whose_weight_disagrees_with_its_features_is_refused():
    """An nn.Linear whose weight was swapped for one of another shape (in_features / out_features
    stale) patched without a word and failed in its first forward naming no module (found by a
    new-user audit): refused at patching, naming the layer, the model unchanged."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[0].weight = nn.Parameter(torch.randn(4, 8))
    model[0].bias = nn.Parameter(torch.zeros(4))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"0: nn.Linear\(in_features=8, out_features=8\) holds a weight of shape \(4, 8\)"):
        lowrank.patch_linear(model, rank=2)
    assert_same_snapshot(snapshot(model), before)
