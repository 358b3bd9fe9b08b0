"""QLoRA on a model: quantizing its targeted layers to NF4 one at a time, adopting bitsandbytes
Linear4bit layers, and preparing a quantized model for training.

`lowrank.patch_linear(model, quantize="nf4")` calls `quantize_targets` before wrapping the layers
in LoRALinear; LoRALinear routes an NF4Linear base through `lowrank.ops.nf4_lora_linear`.

Level 4: imports levels 0-3.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .dtypes import check_dtype
from .layer_types import is_bnb_linear4bit, is_conv1d, is_dense_linear, module_references, replace_module
from .lora_linear import LoRALinear
from .nf4_format import BLOCKSIZES, check_quantizable
from .nf4_linear import NF4Linear

QUANTIZE_CHOICES = (None, "nf4")


def check_quantize_args(quantize, compute_dtype, blocksize, double_quant) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if compute_dtype is not None:
        check_dtype(compute_dtype, "patch_linear", "compute_dtype")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")


def quantize_targets(model: nn.Module, chosen: list, quantize, compute_dtype, blocksize: int,
                     double_quant: bool) -> list:
    """Swap each chosen layer for an NF4Linear, one at a time, and return the new `chosen` list.

    - bitsandbytes Linear4bit (nf4) layers are adopted as they are (no re-quantization), with or
      without `quantize`; fp4 ones raise.
    - With quantize="nf4", dense nn.Linear / Conv1D layers are quantized; each dense weight is
      released right after its layer is swapped (its storage emptied unless another module of the
      model shares it), so the peak stays near one layer's dense weight beyond the result.
    Every check (arguments, NaN/Inf in any weight, fp4) runs before the first swap: on error the
    model is unchanged.
    """
    check_quantize_args(quantize, compute_dtype, blocksize, double_quant)
    plan = []
    for path, module, parent, attr in chosen:
        if isinstance(module, LoRALinear):
            base = module.base_layer
            if quantize == "nf4" and not isinstance(base, NF4Linear) and _is_dense(base):
                # an earlier dense patch: quantize its base layer in place, keep its adapters
                if getattr(module, "merged", False):
                    raise ValueError(f"layer {path} is merged; unmerge it before quantizing its base weight")
                _check_weight(path, base, blocksize, double_quant)
                plan.append((path, module, parent, attr, "quantize-base"))
            else:
                plan.append((path, module, parent, attr, None))
        elif is_bnb_linear4bit(module):
            qs = getattr(module.weight, "quant_state", None)
            if qs is None or qs.quant_type != "nf4":
                kind = "not quantized yet (move it to a device first)" if qs is None else f"{qs.quant_type!r}"
                raise ValueError(f"layer {path}: bitsandbytes Linear4bit is {kind}; only quantized nf4 layers "
                                 f"can be adopted")
            plan.append((path, module, parent, attr, "adopt"))
        elif quantize == "nf4" and not isinstance(module, NF4Linear) and _is_dense(module):
            _check_weight(path, module, blocksize, double_quant)
            plan.append((path, module, parent, attr, "quantize"))
        else:
            plan.append((path, module, parent, attr, None))
    if not any(action for *_, action in plan):
        return chosen
    out, done, converted = [], [], {}
    refs = module_references(model)  # a module under several paths is swapped under all of them, once
    try:
        for path, module, parent, attr, action in plan:
            if action is None:
                out.append((path, module, parent, attr))
                continue
            if id(module) in converted:
                out.append((path, converted[id(module)], parent, attr))
                continue
            if action == "quantize-base":
                old = module.base_layer
                module.base_layer = NF4Linear.from_linear(old, compute_dtype or torch.bfloat16, blocksize, double_quant)
                module.fan_in_fan_out = False  # NF4Linear stores (out, in) whatever the dense layout was
                _release(model, old.weight)
                converted[id(module)] = module
                out.append((path, module, parent, attr))
            else:
                if action == "adopt":  # bitsandbytes' own compute dtype unless the caller names one
                    new = NF4Linear.from_bnb(module, compute_dtype)
                else:
                    new = NF4Linear.from_linear(module, compute_dtype or torch.bfloat16, blocksize, double_quant)
                replace_module(refs, module, new)
                if action == "quantize":
                    _release(model, module.weight)
                converted[id(module)] = new
                out.append((path, new, parent, attr))
            done.append(path)
    except BaseException as exc:  # out of memory, an interrupt: every check passed before the first swap
        if done:
            _say_state(exc, plan, done)
        raise
    return out


def _say_state(exc: BaseException, plan: list, done: list) -> None:
    """Attach to `exc` the state a half-done quantization leaves (dense weights already freed cannot
    be brought back exactly)."""
    rest = [p for p, *_, action in plan if action and p not in done]
    note = (f"lowrank: quantizing stopped after {len(done)} of {len(done) + len(rest)} layers: "
            f"{', '.join(done[:4])}{' ...' if len(done) > 4 else ''} are NF4Linear now (their dense weights freed "
            f"unless shared); {', '.join(rest[:4])}{' ...' if len(rest) > 4 else ''} are unchanged; no adapter "
            f"was added. Call patch_linear(..., quantize='nf4') again to finish.")
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def _check_weight(path: str, module: nn.Module, blocksize: int, double_quant: bool) -> None:
    """Everything that could make quantizing this layer fail, checked before any layer is swapped."""
    if module.weight.device.type == "meta":
        raise ValueError(f"layer {path}: weight is on the meta device; load real weights before quantizing")
    w = module.weight.detach()
    check_quantizable(w.t() if is_conv1d(module) else w, blocksize, double_quant, f"quantize layer {path}")


def _is_dense(module: nn.Module) -> bool:
    return is_dense_linear(module) and getattr(module, "weight", None) is not None and module.weight.is_floating_point()


def _release(model: nn.Module, weight: nn.Parameter) -> None:
    """Free a quantized layer's dense weight now, even if something outside still refers to the
    old module, unless the model still uses the same tensor (tied weights)."""
    if any(p is weight for p in model.parameters()):
        return
    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)


def quantized_layers(model: nn.Module):
    """(path, NF4Linear) for every NF4 layer in the model (inside LoRALinear wrappers too)."""
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            yield name, module


def prepare_for_qlora_training(model: nn.Module, gradient_checkpointing: bool = True,
                               gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Get a quantized model ready for training, as peft's `prepare_model_for_kbit_training` does.

    - Every parameter that is not a LoRA parameter is frozen.
    - Every fp16/bf16 parameter left (what is not stored in 4 bits: norms, embeddings, the output
      head, the bias of NF4 layers) is upcast to fp32, as peft does: the norms' statistics are the
      numerically fragile part of a low-precision forward, and the layers after an fp32 norm must
      accept its fp32 output (NF4 layers cast their input to compute_dtype themselves).
    - With gradient_checkpointing: the input embeddings' output requires grad (reentrant
      checkpointing drops the graph of a segment whose inputs do not require grad, and with frozen
      embeddings they would not), and the model's `gradient_checkpointing_enable` is called when
      it has one (transformers).
    Call it before or after `patch_linear(..., quantize="nf4")`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_for_qlora_training expects a torch.nn.Module, got {type(model).__name__}")
    lora = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
            for n in m.configs for p in m.adapter_parameters(n)}
    for p in model.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if gradient_checkpointing:
        enable = getattr(model, "enable_input_require_grads", None)
        if callable(enable):
            enable()
        else:
            get = getattr(model, "get_input_embeddings", None)
            emb = get() if callable(get) else None
            if emb is None:
                raise ValueError("gradient_checkpointing=True needs a model with get_input_embeddings() or "
                                 "enable_input_require_grads()")
            emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        gc = getattr(model, "gradient_checkpointing_enable", None)
        if callable(gc):
            gc(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    return model
