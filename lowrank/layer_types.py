"""Recognising the linear layers lowrank wraps, without importing the libraries that define them,
finding every place a model holds a module (one module may sit under several paths), and the real
tensors behind a meta-device twin during a dry run (`dry_run_values`, `real_values`).

Level 0: imports torch only. (`lowrank.lora_linear.is_linear` adds lowrank's own NF4Linear.)
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn as nn

# id(meta tensor of a twin) -> the model's tensor it stands for, while a dry run is on (this context)
_DRY_RUN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lowrank_dry_run", default=None)


@contextlib.contextmanager
def dry_run_values(sources: dict):
    """While on (in this thread / context): `real_values` maps each meta tensor of a model's
    meta-device twin (`sources`: id(twin tensor) -> the model's tensor) back to the model's, so that
    checks that read values (an adapter file's copy of an embedding compared bit for bit, token
    rows to start from, a module to copy whole) judge the real model while the twin takes every
    change (lowrank.hf.load_adapters' dry run)."""
    token = _DRY_RUN.set(sources)
    try:
        yield
    finally:
        _DRY_RUN.reset(token)


def real_values(t: torch.Tensor) -> torch.Tensor:
    """`t`, or during `dry_run_values` the model's tensor that the twin's `t` stands for. Read only."""
    sources = _DRY_RUN.get()
    return t if sources is None else sources.get(id(t), t)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (weight stored (in, out)), detected without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit (and its LinearNF4/LinearFP4 subclasses), without importing bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_dense_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' layers subclass it) or a GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


# nn.Linear subclasses whose forward is x @ W.T + b all the same (module, class name): transformers'
# FalconLinear (every projection of Falcon) computes input @ weight.T + bias in two steps.
PLAIN_LINEAR_SUBCLASSES = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}


def has_own_forward(module: nn.Module) -> bool:
    """An nn.Linear subclass whose forward is its own (not nn.Linear's, nor one of
    PLAIN_LINEAR_SUBCLASSES): its output need not be x @ W.T + b, so no merged weight reproduces
    base(x) + s B A x, and DoRA (which rescales x @ W.T) does not apply."""
    cls = type(module)
    return (isinstance(module, nn.Linear) and cls.forward is not nn.Linear.forward
            and (cls.__module__, cls.__name__) not in PLAIN_LINEAR_SUBCLASSES)


def runs_own_forward(module: nn.Module) -> bool:
    """A dense linear layer whose output is not just x @ W.T + b from its weight: a subclass with a
    forward of its own (`has_own_forward`), a forward replaced on the instance (accelerate's hooks
    do that) or forward hooks registered on it. LoRA must then call the layer, not read its weight
    (LoRALinear.forward)."""
    return has_own_forward(module) or "forward" in vars(module) or bool(module._forward_hooks) \
        or bool(module._forward_pre_hooks)


def is_embedding(module: nn.Module) -> bool:
    """nn.Embedding or a subclass (transformers' scaled word embeddings): LoRA-able as peft does it."""
    return isinstance(module, nn.Embedding)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D; for an nn.Embedding (num_embeddings,
    embedding_dim): its LoRA factors are A (r, num_embeddings) and B (embedding_dim, r), as peft's."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if is_embedding(module):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def module_references(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) of `model`'s tree that holds it: a module reachable
    under two paths (or two attributes of one parent, which `named_children` reports once) has
    two entries."""
    refs: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                refs.setdefault(id(child), []).append((parent, attr))
    return refs


def replace_module(refs: dict, old: nn.Module, new: nn.Module) -> None:
    """Put `new` in every place of `refs` (from `module_references`) that holds `old`."""
    for parent, attr in refs.get(id(old), ()):
        setattr(parent, attr, new)
