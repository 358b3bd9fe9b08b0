"""lowrank/adapter_files.py: save_adapter / load_adapter in peft's file format, both ways, validation and atomic writes."""
import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import lowrank
from lowrank.adapter_files import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from tests.helpers import assert_close
from tests.models import SMALL_MODELS, ids, logits, randomize_B_, small_llama
from tests.oracles import merged_f64

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

STANDARD_FIELDS = {"peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora",
                   "use_dora", "fan_in_fan_out", "task_type", "base_model_name_or_path", "modules_to_save"}


def check_same(out, model_for_ref64, x, baseline):
    """out must be as close to the float64 merged oracle of `model_for_ref64` as `baseline` (fp32) is."""
    assert_close(out, logits(merged_f64(model_for_ref64), x), baseline)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lowrank_to_peft(tmp_path, arch, rslora):
    base = SMALL_MODELS[arch]()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=12, rslora=rslora)
    randomize_B_(model)
    x = ids()
    ours = logits(model, x)
    lowrank.save_adapter(model, tmp_path)

    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.load(open(tmp_path / CONFIG_NAME))
    assert set(config) == STANDARD_FIELDS
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 12, rslora)
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    for path, layer in lowrank.lora_layers(model):
        assert torch.equal(tensors.pop(f"base_model.model.{path}.lora_A.weight"), layer.lora_A["default"])
        assert torch.equal(tensors.pop(f"base_model.model.{path}.lora_B.weight"), layer.lora_B["default"])
    assert not tensors, f"unexpected keys {list(tensors)}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    theirs = logits(pm, x)
    assert not torch.allclose(ours, logits(base, x)), "the adapter must change the output"
    check_same(theirs, model, x, ours)


PEFT_CASES = {
    "llama-defaults": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "llama-rslora-all": ("llama", dict(r=6, lora_alpha=5, use_rslora=True, target_modules="all-linear",
                                       task_type="CAUSAL_LM")),
    "gpt2": ("gpt2", dict(r=3, lora_alpha=7, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                     rank_pattern={"v_proj": 8, r"layers\.1\.mlp\..*": 2}, alpha_pattern={"o_proj": 3})),
    "gpt2-patterns": ("gpt2", dict(r=3, lora_alpha=7, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                   rank_pattern={"c_proj": 5}, alpha_pattern={r"h\.0\.attn\.c_attn": 2.5})),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_to_lowrank(tmp_path, case):
    arch, kwargs = PEFT_CASES[case]
    base = SMALL_MODELS[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    randomize_B_(pm)
    pm.save_pretrained(str(tmp_path))
    x = ids()
    theirs = logits(pm, x)

    model = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    ours = logits(model, x)
    assert not torch.allclose(theirs, logits(base, x))
    check_same(ours, model, x, theirs)
    sd = pm.state_dict()
    for path, layer in lowrank.lora_layers(model):
        assert torch.equal(layer.lora_A["default"], sd[f"base_model.model.{path}.lora_A.default.weight"])
        assert torch.equal(layer.lora_B["default"], sd[f"base_model.model.{path}.lora_B.default.weight"])


def test_roundtrip_second_adapter_and_reload_into_patched(tmp_path):
    base = small_llama()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4)
    lowrank.patch_linear(model, rank=8, alpha=3, targets=["q_proj", "o_proj"], adapter_name="other")
    randomize_B_(model)
    lowrank.save_adapter(model, tmp_path, adapter_name="other")
    config = json.load(open(tmp_path / CONFIG_NAME))
    assert config["target_modules"] == ["o_proj", "q_proj"] and config["r"] == 8

    # Into a fresh model as "default", into the same model over "other" (after scrambling it).
    fresh = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    want = {p: (l.lora_A["other"].clone(), l.lora_B["other"].clone())
            for p, l in lowrank.lora_layers(model) if "other" in l.configs}
    got = {p: (l.lora_A["default"], l.lora_B["default"]) for p, l in lowrank.lora_layers(fresh)}
    assert set(got) == set(want)
    for p in want:
        assert torch.equal(got[p][0], want[p][0]) and torch.equal(got[p][1], want[p][1])
    with torch.no_grad():
        for p, l in lowrank.lora_layers(model):
            if "other" in l.configs:
                l.lora_A["other"].zero_()
    lowrank.load_adapter(model, tmp_path, adapter_name="other")
    for p, l in lowrank.lora_layers(model):
        if "other" in l.configs:
            assert torch.equal(l.lora_A["other"], want[p][0])


def test_regex_targets_when_names_are_ambiguous(tmp_path):
    base = small_llama()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=2, targets=r"model\.layers\.0\.self_attn\.q_proj")
    randomize_B_(model)
    lowrank.save_adapter(model, tmp_path)
    target = json.load(open(tmp_path / CONFIG_NAME))["target_modules"]
    assert isinstance(target, str)  # "q_proj" would also select layer 1's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = ids()
    check_same(logits(pm, x), model, x, logits(model, x))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_validation_lists_every_problem_and_leaves_model_unchanged(tmp_path):
    base = small_llama()
    src = lowrank.patch_linear(copy.deepcopy(base), rank=4, targets=["q_proj", "k_proj"])
    lowrank.save_adapter(src, tmp_path)
    t = load_file(tmp_path / WEIGHTS_NAME)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(5, 32)  # bad shape
    del t["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]  # missing half
    t["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(4, 32)  # no such layer
    t["base_model.model.model.layers.0.self_attn.nope.lora_B.weight"] = torch.zeros(32, 4)
    t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] = torch.zeros(16, 4, dtype=torch.int32)
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 61)  # half an embedding adapter
    save_file(t, tmp_path / WEIGHTS_NAME)

    for target in (copy.deepcopy(base), lowrank.patch_linear(copy.deepcopy(base), rank=3)):
        before, kinds = _state(target)
        with pytest.raises(ValueError) as err:
            lowrank.load_adapter(target, tmp_path)
        msg = str(err.value)
        for needle in ("(5, 32)", "k_proj: lora_B.weight missing", "self_attn.nope: no nn.Linear",
                       "torch.int32", "embed_tokens: lora_embedding_B missing"):
            assert needle in msg, f"{needle!r} not in:\n{msg}"
        after, kinds_after = _state(target)
        assert kinds == kinds_after and before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_file_covering_more_layers_than_existing_adapter(tmp_path):
    base = small_llama()
    lowrank.save_adapter(lowrank.patch_linear(copy.deepcopy(base), rank=4), tmp_path)
    target = lowrank.patch_linear(copy.deepcopy(base), rank=4, targets=["q_proj"])
    before, kinds = _state(target)
    with pytest.raises(ValueError, match="does not cover this layer"):
        lowrank.load_adapter(target, tmp_path)
    after, kinds_after = _state(target)
    assert kinds == kinds_after and all(torch.equal(before[k], after[k]) for k in before)


