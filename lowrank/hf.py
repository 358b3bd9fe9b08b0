"""Hugging Face files: `lowrank.save_pretrained(model, path, merged=False|True)`. Level 4.

merged=False writes the adapter in peft's format (`save_adapter`). merged=True writes the whole
model with the adapter merged, through transformers' own `save_pretrained` (config, safetensors
shards), under the original module names (no `base_layer` / `lora_A` keys), so that
`AutoModel*.from_pretrained(path)` loads it with no missing or unexpected key; the model itself is
left as it was (merged exactly, written, unmerged bit for bit). The files are written into a
staging directory beside `path` and renamed into it once complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch.nn as nn

from .adapter_files import save_adapter
from .merge import merge, unmerge
from .patch import active_adapter, lora_layers

_ADAPTER_KEYS = ("lora_A.", "lora_B.", "lora_magnitude_vector.")


def merged_state_dict(model: nn.Module) -> dict:
    """The state dict of a merged model under the original module names: each LoRA layer's
    `base_layer.*` entries as the layer's own, its factors dropped."""
    paths = sorted((p for p, _ in lora_layers(model) if p), key=len, reverse=True)
    out = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in paths if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) + 1:]
        if rest.startswith("base_layer."):
            out[f"{prefix}.{rest[len('base_layer.'):]}"] = value
        elif not rest.startswith(_ADAPTER_KEYS):
            out[key] = value
    return out


def save_pretrained(model: nn.Module, path: str | os.PathLike, merged: bool = False, adapter_name: str | None = None,
                    **kwargs) -> None:
    """merged=False: `save_adapter(model, path, adapter_name)` (default: the active adapter).
    merged=True: the model with that adapter merged, written by the model's own `save_pretrained`
    (a transformers model; `kwargs` go to it, e.g. max_shard_size), loadable by
    `AutoModel*.from_pretrained(path)` as a plain model; the model is unchanged afterwards. NF4
    bases cannot be merged in place: ValueError (use `merge_and_unload(model)` on a copy)."""
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
            model.save_pretrained(stage, state_dict=merged_state_dict(model), **kwargs)
        finally:
            unmerge(model)
        # Every file written complete beside the target first; then each renamed into place, so a
        # failure while transformers writes leaves `path` as it was.
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(path, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
