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
import threading

import torch
import torch.nn as nn
import safetensors.torch
from safetensors import SafetensorError, safe_open

from .config import ORIGIN_ATTR, TASK_HEADS, LoRAConfig, in_layers, pattern_value, peft_lora_kwargs, scaling_for
from .dtypes import FLOAT_DTYPES
from .layer_types import is_dense_linear, is_embedding, linear_dims, real_values
from .lora_linear import LoRALinear
from .modules_to_save import ModulesToSave
from .trainable_tokens import TrainableTokens
from .patch import (base_module_paths, input_embedding_path, iter_linear, lora_layers, patch_linear,
                    refuse_inside_blocks, saved_modules, select_modules_to_save, select_targets, select_token_layers,
                    token_layers)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?:(?P<which>lora_A|lora_B)\.weight|"
                     r"lora_embedding_(?P<emb>A|B)|(?P<magnitude>lora_magnitude_vector))$")
_MAGNITUDE = "lora_magnitude_vector"
# trainable_token_indices: the new values of an embedding's trained rows, (len(ids), embedding_dim)
TOKENS_KEY = "token_adapter.trainable_tokens_delta"
_TOKENS_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.token_adapter\.trainable_tokens_delta$")
# peft writes an embedding layer's base weight into the adapter file too (save_embedding_layers)
_EMBEDDING_BASE_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.base_layer\.weight$")


# save_adapter(task_type="auto"): peft's task_type from transformers' auto-class tables (GPT-2's
# GPT2LMHeadModel is a causal LM, T5ForConditionalGeneration a seq2seq one: the names alone do not
# say), then from the class name's suffix (a model class the tables do not list)
_TASK_TABLES = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
                ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"))
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def auto_task_type(model: nn.Module) -> str | None:
    """The peft task_type of `model`'s class (None: none known: peft then loads the adapter as a
    plain PeftModel)."""
    kind = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto  # optional: only transformers models have a task
    except ImportError:
        modeling_auto = None
    for table, task in _TASK_TABLES if modeling_auto is not None else ():
        for names in getattr(modeling_auto, table, {}).values():
            if kind == names or (isinstance(names, (tuple, list)) and kind in names):
                return task
    return next((t for suffix, t in _TASK_TYPES if kind.endswith(suffix)), None)