def test_rank_mismatch_with_existing_adapter(tmp_path):
    base = small_llama()
    lowrank.save_adapter(lowrank.patch_linear(copy.deepcopy(base), rank=4), tmp_path)
    target = lowrank.patch_linear(copy.deepcopy(base), rank=2)
    before, _ = _state(target)
    with pytest.raises(ValueError, match="has rank 2 in the model, 4 in the file"):
        lowrank.load_adapter(target, tmp_path)
    after, _ = _state(target)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_config_refused(tmp_path):
    base = small_llama()
    lowrank.save_adapter(lowrank.patch_linear(copy.deepcopy(base), rank=4), tmp_path)
    config = json.load(open(tmp_path / CONFIG_NAME))
    config.update(bias="all", target_parameters=["mlp.experts.gate_up_proj"])
    json.dump(config, open(tmp_path / CONFIG_NAME, "w"))
    with pytest.raises(ValueError, match="bias=.*target_parameters="):
        lowrank.load_adapter(copy.deepcopy(base), tmp_path)


def test_pickle_refused_unless_opted_in(tmp_path):
    base = small_llama()
    src = lowrank.patch_linear(copy.deepcopy(base), rank=4)
    randomize_B_(src)
    lowrank.save_adapter(src, tmp_path)
    torch.save(load_file(tmp_path / WEIGHTS_NAME), tmp_path / PICKLE_NAME)
    os.unlink(tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    model = lowrank.load_adapter(copy.deepcopy(base), tmp_path, allow_pickle=True)
    x = ids()
    assert torch.equal(logits(model, x), logits(src, x))

    class Evil:
        def __reduce__(self):
            return (print, ("pickle ran code",))

    torch.save({"x": Evil()}, tmp_path / PICKLE_NAME)
    with pytest.raises(Exception, match="[Ww]eights only"):
        lowrank.load_adapter(copy.deepcopy(base), tmp_path, allow_pickle=True)


def test_atomic_write_keeps_old_adapter_on_crash(tmp_path, monkeypatch):
    base = small_llama()
    old = lowrank.patch_linear(copy.deepcopy(base), rank=4)
    lowrank.save_adapter(old, tmp_path)
    files = {n: open(tmp_path / n, "rb").read() for n in (CONFIG_NAME, WEIGHTS_NAME)}
    new = lowrank.patch_linear(copy.deepcopy(base), rank=8)

    import safetensors.torch as st

    real = st.save_file

    def crash(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:1]), filename, metadata)  # half the file, then die
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lowrank.save_adapter(new, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(files), "temporary files left behind"
    for n, data in files.items():
        assert open(tmp_path / n, "rb").read() == data
    monkeypatch.setattr(st, "save_file", real)
    lowrank.save_adapter(new, tmp_path)
    assert json.load(open(tmp_path / CONFIG_NAME))["r"] == 8


def test_save_errors():
    model = lowrank.patch_linear(small_llama(), rank=2)
    with pytest.raises(ValueError, match="no adapter 'nope'.*default"):
        lowrank.save_adapter(model, "/nonexistent/never", adapter_name="nope")
    with pytest.raises(TypeError):
        lowrank.save_adapter(nn.Parameter(torch.zeros(1)), "/nonexistent/never")


def test_crash_between_the_two_renames_is_detected_on_load(tmp_path, monkeypatch):
    """Where the files are renamed one at a time (the directory holds other files, so it is not
    swapped whole), a crash after the weights' rename leaves new weights beside the old config. Same
    rank, other alpha: shapes cannot tell, the settings stamp must."""
    base = small_llama()
    old = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=8)
    randomize_B_(old)
    lowrank.save_adapter(old, tmp_path)
    (tmp_path / "README.md").write_text("the user's notes\n")
    new = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=16)
    randomize_B_(new)
    real = os.replace

    def die_at_config(src, dst):
        if os.path.basename(dst) == CONFIG_NAME:
            raise OSError("power cut")
        real(src, dst)

    monkeypatch.setattr(os, "replace", die_at_config)
    with pytest.raises(OSError, match="power cut"):
        lowrank.save_adapter(new, tmp_path)
    monkeypatch.setattr(os, "replace", real)
    assert json.load(open(tmp_path / CONFIG_NAME))["lora_alpha"] == 8  # the torn state is on disk
    target = copy.deepcopy(base)
    before = {n: p.clone() for n, p in target.state_dict().items()}
    with pytest.raises(ValueError, match="do not belong together"):
        lowrank.load_adapter(target, tmp_path)
    assert not list(lowrank.lora_layers(target)) and all(torch.equal(p, before[n]) for n, p in target.state_dict().items())
    lowrank.save_adapter(new, tmp_path)  # a complete save heals it
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    x = ids()
    assert torch.equal(logits(loaded, x), logits(new, x))


