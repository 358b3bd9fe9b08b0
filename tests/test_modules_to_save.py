"""modules_to_save (lowrank/modules_to_save.py, patch_linear, adapter files): whole modules trained
beside their frozen originals, in peft's layout, with peft 0.21.2 as the oracle."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import lowrank
from lowrank.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from tests.models import assert_same_snapshot, snapshot

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


def bert_cls(seed=0, labels=3, token=False):
    cls = transformers.BertForTokenClassification if token else transformers.BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=labels)
    return cls(cfg).eval()


def llama_cls(seed=0, labels=3):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   num_labels=labels, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


def distilbert_cls(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(vocab_size=61, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=32, num_labels=3)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


CLASSIFIERS = {"bert": (bert_cls, ["query", "value"]), "llama": (llama_cls, ["q_proj", "v_proj"])}


def tokens(rows=4, seq=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 61, (rows, seq), generator=g)


def out(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def peft_classifier(base, targets, seed=5, task_type="SEQ_CLS"):
    """A peft classifier with non-zero LoRA factors and a head copy that differs from the original."""
    config = peft.LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=targets,
                             init_lora_weights=False)
    pm = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return pm


@pytest.mark.parametrize("arch", sorted(CLASSIFIERS))
def test_peft_classifier_adapter_loads_and_saves_back_bit_for_bit(tmp_path, arch):
    make, targets = CLASSIFIERS[arch]
    pm = peft_classifier(make(), targets)
    pm.save_pretrained(tmp_path / "peft")
    x = tokens()
    ref = out(pm, x)
    assert not torch.allclose(ref, out(make(), x), atol=1e-3)  # the adapter and the head change the output

    model = make()
    lowrank.load_adapter(model, tmp_path / "peft")
    head = "classifier" if arch == "bert" else "score"
    assert isinstance(getattr(model, head), lowrank.ModulesToSave)
    torch.testing.assert_close(out(model, x), ref, rtol=1e-5, atol=1e-5)
    # peft's in-memory names for the head, in both models
    ours = {k for k in model.state_dict() if k.startswith(head + ".")}
    theirs = {k[len("base_model.model."):] for k in pm.state_dict() if k.startswith(f"base_model.model.{head}.")}
    assert ours == theirs == {f"{head}.original_module.weight", f"{head}.modules_to_save.default.weight",
                              *([f"{head}.original_module.bias", f"{head}.modules_to_save.default.bias"]
                                if arch == "bert" else [])}
    # the head's copy is trainable, its original frozen
    assert getattr(model, head).modules_to_save["default"].weight.requires_grad
    assert not getattr(model, head).original_module.weight.requires_grad

    lowrank.save_adapter(model, tmp_path / "ours")
    a, b = load_file(tmp_path / "peft" / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    mine = json.load(open(tmp_path / "ours" / CONFIG_NAME))
    assert mine["modules_to_save"] == [head] and mine["task_type"] == "SEQ_CLS"
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(out(back, x), ref, rtol=1e-5, atol=1e-5)


def test_token_classification_round_trip(tmp_path):
    pm = peft_classifier(bert_cls(token=True), ["query"], task_type="TOKEN_CLS")
    config = json.load(open(pm.save_pretrained(tmp_path) or tmp_path / CONFIG_NAME))
    assert config["task_type"] == "TOKEN_CLS"
    model = bert_cls(token=True)
    lowrank.load_adapter(model, tmp_path)
    x = tokens()
    torch.testing.assert_close(out(model, x), out(pm, x), rtol=1e-5, atol=1e-5)


def test_training_moves_the_copy_only_and_the_file_carries_it(tmp_path):
    model = bert_cls()
    lowrank.patch_linear(model, r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    original = model.classifier.original_module.weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "classifier.modules_to_save.default.weight" in names and not any("original_module" in n for n in names)
    opt = torch.optim.SGD(trainable, lr=0.5)
    x, y = tokens(), torch.tensor([0, 1, 2, 1])
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
    model.eval()
    assert torch.equal(model.classifier.original_module.weight, original)
    assert not torch.equal(model.classifier.modules_to_save["default"].weight, original)
    lowrank.save_adapter(model, tmp_path)
    back = peft.PeftModel.from_pretrained(bert_cls(), tmp_path)
    torch.testing.assert_close(out(back, x), out(model, x), rtol=1e-5, atol=1e-5)


def test_trainable_count_matches_peft():
    model = bert_cls()
    lowrank.patch_linear(model, r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    pm = peft.get_peft_model(bert_cls(), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                          modules_to_save=["classifier"]))
    assert lowrank.trainable_parameters(model) == pm.get_nb_trainable_parameters()
    s = lowrank.summary(model, print_summary=False)
    assert s.adapters[0].saved_modules == ["classifier"]
    assert s.adapters[0].saved_params == sum(p.numel() for p in model.classifier.original_module.parameters())


@pytest.mark.parametrize("task, make, targets", [("SEQ_CLS", "llama", ["q_proj", "v_proj"]), ("SEQ_CLS", "llama", "all-linear"),
                                                   ("TOKEN_CLS", "bert", ["query", "value"])])
def test_a_peft_config_task_type_trains_the_head_as_peft_does(task, make, targets):
    """patch_linear(config=LoraConfig(task_type=...)) trains what get_peft_model trains: the task's
    head whole (peft adds "classifier" / "score" to modules_to_save, those the model has), no LoRA in it
    (task_type was read as bookkeeping: the head stayed frozen, or got LoRA under all-linear); the same
    trainable parameters, by name. peft's own saved SEQ_CLS config (modules_to_save lists both names)
    is taken back as peft takes it."""
    build = {"llama": llama_cls, "bert": lambda: bert_cls(token=True)}[make]
    config = peft.LoraConfig(r=4, target_modules=targets, task_type=task)
    pm = peft.get_peft_model(build(), config)
    ours = lowrank.patch_linear(build(), config=config)
    assert lowrank.trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    heads = sorted(n.removeprefix("base_model.model.") for n, p in pm.named_parameters()
                   if p.requires_grad and ".modules_to_save." in n)
    assert heads and sorted(n for n, p in ours.named_parameters() if p.requires_grad and ".modules_to_save." in n) == heads
    lora = {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n, p in pm.named_parameters()
            if p.requires_grad and ".lora_" in n}
    assert {p for p, _ in lowrank.lora_layers(ours)} == lora
    again = lowrank.patch_linear(build(), config=pm.peft_config["default"].to_dict() | {"inference_mode": False})
    assert lowrank.trainable_parameters(again) == pm.get_nb_trainable_parameters()


def test_a_peft_config_in_inference_mode_is_refused_for_a_new_adapter():
    """inference_mode=True: get_peft_model makes the new adapter frozen; lowrank said nothing and
    trained it. Now a ValueError naming the field, the model unchanged."""
    model = llama_cls()
    before = snapshot(model)
    with pytest.raises(ValueError, match="inference_mode=True"):
        lowrank.patch_linear(model, config=peft.LoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    assert_same_snapshot(before, snapshot(model))


def test_adapters_switch_mix_disable_and_delete():
    model = bert_cls()
    x = tokens()
    plain = out(model, x)
    before = snapshot(model)
    lowrank.patch_linear(model, r=4, target_modules=["query"], modules_to_save="classifier")
    lowrank.add_adapter(model, "b", r=2, target_modules=["value"], modules_to_save="classifier")
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
        model.classifier.modules_to_save["b"].weight.sub_(1.0)
    a_out = out(model, x)
    lowrank.set_adapter(model, "b")
    assert model.classifier.active_adapter == "b"
    assert model.classifier.modules_to_save["b"].weight.requires_grad
    assert not model.classifier.modules_to_save["default"].weight.requires_grad
    b_out = out(model, x)
    assert not torch.allclose(a_out, b_out)
    with lowrank.disable_adapters(model):
        assert torch.equal(out(model, x), plain)
    assert torch.equal(out(model, x), b_out)

    # mixed batch: each row as its adapter alone, gradients into both copies
    model.classifier.modules_to_save["default"].requires_grad_(True)
    ids = ["default", None, "b", "default"]
    with lowrank.adapter_ids(model, ids):
        mixed = model(input_ids=x).logits
    for row, name in enumerate(ids):
        expect = {"default": a_out, "b": b_out, None: plain}[name]
        torch.testing.assert_close(mixed[row], expect[row], rtol=1e-5, atol=1e-6)
    mixed.sum().backward()
    for name in ("default", "b"):
        g = model.classifier.modules_to_save[name].weight.grad
        assert g is not None and g.abs().sum() > 0, name
    assert model.classifier.original_module.weight.grad is None

    lowrank.delete_adapter(model, "b")
    assert list(model.classifier.modules_to_save) == ["default"] and model.classifier.active_adapter == "default"
    torch.testing.assert_close(out(model, x), a_out)
    lowrank.unpatch(model)
    assert_same_snapshot(snapshot(model), before)


def test_merge_and_unload_keeps_the_copy_and_save_pretrained_merged(tmp_path):
    model = bert_cls()
    lowrank.patch_linear(model, r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.3)
        model.classifier.modules_to_save["default"].weight.mul_(-2.0)
    x = tokens()
    ref = out(model, x)
    lowrank.save_pretrained(model, tmp_path, merged=True)
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(out(loaded, x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.classifier.weight, model.classifier.modules_to_save["default"].weight)
    copy_module = model.classifier.modules_to_save["default"]
    merged = lowrank.merge_and_unload(model)
    # the copy in the original's place, with the original's flags from before patching
    assert merged.classifier is copy_module and merged.classifier.weight.requires_grad
    assert not any(isinstance(m, (lowrank.ModulesToSave, lowrank.LoRALinear)) for m in merged.modules())
    torch.testing.assert_close(out(merged, x), ref, rtol=1e-5, atol=1e-5)


def test_peft_selection_rule_distilbert():
    """peft selects modules_to_save by plain suffix: "classifier" also takes DistilBERT's pre_classifier."""
    model = distilbert_cls()
    lowrank.patch_linear(model, r=4, target_modules=["q_lin"], modules_to_save=["classifier"])
    ours = sorted(p for p, _ in lowrank.patch.saved_modules(model))
    pm = peft.get_peft_model(distilbert_cls(), peft.LoraConfig(r=4, target_modules=["q_lin"],
                                                                modules_to_save=["classifier"]))
    theirs = sorted(n[len("base_model.model."):] for n, m in pm.named_modules()
                    if type(m).__name__ == "ModulesToSaveWrapper")
    assert ours == theirs == ["classifier", "pre_classifier"]


