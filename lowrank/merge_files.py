"""`lowrank merge BASE ADAPTER OUT`: a LoRA adapter merged into a transformers model's files, one
shard at a time. Level 5.

    stats = merge_files("base_dir", "adapter_dir", "out_dir", dtype="auto")

The output is the base directory's files with every adapter layer's weight replaced by
round(W + s * B @ A) (the merge op: the sum in fp32, rounded once), so that
`AutoModelForCausalLM.from_pretrained(out)` loads it as a plain model with no missing or unexpected
key, bit-equal to `merge_and_unload(load_adapter(from_pretrained(base), adapter))` in memory (the
same op on the same operands: the factors in fp32, as load_adapter makes them over a 16-bit or NF4
base, as peft's autocast_adapter_dtype does).

# Note: streaming
The base's safetensors shards are read one at a time: a shard's tensors are read, the adapter's
layers whose weights live in it are merged, the shard is written under its own name into a staging
directory beside `out`, and freed. What is held at once is one shard (plus the adapter's factors
and, for NF4, one layer's statistics from other shards), not the model; `MergeStats.largest_held_bytes`
reports it. Everything that can be checked from the headers and the adapter (files, keys, shapes,
dtypes, the model's layer types, tied weights, free disk space is not) is checked before the first
byte is written; the staging directory is renamed to `out` only when complete, and removed on any
failure, so `out` is either as it was or complete.

# Note: layouts and names
The adapter names a layer `base_model.model.<path>`; its weight is `<path>.weight` in the
checkpoint, or that with a prefix added or removed (`Checkpoint.resolve`). Whether the weight is an
nn.Linear (out, in) or a GPT-2 Conv1D (in, out) is read from the model's architecture, built from
config.json on the meta device (no weights); a Conv1D weight is merged with transposed, swapped
factors, as `lowrank.merge` does.

# Note: NF4 bases
A bitsandbytes 4-bit checkpoint (config.json `quantization_config` with `load_in_4bit` and
`bnb_4bit_quant_type: nf4`, each weight stored as `weight`, `weight.absmax`, ..., the
`quant_state.bitsandbytes__nf4` JSON) is read with `NF4Weight.from_bnb`. Every quantized weight is
dequantized to the dtype that was quantized (bit-identical to bitsandbytes), the adapter's layers
merged there with fp32 factors and one rounding (as `merge_and_unload` does for an NF4 layer), and
the output is a dense model (quantization_config removed). With requantize=True the adapter's
layers are quantized back to NF4 with the base's blocksize and double quantization and every other
weight keeps its 4-bit storage untouched (quantization_config kept: loading it needs bitsandbytes).
FP4 and 8-bit checkpoints are refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil

import safetensors.torch
import torch
from safetensors import safe_open
from tqdm import tqdm

from .adapter_files import AdapterLayer, _exchange, _exchange_supported, read_adapter
from .checkpoint import CONFIG_NAME, INDEX_NAME, NF4_SUFFIXES, SINGLE_NAME, Checkpoint
from .dtypes import KERNEL_DTYPES
from .layer_types import is_conv1d, is_embedding
from .nf4_format import quantize_nf4
from .ops.merge import check_merge_args

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_FILE_ENDINGS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")


@dataclasses.dataclass
class MergeStats:
    """What `merge_files` did: layers merged, shards written, and the bytes of tensors it held at
    once (largest over shards) against the largest base shard and the whole model."""
    layers: int
    shards: int
    largest_held_bytes: int
    largest_shard_bytes: int
    total_bytes: int
    out: str


@dataclasses.dataclass
class _Plan:
    layer: AdapterLayer
    key: str  # the weight's key in the checkpoint
    transposed: bool  # Conv1D: weight stored (in, out)
    nf4: bool


def _nf4_config(config: dict, where: str) -> dict | None:
    """The base's bitsandbytes 4-bit quantization_config, None for a dense base; ValueError for
    another quantization."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != "bitsandbytes" or not q.get("load_in_4bit"):
        raise ValueError(f"{where}: the base is quantized with {method!r} "
                         f"{'(8-bit) ' if isinstance(q, dict) and q.get('load_in_8bit') else ''}which lowrank cannot "
                         f"dequantize (only bitsandbytes 4-bit NF4)")
    if q.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{where}: the base is quantized to bitsandbytes {q.get('bnb_4bit_quant_type')!r}; only nf4 "
                         f"is supported")
    return q


