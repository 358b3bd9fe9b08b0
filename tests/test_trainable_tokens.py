"""trainable_token_indices (lowrank/trainable_tokens.py): some embedding rows trained, the rest
frozen, as peft 0.21.2 does it (the oracle), tied heads following; files, merge, switching."""
import json

import pytest
import torch
import torch.nn as nn

import lowrank
from lowrank.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from lowrank.merge_files import merge_files
from tests.models import assert_same_snapshot, snapshot, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

IDS = [3, 7, 11]
MODELS = {"llama": (tiny_llama, ["q_proj"], "model.embed_tokens"),
          "gpt2": (tiny_gpt2, ["c_attn"], "transformer.wte")}


def tokens(seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (3, 6), generator=g)
    x[0, 1], x[1, 2], x[2, 0] = 7, 3, 11  # the trained tokens appear
    return x


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def peft_model(make, targets, seed=1):
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                                     trainable_token_indices=IDS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=g))
    return pm


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_files_both_ways(tmp_path, arch):
    make, targets, emb = MODELS[arch]
    pm = peft_model(make, targets)
    pm.save_pretrained(tmp_path / "peft")
    x = tokens()
    ref = logits(pm, x)
    model = make()
    lowrank.load_adapter(model, tmp_path / "peft")
    layer = model.get_submodule(emb)
    assert isinstance(layer, lowrank.TrainableTokens) and layer.token_indices["default"] == IDS
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    lowrank.save_adapter(model, tmp_path / "ours")
    assert json.load(open(tmp_path / "ours" / CONFIG_NAME))["trainable_token_indices"] == IDS
    a, b = load_file(tmp_path / "peft" / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(logits(back, x), ref, rtol=1e-5, atol=1e-5)


def _t5():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=97, decoder_start_token_id=0)).eval()


def _bart():
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=97, max_position_embeddings=32)).eval()


@pytest.mark.parametrize("make, targets", [(_t5, ["q", "v"]), (_bart, ["q_proj", "v_proj"])], ids=["t5", "bart"])
def test_encoder_decoder_embeddings_sharing_the_weight_follow_it(tmp_path, make, targets):
    """T5 and BART hold the input embedding's weight in three Embedding modules (shared, the encoder's
    and the decoder's embed_tokens; BART's scaled) and the tied head: trainable tokens were refused
    ("a head tied to trainable tokens must be an nn.Linear"; peft trains them). Every module holding
    the weight follows the rows: peft's file loads to peft's logits, and ours loads back into peft."""
    pm = peft_model(make, targets)
    pm.save_pretrained(tmp_path / "peft")
    x = tokens()

    def out(m):
        with torch.no_grad():
            return m(input_ids=x, decoder_input_ids=x).logits

    ref = out(pm)
    assert not torch.allclose(ref, out(make()))
    model = lowrank.load_adapter(make(), tmp_path / "peft")
    followers = [p for p, m in lowrank.patch.token_layers(model) if m.tied_to is not None]
    assert any("encoder.embed_tokens" in p for p in followers) and any("decoder.embed_tokens" in p for p in followers)
    torch.testing.assert_close(out(model), ref, rtol=1e-5, atol=1e-5)
    lowrank.save_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(out(back), ref, rtol=1e-5, atol=1e-5)
    fresh = lowrank.patch_linear(make(), config=peft.LoraConfig(r=4, target_modules=targets, trainable_token_indices=IDS))
    assert lowrank.trainable_parameters(fresh) == pm.get_nb_trainable_parameters()


def test_only_the_named_rows_train():
    model = lowrank.patch_linear(tiny_llama(), r=2, target_modules=["q_proj"], trainable_token_indices=IDS)
    layer = model.model.embed_tokens
    w0 = layer.base_layer.weight.detach().clone()
    assert torch.equal(layer.trainable_tokens_delta["default"], w0[IDS])  # starts as the rows themselves
    assert layer.trainable_tokens_delta["default"].requires_grad and not layer.base_layer.weight.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert torch.equal(layer.base_layer.weight, w0)
    rows = layer.trainable_tokens_delta["default"].detach()
    assert not torch.equal(rows, w0[IDS])
    # the lookup: the base rows everywhere but at the trained ids
    with torch.no_grad():
        got = layer(torch.arange(97))
    expect = w0.clone()
    expect[IDS] = rows
    assert torch.equal(got, expect)


