"""End to end: one training step (forward, backward, AdamW) of a Llama-architecture model built from a
config, for full fine-tuning, LoRA and QLoRA, each by lowrank and by peft (+ bitsandbytes' Linear4bit
for QLoRA).

    python -m bench.run --only train_step [--quick]

CPU: ~58M parameters (hidden 512, 8 layers, vocab 32000), 2 x 128 tokens, fp32. GPU: ~1.1B (hidden
2048, 16 layers), 4 x 512 tokens, bf16 autocast. LoRA: r=16, all linear layers but the head. Full
fine-tuning is one record ("torch": every parameter trained, what both libraries leave it to). Per
(method, impl) a record with the median step time and tokens/s, and in `extra` the peak tensor
memory of the step (`lowrank.tensor_memory.TensorMemory`: parameters, gradients, optimizer state
and activations; `torch.cuda.max_memory_allocated` on a GPU), the trainable parameters, the
optimizer's state bytes and the bytes of the checkpoint the method writes (the adapter file for
LoRA / QLoRA, the model's state dict for full fine-tuning).

Correctness first: every implementation's loss at step 0 must equal the base model's loss on the
same batch (LoRA's B starts at zero; QLoRA against the same NF4 dequantized base, within 1e-3);
one that does not is recorded as failed (with the losses) and is not timed.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile

import torch
import torch.nn as nn

import lowrank
from lowrank.nf4_format import quantize_nf4
from lowrank.tensor_memory import TensorMemory

from .harness import Record, bench, device_name, versions

BASELINE = "peft"
RANK = 16


def _config(device: torch.device):
    from transformers import LlamaConfig

    if device.type == "cuda":
        return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                           num_key_value_heads=16, vocab_size=32000, max_position_embeddings=1024), (4, 512)
    return LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256), (2, 128)


def _base(config, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    model.config.use_cache = False
    return model


def _bnb_quantize(model: nn.Module, device) -> nn.Module:
    """Every decoder nn.Linear as bitsandbytes' Linear4bit (NF4, double quant, fp32 compute on CPU)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.detach().cpu(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                setattr(module, child_name, q.to(device))
    return model


def _prepare(method: str, impl: str, base: nn.Module, device) -> nn.Module:
    model = copy.deepcopy(base)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if impl == "lowrank":
        return lowrank.patch_linear(model, rank=RANK, quantize="nf4" if method == "qlora" else None,
                                    compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    from peft import LoraConfig, get_peft_model

    if method == "qlora":
        model = _bnb_quantize(model, device)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))


def _reference_loss(method: str, base: nn.Module, ids: torch.Tensor, device) -> float:
    """The base model's loss on the batch (for QLoRA: with every decoder weight through NF4)."""
    model = copy.deepcopy(base)
    if method == "qlora":
        with torch.no_grad():
            for path, module, *_ in lowrank.select_targets(model, "all-linear"):
                module.weight.copy_(quantize_nf4(module.weight).dequantize(module.weight.dtype))
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _checkpoint_bytes(method: str, impl: str, model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        if method == "full":
            torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(d, "model.pt"))
        elif impl == "lowrank":
            lowrank.save_adapter(model, d)
        else:
            model.save_pretrained(d)
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(d) for f in files)


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def run(quick: bool, device: str) -> list[Record]:
    dev = torch.device(device)
    config, (batch, seq) = _config(dev)
    base = _base(config, dev)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(dev)
    tokens = batch * seq
    records = []
    methods = ("full", "lora", "qlora")
    for method in methods:
        ref = _reference_loss(method, base, ids, dev)
        for impl in (("torch",) if method == "full" else ("lowrank", "peft")):
            shape = {"model": "llama", "params": sum(p.numel() for p in base.parameters()), "tokens": tokens}
            name = f"{impl}+bnb" if (impl == "peft" and method == "qlora") else impl
            extra = {"method": method, "threads": torch.get_num_threads()}
            try:
                model = _prepare(method, impl, base, dev)
            except Exception as exc:  # a missing peer (bitsandbytes on this machine): say why, go on
                records.append(Record(op=f"train_step.{method}", shape=shape, dtype="fp32", impl=name,
                                      median_s=float("nan"), derived={}, device=device_name(dev),
                                      versions=versions(), extra={**extra, "error": repr(exc)}))
                continue
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
            with torch.no_grad(), autocast:
                loss0 = model(input_ids=ids, labels=ids).loss.item()
            tol = 1e-3 if method == "qlora" else 1e-5
            if method != "full" and not math.isclose(loss0, ref, rel_tol=tol, abs_tol=tol):
                records.append(Record(op=f"train_step.{method}", shape=shape, dtype="fp32", impl=name,
                                      median_s=float("nan"), derived={}, device=device_name(dev), versions=versions(),
                                      extra={**extra, "error": f"step-0 loss {loss0} != base model's {ref}"}))
                continue

            def step():
                with autocast:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # the optimizer's state exists from here on
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                step()
                peak = torch.cuda.max_memory_allocated(dev)
            else:
                with TensorMemory(start_with=[model, opt]) as mem:
                    step()
                peak = mem.peak_bytes
            t = bench(step, [()], warmup=1, repeat=3 if quick else 8, device=dev)
            extra.update(peak_bytes=peak, trainable=sum(p.numel() for p in params),
                         optimizer_bytes=_optimizer_bytes(opt), checkpoint_bytes=_checkpoint_bytes(method, impl, model),
                         step0_loss=loss0, base_loss=ref)
            records.append(Record(op=f"train_step.{method}", shape=shape, dtype="fp32" if dev.type == "cpu" else "bf16",
                                  impl=name, median_s=t, derived={"tokens/s": tokens / t}, device=device_name(dev),
                                  versions=versions(), extra=extra))
            del model, opt
    return records
