"""LoRALinear: a drop-in wrapper around nn.Linear or transformers' Conv1D with LoRA adapters."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import ops
from . import sgmv as _sgmv
from .config import LoRAConfig


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (weight stored (in, out)), detected without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    from .qlora import NF4Linear

    return isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * dropout(x) @ A.T @ B.T for the active adapter.

    The wrapped layer is kept as `base_layer` (its weight is not copied; `lowrank.unpatch` puts the
    very same module back). Adapters live in `lora_A[name]` (rank, in_features) and
    `lora_B[name]` (out_features, rank), in the base weight's dtype and device, so a GPT-2 Conv1D
    adapter has the same shapes as an nn.Linear one (peft's `fan_in_fan_out`).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.configs: dict[str, LoRAConfig] = {}
        # Multi-adapter state (lowrank.adapters): the active adapter's position in `configs` as a
        # device tensor (-1: none), kept in step with `active_adapter` by its setter, and the
        # per-row adapter ids of a mixed batch (None outside `lowrank.adapter_ids`).
        self.register_buffer("_active_index", torch.tensor(-1, dtype=torch.long), persistent=False)
        self._adapter_ids: torch.Tensor | None = None
        self.active_adapter: str | None = None
        # lowrank.merge state: None, or a lowrank.merge.MergeState (which adapter is merged into
        # base_layer.weight, and the record that makes unmerge bit-exact).
        self.merged = None

    # -- attributes that code written for nn.Linear reads -------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def active_adapter(self) -> str | None:
        return self.__dict__.get("_active_name")

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.configs:
            raise ValueError(f"no adapter {name!r} on this layer (adapters: {list(self.configs)})")
        self.__dict__["_active_name"] = name
        with torch.no_grad():  # in place: a fresh tensor would be a new graph input to torch.compile
            self._active_index.fill_(-1 if name is None else list(self.configs).index(name))

    def scaling(self, name: str | None = None) -> float:
        return self.configs[name or self.active_adapter].scaling

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, config: LoRAConfig) -> None:
        name = config.adapter_name
        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = self.base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        a = torch.empty(config.rank, self.in_features, device=w.device, dtype=dtype)
        b = torch.zeros(self.out_features, config.rank, device=w.device, dtype=dtype)
        init_lora_A_(a, config)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.configs[name] = config
        if self.active_adapter is None:
            self.active_adapter = name

    def base_weight_nk(self) -> torch.Tensor:
        """The base weight as (out_features, in_features): a view for Conv1D, no copy."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _sgmv.takes(self):  # a mixed batch, or several adapters under torch.compile (lowrank.adapters)
            return _sgmv.layer_forward(self, x)
        name = self.active_adapter
        if name is None or self.merged:
            return self.base_layer(x)
        cfg = self.configs[name]
        if getattr(self.base_layer, "lora_forward", None) is not None:  # NF4Linear: the fused QLoRA op
            return self.base_layer.lora_forward(x, self.lora_A[name], self.lora_B[name], cfg.scaling,
                                                cfg.dropout if self.training else 0.0)
        return ops.lora_linear(
            x, self.base_weight_nk(), self.lora_A[name], self.lora_B[name], cfg.scaling,
            bias=self.base_layer.bias, dropout=cfg.dropout if self.training else 0.0,
        )

    def extra_repr(self) -> str:
        ranks = {n: c.rank for n, c in self.configs.items()}
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={ranks}, "
                f"active={self.active_adapter!r}, fan_in_fan_out={self.fan_in_fan_out}")


def init_lora_A_(a: torch.Tensor, config: LoRAConfig) -> None:
    """Initialise A in place as peft does (drawn in float32, then cast): kaiming-uniform(a=sqrt(5))
    or normal(std=1/rank)."""
    if a.device.type == "meta":
        return
    a32 = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    if config.init == "kaiming":
        nn.init.kaiming_uniform_(a32, a=math.sqrt(5))
    else:
        nn.init.normal_(a32, std=1.0 / config.rank)
    with torch.no_grad():
        a.copy_(a32)