def test_all_linear_leaves_the_saved_module_to_be_trained_whole():
    model = llama_cls()
    lowrank.patch_linear(model, r=2, modules_to_save=["score"])  # all-linear: score would be a target
    assert isinstance(model.score, lowrank.ModulesToSave)
    assert not any(p.startswith("score") for p, _ in lowrank.lora_layers(model))


def test_tied_head_copy_is_its_own_and_the_embedding_stays():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    lowrank.patch_linear(model, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    head = model.lm_head.modules_to_save["default"]
    assert head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.original_module.weight is model.model.embed_tokens.weight  # the original stays tied
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert not torch.equal(head.weight, emb)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(modules_to_save=["nope"]), ValueError, r"\['nope'\] match no module"),
    (dict(modules_to_save=["bert.encoder", "encoder.layer.0"]), ValueError, "selects both"),
    (dict(modules_to_save=[""]), TypeError, "module name"),
    (dict(modules_to_save=[3]), TypeError, "module name"),
    (dict(modules_to_save=["embeddings.LayerNorm", "classifier"], target_modules="classifier"), ValueError,
     "nothing is left for LoRA"),
])
def test_bad_requests_leave_the_model_as_it_was(kwargs, error, match):
    model = bert_cls()
    before = snapshot(model)
    kwargs.setdefault("target_modules", ["query"])
    with pytest.raises(error, match=match):
        lowrank.patch_linear(model, r=2, **kwargs)
    assert_same_snapshot(snapshot(model), before)


