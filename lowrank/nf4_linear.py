"""NF4Linear: a frozen linear layer whose weight is stored in 4 bits (bitsandbytes' NF4 format).

Level 3: imports levels 0-2.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .dtypes import check_dtype
from .layer_types import is_conv1d
from .nf4_format import NF4Weight, quantize_nf4
from .ops.nf4_dequant import nf4_dequantize
from .ops.dora import nf4_dora_linear
from .ops.nf4_lora_matmul import nf4_lora_linear


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
        check_dtype(compute_dtype, "NF4Linear", "compute_dtype")
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
        # Whether the dense layer this came from stored its weight (in, out) (GPT-2's Conv1D): a
        # dense weight written back for that architecture (a merged save) must be transposed again.
        self.from_conv1d = False

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                    double_quant: bool = True) -> "NF4Linear":
        """Quantize an nn.Linear (or transformers Conv1D, weight stored (in, out)); the bias is shared."""
        w = linear.weight.detach()
        if is_conv1d(linear):
            w = w.t()
        nf4 = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        layer = cls(nf4, linear.bias, compute_dtype)
        layer.from_conv1d = is_conv1d(linear)
        return layer

    @classmethod
    def from_bnb(cls, layer: nn.Module, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Adopt a quantized bitsandbytes Linear4bit (nf4) as it is: its storage is shared, not copied."""
        nf4 = NF4Weight.from_bnb(layer)
        dtype = compute_dtype or getattr(layer, "compute_dtype", None) or torch.bfloat16
        new = cls(nf4, layer.bias, dtype)
        new.bnb_class = type(layer)  # what `to_bnb` (lowrank.unpatch) rebuilds
        new.bnb_compute_dtype = getattr(layer, "compute_dtype", None)
        return new

    def to_bnb(self) -> nn.Module:
        """The bitsandbytes Linear4bit this layer was adopted from (`from_bnb`; lowrank.unpatch puts
        it back), rebuilt from the same codes and statistics through bitsandbytes' own state-dict
        loading: its forward is the original's, and peft and transformers see their layer again."""
        cls = self.__dict__.get("bnb_class")
        if cls is None:
            raise ValueError("NF4Linear.to_bnb: this layer was quantized by lowrank, not adopted from bitsandbytes")
        from bitsandbytes.nn import Params4bit  # optional: only a layer adopted from it goes back to it

        stats = self.nf4.to_bnb_state_dict("")  # bitsandbytes' own keys: "weight", "weight.absmax", ...
        packed = stats.pop("weight")
        layer = cls(self.in_features, self.out_features, bias=False,
                    compute_dtype=self.__dict__.get("bnb_compute_dtype"), quant_type="nf4", device="meta")
        layer.weight = Params4bit.from_prequantized(packed, stats, requires_grad=False, device=packed.device,
                                                    module=layer)
        layer.bias = self.bias  # the same Parameter (or None)
        return layer

    # -- nn.Linear-like surface ------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.nf4.packed

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in dtype (default: compute_dtype)."""
        return nf4_dequantize(self.nf4, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The QLoRA op with a rank-0 adapter: F.linear over a dequantized W would keep that dense
        # W alive for backward whenever x needs a gradient (adapters disabled, checkpointing).
        xc = x.to(self.compute_dtype)
        no_a = xc.new_empty((0, self.in_features))
        no_b = xc.new_empty((self.out_features, 0))
        return nf4_lora_linear(xc, self.nf4, no_a, no_b, 0.0, self.bias).to(x.dtype)

    def lora_forward(self, x: torch.Tensor, lora_A, lora_B, scaling: float, dropout: float) -> torch.Tensor:
        """The fused QLoRA path LoRALinear takes (`lowrank.ops.nf4_lora_linear`), in compute_dtype."""
        y = nf4_lora_linear(x.to(self.compute_dtype), self.nf4, lora_A, lora_B, scaling, self.bias, dropout)
        return y.to(x.dtype)

    def dora_forward(self, x: torch.Tensor, lora_A, lora_B, magnitude, scaling: float, dropout: float,
                     weight_sq: torch.Tensor | None = None) -> torch.Tensor:
        """DoRA over this 4-bit weight (`lowrank.ops.dora.nf4_dora_linear`), in compute_dtype."""
        y = nf4_dora_linear(x.to(self.compute_dtype), self.nf4, lora_A, lora_B, magnitude, scaling, self.bias,
                            dropout, weight_sq)
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
