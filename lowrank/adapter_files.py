"""Adapter files that peft and vLLM read: save_adapter / load_adapter. Level 4.

The on-disk format is peft's LoRA checkpoint:
- `adapter_config.json` with the standard LoraConfig fields only (see `_config_dict`): fields
  that only recent peft versions know would make older versions' `LoraConfig(**fields)` fail.
- `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` (r, in)
  and `.lora_B.weight` (out, r), the adapter name stripped, metadata {"format": "pt"}; a DoRA
  adapter (`use_dora: true`) also `.lora_magnitude_vector` (out,), as peft 0.21.2 writes it.
  A GPT-2 Conv1D layer stores (in, out) weights, but its adapter has the same (r, in) / (out, r)
  shapes as an nn.Linear one; the config then says `fan_in_fan_out: true`.

# Note: atomic writes
Both files are written complete and fsynced under temporary names before anything the reader
sees changes. When the directory holds nothing but an adapter (the usual case), the two files are
written into a staging directory beside it, and the two directories are swapped in one step
(`renameat2(RENAME_EXCHANGE)`, Linux 3.15+): a reader, or a kill at any moment, finds the old
adapter or the new one, never one file of each. peft needs that, since it cannot tell two files
apart that share r and alpha but target other layers. Elsewhere (other files in the directory, which
an exchange would take away, or no RENAME_EXCHANGE) each file is renamed over its final name in
turn; the one state in between (new weights beside the old config) is made detectable for
lowrank: the weights file's metadata also records the settings that give the weights their
meaning (`lowrank_settings`: r, lora_alpha, use_rslora), and load_adapter refuses a config that
disagrees with them, naming the fields. peft ignores extra safetensors metadata. Files get mode
0666 less the umask, as peft's do; what an interrupted save left is removed by the next one.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import shutil

import torch
import torch.nn as nn
import safetensors.torch
from safetensors import safe_open

from .config import LoRAConfig, pattern_value, peft_lora_kwargs
from .dtypes import FLOAT_DTYPES
from .layer_types import linear_dims
from .lora_linear import LoRALinear
from .patch import iter_linear, lora_layers, patch_linear, refuse_inside_adapter_ids, select_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?:(?P<which>lora_A|lora_B)\.weight|"
                     r"(?P<magnitude>lora_magnitude_vector))$")
_MAGNITUDE = "lora_magnitude_vector"


# -- save -------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 task_type: str | None = "auto", base_model_name_or_path: str | None = None) -> None:
    """Write `adapter_name` of a patched `model` as a peft LoRA adapter in directory `path`.

    task_type: "auto" writes "CAUSAL_LM" for a *ForCausalLM model and null otherwise (peft then
    loads it as a plain PeftModel); pass a peft TaskType string to choose.
    base_model_name_or_path: default `model.config.name_or_path` / `model.name_or_path` if set.
    Layers whose rank or alpha differ from the most common ones are written in peft's rank_pattern /
    alpha_pattern. A DoRA adapter is written with `use_dora: true` and its magnitude vectors.
    Raises ValueError when the model has no such adapter, or when layers differ in rslora, dropout
    or DoRA (a peft file has one of each).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_adapter expects a torch.nn.Module, got {type(model).__name__}")
    layers = [(p, m) for p, m in lora_layers(model) if adapter_name in m.configs]
    if not layers:
        names = sorted({n for _, m in lora_layers(model) for n in m.configs})
        raise ValueError(f"save_adapter: the model has no adapter {adapter_name!r} (adapters: {names})")
    settings = {(m.configs[adapter_name].rslora, m.configs[adapter_name].dropout, m.configs[adapter_name].dora)
                for _, m in layers}
    if len(settings) != 1:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} has different (rslora, dropout, dora) on different "
                         f"layers {sorted(settings)}; a peft file has one setting of each")
    cfg, rank_pattern, alpha_pattern = _patterns([(p, m.configs[adapter_name]) for p, m in layers])
    meta = [p for p, m in layers if any(t.device.type == "meta" for t in m.adapter_parameters(adapter_name))]
    if meta:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} of layer {meta[0]} (and {len(meta) - 1} more) is on "
                         f"the meta device (shapes without values): there is nothing to save")
    tensors = {}
    for p, m in layers:
        # clone: safetensors refuses tensors that share storage, and wants contiguous CPU data.
        tensors[f"{PREFIX}{p}.lora_A.weight"] = m.lora_A[adapter_name].detach().to("cpu").contiguous().clone()
        tensors[f"{PREFIX}{p}.lora_B.weight"] = m.lora_B[adapter_name].detach().to("cpu").contiguous().clone()
        if adapter_name in m.lora_magnitude_vector:
            tensors[f"{PREFIX}{p}.{_MAGNITUDE}"] = m.lora_magnitude_vector[adapter_name].detach().to("cpu").clone()
    if task_type == "auto":
        task_type = "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
    if base_model_name_or_path is None:
        base_model_name_or_path = (getattr(getattr(model, "config", None), "name_or_path", None)
                                   or getattr(model, "name_or_path", None)) or None
    config = _config_dict(cfg, _target_modules(model, [p for p, _ in layers]),
                          fan_in_fan_out=any(m.fan_in_fan_out for _, m in layers),
                          task_type=task_type, base=base_model_name_or_path)
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern

    metadata = {"format": "pt", SETTINGS_KEY: json.dumps(_settings(config))}
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(path)
    if _only_adapter_files(path) and _exchange_supported(parent):
        _save_by_exchange(path, tensors, metadata, config)
    else:
        _save_in_place(path, tensors, metadata, config)