# -- save -------------------------------------------------------------------------------------------
# The base model an adapter file names (peft's auto classes load the base from them): kept by
# load_adapter (config.ORIGIN_ATTR), written back by save_adapter.
_ORIGIN_FIELDS = ("base_model_name_or_path", "revision")


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 task_type: str | None = "auto", base_model_name_or_path: str | None = None,
                 revision: str | None = None, replace_directory: bool = True) -> None:
    """Write `adapter_name` of a patched `model` as a peft LoRA adapter in directory `path`.

    task_type: "auto" writes the model class's peft task ("CAUSAL_LM" for GPT2LMHeadModel or any
    *ForCausalLM, "SEQ_2_SEQ_LM" for T5ForConditionalGeneration, "SEQ_CLS", "TOKEN_CLS",
    "QUESTION_ANS": `auto_task_type`) and null for others (peft then loads it as a plain
    PeftModel); pass a peft TaskType string to choose. peft trains a classification task's head
    whole (`config.TASK_HEADS`) and loads it from the file: where the adapter has LoRA on or inside
    it, or does not train it whole (modules_to_save), "auto" writes null and a classification task
    given is a ValueError (peft could not load that file).
    The adapter's modules_to_save copies are written as peft does (`<path>.<entry>` keys of each
    copy's state dict, `modules_to_save` naming the modules by peft's rule).
    base_model_name_or_path: default `model.config.name_or_path` / `model.name_or_path` if set, else
    the one in the file the adapter was loaded from; revision (peft's: the base's git revision):
    default the loaded file's, when the base written is that file's base.
    Layers whose rank or alpha differ from the most common ones are written in peft's rank_pattern /
    alpha_pattern. A DoRA adapter is written with `use_dora: true` and its magnitude vectors.
    replace_directory: a `path` holding only an adapter is replaced whole, in one step (the old
    adapter or the new one, whatever happens); False writes the two files in place (each complete
    before it is renamed in), for a directory other processes write other files into meanwhile
    (a Trainer checkpoint, where every rank saves its RNG state: the swap took theirs away).
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
    saved = [(p, w.modules_to_save[adapter_name]) for p, w in saved_modules(model) if adapter_name in w.modules_to_save]
    meta += [p for p, copy in saved if any(t.device.type == "meta" for t in copy.state_dict().values())]
    if meta:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} of layer {meta[0]} (and {len(meta) - 1} more) is on "
                         f"the meta device (shapes without values): there is nothing to save")
    tensors = {}
    for p, m in layers:
        # clone: safetensors refuses tensors that share storage, and wants contiguous CPU data.
        key_a, key_b = (("lora_embedding_A", "lora_embedding_B") if m.embedding else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{PREFIX}{p}.{key_a}"] = m.lora_A[adapter_name].detach().to("cpu").contiguous().clone()
        tensors[f"{PREFIX}{p}.{key_b}"] = m.lora_B[adapter_name].detach().to("cpu").contiguous().clone()
        if adapter_name in m.lora_magnitude_vector:
            tensors[f"{PREFIX}{p}.{_MAGNITUDE}"] = m.lora_magnitude_vector[adapter_name].detach().to("cpu").clone()
    for p, copy in saved:  # peft's layout: the copy's own state dict under the module's path
        for k, t in copy.state_dict().items():
            tensors[f"{PREFIX}{p}.{k}"] = t.detach().to("cpu").contiguous().clone()
    tokens = [(p, layer) for p, layer in token_layers(model) if adapter_name in layer.token_indices
              and layer.tied_to is None]  # a tied head follows its embedding: not written apart
    for p, layer in tokens:
        tensors[f"{PREFIX}{p}.{TOKENS_KEY}"] = \
            layer.trainable_tokens_delta[adapter_name].detach().to("cpu").contiguous().clone()
    auto = task_type == "auto"
    if auto:
        task_type = auto_task_type(model)
    # peft trains the task's head as a whole copy (modules_to_save, peft's plain suffix rule) and loads
    # it from the file: LoRA on it or inside it would clash, and a head the file lacks is a KeyError
    heads = [p for p in base_module_paths(model) if any(p.endswith(h) for h in TASK_HEADS.get(task_type, ()))]
    heads = [h for h in heads if not any(h.startswith(o + ".") for o in heads)]  # outermost (peft wraps those)
    lora_heads = sorted(p for p, _ in layers if any(p == h or p.startswith(h + ".") for h in heads))
    unsaved = sorted(h for h in heads if h not in {p for p, _ in saved})
    if (lora_heads or unsaved) and auto:
        task_type = None  # a plain PeftModel loads it (what peft writes without a task_type)
    elif lora_heads:
        raise ValueError(f"save_adapter: task_type={task_type!r} makes peft train {lora_heads[0]!r} whole "
                         f"(modules_to_save) when it loads the file, but the adapter has LoRA there: peft could not "
                         f"load it; pass task_type=None (or 'auto')")
    elif unsaved:
        raise ValueError(f"save_adapter: task_type={task_type!r} makes peft load {unsaved[0]!r} whole from the file "
                         f"(modules_to_save), but adapter {adapter_name!r} does not train it: peft could not load "
                         f"the file; patch with modules_to_save=[{unsaved[0].rsplit('.', 1)[-1]!r}] (or config="
                         f"LoraConfig(task_type=...)), or pass task_type=None (or 'auto')")
    origin = model.__dict__.get(ORIGIN_ATTR, {}).get(adapter_name, {})
    if base_model_name_or_path is None:
        base_model_name_or_path = (getattr(getattr(model, "config", None), "name_or_path", None)
                                   or getattr(model, "name_or_path", None)
                                   or origin.get("base_model_name_or_path")) or None
    if revision is None and base_model_name_or_path == origin.get("base_model_name_or_path"):
        revision = origin.get("revision")
    saved_names = _saved_names(model, [p for p, _ in saved]) if saved else None
    config = _config_dict(cfg, _target_modules(model, [p for p, _ in layers], saved_names),
                          fan_in_fan_out=any(m.fan_in_fan_out and not m.embedding for _, m in layers),
                          task_type=task_type, base=base_model_name_or_path)
    if revision is not None:
        config["revision"] = revision
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern
    if saved_names:
        config["modules_to_save"] = saved_names
    if tokens:
        config["trainable_token_indices"] = _token_config(model, tokens, adapter_name)

    metadata = {"format": "pt", SETTINGS_KEY: json.dumps(_settings(config))}
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    _refuse_file_in_the_way(path, "save_adapter")
    os.makedirs(parent, exist_ok=True)
    _remove_stale(path)
    if replace_directory and _only_adapter_files(path) and _exchange_supported(parent):
        _save_by_exchange(path, tensors, metadata, config)
    else:
        _save_in_place(path, tensors, metadata, config)


def _refuse_file_in_the_way(path: str, where: str) -> None:
    """ValueError when `path` or a folder above it is an existing file (a directory cannot be made
    there; os.makedirs said only "File exists", naming no file)."""
    p = path
    while True:
        if os.path.lexists(p) and not os.path.isdir(p):
            what = "is a file" if p == path else f"is a file, so {path} cannot be a directory"
            raise ValueError(f"{where}: {p} {what}; an adapter is saved as a directory of two files")
        up = os.path.dirname(p)
        if up == p:
            return
        p = up


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
        _finished(tmp_w, tmp_c)
        raise
    return tmp_w, tmp_c


def _save_by_exchange(path: str, tensors: dict, metadata: dict, config: dict) -> None:
    """The new adapter written into a staging directory beside `path`, then swapped with it in one
    step (renameat2 RENAME_EXCHANGE; a plain rename when `path` does not exist yet): a reader, or a
    kill at any moment, sees the old adapter or the new one, never a mix (see the Note)."""
    parent = os.path.dirname(path)
    staging = _started(_staging_name(path))
    tmp_w = tmp_c = ""
    try:
        os.mkdir(staging, 0o777)  # the umask applies, as to any directory the user makes
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
        _finished(staging, tmp_w, tmp_c)


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
        _finished(tmp_w, tmp_c)
    _fsync_dir(path)


def _staging_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(6)}.saving")


_IN_FLIGHT: set[str] = set()  # temporary files and staging directories this process is writing now
_IN_FLIGHT_LOCK = threading.Lock()


def _abandoned(name: str) -> bool:
    """Whether a temporary or staging entry (".<final>.<pid>.<hex>.tmp|saving") was left by a save
    that is not running: its process has exited, or it is this process's and no thread writes it.
    Another live process's entry is its save in progress (two writers of one directory: the
    later rename wins, neither fails)."""
    try:
        pid = int(os.path.basename(name).rsplit(".", 3)[-3])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        with _IN_FLIGHT_LOCK:
            return name not in _IN_FLIGHT
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # (PermissionError: alive, another user's)
        return False
    return False


def _started(name: str) -> str:
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.add(name)
    return name


def _finished(*names: str) -> None:
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.difference_update(names)


def _remove_stale(path: str) -> None:
    """What an interrupted save left behind: temporary files in `path`, staging directories beside
    it, each only when the save that made it is not running (`_abandoned`)."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            if name.endswith(".tmp") and name.startswith((f".{WEIGHTS_NAME}.", f".{CONFIG_NAME}.")) \
                    and _abandoned(os.path.join(path, name)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(path, name))
    parent, base = os.path.dirname(path), os.path.basename(path)
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if name.startswith(f".{base}.") and name.endswith(".saving") and _abandoned(os.path.join(parent, name)):
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
    out.update({k: config[k] for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if config.get(k)})
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


