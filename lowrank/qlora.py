"""QLoRA's module layer: NF4Linear (a frozen 4-bit linear layer), quantizing a model's targeted
layers one at a time, adopting bitsandbytes Linear4bit layers, and preparing a model for training.

`lowrank.patch_linear(model, quantize="nf4")` calls `quantize_targets` before wrapping the layers
in LoRALinear; LoRALinear routes an NF4Linear base through `ops.nf4_lora_linear`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import nf4_op  # noqa: F401  (registers torch.ops.lowrank.nf4_lora_fwd / _bwd at import)
from .nf4 import BLOCKSIZES, NF4Weight, _check_finite, quantize_nf4
from .ops import KERNEL_DTYPES

QUANTIZE_CHOICES = (None, "nf4")
_COMPUTE_DTYPES = KERNEL_DTYPES


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit (and its LinearNF4/LinearFP4 subclasses), without importing bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


class NF4Linear(nn.Module):
    """y = x @ deq(W).T + bias with W stored as NF4 (bitsandbytes' format), frozen.

    The inputs are cast to `compute_dtype`, the output back to the input's dtype (as bitsandbytes'
    Linear4bit does). `weight` is the packed uint8 storage, like bitsandbytes' Params4bit, and the
    state dict has bitsandbytes' keys (`weight`, `weight.absmax`, ..., `bias`), so a
    Linear4bit checkpoint loads here and ours loads into Linear4bit
    (`Params4bit.from_prequantized`). Moving the module (`.to(device)`, `.cuda()`) moves the
    storage; dtype casts (`.half()`) leave the 4-bit storage and its fp32 statistics alone.
    """

    def __init__(self, nf4: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if compute_dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"NF4Linear: compute_dtype {compute_dtype} is not supported; "
                            f"use float32, float16 or bfloat16")
        nf4.validate()
        self.nf4 = nf4
        self.out_features, self.in_features = nf4.shape
        self.compute_dtype = compute_dtype
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"NF4Linear: bias must be ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False)
            bias.requires_grad_(False)
        self.bias = bias

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                    double_quant: bool = True) -> "NF4Linear":
        """Quantize an nn.Linear (or transformers Conv1D, weight stored (in, out)); the bias is shared."""
        from .layers import is_conv1d

        w = linear.weight.detach()
        if is_conv1d(linear):
            w = w.t()
        nf4 = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        return cls(nf4, linear.bias, compute_dtype)

    @classmethod
    def from_bnb(cls, layer: nn.Module, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Adopt a quantized bitsandbytes Linear4bit (nf4) as it is: its storage is shared, not copied."""
        nf4 = NF4Weight.from_bnb(layer)
        dtype = compute_dtype or getattr(layer, "compute_dtype", None) or torch.bfloat16
        return cls(nf4, layer.bias, dtype)

    # -- nn.Linear-like surface ------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.nf4.packed

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in dtype (default: compute_dtype)."""
        dtype = dtype or self.compute_dtype
        from .ops import backend_for

        if backend_for(self.nf4.packed) == "triton":
            from .kernels.nf4 import dequantize

            return dequantize(self.nf4, dtype)
        return self.nf4.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The QLoRA op with a rank-0 adapter: F.linear over a dequantized W would keep that dense
        # W alive for backward whenever x needs a gradient (adapters disabled, checkpointing).
        from . import ops

        xc = x.to(self.compute_dtype)
        no_a = xc.new_empty((0, self.in_features))
        no_b = xc.new_empty((self.out_features, 0))
        return ops.nf4_lora_linear(xc, self.nf4, no_a, no_b, 0.0, self.bias).to(x.dtype)

    def lora_forward(self, x: torch.Tensor, lora_A, lora_B, scaling: float, dropout: float) -> torch.Tensor:
        """The fused QLoRA path LoRALinear takes (ops.nf4_lora_linear), in compute_dtype."""
        from . import ops

        y = ops.nf4_lora_linear(x.to(self.compute_dtype), self.nf4, lora_A, lora_B, scaling, self.bias, dropout)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.nf4.blocksize}, double_quant={self.nf4.double_quant}, "
                f"compute_dtype={self.compute_dtype}")

    # -- device moves and state dicts ------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Probe where fn sends a tensor: follow device moves, ignore dtype casts (the storage is
        # the format, and the fp32 statistics must stay fp32).
        device = fn(torch.empty(0, device=self.nf4.device)).device
        if device != self.nf4.device:
            self.nf4 = self.nf4.to(device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        for k, v in self.nf4.to_bnb_state_dict(prefix).items():
            destination[k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = [k for k in state_dict if k.startswith(prefix + "weight")]
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
        else:
            try:
                nf4 = NF4Weight.from_bnb({k[len(prefix):]: state_dict[k] for k in ours})
            except (ValueError, KeyError) as exc:
                error_msgs.append(f"{prefix}weight: {exc}")
            else:
                if nf4.shape != self.nf4.shape:
                    error_msgs.append(f"{prefix}weight: shape {nf4.shape} does not match {self.nf4.shape}")
                else:
                    self.nf4 = nf4.to(self.nf4.device)
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def check_quantize_args(quantize, compute_dtype, blocksize, double_quant) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
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
    from .layers import LoRALinear

    check_quantize_args(quantize, compute_dtype, blocksize, double_quant)
    plan = []
    for path, module, parent, attr in chosen:
        if isinstance(module, LoRALinear):
            base = module.base_layer
            if quantize == "nf4" and not isinstance(base, NF4Linear) and _is_dense(base):
                # an earlier dense patch: quantize its base layer in place, keep its adapters
                if getattr(module, "merged", False):
                    raise ValueError(f"layer {path} is merged; unmerge it before quantizing its base weight")
                _check_weight(path, base)
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
            _check_weight(path, module)
            plan.append((path, module, parent, attr, "quantize"))
        else:
            plan.append((path, module, parent, attr, None))
    if not any(action for *_, action in plan):
        return chosen
    out = []
    for path, module, parent, attr, action in plan:
        if action is None:
            out.append((path, module, parent, attr))
            continue
        if action == "quantize-base":
            old = module.base_layer
            module.base_layer = NF4Linear.from_linear(old, compute_dtype, blocksize, double_quant)
            module.fan_in_fan_out = False  # NF4Linear stores (out, in) whatever the dense layout was
            _release(model, old.weight)
            out.append((path, module, parent, attr))
            continue
        if action == "adopt":
            new = NF4Linear.from_bnb(module, compute_dtype)
        else:
            new = NF4Linear.from_linear(module, compute_dtype, blocksize, double_quant)
        setattr(parent, attr, new)
        if action == "quantize":
            _release(model, module.weight)
        out.append((path, new, parent, attr))
    return out


def _check_weight(path: str, module: nn.Module) -> None:
    if module.weight.device.type == "meta":
        raise ValueError(f"layer {path}: weight is on the meta device; load real weights before quantizing")
    _check_finite(module.weight.detach(), f"quantize layer {path}")


def _is_dense(module: nn.Module) -> bool:
    from .layers import is_linear

    return is_linear(module) and getattr(module, "weight", None) is not None and module.weight.is_floating_point()


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
    from .layers import LoRALinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_for_qlora_training expects a torch.nn.Module, got {type(model).__name__}")
    lora = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
            for p in list(m.lora_A.values()) + list(m.lora_B.values())}
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
