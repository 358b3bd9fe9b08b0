"""Target discovery and module swapping: patch_linear, unpatch, trainable_parameters.

Level 4: imports levels 0-4.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Iterator

import torch
import torch.nn as nn

from .config import (PEFT_NAMES, LoRAConfig, TargetSpec, check_pattern, lora_kwargs, pattern_value, peft_config_dict,
                     peft_lora_kwargs)
from .layer_types import module_references, replace_module
from .lora_linear import LoRALinear, is_linear
from .qlora import check_quantize_args, quantize_targets, quantized_layers

# Attribute on the patched root module: what patching changed, so unpatch can undo it exactly.
_STATE_ATTR = "_lowrank_state"


def iter_linear(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """Yield (path, module, parent, attribute) for every linear layer, under every path that holds
    it (a module held twice is yielded twice: `named_children` would report it once); a LoRALinear
    counts as one layer (its base_layer is not visited again)."""
    for attr, child in model._modules.items():
        if child is None:
            continue
        path = f"{prefix}.{attr}" if prefix else attr
        if isinstance(child, LoRALinear) or is_linear(child):
            yield path, child, model, attr
        else:
            yield from iter_linear(child, path)


def _matches(spec: TargetSpec, path: str, module: nn.Module) -> bool:
    if callable(spec) and not isinstance(spec, str):
        base = module.base_layer if isinstance(module, LoRALinear) else module
        return bool(spec(path, base))
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == s or path.endswith("." + s) for s in spec)


def _output_heads(model: nn.Module) -> set[int]:
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            heads.add(id(head))
            if isinstance(head, LoRALinear):
                heads.add(id(head.base_layer))
    return heads


def select_targets(model: nn.Module, targets: TargetSpec, exclude: TargetSpec = None):
    """The (path, module, parent, attr) of the linear layers `targets` selects and `exclude` does not.

    targets: "all-linear" (every linear layer but the output head: the module returned by
    `get_output_embeddings()`, or any layer named `lm_head`); a list of names matched against the
    end of the module path ("q_proj", "self_attn.q_proj"); a regex string matched against the full
    path (re.fullmatch); or a callable (path, module) -> bool. exclude takes the same forms.
    Raises ValueError, listing the model's linear layers, when nothing is selected.
    """
    found = list(iter_linear(model))
    if targets == "all-linear":
        heads = _output_heads(model)
        chosen = [f for f in found if id(f[1]) not in heads and f[0].rsplit(".", 1)[-1] != "lm_head"]
    else:
        chosen = [f for f in found if _matches(targets, f[0], f[1])]
    if exclude is not None:
        chosen = [f for f in chosen if not _matches(exclude, f[0], f[1])]
    if not chosen:
        raise ValueError(f"targets={_describe(targets)} (exclude={_describe(exclude)}) matched no linear layer; "
                         f"{_list_linear(found)}")
    return chosen


def _describe(spec) -> str:
    if callable(spec) and not isinstance(spec, str):
        return getattr(spec, "__name__", repr(spec))
    return repr(spec)


def _list_linear(found) -> str:
    if not found:
        return "the model has no nn.Linear or Conv1D layer"
    names = sorted({path.rsplit(".", 1)[-1] for path, *_ in found})
    examples = ", ".join(path for path, *_ in found[:3])
    return (f"the model's linear layers are named {names} ({len(found)} layers, e.g. {examples})")


_CONFIG_ARGS = ("rank", "alpha", "dropout", "targets", "exclude", "rslora", "init", "dora")


def _layer_config(config: LoRAConfig, path: str, alpha, rank_pattern, alpha_pattern) -> LoRAConfig:
    """The adapter's settings at `path`: rank and alpha from the patterns where a key matches."""
    rank = pattern_value(rank_pattern, path)
    layer_alpha = pattern_value(alpha_pattern, path)
    if rank is None and layer_alpha is None:
        return config
    rank = config.rank if rank is None else int(rank)
    if layer_alpha is None:
        layer_alpha = 2 * rank if alpha is None else config.alpha
    return dataclasses.replace(config, rank=rank, alpha=float(layer_alpha))