def _write_pair(directory: str, tensors: dict, metadata: dict, config: dict) -> tuple[str, str]:
    """The weights and config files, complete and fsynced, under temporary names in `directory`."""
    tmp_w, tmp_c = _tmp_name(directory, WEIGHTS_NAME), _tmp_name(directory, CONFIG_NAME)
    try:
        mode = os.stat(tmp_w).st_mode & 0o777  # 0666 less the umask, from _tmp_name
        safetensors.torch.save_file(tensors, tmp_w, metadata=metadata)
        os.chmod(tmp_w, mode)  # safetensors writes its file 0600
        _fsync(tmp_w)
        with open(tmp_c, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        for t in (tmp_w, tmp_c):
            if os.path.exists(t):
                os.unlink(t)
        raise
    return tmp_w, tmp_c


def _save_by_exchange(path: str, tensors: dict, metadata: dict, config: dict) -> None:
    """The new adapter written into a staging directory beside `path`, then swapped with it in one
    step (renameat2 RENAME_EXCHANGE; a plain rename when `path` does not exist yet): a reader, or a
    kill at any moment, sees the old adapter or the new one, never a mix (see the Note)."""
    parent = os.path.dirname(path)
    staging = _staging_name(path)
    os.mkdir(staging, 0o777)  # the umask applies, as to any directory the user makes
    try:
        tmp_w, tmp_c = _write_pair(staging, tensors, metadata, config)
        os.rename(tmp_w, os.path.join(staging, WEIGHTS_NAME))
        os.rename(tmp_c, os.path.join(staging, CONFIG_NAME))
        _fsync_dir(staging)
        if os.path.isdir(path):
            _exchange(staging, path)  # `staging` now holds the old adapter
        else:
            os.rename(staging, path)
        _fsync_dir(parent)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _save_in_place(path: str, tensors: dict, metadata: dict, config: dict) -> None:
    """Both files complete under temporary names, then renamed over the final ones: the fallback
    when `path` holds other files (which a directory exchange would take away) or the platform has
    no RENAME_EXCHANGE; a kill between the two renames is detected by load_adapter (the stamp)."""
    os.makedirs(path, exist_ok=True)
    tmp_w, tmp_c = _write_pair(path, tensors, metadata, config)
    try:
        os.replace(tmp_w, os.path.join(path, WEIGHTS_NAME))
        os.replace(tmp_c, os.path.join(path, CONFIG_NAME))
    finally:
        for t in (tmp_w, tmp_c):
            if os.path.exists(t):
                os.unlink(t)
    _fsync_dir(path)


def _staging_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(6)}.saving")


