"""Merge / unmerge LoRA adapters into a model's base weights: one rounding, bit-exact unmerge.

    lowrank.merge(model)              # W <- round(W + s * B @ A) in every LoRA layer, in place
    lowrank.unmerge(model)            # gives every W back bit for bit
    model = lowrank.merge_and_unload(model)   # plain nn.Linear / Conv1D with merged weights

The arithmetic is the merge op's (`lowrank.ops.merge`: native library or its bit-identical
pure-torch fallback). A merged layer keeps the exact-unmerge record packed in its `MergeState`
(index low 16 bits + a count per 64Ki block + the values: 4 bytes per entry for 16-bit weights);
`record_fraction` reports that size relative to W's bytes (about 15% when the delta's rms is 10%
of W's, 32% at 30%).

DoRA adapters merge as W <- round(m / ||W + s B A|| (.) (W + s B A)), one rounding, with their own
exact-unmerge record (`lowrank.ops.dora_merge`: float64 arithmetic rounded once, in the native
library on CPU and CUDA, or its bit-identical pure-torch path); the row scale is kept in the
`MergeState` (8 bytes per row).

NF4 (QLoRA) layers: `merge_and_unload` dequantizes them and merges there with one rounding
(optionally quantizing the result back). It dequantizes to the dtype of the weight that was
quantized (`NF4Weight.dtype`), not to the compute dtype: the two agree in the usual bf16 QLoRA
set-up, and where they differ (an fp32 model trained with bf16 compute) the merged layer must
match the rest of the model to run without casts, and merging in the wider dtype loses nothing.
In-place `merge` / `unmerge` of an NF4 weight raise NotImplementedError (the 4-bit codes cannot
hold the delta).

Level 4: imports levels 0-4.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from .dtypes import KERNEL_DTYPES
from .layer_types import has_own_forward, is_bnb_linear4bit
from .lora_linear import LoRALinear, is_adaptable
from .nf4_linear import NF4Linear
from .ops.dora_merge import dora_merge_, dora_unmerge_
from .ops.merge import check_merge_args, check_no_overflow, fast_unmerge_key
from .patch import active_adapter, original_base, original_bases, refuse_inside_blocks, restore_modules

_BLOCK_BITS = 16  # the stored record splits flat indices into 64Ki-element blocks


@dataclasses.dataclass
class MergeState:
    """What a merged LoRALinear remembers: which adapter, and what unmerge needs.

    The exact-unmerge record is kept compact: flat indices (sorted) as a count per block of
    2^16 elements (int32, 4 bytes per 65536 elements of W) plus the index's low 16 bits (2 bytes
    per entry), and the original values (the weight's itemsize per entry) -- 4 bytes per entry
    for fp16 / bf16 instead of 6 with int32 indices."""
    adapter: str
    scaling: float
    exact: bool
    block_counts: torch.Tensor  # int32 (ceil(numel / 2^16),)
    low_bits: torch.Tensor      # int16 (n,): flat index & 0xFFFF
    values: torch.Tensor        # weight.dtype (n,): original bits
    versions: tuple  # (weight, lora_A, lora_B[, magnitude]) version counters right after the merge
    fingerprints: tuple = ()  # (weight, lora_A, lora_B[, magnitude]) `fingerprint`s right after the merge
    dora_scale: torch.Tensor | None = None  # a DoRA merge: m / ||W + s B A|| per row, float64 (N,)
    # the record came from the native CPU library: its fast_unmerge_key then (unmerge_(..., fast=True)
    # on the CPU where the key is the same), else None
    fast_unmerge: int | None = None

    @classmethod
    def pack(cls, adapter, scaling, exact, rec_idx, rec_val, numel, versions, fingerprints=()):
        blocks = -(-numel // (1 << _BLOCK_BITS))
        idx = rec_idx.long()
        counts = torch.bincount(idx >> _BLOCK_BITS, minlength=blocks).to(torch.int32)
        low = (idx & 0xFFFF).to(torch.int32).to(torch.int16)  # wraps to int16: decoded with & 0xFFFF
        return cls(adapter, scaling, exact, counts, low, rec_val, versions, fingerprints)

    def unpack(self):
        """(rec_idx int32 sorted, rec_val) as `merge_` returned them."""
        blocks = torch.arange(self.block_counts.numel(), device=self.low_bits.device, dtype=torch.int64)
        high = torch.repeat_interleave(blocks, self.block_counts.long())
        idx = (high << _BLOCK_BITS) | (self.low_bits.long() & 0xFFFF)
        return idx.to(torch.int32), self.values

    def record_bytes(self) -> int:
        extra = () if self.dora_scale is None else (self.dora_scale,)
        return sum(t.numel() * t.element_size() for t in (self.block_counts, self.low_bits, self.values, *extra))


def record_fraction(layer: LoRALinear) -> float:
    """Size of a merged layer's exact-unmerge record as a fraction of its weight's bytes."""
    state = getattr(layer, "merged", None)
    if not state:
        raise ValueError("record_fraction: the layer is not merged")
    w = layer.base_layer.weight
    return state.record_bytes() / (w.numel() * w.element_size())


def _merge_operands(layer: LoRALinear, name: str):
    """(weight as stored, 'A', 'B') such that stored weight += s * B @ A is the merge: for a Conv1D
    weight stored (in, out), W^T + s B A = (W + s A^T B^T)^T, so the stored tensor is merged with
    transposed, swapped factors (views; the weight is never copied)."""
    w = layer.base_layer.weight.detach()
    a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    if layer.fan_in_fan_out:
        return w, b.t(), a.t()
    return w, a, b


def _check_layer(path: str, layer: LoRALinear, name: str | None, what: str = "merge"):
    base = layer.base_layer
    w = getattr(base, "weight", None)
    if type(layer) is not LoRALinear or not is_adaptable(base) or not isinstance(w, torch.Tensor) \
            or w.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(
            f"layer {path}: merging into a {type(layer).__name__} over {type(base).__name__} with weight "
            f"{getattr(w, 'dtype', None)} is not implemented (only dense float32/float16/bfloat16 nn.Linear "
            f"and Conv1D weights; for NF4 layers use lowrank.merge_and_unload, which dequantizes and merges)")
    if nn.utils.parametrize.is_parametrized(base, "weight"):
        raise NotImplementedError(
            f"layer {path}: its weight is parametrized (torch.nn.utils.parametrize: computed from "
            f"{type(base.parametrizations.weight).__name__} on every access), so there is no stored weight to "
            f"merge into; keep the adapter unmerged, or parametrize.remove_parametrizations first")
    if has_own_forward(base):
        raise NotImplementedError(
            f"layer {path}: its base layer, a {type(base).__name__}, has a forward of its own: the adapter adds "
            f"s B A x to that forward's output, which no merged weight reproduces; keep the adapter unmerged")
    name = name or layer.active_adapter
    if name is None or name not in layer.configs:
        raise ValueError(f"layer {path}: no adapter {name!r} (has {sorted(layer.configs)})")
    _refuse_meta(path, layer, name)
    w_, a, b = _merge_operands(layer, name)
    check_merge_args(w_, a, b, layer.scaling(name), f"{what}: layer {path}")
    if name not in layer.lora_magnitude_vector:
        # before any layer is written: an overflow in a later layer would otherwise stop a merge
        # midway (merge_and_unload and merge(exact=False) cannot take an inexact merge back)
        check_no_overflow(w_, a, b, layer.scaling(name), f"{what}: layer {path}")
    return name


def _merge_plan(layers: list, adapter_name: str | None, what: str) -> list:
    """[(path, layer, name)]: the layers that hold the adapter to merge (`adapter_name`, or each
    layer's active one) with its name. A layer without it is left as it is, as in peft (an adapter
    on q_proj only merges into q_proj). ValueError when no layer holds it."""
    plan = [(path, layer, adapter_name or layer.active_adapter) for path, layer in layers]
    plan = [(path, layer, name) for path, layer, name in plan if name is not None and name in layer.configs]
    if not plan:
        names = sorted({n for _, layer in layers for n in layer.configs})
        if adapter_name is None:
            raise ValueError(f"{what}: no adapter is active on the model (adapters: {names}); pass adapter_name= "
                             f"or lowrank.set_adapter first")
        raise ValueError(f"{what}: no adapter {adapter_name!r} on the model (adapters: {names})")
    return plan


def _refuse_meta(path: str, layer: LoRALinear, name: str) -> None:
    tensors = {"weight": layer.base_layer.weight, "lora_A": layer.lora_A[name], "lora_B": layer.lora_B[name]}
    if name in layer.lora_magnitude_vector:
        tensors["lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
    meta = [k for k, t in tensors.items() if t.device.type == "meta"]
    if meta:
        raise ValueError(f"layer {path}: {', '.join(meta)} on the meta device (shapes without values): load real "
                         f"weights (e.g. model.to_empty() and a state dict) before merging")


def _targets(model: nn.Module, what: str):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects a torch.nn.Module, got {type(model).__name__}")
    refuse_inside_blocks(model, what)
    if isinstance(model, LoRALinear):
        return [("", model)]
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA layer (lowrank.patch_linear adds them)")
    return layers


def _check_not_shared(model: nn.Module, dense: list, what: str) -> None:
    """ValueError when a weight to be merged in place is also held by another module of `model`
    (tied input/output embeddings, two layers given one Parameter): merging would change that
    module too, or apply the delta twice. `dense`: (path, LoRALinear) pairs."""
    owners: dict[tuple, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None or t.numel() == 0 or t.device.type == "meta":
                continue
            key = (t.device, t.untyped_storage().data_ptr())
            owners.setdefault(key, []).append((f"{path}.{pname}" if path else pname, module))
    for path, layer in dense:
        w = layer.base_layer.weight
        if w.device.type == "meta":
            continue
        others = [name for name, m in owners.get((w.device, w.untyped_storage().data_ptr()), [])
                  if m is not layer.base_layer]
        if others:
            raise ValueError(f"{what}: layer {path}'s weight shares its storage with {others[0]}"
                             f"{f' (and {len(others) - 1} more)' if len(others) > 1 else ''} (tied or shared "
                             f"weights): merging in place would change {others[0]} too, or apply a delta twice. "
                             f"Keep the adapter unmerged, or untie the weights first (give one of them a clone)")


_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 (2^64 / golden ratio) as a signed int64
_FINGERPRINT_BYTES = {"cpu": 1 << 23, "cuda": 1 << 21}  # bytes of t per block: the CUDA path's int64
# temporaries are 24x that (three of them, 8 bytes per byte of t): 48 MiB


@torch.no_grad()
def fingerprint(t: torch.Tensor) -> tuple:
    """A hash of t's bits that sees any change of any element, including edits through `.data`,
    which version counters do not (NaN payloads and the sign of zero included). CPU: CRC-32 of each
    block of rows, in threads (zlib releases the GIL; about half the time of the merge itself).
    CUDA (or without numpy): sum_i (byte_i + 1) * (i * _MIX + 1) mod 2^64 on the device, one sync."""
    t = t.detach()
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    block_bytes = _FINGERPRINT_BYTES["cpu" if t.device.type == "cpu" else "cuda"]
    step = max(1, block_bytes // max(rows.shape[1] * t.element_size(), 1))
    blocks = [rows[i:i + step] for i in range(0, rows.shape[0], step)]
    if t.device.type == "cpu":
        try:  # .numpy() is a zero-copy view; it needs numpy, which torch does not require
            return tuple(_pool().map(lambda blk: zlib.crc32(blk.contiguous().view(torch.uint8).numpy()), blocks))
        except (ImportError, RuntimeError):
            pass
    acc, start = torch.zeros((), dtype=torch.int64, device=t.device), 0
    for blk in blocks:
        part = blk.contiguous().view(torch.uint8).reshape(-1).long() + 1
        idx = torch.arange(start, start + part.numel(), dtype=torch.int64, device=t.device)
        acc += (part * (idx * _MIX + 1)).sum()  # int64 arithmetic wraps: mod 2^64
        start += part.numel()
    return (int(acc),)


_POOL: list = []


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lowrank-fingerprint"))
    return _POOL[0]


def _fingerprints(layer: LoRALinear, name: str, w: torch.Tensor) -> tuple:
    return (fingerprint(w), *(fingerprint(p) for p in layer.adapter_parameters(name)))


def _versions(layer: LoRALinear, name: str, w: torch.Tensor) -> tuple:
    return (w._version, *(p._version for p in layer.adapter_parameters(name)))


@torch.no_grad()
def _merge_layer(layer: LoRALinear, name: str, exact: bool) -> None:
    w, a, b = _merge_operands(layer, name)
    scaling = layer.scaling(name)
    dora_scale = None
    if name in layer.lora_magnitude_vector:  # W <- round(m / ||W + s B A|| (W + s B A)), lowrank.ops.dora_merge
        dora_scale, rec_idx, rec_val = dora_merge_(layer.base_weight_nk(), layer.lora_A[name], layer.lora_B[name],
                                                   layer.lora_magnitude_vector[name], scaling, exact)
    else:
        rec_idx, rec_val = torch.ops.lowrank.merge_(w, a, b, scaling, exact)
    state = MergeState.pack(name, scaling, exact, rec_idx, rec_val, w.numel(), _versions(layer, name, w),
                            _fingerprints(layer, name, w))
    state.dora_scale = dora_scale
    state.fast_unmerge = fast_unmerge_key(w, a) if exact and dora_scale is None else None
    layer.merged = state


def _check_unmergeable(path: str, layer: LoRALinear) -> None:
    """ValueError unless the layer's weight, factors and scaling are what the merge left. Version
    counters first (free), then the bits themselves: an edit through `.data` leaves the counters
    alone, and unmerging over it would give back neither the original weight nor the edit."""
    state: MergeState = layer.merged
    w, _, _ = _merge_operands(layer, state.adapter)
    now = _versions(layer, state.adapter, w)
    if (now != state.versions or layer.scaling(state.adapter) != state.scaling
            or _fingerprints(layer, state.adapter, w) != state.fingerprints):
        raise ValueError(f"layer {path}: the weight, lora_A, lora_B, magnitude or scaling of adapter "
                         f"{state.adapter!r} changed since it was merged; unmerging would not give the original "
                         f"weight back")


@torch.no_grad()
def _unmerge_layer(path: str, layer: LoRALinear, checked: bool = False) -> None:
    state: MergeState = layer.merged
    if not checked:
        _check_unmergeable(path, layer)
    w, a, b = _merge_operands(layer, state.adapter)
    if state.dora_scale is not None:
        rec = state.unpack() if state.exact else (None, None)
        dora_unmerge_(layer.base_weight_nk(), layer.lora_A[state.adapter], layer.lora_B[state.adapter],
                      state.scaling, state.dora_scale, *rec)
    elif state.exact:
        # The record is plain attributes, not buffers: a merged layer moved with .to() / .cuda()
        # leaves it behind. It follows the weight here (the version check above has already
        # refused a .to(dtype), which rewrites the weight).
        rec_idx, rec_val = state.unpack()
        # fast: the CPU library's uncertified round trip, exact with its own record made under the
        # same key (ignored on another device, where the certified unmerge is exact with it too:
        # lowrank.ops.merge); under another key (a guard: ops.merge.fast_unmerge_key), the
        # certified unmerge
        fast = state.fast_unmerge is not None and state.fast_unmerge == fast_unmerge_key(w, a)
        torch.ops.lowrank.unmerge_(w, a, b, state.scaling, rec_idx.to(w.device), rec_val.to(w.device), fast)
    else:
        torch.ops.lowrank.unmerge_(w, a, b, state.scaling)
    layer.merged = None


def merge(model: nn.Module, adapter_name: str | None = None, exact: bool = True) -> nn.Module:
    """Merge an adapter (default: each layer's active one) into the weight of every LoRA layer that
    holds it, in place; layers without it are left as they are (peft's rule).

    Merged layers compute base_layer(x) only. exact=True keeps the record that makes `unmerge`
    bit-exact (see `record_fraction`); exact=False skips it (unmerge then only rounds back).
    Everything is checked before any weight is written; a failure midway unmerges what was done.
    Raises ValueError if a layer is already merged or no layer holds the adapter,
    NotImplementedError for non-dense weights."""
    layers = _targets(model, "merge")
    for path, layer in layers:
        if getattr(layer, "merged", None):
            raise ValueError(f"layer {path or type(layer).__name__} is already merged "
                             f"(adapter {layer.merged.adapter!r}); unmerge it first")
    plan = _merge_plan(layers, adapter_name, "merge")
    for path, layer, name in plan:
        _check_layer(path, layer, name)
    _check_not_shared(model, [(path, layer) for path, layer, _ in plan], "merge")
    done = []
    try:
        for path, layer, name in plan:
            _merge_layer(layer, name, exact)
            done.append((path, layer))
    except BaseException:
        for path, layer in reversed(done):
            if layer.merged.exact:
                _unmerge_layer(path, layer)
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` in every merged LoRA layer, in place: bit-exact for layers merged with
    exact=True. Raises ValueError, changing nothing, if no LoRA layer is merged, or if any merged
    layer's weight, factors or scaling changed since the merge (compared bit for bit, not by
    version counters)."""
    layers = [(path, layer) for path, layer in _targets(model, "unmerge") if getattr(layer, "merged", None)]
    if not layers:
        raise ValueError("unmerge: the model's LoRA layers are not merged")
    for path, layer in layers:  # every layer checked before the first is written
        _check_unmergeable(path or type(layer).__name__, layer)
    for path, layer in layers:
        _unmerge_layer(path, layer, checked=True)
    return model


def merge_and_unload(model: nn.Module, adapter_name: str | None = None, requantize: bool | None = None,
                     return_report: bool = False):
    """Merge (without a record) and put plain layers back: returns `model` with no LoRA module left
    and the original requires_grad flags (as lowrank.unpatch). A modules_to_save wrapper gives way to
    the merged adapter's trained copy (as in peft), or to the original module where it has none.

    Dense layers get their merged nn.Linear / Conv1D back; a layer without the adapter (merged:
    `adapter_name`, or each layer's active one) gets its base layer back as it was (an NF4 one stays
    quantized), as in peft. NF4 (QLoRA) layers are dequantized to
    a dense dtype and merged there with one rounding (the recipe the QLoRA authors recommend:
    merging into 4-bit codes would lose most of the delta), becoming dense nn.Linear layers in the
    dtype the rest of the model is in (most of its other parameters by element count: fp32 after
    prepare_for_qlora_training upcast them; without any, the dtype of the weight that was
    quantized, `NF4Weight.dtype`, which bitsandbytes records too), so the merged model runs
    without casts; with
    `requantize=True` the merged weight is quantized back to an NF4Linear with the same blocksize
    and double quantization (a bitsandbytes Linear4bit where it was adopted from one). The default,
    None, is False except on a model transformers loaded in 4-bit whose other 4-bit layers stay
    (the adapter not on every quantized layer): there dense merged layers beside them, under the
    model's 4-bit quantization_config, would save a checkpoint that loads but fails in its first
    forward, so the merged layers stay 4-bit, as peft's merge keeps them; requantize=False there
    merges dense all the same, with a UserWarning. `return_report=True` returns `(model, report)` where report maps each
    NF4 layer's path to the error requantizing added, relative to the merged dense weight:
    {"rel_fro_error": |deq(q(W')) - W'|_F / |W'|_F, "max_abs_error": ...} (empty without NF4
    layers or without requantize)."""
    if isinstance(model, LoRALinear):
        raise TypeError("merge_and_unload the model that contains the LoRALinear, not the layer itself")
    layers = _targets(model, "merge_and_unload")
    dense, quantized = [], []
    for path, layer in layers:
        if getattr(layer, "merged", None):
            raise ValueError(f"layer {path} is merged already; unmerge it first (or call merge_and_unload "
                             f"on an unmerged model)")
    for path, layer, name in _merge_plan(layers, adapter_name, "merge_and_unload"):  # the others: unwrapped only
        if isinstance(layer.base_layer, NF4Linear):
            a, b = layer.lora_A[name], layer.lora_B[name]
            if a.device.type == "meta" or b.device.type == "meta" or layer.base_layer.nf4.device.type == "meta":
                raise ValueError(f"merge_and_unload: layer {path} is on the meta device (shapes without values)")
            if not all(bool(torch.isfinite(t).all()) for t in layer.adapter_parameters(name)):
                raise ValueError(f"merge_and_unload: layer {path}: lora_A / lora_B / magnitude contain NaN or Inf")
            quantized.append((path, layer, name))
        else:
            dense.append((path, layer, _check_layer(path, layer, name, "merge_and_unload")))
    _check_not_shared(model, [(path, layer) for path, layer, _ in dense], "merge_and_unload")
    if quantized and getattr(model, "hf_quantizer", None) is not None:
        merging = {id(layer.base_layer) for _, layer, _ in quantized}
        left = [p for p, m in model.named_modules() if _is_4bit(m) and id(m) not in merging]
        if requantize is None:
            requantize = bool(left)
        elif left and not requantize:
            warnings.warn(f"merge_and_unload: requantize=False makes {len(quantized)} merged layer(s) dense beside "
                          f"{len(left)} 4-bit layer(s) the adapter does not cover (e.g. {left[0]}) in a model "
                          f"transformers loaded in 4-bit: it runs, but its save_pretrained checkpoint would load and "
                          f"then fail; leave requantize at its default to save it (the merged layers stay 4-bit, as "
                          f"in peft), or write dense files with `lowrank merge`", UserWarning, stacklevel=2)
    requantize = bool(requantize)
    # NF4 layers first: they are built aside (nothing changes in place), so a failure there (out
    # of memory) leaves the model untouched. An overflow was refused above, for every layer, before
    # any write (_check_layer). Dense layers keep their `merged` flag until all are done: should
    # one still fail (out of memory), the ones before it are merged (without a record) and flagged
    # so, and their forward skips the LoRA path: outputs stay right, never W + 2 s B A.
    report, new_bases = {}, []
    rest = _unquantized_dtype(model) if quantized else None
    for path, layer, name in quantized:
        # the dtype the rest of the model is in (prepare_for_qlora_training: fp32), else the quantized one
        base, report_row = _merged_nf4(layer, name, requantize, rest)
        new_bases.append((layer, original_base(base)))  # (a bitsandbytes Linear4bit again, if adopted)
        if report_row is not None:
            report[path] = report_row
    # What replaces the other layers (a bitsandbytes Linear4bit rebuilt for an adopted one) is built
    # before any dense merge too: a failure there (out of memory) also leaves the model as it was.
    merged_nf4 = {id(layer) for _, layer, _ in quantized}
    originals = {id(layer): base for layer, base in
                 original_bases([(path, layer) for path, layer in layers if id(layer) not in merged_nf4])}
    for path, layer, name in dense:
        _merge_layer(layer, name, exact=False)
    for layer, base in new_bases:
        layer.base_layer = base
    for path, layer, name in dense:
        layer.merged = None  # the wrapper is discarded next; its base layer keeps the merged weight
    # modules_to_save: the merged adapter's trained copy takes the original's place (peft's choice)
    restore_modules(model, layers, keep_copy=adapter_name or active_adapter(model),
                    bases=[(layer, originals.get(id(layer), layer.base_layer)) for _, layer in layers])
    _drop_quantization_marks(model)
    return (model, report) if return_report else model


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear) or is_bnb_linear4bit(module)


def _drop_quantization_marks(model: nn.Module) -> None:
    """A model transformers loaded in 4-bit whose every quantized layer merge_and_unload made dense is
    no longer quantized: its quantizer and quantization_config go (transformers' own
    remove_quantization_config, as its dequantize() does), else save_pretrained wrote a dense model
    under a 4-bit config that from_pretrained could not load."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or any(_is_4bit(m) for m in model.modules()):
        return
    quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)


@torch.no_grad()
def merged_weight(layer: LoRALinear, name: str | None = None) -> torch.Tensor:
    """The layer's weight with adapter `name` (default: its active one) merged, out of place, with
    one rounding, in the layout the base stores it (an NF4 base: decoded to the dtype that was
    quantized, (out, in)). The layer is not changed."""
    name = name or layer.active_adapter
    if name not in layer.configs:
        raise ValueError(f"merged_weight: no adapter {name!r} on the layer (has {sorted(layer.configs)})")
    if isinstance(layer.base_layer, NF4Linear):
        return _merged_nf4(layer, name, requantize=False)[0].weight.detach()
    w, a, b = _merge_operands(layer, name)
    out = w.clone()
    torch.ops.lowrank.merge_(out, a, b, layer.scaling(name), False)
    return out


@torch.no_grad()
def dense_weight(layer: LoRALinear, name: str | None = None) -> torch.Tensor:
    """What a plain model holds in this layer's place: `merged_weight(layer, name)` where the layer
    has adapter `name` (default: its active one), else its base weight as it is (an NF4 base decoded
    as merged_weight decodes it). The layer is not changed."""
    name = name or layer.active_adapter
    if name is not None and name in layer.configs:
        return merged_weight(layer, name)
    base = layer.base_layer
    if isinstance(base, NF4Linear):
        return base.dequantize(_nf4_dense_dtype(base)).contiguous()
    return base.weight.detach()


def _nf4_dense_dtype(base: NF4Linear) -> torch.dtype:
    """The dtype an NF4 base is decoded to for merging: the one that was quantized, where the merge
    supports it, else the compute dtype."""
    return base.nf4.dtype if base.nf4.dtype in KERNEL_DTYPES else base.compute_dtype


def _unquantized_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype most of `model`'s parameters outside its LoRA layers are in (by element
    count: the embeddings, norms, head), or None without any: after prepare_for_qlora_training
    upcast them to fp32 the layers around a merged NF4 layer feed it fp32, whatever dtype was
    quantized."""
    inside = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in m.parameters()}
    count: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if id(p) not in inside and p.dtype.is_floating_point and p.device.type != "meta":
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else None


@torch.no_grad()
def _merged_nf4(layer: LoRALinear, name: str, requantize: bool, dtype: torch.dtype | None = None):
    """(new base layer, requantization error or None) for an NF4 LoRA layer, merged in `dtype`
    (default: `_nf4_dense_dtype`)."""
    base: NF4Linear = layer.base_layer
    w = base.dequantize(dtype if dtype in KERNEL_DTYPES else _nf4_dense_dtype(base)).contiguous()  # (out, in)
    a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    if name in layer.lora_magnitude_vector:  # DoRA: the norms of this dequantized weight, one rounding
        dora_merge_(w, a, b, layer.lora_magnitude_vector[name].detach(), layer.scaling(name), exact=False)
    else:
        torch.ops.lowrank.merge_(w, a, b, layer.scaling(name), False)  # factors in their own dtype (fp32)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().to(w.dtype), requires_grad=False)
    if not requantize:
        return linear, None
    q = NF4Linear.from_linear(linear, compute_dtype=base.compute_dtype, blocksize=base.nf4.blocksize,
                              double_quant=base.nf4.double_quant)
    err = (q.dequantize(torch.float32) - w.float())
    row = {"rel_fro_error": (err.norm() / w.float().norm().clamp_min(1e-30)).item(),
           "max_abs_error": err.abs().max().item()}
    if base.bias is not None:
        q.bias = base.bias  # keep the original (frozen) bias parameter and dtype
    for key in ("bnb_class", "bnb_compute_dtype"):  # adopted from bitsandbytes: goes back as its Linear4bit
        if key in base.__dict__:
            q.__dict__[key] = base.__dict__[key]
    return q, row