def test_load_over_a_merged_adapter_refused(tmp_path):
    """New A / B under a weight that holds the old adapter merged would silently keep the old outputs
    (and make unmerge impossible): refused, model unchanged; another adapter name still loads."""
    base = small_llama()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4)
    randomize_B_(model)
    lowrank.save_adapter(model, tmp_path)
    lowrank.merge(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="merged into"):
        lowrank.load_adapter(model, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    lowrank.load_adapter(model, tmp_path, adapter_name="again")
    lowrank.unmerge(model)  # still possible: the merged adapter was not touched
    lowrank.set_adapter(model, "again")
    x = ids()
    lowrank.set_adapter(model, "default")
    want = logits(model, x)
    lowrank.set_adapter(model, "again")
    assert torch.equal(logits(model, x), want)


def test_auto_task_type_lets_peft_auto_classes_load_the_adapter(tmp_path):
    """save_adapter's task_type="auto" from transformers' auto-class tables: GPT2LMHeadModel (no
    "ForCausalLM" in its name) is CAUSAL_LM, so peft's AutoPeftModelForCausalLM loads the adapter
    (it refused a null task_type) and computes what the patched model does; T5's
    ForConditionalGeneration is SEQ_2_SEQ_LM; a plain nn.Module gets null."""
    from lowrank.adapter_files import auto_task_type

    base = SMALL_MODELS["gpt2"]()
    base.save_pretrained(tmp_path / "base")
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4)
    randomize_B_(model)
    lowrank.save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    assert json.load(open(tmp_path / "ad" / CONFIG_NAME))["task_type"] == "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad")).eval()
    x = ids()
    torch.testing.assert_close(logits(theirs, x), logits(model, x), rtol=1e-5, atol=1e-6)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    assert auto_task_type(t5) == "SEQ_2_SEQ_LM"
    assert auto_task_type(nn.Sequential(nn.Linear(2, 2))) is None