def _target_modules(model: nn.Module, paths: list[str], saved_names: list[str] | None = None):
    """peft's target_modules for exactly these module paths: the sorted list of their last names
    when that list selects exactly them (the common, readable case: ["q_proj", "v_proj"]), else a
    regex that peft full-matches against module paths."""
    wanted = set(paths)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    # peft matches a list entry t against every module (any type): key == t or key.endswith("." + t),
    # on the model as it was, less what modules_to_save takes.
    selected = {name for name in base_module_paths(model) if any(name == t or name.endswith("." + t) for t in leaves)
                and not in_saved_module(name, saved_names)}
    if selected == wanted:
        return leaves
    return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def in_saved_module(path: str, saved_names: list[str] | None) -> bool:
    """peft's rule: a module that modules_to_save names, or one inside it, gets no LoRA (a name is
    matched at a dot boundary; peft reads it as a regular expression)."""
    for m in saved_names or ():
        try:
            if re.match(rf"(^|.*\.){m}($|\..*)", path):
                return True
        except re.error:
            if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path):
                return True
    return False


def _token_config(model: nn.Module, tokens: list, adapter_name: str):
    """peft's trainable_token_indices: a list when only the input embedding has tokens, else
    {module path: ids}."""
    if len(tokens) == 1:
        try:
            if input_embedding_path(model) == tokens[0][0]:
                return list(tokens[0][1].token_indices[adapter_name])
        except ValueError:
            pass
    return {p: list(layer.token_indices[adapter_name]) for p, layer in tokens}


def _saved_names(model: nn.Module, paths: list[str]) -> list[str]:
    """peft's modules_to_save for exactly these module paths: their last names when peft's rule (a
    path ending with a name) selects exactly them with those, else the full paths; ValueError if
    neither does (a module whose path is the end of another's: peft could not tell them apart)."""
    wanted = set(paths)
    all_paths = list(base_module_paths(model))
    for names in (sorted({p.rsplit(".", 1)[-1] for p in paths}), sorted(paths)):
        if {p for p in all_paths if any(p.endswith(n) for n in names)} == wanted:
            return names
    raise ValueError(f"save_adapter: modules_to_save {sorted(paths)} cannot be named for peft: its rule (a module "
                     f"path ending with a name) would also select other modules of this model")


