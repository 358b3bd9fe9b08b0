"""ModulesToSave: whole modules trained beside their frozen originals (peft's `modules_to_save`),
one copy per adapter, switched with the active adapter. Level 3: imports levels 0-3.

A classifier head (`classifier`, `score`) is new for a fine-tuning task: LoRA alone would train
against its random initialisation. As in peft, the module at such a path is replaced by a wrapper
that holds the untouched original as `original_module` and one trainable copy per adapter in
`modules_to_save[<adapter>]`, so a state dict reads `<path>.original_module.weight` and
`<path>.modules_to_save.<adapter>.weight` (peft's in-memory layout; adapter files hold the copy
under `<path>.weight`, see `lowrank.adapter_files`). The wrapper runs the active adapter's copy, or
the original when the adapter has none or no adapter is active; attributes it does not have itself
(`weight`, `out_features`, ...) are read from the module that runs, so code written for the
original module keeps working.

Mixed batches (`lowrank.adapter_ids`): each row runs its adapter's copy (or the original), the
module's first argument split along its first dimension (one row per sequence, as for the LoRA
layers), each group run once, the outputs put back in row order; differentiable.

A copy is a deep copy: parameters the original shares with other modules (a tied `lm_head` and
input embedding) are not shared by the copy, which is what training the head alone means. Under
torch.compile, switching the active adapter of a model with copies recompiles (which copy runs is a
Python attribute), unlike the LoRA layers' switch.
"""
from __future__ import annotations

import copy
import threading

import torch
import torch.nn as nn

from .layer_types import is_bnb_linear4bit, real_values
from .nf4_linear import NF4Linear

_OWN = ("original_module", "modules_to_save")


def check_copyable(path: str, module: nn.Module) -> None:
    """TypeError when `module` cannot be trained as a whole copy: it holds quantized weights (an NF4
    or bitsandbytes 4-bit layer: a copy would be frozen integers) or no floating-point parameter."""
    quantized = [n or "(itself)" for n, m in module.named_modules() if isinstance(m, NF4Linear) or is_bnb_linear4bit(m)]
    if quantized:
        raise TypeError(f"modules_to_save: {path!r} ({type(module).__name__}) holds 4-bit quantized weights "
                        f"({quantized[0]}); a whole trainable copy needs floating-point weights (leave it out of "
                        f"quantization, or train it with LoRA instead)")
    params = list(module.parameters())
    if not params:
        raise TypeError(f"modules_to_save: {path!r} ({type(module).__name__}) has no parameters to train")
    bad = [n for n, p in module.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        raise TypeError(f"modules_to_save: {path!r} has non-floating-point parameter(s) {bad[:3]}; they cannot be "
                        f"trained")
    meta = [n for n, p in module.named_parameters() if real_values(p).device.type == "meta"]
    if meta:
        raise TypeError(f"modules_to_save: {path!r} has parameters on the meta device ({meta[0]}): there is nothing "
                        f"to copy")


class ModulesToSave(nn.Module):
    """`original_module` frozen, and `modules_to_save[name]` a trainable copy for adapter `name`."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        if isinstance(original_module, ModulesToSave):
            raise TypeError("ModulesToSave cannot wrap another ModulesToSave")
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.__dict__["_active_name"] = None
        # Mixed batches (lowrank.adapter_ids): per-row model-level adapter ids, the model's adapter
        # names they index, and the thread that entered the block.
        self._adapter_ids: torch.Tensor | None = None
        self._adapter_names: list[str] = []
        self._adapter_ids_thread: int | None = None

    def new_copy(self) -> nn.Module:
        """A deep copy of the original, detached from every other module (not yet attached)."""
        return copy.deepcopy(self.original_module)

    def attach_copy(self, name: str, module: nn.Module) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.modules_to_save[name] = module

    @property
    def active_adapter(self) -> str | None:
        """The adapter whose copy runs (None: the original runs)."""
        return self.__dict__["_active_name"]

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.modules_to_save:
            raise ValueError(f"no copy for adapter {name!r} (copies: {list(self.modules_to_save)})")
        self.__dict__["_active_name"] = name

    def active_module(self) -> nn.Module:
        name = self.active_adapter
        return self.original_module if name is None else self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        if self._adapter_ids is not None and (torch.compiler.is_compiling()
                                              or self._adapter_ids_thread == threading.get_ident()):
            return self._mixed_forward(*args, **kwargs)
        return self.active_module()(*args, **kwargs)

    def _mixed_forward(self, x, *args, **kwargs):
        """Row b of `x` through the copy of adapter ids[b] (the original where it has none)."""
        ids = self._adapter_ids
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != ids.shape[0]:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries but the input of a modules_to_save "
                             f"{type(self.original_module).__name__} has shape {shape}: give one adapter per row")
        ids = ids.to(x.device)
        groups, order = [], []
        handled = torch.zeros(ids.shape, dtype=torch.bool, device=x.device)
        for i, name in enumerate(self._adapter_names):
            if name not in self.modules_to_save:
                continue
            rows = (ids == i).nonzero().squeeze(1)
            if rows.numel():
                groups.append((self.modules_to_save[name], rows))
                handled[rows] = True
        rest = (~handled).nonzero().squeeze(1)
        if rest.numel():
            groups.append((self.original_module, rest))
        outs = []
        for module, rows in groups:
            outs.append(module(x.index_select(0, rows), *args, **kwargs))
            order.append(rows)
        if not all(isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == len(r) for o, r in zip(outs, order)):
            raise ValueError(f"a mixed batch through modules_to_save {type(self.original_module).__name__} needs an "
                             f"output tensor with one row per input row")
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        inverse = torch.empty_like(ids, dtype=torch.long)
        inverse[torch.cat(order)] = torch.arange(ids.shape[0], device=x.device)
        return out.index_select(0, inverse)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWN or name.startswith("_"):
                raise
        modules = self.__dict__["_modules"]
        active = self.__dict__.get("_active_name")
        target = modules["original_module"] if active is None else modules["modules_to_save"][active]
        return getattr(target, name)

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active_adapter!r}"