def test_the_base_a_loaded_file_names_is_written_back(tmp_path):
    """A peft file's base_model_name_or_path and revision survive load_adapter + save_adapter on a
    model built from a config (no name of its own): lowrank wrote null and dropped the revision, so
    peft's AutoPeftModelForCausalLM looked for a model named "None" (and would take another revision
    of the base without a word). The model's own name wins; a deleted adapter forgets its file."""
    base = small_llama()
    base.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"], revision="v1.0"))
    pm.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    randomize_B_(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    lowrank.save_adapter(model, tmp_path / "ours")
    config = json.load(open(tmp_path / "ours" / CONFIG_NAME))
    assert (config["base_model_name_or_path"], config["revision"]) == (str(tmp_path / "base"), "v1.0")
    model.config.name_or_path = "another/base"
    lowrank.save_adapter(model, tmp_path / "named")
    config = json.load(open(tmp_path / "named" / CONFIG_NAME))
    assert config["base_model_name_or_path"] == "another/base" and "revision" not in config
    model.config.name_or_path = ""
    lowrank.add_adapter(model, "other", rank=2, targets=["q_proj"])
    lowrank.delete_adapter(model, "default")
    lowrank.add_adapter(model, "default", rank=2, targets=["q_proj"])
    lowrank.save_adapter(model, tmp_path / "fresh")
    assert json.load(open(tmp_path / "fresh" / CONFIG_NAME))["base_model_name_or_path"] is None


def test_a_classifier_head_with_lora_is_saved_without_its_task(tmp_path):
    """peft trains a SEQ_CLS / TOKEN_CLS head whole when it loads such a file: where the adapter has
    LoRA on the head (all-linear on a classifier), task_type="auto" wrote SEQ_CLS and peft failed to
    load the file (KeyError); now it writes null and peft loads it to our logits. Asking for the task
    is a ValueError, nothing written."""
    def bert():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
            num_labels=3)).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lowrank.patch_linear(bert(), rank=4)
    assert "classifier" in dict(lowrank.lora_layers(model))
    randomize_B_(model)
    lowrank.save_adapter(model, tmp_path / "ad")
    assert json.load(open(tmp_path / "ad" / CONFIG_NAME))["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(bert(), tmp_path / "ad").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'.*'classifier'"):
        lowrank.save_adapter(model, tmp_path / "cls", task_type="SEQ_CLS")
    assert not (tmp_path / "cls").exists()
    # LoRA elsewhere and the head not trained (peft's get_peft_model without a task_type): SEQ_CLS
    # was written, and peft looked for the head in the file (KeyError; found by a new-user trial)
    model = lowrank.patch_linear(bert(), rank=4, targets=["query", "value"])
    randomize_B_(model)
    lowrank.save_adapter(model, tmp_path / "plain")
    assert json.load(open(tmp_path / "plain" / CONFIG_NAME))["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(bert(), tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not train it.*modules_to_save=\\['classifier'\\]"):
        lowrank.save_adapter(model, tmp_path / "cls", task_type="SEQ_CLS")
    # LoRA inside the head (RoBERTa's classifier.dense / .out_proj: no path ends with "classifier")
    torch.manual_seed(0)
    roberta = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        num_labels=3, pad_token_id=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lowrank.patch_linear(copy.deepcopy(roberta), rank=4)
    assert "classifier.dense" in dict(lowrank.lora_layers(model))
    lowrank.save_adapter(model, tmp_path / "roberta")
    assert json.load(open(tmp_path / "roberta" / CONFIG_NAME))["task_type"] is None
    peft.PeftModel.from_pretrained(copy.deepcopy(roberta), tmp_path / "roberta")


# -- strict reading ---------------------------------------------------------------------------------

