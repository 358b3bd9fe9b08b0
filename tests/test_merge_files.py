"""lowrank/merge_files.py and `lowrank merge BASE ADAPTER OUT`: the merged model transformers loads
with no missing or unexpected key, bit-equal to load_adapter + merge_and_unload in memory; shards
streamed one at a time; OUT replaced only by a complete directory."""
import copy
import json
import os
import warnings
import shutil

import pytest
import safetensors.torch
import torch

import lowrank
from lowrank import cli
from lowrank.inspect_adapter import inspect_adapter
from lowrank import merge_files as merge_files_module
from lowrank.checkpoint import Checkpoint
from lowrank.merge_files import merge_files
from tests.helpers import run_python
from tests.models import input_ids, logits, randomize_lora_, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENIZER_FILES = {"tokenizer.json": '{"fake": 1}\n', "tokenizer_config.json": '{"model_max_length": 64}\n',
                   "special_tokens_map.json": "{}\n"}


def _base_dir(tmp_path, model, shard="60KB"):
    d = tmp_path / "base"
    model.save_pretrained(str(d), max_shard_size=shard)
    for name, text in TOKENIZER_FILES.items():
        (d / name).write_text(text)
    return d


def _peft_adapter(tmp_path, base, **kw):
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def _lowrank_adapter(tmp_path, base, rank=4, **kw):
    model = lowrank.patch_linear(copy.deepcopy(base), rank=rank, **kw)
    randomize_lora_(model, std=0.2)
    lowrank.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _in_memory(base_dir, adapter, dtype=None):
    """The oracle: the base loaded by transformers, the adapter by load_adapter, merge_and_unload."""
    kw = {} if dtype is None else {"dtype": dtype}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), **kw).eval()
    lowrank.load_adapter(model, adapter)
    return lowrank.merge_and_unload(model)