def _architecture(base: str, where: str):
    """The base's causal-LM architecture on the meta device (no weights), from its config.json."""
    try:
        import transformers  # optional: merge reads a transformers model directory
    except ImportError:
        raise ValueError(f"{where}: needs transformers (pip install transformers) to read the base model's "
                         f"architecture") from None
    cfg = transformers.AutoConfig.from_pretrained(base, local_files_only=True)
    if getattr(cfg, "quantization_config", None) is not None:
        delattr(cfg, "quantization_config")  # the architecture is what we need, not bitsandbytes' layers
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    except ValueError as exc:
        raise ValueError(f"{where}: {base!r} is not a causal language model transformers knows "
                         f"(model_type {getattr(cfg, 'model_type', None)!r}): {str(exc).splitlines()[0]}") from None
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    return model


def _module_for(model, modules: dict, path: str, key: str):
    for name in (path, key[: -len(".weight")]):
        if name in modules:
            return name, modules[name]
    prefix = getattr(model, "base_model_prefix", "")
    for name in (path, key[: -len(".weight")]):
        if prefix and f"{prefix}.{name}" in modules:
            return f"{prefix}.{name}", modules[f"{prefix}.{name}"]
    return None, None


def _plan(ckpt: Checkpoint, found, nf4_config, dtype, where: str) -> list[_Plan]:
    """Every adapter layer's weight key, layout and kind, checked against the headers and the
    architecture before anything is read or written."""
    keys = ckpt.resolve([layer.path for layer in found.layers], where)
    model = _architecture(ckpt.directory, where)
    modules = dict(model.named_modules())
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    plans, problems = [], []
    dora = [layer.path for layer in found.layers if layer.magnitude is not None]
    if dora:  # said once for the adapter, not once per layer
        raise ValueError(f"{where}: a DoRA adapter ({len(dora)} layer(s) with magnitudes, {dora[0]} first); lowrank "
                         f"merge does not merge DoRA files yet, nothing written (load it and use "
                         f"lowrank.merge_and_unload, or save_pretrained(merged=True))")
    for layer in found.layers:
        key, (n, k) = keys[layer.path], layer.shape
        mod_name, module = _module_for(model, modules, layer.path, key)
        if module is None:
            problems.append(f"{layer.path}: no module {layer.path} in the {type(model).__name__} built from "
                            f"{CONFIG_NAME}")
            continue
        names = shared.get(id(getattr(module, "weight", None)), [])
        if len(names) > 1:
            other = next(x for x in names if x != mod_name + ".weight")
            problems.append(f"{layer.path}: its weight is tied to {other}; merging would change both (keep the "
                            f"adapter unmerged for this layer)")
            continue
        embedding = is_embedding(module)
        if not is_conv1d(module) and not isinstance(module, torch.nn.Linear) and not embedding:
            problems.append(f"{layer.path}: a {type(module).__name__}, not an nn.Linear, Conv1D or nn.Embedding")
            continue
        if embedding != layer.embedding:
            problems.append(f"{layer.path}: the adapter holds {'embedding' if layer.embedding else 'linear'} LoRA "
                            f"keys for a {type(module).__name__}")
            continue
        is_nf4 = nf4_config is not None and ckpt.is_nf4(key)
        # Conv1D and nn.Embedding store (in, out); a 4-bit weight is stored (out, in) whatever the layer was
        transposed = (is_conv1d(module) or embedding) and not is_nf4
        if is_nf4:
            nf4 = ckpt.nf4_weight(key)  # one layer's codes and statistics, checked (NF4Weight.validate)
            shape, wdtype = tuple(nf4.shape), nf4.dtype
            want = (n, k)
            del nf4
        else:
            shape, wdtype = ckpt.shape(key), ckpt.dtype(key)
            want = (k, n) if transposed else (n, k)
            if dtype is not None and wdtype is not None and wdtype.is_floating_point:
                wdtype = dtype
        if shape != want:
            problems.append(f"{layer.path}: the base weight {key} is {shape}, the adapter (A "
                            f"{tuple(layer.lora_A.shape)}, B {tuple(layer.lora_B.shape)}) needs {want}: the adapter "
                            f"does not fit this model")
            continue
        if wdtype not in KERNEL_DTYPES:
            problems.append(f"{layer.path}: the base weight {key} is {wdtype}; merging needs float32, float16 or "
                            f"bfloat16")
            continue
        if not is_nf4:
            fdtype = torch.float32  # the factors merge in fp32, as load_adapter makes them (peft's autocast)
            a, b = layer.lora_A.to(fdtype), layer.lora_B.to(fdtype)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                problems.append(f"{layer.path}: the factors are not finite in {fdtype}")
                continue
            w = torch.empty(shape, dtype=wdtype, device="meta")
            wa, wb = (b.t(), a.t()) if transposed else (a, b)
            check_merge_args(w, wa.to("meta"), wb.to("meta"), layer.scaling, f"merge: layer {layer.path}",
                             values=False)
        plans.append(_Plan(layer, key, transposed, is_nf4))
    for path, t in sorted(found.embedding_bases.items()):  # peft's copy of an embedding's base weight
        key = keys.get(path)
        if key is None or ckpt.shape(key) != tuple(t.shape) or not torch.equal(ckpt.tensor(key), t.to(ckpt.dtype(key))):
            problems.append(f"{path}: the adapter file's copy of the embedding's base weight differs from {key or path} "
                            f"in the base: the adapter belongs to another base (or retrained token rows)")
    if problems:
        raise ValueError(f"{where}: {len(problems)} problem(s), nothing written: " + "; ".join(problems))
    return plans