def _saved(tmp_path, **kwargs):
    model = lowrank.patch_linear(small_llama(), rank=4, targets=["q_proj", "v_proj"], **kwargs)
    randomize_B_(model)
    lowrank.save_adapter(model, tmp_path)
    return json.load(open(tmp_path / CONFIG_NAME))


@pytest.mark.parametrize("field, value, words", [
    ("use_rslora", "no", "use_rslora='no' must be true or false"),
    ("use_rslora", 1, "use_rslora=1 must be true or false"),
    ("lora_dropout", "0.1", "lora_dropout='0.1' must be a number"),
    ("lora_dropout", 1.5, r"lora_dropout=1.5 must be a number in \[0, 1\)"),
    ("fan_in_fan_out", "false", "fan_in_fan_out='false' must be true or false"),
    ("target_modules", 3, "target_modules=3 must be a regex string"),
    ("target_modules", ["q_proj", ""], "must list non-empty module names"),
], ids=lambda v: str(v)[:12])
def test_config_fields_are_typed_strictly(tmp_path, field, value, words):
    """`use_rslora: "no"` used to load as True (Python truthiness): every typed field is checked."""
    config = _saved(tmp_path)
    config[field] = value
    json.dump(config, open(tmp_path / CONFIG_NAME, "w"))
    target = small_llama()
    with pytest.raises(ValueError, match=words):
        lowrank.load_adapter(target, tmp_path)
    assert not list(lowrank.lora_layers(target))


def test_an_adapter_config_without_lora_alpha_loads_as_peft_loads_it(tmp_path):
    """adapter_config.json without lora_alpha (hand-written, or by an old tool): peft reads it with
    its LoraConfig default (8) and so does load_adapter: the same logits as PeftModel.from_pretrained."""
    base = small_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"]))
    randomize_B_(pm)
    pm.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / CONFIG_NAME))
    del config["lora_alpha"]
    json.dump(config, open(tmp_path / CONFIG_NAME, "w"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert {layer.scaling("default") for _, layer in lowrank.lora_layers(ours)} == {8 / 4}
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe{}", "is not UTF-8"), (b"{not json", "is not valid JSON"), (b"[1, 2]", "holds a JSON list"),
])
def test_a_config_that_is_not_a_json_object_names_the_file(tmp_path, content, words):
    _saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=rf"adapter_config\.json {words}"):
        lowrank.load_adapter(small_llama(), tmp_path)


@pytest.mark.parametrize("cut", [7, 200], ids=["header", "data"])
def test_a_truncated_weights_file_names_the_file(tmp_path, cut):
    """A truncated adapter_model.safetensors (a copy cut short): a ValueError naming the file, where
    safetensors' own error named nothing; the model untouched."""
    _saved(tmp_path)
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(raw[:cut] if cut < 100 else raw[:-cut])
    target = small_llama()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors' is not a readable safetensors file"):
        lowrank.load_adapter(target, tmp_path)
    assert not list(lowrank.lora_layers(target))


def test_target_modules_that_disagree_with_the_weights_are_refused(tmp_path):
    """peft builds its layers from target_modules and ignores weights outside them: a config naming
    other layers than the tensors would load into a different model in peft than in lowrank."""
    config = _saved(tmp_path)
    config["target_modules"] = ["q_proj"]
    json.dump(config, open(tmp_path / CONFIG_NAME, "w"))
    target = small_llama()
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\].*weights without a target: .*v_proj"):
        lowrank.load_adapter(target, tmp_path)
    assert not list(lowrank.lora_layers(target))


@pytest.mark.parametrize("targets, exclude", [(["q_proj", "v_proj"], ["layers.0.self_attn.q_proj"]),
                                              ("all-linear", r".*mlp.*")])
def test_peft_adapters_with_exclude_modules_load(tmp_path, targets, exclude):
    """peft's exclude_modules (a list of names, or a regex) removes layers from target_modules'
    selection: load_adapter refused every such file (its check of target_modules against the weights
    ignored the exclusion); peft compares "all-linear" in any case. Loaded to peft's logits."""
    base = small_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets,
                                                                   exclude_modules=exclude)).eval()
    randomize_B_(pm)
    pm.save_pretrained(tmp_path)
    model = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(p for p, _ in lowrank.lora_layers(model)) == sorted(
        n.removeprefix("base_model.model.") for n, m in pm.named_modules() if type(m).__name__ == "Linear"
        and hasattr(m, "lora_A") and "default" in m.lora_A)
    x = ids()
    check_same(logits(model, x), model, x, logits(pm, x))