def _tmp_name(directory, final: str) -> str:
    """A new empty file in `directory` for `final`, created with mode 0666 less the umask (0644 under
    umask 022, as peft's files are; mkstemp would make it 0600)."""
    name = _started(os.path.join(directory, f".{final}.{os.getpid()}.{secrets.token_hex(6)}.tmp"))
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
    inference: its factors get no gradient whether or not it is active, and the whole model is put
    in eval mode (as peft's from_pretrained and load_adapter do: no dropout anywhere). With the default True an
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
    refuse_inside_blocks(model, "load_adapter")
    path = os.fspath(path)
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {path!r}")
    config = _read_config(config_file)
    cfg, rank_pattern, alpha_pattern, saved_names = _lora_config_from_peft(config, adapter_name, config_file)

    def rank_at(p: str) -> int:  # peft's rule: the pattern's value where a key matches, else r / lora_alpha
        r = pattern_value(rank_pattern, p)
        return cfg.rank if r is None else int(r)

    def alpha_at(p: str) -> float:
        a = pattern_value(alpha_pattern, p)
        return cfg.alpha if a is None else float(a)

    tensors, stamp = _read_weights(path, allow_pickle)
    _check_stamp(path, config, stamp)

    problems = []
    try:  # peft's rule, not strict: peft's classifier files name both "classifier" and "score"
        to_save = dict(select_modules_to_save(model, saved_names, strict=False)) if saved_names else {}
    except (TypeError, ValueError) as exc:
        to_save = {}
        problems.append(f"modules_to_save={saved_names!r} in {CONFIG_NAME}: {exc}")
    by_length = sorted(to_save, key=len, reverse=True)
    token_spec = _token_spec(config)
    try:
        token_targets = {p: (mod, ids) for p, mod, ids in select_token_layers(model, token_spec)} if token_spec else {}
    except (TypeError, ValueError) as exc:
        token_targets = {}
        problems.append(f"trainable_token_indices in {CONFIG_NAME}: {exc}")
    keys = _sort_keys(tensors, lambda key: next((p for p in by_length if key.startswith(f"{PREFIX}{p}.")), None),
                      saved_names, cfg.dora)
    problems += keys.problems
    pairs, key_kinds, embedding_bases, token_rows = keys.pairs, keys.kinds, keys.bases, keys.token_rows
    states = {p: keys.saved.get(p, {}) for p in to_save}  # a selected module the file lacks: {} (a problem)
    linear = {p: mod for p, mod, *_ in iter_linear(model)}
    existing = {p: mod for p, mod in lora_layers(model) if adapter_name in mod.configs}
    wanted_keys = ("lora_A", "lora_B", _MAGNITUDE) if cfg.dora else ("lora_A", "lora_B")
    for p, ab in sorted(pairs.items()):
        for which in wanted_keys:
            if which not in ab:
                if which == _MAGNITUDE:
                    problems.append(f"{p}: {_MAGNITUDE} missing (use_dora is true)")
                    continue
                key = f"lora_embedding_{which[-1]}" if key_kinds.get(p) == {"embedding"} else f"{which}.weight"
                problems.append(f"{p}: {key} missing")
        mod = linear.get(p)
        if mod is None:
            problems.append(f"{p}: no nn.Linear / Conv1D / nn.Embedding layer at this path in the model")
            continue
        embedding = is_embedding(mod.base_layer if isinstance(mod, LoRALinear) else mod)
        if key_kinds.get(p) != {"embedding" if embedding else "linear"}:
            problems.append(f"{p}: the file's keys are {sorted(key_kinds.get(p, ()))} LoRA keys, but the layer is "
                            f"{'an embedding' if embedding else 'linear'} (lora_embedding_A/B are for nn.Embedding)")
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
    problems += _saved_problems(to_save, states, adapter_name, bool(existing))
    problems += _embedding_base_problems(embedding_bases, linear)
    problems += _token_problems(token_targets, token_rows, adapter_name, bool(existing))
    selected = _peft_selection(model, config.get("target_modules"), saved_names, config.get("exclude_modules"),
                               config.get("layers_to_transform"), config.get("layers_pattern"))
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
                     modules_to_save=sorted(to_save) or None, dora=cfg.dora,
                     trainable_token_indices={p: ids for p, (_, ids) in token_targets.items()} or None)
    layers = dict(lora_layers(model))
    wrappers = dict(saved_modules(model))
    # The file's factors in each layer's dtype and device first (what can run out of memory), then
    # the copies, which cannot fail.
    staged = {(p, which): ab[which].to(getattr(layers[p], which)[adapter_name].dtype).to(
        getattr(layers[p], which)[adapter_name].device) for p, ab in pairs.items() for which in wanted_keys}
    staged_states = {}
    for p, state in states.items():
        own = wrappers[p].modules_to_save[adapter_name].state_dict()
        staged_states[p] = {k: t.to(dtype=own[k].dtype, device=own[k].device) for k, t in state.items()}
    token_layer = dict(token_layers(model))
    staged_rows = {p: t.to(token_layer[p].trainable_tokens_delta[adapter_name]) for p, t in token_rows.items()}
    with torch.no_grad():
        for p, rows in staged_rows.items():
            token_layer[p].trainable_tokens_delta[adapter_name].copy_(rows)
            if not is_trainable:
                token_layer[p].trainable_tokens_delta[adapter_name].requires_grad_(False)
        for p, state in staged_states.items():
            copy = wrappers[p].modules_to_save[adapter_name]
            own = copy.state_dict()
            for k, t in state.items():
                own[k].copy_(t)
            if not is_trainable:
                copy.requires_grad_(False)
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
    if not is_trainable:
        model.eval()  # for inference, as peft's from_pretrained / load_adapter(is_trainable=False): no dropout
    origin = {k: config[k] for k in _ORIGIN_FIELDS if isinstance(config.get(k), str) and config[k]}
    model.__dict__.setdefault(ORIGIN_ATTR, {})[adapter_name] = origin
    return model