def _plan_saved(ckpt: Checkpoint, found, nf4_keys: set, where: str) -> dict:
    """{base key: the adapter's tensor} for the modules_to_save copies the adapter holds: each copy's
    entries replace the base module's (a trained head); every entry must exist in the base with the
    same shape, and the module's weight must not be tied to another (it would be re-tied on load).
    Trainable tokens: {embedding key: ("rows", ids, rows)}, the rows replaced in the weight."""
    problems, out = [], {}
    if found.tokens:  # trainable tokens: their rows written into the embedding (a tie carries them to the head)
        keys = ckpt.resolve(sorted(found.tokens), where)
        for path, (ids, rows) in sorted(found.tokens.items()):
            key = keys[path]
            shape = ckpt.shape(key)
            if key in nf4_keys or len(shape) != 2 or shape[1] != rows.shape[1] or max(ids) >= shape[0]:
                problems.append(f"{path}: {len(ids)} trainable token row(s) of width {rows.shape[1]} (ids up to "
                                f"{max(ids)}) do not fit {key} {shape} in the base")
            else:
                out[key] = ("rows", ids, rows)
    if not found.saved:
        if problems:
            raise ValueError(f"{where}: {len(problems)} problem(s), nothing written: " + "; ".join(problems))
        return out
    try:
        weight_keys = ckpt.resolve(sorted(found.saved), where)
    except ValueError as exc:
        raise ValueError(f"{where}: modules_to_save: {exc}") from None
    model = _architecture(ckpt.directory, where)
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    tied_names = {n for names in tied.values() if len(names) > 1 for n in names}
    for path, state in sorted(found.saved.items()):
        prefix = weight_keys[path][: -len("weight")]
        for entry, t in sorted(state.items()):
            key = prefix + entry
            if key not in ckpt.key_file:
                problems.append(f"{path}.{entry}: the base stores no {key}")
            elif key in nf4_keys:
                problems.append(f"{path}.{entry}: {key} is 4-bit in the base; a trained copy cannot replace it")
            elif ckpt.shape(key) != tuple(t.shape):
                problems.append(f"{path}.{entry}: shape {tuple(t.shape)} in the adapter, {ckpt.shape(key)} in the base")
            elif any(key.endswith(n) or n.endswith(key) for n in tied_names):
                problems.append(f"{path}.{entry}: {key} is tied to another weight in this architecture; "
                                f"from_pretrained would tie it back and lose the trained copy")
            else:
                out[key] = t
    if problems:
        raise ValueError(f"{where}: {len(problems)} problem(s), nothing written: " + "; ".join(problems))
    return out


def _check_out(out: str, base: str, adapter: str, force: bool, where: str) -> None:
    real = os.path.realpath(out)
    for name, d in (("the base", base), ("the adapter", adapter)):
        rd = os.path.realpath(d)
        if real == rd or rd.startswith(real + os.sep):
            raise ValueError(f"{where}: OUT {out!r} is or holds {name} directory {d!r}; choose another")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ValueError(f"{where}: OUT {out!r} exists and is not a directory")
        if os.listdir(out) and not force:
            raise ValueError(f"{where}: OUT {out!r} is not empty; pass --force (force=True) to replace it")


