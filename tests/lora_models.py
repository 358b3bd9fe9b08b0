"""Tiny Hugging Face models built from configs, and a float64 oracle for patched models."""
import copy

import torch
import lowrank
from tests import models


def tiny_llama():
    # Smaller than tests/models.py's default: these models also run through Triton's interpreter.
    return models.tiny_llama(seed=None, hidden=32, intermediate=44, vocab=61, positions=32)


def tiny_gpt2():
    return models.tiny_gpt2(seed=None, hidden=32, vocab=61, positions=32)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def randomize_B_(model, std=0.5):
    """peft and lowrank both start with B = 0 (the adapter is a no-op); make it count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def ids(rows=2, seq=7):
    return torch.randint(0, 61, (rows, seq))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def merged_f64(model, adapter="active"):
    """An independent oracle: a float64 copy of a lowrank-patched model where each layer's adapter
    (its active one, or `adapter`; None for the base model) is merged into a plain base layer
    (W + s * B @ A, transposed for Conv1D)."""
    ref = copy.deepcopy(model)
    for path, layer in list(lowrank.lora_layers(ref)):
        base = layer.base_layer.double()
        name = layer.active_adapter if adapter == "active" else adapter
        if name is not None and name in layer.configs:
            with torch.no_grad():
                delta = layer.scaling(name) * layer.lora_B[name].double() @ layer.lora_A[name].double()
                base.weight += delta.t() if layer.fan_in_fan_out else delta
        parent, _, attr = path.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, attr, base)
    return ref.double()
