"""LoRAConfig: the hyper-parameters of one adapter, validated in one place. Level 0."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch.nn as nn

TargetSpec = Union[str, Sequence[str], Callable[[str, Any], bool], None]

INITS = ("kaiming", "gaussian")


@dataclass
class LoRAConfig:
    """One adapter's settings.

    rank:     r, an int >= 1.
    alpha:    lora_alpha, > 0; None means 2 * rank.
    dropout:  probability in [0, 1) applied to the LoRA branch's input.
    rslora:   scaling = alpha / sqrt(rank) (rank-stabilized LoRA) instead of alpha / rank.
    init:     "kaiming" (A ~ kaiming-uniform(a=sqrt(5)), B = 0, as peft) or "gaussian"
              (A ~ N(0, std=1/rank), B = 0, as peft's init_lora_weights="gaussian").
    targets / exclude: which linear layers; see `lowrank.patch.select_targets`.
    """

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    targets: TargetSpec = "all-linear"
    exclude: TargetSpec = None
    adapter_name: str = "default"

    def __post_init__(self):
        self.validate()
        if self.alpha is None:
            self.alpha = 2 * self.rank

    @property
    def scaling(self) -> float:
        return scaling_for(self.rank, self.alpha, self.rslora)

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
            raise TypeError(f"rank must be an int, got {type(self.rank).__name__} {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        self.rank = int(self.rank)
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
                raise TypeError(f"alpha must be a number, got {type(self.alpha).__name__} {self.alpha!r}")
            if not math.isfinite(self.alpha) or self.alpha <= 0:
                raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise TypeError(f"dropout must be a float, got {type(self.dropout).__name__} {self.dropout!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.dropout = float(self.dropout)
        if not isinstance(self.rslora, bool):
            raise TypeError(f"rslora must be a bool, got {type(self.rslora).__name__}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.adapter_name, str) or not self.adapter_name.isidentifier():
            raise ValueError(f"adapter_name must be a non-empty identifier string, got {self.adapter_name!r}")
        if hasattr(nn.ParameterDict(), self.adapter_name):  # e.g. "copy", "keys": lora_A[name] would fail midway
            raise ValueError(f"adapter_name {self.adapter_name!r} is an attribute of nn.ParameterDict, where "
                             f"adapters are stored; choose another name")
        check_target_spec(self.targets, "targets", allow_none=False)
        check_target_spec(self.exclude, "exclude", allow_none=True)


def scaling_for(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_target_spec(spec: TargetSpec, what: str, allow_none: bool) -> None:
    """TypeError/ValueError for a targets/exclude value that is not one of the accepted forms."""
    if spec is None:
        if allow_none:
            return
        raise TypeError(f"{what} must not be None")
    if callable(spec):
        return
    if isinstance(spec, str):
        if spec == "all-linear":
            if what == "exclude":
                raise ValueError('exclude="all-linear" would exclude every layer')
            return
        try:
            re.compile(spec)
        except re.error as exc:
            raise ValueError(f"{what}={spec!r} is not a valid regular expression: {exc}") from None
        return
    if isinstance(spec, (list, tuple, set, frozenset)):
        if not spec:
            raise ValueError(f"{what} is an empty list")
        bad = [s for s in spec if not isinstance(s, str) or not s]
        if bad:
            raise TypeError(f"{what} must list non-empty module names (str), got {bad!r}")
        return
    raise TypeError(
        f"{what} must be 'all-linear', a regex string, a list of module names or a callable "
        f"(name, module) -> bool; got {type(spec).__name__}"
    )
