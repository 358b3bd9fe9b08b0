"""Hugging Face files and training: `lowrank.save_pretrained(model, path, merged=False|True)` and
`lowrank.hf.trainer_class()` / `lowrank.hf.Trainer(...)` (transformers' Trainer for patched models,
see the Note below). Level 4.

merged=False writes the adapter in peft's format (`save_adapter`). merged=True writes the whole
model with the adapter merged, through transformers' own `save_pretrained` (config, safetensors
shards), under the original module names (no `base_layer` / `lora_A` keys), so that
`AutoModel*.from_pretrained(path)` loads it with no missing or unexpected key; the model itself is
left as it was (merged exactly, written, unmerged bit for bit). The files are written into a
staging directory beside `path` and renamed into it once complete.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile

import torch
import torch.nn as nn

from .adapter_files import CONFIG_NAME, load_adapter, save_adapter
from .adapters import adapter_names
from .layer_types import dry_run_values
from .merge import dense_weight, merge, unmerge
from .nf4_linear import NF4Linear
from .patch import active_adapter, lora_layers, saved_modules, set_active_adapter, token_layers

_ADAPTER_KEYS = ("lora_A.", "lora_B.", "lora_magnitude_vector.")


def merged_state_dict(model: nn.Module, adapter_name: str | None = None, weights: dict | None = None) -> dict:
    """The state dict of a merged model under the original module names: each LoRA layer's
    `base_layer.*` entries as the layer's own, its factors dropped; each modules_to_save wrapper's
    copy for `adapter_name` (default: the active adapter) as the module's own entries, or its
    original's where it has no such copy; each TrainableTokens layer's weight with that adapter's
    rows in place. weights: {LoRA layer path: merged weight} written as `<path>.weight` in place of
    whatever its base layer holds (an NF4 base's codes and statistics), with the base's bias."""
    weights = weights or {}
    name = adapter_name or active_adapter(model)
    tokens = {p: layer for p, layer in token_layers(model) if p}
    paths = sorted((p for p, _ in lora_layers(model) if p), key=len, reverse=True)
    paths += sorted(tokens, key=len, reverse=True)
    wrapped = {p: (f"modules_to_save.{name}." if name in w.modules_to_save else "original_module.")
               for p, w in saved_modules(model) if p}
    paths += sorted(wrapped, key=len, reverse=True)
    out, rows_in = {}, {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in paths if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) + 1:]
        if prefix in tokens:  # trainable tokens: the weight with the adapter's rows in place
            layer = tokens[prefix]
            owner = layer.tied_to if layer.tied_to is not None else layer
            if rest == "base_layer.weight" and name in owner.token_indices:
                # one tensor for the embedding and every layer tied to it: transformers then writes it once
                if id(owner) not in rows_in:
                    rows_in[id(owner)] = owner.weight_for(name).detach()
                value = rows_in[id(owner)]
            if rest.startswith("base_layer."):
                out[f"{prefix}.{rest[len('base_layer.'):]}"] = value
        elif prefix in wrapped:
            if rest.startswith(wrapped[prefix]):
                out[f"{prefix}.{rest[len(wrapped[prefix]):]}"] = value
        elif prefix in weights:
            if rest == "base_layer.bias":
                out[f"{prefix}.bias"] = value.to(weights[prefix].dtype)
            elif not rest.startswith(("base_layer.", *_ADAPTER_KEYS)):
                out[key] = value
        elif rest.startswith("base_layer."):
            out[f"{prefix}.{rest[len('base_layer.'):]}"] = value
        elif not rest.startswith(_ADAPTER_KEYS):
            out[key] = value
    for prefix, w in weights.items():
        out[f"{prefix}.weight"] = w
    return out


def save_pretrained(model: nn.Module, path: str | os.PathLike, merged: bool = False, adapter_name: str | None = None,
                    **kwargs) -> None:
    """merged=False: `save_adapter(model, path, adapter_name)` (default: the active adapter).
    merged=True: the model with that adapter merged, written by the model's own `save_pretrained`
    (a transformers model; `kwargs` go to it, e.g. max_shard_size), loadable by
    `AutoModel*.from_pretrained(path)` as a plain model; the model is unchanged afterwards. Dense
    layers are merged in place exactly and unmerged bit for bit after writing; NF4 layers quantized
    by lowrank are decoded and merged out of place with one rounding (dense weights in the dtype
    that was quantized; with any NF4 layer every LoRA layer is merged out of place, so the merged
    weights of the targets are held together while transformers writes). A model quantized by
    transformers (bitsandbytes) is refused: `lowrank merge BASE ADAPTER OUT` merges its checkpoint."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pretrained expects a torch.nn.Module, got {type(model).__name__}")
    name = adapter_name or active_adapter(model) or "default"
    if not merged:
        if kwargs:
            raise TypeError(f"save_pretrained(merged=False) writes an adapter file and takes no {sorted(kwargs)}")
        save_adapter(model, path, adapter_name=name)
        return
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"save_pretrained(merged=True) needs a transformers model (with save_pretrained), got "
                        f"{type(model).__name__}; merge_and_unload(model) and save its state_dict instead")
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("save_pretrained(merged=True): the model was quantized by transformers (bitsandbytes), "
                         "whose save writes quantized weights; save the adapter (merged=False) and run `lowrank merge "
                         "BASE_DIR ADAPTER_DIR OUT`, which merges the 4-bit checkpoint layer by layer")
    layers = list(lora_layers(model))
    out_of_place = any(isinstance(layer.base_layer, NF4Linear) for _, layer in layers)
    weights = {}
    if out_of_place:
        if not any(name in layer.configs for _, layer in layers):
            raise ValueError(f"save_pretrained(merged=True): no adapter {name!r} on the model")
        weights = {p: dense_weight(layer, name) for p, layer in layers}  # (a layer without it: its base)
        # an NF4 base stores (out, in); the architecture written for a GPT-2 Conv1D wants (in, out)
        weights = {p: (w.t().contiguous() if getattr(layer.base_layer, "from_conv1d", False) else w)
                   for (p, layer), w in zip(layers, weights.values())}
    else:
        try:
            merge(model, name, exact=True)
        except NotImplementedError as exc:
            raise ValueError(f"save_pretrained(merged=True): {exc}; merge_and_unload(model) on a copy gives dense "
                             f"merged layers to save") from None
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".lowrank-save-", dir=parent)
    try:
        try:
            model.save_pretrained(stage, state_dict=merged_state_dict(model, name, weights), **kwargs)
        finally:
            if not out_of_place:
                unmerge(model)
        # Every file written complete beside the target first; then each renamed into place, so a
        # failure while transformers writes leaves `path` as it was.
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(path, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -- transformers' Trainer ------------------------------------------------------------------------
# Note: why a Trainer subclass
# transformers' Trainer saves a model that is not a peft PeftModel whole (model.save_pretrained: the
# patched state dict, base weights and all) and, for a model quantized by transformers, refuses to
# train unless it believes adapters are attached (`_hf_peft_config_loaded`, read once in its
# __init__). The subclass saves checkpoints as peft does (each adapter in peft's format: "default"
# in the checkpoint folder, any other in a subfolder named after it), reads them back on resume and
# for load_best_model_at_end, and tells the quantization check what is true: the model has
# trainable adapters. Everything else (optimizer, scheduler, RNG state, data position) is the
# Trainer's own checkpointing.
_TRAINER_CLASSES: dict[type, type] = {}


def trainer_class(base: type | None = None) -> type:
    """A subclass of `base` (default `transformers.Trainer`; TRL's `SFTTrainer` and other Trainer
    subclasses work the same) for models patched by lowrank: checkpoints hold the adapters (and
    their modules_to_save copies) in peft's format instead of the full model, `resume_from_checkpoint`
    and `load_best_model_at_end` load them back into the patched model, and a model loaded in 4-bit
    by transformers trains. transformers is imported here (an optional dependency)."""
    if base is None:
        from transformers import Trainer as base  # optional: only Trainer users need transformers
    if not isinstance(base, type) or not any(c.__name__ == "Trainer" for c in base.__mro__):
        raise TypeError(f"trainer_class: base must be transformers.Trainer or a subclass of it, got {base!r}")
    if base not in _TRAINER_CLASSES:
        _TRAINER_CLASSES[base] = type(f"Lowrank{base.__name__}", (_TrainerMixin, base), {
            "__doc__": f"{base.__name__} for lowrank-patched models (see lowrank.hf.trainer_class)."})
    return _TRAINER_CLASSES[base]


def Trainer(*args, **kwargs):  # noqa: N802 (reads as the class it builds)
    """`lowrank.hf.trainer_class()(*args, **kwargs)`: a transformers Trainer for a patched model."""
    return trainer_class()(*args, **kwargs)


def save_adapters(model: nn.Module, path: str | os.PathLike, replace_directory: bool = True) -> list[str]:
    """Every adapter of `model` in peft's layout for several adapters: "default" in `path`, each
    other one in `path/<name>`; returns the names written. replace_directory: as save_adapter's."""
    names = adapter_names(model)
    for name in names:
        save_adapter(model, path if name == "default" else os.path.join(path, name), adapter_name=name,
                     replace_directory=replace_directory)
    return names


_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")  # transformers' Trainer's checkpoint folders


def load_adapters(model: nn.Module, path: str | os.PathLike, allow_pickle: bool = False) -> list[str]:
    """The adapters `save_adapters` wrote, loaded into `model` (replacing the weights of adapters it
    has, adding the others); the model's active adapter stays. Returns the names loaded. A Trainer's
    `checkpoint-N` subfolders (beside the adapter `save_model` writes into its output_dir) are not
    adapters and are skipped. All of them are loaded into a meta-device twin of the model first
    (checks that read values read the model's own tensors), so a ValueError from any one (or when
    `path` holds none) leaves the model unchanged. `allow_pickle`: as `load_adapter`'s (adapter_model.bin
    files, peft's safe_serialization=False)."""
    path = os.fspath(path)
    found = []
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        found.append(("default", path))
    if os.path.isdir(path):
        for sub in sorted(os.listdir(path)):
            if os.path.isfile(os.path.join(path, sub, CONFIG_NAME)) and not _CHECKPOINT_DIR.fullmatch(sub):
                found.append((sub, os.path.join(path, sub)))
    if not found:
        raise ValueError(f"{path!r} holds no adapter ({CONFIG_NAME} in it or in a subfolder)")
    try:
        twin, sources = _meta_twin(model)
    except Exception:  # a model deepcopy cannot handle (DTensor shards, foreign hooks): no dry run, as before
        twin = None

    def load_all(target):
        active = active_adapter(target)
        for name, where in found:
            load_adapter(target, where, adapter_name=name, allow_pickle=allow_pickle)
        if active is not None:
            set_active_adapter(target, active, trainable=True)

    if twin is not None:  # every check on the twin (values read from the model's tensors), then for real
        with dry_run_values(sources):
            load_all(twin)
    load_all(model)
    return [name for name, _ in found]


def _meta_twin(model: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of `model` whose parameters, buffers and NF4 storage are meta tensors (shapes and
    dtypes, no memory; shared tensors stay shared): what load_adapters tries every adapter on; and
    {id(twin tensor): the model's tensor} for `dry_run_values`."""
    memo, sources = {}, {}
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if isinstance(m, NF4Linear):
            tensors += [t for t in vars(m.nf4).values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        if id(t) not in memo:
            twin = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
            sources[id(memo[id(t)])] = t
    return copy.deepcopy(model, memo), sources


class _TrainerMixin:
    def __init__(self, model=None, *args, **kwargs):
        if model is not None and not any(True for _ in lora_layers(model)):
            raise ValueError(f"{type(self).__name__}: the model has no LoRA layer; patch it with "
                             f"lowrank.patch_linear first (or use transformers.Trainer)")
        # transformers refuses a 4-bit model it does not see adapters on: they are there (lowrank's).
        flagged = model is not None and getattr(model, "is_quantized", False) and \
            not getattr(model, "_hf_peft_config_loaded", False)
        if flagged:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if flagged:
                model._hf_peft_config_loaded = False

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # in place: the other processes write their rng_state_<rank>.pth into this folder meanwhile
        save_adapters(model, output_dir, replace_directory=False)
        # the tokenizer as transformers' Trainer saves it: the processing class, else the collator's
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapters(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapters(self.model, self.state.best_model_checkpoint)
