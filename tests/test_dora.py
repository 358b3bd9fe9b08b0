"""DoRA at the model level: patch_linear(dora=True) / use_dora against peft 0.21.2's DoRA on the same
weights (Llama, GPT-2 Conv1D), outputs and gradients; the adapter's state and its checks."""
import copy
import dataclasses
import json
import warnings

import pytest
import torch

import lowrank
from lowrank.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from lowrank.lora_linear import LoRALinear
from tests.helpers import assert_close
from tests.models import SMALL_MODELS, ids, small_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def peft_dora(base, arch, r=4, alpha=8, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=True, target_modules=TARGETS[arch],
                              fan_in_fan_out=arch == "gpt2", **kwargs)
        return peft.get_peft_model(copy.deepcopy(base), cfg)


def trained_like_(pm, seed=1):
    """Move peft's DoRA adapter off its initial point (B = 0, m = ||W||): B random, m perturbed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def copy_from_peft_(model, pm, adapter="default"):
    """peft's A, B and m into lowrank's layers (same paths, peft's in-memory names)."""
    sd = pm.state_dict()
    with torch.no_grad():
        for path, layer in lowrank.lora_layers(model):
            key = f"base_model.model.{path}"
            layer.lora_A[adapter].copy_(sd[f"{key}.lora_A.{adapter}.weight"])
            layer.lora_B[adapter].copy_(sd[f"{key}.lora_B.{adapter}.weight"])
            layer.lora_magnitude_vector[adapter].copy_(sd[f"{key}.lora_magnitude_vector.{adapter}.weight"])


def grads_by_path(model, prefix=""):
    """{(layer path, 'A'|'B'|'m'): grad} for lowrank's model or a peft one."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        name = name.removeprefix("base_model.model.")
        for tag, short in ((".lora_A.", "A"), (".lora_B.", "B"), (".lora_magnitude_vector.", "m")):
            if tag in name:
                out[(name.split(tag)[0], short)] = p.grad
    return out


def loss_of(model, x):
    return model(input_ids=x).logits.float().square().mean()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_outputs_and_gradients_equal_peft_dora(arch):
    """Same weights in peft's DoRA (fp32 and float64) and in lowrank's: lowrank's logits and the
    gradients of every A, B and m are within twice peft-fp32's distance of peft in float64."""
    base = SMALL_MODELS[arch]()
    pm = peft_dora(base, arch)
    trained_like_(pm)
    pm64 = copy.deepcopy(pm).double()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=8, targets=TARGETS[arch], dora=True)
    copy_from_peft_(model, pm)
    x = ids()
    for m in (pm, pm64, model):
        m.train()  # dropout is 0: train mode only enables gradients' paths as in training
        loss_of(m, x).backward()
    with torch.no_grad():
        ours, theirs, ref = (m(input_ids=x).logits for m in (model, pm, pm64))
    assert not torch.allclose(ours, base(input_ids=x).logits, atol=1e-3), "the adapter must change the output"
    assert_close(ours, ref, theirs)
    g_ours, g_theirs, g_ref = grads_by_path(model), grads_by_path(pm), grads_by_path(pm64)
    assert set(g_ours) == set(g_theirs) == set(g_ref) and len(g_ours) == 3 * len(list(lowrank.lora_layers(model)))
    for key in g_ours:
        assert_close(g_ours[key], g_ref[key], g_theirs[key], factor=4.0, name=str(key))


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_a_dora_model_compiles_to_one_graph(quantize):
    """torch.compile(fullgraph=True) of a patched DoRA model (aot_eager: dynamo and AOT autograd are
    what break graphs): the cached ||W_i||^2 (keyed by the weight's storage address, which a graph
    cannot compare) is computed in the graph, and the norms' data-dependent recompute runs inside
    the op lowrank::dora_row_norms. Loss and every A, B and m gradient equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = lowrank.patch_linear(SMALL_MODELS["llama"](), rank=4, dora=True, quantize=quantize,
                                 compute_dtype=torch.float32 if quantize else None)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.2)
    x = ids()
    eager = loss_of(model, x)
    eager.backward()
    want = {k: g.clone() for k, g in grads_by_path(model).items()}
    model.zero_grad(set_to_none=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # a graph break raises
    got = compiled(input_ids=x).logits.float().square().mean()
    got.backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=0)
    grads = grads_by_path(model)
    assert set(grads) == set(want) and len(want) == 3 * len(list(lowrank.lora_layers(model)))
    for key, g in want.items():
        torch.testing.assert_close(grads[key], g, rtol=1e-4, atol=1e-7, msg=str(key))


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_a_dora_mixed_batch_compiles_to_one_graph(quantize):
    """A mixed batch (lowrank.adapter_ids) over DoRA adapters: its norms went through the Python
    dora_row_norms, whose data-dependent branch broke fullgraph (and recompiled per layer up to
    dynamo's limit, then ran eager; found by a new-user trial); now the lowrank::dora_row_norms /
    nf4_dora_row_norms ops. One graph, each row its own adapter's eager output."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    # q_proj and down_proj of both blocks: four DoRA layers, two kinds (all seven kinds compiled 2x longer)
    model = lowrank.patch_linear(SMALL_MODELS["llama"](), rank=4, dora=True, quantize=quantize,
                                 target_modules=["q_proj", "down_proj"],
                                 compute_dtype=torch.float32 if quantize else None, adapter_name="a")
    lowrank.add_adapter(model, "b", rank=2, dora=True)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            for b in layer.lora_B.values():
                b.normal_(0, 0.2)
    model.eval()
    x = ids(rows=3)
    rows = ["b", None, "a"]
    with torch.no_grad():
        want = {}
        for name in ("a", "b"):
            lowrank.set_adapter(model, name)
            want[name] = model(input_ids=x).logits
        with lowrank.disable_adapters(model):
            want[None] = model(input_ids=x).logits
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)  # a graph break raises
        with lowrank.adapter_ids(model, rows):
            got = compiled(input_ids=x).logits
    assert counter.frame_count == 1
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], want[name][i], rtol=1e-5, atol=1e-6, msg=f"row {i} ({name})")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_initial_magnitude_is_peft_s(arch):
    """A new DoRA adapter: m = ||W_i|| (the base output unchanged, B = 0), as peft initialises it:
    ours is the float64 norm rounded once, peft's an fp32 norm (within a few ulps of it)."""
    base = SMALL_MODELS[arch]()
    pm = peft_dora(base, arch)
    model = lowrank.patch_linear(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                 use_dora=True)
    sd = pm.state_dict()
    for path, layer in lowrank.lora_layers(model):
        m = layer.lora_magnitude_vector["default"]
        theirs = sd[f"base_model.model.{path}.lora_magnitude_vector.default.weight"]
        assert m.shape == (layer.out_features,) and m.requires_grad
        assert torch.equal(m, layer.base_weight_nk().double().norm(dim=1).float())
        torch.testing.assert_close(m, theirs, rtol=1e-6, atol=0)
    x = ids()
    with torch.no_grad():
        assert_close(model(input_ids=x).logits, base.double()(input_ids=x).logits, base.float()(input_ids=x).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_new_dora_adapter_leaves_the_outputs_bit_for_bit(arch, dtype):
    """At initialisation (B = 0, m = the row norms) a DoRA model computes the base model's logits bit
    for bit, as peft's does: the scale m / n is exactly 1 because the forward divides by the norms
    rounded as m holds them (fp32 master m, cast to a 16-bit weight's dtype; ops.dora.magnitude_rounded).
    It used to divide by the float64 norm: ~a quarter of the rows scaled by 1 - 2^-24 (fp32), logits
    off by up to 4e-3 in bf16."""
    base = SMALL_MODELS[arch]().to(dtype)
    x = ids()
    with torch.no_grad():
        want = base(input_ids=x).logits
        model = lowrank.patch_linear(copy.deepcopy(base), rank=4, targets=TARGETS[arch], dora=True)
        assert all(layer.lora_magnitude_vector["default"].dtype == torch.float32
                   for _, layer in lowrank.lora_layers(model))
        assert torch.equal(model(input_ids=x).logits, want)
        model = lowrank.patch_linear(copy.deepcopy(base), rank=4, targets=TARGETS[arch], dora=True,
                                     adapter_dtype=dtype)  # a master m in the weight's own dtype
        assert torch.equal(model(input_ids=x).logits, want)
        lowrank.merge(model)  # scale 1: the merged weights are the base's
        mods = dict(base.named_modules())
        for path, layer in lowrank.lora_layers(model):
            w0 = mods[path].weight  # nn.Linear (out, in); GPT-2's Conv1D (in, out)
            assert torch.equal(layer.base_weight_nk(), w0 if arch == "llama" else w0.t()), path
        assert torch.equal(model(input_ids=x).logits, want)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_new_dora_adapter_on_nf4_leaves_the_outputs_bit_for_bit(compute):
    """The same over NF4 bases (m = the dequantized weight's row norms in the compute dtype): the
    DoRA model's logits are the plain QLoRA model's (B = 0: the base's) bit for bit."""
    base = small_llama()
    x = ids()
    with torch.no_grad():
        plain = lowrank.patch_linear(copy.deepcopy(base), rank=4, quantize="nf4", compute_dtype=compute)
        dora = lowrank.patch_linear(copy.deepcopy(base), rank=4, quantize="nf4", compute_dtype=compute, dora=True)
        assert torch.equal(dora(input_ids=x).logits, plain(input_ids=x).logits)


def test_peft_config_and_dict_give_a_dora_adapter():
    base = SMALL_MODELS["llama"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    for config in (cfg, cfg.to_dict()):
        model = lowrank.patch_linear(copy.deepcopy(base), config=config)
        layers = list(lowrank.lora_layers(model))
        assert layers and all(layer.configs["default"].dora and "default" in layer.lora_magnitude_vector
                              for _, layer in layers)
    with pytest.raises(TypeError, match="dora"):
        lowrank.patch_linear(copy.deepcopy(base), dora=True, use_dora=True)


def test_trainable_flags_follow_the_active_adapter():
    """The magnitude is trainable with its adapter and frozen with it (set_adapter, add_adapter)."""
    model = lowrank.patch_linear(SMALL_MODELS["llama"](), rank=2, targets=["q_proj"], dora=True)
    lowrank.add_adapter(model, "plain", rank=2, targets=["q_proj"])
    lowrank.add_adapter(model, "other", rank=2, targets=["q_proj"], dora=True)
    layer = next(layer for _, layer in lowrank.lora_layers(model))
    assert layer.lora_magnitude_vector["default"].requires_grad
    assert not layer.lora_magnitude_vector["other"].requires_grad
    lowrank.set_adapter(model, "other")
    assert layer.lora_magnitude_vector["other"].requires_grad
    assert not layer.lora_magnitude_vector["default"].requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".other" in n for n in trainable) and any("lora_magnitude_vector" in n for n in trainable)
    lowrank.delete_adapter(model, "other")
    assert set(layer.lora_magnitude_vector) == {"default"}
    assert "dora=['default']" in repr(layer)


def mixed_model(arch="llama", dropout=0.0, quantize=None):
    """Adapters "d" (DoRA, r=4), "l" (plain LoRA, r=8) and "e" (DoRA, r=2, q/v or c_attn only), moved
    off their initial point."""
    base = SMALL_MODELS[arch]()
    model = copy.deepcopy(base)
    extra = {} if quantize is None else dict(quantize=quantize, compute_dtype=torch.float32)
    lowrank.patch_linear(model, rank=4, alpha=8, dora=True, dropout=dropout, adapter_name="d", **extra)
    lowrank.add_adapter(model, "l", rank=8, alpha=8, dropout=dropout)
    lowrank.add_adapter(model, "e", rank=2, alpha=4, dora=True, dropout=dropout,
                        targets=["q_proj", "v_proj"] if arch == "llama" else ["c_attn"])
    trained_like_(model, seed=4)
    for n, p in model.named_parameters():  # every adapter trained in one batch: asked for
        if ".lora_" in n:
            p.requires_grad_(True)
    return base, model


MIXED_ROWS = ["d", None, "l", "e", "d", "l"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_of_dora_and_lora_rows(arch):
    """Rows on DoRA adapters, a LoRA adapter and the base model in one batch (one sgmv a layer): each
    row's logits as its adapter's alone (float64 oracle: the model in float64 on that adapter alone),
    and each adapter's gradients (A, B and DoRA's m) equal to those of its own rows run alone."""
    _, model = mixed_model(arch)
    x = ids(rows=len(MIXED_ROWS), seq=5)
    wts = torch.randn(len(MIXED_ROWS), 5, 61)
    model.zero_grad()
    with lowrank.adapter_ids(model, MIXED_ROWS):
        out = model(input_ids=x).logits
        (out * wts).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name in ("d", "l", "e", None):
        sel = [i for i, r in enumerate(MIXED_ROWS) if r == name]
        alone, alone64 = copy.deepcopy(model), copy.deepcopy(model).double()
        for m in (alone, alone64):
            m.zero_grad()
        if name is None:
            with torch.no_grad(), lowrank.disable_adapters(alone), lowrank.disable_adapters(alone64):
                own, ref = alone(input_ids=x[sel]).logits, alone64(input_ids=x[sel]).logits
            assert_close(out[sel].detach(), ref, own, name="base rows")
            continue
        outs = []
        for m, w in ((alone, wts[sel]), (alone64, wts[sel].double())):
            lowrank.set_adapter(m, name)
            o = m(input_ids=x[sel]).logits
            (o * w).sum().backward()
            outs.append(o.detach())
        assert_close(out[sel].detach(), outs[1], outs[0], name=f"rows of {name}")
        g_alone, g_ref = dict(alone.named_parameters()), dict(alone64.named_parameters())
        keys = [k for k in mixed if f".{name}" in k.rsplit(".lora_", 1)[-1]]
        assert keys and (name == "l" or any("magnitude" in k for k in keys))
        for k in keys:
            assert_close(mixed[k], g_ref[k].grad, g_alone[k].grad, factor=4.0, name=k)


def test_mixed_batch_with_dropout_matches_the_formula():
    """With dropout the mixed path computes peft's formula per row: checked against the same model in
    float64 with the same dropout mask (same seed, same draws)."""
    _, model = mixed_model(dropout=0.25)
    model.train()
    model64 = copy.deepcopy(model).double()
    x = ids(rows=len(MIXED_ROWS), seq=5)
    outs = []
    for m in (model, model64):
        torch.manual_seed(21)
        with lowrank.adapter_ids(m, MIXED_ROWS):
            outs.append(m(input_ids=x).logits.detach())
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0].double(), outs[1], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.eval()
        with lowrank.adapter_ids(model, MIXED_ROWS):
            assert not torch.allclose(model(input_ids=x).logits, outs[0], atol=1e-3)  # dropout did act


def test_mixed_batch_on_nf4_dora():
    """QLoRA bases: DoRA rows in a mixed batch as the adapter alone (fp32 compute)."""
    _, model = mixed_model(quantize="nf4")
    x = ids(rows=len(MIXED_ROWS), seq=4)
    with torch.no_grad():
        with lowrank.adapter_ids(model, MIXED_ROWS):
            out = model(input_ids=x).logits
        for name in ("d", "l"):
            sel = [i for i, r in enumerate(MIXED_ROWS) if r == name]
            lowrank.set_adapter(model, name)
            alone = model(input_ids=x[sel]).logits
            torch.testing.assert_close(out[sel], alone, rtol=2e-5, atol=2e-5)


def test_lora_config_validates_dora():
    with pytest.raises(TypeError, match="dora"):
        lowrank.LoRAConfig(dora="yes")
    assert lowrank.LoRAConfig(dora=True).dora


def test_summary_counts_the_magnitude():
    model = lowrank.patch_linear(SMALL_MODELS["llama"](), rank=2, targets=["q_proj"], dora=True)
    s = lowrank.summary(model, print_summary=False)
    layers = [layer for _, layer in lowrank.lora_layers(model)]
    expect = sum(sum(p.numel() for p in layer.adapter_parameters("default")) for layer in layers)
    assert s.adapters[0].params == expect == lowrank.trainable_parameters(model)[0]


def test_layer_forward_runs_the_dora_op():
    """LoRALinear over nn.Linear with dropout in train mode: peft's dropout formula (same mask)."""
    lin = torch.nn.Linear(20, 12)
    layer = LoRALinear(lin)
    layer.add_adapter(lowrank.LoRAConfig(rank=3, alpha=6, dropout=0.3, dora=True))
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(4, 20)
    torch.manual_seed(5)
    got = layer.train()(x)
    torch.manual_seed(5)
    h = torch.nn.functional.dropout(x, 0.3, training=True)
    w64, a64, b64 = lin.weight.double(), layer.lora_A["default"].double(), layer.lora_B["default"].double()
    m64 = layer.lora_magnitude_vector["default"].double()
    scale = m64 / (w64 + 2 * b64 @ a64).norm(dim=1)
    ref = x.double() @ w64.t() + lin.bias.double() + (scale - 1) * (h.double() @ w64.t()) \
        + scale * 2 * (h.double() @ a64.t() @ b64.t())
    assert_close(got.detach(), ref)


# -- files: peft's DoRA format both ways -------------------------------------------------------------
def load_peft(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_file_lowrank_to_peft(tmp_path, arch):
    """save_adapter writes use_dora: true and `<path>.lora_magnitude_vector` keys (as peft does): peft
    loads the file to the same A, B, m and the same logits (float64 peft as the oracle)."""
    base = SMALL_MODELS[arch]()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=8, targets=TARGETS[arch], dora=True)
    trained_like_(model)
    lowrank.save_adapter(model, tmp_path)
    config = json.load(open(tmp_path / CONFIG_NAME))
    assert config["use_dora"] is True and config["fan_in_fan_out"] == (arch == "gpt2")
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    expect = {f"base_model.model.{p}.{k}" for p, _ in lowrank.lora_layers(model)
              for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    assert set(tensors) == expect
    pm = load_peft(base, tmp_path)
    sd = pm.state_dict()
    for path, layer in lowrank.lora_layers(model):
        key = f"base_model.model.{path}"
        assert torch.equal(sd[f"{key}.lora_magnitude_vector.default.weight"], layer.lora_magnitude_vector["default"])
        assert torch.equal(sd[f"{key}.lora_B.default.weight"], layer.lora_B["default"])
    x = ids()
    with torch.no_grad():
        ours, theirs, ref = model(input_ids=x).logits, pm(input_ids=x).logits, copy.deepcopy(pm).double()(
            input_ids=x).logits
    assert not torch.allclose(ours, base(input_ids=x).logits, atol=1e-3)
    assert_close(ours, ref, theirs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_file_peft_to_lowrank(tmp_path, arch):
    """A DoRA adapter saved by peft 0.21.2 loads as a DoRA adapter: the same A, B, m bit for bit, the
    same logits as peft; saved again by lowrank, the file holds the same tensors under the same keys."""
    base = SMALL_MODELS[arch]()
    pm = peft_dora(base, arch)
    trained_like_(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    model = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    sd = pm.state_dict()
    for path, layer in lowrank.lora_layers(model):
        key = f"base_model.model.{path}"
        assert layer.configs["default"].dora
        assert torch.equal(layer.lora_magnitude_vector["default"], sd[f"{key}.lora_magnitude_vector.default.weight"])
        assert torch.equal(layer.lora_A["default"], sd[f"{key}.lora_A.default.weight"])
    x = ids()
    with torch.no_grad():
        ours, theirs, ref = (m(input_ids=x).logits for m in (model, pm.eval(), copy.deepcopy(pm).double()))
    assert_close(ours, ref, theirs)
    lowrank.save_adapter(model, tmp_path / "ours")
    a, b = load_file(tmp_path / "peft" / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _dora_file(tmp_path, base):
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, targets=["q_proj"], dora=True)
    lowrank.save_adapter(model, tmp_path)
    return json.load(open(tmp_path / CONFIG_NAME)), load_file(tmp_path / WEIGHTS_NAME)


@pytest.mark.parametrize("case", ["magnitude-missing", "magnitude-without-use_dora", "magnitude-shape",
                                  "magnitude-nan", "dora-over-lora"])
def test_bad_dora_files_are_refused_and_change_nothing(tmp_path, case):
    base = SMALL_MODELS["llama"]()
    config, tensors = _dora_file(tmp_path, base)
    mag = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    target = copy.deepcopy(base)
    if case == "magnitude-missing":
        del tensors[mag]
        words = "lora_magnitude_vector missing"
    elif case == "magnitude-without-use_dora":
        config["use_dora"] = False
        words = "use_dora false"
    elif case == "magnitude-shape":
        tensors[mag] = tensors[mag][:-1].clone()
        words = "lora_magnitude_vector: shape"
    elif case == "magnitude-nan":
        tensors[mag][0] = float("nan")
        words = "NaN"
    else:
        target = lowrank.patch_linear(target, rank=4, targets=["q_proj"])
        words = "DoRA adapter in the file but not in the model"
    config.pop("lowrank_settings", None)
    json.dump(config, open(tmp_path / CONFIG_NAME, "w"))
    save_file(tensors, tmp_path / WEIGHTS_NAME)  # without lowrank's stamp: a hand-made file
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=words):
        lowrank.load_adapter(target, tmp_path)
    after = target.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_save_refuses_mixed_dora_and_lora_layers(tmp_path):
    """One adapter name, DoRA on some layers and plain LoRA on others: a peft file cannot say so."""
    model = lowrank.patch_linear(SMALL_MODELS["llama"](), rank=2, targets=["q_proj"], dora=True)
    with pytest.raises(ValueError, match="adapter 'default' already exists"):  # one name, one adapter
        lowrank.patch_linear(model, rank=2, targets=["v_proj"])
    # (built below the public API: a layer of the adapter turned plain LoRA)
    _, layer = next(iter(lowrank.lora_layers(model)))
    del layer.lora_magnitude_vector["default"]
    layer.configs["default"] = dataclasses.replace(layer.configs["default"], dora=False)
    with pytest.raises(ValueError, match="dora"):
        lowrank.save_adapter(model, tmp_path / "x")


def test_cached_weight_norms_follow_the_weight():
    """||W_i||^2 is cached per layer; an in-place update (version counter), a `.data =` swap and
    clear_weight_cache() after an edit through `.data` each give the new weight's norms."""
    lin = torch.nn.Linear(16, 8)
    layer = LoRALinear(lin)
    layer.add_adapter(lowrank.LoRAConfig(rank=2, dora=True))
    x = torch.randn(3, 16)

    def expect():
        return lin.weight.double().square().sum(1)

    first = layer.weight_sq_norms()
    assert torch.equal(first, expect()) and layer.weight_sq_norms() is first  # cached
    with torch.no_grad():
        lin.weight.mul_(2.0)
    assert torch.equal(layer.weight_sq_norms(), expect())
    lin.weight.data = torch.randn(8, 16)
    assert torch.equal(layer.weight_sq_norms(), expect())
    lin.weight.data.add_(1.0)  # no version counter sees this one
    layer.clear_weight_cache()
    assert torch.equal(layer.weight_sq_norms(), expect())
    m = layer.lora_magnitude_vector["default"]
    ref = (m.double() / lin.weight.double().norm(dim=1))[None] * (x.double() @ lin.weight.double().t()) \
        + lin.bias.double()
    assert_close(layer(x).detach(), ref)


def test_autocast_norms_are_of_the_weight_the_gemm_sees():
    """Under torch.autocast(bf16) an fp32 layer's GEMMs see W in bf16: the norms are taken of that
    W, and a ||W||^2 given for the fp32 weight (the layer's cache) is not used -- here a wrong one,
    which would show. Equal to the op on bf16-cast inputs, and the layer's forward too."""
    lin = torch.nn.Linear(40, 24).requires_grad_(False)  # frozen, as patch_linear leaves it
    layer = LoRALinear(lin)
    layer.add_adapter(lowrank.LoRAConfig(rank=3, dora=True))
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(5, 40)
    a, b, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    bf = [t.detach().bfloat16() for t in (x, lin.weight, a, b, m, lin.bias)]
    bf[4].requires_grad_()  # as the layer's m: the same code path (y kept apart from v)
    expect = lowrank.ops.dora_linear(bf[0], bf[1], bf[2], bf[3], bf[4], layer.scaling(), bf[5])
    wrong = 4.0 * layer.weight_sq_norms()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lowrank.ops.dora_linear(x, lin.weight, a, b, m, layer.scaling(), lin.bias, weight_sq=wrong)
        from_layer = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expect) and torch.equal(from_layer, expect)


def test_a_zero_weight_row_gives_nan_in_peft_and_the_bias_here():
    """peft 0.21.2 divides m = ||W_i|| = 0 by the norm 0 on an all-zero weight row: NaN at step 0.
    Here that row outputs its bias (scale 0, the stated rule), the other rows are peft's, and every
    gradient is finite."""
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(8, 6)
    with torch.no_grad():
        holder.proj.weight[2] = 0
    ours = lowrank.patch_linear(copy.deepcopy(holder), rank=2, alpha=4, targets=["proj"], dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], use_dora=True),
                                     holder)
    x = torch.randn(3, 8)
    theirs, mine = holder.proj(x), ours.proj(x)
    assert torch.isnan(theirs[:, 2]).all() and not torch.isnan(theirs[:, [0, 1, 3, 4, 5]]).any()
    assert torch.equal(mine[:, 2], ours.proj.bias[2].expand(3))
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(mine[:, keep], theirs[:, keep], rtol=1e-6, atol=1e-6)
    mine.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.proj.adapter_parameters("default"))