def test_a_tied_head_follows_the_embedding():
    model = lowrank.patch_linear(tiny_gpt2(), r=2, target_modules=["c_attn"], trainable_token_indices=IDS)
    emb, head = model.transformer.wte, model.lm_head
    assert isinstance(head, lowrank.TrainableTokens) and head.tied_to is emb
    assert head.trainable_tokens_delta["default"] is emb.trainable_tokens_delta["default"]
    with torch.no_grad():
        emb.trainable_tokens_delta["default"].normal_()
    h = torch.randn(2, 48)
    w = emb.base_layer.weight.detach().clone()
    w[IDS] = emb.trainable_tokens_delta["default"].detach()
    torch.testing.assert_close(head(h), h @ w.t())
    # one parameter, counted once
    trainable, _ = lowrank.trainable_parameters(model)
    pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=IDS))
    assert trainable == pm.get_nb_trainable_parameters()[0]


def test_switch_disable_mix_delete_unpatch():
    model = tiny_llama()
    before = snapshot(model)
    x = tokens()
    plain = logits(model, x)
    lowrank.patch_linear(model, r=2, target_modules=["q_proj"], trainable_token_indices=IDS)
    lowrank.add_adapter(model, "b", r=2, target_modules=["v_proj"], trainable_token_indices=[7, 50])
    layer = model.model.embed_tokens
    with torch.no_grad():
        for rows in layer.trainable_tokens_delta.values():
            rows.normal_()
    a_out = logits(model, x)
    lowrank.set_adapter(model, "b")
    assert layer.active_adapter == "b" and layer.trainable_tokens_delta["b"].requires_grad
    assert not layer.trainable_tokens_delta["default"].requires_grad
    b_out = logits(model, x)
    with lowrank.disable_adapters(model):
        assert torch.equal(logits(model, x), plain)
    names = ["default", None, "b"]
    with lowrank.adapter_ids(model, names):
        mixed = logits(model, x)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], {"default": a_out, "b": b_out, None: plain}[name][row],
                                   rtol=1e-5, atol=1e-5)
    lowrank.delete_adapter(model, "b")
    assert list(layer.token_indices) == ["default"]
    torch.testing.assert_close(logits(model, x), a_out)
    lowrank.unpatch(model)
    assert_same_snapshot(snapshot(model), before)


def test_merge_and_unload_and_merged_save(tmp_path):
    model = lowrank.patch_linear(tiny_llama(), r=2, target_modules=["q_proj"], trainable_token_indices=IDS)
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta["default"].normal_()
        for _, layer in lowrank.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.2)
    x = tokens()
    ref = logits(model, x)
    lowrank.save_pretrained(model, tmp_path / "merged", merged=True)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(loaded, x), ref, rtol=1e-5, atol=1e-5)
    lowrank.save_adapter(model, tmp_path / "adapter")
    tiny_llama().save_pretrained(tmp_path / "base")
    merge_files(tmp_path / "base", tmp_path / "adapter", tmp_path / "streamed")
    streamed = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    merged = lowrank.merge_and_unload(model)
    assert type(merged.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(logits(merged, x), ref, rtol=1e-5, atol=1e-5)
    a, b = merged.state_dict(), streamed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merged_save_of_a_tied_embedding_writes_it_once(tmp_path):
    """GPT-2's head is tied to its embedding: the merged save wrote the embedding with the rows in
    place twice, a second copy under lm_head.weight (peft writes it once; found by a new-user trial).
    Now one tensor, as transformers writes a tied model; it loads to the patched model's logits."""
    model = lowrank.patch_linear(tiny_gpt2(), r=2, target_modules=["c_attn"], trainable_token_indices=IDS)
    with torch.no_grad():
        model.transformer.wte.trainable_tokens_delta["default"].normal_()
    x = tokens()
    ref = logits(model, x)
    lowrank.save_pretrained(model, tmp_path / "merged", merged=True)
    keys = load_file(tmp_path / "merged" / "model.safetensors").keys()
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(loaded, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,error,match", [
    ([3, 97], ValueError, "outside the vocabulary"),
    ([3, 3], ValueError, "lists a token twice"),
    ([], TypeError, "non-empty list"),
    ({"q_proj": [1]}, TypeError, "not an nn.Embedding"),
    ({"nope": [1]}, ValueError, "matches no module"),
    ("3", TypeError, "list of token ids"),
])
def test_bad_requests_leave_the_model_as_it_was(spec, error, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lowrank.patch_linear(model, r=2, target_modules=["v_proj"], trainable_token_indices=spec)
    assert_same_snapshot(snapshot(model), before)


def test_lora_and_tokens_on_one_embedding_refused():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="one way at a time"):
        lowrank.patch_linear(model, r=2, target_modules=["embed_tokens"], trainable_token_indices=IDS)
    assert_same_snapshot(snapshot(model), before)


def test_summary_counts_the_rows():
    model = lowrank.patch_linear(tiny_llama(), r=2, target_modules=["q_proj"], trainable_token_indices=IDS)
    s = lowrank.summary(model, print_summary=False)
    assert s.adapters[0].tokens == len(IDS)
    assert "tokens" in str(s)