def _check_stamp(path: str, config: dict, stamp: str | None) -> None:
    """ValueError when the weights file's `lowrank_settings` stamp disagrees with the config (see the Note)."""
    if stamp is None:
        return
    try:
        saved = json.loads(stamp)
    except ValueError:
        saved = None
    now = _settings({**config, "use_rslora": bool(config.get("use_rslora", False))})
    if not isinstance(saved, dict) or saved != now:
        raise ValueError(f"load_adapter: {path!r}: {WEIGHTS_NAME} was saved with {saved} but {CONFIG_NAME} "
                         f"says {now}: the files do not belong together (a save interrupted between its "
                         f"two renames, or a hand-edited config); save the adapter again")


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


def _peft_selection(model: nn.Module, targets, saved_names: list[str] | None = None,
                    exclude=None, layers=None, layers_pattern=None) -> set[str] | None:
    """The linear layers peft selects with `target_modules` (None: the config names none), less those
    `exclude_modules` names (peft's rule for both: a regex string matches the whole path, a name the
    end of it) and those modules_to_save takes; with layers_to_transform (`layers`, a list of
    names only, as peft), those in its blocks (`config.layer_index`) or named by their whole path."""
    if targets is None:
        return None

    def named(spec, p):
        return re.fullmatch(spec, p) is not None if isinstance(spec, str) else \
            any(p == t or p.endswith("." + t) for t in spec)

    found = [p for p, *_ in iter_linear(model)]
    if isinstance(targets, str) and targets.lower() == "all-linear":  # peft's comparison: any case
        out = {p for p, *_ in select_targets(model, "all-linear")} if found else set()
    else:
        out = {p for p in found if named(targets, p)}
    if exclude:
        out = {p for p in out if not named(exclude, p)}
    if isinstance(targets, (list, tuple)) and layers is not None and layers != []:
        out = {p for p in out if in_layers(p, targets, layers, layers_pattern)}
    return {p for p in out if not in_saved_module(p, saved_names)}


def _token_problems(targets: dict, rows: dict, adapter_name: str, existing: bool) -> list[str]:
    """What keeps the file's trainable tokens from loading: each embedding the config names needs
    its rows in the file ((len(ids), dim), finite), and no rows may be left without a config entry."""
    problems = []
    for p in sorted(set(rows) - set(targets)):
        problems.append(f"{p}.{TOKENS_KEY}: trainable token rows, but trainable_token_indices in {CONFIG_NAME} does "
                        f"not name {p}")
    for p, (mod, ids) in sorted(targets.items()):
        base = mod.base_layer if isinstance(mod, TrainableTokens) else mod
        t = rows.get(p)
        if t is None:
            problems.append(f"{p}: trainable_token_indices names it but the file holds no {TOKENS_KEY}")
            continue
        want = (len(ids), base.embedding_dim)
        if tuple(t.shape) != want:
            problems.append(f"{p}.{TOKENS_KEY}: shape {tuple(t.shape)}, {len(ids)} token(s) of {p} need {want}")
        elif t.dtype not in FLOAT_DTYPES:
            problems.append(f"{p}.{TOKENS_KEY}: dtype {t.dtype}, expected a floating-point dtype")
        else:
            problems += _value_problems(f"{p}.{TOKENS_KEY}", t, base.weight.dtype)
        has = isinstance(mod, TrainableTokens) and mod.token_indices.get(adapter_name)
        if existing and has != ids:
            problems.append(f"{p}: the model's adapter {adapter_name!r} trains tokens {has or 'none'} here, the file "
                            f"{ids}; load the file as a new adapter")
    return problems