def test_a_lora_layer_or_a_quantized_one_cannot_be_saved_whole():
    model = bert_cls()
    lowrank.patch_linear(model, r=2, target_modules=["query"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="is \\(or holds\\) a LoRA layer"):
        lowrank.add_adapter(model, "b", r=2, target_modules=["value"], modules_to_save=["layer.0.attention"])
    assert_same_snapshot(snapshot(model), before)
    q = bert_cls()
    q.bert.pooler.dense = lowrank.NF4Linear.from_linear(q.bert.pooler.dense, compute_dtype=torch.float32)
    before = snapshot(q)
    with pytest.raises(TypeError, match="4-bit quantized"):
        lowrank.patch_linear(q, r=2, target_modules=["value"], modules_to_save=["pooler"])
    assert_same_snapshot(snapshot(q), before)


def test_classifier_patched_with_its_head_frozen_warns():
    with pytest.warns(UserWarning, match=r"classifier.*frozen.*modules_to_save=\['classifier'\]"):
        lowrank.patch_linear(bert_cls(), r=2, target_modules=["query"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.patch_linear(bert_cls(), r=2, target_modules=["query"], modules_to_save=["classifier"])


def test_peft_config_with_modules_to_save():
    model = bert_cls()
    lowrank.patch_linear(model, config=peft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, lowrank.ModulesToSave)
    with pytest.raises(TypeError, match="modules_to_save given both"):
        lowrank.patch_linear(bert_cls(), modules_to_save=["classifier"],
                             config={"r": 4, "lora_alpha": 8, "target_modules": ["query"],
                                     "modules_to_save": ["classifier"]})


@pytest.mark.parametrize("damage", ["missing", "shape", "nan", "stray"])
def test_damaged_saved_module_in_a_file_is_refused(tmp_path, damage):
    pm = peft_classifier(bert_cls(), ["query"])
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.classifier.weight"
    if damage == "missing":
        del tensors["base_model.model.classifier.bias"]
    elif damage == "shape":
        tensors[key] = tensors[key][:2].clone()
    elif damage == "nan":
        tensors[key][0, 0] = float("nan")
    else:
        tensors["base_model.model.classifier.extra"] = torch.zeros(2)
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    model = bert_cls()
    before = snapshot(model)
    with pytest.raises(ValueError, match="classifier"):
        lowrank.load_adapter(model, tmp_path)
    assert_same_snapshot(snapshot(model), before)


def test_load_into_an_existing_adapter_replaces_the_copy(tmp_path):
    pm = peft_classifier(bert_cls(), ["query"])
    pm.save_pretrained(tmp_path)
    model = bert_cls()
    lowrank.patch_linear(model, r=4, alpha=8, target_modules=["query"], modules_to_save=["classifier"])
    lowrank.load_adapter(model, tmp_path)
    x = tokens()
    torch.testing.assert_close(out(model, x), out(pm, x), rtol=1e-5, atol=1e-5)
    # an existing adapter without the copy the file has: refused, model unchanged
    other = bert_cls()
    lowrank.patch_linear(other, r=4, alpha=8, target_modules=["query"])
    before = snapshot(other)
    with pytest.raises(ValueError, match="has no modules_to_save copy here"):
        lowrank.load_adapter(other, tmp_path)
    assert_same_snapshot(snapshot(other), before)


def test_load_frozen_for_inference(tmp_path):
    peft_classifier(bert_cls(), ["query"]).save_pretrained(tmp_path)
    model = lowrank.load_adapter(bert_cls(), tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in model.parameters())


def test_wrapper_reads_attributes_of_the_module_that_runs():
    model = bert_cls()
    lowrank.patch_linear(model, r=2, target_modules=["query"], modules_to_save=["classifier"])
    w = model.classifier
    assert w.out_features == 3 and w.weight is w.modules_to_save["default"].weight
    with lowrank.disable_adapters(model):
        assert w.weight is w.original_module.weight
    with pytest.raises(AttributeError):
        w.no_such_attribute  # noqa: B018
    assert isinstance(w.original_module, nn.Linear)


@pytest.mark.parametrize("features", ["patterns+embedding", "tokens"])
def test_bert_classifier_with_every_file_feature_both_ways(tmp_path, features):
    """A BERT-style classifier with its head in modules_to_save and, in one file, per-layer ranks and
    alphas plus LoRA on the word embeddings, or trainable token rows: peft -> lowrank -> peft, the
    outputs equal and the files bit for bit."""
    if features == "tokens":
        config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                                 trainable_token_indices=[5, 9], init_lora_weights=False)
    else:
        config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                 target_modules=["query", "value", "word_embeddings"],
                                 rank_pattern={r"layer\.1\.attention\.self\.query": 2, "value": 6},
                                 alpha_pattern={"word_embeddings": 3}, init_lora_weights=False)
    pm = peft.get_peft_model(bert_cls(), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(tmp_path / "peft")
    x = tokens()
    x[0, 1], x[1, 2] = 5, 9
    ref = out(pm, x)
    model = bert_cls()
    lowrank.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(out(model, x), ref, rtol=1e-5, atol=1e-5)
    lowrank.save_adapter(model, tmp_path / "ours")
    a, b = load_file(tmp_path / "peft" / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    a = {k: v for k, v in a.items() if not k.endswith("word_embeddings.base_layer.weight")}  # peft's base copy
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = peft.PeftModel.from_pretrained(bert_cls(), tmp_path / "ours")
    torch.testing.assert_close(out(back, x), ref, rtol=1e-5, atol=1e-5)