@pytest.mark.parametrize("layers, pattern", [([1], None), (0, "layers")])
def test_peft_adapters_with_layers_to_transform_load(tmp_path, layers, pattern):
    """A peft file made with layers_to_transform / layers_pattern (weights for those blocks only) loads
    onto exactly those layers, to peft's logits; saved again, peft reads it back to the same layers."""
    base = small_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                                   layers_to_transform=layers,
                                                                   layers_pattern=pattern)).eval()
    randomize_B_(pm)
    pm.save_pretrained(tmp_path / "peft")
    want = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if type(m).__name__ == "Linear" and hasattr(m, "lora_A") and "default" in m.lora_A)
    model = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert sorted(p for p, _ in lowrank.lora_layers(model)) == want
    x = ids()
    check_same(logits(model, x), model, x, logits(pm, x))
    lowrank.save_adapter(model, tmp_path / "again")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    assert sorted(n.removeprefix("base_model.model.") for n, m in back.named_modules()
                  if type(m).__name__ == "Linear" and hasattr(m, "lora_A") and "default" in m.lora_A) == want
    torch.testing.assert_close(logits(back, x), logits(pm, x), rtol=0, atol=0)


def test_all_linear_in_any_case_as_peft_reads_it():
    """peft compares target_modules with "all-linear" case-insensitively; lowrank read "ALL-LINEAR" as
    a regex that matched no layer."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(small_llama(), peft.LoraConfig(r=4, target_modules="ALL-LINEAR"))
    ours = lowrank.patch_linear(small_llama(), config={"r": 4, "target_modules": "ALL-LINEAR"})
    assert lowrank.trainable_parameters(ours) == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("bad, words", [(1e5, "overflow the layer's torch.float16"), (float("nan"), "NaN/Inf")])
def test_values_the_model_cannot_hold_are_refused(tmp_path, bad, words):
    """Loading into an fp16 model casts the factors: 1e5 used to become Inf silently."""
    _saved(tmp_path)
    t = load_file(tmp_path / WEIGHTS_NAME)
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key][0, 0] = bad
    save_file(t, tmp_path / WEIGHTS_NAME)
    target = small_llama().half()
    with pytest.raises(ValueError, match=words):
        lowrank.load_adapter(target, tmp_path)
    assert not list(lowrank.lora_layers(target))


# -- writing: permissions, leftovers, kills ---------------------------------------------------------

@pytest.mark.parametrize("others", [False, True], ids=["exchange", "in-place"])
def test_saved_files_follow_the_umask_and_leftovers_are_removed(tmp_path, others):
    """Files get 0666 less the umask (0644 under 022, as peft's; they were 0600), and the next save
    removes what an interrupted one left (temporary files, a staging directory) -- of a process that
    has exited, or of this one -- but not what another process's save in progress is writing (a
    second writer deleted the first one's staging directory and that save failed with a
    FileNotFoundError; found by a new-user audit)."""
    target = tmp_path / "adapter"
    _saved(target)
    if others:
        (target / "README.md").write_text("notes\n")
    live = os.getppid()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = [target / f".{WEIGHTS_NAME}.{dead}.deadbeef.tmp", target / f".{CONFIG_NAME}.{os.getpid()}.deadbeef.tmp"]
    for f in stale:
        f.write_text("half a file")
    (tmp_path / f".adapter.{dead}.deadbeef.saving").mkdir()
    (tmp_path / f".adapter.{live}.feedface.saving").mkdir()  # another process, saving now
    if others:  # (any file beside the adapter's two makes the save write in place)
        (target / f".{WEIGHTS_NAME}.{live}.feedface.tmp").write_text("being written")
    old = os.umask(0o022)
    try:
        _saved(target)
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (target / name).stat().st_mode & 0o777 == 0o644, name
    assert sorted(os.listdir(target)) == sorted([CONFIG_NAME, WEIGHTS_NAME] + (
        ["README.md", f".{WEIGHTS_NAME}.{live}.feedface.tmp"] if others else []))
    assert sorted(os.listdir(tmp_path)) == [f".adapter.{live}.feedface.saving", "adapter"]


_SAVE_LOOP = r"""
import os, sys, time
import torch
import lowrank
target, seed = sys.argv[1], int(sys.argv[2])
real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
def slow(fn):
    def call(*a, **k):
        out = fn(*a, **k)
        time.sleep(0.01)  # widen every step, so that kills land between them
        return out
    return call