def _merge_weight(w: torch.Tensor, plan: _Plan, factor_dtype: torch.dtype) -> None:
    layer = plan.layer
    a, b = layer.lora_A.to(factor_dtype), layer.lora_B.to(factor_dtype)
    if plan.transposed:  # Conv1D (in, out): W^T + s B A = (W + s A^T B^T)^T
        a, b = b.t(), a.t()
    check_merge_args(w, a, b, layer.scaling, f"merge: layer {layer.path}")
    torch.ops.lowrank.merge_(w, a, b, layer.scaling, False)


def merge_files(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                requantize: bool = False, dtype: str = "auto", force: bool = False,
                progress: bool = False) -> MergeStats:
    """Merge the peft LoRA adapter in `adapter` into the transformers causal LM in `base` and write
    the merged model to `out` (safetensors shards named as the base's, their index, config.json and
    every other non-weight file of the base: tokenizer, generation config). See the module's Notes.

    dtype: "auto" keeps each tensor's stored dtype; "float32" / "float16" / "bfloat16" cast every
    floating-point tensor to it first (as from_pretrained(dtype=...) does) and record it in the
    config. requantize: for an NF4 base, quantize the merged layers back to NF4 (default: a dense
    output). force: replace a non-empty `out`. ValueError / FileNotFoundError, with nothing written,
    for files that do not fit; `out` is only ever replaced by a complete directory."""
    where = "merge"
    base, adapter, out = os.fspath(base), os.fspath(adapter), os.path.abspath(os.fspath(out))
    if dtype not in DTYPES:
        raise ValueError(f"{where}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    target = DTYPES[dtype]
    ckpt = Checkpoint(base, where)
    nf4_config = _nf4_config(ckpt.config, where)
    if requantize and nf4_config is None:
        raise ValueError(f"{where}: --requantize applies to an NF4 (bitsandbytes 4-bit) base; {base!r} is dense")
    if nf4_config is not None and target is not None:
        raise ValueError(f"{where}: --dtype with an NF4 base: the weights are dequantized to the dtype that was "
                         f"quantized; leave --dtype at auto")
    found = read_adapter(adapter)
    _check_out(out, base, adapter, force, where)
    plans = _plan(ckpt, found, nf4_config, target, where)
    by_key = {p.key: p for p in plans}
    nf4_keys = {k[: -len(".quant_state.bitsandbytes__nf4")] for k in ckpt.key_file
                if k.endswith(".quant_state.bitsandbytes__nf4")} if nf4_config is not None else set()
    nf4_parts = {k + s: k for k in nf4_keys for s in NF4_SUFFIXES}
    saved = _plan_saved(ckpt, found, nf4_keys, where)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(out)
    need, free = _output_bytes(ckpt, nf4_keys, requantize, target), shutil.disk_usage(parent).free
    if need > free:
        raise ValueError(f"{where}: the merged model needs about {need / 2**30:.2f} GiB and {parent!r} has "
                         f"{free / 2**30:.2f} GiB free; nothing written")
    stage = os.path.join(parent, f".{os.path.basename(out)}.{os.getpid()}.{secrets.token_hex(6)}.merging")
    os.mkdir(stage)
    held_max, weight_map, total, parameters = 0, {}, 0, 0
    try:
        shards = ckpt.files
        if progress:
            shards = tqdm(shards, desc="merging shards", unit="shard")
        for name in shards:
            tensors = {}
            with safe_open(os.path.join(ckpt.directory, name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
            out_tensors = {}
            for key, t in tensors.items():
                if key in nf4_parts:  # a 4-bit weight's statistics: they go with the weight below
                    if requantize and nf4_parts[key] not in by_key:
                        out_tensors[key] = t  # an untouched 4-bit weight's statistics
                    continue
                if key in nf4_keys:
                    plan = by_key.get(key)
                    if requantize and plan is None:
                        out_tensors[key] = t
                        continue
                    nf4 = ckpt.nf4_weight(key, tensors)
                    w = nf4.dequantize(nf4.dtype if nf4.dtype in KERNEL_DTYPES else torch.bfloat16).contiguous()
                    if plan is not None:
                        _merge_weight(w, plan, torch.float32)  # fp32 factors: load_adapter's for an NF4 layer
                        if requantize:
                            q = quantize_nf4(w, blocksize=nf4.blocksize, double_quant=nf4.double_quant)
                            out_tensors.update({k: v.contiguous() for k, v in q.to_bnb_state_dict(
                                key[: -len("weight")]).items()})
                            continue
                    out_tensors[key] = w
                    continue
                if key in saved and isinstance(saved[key], tuple):  # trainable tokens: the rows replaced
                    _, ids, rows = saved[key]
                    t = t.index_copy(0, torch.tensor(ids), rows.to(t.dtype))
                elif key in saved:  # a modules_to_save copy replaces the base module's entry
                    t = saved[key].to(t.dtype)
                if target is not None and t.is_floating_point():
                    t = t.to(target)
                plan = by_key.get(key)
                if plan is not None:
                    t = t.contiguous()
                    _merge_weight(t, plan, torch.float32)  # fp32 factors, as load_adapter's (peft's autocast)
                out_tensors[key] = t
            held_max = max(held_max, _distinct_bytes(list(tensors.values()) + list(out_tensors.values())))
            del tensors
            if out_tensors:
                safetensors.torch.save_file(out_tensors, os.path.join(stage, name), metadata={"format": "pt"})
                os.chmod(os.path.join(stage, name), 0o666 & ~_umask())  # safetensors writes 0600
                for key, t in out_tensors.items():
                    weight_map[key] = name
                    total += t.numel() * t.element_size()
                    parameters += t.numel()
            del out_tensors
        if ckpt.index is not None:
            metadata = {**(ckpt.index.get("metadata") or {}), "total_size": total}
            if "total_parameters" in metadata:
                metadata["total_parameters"] = parameters
            index = {"metadata": metadata,
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(stage, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        config = dict(ckpt.config)
        if nf4_config is not None and not requantize:
            config.pop("quantization_config", None)
        if target is not None:
            config["dtype"] = dtype
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype
        with open(os.path.join(stage, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        for entry in os.scandir(ckpt.directory):
            if entry.is_file() and entry.name not in (CONFIG_NAME, INDEX_NAME, SINGLE_NAME) \
                    and not entry.name.endswith(_WEIGHT_FILE_ENDINGS) and not entry.name.endswith(".index.json"):
                shutil.copy2(entry.path, os.path.join(stage, entry.name))
        _replace(stage, out)
    finally:
        if os.path.isdir(stage):
            shutil.rmtree(stage, ignore_errors=True)
    return MergeStats(layers=len(plans), shards=len(ckpt.files), largest_held_bytes=held_max,
                      largest_shard_bytes=max(ckpt.file_bytes.values()), total_bytes=sum(ckpt.file_bytes.values()),
                      out=out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _distinct_bytes(tensors: list) -> int:
    """Bytes of the distinct storages behind `tensors` (a tensor kept as it was counts once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _output_bytes(ckpt: Checkpoint, nf4_keys: set, requantize: bool, target: torch.dtype | None) -> int:
    """About the bytes the output's shards take (from the headers): each tensor in its output dtype,
    a dequantized NF4 weight dense."""
    total = 0
    for key in ckpt.key_file:
        shape, dtype = ckpt.shape(key), ckpt.dtype(key)
        numel = 1
        for d in shape:
            numel *= d
        size = dtype.itemsize if dtype is not None else 8
        if target is not None and dtype is not None and dtype.is_floating_point:
            size = target.itemsize
        if key in nf4_keys and not requantize:
            meta = json.loads(bytes(ckpt.tensor(key + ".quant_state.bitsandbytes__nf4").tolist()).decode("utf-8"))
            numel, size = 2 * numel, getattr(torch, str(meta.get("dtype")), torch.float32).itemsize
        total += numel * size
    return total


def _remove_stale(out: str) -> None:
    """Staging directories an interrupted merge into `out` left beside it (their process is gone)."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    for name in os.listdir(parent):
        if not (name.startswith(f".{base}.") and (name.endswith(".merging") or name.endswith(".merging.old"))):
            continue
        try:
            pid = int(name[len(base) + 2:].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def _replace(stage: str, out: str) -> None:
    """The complete staging directory renamed to `out`. An existing `out` (empty, or replaced with
    force) is swapped with it in one step where the platform can (renameat2 RENAME_EXCHANGE: a
    reader sees the old model or the new one), else moved aside first; the old one is removed after."""
    if not os.path.exists(out):
        os.rename(stage, out)
        return
    if _exchange_supported(os.path.dirname(out)):
        _exchange(stage, out)  # `stage` now holds the old model
        with contextlib.suppress(OSError):
            shutil.rmtree(stage)
        return
    trash = f"{stage}.old"
    os.rename(out, trash)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(trash, out)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(trash)
