"""LoRAConfig: the hyper-parameters of one adapter, validated in one place; and peft's names for
them (`PEFT_NAMES`, `peft_lora_kwargs`: a peft LoraConfig or its dict read as lowrank's arguments).
Level 0."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence, Union

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
    dora:     DoRA (weight-decomposed LoRA, peft's use_dora): each output row scaled by
              m_i / ||W_i + s (BA)_i||, m a trainable vector initialised to ||W_i||.
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
    dora: bool = False

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
        if not isinstance(self.dora, bool):
            raise TypeError(f"dora must be a bool, got {type(self.dora).__name__}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        name = self.adapter_name
        # peft's names ("sft-v2"...): any printable name that can key a ModuleDict (no ".") and name a
        # subfolder of a multi-adapter save (no "/" or "\\"), without surrounding spaces
        if not isinstance(name, str) or not name or not name.isprintable() or name != name.strip() \
                or any(c in name for c in "./\\"):
            raise ValueError(f"adapter_name must be a non-empty printable string without '.', '/' or '\\' and "
                             f"without surrounding spaces, got {name!r}")
        if hasattr(nn.ParameterDict(), self.adapter_name):  # e.g. "copy", "keys": lora_A[name] would fail midway
            raise ValueError(f"adapter_name {self.adapter_name!r} is an attribute of nn.ParameterDict, where "
                             f"adapters are stored; choose another name")
        check_target_spec(self.targets, "targets", allow_none=False)
        check_target_spec(self.exclude, "exclude", allow_none=True)


def scaling_for(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pattern_value(pattern: Mapping[str, Any] | None, path: str):
    r"""peft's rule for rank_pattern / alpha_pattern: the value of the first key (in the mapping's
    order) that, as a regex, matches the end of the module path at a name boundary
    (re.match(rf"(.*\.)?({key})$", path)); None when no key does."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def check_pattern(pattern, what: str) -> dict | None:
    """A rank_pattern (what="rank_pattern": values ints >= 1) or alpha_pattern (numbers > 0) as a
    dict, None when empty; TypeError / ValueError naming the bad key or value."""
    if pattern is None:
        return None
    if not isinstance(pattern, Mapping):
        raise TypeError(f"{what} must be a dict of module-name regex -> value, got {type(pattern).__name__}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{what}: keys must be non-empty strings (module names or regexes), got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{what}: key {key!r} is not a valid regular expression ({exc})") from None
        if what == "rank_pattern":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{what}[{key!r}] = {value!r}: a rank must be an int >= 1")
        elif (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
              or value <= 0):
            raise ValueError(f"{what}[{key!r}] = {value!r}: an alpha must be a finite number > 0")
    return dict(pattern) or None


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


# -- peft's names ---------------------------------------------------------------------------------

# peft's argument / LoraConfig field -> lowrank's argument of the same meaning.
PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
              "exclude_modules": "exclude", "use_rslora": "rslora", "use_dora": "dora", "layers_to_transform": "layers"}

# LoraConfig fields that do not change what lowrank computes: bookkeeping, and fan_in_fan_out
# (lowrank knows each layer's weight layout: GPT-2's Conv1D is recognised, not declared).
_PEFT_INERT = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
               "inference_mode", "megatron_core", "qalora_group_size", "fan_in_fan_out", "peft_type"}
# How an adapter was initialised, for a file whose weights are given: irrelevant, unless the
# method also rewrote the base weights (the adapter then belongs to that residual base, and on the
# original base it would compute something else without a word).
_PEFT_INIT_FIELDS = {"loftq_config", "eva_config", "corda_config", "lora_ga_config"}
_BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")

# Fields whose JSON type must be exactly this (peft's LoraConfig takes them as given, and Python's
# truthiness would turn "no" into True): name -> (accepted types, description).
# peft's LoraConfig defaults (peft 0.21), for a config dict or adapter_config.json that leaves the
# field out: peft reads such a file with them, and LoraConfig(**fields) takes them. Not lowrank's own
# default alpha (2 x rank): the fields are peft's, so their defaults are too.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8

# Where load_adapter keeps, per adapter, the base model its file names (base_model_name_or_path,
# revision), for save_adapter to write back: {adapter name: {field: value}} in the model's __dict__
# (delete_adapter drops the entry).
ORIGIN_ATTR = "_lowrank_adapter_origin"

# The heads peft trains whole (adds to modules_to_save) when it makes a new adapter for a task:
# get_peft_model with this task_type; those of them the model has (peft's own saved configs list
# "classifier" and "score" whichever the model holds).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def task_type_name(config: Mapping) -> str | None:
    """A config's task_type as its string ('SEQ_CLS'; peft's TaskType enum read by value), or None."""
    task = config.get("task_type")
    return None if task is None else str(getattr(task, "value", task))

