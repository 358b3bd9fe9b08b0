"""lowrank: a from-scratch LoRA / QLoRA kernel engine for PyTorch.

    import lowrank
    lowrank.patch_linear(model, rank=16)      # LoRA on every linear layer but the head
    trainable, total = lowrank.trainable_parameters(model)
    lowrank.unpatch(model)                    # the original modules, exactly

Importing lowrank never fails for a missing Triton, GPU or native library: the affected ops fall
back to the pure-torch reference path with one warning.
"""
from .config import LoRAConfig
from .layers import LoRALinear
from .nf4 import NF4Weight, quantize_nf4
from .qlora import NF4Linear, prepare_for_qlora_training
from .patch import lora_layers, patch_linear, select_targets, trainable_parameters, unpatch

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "NF4Linear",
    "NF4Weight",
    "lora_layers",
    "patch_linear",
    "prepare_for_qlora_training",
    "quantize_nf4",
    "select_targets",
    "trainable_parameters",
    "unpatch",
    "__version__",
]
