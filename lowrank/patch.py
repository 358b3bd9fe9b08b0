"""Target discovery and module swapping: patch_linear, unpatch, trainable_parameters.

Level 4: imports levels 0-4.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import warnings
import weakref
from typing import Iterator

import torch
import torch.nn as nn

from .config import (PEFT_NAMES, TASK_HEADS, LoRAConfig, TargetSpec, check_layers, check_pattern, in_layers,
                     layer_index, lora_kwargs, pattern_value, peft_config_dict, peft_lora_kwargs, task_type_name)
from .dtypes import check_dtype
from .layer_types import is_dense_linear, is_embedding, module_references, replace_module, runs_own_forward
from .lora_linear import LoRALinear, is_adaptable
from .modules_to_save import ModulesToSave, check_copyable
from .nf4_linear import NF4Linear
from .trainable_tokens import TrainableTokens, check_token_indices
from .qlora import check_quantize_args, quantize_targets, quantized_layers

# Attribute on the patched root module: what patching changed, so unpatch can undo it exactly.
_STATE_ATTR = "_lowrank_state"


def iter_linear(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """Yield (path, module, parent, attribute) for every layer LoRA can adapt (linear layers, and
    nn.Embedding: `lora_linear.is_adaptable`), under every path that holds it (a module held twice
    is yielded twice: `named_children` would report it once); a LoRALinear
    counts as one layer (its base_layer is not visited again); the inside of a ModulesToSave wrapper
    (its original and copies: trained whole, not by LoRA) is not visited, nor the inside of an
    nn.MultiheadAttention (its out_proj is an nn.Linear that the attention never calls: it reads
    the weight itself, so a LoRA layer there would change nothing and train nothing)."""
    if isinstance(model, nn.MultiheadAttention):
        return
    for attr, child in model._modules.items():
        if child is None or isinstance(child, (ModulesToSave, TrainableTokens)):
            continue
        path = f"{prefix}.{attr}" if prefix else attr
        if isinstance(child, LoRALinear) or is_adaptable(child):
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


def _warn_unadapted_weights(model: nn.Module) -> None:
    """A warning naming the weights "all-linear" cannot give LoRA and peft may: 2-D weights of modules
    that are not linear layers or embeddings (a MoE router: transformers 5's MixtralTopKRouter),
    3-D parameters (fused experts, (experts, out, in)) and nn.MultiheadAttention modules (`iter_linear`).
    They stay frozen."""
    left = []
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # (its out_proj is an nn.Linear: not adapted either)
            left.append(f"{path or type(module).__name__} (nn.MultiheadAttention)")
            continue
        if isinstance(module, (LoRALinear, ModulesToSave, TrainableTokens)) or is_adaptable(module):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 3 or (p.dim() == 2 and name == "weight"):
                left.append(f"{path}.{name}" if path else name)
    if left:
        warnings.warn(f"patch_linear: targets='all-linear' adapts nn.Linear / Conv1D layers; {len(left)} other "
                      f"weight(s) stay frozen without LoRA, e.g. {', '.join(left[:3])} (MoE routers, fused "
                      f"expert weights, nn.MultiheadAttention: peft 0.21 adapts these, lowrank does not yet)", UserWarning, stacklevel=4)


def _refuse_peft_layers(model: nn.Module) -> None:
    """ValueError for a model that holds peft's tuner layers (a PeftModel, or get_peft_model's
    layers): "all-linear" would put LoRA on peft's own lora_A / lora_B and freeze peft's adapter."""
    for path, module in model.named_modules():
        if type(module).__module__.startswith("peft."):
            raise ValueError(f"patch_linear: {path or 'the model'} is peft's {type(module).__name__}: this model "
                             f"already carries peft adapters. Patch the base model and load the adapter with "
                             f"lowrank.load_adapter(model, DIR), or take peft's merge_and_unload() / unload() first")


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
    `get_output_embeddings()`, or any layer named `lm_head`; nn.Embedding layers only when named, as
    in peft, e.g. ["embed_tokens", "q_proj"]); a list of names matched against the
    end of the module path ("q_proj", "self_attn.q_proj"); a regex string matched against the full
    path (re.fullmatch); or a callable (path, module) -> bool. exclude takes the same forms.
    Raises ValueError, listing the model's linear layers, when nothing is selected.
    """
    found = list(iter_linear(model))
    if targets == "all-linear":
        heads = _output_heads(model)
        chosen = [f for f in found if id(f[1]) not in heads and f[0].rsplit(".", 1)[-1] != "lm_head"
                  and not _is_embedding_layer(f[1])]
    else:
        chosen = [f for f in found if _matches(targets, f[0], f[1])]
    if exclude is not None:
        chosen = [f for f in chosen if not _matches(exclude, f[0], f[1])]
    if not chosen:
        raise ValueError(f"targets={_describe(targets)} (exclude={_describe(exclude)}) matched no linear layer; "
                         f"{_list_linear(found)}")
    if targets != "all-linear" and not callable(targets):
        _refuse_unadaptable(model, targets, exclude, {f[0] for f in found})
    return chosen


