"""`lowrank.summary(model)`: what peft's `print_trainable_parameters()` prints, and per adapter and
per target what a LoRA model holds. Level 4.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from .merge import MergeState
from .patch import active_adapter, lora_layers, saved_modules, token_layers, trainable_parameters
from .qlora import quantized_layers


@dataclass
class AdapterSummary:
    """One adapter over the layers that have it. ranks / alphas: the distinct values (one each
    unless layers differ); params / bytes: its factors' elements and bytes."""
    name: str
    ranks: list[int]
    alphas: list[float]
    scalings: list[float]
    dropout: float
    rslora: bool
    layers: int
    params: int
    bytes: int
    active: bool
    trainable: bool
    merged_layers: int
    saved_modules: list[str] = field(default_factory=list)  # paths of its modules_to_save copies
    saved_params: int = 0  # their parameters (also counted in params and bytes)
    tokens: int = 0  # embedding rows trained by trainable_token_indices (their values counted in params)


@dataclass
class TargetSummary:
    """The layers of one kind (the last name of their path: q_proj, c_attn, ...)."""
    name: str
    layers: int
    base_params: int  # weight elements (NF4 ones counted as elements, as peft does)
    base_bytes: int   # as stored: NF4 packed codes and scales, or the dense weight
    nf4: bool
    lora_params: int  # every adapter's factors


@dataclass
class ModelSummary:
    trainable: int
    total: int
    trainable_bytes: int
    frozen_bytes: int  # every other parameter, as stored (NF4 weights at their 4-bit size)
    adapters: list[AdapterSummary] = field(default_factory=list)
    targets: list[TargetSummary] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def peft_line(self) -> str:
        """peft's print_trainable_parameters() line, to the digit."""
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.trainable_percent:.4f}")

    def render(self, console: Console) -> None:
        console.print(self.peft_line())
        console.print(f"trainable {_size(self.trainable_bytes)}, frozen {_size(self.frozen_bytes)}")
        if self.adapters:
            t = Table(title="adapters", title_justify="left")
            saved = any(a.saved_modules for a in self.adapters)
            tokens = any(a.tokens for a in self.adapters)
            cols = ("adapter", "rank", "alpha", "scaling", "dropout", "layers", *(("saved",) if saved else ()),
                    *(("tokens",) if tokens else ()), "params", "bytes", "state")
            for col in cols:
                t.add_column(col, justify="left" if col in ("adapter", "state") else "right")
            for a in self.adapters:
                state = ", ".join(s for s, on in (("active", a.active), ("trainable", a.trainable),
                                                  (f"merged in {a.merged_layers}", a.merged_layers)) if on)
                extra = (f"{len(a.saved_modules)} ({a.saved_params:,d})",) if saved else ()
                extra += (str(a.tokens),) if tokens else ()
                t.add_row(a.name, _values(a.ranks), _values(a.alphas), _values(a.scalings, ".4g"),
                          f"{a.dropout:g}", str(a.layers), *extra, f"{a.params:,d}", _size(a.bytes),
                          state or "frozen")
            console.print(t)
        if self.targets:
            t = Table(title="targets", title_justify="left")
            for col in ("target", "layers", "base params", "base bytes", "LoRA params"):
                t.add_column(col, justify="left" if col == "target" else "right")
            for g in self.targets:
                t.add_row(g.name + (" (NF4)" if g.nf4 else ""), str(g.layers), f"{g.base_params:,d}",
                          _size(g.base_bytes), f"{g.lora_params:,d}")
            console.print(t)

    def __str__(self) -> str:
        buf = io.StringIO()
        self.render(Console(file=buf, width=110, no_color=True, highlight=False))
        return buf.getvalue().rstrip("\n")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def _values(vals, fmt: str = "g") -> str:
    return ", ".join(format(v, fmt) for v in vals)


def summary(model: nn.Module, print_summary: bool = True) -> ModelSummary:
    """Trainable and total parameters (peft's `print_trainable_parameters()` line: shared parameters
    once, NF4 weights as their element count), bytes, and a table per adapter (rank, alpha,
    scaling, layers, modules_to_save copies, parameters (factors and copies), bytes, active /
    trainable / merged) and per target kind (layers,
    base parameters and stored bytes, NF4 or not, LoRA parameters). Printed unless
    print_summary=False; returned as a `ModelSummary` either way (str() renders it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"summary expects a torch.nn.Module, got {type(model).__name__}")
    trainable, total = trainable_parameters(model)
    seen, trainable_bytes, frozen_bytes = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable_bytes += p.numel() * p.element_size()
        else:
            frozen_bytes += p.numel() * p.element_size()
    frozen_bytes += sum(layer.nf4.nbytes for _, layer in quantized_layers(model))
    layers = list(lora_layers(model))
    active = active_adapter(model)
    adapters: dict[str, AdapterSummary] = {}
    targets: dict[str, TargetSummary] = {}
    for path, layer in layers:
        base = layer.base_layer
        nf4 = getattr(base, "nf4", None)
        leaf = path.rsplit(".", 1)[-1] if path else type(layer).__name__
        g = targets.setdefault(leaf, TargetSummary(leaf, 0, 0, 0, nf4 is not None, 0))
        g.layers += 1
        if nf4 is not None:
            g.base_params += nf4.numel
            g.base_bytes += nf4.nbytes
        else:
            g.base_params += base.weight.numel()
            g.base_bytes += base.weight.numel() * base.weight.element_size()
        merged = layer.merged
        for name, cfg in layer.configs.items():
            a, b = layer.lora_A[name], layer.lora_B[name]
            mag = layer.lora_magnitude_vector[name] if name in layer.lora_magnitude_vector else a.new_empty(0)
            params = a.numel() + b.numel() + mag.numel()
            g.lora_params += params
            s = adapters.setdefault(name, AdapterSummary(name, [], [], [], cfg.dropout, cfg.rslora, 0, 0, 0,
                                                         name == active, False, 0))
            s.layers += 1
            s.params += params
            s.bytes += sum(t.numel() * t.element_size() for t in (a, b, mag))
            s.trainable |= a.requires_grad or b.requires_grad
            for values, v in ((s.ranks, cfg.rank), (s.alphas, cfg.alpha), (s.scalings, cfg.scaling)):
                if v not in values:
                    values.append(v)
            if isinstance(merged, MergeState) and merged.adapter == name:
                s.merged_layers += 1
    for path, layer in token_layers(model):
        for name, rows in layer.trainable_tokens_delta.items():
            s = adapters.get(name)
            if s is None or layer.tied_to is not None:
                continue
            s.tokens += len(layer.token_indices[name])
            s.params += rows.numel()
            s.bytes += rows.numel() * rows.element_size()
            s.trainable |= rows.requires_grad
    for path, wrapper in saved_modules(model):
        for name, copy in wrapper.modules_to_save.items():
            s = adapters.get(name)
            if s is None:
                continue
            params = list(copy.parameters())
            s.saved_modules.append(path)
            s.saved_params += sum(p.numel() for p in params)
            s.params += sum(p.numel() for p in params)
            s.bytes += sum(p.numel() * p.element_size() for p in params)
            s.trainable |= any(p.requires_grad for p in params)
    out = ModelSummary(trainable, total, trainable_bytes, frozen_bytes, list(adapters.values()),
                       sorted(targets.values(), key=lambda t: t.name))
    if print_summary:
        console = Console(highlight=False)
        console.width = max(console.width, 110)  # the tables' width: wrap no cell on an 80-column pipe
        out.render(console)
    return out