def _embedding_base_problems(bases: dict[str, torch.Tensor], layers: dict) -> list[str]:
    """peft writes the base weight of an embedding layer with LoRA into the adapter file, and of the
    output head (lm_head: peft counts it among the embedding layers). Loading never replaces base
    weights: such a weight is accepted when it is bit for bit the model's own (the usual case), and
    refused otherwise (a resized or retrained vocabulary: the adapter was trained on another base)."""
    problems = []
    for p, t in sorted(bases.items()):
        mod = layers.get(p)
        base = mod.base_layer if isinstance(mod, LoRALinear) else mod
        if base is None or not (is_embedding(base) or is_dense_linear(base)):
            problems.append(f"{p}.base_layer.weight: the file holds a base weight for {p}, which is not an "
                            f"nn.Embedding or a dense linear layer of the model")
        elif tuple(t.shape) != tuple(base.weight.shape):
            problems.append(f"{p}.base_layer.weight: shape {tuple(t.shape)} in the file, the model's embedding is "
                            f"{tuple(base.weight.shape)} (a resized vocabulary?): the adapter belongs to another base")
        elif (w := real_values(base.weight)).device.type == "meta" or not torch.equal(t.to(w.dtype), w.detach().cpu()):
            problems.append(f"{p}.base_layer.weight: the file's base weight differs from the model's; lowrank "
                            f"does not replace base weights when loading an adapter (the adapter was trained on "
                            f"another base, or with new token rows)")
    return problems


def _saved_problems(to_save: dict, states: dict, adapter_name: str, existing: bool) -> list[str]:
    """What keeps the file's modules_to_save weights from loading into the model's modules: every
    module the config selects must be in the file whole (each entry of its state dict, same shape,
    finite), and the model's adapter, when it exists already, must have its copies exactly there."""
    problems = []
    for p, module in to_save.items():
        wrapper = module if isinstance(module, ModulesToSave) else None
        original = wrapper.original_module if wrapper is not None else module
        state, own = states[p], original.state_dict()
        if not state:
            problems.append(f"{p}: modules_to_save selects it but the file holds no weights for it (saved from "
                            f"another model?)")
            continue
        for k in sorted(set(own) - set(state)):
            problems.append(f"{p}.{k}: missing from the file (modules_to_save holds the whole module)")
        for k in sorted(set(state) - set(own)):
            problems.append(f"{p}.{k}: in the file, but {p} ({type(original).__name__}) has no such entry")
        for k in sorted(set(state) & set(own)):
            t = state[k]
            if tuple(t.shape) != tuple(own[k].shape):
                problems.append(f"{p}.{k}: shape {tuple(t.shape)}, the module has {tuple(own[k].shape)}")
            elif t.dtype.is_floating_point != own[k].dtype.is_floating_point:
                problems.append(f"{p}.{k}: dtype {t.dtype}, the module has {own[k].dtype}")
            elif t.dtype.is_floating_point:
                problems += _value_problems(f"{p}.{k}", t, own[k].dtype)
        if existing and (wrapper is None or adapter_name not in wrapper.modules_to_save):
            problems.append(f"{p}: the model's adapter {adapter_name!r} has no modules_to_save copy here; load the "
                            f"file as a new adapter")
    return problems


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


def _lora_config_from_peft(config: dict, adapter_name: str, where: str):
    """(the file's settings, its rank_pattern, its alpha_pattern, its modules_to_save); its
    trainable_token_indices: `_token_spec(config)`."""
    kwargs = peft_lora_kwargs(config, f"load_adapter: {where}", for_new_weights=False)
    rank_pattern, alpha_pattern = kwargs.pop("rank_pattern"), kwargs.pop("alpha_pattern")
    saved = kwargs.pop("modules_to_save")
    kwargs.pop("trainable_token_indices")
    return LoRAConfig(**kwargs, adapter_name=adapter_name), rank_pattern, alpha_pattern, saved


def _token_spec(config: dict):
    """The file's trainable_token_indices (checked by peft_lora_kwargs), or None."""
    return config.get("trainable_token_indices") or None