def _refuse_unadaptable(model: nn.Module, targets, exclude, adaptable: set[str]) -> None:
    """ValueError when a target name or pattern selects a module with a weight matrix of its own that
    LoRA cannot adapt (an nn.Conv2d, the out_proj of an nn.MultiheadAttention) beside the layers it
    can: that module was left out without a word (peft adapts a Conv2d, or refuses the module).
    Modules inside an adaptable layer (its parametrizations) and 1-D weights (norms) are passed over."""
    parents = {}
    for path, module in module_paths(model):
        if isinstance(module, nn.MultiheadAttention):
            parents.update({f"{path}.{attr}": path for attr in module._modules})
        parts = path.split(".")  # inside an adaptable layer (a parametrization of its weight)?
        inside = any(".".join(parts[:i]) in adaptable for i in range(1, len(parts)))
        # a weight of 2 or more dimensions: a norm's (1-D) is not one peft users target by mistake
        if path in adaptable or inside or not any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            continue
        if _matches(targets, path, module) and not (exclude is not None and _matches(exclude, path, module)):
            why = (f"the out_proj of the nn.MultiheadAttention {parents[path]!r}, which reads its weight itself"
                   if path in parents else f"a {type(module).__name__}, not an nn.Linear, Conv1D or nn.Embedding")
            raise ValueError(f"targets={_describe(targets)} selects {path!r}, {why}: lowrank cannot give it LoRA; "
                             f"leave it out of targets (or exclude it)")


def _is_embedding_layer(module: nn.Module) -> bool:
    return is_embedding(module.base_layer if isinstance(module, LoRALinear) else module)


def _describe(spec) -> str:
    if callable(spec) and not isinstance(spec, str):
        return getattr(spec, "__name__", repr(spec))
    return repr(spec)


def _list_linear(found) -> str:
    """What a user can target: the linear layers by name, then the embeddings apart (adapted only when
    named: "all-linear" leaves them out, as it leaves out the output head)."""
    linear = [f for f in found if not _is_embedding_layer(f[1])]
    embeddings = sorted({path.rsplit(".", 1)[-1] for path, module, *_ in found if _is_embedding_layer(module)})
    if linear:
        names = sorted({path.rsplit(".", 1)[-1] for path, *_ in linear})
        examples = ", ".join(path for path, *_ in linear[:3])
        out = f"the model's linear layers are named {names} ({len(linear)} layers, e.g. {examples})"
    else:
        out = "the model has no nn.Linear or Conv1D layer"
    if embeddings:
        out += f"; its embeddings, adapted only when named, {embeddings}"
    return out


