"""Many adapters on one model: add, switch, delete, disable, and mixed-adapter batches. Level 4.

    lowrank.add_adapter(model, "fr", rank=8)          # beside "default"; ranks may differ
    lowrank.set_adapter(model, "fr")                  # no re-patching, no new tensors
    with lowrank.disable_adapters(model): ...         # the base model; the old state returns after
    with lowrank.adapter_ids(model, ["fr", None, "default"]):
        logits = model(input_ids).logits              # row 0 on "fr", row 1 base, row 2 "default"
    lowrank.delete_adapter(model, "fr")

# Note: switching without torch.compile recompiles
A LoRALinear's active adapter is a Python string for eager code, and also a 0-d long buffer,
`_active_index`, that the `active_adapter` setter updates in place. Under torch.compile a layer
with two or more adapters reads only the buffer and runs all its adapters through the one
`lowrank::sgmv` custom op (every token on the active index), so the compiled graph depends on
tensor data, not on a name that dynamo would guard: set_adapter / disable_adapters never
recompile. Adding or deleting an adapter changes the parameters and does recompile, once.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .config import ORIGIN_ATTR, TargetSpec
from .merge import merge, unmerge
from .layer_types import module_references, replace_module
from .patch import (DISABLED, accepts_peft_names, active_adapter, lora_layers, patch_linear,
                    refuse_inside_blocks, saved_modules, set_active_adapter, token_layers)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, in the order adapters were added (the order that integer
    ids in `adapter_ids` refer to)."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        for n in layer.configs:
            names.setdefault(n, None)
    return list(names)


def _check_name(model: nn.Module, name, where: str) -> list[str]:
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"{where}: no adapter {name!r} on the model (adapters: {names})")
    return names


@accepts_peft_names
def add_adapter(model: nn.Module, name: str, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
                targets: TargetSpec = "all-linear", exclude: TargetSpec = None, rslora: bool = False,
                init: str = "kaiming", set_active: bool = False, rank_pattern: dict | None = None,
                alpha_pattern: dict | None = None, modules_to_save: list[str] | str | None = None,
                trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
                adapter_dtype: torch.dtype | None = None, dora: bool = False) -> nn.Module:
    """Add adapter `name` (same arguments as `patch_linear`). As in peft, nothing that runs changes:
    the model's active adapter stays active (the first adapter of a model becomes it), and the new
    one is frozen until `set_adapter` picks it, or set_active=True does so here. Returns model."""
    return patch_linear(model, rank=rank, alpha=alpha, dropout=dropout, targets=targets, exclude=exclude,
                        rslora=rslora, init=init, adapter_name=name, set_active=set_active,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, modules_to_save=modules_to_save,
                        trainable_token_indices=trainable_token_indices, adapter_dtype=adapter_dtype, dora=dora)


def set_adapter(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Make `name` the active adapter of every LoRA layer; layers without it run their base layer
    (as in peft). Nothing is re-patched or allocated. trainable=True (peft's rule): its factors
    require grad and every other adapter's do not. trainable=False leaves every flag as it is:
    switching then never makes torch.compile recompile (dynamo guards on requires_grad)."""
    _check_name(model, name, "set_adapter")
    refuse_inside_blocks(model, "set_adapter", adapter_ids=False)
    _refuse_merged(model, "set_adapter")
    set_active_adapter(model, name, trainable)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer. If it was the model's active adapter, the first
    remaining adapter in sorted order becomes active and trainable everywhere (peft's choice), or
    none."""
    _check_name(model, name, "delete_adapter")
    refuse_inside_blocks(model, "delete_adapter")
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.configs]
    merged = [p for p, layer in layers if getattr(layer, "merged", None) and layer.merged.adapter == name]
    if merged:
        raise ValueError(f"delete_adapter: {name!r} is merged into {merged[0]} (and {len(merged) - 1} more); "
                         f"unmerge first")
    was_active = active_adapter(model) == name
    for _, layer in layers:
        active = layer.active_adapter
        del layer.lora_A[name]
        del layer.lora_B[name]
        if name in layer.lora_magnitude_vector:
            del layer.lora_magnitude_vector[name]
        del layer.configs[name]
        # Positions in `configs` shifted: re-set the active adapter so its index buffer follows.
        layer.active_adapter = None if active == name else active
    refs = module_references(model)
    for _, wrapper in list(saved_modules(model)):
        if name in wrapper.modules_to_save:
            if wrapper.active_adapter == name:
                wrapper.active_adapter = None
            del wrapper.modules_to_save[name]
            if not len(wrapper.modules_to_save):  # no copy left: the original module back in its place
                replace_module(refs, wrapper, wrapper.original_module)
    for _, layer in list(token_layers(model)):
        if name in layer.token_indices:
            layer.detach_adapter(name)
            if not layer.token_indices:
                replace_module(refs, layer, layer.base_layer)
    model.__dict__.get(ORIGIN_ATTR, {}).pop(name, None)
    if was_active:  # peft's choice: the first remaining name in sorted order
        rest = sorted(adapter_names(model))
        set_active_adapter(model, rest[0] if rest else None, trainable=True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside: every LoRA layer runs its base layer only and every modules_to_save wrapper its original
    module (outputs equal the unpatched model). On exit
    (also after an exception) each layer's previous active adapter returns. A merged layer is
    unmerged inside and merged again on exit."""
    saved = [(layer, layer.active_adapter, getattr(layer, "merged", None)) for _, layer in lora_layers(model)]
    saved += [(wrapper, wrapper.active_adapter, None) for _, wrapper in [*saved_modules(model), *token_layers(model)]]
    unmerged, marked = [], []
    try:
        # Inside the try: if a layer refuses to unmerge (its weights changed since the merge), the
        # layers unmerged before it are merged again, and the model is as it was.
        for layer, _, state in saved:
            if state:
                unmerge(layer)
                unmerged.append((layer, state))
        for layer, _, _ in saved:
            layer.active_adapter = None
        for layer, _, _ in saved:  # no adapter is added, chosen, deleted or merged inside (refuse_inside_blocks)
            DISABLED[layer] = DISABLED.get(layer, 0) + 1
            marked.append(layer)
        yield
    finally:
        for layer in marked:
            DISABLED[layer] -= 1
        for layer, name, _ in saved:
            layer.active_adapter = name
        # The same adapter and record kind: after an exact merge the weight comes back bit for bit;
        # after merge(exact=False) unmerge only rounds back, so the re-merged weight may differ by
        # an ulp here and there (as any inexact unmerge / merge cycle does).
        for layer, state in unmerged:
            merge(layer, adapter_name=state.adapter, exact=state.exact)


def _refuse_merged(model: nn.Module, where: str) -> None:
    merged = [p for p, layer in lora_layers(model) if getattr(layer, "merged", None)]
    if merged:
        raise ValueError(f"{where}: {len(merged)} layer(s) are merged (e.g. {merged[0]}); lowrank.unmerge(model) first")


def _ids_tensor(model: nn.Module, ids, names: list[str]) -> torch.Tensor:
    """(rows,) int64 model-level adapter indices (-1: base model) from names / None / ints / a tensor."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"adapter_ids: a tensor of ids must be 1-D int32/int64, got {tuple(ids.shape)} {ids.dtype}")
        if ids.device.type == "cpu" and ids.numel() and (ids.min() < -1 or ids.max() >= len(names)):
            raise ValueError(f"adapter_ids: ids must be in [-1, {len(names)}) for adapters {names}, got "
                             f"{ids.tolist()}")
        # A CUDA tensor is not checked (that would sync); ids outside [-1, n) run the base model.
        return ids.long()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"adapter_ids: give a sequence with one adapter name (or None) per row, or an int "
                        f"tensor; got {type(ids).__name__}")
    out, bad = [], []
    for v in ids:
        if v is None:
            out.append(-1)
        elif isinstance(v, str):
            if v not in names:
                bad.append(v)
            out.append(names.index(v) if v in names else -1)
        elif isinstance(v, int) and not isinstance(v, bool) and -1 <= v < len(names):
            out.append(v)
        else:
            bad.append(v)
    if bad:
        raise ValueError(f"adapter_ids: unknown adapter(s) {bad!r}; the model has {names} (or None / -1 for the "
                         f"base model)")
    return torch.tensor(out, dtype=torch.long)


_ENTRY = threading.Lock()  # entering adapter_ids: the check and the claim of a model's layers


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids) -> Iterator[None]:
    """Run a mixed-adapter batch: row b of every LoRA layer's input uses adapter ids[b].

    ids: one entry per row (sequence) of the batch: an adapter name, None (base model), an int
    index into `adapter_names(model)` (-1: base), or a 1-D int tensor of such indices (kept on its
    device; no host sync; an int64 tensor on the model's device is used as is, so it may be
    updated in place between CUDA-graph replays). A layer that lacks a row's adapter runs its base
    layer for that row.
    Each layer checks that its input has len(ids) rows. Gradients flow into the adapters used.
    The block belongs to the thread that entered it: a forward of the same model in another thread
    runs its active adapter as usual, and a second block on the model (any thread) is refused, as
    is adding, loading, deleting, merging or unpatching adapters inside it.
    """
    names = adapter_names(model)
    if not names:
        raise ValueError("adapter_ids: the model has no LoRA adapter")
    _refuse_merged(model, "adapter_ids")  # a merged weight holds one adapter for every row
    gids = _ids_tensor(model, ids, names)
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [wrapper for _, wrapper in [*saved_modules(model), *token_layers(model)]]
    luts: dict[tuple, torch.Tensor] = {}
    per_layer = []
    for layer in layers:
        device = layer._active_index.device
        key = (tuple(layer.configs), str(device))
        if key not in luts:
            # model-level index + 1 -> this layer's index in its own configs (or -1).
            own = list(layer.configs)
            table = [-1] + [own.index(n) if n in own else -1 for n in names]
            g = gids.to(device)
            if table == list(range(-1, len(names))):
                # The layer has every adapter, in model order: use the caller's tensor itself,
                # so that ids updated in place reach the layers (CUDA-graph replays).
                luts[key] = g
            else:
                lut = torch.tensor(table, dtype=torch.long, device=device)
                luts[key] = lut[torch.where((g >= -1) & (g < len(names)), g + 1, 0)]
        per_layer.append(luts[key])
    me = threading.get_ident()
    with _ENTRY:  # check and claim the layers as one step: two threads cannot both enter
        busy = [layer._adapter_ids_thread for layer in [*layers, *wrappers] if layer._adapter_ids is not None]
        if busy:
            where = "this thread" if busy[0] == me else f"thread {busy[0]}"
            raise RuntimeError(f"adapter_ids: the model is already inside an adapter_ids block (entered in "
                               f"{where}); one mixed batch at a time per model")
        for layer, ids_l in zip(layers, per_layer):
            layer._adapter_ids_thread = me
            layer._adapter_ids = ids_l
        for wrapper in wrappers:  # model-level ids: each wrapper picks its copies by name
            wrapper._adapter_ids_thread = me
            wrapper._adapter_names = names
            wrapper._adapter_ids = gids
    try:
        yield
    finally:
        for layer in [*layers, *wrappers]:
            layer._adapter_ids = None
            layer._adapter_ids_thread = None