def _assert_same_model(out_dir, ref, base_dir):
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    a, b = ref.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].is_floating_point() else a[k],
                                                        b[k].view(torch.uint8) if b[k].is_floating_point() else b[k]), k
    x = input_ids(vocab=ref.config.vocab_size)
    assert torch.equal(logits(loaded, x), logits(ref, x))
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=loaded.dtype).eval()
    assert not torch.equal(logits(plain, x), logits(loaded, x)), "the adapter must change the model"
    for name, text in TOKENIZER_FILES.items():
        assert (out_dir / name).read_text() == text
    return loaded


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_llama_peft_adapter_several_shards(tmp_path, dtype, capsys):
    """A tiny Llama saved in several shards, a peft 0.21.2 adapter (q, v, down): `lowrank merge`
    writes what from_pretrained loads with no missing / unexpected key, bit-equal to the in-memory
    merge (bf16: the base cast first, as from_pretrained(dtype=bfloat16) does)."""
    base = tiny_llama()
    base_dir = _base_dir(tmp_path, base)
    n_shards = len(json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(set(json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 3
    adapter = _peft_adapter(tmp_path, base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "out"
    argv = ["merge", str(base_dir), str(adapter), str(out)] + ([] if dtype == "auto" else ["--dtype", dtype])
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "merged 6 layer(s)" in capsys.readouterr().out
    ref = _in_memory(base_dir, adapter, None if dtype == "auto" else getattr(torch, dtype))
    loaded = _assert_same_model(out, ref, base_dir)
    assert loaded.dtype == (torch.float32 if dtype == "auto" else torch.bfloat16)
    assert n_shards > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]  # no staging


def test_gpt2_conv1d_lowrank_adapter(tmp_path):
    """GPT-2: Conv1D weights stored (in, out), including the square c_proj (768x768 in the real
    model; 48x48 here) where the shape cannot tell the layout; an adapter written by lowrank with a
    per-layer rank and alpha."""
    base = tiny_gpt2()
    base_dir = _base_dir(tmp_path, base, shard="10GB")  # one model.safetensors, no index
    assert not (base_dir / "model.safetensors.index.json").exists()
    adapter = _lowrank_adapter(tmp_path, base, rank=4, rank_pattern={r"h\.1\.attn\.c_attn": 2},
                               alpha_pattern={r"h\.0\.mlp\.c_fc": 3.0})
    stats = merge_files(base_dir, adapter, tmp_path / "out")
    assert stats.layers == 8 and stats.shards == 1
    assert sorted(f for f in os.listdir(tmp_path / "out") if "safetensors" in f) == ["model.safetensors"]
    ref = _in_memory(base_dir, adapter)
    _assert_same_model(tmp_path / "out", ref, base_dir)


def test_prefix_differs_between_adapter_and_checkpoint(tmp_path):
    """An adapter made on the bare LlamaModel (paths `layers.0...`) merged into the LlamaForCausalLM
    checkpoint (keys `model.layers.0...`): same result as loading it into model.model."""
    base = tiny_llama()
    base_dir = _base_dir(tmp_path, base)
    adapter = _lowrank_adapter(tmp_path, base.model)
    merge_files(base_dir, adapter, tmp_path / "out")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    lowrank.load_adapter(ref.model, adapter)
    lowrank.merge_and_unload(ref.model)
    _assert_same_model(tmp_path / "out", ref, base_dir)


def test_streaming_holds_about_one_shard(tmp_path):
    """A 20 MB model in 1 MB shards: merge_files reports holding at most one shard's tensors at once,
    and the merging process's peak RSS (measured in a fresh interpreter, the peak reset after the
    imports through /proc/self/clear_refs) grows by far less than the model's size."""
    base = tiny_llama(hidden=256, intermediate=1024, vocab=2048, layers=4)
    base_dir = _base_dir(tmp_path, base, shard="1MB")
    adapter = _lowrank_adapter(tmp_path, base, rank=8)
    files = [f for f in os.listdir(base_dir) if f.endswith(".safetensors")]
    total = sum(os.path.getsize(base_dir / f) for f in files)
    largest = max(os.path.getsize(base_dir / f) for f in files)
    assert len(files) >= 10 and total > 15 * 2**20
    code = (
        "import json, sys, lowrank.merge_files as m\n"
        "def kb(field):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field))\n"
        "import torch\n"
        "m._architecture(sys.argv[1], 'warm-up')  # transformers' modules imported before the measurement\n"
        "torch.ops.lowrank.merge_(torch.zeros(2, 2), torch.ones(1, 2), torch.ones(2, 1), 1.0, False)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS:')\n"
        "s = m.merge_files(sys.argv[1], sys.argv[2], sys.argv[3])\n"
        "print(json.dumps({'held': s.largest_held_bytes, 'peak_growth': (kb('VmHWM:') - before) * 1024}))\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    res = run_python(code, str(base_dir), str(adapter), str(tmp_path / "out"), env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 < got["held"] <= largest, (got, largest)
    assert got["peak_growth"] < 0.5 * total, (got, total)
    ref = _in_memory(base_dir, adapter)
    _assert_same_model(tmp_path / "out", ref, base_dir)


def test_refusals_leave_everything_as_it_was(tmp_path, capsys, monkeypatch):
    base = tiny_llama()
    base_dir = _base_dir(tmp_path, base)
    adapter = _lowrank_adapter(tmp_path, base)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    other = tmp_path / "other"
    tiny_llama(hidden=32, intermediate=64).save_pretrained(str(other))
    bert = tmp_path / "bert"
    tiny_bert().save_pretrained(str(bert))
    capsys.readouterr()
    cases = [
        (["merge", str(base_dir), str(adapter), str(out)], "not empty; pass --force"),
        (["merge", str(other), str(adapter), str(tmp_path / "o2")], "does not fit this model"),
        (["merge", str(bert), str(adapter), str(tmp_path / "o2")], "no weight for adapter layer"),
        (["merge", str(tmp_path / "nope"), str(adapter), str(tmp_path / "o2")], "not a directory"),
        (["merge", str(base_dir), str(tmp_path / "nope"), str(tmp_path / "o2")], "not a directory"),
        (["merge", str(base_dir), str(adapter), str(base_dir), "--force"], "is or holds the base"),
        (["merge", str(base_dir), str(adapter), str(tmp_path / "o2"), "--requantize"], "applies to an NF4"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and err.startswith("lowrank merge: error:"), (argv, err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o2").exists()
    # the Llama's weights under a config.json of another kind of model (T5: no causal-LM class)
    shutil.copytree(base_dir, tmp_path / "o3")
    config = json.loads((base_dir / "config.json").read_text())
    (tmp_path / "o3" / "config.json").write_text(json.dumps({**config, "model_type": "t5",
                                                             "architectures": ["T5Model"]}))
    assert cli.main(["merge", str(tmp_path / "o3"), str(adapter), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "not a causal language model" in err and err.count("\n") == 1, err
    shutil.rmtree(tmp_path / "o3")
    # a base shard cut short (an interrupted download): the error names the shard
    shutil.copytree(base_dir, tmp_path / "o3")
    shard = sorted((tmp_path / "o3").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:5])
    assert cli.main(["merge", str(tmp_path / "o3"), str(adapter), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert f"{shard.name}' is not a readable safetensors file" in err and err.count("\n") == 1, err
    shutil.rmtree(tmp_path / "o3")
    # a failure while writing the third shard: OUT untouched, no staging directory left
    real = safetensors.torch.save_file
    calls = []

    def fail_third(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("disk full")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_third)
    assert cli.main(["merge", str(base_dir), str(adapter), str(out), "--force"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "bert", "other", "out"]  # no staging
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    # too little disk space: refused before anything is written
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    assert cli.main(["merge", str(base_dir), str(adapter), str(out), "--force"]) == 2
    assert "GiB free; nothing written" in capsys.readouterr().err
    monkeypatch.undo()
    # what a killed merge left beside OUT (its process gone) is removed by the next one
    stale = tmp_path / ".out.999999999.0123456789ab.merging"
    stale.mkdir()
    (stale / "model-00001-of-00004.safetensors").write_bytes(b"partial")
    assert cli.main(["merge", str(base_dir), str(adapter), str(out), "--force"]) == 0
    assert not stale.exists()
    assert not (out / "keep.txt").exists()
    written = sum(os.path.getsize(out / f) for f in os.listdir(out) if f.endswith(".safetensors"))
    estimate = merge_files_module._output_bytes(Checkpoint(base_dir), set(), False, None)
    assert estimate <= written <= estimate * 1.02 + 2**16, (estimate, written)  # headers on top
    _assert_same_model(out, _in_memory(base_dir, adapter), base_dir)


def test_tied_lm_head_refused(tmp_path):
    """GPT-2 ties lm_head to the token embedding: its weight is not stored, and merging into it
    would change the embedding too. Refused with nothing written."""
    base = tiny_gpt2()
    base_dir = _base_dir(tmp_path, base, shard="10GB")
    adapter = _lowrank_adapter(tmp_path, base, targets=["lm_head", "c_attn"])
    with pytest.raises(ValueError, match="no weight for adapter layer lm_head .* tied"):
        merge_files(base_dir, adapter, tmp_path / "out")
    # the same with lm_head.weight stored anyway: transformers ties it to the embedding on load
    sd = safetensors.torch.load_file(str(base_dir / "model.safetensors"))
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    safetensors.torch.save_file(sd, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head: its weight is tied to transformer.wte.weight"):
        merge_files(base_dir, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "--requantize" in out and "(default: auto)" in out


def _bnb_base(tmp_path):
    """A tiny Llama (fp32, in/out features multiples of 64) quantized to NF4 with double
    quantization by transformers + bitsandbytes on the CPU and saved in several shards."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = tiny_llama(hidden=64, intermediate=128)
    dense.save_pretrained(str(tmp_path / "dense"))
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    q = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), quantization_config=cfg,
                                                          device_map="cpu")
    q.save_pretrained(str(tmp_path / "q"), max_shard_size="12KB")
    for name, text in TOKENIZER_FILES.items():
        (tmp_path / "q" / name).write_text(text)
    return dense, tmp_path / "q", bnb


def _bnb_model(qdir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(qdir), device_map="cpu").eval()


def test_nf4_bitsandbytes_base_merged_dense(tmp_path):
    """A bitsandbytes NF4 checkpoint: every 4-bit weight dequantized (bit-identical to
    bitsandbytes' dequantize_4bit), the adapter's layers merged there with one rounding
    (bit-equal to load_adapter + merge_and_unload on the bitsandbytes model in memory); the output
    is a dense model from_pretrained loads with no missing / unexpected key."""
    dense, qdir, bnb = _bnb_base(tmp_path)
    adapter = _lowrank_adapter(tmp_path, dense, rank=4, targets=["q_proj", "down_proj"])
    stats = merge_files(qdir, adapter, tmp_path / "out")
    assert stats.layers == 4
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    got = loaded.state_dict()
    quantized = _bnb_model(qdir)
    layers4 = {p: m for p, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    deq = {p + ".weight": bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
           for p, m in layers4.items()}
    with warnings.catch_warnings():  # (dense merged layers beside 4-bit ones: in memory only, as wanted here)
        warnings.simplefilter("ignore")
        ref = lowrank.merge_and_unload(lowrank.load_adapter(_bnb_model(qdir), adapter), requantize=False).state_dict()
    merged_keys = {k for k in got if any(t in k for t in ("q_proj", "down_proj"))}
    assert len(merged_keys) == 4 and set(deq) >= merged_keys
    for k, t in got.items():
        if k in merged_keys:
            assert t.dtype == torch.float32 and torch.equal(t, ref[k]), k
            assert not torch.equal(t, deq[k]), f"{k}: the adapter must change the weight"
        elif k in deq:
            assert torch.equal(t, deq[k]), k  # dequantized as bitsandbytes does
        else:
            assert torch.equal(t, ref[k]), k
    assert (tmp_path / "out" / "tokenizer.json").read_text() == TOKENIZER_FILES["tokenizer.json"]
    # `lowrank inspect --base` on the NF4 checkpoint: norms relative to the decoded weights
    report = inspect_adapter(adapter, base=qdir)
    assert len(report.layers) == 4
    for lr in report.layers:
        assert lr.relative_norm == pytest.approx(lr.norm / float(deq[lr.path + ".weight"].double().norm()), rel=1e-12)
    # The same checkpoint with each merged layer's statistics in another shard than its codes.
    moved = tmp_path / "q_moved"
    moved.mkdir()
    raw = {}
    for f in os.listdir(qdir):
        if f.endswith(".safetensors"):
            raw.update(safetensors.torch.load_file(str(qdir / f)))
        elif not f.endswith(".index.json"):
            (moved / f).write_bytes((qdir / f).read_bytes())
    stats_keys = {k for k in raw if any(t in k for t in ("q_proj", "down_proj")) and not k.endswith(".weight")}
    parts = {"a.safetensors": {k: v for k, v in raw.items() if k not in stats_keys},
             "b.safetensors": {k: raw[k] for k in stats_keys}}
    for name, sd in parts.items():
        safetensors.torch.save_file(sd, str(moved / name), metadata={"format": "pt"})
    (moved / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, sd in parts.items() for k in sd}}))
    merge_files(moved, adapter, tmp_path / "out_moved")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out_moved")).state_dict()
    assert again.keys() == got.keys() and all(torch.equal(again[k], got[k]) for k in got)


def test_nf4_bitsandbytes_base_requantized(tmp_path):
    """--requantize: the adapter's layers quantized back (bit-equal to merge_and_unload(requantize=
    True)'s NF4 storage), every other 4-bit weight written as it was; transformers + bitsandbytes
    load it as a 4-bit model with no missing / unexpected key."""
    dense, qdir, bnb = _bnb_base(tmp_path)
    adapter = _lowrank_adapter(tmp_path, dense, rank=4, targets=["v_proj", "up_proj"])
    assert cli.main(["merge", str(qdir), str(adapter), str(tmp_path / "out"), "--requantize"]) == 0
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), device_map="cpu",
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = lowrank.merge_and_unload(lowrank.load_adapter(_bnb_model(qdir), adapter), requantize=True)
    written = {}
    for f in os.listdir(tmp_path / "out"):
        if f.endswith(".safetensors"):
            written.update(safetensors.torch.load_file(str(tmp_path / "out" / f)))
    base_raw = {}
    for f in os.listdir(qdir):
        if f.endswith(".safetensors"):
            base_raw.update(safetensors.torch.load_file(str(qdir / f)))
    assert written.keys() == base_raw.keys()
    # (merged layers of a model transformers loaded in 4-bit go back as bitsandbytes Linear4bit)
    requantized = [(p, lowrank.NF4Linear.from_bnb(m)) for p, m in ref.named_modules()
                   if isinstance(m, bnb.nn.Linear4bit) and any(t in p for t in ("v_proj", "up_proj"))]
    assert len(requantized) == 4 and not any(isinstance(m, lowrank.NF4Linear) for m in ref.modules())
    for path, module in requantized:  # the merged, requantized layers
        assert any(t in path for t in ("v_proj", "up_proj"))
        for k, v in module.nf4.to_bnb_state_dict(path + ".").items():
            assert torch.equal(written[k], v.reshape(written[k].shape)), k
        assert not torch.equal(written[path + ".weight"], base_raw[path + ".weight"])
    for k, v in base_raw.items():
        if not any(t in k for t in ("v_proj", "up_proj")):
            assert torch.equal(written[k], v), k
    lin = loaded.model.layers[0].mlp.up_proj
    assert isinstance(lin, bnb.nn.Linear4bit)
    ours = dict(requantized)["model.layers.0.mlp.up_proj"].nf4.dequantize(torch.float32)
    assert torch.equal(bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state), ours)


def test_other_quantizations_refused(tmp_path):
    """FP4 and 8-bit bitsandbytes checkpoints, and --dtype with an NF4 base: refused, nothing written."""
    dense, qdir, _ = _bnb_base(tmp_path)
    adapter = _lowrank_adapter(tmp_path, dense, rank=4, targets=["q_proj"])
    config = json.loads((qdir / "config.json").read_text())
    for change, words in (({"bnb_4bit_quant_type": "fp4"}, "only nf4"),
                          ({"load_in_4bit": False, "load_in_8bit": True}, "(8-bit)")):
        (qdir / "config.json").write_text(json.dumps({**config, "quantization_config": {
            **config["quantization_config"], **change}}))
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            merge_files(qdir, adapter, tmp_path / "out")
    (qdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="leave --dtype at auto"):
        merge_files(qdir, adapter, tmp_path / "out", dtype="bfloat16")
    assert not (tmp_path / "out").exists()


def test_embedding_lora_and_a_trained_head_are_merged(tmp_path):
    """An adapter with LoRA on the input embedding and lm_head in modules_to_save (peft's way to train
    the head whole): the merged model is the in-memory merge_and_unload, with the trained head."""
    base = tiny_llama()
    base_dir = _base_dir(tmp_path, base)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                                  modules_to_save=["lm_head"],
                                                                  init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(-1.5)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ref = _in_memory(base_dir, tmp_path / "adapter")
    assert isinstance(ref.lm_head, torch.nn.Linear) and type(ref.model.embed_tokens) is torch.nn.Embedding
    merge_files(base_dir, tmp_path / "adapter", tmp_path / "out")
    loaded = _assert_same_model(tmp_path / "out", ref, base_dir)
    x = input_ids(vocab=base.config.vocab_size)
    torch.testing.assert_close(logits(loaded, x), logits(pm.merge_and_unload().eval(), x), rtol=1e-5, atol=1e-5)


def test_a_trained_copy_of_a_tied_head_is_refused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=61, tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(cfg).eval()
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir))
    model = lowrank.patch_linear(copy.deepcopy(base), r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    lowrank.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="lm_head"):
        merge_files(base_dir, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_dora_adapter_is_refused_once_and_nothing_written(tmp_path):
    """lowrank merge does not merge DoRA files yet: one sentence for the adapter (it repeated the same
    sentence once per layer: found by a new-user trial), OUT not created."""
    base = tiny_llama()
    base_dir = _base_dir(tmp_path, base)
    adapter = _lowrank_adapter(tmp_path, base, dora=True)
    with pytest.raises(ValueError, match="DoRA") as e:
        merge_files(base_dir, adapter, tmp_path / "out")
    assert str(e.value).count("does not merge DoRA") == 1 and "save_pretrained(merged=True)" in str(e.value)
    assert not (tmp_path / "out").exists()