def _remove_stale(path: str) -> None:
    """What an interrupted save left behind: temporary files in `path`, staging directories beside
    it. (One writer at a time per adapter directory: a concurrent save's files would go too.)"""
    if os.path.isdir(path):
        for name in os.listdir(path):
            if name.endswith(".tmp") and name.startswith((f".{WEIGHTS_NAME}.", f".{CONFIG_NAME}.")):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(path, name))
    parent, base = os.path.dirname(path), os.path.basename(path)
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if name.startswith(f".{base}.") and name.endswith(".saving"):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _only_adapter_files(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and set(os.listdir(path)) <= {CONFIG_NAME, WEIGHTS_NAME})


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def _exchange(a: str, b: str) -> None:
    """Swap the names a and b in one step (both must exist)."""
    fn = _renameat2()
    if fn is None or fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno() if fn is not None else errno.ENOSYS
        raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a!r} <-> {b!r}: {os.strerror(err)}")


def _exchange_supported(parent: str) -> bool:
    """Whether RENAME_EXCHANGE works in `parent` (Linux 3.15+, and a filesystem that has it): tried
    on two empty directories made for the purpose."""
    if _renameat2() is None:
        return False
    a, b = _staging_name(os.path.join(parent, "probe-a")), _staging_name(os.path.join(parent, "probe-b"))
    try:
        os.mkdir(a)
        os.mkdir(b)
        _exchange(a, b)
        return True
    except OSError:
        return False
    finally:
        for d in (a, b):
            with contextlib.suppress(OSError):
                os.rmdir(d)


SETTINGS_KEY = "lowrank_settings"


