"""LoRA on nn.Embedding (LoRALinear over an embedding, peft's lora_embedding_A / _B): forward and
gradients against a float64 reference, merge with one rounding and exact unmerge, mixed batches,
and peft 0.21.2's files both ways."""

import pytest
import torch
import torch.nn as nn

import lowrank
from lowrank.adapter_files import WEIGHTS_NAME
from tests.helpers import assert_bits_equal, assert_close
from tests.models import assert_same_snapshot, snapshot, tiny_gpt2, tiny_llama
from tests.oracles import merged_f64, round_once

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

MODELS = {"llama": (tiny_llama, ["embed_tokens", "q_proj"], "model.embed_tokens"),
          "gpt2": (tiny_gpt2, ["wte", "c_attn"], "transformer.wte")}


def tokens(rows=3, seq=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (rows, seq), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def randomize_(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_embedding_is_wrapped_as_peft_does_and_starts_as_the_base():
    model = tiny_llama()
    x = tokens()
    ref = logits(model, x)
    lowrank.patch_linear(model, r=4, target_modules=["embed_tokens"])
    layer = model.model.embed_tokens
    assert isinstance(layer, lowrank.LoRALinear) and layer.embedding and layer.fan_in_fan_out
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert a.shape == (4, 97) and b.shape == (48, 4)
    assert torch.count_nonzero(a) == 0 and b.std() > 0.5  # peft's init: A = 0, B ~ N(0, 1)
    assert torch.equal(logits(model, x), ref)
    assert a.requires_grad and b.requires_grad and not layer.base_layer.weight.requires_grad


def test_all_linear_leaves_embeddings_alone():
    model = lowrank.patch_linear(tiny_llama(), r=2)
    assert not any(layer.embedding for _, layer in lowrank.lora_layers(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_gradients_match_float64(dtype):
    emb = nn.Embedding(50, 24, padding_idx=3).to(dtype)
    layer = lowrank.LoRALinear(emb)
    layer.add_adapter(lowrank.LoRAConfig(rank=5, alpha=7.0))
    with torch.no_grad():
        layer.lora_A["default"].normal_()
        layer.lora_B["default"].normal_(0, 0.2)
    x = torch.tensor([[1, 3, 49, 0], [3, 7, 7, 22]])
    y = layer(x)
    a64 = layer.lora_A["default"].detach().double().requires_grad_()
    b64 = layer.lora_B["default"].detach().double().requires_grad_()
    s = layer.scaling("default")
    ref = emb.weight.double()[x] + s * a64.t()[x] @ b64.t()
    # the baseline: plain torch in the layer's dtype
    a_lo = layer.lora_A["default"].detach().clone().requires_grad_()
    b_lo = layer.lora_B["default"].detach().clone().requires_grad_()
    base = emb.weight[x] + (a_lo.t()[x] @ b_lo.t()) * s
    assert_close(y.detach(), ref.detach(), base.detach(), name="forward")
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    base.backward(dy.to(dtype))
    ga, ga_lo = a64.grad.clone(), a_lo.grad.clone()
    ga[:, 3] = ga_lo[:, 3] = 0  # padding_idx: no gradient into its column, as nn.Embedding (and peft) do
    assert_close(layer.lora_A["default"].grad, ga, ga_lo, name="dA")
    assert_close(layer.lora_B["default"].grad, b64.grad, b_lo.grad, name="dB")
    assert torch.count_nonzero(layer.lora_A["default"].grad[:, 3]) == 0


def test_embed_scale_applies_to_the_adapter_too():
    class Scaled(nn.Embedding):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.embed_scale = 4.0

        def forward(self, x):
            return super().forward(x) * self.embed_scale

    emb = Scaled(20, 8)
    layer = lowrank.LoRALinear(emb)
    layer.add_adapter(lowrank.LoRAConfig(rank=2, alpha=2.0))
    with torch.no_grad():
        layer.lora_A["default"].normal_()
    x = torch.tensor([1, 5, 19])
    ref = 4.0 * (emb.weight.double()[x] + layer.lora_A["default"].double().t()[x] @ layer.lora_B["default"].double().t())
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_merge_rounds_once_and_unmerge_is_exact(dtype):
    model = lowrank.patch_linear(tiny_llama(dtype=dtype), r=4, target_modules=["embed_tokens"])
    randomize_(model, std=0.05)
    layer = model.model.embed_tokens
    w0 = layer.base_layer.weight.detach().clone()
    expect = round_once(w0.double() + layer.scaling() * (layer.lora_B["default"].double()
                                                          @ layer.lora_A["default"].double()).t(), dtype)
    lowrank.merge(model)
    assert_bits_equal(layer.base_layer.weight, expect, "merged embedding")
    lowrank.unmerge(model)
    assert_bits_equal(layer.base_layer.weight, w0, "unmerged embedding")


def test_merge_of_a_tied_embedding_is_refused():
    model = lowrank.patch_linear(tiny_gpt2(), r=4, target_modules=["wte"])
    randomize_(model)
    assert model.transformer.wte.base_layer.weight is model.lm_head.weight
    before = snapshot(model)
    with pytest.raises(ValueError, match="tied or shared"):
        lowrank.merge(model)
    assert_same_snapshot(snapshot(model), before)


def test_merge_and_unload_gives_an_embedding_back():
    model = lowrank.patch_linear(tiny_llama(), r=4, target_modules=["embed_tokens", "q_proj"])
    randomize_(model, std=0.05)
    x = tokens()
    ref = logits(merged_f64(model), x)
    out = lowrank.merge_and_unload(model)
    assert type(out.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(logits(out, x).double(), ref, rtol=1e-4, atol=1e-4)


def test_mixed_batch_rows_follow_their_adapter():
    model = lowrank.patch_linear(tiny_llama(), r=4, target_modules=["embed_tokens"])
    lowrank.add_adapter(model, "b", r=2, target_modules=["embed_tokens", "v_proj"])
    randomize_(model)
    x = tokens(rows=3)
    alone = {}
    for name in ("default", "b"):
        lowrank.set_adapter(model, name)
        alone[name] = logits(model, x)
    with lowrank.disable_adapters(model):
        alone[None] = logits(model, x)
    ids = ["b", None, "default"]
    with lowrank.adapter_ids(model, ids):
        mixed = logits(model, x)
    for row, name in enumerate(ids):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_files_both_ways(tmp_path, arch):
    make, targets, _ = MODELS[arch]
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    x = tokens()
    ref = logits(pm, x)
    model = make()
    lowrank.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    lowrank.save_adapter(model, tmp_path / "ours")
    theirs, ours = load_file(tmp_path / "peft" / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    # peft also writes the embedding's base weight (save_embedding_layers); lowrank writes the adapter only
    assert set(ours) == {k for k in theirs if not k.endswith("base_layer.weight")}
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert any(k.endswith("lora_embedding_A") for k in ours)
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(logits(back, x), ref, rtol=1e-5, atol=1e-5)


def test_a_file_with_another_base_embedding_is_refused(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                           init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors
    tensors[key] = tensors[key].clone()
    tensors[key][5] += 1.0  # a retrained token row
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="base weight differs from the model's"):
        lowrank.load_adapter(model, tmp_path)
    assert_same_snapshot(snapshot(model), before)


def test_linear_keys_on_an_embedding_are_refused(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                           init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    renamed = {k.replace("lora_embedding_A", "lora_A.weight").replace("lora_embedding_B", "lora_B.weight"): v
               for k, v in tensors.items()}
    save_file(renamed, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    model = tiny_llama()
    with pytest.raises(ValueError, match="lora_embedding_A/B are for nn.Embedding"):
        lowrank.load_adapter(model, tmp_path)


def test_qlora_leaves_the_embedding_dense():
    model = lowrank.patch_linear(tiny_llama(), r=4, target_modules=["embed_tokens", "q_proj"], quantize="nf4",
                                 compute_dtype=torch.float32)
    assert type(model.model.embed_tokens.base_layer) is nn.Embedding
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, lowrank.NF4Linear)
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    assert model.model.embed_tokens.lora_B["default"].grad is not None


def test_unpatch_restores_the_embedding():
    model = tiny_llama()
    before = snapshot(model)
    lowrank.patch_linear(model, r=4, target_modules=["embed_tokens"])
    lowrank.unpatch(model)
    assert_same_snapshot(snapshot(model), before)


def test_a_peft_file_with_lora_on_lm_head_loads(tmp_path):
    """peft counts lm_head among the embedding layers and writes its base weight into the file when
    lm_head is targeted; load_adapter refused that file ("not an nn.Embedding"; found by a new-user
    trial). The weight is accepted when it is the model's own (and refused when it is not, as an
    embedding's); the loaded model computes peft's logits."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                           init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    tensors = load_file(tmp_path / "ad" / WEIGHTS_NAME)
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in tensors
    x = torch.randint(0, 97, (2, 7))
    model = lowrank.load_adapter(tiny_llama(), tmp_path / "ad")
    torch.testing.assert_close(logits(model, x), logits(pm, x), rtol=1e-5, atol=1e-6)
    tensors[key][3] += 1.0
    save_file(tensors, tmp_path / "ad" / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.base_layer.weight: the file's base weight differs"):
        lowrank.load_adapter(tiny_llama(), tmp_path / "ad")