_PEFT_FIELD_TYPES = {
    "use_rslora": ((bool,), "true or false"),
    "use_dora": ((bool,), "true or false"),
    "fan_in_fan_out": ((bool,), "true or false"),
    "lora_dropout": ((int, float), "a number in [0, 1)"),
    "bias": ((str,), "a string"),
    "target_modules": ((str, list, tuple, set, frozenset, type(None)), "a regex string, a list of names, or null"),
}


def check_layers(layers, layers_pattern, where: str) -> None:
    """TypeError / ValueError unless layers (peft's layers_to_transform) is None, an int >= 0 or a list
    of them, and layers_pattern None, a regex string or a list of them."""
    items = layers if isinstance(layers, (list, tuple)) else [layers] if layers is not None else []
    if layers is not None and not isinstance(layers, (list, tuple, int)) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise TypeError(f"{where}: layers (peft's layers_to_transform) must be a layer index or a list of them, got "
                        f"{layers!r}")
    if any(i < 0 for i in items):
        raise ValueError(f"{where}: layers (peft's layers_to_transform) holds a negative index: {layers!r}")
    patterns = layers_pattern if isinstance(layers_pattern, (list, tuple)) else \
        [layers_pattern] if layers_pattern is not None else []
    if layers_pattern is not None and not isinstance(layers_pattern, (list, tuple, str)) or not all(
            isinstance(p, str) for p in patterns):
        raise TypeError(f"{where}: layers_pattern must be a regex string (the name before the layer index, e.g. "
                        f"'layers' or 'h') or a list of them, got {layers_pattern!r}")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"{where}: layers_pattern {p!r} is not a valid regular expression ({exc})") from None


def layer_index(path: str, layers_pattern=None) -> int | None:
    """The layer index peft reads from a module path for layers_to_transform (peft 0.21's rule): the
    first number that is a whole path segment after a segment matching one of the layers_pattern
    regexes ("model.layers.3.mlp.experts.5.up_proj": 3 with "layers"), or, with no pattern, the
    first number after any segment that is itself preceded by one (so "layers.3.q_proj", at the
    top, has none); None when there is no such number."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or ())
    if not patterns or layers_pattern == "":
        found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        found = None
        for p in patterns:
            found = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", path)
            if found:
                break
    return int(found.group(1)) if found else None


def in_layers(path: str, targets, layers, layers_pattern=None) -> bool:
    """Whether layers_to_transform (`layers`: an index, or a non-empty list of them) keeps the target
    at `path`: its `layer_index` is listed, or a list of `targets` names it by its whole path (peft
    0.21 checks the index only for list entries that match at the end of the path)."""
    if isinstance(targets, (list, tuple)) and path in targets:
        return True
    return layer_index(path, layers_pattern) in ({layers} if isinstance(layers, int) else set(layers))


def _empty(value) -> bool:
    """None, False, 0-free containers: a field left at peft's 'off' default (nested dicts of such too)."""
    if isinstance(value, Mapping):
        return all(_empty(v) for v in value.values())
    return value is None or value is False or (isinstance(value, (str, list, tuple, set, frozenset)) and not value)


def peft_config_dict(config) -> dict:
    """The fields of a peft LoraConfig (its to_dict()) or of a mapping of them, as a plain dict; peft
    is not imported. TypeError for anything else."""
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and type(config).__name__ == "LoraConfig":
        out = to_dict()
        if isinstance(out, Mapping):
            return dict(out)
    raise TypeError(f"config must be a peft LoraConfig, a dict of its fields or a lowrank LoRAConfig, got "
                    f"{type(config).__name__}")