os.fsync, os.rename, os.replace = slow(real_fsync), slow(real_rename), slow(real_replace)
models = []
for i, targets in enumerate((["0", "1"], ["1", "2"])):  # same r and alpha, other layers
    torch.manual_seed(seed + i)
    m = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(3)])
    lowrank.patch_linear(m, rank=2, alpha=4, targets=targets)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(m):
            layer.lora_B["default"].normal_()
    models.append(m)
for i in range(10**6):
    lowrank.save_adapter(models[i % 2], target)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_a_killed_save_leaves_the_old_or_the_new_adapter(tmp_path):
    """SIGKILL at random moments of saves that alternate between two adapters with the same r and
    alpha on different layers: after every kill, lowrank and peft both load one of the two,
    complete (with files renamed one at a time peft could load the new weights under the old
    config: a mix)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "adapter"
    versions = {}
    rng = random.Random(0)
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(target), str(attempt)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline(), proc.stderr.read()  # one complete save first
            time.sleep(rng.uniform(0.0, 0.25))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(30)
        base = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(3)])
        ours = lowrank.load_adapter(copy.deepcopy(base), target)
        mine = {p: (layer.lora_A["default"].detach(), layer.lora_B["default"].detach())
                for p, layer in lowrank.lora_layers(ours)}
        assert set(mine) in ({"0", "1"}, {"1", "2"}), sorted(mine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(target))
        sd = theirs.state_dict()
        peft_paths = {k.removeprefix("base_model.model.").split(".")[0] for k in sd if ".lora_A." in k}
        assert peft_paths == set(mine), (peft_paths, sorted(mine))
        for p, (a, b) in mine.items():
            assert torch.equal(sd[f"base_model.model.{p}.lora_A.default.weight"], a), p
            assert torch.equal(sd[f"base_model.model.{p}.lora_B.default.weight"], b), p
        versions[attempt] = sorted(mine)
    assert not [n for n in os.listdir(tmp_path) if n != "adapter" and not n.endswith(".saving")]


def test_is_trainable_false_loads_frozen(tmp_path):
    """peft's is_trainable: False loads the adapter for inference (no factor needs a gradient, the
    outputs are the trainable load's); the default keeps lowrank's rule (an active adapter trains)."""
    base = small_llama()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4)
    randomize_B_(model)
    lowrank.save_adapter(model, tmp_path)
    frozen = lowrank.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=False)
    trained = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for _, l in lowrank.lora_layers(trained) for p in (*l.lora_A.values(), *l.lora_B.values()))
    x = ids()
    assert torch.equal(logits(frozen, x), logits(trained, x))
    lowrank.load_adapter(trained, tmp_path, is_trainable=False)  # over an existing adapter: frozen too
    assert not any(p.requires_grad for p in trained.parameters())
    with pytest.raises(TypeError, match="is_trainable"):
        lowrank.load_adapter(copy.deepcopy(base), tmp_path, is_trainable="no")
    # with dropout in the file, an inference load computes the same logits twice (its layers in eval, as
    # peft's from_pretrained leaves them; they were in training mode: dropout on, generate not repeatable)
    noisy = lowrank.patch_linear(copy.deepcopy(base), rank=4, dropout=0.3)
    randomize_B_(noisy)
    lowrank.save_adapter(noisy, tmp_path / "noisy")
    served = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "noisy", is_trainable=False)
    assert not any(layer.training for _, layer in lowrank.lora_layers(served))
    assert torch.equal(logits(served, x), logits(served, x))
    # the whole model in eval mode, as peft's from_pretrained leaves it: a GPT-2 built from its config
    # (training mode, dropout 0.1) kept its own dropout on (found by a new-user trial)
    gpt2 = SMALL_MODELS["gpt2"]().train()
    lowrank.save_adapter(lowrank.patch_linear(copy.deepcopy(gpt2), rank=4), tmp_path / "gpt2")
    served = lowrank.load_adapter(gpt2, tmp_path / "gpt2", is_trainable=False)
    assert not any(m.training for m in served.modules())


def test_base_rewriting_initialisations_are_refused(tmp_path):
    """An adapter saved with init_lora_weights='pissa' (or olora, loftq, corda) belongs to the
    residual base peft rewrote; on the original base it would compute something else."""
    base = small_llama()
    lowrank.save_adapter(lowrank.patch_linear(copy.deepcopy(base), rank=4), tmp_path)
    config = json.load(open(tmp_path / CONFIG_NAME))
    for init, ok in (("pissa_niter_4", False), ("olora", False), ("gaussian", True), (True, True), ("eva", True)):
        config["init_lora_weights"] = init
        json.dump(config, open(tmp_path / CONFIG_NAME, "w"))
        if ok:
            lowrank.load_adapter(copy.deepcopy(base), tmp_path)
        else:
            with pytest.raises(ValueError, match="rewrites the base weights"):
                lowrank.load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_layer_ranks_to_peft_and_back(tmp_path, arch):
    """Per-layer ranks and alphas (patch_linear's rank_pattern / alpha_pattern) are written as peft's
    rank_pattern / alpha_pattern: peft loads the file to the same outputs and factors, and lowrank
    reads it back to the same per-layer settings."""
    base = SMALL_MODELS[arch]()
    patterns = (dict(rank_pattern={"v_proj": 8, r"layers\.1\..*": 2}, alpha_pattern={"o_proj": 3})
                if arch == "llama" else dict(rank_pattern={"c_proj": 6}, alpha_pattern={r"h\.1\..*": 1.5}))
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=12, **patterns)
    settings = {p: (m.configs["default"].rank, m.configs["default"].alpha) for p, m in lowrank.lora_layers(model)}
    assert len(set(settings.values())) >= 3
    randomize_B_(model)
    x = ids()
    ours = logits(model, x)
    lowrank.save_adapter(model, tmp_path)
    config = json.load(open(tmp_path / CONFIG_NAME))
    assert config["rank_pattern"] and config["alpha_pattern"]  # r: the most common rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    check_same(logits(pm, x), model, x, ours)
    sd = pm.state_dict()
    for path, layer in lowrank.lora_layers(model):
        assert torch.equal(layer.lora_B["default"], sd[f"base_model.model.{path}.lora_B.default.weight"])
        peft_layer = pm.get_submodule(f"base_model.model.{path}")
        assert peft_layer.r["default"] == settings[path][0]
        assert peft_layer.scaling["default"] == layer.scaling("default")
    back = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert {p: (m.configs["default"].rank, m.configs["default"].alpha) for p, m in lowrank.lora_layers(back)} == settings
    assert torch.equal(logits(back, x), ours)


def test_per_layer_ranks_merge_and_mixed_batches():
    """Per-layer ranks change nothing for merge (bit-exact unmerge) or the mixed batch (each row
    its adapter's output)."""
    base = small_llama()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4, rank_pattern={"q_proj": 7, "down_proj": 2})
    lowrank.add_adapter(model, "other", rank=3, rank_pattern={"v_proj": 5})
    randomize_B_(model)
    x = ids(rows=3)
    outs = {}
    for name in ("default", "other"):
        lowrank.set_adapter(model, name)
        outs[name] = logits(model, x)
    with lowrank.disable_adapters(model):
        outs[None] = logits(model, x)
    with lowrank.adapter_ids(model, ["other", None, "default"]):
        mixed = logits(model, x)
    for row, name in enumerate(["other", None, "default"]):
        assert torch.allclose(mixed[row], outs[name][row], rtol=1e-5, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lowrank.set_adapter(model, "default")
    lowrank.merge(model)
    assert torch.allclose(logits(model, x), outs["default"], rtol=1e-4, atol=1e-4)
    lowrank.unmerge(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_saving_onto_a_file_is_a_clear_error(tmp_path):
    """save_adapter onto an existing file, or under one, raised a bare FileExistsError naming no file
    (misleading for the second; found by a new-user audit): a ValueError naming the file, nothing
    written, the file as it was."""
    model = lowrank.patch_linear(small_llama(), rank=2, targets=["q_proj"])
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(ValueError, match=f"{tmp_path / 'adapter'} is a file; an adapter is saved as a directory"):
        lowrank.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=f"{tmp_path / 'adapter'} is a file, so {tmp_path / 'adapter' / 'sub'} "):
        lowrank.save_adapter(model, tmp_path / "adapter" / "sub")
    assert (tmp_path / "adapter").read_text() == "not a folder" and os.listdir(tmp_path) == ["adapter"]
