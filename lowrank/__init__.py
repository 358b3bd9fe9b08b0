"""lowrank: a from-scratch LoRA / QLoRA kernel engine for PyTorch.

    import lowrank
    lowrank.patch_linear(model, rank=16)      # LoRA on every linear layer but the head
    trainable, total = lowrank.trainable_parameters(model)
    lowrank.unpatch(model)                    # the original modules, exactly

Importing lowrank never fails for a missing Triton, GPU or native library: the affected ops fall
back to the pure-torch reference path with one warning.

Level 5 (the entry): the package is layered, every import pointing down (README, "Layout").
"""
from . import ops  # noqa: F401  (lowrank.ops: the public ops)
from .adapter_files import load_adapter, save_adapter
from .adapters import (add_adapter, adapter_ids, adapter_names, delete_adapter, disable_adapters,
                       set_adapter)
from .config import LoRAConfig
from .lora_linear import LoRALinear
from .merge import merge, merge_and_unload, unmerge
from .modules_to_save import ModulesToSave
from .trainable_tokens import TrainableTokens
from .nf4_format import NF4Weight, quantize_nf4
from .nf4_linear import NF4Linear
from .patch import lora_layers, patch_linear, select_targets, trainable_parameters, unpatch
from .hf import Trainer, save_pretrained, trainer_class
from .qlora import prepare_for_qlora_training
from .summary import ModelSummary, summary

__version__ = "0.1.0"

__all__ = [
    "ModelSummary",
    "Trainer",
    "TrainableTokens",
    "ModulesToSave",
    "LoRAConfig",
    "LoRALinear",
    "NF4Linear",
    "NF4Weight",
    "adapter_ids",
    "adapter_names",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "patch_linear",
    "prepare_for_qlora_training",
    "quantize_nf4",
    "save_adapter",
    "save_pretrained",
    "select_targets",
    "summary",
    "set_adapter",
    "trainable_parameters",
    "trainer_class",
    "unmerge",
    "unpatch",
    "__version__",
]