def peft_lora_kwargs(config: Mapping, where: str, for_new_weights: bool) -> dict:
    """lowrank's LoRA arguments (rank, alpha, dropout, rslora, dora; and with for_new_weights: targets,
    exclude, init) from a peft LoraConfig's fields, every field checked: ValueError naming each
    field that is malformed, or that asks for something lowrank does not do (biases, other
    initialisations...). rank_pattern / alpha_pattern come back as such (dicts, or None when empty),
    modules_to_save as a list of names or None, trainable_token_indices as given (a list or a dict)
    or None. Fields at their
    'off' default are accepted whatever they are, as are bookkeeping fields (`_PEFT_INERT`).

    for_new_weights=False (reading an adapter file, whose weights are given): target_modules and
    the initialisation are not read (the file's keys say which layers; its weights are the init)."""
    problems = []
    for key, (types, what) in _PEFT_FIELD_TYPES.items():
        if key in config and (not isinstance(config[key], types)
                              or (bool not in types and isinstance(config[key], bool))):
            problems.append(f"{key}={config[key]!r} must be {what}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and not 0.0 <= dropout < 1.0:
        problems.append(f"lora_dropout={dropout!r} must be a number in [0, 1)")
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":  # peft compares it case-insensitively
        targets = "all-linear"
    if isinstance(targets, (list, tuple, set, frozenset)) and not all(isinstance(t, str) and t for t in targets):
        problems.append(f"target_modules={targets!r} must list non-empty module names")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as exc:
            problems.append(f"target_modules={targets!r} is not a valid regular expression ({exc})")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    peft_type = config.get("peft_type", "LORA" if for_new_weights else None)  # a hand-made dict may omit it
    if str(getattr(peft_type, "value", peft_type)) != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} is not supported (only 'none')")
    r, alpha = config.get("r", PEFT_DEFAULT_R), config.get("lora_alpha", PEFT_DEFAULT_ALPHA)  # absent: peft's
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r={r!r} must be an int >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"lora_alpha={alpha!r} must be a number > 0")
    read = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "target_modules", "exclude_modules",
            "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices",
            "layers_to_transform", "layers_pattern"}
    try:  # (reading a file, they are checked and not used: its keys say which layers)
        check_layers(config.get("layers_to_transform"), config.get("layers_pattern"), where)
    except (TypeError, ValueError) as exc:
        problems.append(str(exc).split(": ", 1)[1])
    tokens = config.get("trainable_token_indices")
    if tokens is not None and not (isinstance(tokens, (list, tuple)) or (
            isinstance(tokens, Mapping) and all(isinstance(k, str) and isinstance(v, (list, tuple))
                                                for k, v in tokens.items()))):
        problems.append(f"trainable_token_indices={tokens!r} must be a list of token ids, a dict {{module name: "
                        f"ids}} or null")
    saved = config.get("modules_to_save")
    if isinstance(saved, (set, frozenset)):
        saved = sorted(saved)
    if saved is not None and (not isinstance(saved, (list, tuple)) or not all(isinstance(n, str) and n for n in saved)):
        problems.append(f"modules_to_save={saved!r} must be a list of module names or null")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        try:
            patterns[key] = check_pattern(config.get(key) or None, key)
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    kwargs = {}
    if not for_new_weights:
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            problems.append(f"init_lora_weights={init!r}: this initialisation rewrites the base weights, so the "
                            f"adapter only fits its residual base model; convert it to a plain LoRA adapter "
                            f"with peft first (save_pretrained(path_initial_model_for_weight_conversion=...))")
        read |= _PEFT_INIT_FIELDS
    else:
        if targets is None:
            problems.append("target_modules is null: peft picks a default per architecture; name the modules "
                            "(or 'all-linear')")
        if config.get("inference_mode") is True:  # get_peft_model freezes such an adapter: nothing would train
            problems.append("inference_mode=True makes the new adapter frozen (as peft's get_peft_model does) and "
                            "lowrank does not create frozen adapters: set inference_mode=False to train it, or "
                            "load saved weights with lowrank.load_adapter(..., is_trainable=False)")
        init = config.get("init_lora_weights", True)
        if init is True or init == "gaussian":
            kwargs["init"] = "kaiming" if init is True else "gaussian"
        else:
            problems.append(f"init_lora_weights={init!r} is not supported (only true, i.e. kaiming-uniform A and "
                            f"zero B, or 'gaussian')")
        exclude = config.get("exclude_modules")
        if exclude is not None and not isinstance(exclude, (str, list, tuple, set, frozenset)):
            problems.append(f"exclude_modules={exclude!r} must be a regex string or a list of names")
        if isinstance(targets, (set, frozenset)):
            targets = sorted(targets)
        if isinstance(exclude, (set, frozenset)):
            exclude = sorted(exclude)
        kwargs.update(targets=targets if not isinstance(targets, tuple) else list(targets),
                      exclude=exclude if exclude else None)
        layers = config.get("layers_to_transform")
        if isinstance(layers, (list, tuple)) and not layers:  # peft: an empty list selects every layer
            layers = None
        if layers is not None:
            kwargs.update(layers=list(layers) if isinstance(layers, (list, tuple)) else layers,
                          layers_pattern=config.get("layers_pattern") or None)
    for key, value in config.items():
        if key not in read and key not in _PEFT_INERT and not _empty(value):
            problems.append(f"{key}={value!r} is not supported")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    kwargs.update(rank=r, alpha=float(alpha), dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                  rslora=bool(config.get("use_rslora", False)), dora=bool(config.get("use_dora", False)),
                  modules_to_save=list(saved) if saved else None,
                  trainable_token_indices=(dict(tokens) if isinstance(tokens, Mapping) else list(tokens))
                  if tokens else None, **patterns)
    return kwargs


def lora_kwargs(config: LoRAConfig) -> dict:
    """A lowrank LoRAConfig as patch_linear's arguments (adapter_name included)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}
