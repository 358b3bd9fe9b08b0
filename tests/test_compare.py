"""`lowrank compare`: the methods on one budget, the table and files it writes, the planner's
memory prediction against the measured peak, forgetting on the built-in setting, and a local
model with the user's data."""
import json
import math
import os

import pytest
import safetensors.torch
import torch

from lowrank import compare as C
from tests.helpers import run_cli


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "compare"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    os.environ["LOWRANK_CACHE"] = str(out / "cache")
    try:
        result = C.compare(C.METHODS, rank=4, batch=4, full_steps=6, pretrain_steps=20, out_dir=str(out),
                           progress=False)
    finally:
        del os.environ["LOWRANK_CACHE"]
    return out, result


def test_tiny_run_writes_the_table_json_and_curves(tiny_run):
    out, result = tiny_run
    assert list(result.results) == ["full", "lora", "qlora", "dora", "qdora"]
    rows = C.table_rows(result)
    assert tuple(rows) == C.ROWS and all(len(cells) == 5 for cells in rows.values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["lora"]["trainable"] == result.results["lora"].trainable
    assert saved["reading"] == result.reading
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for r in result.results.values():
        for pair in (r.task_loss, r.general_loss, r.task_acc, r.general_acc):
            assert all(math.isfinite(x) for x in pair)


def test_every_method_gets_the_same_flops(tiny_run):
    _, result = tiny_run
    budget = result.setting["budget_flops"]
    for r in result.results.values():
        per_step = r.train_flops / r.steps
        assert budget - per_step < r.train_flops <= budget, (r.method, r.train_flops, budget)
    assert result.results["lora"].steps > result.results["full"].steps  # cheaper steps, more of them


def test_trainable_counts_and_checkpoints_are_the_methods(tiny_run):
    out, result = tiny_run
    full, lora, qlora = (result.results[m] for m in ("full", "lora", "qlora"))
    state = safetensors.torch.load_file(str(out / "full" / "model.safetensors"))
    assert sum(v.numel() for v in state.values()) >= full.trainable  # every weight, tied ones once
    adapter = safetensors.torch.load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert sum(v.numel() for v in adapter.values()) == lora.trainable == qlora.trainable
    assert lora.checkpoint_bytes < full.checkpoint_bytes / 10


def test_plan_predicts_the_measured_peak(tiny_run):
    """The planner's memory model for each method's training step against the live tensor bytes
    measured in that run (TensorMemory): within 10%."""
    _, result = tiny_run
    for r in result.results.values():
        assert abs(r.predicted_peak_bytes / r.tensor_peak_bytes - 1) < 0.10, (r.method, r.predicted_peak_bytes,
                                                                             r.tensor_peak_bytes)
        assert r.rss_peak_bytes > r.tensor_peak_bytes


def test_reading_quotes_the_tables_numbers(tiny_run):
    _, result = tiny_run
    full, lora = result.results["full"], result.results["lora"]
    assert f"{lora.general_loss[1] - lora.general_loss[0]:+.3f}" in result.reading
    assert f"{full.general_loss[1] - full.general_loss[0]:+.3f}" in result.reading
    assert "same training FLOPs" in result.reading


def test_pretraining_is_cached_and_a_damaged_cache_is_replaced(cache):
    first = C.pretrained_builtin(steps=3, progress=False)
    files = list(cache.iterdir())
    assert len(files) == 1
    again = C.pretrained_builtin(steps=3, progress=False)
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    files[0].write_bytes(b"not a safetensors file")
    third = C.pretrained_builtin(steps=3, progress=False)
    assert torch.equal(third.lm_head.weight, first.lm_head.weight)
    assert safetensors.torch.load_file(str(files[0]))  # rewritten whole


def test_time_budget(cache, tmp_path):
    result = C.compare(["full", "lora"], rank=2, batch=2, budget="time", seconds=0.5, pretrain_steps=5,
                       out_dir=str(tmp_path / "out"), progress=False)
    for r in result.results.values():
        assert r.seconds_per_step * (r.steps - 2) >= 0.5
    assert "same training time" in result.reading


@pytest.mark.slow
def test_full_fine_tuning_forgets_more_than_lora_on_the_builtin_setting(cache, tmp_path):
    """The default setting (what `make demo` runs): every method learns the task, and full
    fine-tuning's general-corpus loss moves more than LoRA's."""
    result = C.compare(["full", "lora"], out_dir=str(tmp_path / "out"), progress=False)
    full, lora = result.results["full"], result.results["lora"]
    for r in (full, lora):
        assert r.task_acc[1] > 0.9 > r.task_acc[0], (r.method, r.task_acc)
        assert abs(r.predicted_peak_bytes / r.tensor_peak_bytes - 1) < 0.10
    forgot = lambda r: r.general_loss[1] - r.general_loss[0]  # noqa: E731
    assert forgot(full) > forgot(lora) > 0, (forgot(full), forgot(lora))


def test_dora_methods(tiny_run):
    """dora / qdora: LoRA / QLoRA with DoRA adapters, on the same FLOP budget (their steps cost the
    row norms too: no more steps than LoRA's), the magnitudes trained and saved in peft's DoRA format,
    the plan's memory model within 10% of the measured step (test_plan_predicts_the_measured_peak)."""
    out, result = tiny_run
    lora, dora, qdora = (result.results[m] for m in ("lora", "dora", "qdora"))
    config = json.loads((out / "dora" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    adapter = safetensors.torch.load_file(str(out / "dora" / "adapter_model.safetensors"))
    mags = [k for k in adapter if k.endswith("lora_magnitude_vector")]
    assert mags and sum(v.numel() for v in adapter.values()) == dora.trainable == qdora.trainable
    assert dora.trainable - lora.trainable == sum(adapter[k].numel() for k in mags)
    assert dora.train_flops / dora.steps > lora.train_flops / lora.steps and dora.steps <= lora.steps
    assert "DoRA reached" in result.reading and "QLoRA+DoRA reached" in result.reading


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="methods"):
        C.compare(["vera"], progress=False)
    with pytest.raises(ValueError, match="seconds"):
        C.compare(budget="time", progress=False)
    with pytest.raises(ValueError, match=r"seconds=1\.0 is for budget 'time'"):  # was ignored silently
        C.compare(seconds=1.0, progress=False)
    with pytest.raises(ValueError, match="rank"):
        C.compare(rank=0, progress=False)


# -- a local transformers model and the user's data ----------------------------------------------

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "rug", "red", "blue", "big", "small", "a", "saw", "and"]


def _local_model(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(path)


def _data(path, n=40):
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = (WORDS[i] for i in torch.randint(0, len(WORDS), (2,), generator=g).tolist())
            f.write(json.dumps({"prompt": f"the {a} saw", "completion": f" a {b} and the {a}"}) + "\n")


@pytest.mark.parametrize("general", [False, True], ids=["own-generations", "general-file"])
def test_local_model_and_data(tmp_path, general):
    _local_model(tmp_path / "model")
    _data(tmp_path / "data.jsonl")
    gen = None
    if general:
        gen = tmp_path / "general.txt"
        gen.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(10)))
    work = C.file_workload(str(tmp_path / "model"), str(tmp_path / "data.jsonl"), str(gen) if gen else None, seq=16)
    assert len(work.eval_sets["general"]) >= 1 and len(work.eval_sets["task"]) >= 1
    result = C.compare(["full", "lora"], workload=work, batch=4, full_steps=15, out_dir=str(tmp_path / "out"),
                       progress=False, lr={"full": 3e-3, "lora": 1e-2})
    for r in result.results.values():
        assert r.task_loss[1] < r.task_loss[0] - 0.5, (r.method, r.task_loss)
    assert "data.jsonl" in result.setting["workload"]


def test_bad_data_is_named(tmp_path):
    _local_model(tmp_path / "model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2"):
        C.file_workload(str(tmp_path / "model"), str(bad))


def test_a_missing_data_file_or_tokenizer_is_named(tmp_path):
    """--data missing was reported as transformers' tokenizer error when the model folder had no
    tokenizer (found by a new-user trial): the data file is read first, and a folder without a usable
    tokenizer is named with what to do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"nonexist\.jsonl: no such file"):
        C.file_workload(str(tmp_path / "bare"), str(tmp_path / "nonexist.jsonl"))
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "the cat"}\n' * 4)
    with pytest.raises(ValueError, match=r"bare: no usable tokenizer"):
        C.file_workload(str(tmp_path / "bare"), str(data))


@pytest.mark.parametrize("args, needle", [
    (["compare", "--methods", "vera"], "methods"),
    (["compare", "--data", "x.jsonl"], "--model"),
    (["compare", "--lr", "full=fast"], "--lr"),
    (["compare", "--lr", "full=nan"], "--lr"),  # torch's "Invalid learning rate: nan" named no argument
    (["compare", "--lr", "lora=-1"], "--lr"),
])
def test_cli_bad_arguments_one_line(args, needle):
    code, err = run_cli(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