def _settings(config: dict) -> dict:
    """The config fields without which the weights would compute something else (the patterns
    only when there are some, use_dora only when true, so that files written before them still match)."""
    out = {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora")}
    if config.get("use_dora") is True:
        out["use_dora"] = True
    out.update({k: config[k] for k in ("rank_pattern", "alpha_pattern") if config.get(k)})
    return out


def _patterns(layers: list[tuple[str, LoRAConfig]]) -> tuple[LoRAConfig, dict, dict]:
    """(the config written as r / lora_alpha: the most common rank, then the most common alpha among
    its layers; rank_pattern and alpha_pattern naming, by their escaped full paths, every layer that
    differs). peft matches those keys at the end of the module path, so each names its one layer."""
    ranks = collections.Counter(c.rank for _, c in layers)
    rank = max(ranks, key=lambda r: (ranks[r], -r))
    alphas = collections.Counter(float(c.alpha) for _, c in layers if c.rank == rank)
    alpha = max(alphas, key=lambda a: (alphas[a], -a))
    cfg = next(c for _, c in layers if c.rank == rank and float(c.alpha) == alpha)
    rank_pattern = {re.escape(p): c.rank for p, c in layers if c.rank != rank}
    alpha_pattern = {re.escape(p): _json_number(c.alpha) for p, c in layers if float(c.alpha) != alpha}
    return cfg, rank_pattern, alpha_pattern


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _config_dict(cfg: LoRAConfig, targets, fan_in_fan_out: bool, task_type, base) -> dict:
    alpha = cfg.alpha
    if float(alpha).is_integer():
        alpha = int(alpha)
    return {
        "peft_type": "LORA",
        "r": cfg.rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "fan_in_fan_out": fan_in_fan_out,
        "task_type": task_type,
        "base_model_name_or_path": base,
        "modules_to_save": None,
    }


def _target_modules(model: nn.Module, paths: list[str]):
    """peft's target_modules for exactly these module paths: the sorted list of their last names
    when that list selects exactly them (the common, readable case: ["q_proj", "v_proj"]), else a
    regex that peft full-matches against module paths."""
    wanted = set(paths)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    # peft matches a list entry t against every module (any type): key == t or key.endswith("." + t).
    selected = {name for name, _ in model.named_modules()
                if name and any(name == t or name.endswith("." + t) for t in leaves)}
    selected = {s for s in selected if not any(s.startswith(w + ".") for w in wanted)}  # inside a LoRALinear
    if selected == wanted:
        return leaves
    return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def _tmp_name(directory, final: str) -> str:
    """A new empty file in `directory` for `final`, created with mode 0666 less the umask (0644 under
    umask 022, as peft's files are; mkstemp would make it 0600)."""
    name = os.path.join(directory, f".{final}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return name


def _fsync(name: str) -> None:
    fd = os.open(name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- load -------------------------------------------------------------------------------------------
def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 allow_pickle: bool = False, set_active: bool = False, is_trainable: bool = True) -> nn.Module:
    """Load a peft LoRA adapter from directory `path` into `model` as `adapter_name`; returns model.

    If no layer of `model` has `adapter_name` yet, the layers named in the file are patched (an
    unpatched model, or a patched one that gets another adapter); otherwise the file must cover
    exactly the layers that have it, at the same rank, and its weights and alpha / rslora /
    dropout replace theirs. Every key, shape and dtype is checked before the model is touched: on
    any problem one ValueError lists them all and the model is unchanged. Floating-point weights
    are cast to the layer's dtype (peft does the same). As in peft, a new adapter name on a model
    that has adapters changes nothing that runs (the new adapter is inactive and frozen) unless
    set_active=True; the first adapter of a model becomes its active one.

    A DoRA file (`use_dora: true`) needs a `lora_magnitude_vector` (out_features,) for every layer and
    loads as a DoRA adapter; over an existing adapter, both must be DoRA or both not.

    is_trainable=False (peft's name; peft's default, not lowrank's) loads the adapter frozen, for
    inference: its factors get no gradient whether or not it is active. With the default True an
    adapter that becomes active is trainable, as one made by patch_linear (a frozen default would
    make a training loop after load_adapter silently train nothing).

    Only `adapter_model.safetensors` is read. A pickled `adapter_model.bin` is refused unless
    allow_pickle=True, and even then is read with torch.load(weights_only=True).
    """
    if not isinstance(is_trainable, bool):
        raise TypeError(f"load_adapter: is_trainable must be True or False, got {is_trainable!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter expects a torch.nn.Module, got {type(model).__name__}")
    LoRAConfig(adapter_name=adapter_name)  # validates the name
    refuse_inside_adapter_ids(model, "load_adapter")
    path = os.fspath(path)
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {path!r}")
    config = _read_config(config_file)
    cfg, rank_pattern, alpha_pattern = _lora_config_from_peft(config, adapter_name, config_file)

    def rank_at(p: str) -> int:  # peft's rule: the pattern's value where a key matches, else r / lora_alpha
        r = pattern_value(rank_pattern, p)
        return cfg.rank if r is None else int(r)

    def alpha_at(p: str) -> float:
        a = pattern_value(alpha_pattern, p)
        return cfg.alpha if a is None else float(a)

    tensors, stamp = _read_weights(path, allow_pickle)
    if stamp is not None:
        try:
            saved = json.loads(stamp)
        except ValueError:
            saved = None
        now = _settings({**config, "use_rslora": bool(config.get("use_rslora", False))})
        if not isinstance(saved, dict) or saved != now:
            raise ValueError(f"load_adapter: {path!r}: {WEIGHTS_NAME} was saved with {saved} but {CONFIG_NAME} "
                             f"says {now}: the files do not belong together (a save interrupted between its "
                             f"two renames, or a hand-edited config); save the adapter again")

    problems = []
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            problems.append(f"{key}: not a LoRA A/B weight or DoRA magnitude (only base_model.model.<path>."
                            f"lora_A/B.weight and .lora_magnitude_vector keys are supported; biases, embeddings "
                            f"and modules_to_save are not)")
            continue
        if m["magnitude"] and not cfg.dora:
            problems.append(f"{key}: a DoRA magnitude, but {CONFIG_NAME} has use_dora false")
            continue
        pairs.setdefault(m["path"], {})[m["which"] or _MAGNITUDE] = t
    linear = {p: mod for p, mod, *_ in iter_linear(model)}
    existing = {p: mod for p, mod in lora_layers(model) if adapter_name in mod.configs}
    wanted_keys = ("lora_A", "lora_B", _MAGNITUDE) if cfg.dora else ("lora_A", "lora_B")
    for p, ab in sorted(pairs.items()):
        for which in wanted_keys:
            if which not in ab:
                problems.append(f"{p}: {which}{'' if which == _MAGNITUDE else '.weight'} missing"
                                f"{' (use_dora is true)' if which == _MAGNITUDE else ''}")
        mod = linear.get(p)
        if mod is None:
            problems.append(f"{p}: no nn.Linear / Conv1D layer at this path in the model")
            continue
        k, n = (mod.in_features, mod.out_features) if isinstance(mod, LoRALinear) else linear_dims(mod)
        rank = rank_at(p)
        expect = {"lora_A": (rank, k), "lora_B": (n, rank), _MAGNITUDE: (n,)}
        for which, t in ab.items():
            key = f"{p}.{which}" if which == _MAGNITUDE else f"{p}.{which}.weight"
            if tuple(t.shape) != expect[which]:
                problems.append(f"{key}: shape {tuple(t.shape)}, the layer needs {expect[which]} "
                                f"(r={rank}{' from rank_pattern' if rank != cfg.rank else ''}, in={k}, out={n})")
            if t.dtype not in FLOAT_DTYPES:
                problems.append(f"{key}: dtype {t.dtype}, expected a floating-point dtype")
                continue
            problems += _value_problems(key, t, _adapter_dtype(mod, existing.get(p), adapter_name))
        if existing and p not in existing:
            problems.append(f"{p}: the model's adapter {adapter_name!r} does not cover this layer "
                            f"(it is on {len(existing)} other layers)")
        elif p in existing and existing[p].configs[adapter_name].rank != rank:
            problems.append(f"{p}: adapter {adapter_name!r} has rank {existing[p].configs[adapter_name].rank} "
                            f"in the model, {rank} in the file")
        elif p in existing and existing[p].configs[adapter_name].dora != cfg.dora:
            problems.append(f"{p}: adapter {adapter_name!r} is {'a DoRA' if cfg.dora else 'a plain LoRA'} adapter in "
                            f"the file but not in the model")
    merged = sorted(p for p, mod in existing.items() if getattr(mod, "merged", None)
                    and mod.merged.adapter == adapter_name)
    if merged:  # new A / B under a merged weight: outputs would keep the old adapter, unmerge would fail
        problems.append(f"adapter {adapter_name!r} is merged into {merged[0]} (and {len(merged) - 1} more "
                        f"layers); lowrank.unmerge(model) first")
    if existing:
        for p in sorted(set(existing) - set(pairs)):
            problems.append(f"{p}: has adapter {adapter_name!r} in the model but no weights in the file")
    selected = _peft_selection(model, config.get("target_modules"))
    if selected is not None and pairs and selected != set(pairs):
        extra, missing = sorted(set(pairs) - selected), sorted(selected - set(pairs))
        problems.append(f"target_modules={config.get('target_modules')!r} in {CONFIG_NAME} selects other layers than "
                        f"the weights cover (weights without a target: {extra[:3]}; targets without weights: "
                        f"{missing[:3]}): peft would load another model from these files")
    if not pairs and not problems:
        problems.append("the file holds no LoRA weights")
    if problems:
        raise ValueError(f"load_adapter({path!r}, adapter_name={adapter_name!r}): {len(problems)} problem(s), "
                         f"model unchanged:\n  " + "\n  ".join(problems))

    wanted = set(pairs)
    if not existing:
        patch_linear(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                     rank_pattern={re.escape(p): rank_at(p) for p in wanted if rank_at(p) != cfg.rank},
                     alpha_pattern={re.escape(p): alpha_at(p) for p in wanted if alpha_at(p) != cfg.alpha},
                     targets=lambda p, _m: p in wanted, adapter_name=adapter_name, set_active=set_active,
                     dora=cfg.dora)
    layers = dict(lora_layers(model))
    # The file's factors in each layer's dtype and device first (what can run out of memory), then
    # the copies, which cannot fail.
    staged = {(p, which): ab[which].to(getattr(layers[p], which)[adapter_name].dtype).to(
        getattr(layers[p], which)[adapter_name].device) for p, ab in pairs.items() for which in wanted_keys}
    with torch.no_grad():
        for p, ab in pairs.items():
            layer = layers[p]
            for which in wanted_keys:
                getattr(layer, which)[adapter_name].copy_(staged[(p, which)])
            old = layer.configs[adapter_name]
            layer.configs[adapter_name] = dataclasses.replace(
                old, alpha=alpha_at(p), dropout=cfg.dropout, rslora=cfg.rslora)
            if not is_trainable:
                for param in layer.adapter_parameters(adapter_name):
                    param.requires_grad_(False)
    return model


def _adapter_dtype(mod: nn.Module, layer: LoRALinear | None, adapter_name: str) -> torch.dtype:
    """The dtype the file's factors are cast to: the layer's adapter, or what a new one would get."""
    if layer is not None:
        return layer.lora_A[adapter_name].dtype
    w = (mod.base_layer if isinstance(mod, LoRALinear) else mod).weight
    return w.dtype if w.dtype.is_floating_point else torch.float32


def _value_problems(name: str, t: torch.Tensor, dtype: torch.dtype) -> list[str]:
    """NaN / Inf in the file, or finite values that become Inf in the layer's dtype."""
    if not bool(torch.isfinite(t).all()):
        return [f"{name}: holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)"]
    if not bool(torch.isfinite(t.to(dtype)).all()):
        return [f"{name}: values up to {t.abs().max().item():.6g} overflow the layer's {dtype}"]
    return []


def _peft_selection(model: nn.Module, targets) -> set[str] | None:
    """The linear layers peft selects with `target_modules` (None: the config names none)."""
    if targets is None:
        return None
    found = [p for p, *_ in iter_linear(model)]
    if targets == "all-linear":
        return {p for p, *_ in select_targets(model, "all-linear")} if found else set()
    if isinstance(targets, str):
        return {p for p in found if re.fullmatch(targets, p)}
    return {p for p in found if any(p == t or p.endswith("." + t) for t in targets)}


def _read_config(config_file: str) -> dict:
    """The JSON object in adapter_config.json; ValueError naming the file for anything else."""
    try:
        with open(config_file, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"load_adapter: {config_file} is not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_adapter: {config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {config_file} holds a JSON {type(config).__name__}, not an object of "
                         f"LoraConfig fields")
    return config


def _lora_config_from_peft(config: dict, adapter_name: str, where: str) -> tuple[LoRAConfig, dict | None,
                                                                                   dict | None]:
    """(the file's settings, its rank_pattern, its alpha_pattern)."""
    kwargs = peft_lora_kwargs(config, f"load_adapter: {where}", for_new_weights=False)
    rank_pattern, alpha_pattern = kwargs.pop("rank_pattern"), kwargs.pop("alpha_pattern")
    return LoRAConfig(**kwargs, adapter_name=adapter_name), rank_pattern, alpha_pattern


def _read_weights(path: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors, the `lowrank_settings` metadata string of a file lowrank wrote, else None)."""
    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(st):
        with safe_open(st, framework="pt", device="cpu") as f:
            stamp = (f.metadata() or {}).get(SETTINGS_KEY)
            return {k: f.get_tensor(k) for k in f.keys()}, stamp
    pkl = os.path.join(path, PICKLE_NAME)
    if os.path.isfile(pkl):
        if not allow_pickle:
            raise ValueError(f"load_adapter: {path!r} has only a pickled {PICKLE_NAME}; pickle files can run "
                             f"code when loaded. Convert it to safetensors, or pass allow_pickle=True "
                             f"(then read with torch.load(weights_only=True))")
        state = torch.load(pkl, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"load_adapter: {pkl!r} is not a dict of tensors")
        return state, None
    raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {path!r}")