def accepts_peft_names(fn):
    """fn also takes peft's names for its LoRA arguments (`PEFT_NAMES`: r, lora_alpha, lora_dropout,
    target_modules, exclude_modules, use_rslora, use_dora) and `config=`: a peft LoraConfig or a dict of its
    fields (peft is not imported), or a lowrank LoRAConfig, read into those arguments. An argument
    given twice (rank and r; alpha as an argument and in config) is a TypeError naming both."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, config=None, **kwargs):
        where = fn.__name__
        aliases = {k: kwargs.pop(k) for k in list(kwargs) if k in PEFT_NAMES}
        explicit = set(sig.bind_partial(*args, **kwargs).arguments)  # TypeError for unknown names
        for alias, value in aliases.items():
            name = PEFT_NAMES[alias]
            if name in explicit:
                raise TypeError(f"{where}: got both {name}= and {alias}= (peft's name for it); pass one")
            kwargs[name] = value
            explicit.add(name)
        if config is not None:
            if isinstance(config, LoRAConfig):
                from_config = {k: v for k, v in lora_kwargs(config).items() if k in _CONFIG_ARGS or
                               (k == "adapter_name" and "adapter_name" in sig.parameters)}
                source = "the LoRAConfig"
            else:
                from_config = peft_lora_kwargs(peft_config_dict(config), f"{where}(config=...)", for_new_weights=True)
                source = "config"
            both = sorted((explicit & set(from_config)) - ({"adapter_name"} if source == "the LoRAConfig" else set()))
            if both:
                raise TypeError(f"{where}: {', '.join(both)} given both as argument(s) and in {source}; pass each once")
            for k, v in from_config.items():
                if k not in explicit:
                    kwargs[k] = v
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(),
                                                    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY,
                                                                      default=None)])
    return wrapper


@accepts_peft_names
def patch_linear(model: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
                 targets: TargetSpec = "all-linear", exclude: TargetSpec = None, rslora: bool = False,
                 init: str = "kaiming", adapter_name: str = "default", quantize: str | None = None,
                 compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                 double_quant: bool = True, set_active: bool = False, rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None, dora: bool = False) -> nn.Module:
    """Add a LoRA adapter to the selected linear layers of `model`, in place; returns `model`.

    Matching nn.Linear / Conv1D layers are replaced by LoRALinear wrappers (the base weights are
    not copied); layers that are already LoRALinear get the new adapter added. Every parameter
    that is not a LoRA parameter is frozen. All arguments are checked, and every new module is
    built, before the model is touched: on error the model is unchanged.

    Adapter state as in peft: the model has one active adapter. The first adapter of a model
    becomes active and trainable; a later one (another adapter_name) changes nothing that runs:
    it is added inactive and frozen, and layers that get their first adapter from it run their
    base layer, unless set_active=True makes it the active, trainable adapter everywhere (as
    `lowrank.set_adapter` does).

    QLoRA: quantize="nf4" replaces each selected dense layer by a `lowrank.NF4Linear`
    (bitsandbytes' NF4 format, `blocksize`, `double_quant`; matmuls in `compute_dtype`, default
    bfloat16), one layer at a time, releasing each dense weight as it goes (`unpatch` then gives
    back the NF4Linear layers, not the dense ones). Selected bitsandbytes Linear4bit (nf4) layers
    are adopted as they are, quantize or not, with their own compute dtype unless `compute_dtype`
    is given. Everything that could make quantizing fail (NaN/Inf, block maxima whose double
    quantization would overflow) is checked on every layer before the first swap; an error after
    it (out of memory) says which layers were converted.

    rank_pattern / alpha_pattern (peft's): per-layer rank and alpha, {regex or module name: value};
    a layer takes the value of the first key that matches the end of its path at a name boundary
    (peft's rule, `lowrank.config.pattern_value`), else rank / alpha. With alpha=None a layer's
    alpha is 2 * its own rank (scaling 2 everywhere), unless alpha_pattern names it.

    dora=True (peft's use_dora): a DoRA adapter, each layer's output rows scaled by
    m / ||W + s B A|| with a trainable magnitude m initialised to W's row norms (`lowrank.ops.dora`;
    on NF4 bases the norms come from the 4-bit storage, a block of rows at a time).

    peft's habits: its argument names work too (r, lora_alpha, lora_dropout, target_modules,
    exclude_modules, use_rslora, use_dora), and config= takes a peft LoraConfig (or its dict, or a lowrank
    LoRAConfig) in place of the LoRA arguments; see `accepts_peft_names`. A config field that asks
    for what lowrank does not do (modules_to_save, PiSSA init, ...) is a ValueError naming it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_linear expects a torch.nn.Module, got {type(model).__name__}")
    refuse_inside_adapter_ids(model, "patch_linear")
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                        targets=targets, exclude=exclude, adapter_name=adapter_name, dora=dora)
    chosen = select_targets(model, targets, exclude)
    rank_pattern, alpha_pattern = check_pattern(rank_pattern, "rank_pattern"), check_pattern(alpha_pattern,
                                                                                              "alpha_pattern")
    layer_configs = {path: _layer_config(config, path, alpha, rank_pattern, alpha_pattern) for path, *_ in chosen}
    clash = [path for path, module, *_ in chosen
             if isinstance(module, LoRALinear) and adapter_name in module.configs]
    if clash:
        raise ValueError(f"adapter {adapter_name!r} already exists on {len(clash)} layer(s) (e.g. {clash[0]}); "
                         f"use another adapter_name or lowrank.unpatch(model) first")

    check_quantize_args(quantize, compute_dtype, blocksize, double_quant)
    chosen = quantize_targets(model, chosen, quantize, compute_dtype, blocksize, double_quant)

    # Build everything first; only then mutate the model. One wrapper per module, put in every
    # place the model holds it (a module under two paths must not get two sets of adapters).
    wrappers: dict[int, tuple[nn.Module, LoRALinear, bool, LoRAConfig]] = {}
    for path, module, parent, attr in chosen:
        if id(module) not in wrappers:
            new = not isinstance(module, LoRALinear)
            wrappers[id(module)] = (module, LoRALinear(module) if new else module, new, layer_configs[path])
    refs = module_references(model)
    state = getattr(model, _STATE_ATTR, None)
    fresh_state = state is None
    if fresh_state:
        state = {"requires_grad": [(p, p.requires_grad) for p in model.parameters()]}
    activate = set_active or not any(layer.configs for _, layer in lora_layers(model))
    # Every new factor is allocated (what can run out of memory) before any layer gets one.
    factors = [wrapper.new_factors(cfg) for _, wrapper, _, cfg in wrappers.values()]
    for (_, wrapper, _, cfg), tensors in zip(wrappers.values(), factors):
        wrapper.attach_adapter(cfg, *tensors, activate=activate)
    for module, wrapper, new, _ in wrappers.values():
        if new:
            replace_module(refs, module, wrapper)
    lora_params = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
                   for n in m.configs for p in m.adapter_parameters(n)}
    for p in model.parameters():
        if id(p) not in lora_params:
            p.requires_grad_(False)
    if activate:  # the model-wide active adapter: this one, trainable; every other one frozen
        set_active_adapter(model, adapter_name, trainable=True)
    else:
        for _, wrapper, _, _ in wrappers.values():
            for p in wrapper.adapter_parameters(adapter_name):
                p.requires_grad_(False)
    if fresh_state:
        object.__setattr__(model, _STATE_ATTR, state)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(path, layer) for every LoRALinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def set_active_adapter(model: nn.Module, name: str | None, trainable: bool) -> None:
    """`name` active on every LoRA layer that has it (the others run their base layer); with
    trainable=True its factors require grad and every other adapter's do not (peft's rule)."""
    for _, layer in lora_layers(model):
        layer.active_adapter = name if name in layer.configs else None
        if trainable:
            for n in layer.configs:
                for p in layer.adapter_parameters(n):
                    p.requires_grad_(n == name)


