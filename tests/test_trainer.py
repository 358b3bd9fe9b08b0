"""lowrank.hf.trainer_class / lowrank.Trainer: transformers' Trainer on patched models (dense, NF4
by lowrank, 4-bit by transformers + bitsandbytes, a classifier with modules_to_save): adapter-only
checkpoints in peft's format, and a resume that continues bit for bit."""
import os
import warnings

import pytest
import torch

import lowrank
from lowrank.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from tests.models import tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")


def lm_data(n=16, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (n, seq), generator=g)
    return [{"input_ids": r, "labels": r} for r in x]


def args(out, steps, save_steps=2, **kw):
    return transformers.TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                                          save_steps=save_steps, save_strategy="steps", report_to=[], use_cpu=True,
                                          seed=0, disable_tqdm=True, logging_steps=100, **kw)


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}


def patched_llama():
    return lowrank.patch_linear(tiny_llama(), r=4, target_modules=["q_proj", "v_proj"])


def test_checkpoints_hold_the_adapter_and_resume_continues_bit_for_bit(tmp_path):
    a = patched_llama()
    start = lora_state(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.Trainer(model=a, args=args(tmp_path / "a", 4), train_dataset=lm_data()).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {CONFIG_NAME, WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files  # the adapter, not the full model
    end = lora_state(a)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # it trained

    b = patched_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.Trainer(model=b, args=args(tmp_path / "b", 4), train_dataset=lm_data()).train(
            resume_from_checkpoint=str(ckpt))
    resumed = lora_state(b)
    for k in end:
        assert torch.equal(resumed[k], end[k]), k

    # peft reads the checkpoint as its own adapter
    pm = peft.PeftModel.from_pretrained(tiny_llama(), ckpt)
    c = patched_llama()
    lowrank.load_adapter(c, ckpt)
    x = lm_data(2)[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(c(input_ids=x).logits, pm(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_keeps_what_other_processes_write_into_it_meanwhile(tmp_path, monkeypatch):
    """Under torchrun every rank writes rng_state_<rank>.pth into the checkpoint folder while rank 0
    saves the adapter there: the save swapped the folder (only the adapter files in it at that
    moment) and deleted the old one, taking another rank's file with it (a resume of that checkpoint
    was not exact). The Trainer's save now writes in place. Here a file written into the folder
    while the adapter is being written stands for the other rank's."""
    from lowrank import adapter_files

    write_pair = adapter_files._write_pair

    def racing(directory, *a, **kw):
        ckpt = next(iter(sorted((tmp_path / "a").glob("checkpoint-*"))), None)
        if ckpt is not None:
            (ckpt / "rng_state_1.pth").write_bytes(b"another rank's state")
        return write_pair(directory, *a, **kw)

    monkeypatch.setattr(adapter_files, "_write_pair", racing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.Trainer(model=patched_llama(), args=args(tmp_path / "a", 2), train_dataset=lm_data()).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "rng_state_1.pth").read_bytes() == b"another rank's state"
    assert {CONFIG_NAME, WEIGHTS_NAME} <= set(os.listdir(ckpt))


def test_classifier_head_in_modules_to_save_trains_and_is_checkpointed(tmp_path):
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)

    def bert():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(cfg)

    model = bert()
    lowrank.patch_linear(model, r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    head = model.classifier.modules_to_save["default"].weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 61, (16, 6), generator=g)
    data = [{"input_ids": r, "labels": int(r[0] % 2)} for r in x]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.Trainer(model=model, args=args(tmp_path, 3, save_steps=3), train_dataset=data).train()
    assert not torch.equal(model.classifier.modules_to_save["default"].weight, head)
    assert torch.equal(model.classifier.original_module.weight, head)
    back = peft.PeftModel.from_pretrained(bert(), tmp_path / "checkpoint-3")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_nf4_by_lowrank_trains(tmp_path):
    model = lowrank.patch_linear(tiny_llama(), r=4, target_modules=["q_proj", "v_proj"], quantize="nf4",
                                 compute_dtype=torch.float32)
    start = lora_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.Trainer(model=model, args=args(tmp_path, 2, save_steps=2), train_dataset=lm_data()).train()
    end = lora_state(model)
    assert all(torch.isfinite(v).all() for v in end.values())
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert os.path.isfile(tmp_path / "checkpoint-2" / WEIGHTS_NAME)


def test_4bit_by_transformers_trains_where_plain_trainer_refuses(tmp_path):
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q,
                                                                  device_map="cpu")
    lowrank.patch_linear(model, r=4, target_modules=["q_proj", "v_proj"])
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, lowrank.NF4Linear)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args(tmp_path / "plain", 2), train_dataset=lm_data())
    start = lora_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.Trainer(model=model, args=args(tmp_path / "ours", 2), train_dataset=lm_data()).train()
    assert not getattr(model, "_hf_peft_config_loaded", False)  # only while the Trainer checks
    end = lora_state(model)
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert os.path.isfile(tmp_path / "ours" / "checkpoint-2" / WEIGHTS_NAME)


def two_adapters(second: str):
    """patched_llama's adapter and a rank-2 one named `second` on k_proj, every B drawn (non-zero)."""
    model = patched_llama()
    lowrank.add_adapter(model, second, r=2, target_modules=["k_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def test_several_adapters_save_and_load_as_peft_lays_them_out(tmp_path):
    model = two_adapters("fr")
    assert lowrank.hf.save_adapters(model, tmp_path) == ["default", "fr"]
    assert os.path.isfile(tmp_path / CONFIG_NAME) and os.path.isfile(tmp_path / "fr" / CONFIG_NAME)
    fresh = tiny_llama()
    assert lowrank.hf.load_adapters(fresh, tmp_path) == ["default", "fr"]
    ours, theirs = lora_state(model), lora_state(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert lowrank.patch.active_adapter(fresh) == "default"


def test_load_adapters_skips_trainer_checkpoints_and_changes_nothing_when_one_fails(tmp_path):
    """A Trainer's output_dir: the adapter save_model wrote, beside checkpoint-N folders (adapters
    too, but not extra ones): load_adapters loads the root and the named subfolders (a peft name
    like "sft-v2" included), not the checkpoints. A subfolder that fails to load (weights of the
    wrong rank) fails the call before any adapter reaches the model: module types, adapter names
    and every tensor as they were (an unpatched model and a patched one)."""
    model = two_adapters("sft-v2")
    lowrank.hf.save_adapters(model, tmp_path)
    lowrank.save_adapter(model, tmp_path / "checkpoint-3")
    fresh = tiny_llama()
    assert lowrank.hf.load_adapters(fresh, tmp_path) == ["default", "sft-v2"]
    assert lowrank.adapter_names(fresh) == ["default", "sft-v2"]
    ours, theirs = lora_state(model), lora_state(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    bad = tmp_path / "zz"  # "sft-v2"'s config over rank-3 weights: found only when its weights are checked
    bad.mkdir()
    (bad / CONFIG_NAME).write_text((tmp_path / "sft-v2" / CONFIG_NAME).read_text())
    tensors = load_file(tmp_path / "sft-v2" / WEIGHTS_NAME)
    save_file({k: torch.zeros(3, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 3)
               for k, v in tensors.items()}, bad / WEIGHTS_NAME)
    for target in (tiny_llama(), patched_llama()):
        types = [type(m) for m in target.modules()]
        names = lowrank.adapter_names(target)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match="zz"):
            lowrank.hf.load_adapters(target, tmp_path)
        assert [type(m) for m in target.modules()] == types and lowrank.adapter_names(target) == names
        after = target.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("case", ["modules_to_save", "trainable_tokens", "peft-embedding-lora", "pickle"])
def test_load_adapters_reads_values_from_the_model_in_its_dry_run(tmp_path, case):
    """load_adapters' dry run on a meta-device twin judged the checks that read values against meta
    tensors and refused valid folders: a modules_to_save head ("nothing to copy"), trainable token
    rows ("no rows to start from": a Trainer resume of such a run failed) and peft's embedding-LoRA
    file, which carries the embedding's base weight ("differs from the model's"). Each loads into a
    fresh model and back into the patched one (a resume), to the saved weights and peft's logits; a
    file whose embedding copy is not the model's is still refused, the model unchanged. peft's
    safe_serialization=False files load with allow_pickle=True, as with load_adapter."""
    from peft import LoraConfig, get_peft_model

    kw = {"modules_to_save": dict(modules_to_save=["lm_head"]), "trainable_tokens": dict(trainable_token_indices=[1, 2]),
          "peft-embedding-lora": dict(target_modules=["q_proj", "embed_tokens"]), "pickle": {}}[case]
    peft_model = get_peft_model(tiny_llama(), LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **kw}))
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path, safe_serialization=case != "pickle")
    x = torch.tensor([[1, 2, 5, 7]])
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
    if case == "pickle":
        with pytest.raises(ValueError, match="allow_pickle"):
            lowrank.hf.load_adapters(tiny_llama(), tmp_path)
    extra = dict(allow_pickle=True) if case == "pickle" else {}
    fresh = tiny_llama().eval()
    assert lowrank.hf.load_adapters(fresh, tmp_path, **extra) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, want)
    assert lowrank.hf.load_adapters(fresh, tmp_path, **extra) == ["default"]  # into the patched model (a resume)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, want)
    if case == "peft-embedding-lora":
        other = tiny_llama()
        with torch.no_grad():
            other.model.embed_tokens.weight[3] += 1
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match="base weight differs"):
            lowrank.hf.load_adapters(other, tmp_path)
        after = other.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_refusals():
    with pytest.raises(TypeError, match="base must be transformers.Trainer"):
        lowrank.trainer_class(dict)
    with pytest.raises(ValueError, match="no LoRA layer"):
        lowrank.Trainer(model=tiny_llama(), args=args("/tmp/unused-lowrank-trainer", 1))
    with pytest.raises(ValueError, match="holds no adapter"):
        lowrank.hf.load_adapters(patched_llama(), "/nonexistent-dir")


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<pad>", "the", "cat", "dog", "sat", "ran", "on", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(words), max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = lowrank.patch_linear(transformers.LlamaForCausalLM(cfg), r=4, target_modules=["q_proj", "v_proj"])
    start = lora_state(model)
    data = datasets.Dataset.from_list([{"text": "the cat sat on the mat"}, {"text": "the dog ran"}] * 8)
    config = trl.SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_steps=2, report_to=[],
                           use_cpu=True, disable_tqdm=True, max_length=16, learning_rate=1e-2)
    trainer = lowrank.trainer_class(trl.SFTTrainer)
    assert issubclass(trainer, trl.SFTTrainer) and lowrank.trainer_class(trl.SFTTrainer) is trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(model=model, args=config, train_dataset=data, processing_class=fast).train()
    end = lora_state(model)
    assert any(not torch.equal(start[k], end[k]) for k in start)
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert {CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json"} <= files and "model.safetensors" not in files


def _llama_cls_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   num_labels=2, pad_token_id=0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _cls_model(base_dir, kind):
    """A Llama classifier, patched with LoRA and its score head in modules_to_save, on a dense base,
    an NF4 base quantized by lowrank, or a 4-bit base loaded by transformers + bitsandbytes."""
    kw = {}
    if kind == "bnb":
        kw = dict(quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["score"]), device_map="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForSequenceClassification.from_pretrained(base_dir, **kw)
    quantize = {"nf4": dict(quantize="nf4", compute_dtype=torch.float32)}.get(kind, {})
    return lowrank.patch_linear(model, r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                                **quantize)


@pytest.mark.parametrize("kind", ["dense", "nf4", "bnb"])
def test_five_steps_on_each_kind_of_base_train_the_head_checkpoint_and_resume(tmp_path, kind):
    if kind == "bnb":
        pytest.importorskip("bitsandbytes")
    base_dir = _llama_cls_dir(tmp_path)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 61, (20, 6), generator=g)
    data = [{"input_ids": r, "labels": int(r[0] % 2)} for r in x]

    def run(out, resume=None):
        model = _cls_model(base_dir, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowrank.Trainer(model=model, args=args(out, 5, save_steps=2), train_dataset=data).train(
                resume_from_checkpoint=resume)
        return model

    first = run(tmp_path / "a")
    head = first.score.modules_to_save["default"].weight
    assert not torch.equal(head, first.score.original_module.weight)  # the head trained
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {CONFIG_NAME, WEIGHTS_NAME} <= files and "model.safetensors" not in files
    from safetensors.torch import load_file
    assert "base_model.model.score.weight" in load_file(ckpt / WEIGHTS_NAME)
    resumed = run(tmp_path / "b", resume=str(ckpt))
    a, b = lora_state(first), lora_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_collators_tokenizer_is_saved_when_there_is_no_processing_class(tmp_path):
    """transformers' Trainer saves data_collator.tokenizer into each checkpoint when processing_class
    is None; lowrank's saved none (found by a new-user trial)."""
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0")),
        pad_token="w1", unk_token="w0")
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    data = [{"input_ids": r["input_ids"].tolist()} for r in lm_data()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.Trainer(model=patched_llama(), args=args(tmp_path, 2), train_dataset=data,
                        data_collator=collator).train()
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert {CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json", "tokenizer_config.json"} <= files