def _read_weights(path: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors, the `lowrank_settings` metadata string of a file lowrank wrote, else None)."""
    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(st):
        try:
            with safe_open(st, framework="pt", device="cpu") as f:
                stamp = (f.metadata() or {}).get(SETTINGS_KEY)
                return {k: f.get_tensor(k) for k in f.keys()}, stamp
        except SafetensorError as exc:  # truncated, or not a safetensors file at all
            raise ValueError(f"load_adapter: {st!r} is not a readable safetensors file ({exc})") from None
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


# -- read without a model ---------------------------------------------------------------------------
@dataclasses.dataclass
class AdapterLayer:
    """One layer of an adapter file: the factors as stored (A (r, in), B (out, r)), and its scaling."""
    path: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float
    scaling: float
    embedding: bool = False  # lora_embedding_A / _B: an nn.Embedding, its weight stored (in, out) = (V, D)
    magnitude: torch.Tensor | None = None  # a DoRA adapter's lora_magnitude_vector (out,)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the layer's delta s * B @ A."""
        return self.lora_B.shape[0], self.lora_A.shape[1]


@dataclasses.dataclass
class AdapterFile:
    """A peft LoRA adapter directory read and checked without a model (`read_adapter`)."""
    path: str
    config: dict
    settings: LoRAConfig  # r, lora_alpha, lora_dropout, use_rslora of the config
    fan_in_fan_out: bool
    layers: list[AdapterLayer]  # sorted by path
    # modules_to_save: {module path: {state-dict entry: tensor}}, the trained copies the file holds
    saved: dict = dataclasses.field(default_factory=dict)
    # peft's copies of embedding base weights ({layer path: weight}); never applied, only compared
    embedding_bases: dict = dataclasses.field(default_factory=dict)
    # trainable_token_indices: {embedding path: (token ids, their rows' new values)}
    tokens: dict = dataclasses.field(default_factory=dict)


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> AdapterFile:
    """Read the peft LoRA adapter in directory `path` without a model: the config through the checks
    `load_adapter` applies (unsupported fields, the lowrank_settings stamp), and every layer's
    factors checked for what the file alone can tell: both of lora_A / lora_B present, shapes
    (r, in) / (out, r) with the rank the config (or its rank_pattern) gives the layer, a
    floating-point dtype, finite values. One ValueError lists every problem; FileNotFoundError for
    missing files. What needs the model (does a layer exist, do in / out fit) is the caller's."""
    path = os.fspath(path)
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"read_adapter: {path!r} is not a directory")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"read_adapter: no {CONFIG_NAME} in {path!r}")
    config = _read_config(config_file)
    cfg, rank_pattern, alpha_pattern, saved_names = _lora_config_from_peft(config, "default", config_file)
    tensors, stamp = _read_weights(path, allow_pickle)
    _check_stamp(path, config, stamp)
    keys = _sort_keys(tensors, lambda key: _saved_owner(key, saved_names), saved_names, cfg.dora)
    problems, pairs, kinds, saved, bases, token_rows = (keys.problems, keys.pairs, keys.kinds, keys.saved, keys.bases,
                                                        keys.token_rows)
    layers = []
    for p, ab in sorted(pairs.items()):
        bad = False
        embedding = kinds.get(p) == {"embedding"}
        if len(kinds.get(p, ())) > 1:
            problems.append(f"{p}: both lora_A/B.weight and lora_embedding_A/B keys")
            continue
        for which in ("lora_A", "lora_B"):
            if which not in ab:
                problems.append(f"{p}: {f'lora_embedding_{which[-1]}' if embedding else which + '.weight'} missing")
                bad = True
                continue
            t = ab[which]
            if t.dtype not in FLOAT_DTYPES:
                problems.append(f"{p}.{which}.weight: dtype {t.dtype}, expected a floating-point dtype")
                bad = True
            elif t.dim() != 2:
                problems.append(f"{p}.{which}.weight: shape {tuple(t.shape)} is not 2-D")
                bad = True
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"{p}.{which}.weight: holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
                bad = True
        if bad:
            continue
        r = pattern_value(rank_pattern, p)
        rank = cfg.rank if r is None else int(r)
        a = pattern_value(alpha_pattern, p)
        alpha = cfg.alpha if a is None else float(a)
        A, B = ab["lora_A"], ab["lora_B"]
        if A.shape[0] != rank or B.shape[1] != rank:
            problems.append(f"{p}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not both have rank "
                            f"{rank}{' (from rank_pattern)' if rank != cfg.rank else ''}")
            continue
        mag = ab.get(_MAGNITUDE)
        if cfg.dora and (mag is None or tuple(mag.shape) != (B.shape[0],) or not mag.is_floating_point()):
            problems.append(f"{p}: a DoRA adapter needs a floating-point {_MAGNITUDE} of shape ({B.shape[0]},), "
                            f"the file has {None if mag is None else (mag.dtype, tuple(mag.shape))}")
            continue
        layers.append(AdapterLayer(p, A, B, rank, alpha, scaling_for(rank, alpha, cfg.rslora), embedding, mag))
    for p, state in sorted(saved.items()):
        for k, t in sorted(state.items()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                problems.append(f"{p}.{k}: holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
    spec, tokens = _token_spec(config), {}
    for p, rows in sorted(token_rows.items()):
        names = [n for n in spec if p.endswith(n)] if isinstance(spec, dict) else []
        ids = spec if isinstance(spec, list) and len(token_rows) == 1 else (spec[names[0]] if len(names) == 1 else None)
        if ids is None:
            problems.append(f"{p}.{TOKENS_KEY}: trainable token rows that trainable_token_indices={spec!r} does not "
                            f"name (exactly once)")
        elif rows.dim() != 2 or rows.shape[0] != len(ids) or not rows.is_floating_point() \
                or not bool(torch.isfinite(rows).all()):
            problems.append(f"{p}.{TOKENS_KEY}: {rows.dtype} {tuple(rows.shape)} is not {len(ids)} finite "
                            f"floating-point rows")
        else:
            tokens[p] = (list(ids), rows)
    if spec and not token_rows:
        problems.append(f"trainable_token_indices={spec!r} but the file holds no {TOKENS_KEY}")
    if not pairs and not problems:
        problems.append("the file holds no LoRA weights")
    if problems:
        raise ValueError(f"read_adapter({path!r}): {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return AdapterFile(path, config, cfg, bool(config.get("fan_in_fan_out", False)), layers, saved, bases, tokens)


@dataclasses.dataclass
class _FileKeys:
    """An adapter file's tensors sorted by what they are (`_sort_keys`)."""
    pairs: dict  # layer path -> {"lora_A", "lora_B" (and a DoRA file's lora_magnitude_vector): tensor}
    kinds: dict  # layer path -> {"linear"} or {"embedding"} (both: a file that mixes them at one path)
    saved: dict  # modules_to_save path -> {state-dict entry: tensor}
    bases: dict  # layer path -> peft's copy of an embedding's base weight
    token_rows: dict  # embedding path -> trainable token rows
    problems: list


def _sort_keys(tensors: dict, owner_of, saved_names, dora: bool) -> _FileKeys:
    """Sort a peft file's keys: LoRA factors (lora_A/B.weight, lora_embedding_A/B), DoRA magnitudes,
    trainable token rows, peft's embedding base weights, and the entries of modules_to_save modules
    (`owner_of(key)`: the module path a non-LoRA key belongs to, or None); every other key, and a
    magnitude in a file whose config says use_dora false, is a problem naming it."""
    out = _FileKeys({}, {}, {}, {}, {}, [])
    for key, t in tensors.items():
        if _TOKENS_RE.match(key):
            out.token_rows[_TOKENS_RE.match(key)["path"]] = t
            continue
        m = _KEY_RE.match(key)
        owner = owner_of(key) if m is None else None
        if owner is not None:
            out.saved.setdefault(owner, {})[key[len(PREFIX) + len(owner) + 1:]] = t
        elif m is None and _EMBEDDING_BASE_RE.match(key):
            out.bases[_EMBEDDING_BASE_RE.match(key)["path"]] = t
        elif m is None:
            out.problems.append(f"{key}: neither a LoRA A/B weight (base_model.model.<path>.lora_A/B.weight or "
                                f".lora_embedding_A/B), a DoRA magnitude (.lora_magnitude_vector) nor a weight of a "
                                f"module in modules_to_save ({saved_names}); biases are not supported")
        elif m["magnitude"] and not dora:
            out.problems.append(f"{key}: a DoRA magnitude, but {CONFIG_NAME} has use_dora false")
        elif m["magnitude"]:
            out.pairs.setdefault(m["path"], {})[_MAGNITUDE] = t
        else:
            out.kinds.setdefault(m["path"], set()).add("embedding" if m["emb"] else "linear")
            out.pairs.setdefault(m["path"], {})[m["which"] or f"lora_{m['emb']}"] = t
    return out


def _saved_owner(key: str, saved_names: list[str] | None) -> str | None:
    """The module path a non-LoRA key of a file belongs to under modules_to_save, without a model:
    the shortest dotted prefix of its path that ends with one of the names (peft's rule; selected
    modules never nest)."""
    if not saved_names or not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX):].split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        if any(path.endswith(n) for n in saved_names):
            return path
    return None