def check_module_names(names, what: str = "modules_to_save") -> list[str] | None:
    """A list of non-empty module names from a name, a list of names or None (None or empty: None)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    if isinstance(names, (set, frozenset)):
        names = sorted(names)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{what} must be a module name or a list of module names, got {names!r}")
    return list(names) or None


def module_paths(model: nn.Module, prefix: str = ""):
    """(path, module) for every module of `model` under every path that holds it, parents first,
    not entering a LoRALinear or a ModulesToSave wrapper (their insides are lowrank's)."""
    for attr, child in model._modules.items():
        if child is None:
            continue
        path = f"{prefix}.{attr}" if prefix else attr
        yield path, child
        if not isinstance(child, (LoRALinear, ModulesToSave, TrainableTokens)):
            yield from module_paths(child, path)


def select_modules_to_save(model: nn.Module, names: list[str], strict: bool = True) -> list[tuple[str, nn.Module]]:
    """(path, module) of the modules that `names` selects for modules_to_save, by peft's rule: a
    module whose path ends with one of the names, as a plain string suffix (so "classifier" also
    selects DistilBERT's "pre_classifier", as peft does: a file then means the same in both).
    ValueError when a name selects nothing (strict; peft's files list "classifier" and "score" for
    any classifier, so reading them is not strict), when selected modules nest, or when one is (or
    holds) a LoRA layer; TypeError when one cannot be copied for training (`check_copyable`)."""
    found = [(p, m) for p, m in module_paths(model) if any(p.endswith(n) for n in names)]
    missing = [n for n in names if not any(p.endswith(n) for p, _ in found)]
    if missing and strict:
        raise ValueError(f"modules_to_save={names!r}: {missing} match no module of the model (a name matches the end "
                         f"of a module path, e.g. 'classifier' or 'score')")
    paths = [p for p, _ in found]
    for p, m in found:
        inner = [q for q in paths if q.startswith(p + ".")]
        if inner:
            raise ValueError(f"modules_to_save={names!r} selects both {p!r} and {inner[0]!r}, inside it; name one")
        lora = [q or "(itself)" for q, sub in m.named_modules() if isinstance(sub, LoRALinear)]
        if lora:
            raise ValueError(f"modules_to_save: {p!r} is (or holds) a LoRA layer ({lora[0]}); a module is either "
                             f"trained whole or by LoRA, not both")
        if not isinstance(m, ModulesToSave):
            check_copyable(p, m)
    return found


def base_module_paths(model: nn.Module, prefix: str = "") -> Iterator[str]:
    """Every module path of `model` as it was before patching (a ModulesToSave's original under the
    wrapper's path), not entering LoRA layers: the paths peft's rules are applied to."""
    for attr, child in model._modules.items():
        if child is None:
            continue
        path = f"{prefix}.{attr}" if prefix else attr
        yield path
        if isinstance(child, ModulesToSave):
            yield from base_module_paths(child.original_module, path)
        elif isinstance(child, TrainableTokens):
            yield from base_module_paths(child.base_layer, path)
        elif not isinstance(child, LoRALinear):
            yield from base_module_paths(child, path)


def token_layers(model: nn.Module) -> Iterator[tuple[str, TrainableTokens]]:
    """(path, layer) for every TrainableTokens in `model` (tied heads included)."""
    for name, module in model.named_modules():
        if isinstance(module, TrainableTokens):
            yield name, module


def input_embedding_path(model: nn.Module) -> str:
    """The path of `model.get_input_embeddings()`; ValueError when the model does not say."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    path = next((p for p, m in module_paths(model) if emb is not None and m is emb), None)
    if path is None:
        raise ValueError(f"trainable_token_indices as a list needs the model's input embedding "
                         f"(get_input_embeddings()), which {type(model).__name__} does not give; pass a dict "
                         f"{{module name: token ids}}")
    return path


def select_token_layers(model: nn.Module, spec) -> list[tuple[str, nn.Module, list[int]]]:
    """(path, module, ids) for peft's trainable_token_indices: a list of ids for the input
    embedding, or {module name: ids} with each name matched by peft's rule (a path ending with it).
    TypeError / ValueError naming the module for anything that cannot be trained that way."""
    if isinstance(spec, dict):
        targets = spec
    elif isinstance(spec, (list, tuple)):
        targets = {input_embedding_path(model): list(spec)}
    else:
        raise TypeError(f"trainable_token_indices must be a list of token ids or a dict {{module name: ids}}, got "
                        f"{type(spec).__name__}")
    out = []
    for name, ids in targets.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"trainable_token_indices: module names must be non-empty strings, got {name!r}")
        found = [(p, m) for p, m in module_paths(model) if p.endswith(name)]
        if not found:
            raise ValueError(f"trainable_token_indices: {name!r} matches no module of the model")
        for p, m in found:
            if isinstance(m, (LoRALinear, ModulesToSave)):
                raise ValueError(f"trainable_token_indices: {p!r} is already adapted "
                                 f"({'LoRA' if isinstance(m, LoRALinear) else 'modules_to_save'}); a layer is "
                                 f"trained one way at a time")
            base = m.base_layer if isinstance(m, TrainableTokens) else m
            if isinstance(m, TrainableTokens) and m.tied_to is not None:
                raise ValueError(f"trainable_token_indices: {p!r} is tied to {type(m.tied_to.base_layer).__name__} "
                                 f"whose trainable tokens it follows; name the embedding instead")
            out.append((p, m, check_token_indices(p, base, ids)))
    return out


def _tied_heads(model: nn.Module, embedding: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules other than `embedding` whose weight is the embedding's weight (a tied output head)."""
    w = embedding.weight
    return [(p, m) for p, m in module_paths(model)
            if m is not embedding and not isinstance(m, TrainableTokens) and getattr(m, "weight", None) is w]


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """(path, wrapper) for every ModulesToSave in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


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
                fields = peft_config_dict(config)
                from_config = peft_lora_kwargs(fields, f"{where}(config=...)", for_new_weights=True)
                heads = TASK_HEADS.get(task_type_name(fields), ())
                if heads:  # peft's task heads, trained whole: those the model has (peft is lenient on the others)
                    model = args[0] if args else kwargs.get("model")
                    paths = [p for p, _ in module_paths(model)] if isinstance(model, nn.Module) else []
                    names = [n for n in dict.fromkeys([*(from_config.get("modules_to_save") or []), *heads])
                             if n not in heads or any(p.endswith(n) for p in paths)]
                    from_config["modules_to_save"] = names or None
                # a field left empty in the config (None) leaves the argument free for the caller
                from_config = {k: v for k, v in from_config.items() if v is not None}
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
                 alpha_pattern: dict | None = None, modules_to_save: list[str] | str | None = None,
                 trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
                 adapter_dtype: torch.dtype | None = None, dora: bool = False,
                 layers: int | list[int] | None = None, layers_pattern: str | list[str] | None = None) -> nn.Module:
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

    modules_to_save (peft's): names of modules trained whole for this adapter (a classifier head:
    "classifier", "score"), selected by peft's rule (`select_modules_to_save`). Each is wrapped in a
    `lowrank.ModulesToSave` holding the frozen original and a trainable copy per adapter, switched
    with the active adapter, saved and loaded with it (peft's layout). As in peft, the linear layers
    inside them get no LoRA whatever the targets select. Patching a
    *ForSequenceClassification / *ForTokenClassification model without its head in modules_to_save
    warns: the head would stay frozen at its random initialisation.

    trainable_token_indices (peft's): token rows of an embedding trained for this adapter while the
    rest stays frozen (new or retrained tokens): a list of ids for the input embedding, or
    {module name: ids}; see `lowrank.TrainableTokens`. A head tied to that embedding follows it.

    adapter_dtype: the dtype of the new factors (default: float32 over a bfloat16 / float16 / NF4
    base, as peft's default autocast_adapter_dtype=True; else the base weight's). float32 adapters
    over a 16-bit model are the usual mixed precision: the optimizer updates fp32 factors (a bf16
    factor loses most small updates to rounding), the forward casts them to the base's dtype for
    the fused op (differentiably).

    dora=True (peft's use_dora): a DoRA adapter, each layer's output rows scaled by
    m / ||W + s B A|| with a trainable magnitude m initialised to W's row norms (`lowrank.ops.dora`;
    on NF4 bases the norms come from the 4-bit storage, a block of rows at a time).

    layers (peft's layers_to_transform): only the targets in these transformer blocks, by the index
    in their path (an int or a list; `lowrank.config.layer_index`, peft's rule: the first number
    segment, after a segment matching layers_pattern when given: "layers" for Llama, "h" for
    GPT-2). As in peft it narrows a list of names or "all-linear" (a target named by its whole path
    stays); with a regex or callable `targets` it is a ValueError (put the index in the regex).

    peft's habits: its argument names work too (r, lora_alpha, lora_dropout, target_modules,
    exclude_modules, use_rslora, use_dora, layers_to_transform), and config= takes a peft LoraConfig
    (or its dict, or a lowrank LoRAConfig) in place of the LoRA arguments; see `accepts_peft_names`.
    A config field that asks for what lowrank does not do (PiSSA init, bias="all", ...) is a
    ValueError naming it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_linear expects a torch.nn.Module, got {type(model).__name__}")
    refuse_inside_blocks(model, "patch_linear")
    _refuse_peft_layers(model)
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                        targets=targets, exclude=exclude, adapter_name=adapter_name, dora=dora)
    mts_names = check_module_names(modules_to_save)
    saved = select_modules_to_save(model, mts_names) if mts_names else []
    check_layers(layers, layers_pattern, "patch_linear")
    chosen = _in_layers(_outside_saved(select_targets(model, targets, exclude), saved, targets), targets, layers,
                        layers_pattern)
    if mts_names is None:
        _warn_frozen_head(model)
    if isinstance(targets, str) and targets == "all-linear":
        _warn_unadapted_weights(model)
    tokens = select_token_layers(model, trainable_token_indices) if trainable_token_indices is not None else []
    token_paths = {p for p, _, _ in tokens}
    clash = [c[0] for c in chosen if c[0] in token_paths] + [p for p, _ in saved if p in token_paths]
    if clash:
        raise ValueError(f"{clash[0]!r} is chosen both for trainable_token_indices and for LoRA or modules_to_save; "
                         f"a layer is trained one way at a time")
    tied = {p: _tied_heads(model, m.base_layer if isinstance(m, TrainableTokens) else m) for p, m, _ in tokens}
    lora_paths = {c[0] for c in chosen}
    bad_tie = [(p, q) for p, heads in tied.items() for q, head in heads if q in lora_paths or isinstance(head, LoRALinear)]
    if bad_tie:
        raise ValueError(f"trainable tokens of {bad_tie[0][0]!r}: its tied head {bad_tie[0][1]!r} is a LoRA layer; "
                         f"the two could not follow one another")
    rank_pattern, alpha_pattern = check_pattern(rank_pattern, "rank_pattern"), check_pattern(alpha_pattern,
                                                                                              "alpha_pattern")
    layer_configs = {path: _layer_config(config, path, alpha, rank_pattern, alpha_pattern) for path, *_ in chosen}
    # anywhere in the model, not only on the layers chosen now: the same name on other targets would
    # grow a trained adapter with fresh factors (at another rank) under its name
    clash = [path for path, module in lora_layers(model) if adapter_name in module.configs]
    clash += [path for path, module in saved_modules(model) if adapter_name in module.modules_to_save]
    clash += [path for path, module in token_layers(model) if adapter_name in module.token_indices]
    if clash:
        raise ValueError(f"adapter {adapter_name!r} already exists on {len(clash)} layer(s) (e.g. {clash[0]}); "
                         f"use another adapter_name or lowrank.unpatch(model) first")

    for path, module, *_ in chosen:
        if dora and not isinstance(module, LoRALinear) and is_dense_linear(module) and runs_own_forward(module):
            raise ValueError(f"{path}: DoRA over a {type(module).__name__} with a forward of its own or forward "
                             f"hooks: DoRA rescales x @ W.T, which such a layer need not compute; use LoRA there "
                             f"(or leave it out of targets)")
        w = getattr(module, "weight", None)  # a weight swapped for one of another shape: stale features
        if isinstance(module, nn.Linear) and isinstance(w, torch.Tensor) and w.dtype.is_floating_point \
                and tuple(w.shape) != (module.out_features, module.in_features):  # (bitsandbytes' are packed)
            raise ValueError(f"{path}: nn.Linear(in_features={module.in_features}, out_features={module.out_features}) "
                             f"holds a weight of shape {tuple(w.shape)}; set in_features / out_features to match "
                             f"(out, in) before patching")
    check_quantize_args(quantize, compute_dtype, blocksize, double_quant)
    if adapter_dtype is not None:
        check_dtype(adapter_dtype, "patch_linear", "adapter_dtype")
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
    factors = [wrapper.new_factors(cfg, adapter_dtype) for _, wrapper, _, cfg in wrappers.values()]
    copies = _new_copies(saved)
    rows = [(p, module, ids, (module if isinstance(module, TrainableTokens) else TrainableTokens(module)))
            for p, module, ids in tokens]
    rows = [(p, module, ids, layer, layer.new_rows(ids)) for p, module, ids, layer in rows]
    for (_, wrapper, _, cfg), tensors in zip(wrappers.values(), factors):
        wrapper.attach_adapter(cfg, *tensors, activate=activate)
    for module, wrapper, new, _ in wrappers.values():
        if new:
            replace_module(refs, module, wrapper)
    for module, wrapper, copy in copies:
        copy.requires_grad_(False)
        wrapper.attach_copy(adapter_name, copy)
        if wrapper is not module:
            replace_module(refs, module, wrapper)
    for p, module, ids, layer, new in rows:
        layer.attach(adapter_name, ids, new)
        param = layer.trainable_tokens_delta[adapter_name]
        param.requires_grad_(False)
        for _, head in tied[p]:  # a head tied to the embedding: the same rows, the same parameter
            follower = head if isinstance(head, TrainableTokens) else TrainableTokens(head, tied_to=layer)
            follower.attach(adapter_name, ids, param)
            if follower is not head:
                replace_module(refs, head, follower)
        if layer is not module:
            replace_module(refs, module, layer)
    kept = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
            for n in m.configs for p in m.adapter_parameters(n)}
    kept |= {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.modules_to_save.parameters()}
    kept |= {id(p) for m in model.modules() if isinstance(m, TrainableTokens) for p in m.trainable_tokens_delta.values()}
    for p in model.parameters():
        if id(p) not in kept:
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


def _in_layers(chosen: list, targets: TargetSpec, layers, layers_pattern) -> list:
    """The targets in the blocks `layers` names (peft's layers_to_transform, see patch_linear); all of
    them for None or an empty list (peft's reading)."""
    if layers is None or (isinstance(layers, (list, tuple)) and not layers):
        if layers is None and layers_pattern is not None:
            raise ValueError("patch_linear: layers_pattern without layers (peft's layers_to_transform) selects "
                             "nothing by itself; give the layer indices too")
        return chosen
    if isinstance(targets, str) and targets != "all-linear" or callable(targets):
        raise ValueError(f"patch_linear: layers={layers!r} narrows a list of target names or 'all-linear' (as "
                         f"peft's layers_to_transform does; peft ignores it for a regex); with targets="
                         f"{_describe(targets)} put the layer index in the expression instead")
    kept = [c for c in chosen if in_layers(c[0], targets, layers, layers_pattern)]
    if not kept:
        found = sorted({i for c in chosen if (i := layer_index(c[0], layers_pattern)) is not None})
        raise ValueError(f"patch_linear: layers={layers!r} (layers_pattern={layers_pattern!r}) leaves none of the "
                         f"{len(chosen)} targeted layer(s); their layer indices: "
                         f"{found if found else 'none found (name the block list with layers_pattern)'}; "
                         f"e.g. {chosen[0][0]!r}")
    return kept


def _outside_saved(chosen: list, saved: list, targets: TargetSpec) -> list:
    """The LoRA targets without those inside (or equal to) modules_to_save modules: as peft does, a
    module trained whole gets no LoRA, whatever the targets say."""
    if not saved:
        return chosen
    rest = [c for c in chosen if not any(c[0] == p or c[0].startswith(p + ".") for p, _ in saved)]
    if not rest:
        raise ValueError(f"every linear layer the targets select is inside modules_to_save "
                         f"({sorted(p for p, _ in saved)}): nothing is left for LoRA")
    return rest


_CLASSIFIER_HEADS = ("classifier", "score")


def _warn_frozen_head(model: nn.Module) -> None:
    """Warn when a sequence / token classification model is patched with its new head frozen."""
    if not type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return
    heads = [n for n in _CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)
             and not isinstance(getattr(model, n), ModulesToSave)]
    if heads:
        warnings.warn(f"patch_linear: {type(model).__name__}.{heads[0]} (its task head, usually freshly initialised) "
                      f"is frozen; pass modules_to_save={heads!r} to train it with the adapter (peft adds it for "
                      f"SEQ_CLS / TOKEN_CLS)", stacklevel=4)


def _new_copies(saved: list) -> list[tuple[nn.Module, ModulesToSave, nn.Module]]:
    """(module, its wrapper (new, or itself when it is one), a new copy) for each module to save,
    one per module however many paths hold it; nothing is attached yet."""
    out, seen = [], set()
    for _, module in saved:
        if id(module) in seen:
            continue
        seen.add(id(module))
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        out.append((module, wrapper, wrapper.new_copy()))
    return out


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
    for _, wrapper in saved_modules(model):
        wrapper.active_adapter = name if name in wrapper.modules_to_save else None
        if trainable:
            for n, copy in wrapper.modules_to_save.items():
                copy.requires_grad_(n == name)
    for _, layer in token_layers(model):
        layer.active_adapter = name if name in layer.token_indices else None
        if trainable:
            for n, rows in layer.trainable_tokens_delta.items():
                rows.requires_grad_(n == name)


def active_adapter(model: nn.Module) -> str | None:
    """The model's active adapter (None: no layer has one active)."""
    return next((layer.active_adapter for _, layer in lora_layers(model) if layer.active_adapter is not None), None)


# The layers inside lowrank.disable_adapters blocks: how many deep. Kept beside the layers, not in
# them, so that a copy made inside a block (copy.deepcopy) is not marked for good.
DISABLED: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def refuse_inside_blocks(model: nn.Module, where: str, adapter_ids: bool = True) -> None:
    """ValueError while `model` is inside a `lowrank.adapter_ids` block (adding, loading, deleting,
    merging or unpatching adapters there would send the batch's rows to other adapters than its
    ids say) or a `lowrank.disable_adapters` block (its exit puts back each layer's adapter and
    merge as they were at its entry: one deleted, added, chosen or merged inside would be undone
    halfway, e.g. set_adapter's requires_grad flags kept for an adapter no longer active).
    adapter_ids=False: the disable_adapters block only (set_adapter: a mixed batch names its
    adapters itself, and choosing the active one inside it was always allowed)."""
    layers = [*lora_layers(model), *saved_modules(model), *token_layers(model)]
    busy = [p or type(m).__name__ for p, m in layers if adapter_ids and m._adapter_ids is not None]
    if busy:
        raise ValueError(f"{where}: the model is inside an adapter_ids block ({len(busy)} layers, e.g. {busy[0]}); "
                         f"changing its adapters or weights there would reroute the batch's rows: leave the "
                         f"block first")
    off = [p or type(m).__name__ for p, m in layers if DISABLED.get(m)]
    if off:
        raise ValueError(f"{where}: the model is inside a disable_adapters block ({len(off)} layers, e.g. {off[0]}), "
                         f"whose exit restores the adapters as they were at its entry: leave the block first")


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every LoRA adapter: put the original modules back and restore requires_grad flags."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, LoRALinear):
        raise TypeError("unpatch the model that contains the LoRALinear, not the layer itself")
    refuse_inside_blocks(model, "unpatch")
    layers = list(lora_layers(model))
    for path, module in layers:
        if getattr(module, "merged", False):
            raise ValueError(f"layer {path} is merged; lowrank.unmerge(model) before unpatching")
    restore_modules(model, layers, keep_copy=None)
    return model


def original_bases(layers: list) -> list:
    """(LoRA layer, the module to put back for it) for each (path, layer) of `layers`: its base
    layer, or for an NF4Linear adopted from a bitsandbytes Linear4bit a Linear4bit rebuilt from the
    same codes (NF4Linear.to_bnb). Built for every layer before any is replaced, so that a failure
    (out of memory) leaves the model as it was."""
    return [(module, original_base(module.base_layer)) for _, module in layers]


def restore_modules(model: nn.Module, layers: list, keep_copy: str | None, bases: list | None = None) -> None:
    """Put the original modules back in place of every LoRA layer in `layers` (`bases`: what
    original_bases(layers) gave, when the caller built it before changing anything), of every
    ModulesToSave wrapper (or, with keep_copy, that adapter's copy where the wrapper has one: its
    parameters get the original's requires_grad flags) and of every TrainableTokens layer (with
    keep_copy, that adapter's rows written into the embedding's weight first), and restore the
    flags patching changed."""
    refs = module_references(model)
    if bases is None:
        bases = original_bases(layers)
    for module, base in bases:
        replace_module(refs, module, base)  # under every path that holds it
    copies = []
    for _, wrapper in list(saved_modules(model)):
        chosen = wrapper.modules_to_save[keep_copy] if keep_copy in wrapper.modules_to_save else None
        replace_module(refs, wrapper, chosen if chosen is not None else wrapper.original_module)
        if chosen is not None:
            copies.append((wrapper.original_module, chosen))
    for _, layer in list(token_layers(model)):
        if keep_copy in layer.token_indices and layer.tied_to is None:  # the rows written into the weight
            with torch.no_grad():
                layer.base_layer.weight.copy_(layer.weight_for(keep_copy))
        replace_module(refs, layer, layer.base_layer)
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is not None:
        for p, flag in state["requires_grad"]:
            p.requires_grad_(flag)
    for original, chosen in copies:
        for (_, p), (_, q) in zip(original.named_parameters(), chosen.named_parameters()):
            q.requires_grad_(p.requires_grad)


def original_base(base: nn.Module) -> nn.Module:
    """The module to put back for a LoRA layer's base: a bitsandbytes Linear4bit for an NF4Linear
    adopted from one (NF4Linear.to_bnb), else the base itself."""
    return base.to_bnb() if isinstance(base, NF4Linear) and base.__dict__.get("bnb_class") else base


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
