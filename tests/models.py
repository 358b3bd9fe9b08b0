"""The tests' model builders: small real architectures built from transformers configs (no
downloads), and what tests do with them (inputs, logits, non-zero adapters, snapshots)."""
from __future__ import annotations

import json

import torch

import lowrank


def tiny_llama(seed: int | None = 0, dtype=torch.float32, hidden: int = 48, intermediate: int = 96,
               vocab: int = 97, layers: int = 2, positions: int = 64):
    """A random Llama built from a config (eval mode). seed=None keeps the global RNG's state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=positions)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int | None = 0, dtype=torch.float32, hidden: int = 48, vocab: int = 97, layers: int = 2,
              positions: int = 64):
    """A random GPT-2 (Conv1D layers) built from a config (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=positions,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_bert(seed: int | None = 0, dtype=torch.float32):
    from transformers import BertConfig, BertModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=97, max_position_embeddings=64)
    return BertModel(cfg).to(dtype).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}

# Smaller still, for the tests that also run their models through Triton's interpreter: a 61-token
# vocabulary (`ids`), hidden size 32, fresh weights from the global generator (seeded per test).
SMALL = dict(seed=None, hidden=32, vocab=61, positions=32)


def small_llama():
    return tiny_llama(intermediate=44, **SMALL)


def small_gpt2():
    return tiny_gpt2(**SMALL)


SMALL_MODELS = {"llama": small_llama, "gpt2": small_gpt2}


def ids(rows=2, seq=7, vocab=61):
    """Random token ids for the small models, from the global generator."""
    return torch.randint(0, vocab, (rows, seq))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def randomize_B_(model, std=0.5):
    """lowrank (like peft) starts with B = 0, where the adapter is a no-op: make it count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def randomize_lora_(model, std=0.05, seed=0):
    """Every A and B of every adapter drawn from N(0, std^2) with its own generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def input_ids(batch: int = 2, seq: int = 11, vocab: int = 97, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def snapshot(model: torch.nn.Module) -> dict:
    """Everything patching may change: module tree (types and identities), tensors, flags."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad, id(p)) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "attrs": sorted(k for k in model.__dict__ if k.startswith("_lowrank")),
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["modules"] == b["modules"], "module tree changed"
    assert a["params"].keys() == b["params"].keys(), "parameter names changed"
    for n, (t, rg, pid) in a["params"].items():
        t2, rg2, pid2 = b["params"][n]
        assert pid == pid2, f"parameter {n} was replaced"
        assert rg == rg2, f"requires_grad of {n} changed"
        assert torch.equal(t, t2), f"values of {n} changed"
    assert a["buffers"].keys() == b["buffers"].keys()
    for n, t in a["buffers"].items():
        assert torch.equal(t, b["buffers"][n]), f"buffer {n} changed"
    assert a["attrs"] == b["attrs"]


WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "rug", "red", "blue", "big", "small", "a", "saw", "and"]


def save_tiny_causal_lm(path, seed: int = 0, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> None:
    """A random Llama and a word-level tokenizer over WORDS saved as a local transformers model
    directory (config, safetensors, tokenizer files), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab),
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(path)


def write_prompt_completion_jsonl(path, n: int = 40, seed: int = 0) -> None:
    """n {prompt, completion} records over WORDS with a learnable rule (the completion repeats a
    prompt word)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = (WORDS[i] for i in torch.randint(0, len(WORDS), (2,), generator=g).tolist())
            f.write(json.dumps({"prompt": f"the {a} saw", "completion": f" a {b} and the {a}"}) + "\n")