def active_adapter(model: nn.Module) -> str | None:
    """The model's active adapter (None: no layer has one active)."""
    return next((layer.active_adapter for _, layer in lora_layers(model) if layer.active_adapter is not None), None)


def refuse_inside_adapter_ids(model: nn.Module, where: str) -> None:
    """ValueError while `model` is inside a `lowrank.adapter_ids` block: adding, loading, deleting,
    merging or unpatching adapters there would send the batch's rows to other adapters than its
    ids say."""
    busy = [p or type(m).__name__ for p, m in lora_layers(model) if m._adapter_ids is not None]
    if busy:
        raise ValueError(f"{where}: the model is inside an adapter_ids block ({len(busy)} layers, e.g. {busy[0]}); "
                         f"changing its adapters or weights there would reroute the batch's rows: leave the "
                         f"block first")


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every LoRA adapter: put the original modules back and restore requires_grad flags."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, LoRALinear):
        raise TypeError("unpatch the model that contains the LoRALinear, not the layer itself")
    refuse_inside_adapter_ids(model, "unpatch")
    layers = list(lora_layers(model))
    for path, module in layers:
        if getattr(module, "merged", False):
            raise ValueError(f"layer {path} is merged; lowrank.unmerge(model) before unpatching")
    refs = module_references(model)
    for _, module in layers:
        replace_module(refs, module, module.base_layer)  # under every path that holds it
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is not None:
        for p, flag in state["requires_grad"]:
            p.requires_grad_(flag)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (each shared parameter counted once; the elements of
    NF4-quantized weights count in total)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for _, layer in quantized_layers(model):
        total += layer.nf4.numel  # NF4 weights are not Parameters: count their elements here
    return trainable, total
