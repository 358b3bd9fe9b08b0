"""`lowrank plan`: full fine-tuning, LoRA or QLoRA for a model, its GPUs and its data — exact
parameter counts, a memory breakdown per GPU, FLOPs and GPU-hours, and a recommendation whose
every reason carries the numbers it rests on.

Counts are not formulas: the model is built from its transformers config on the `meta` device (no
memory, no download) and patched with `patch_linear`, so trainable parameters per target are what
lowrank (and peft, which the tests check) would train. Memory is a model of what PyTorch holds;
each term is listed with the rule that gives it (`Plan.rules`) and the activation terms were
checked against `TensorMemory` measurements of Hugging Face's Llama on the CPU (fp32 and bf16,
full and LoRA): see tests/test_plan.py and the README.

Level 5 (jobs): imports levels 0-4.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from .nf4_format import nf4_nbytes
from .layer_types import is_embedding
from .patch import iter_linear, lora_layers, patch_linear, select_targets

GiB = 1 << 30
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
OBJECTIVES = ("instruction", "domain", "task")
PRECISIONS = ("bf16-mixed", "fp32")

# Architectures of common open models, from their published config.json files (only the fields
# that change the counts; everything else takes transformers' defaults).
# model_types whose layers keep what Hugging Face's Llama keeps (RMSNorm, q/k/v/o with GQA, a gated
# MLP): the activation model is theirs; others are estimated with it (an "architecture" assumption).
LLAMA_LAYOUT = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3"})

PRESETS: dict[str, tuple[str, dict]] = {
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   tie_word_embeddings=True)),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   tie_word_embeddings=True)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "llama-3-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama-2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False)),
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                     num_local_experts=8, num_experts_per_tok=2)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024)),
}


@dataclass(frozen=True)
class GPU:
    name: str
    mem_gib: float          # total memory as nvidia-smi reports it
    tflops: float           # dense bf16 tensor-core peak (fp32 accumulation), TFLOP/s
    mfu: float = 0.40       # assumed model-FLOPs utilisation of a well-tuned training step


GPUS = {g.name: g for g in (
    GPU("h200", 140.4, 989.4),
    GPU("h100-80gb", 79.6, 989.4),
    GPU("h100-pcie", 79.6, 756.5),
    GPU("a100-80gb", 80.0, 312.0),
    GPU("a100-40gb", 40.0, 312.0),
    GPU("l40s", 45.0, 362.1, 0.35),
    GPU("a10", 24.0, 125.0, 0.35),
    GPU("l4", 22.5, 121.0, 0.35),
    GPU("rtx4090", 24.0, 165.2, 0.35),
    GPU("rtx3090", 24.0, 71.0, 0.35),
)}

# Memory the training process cannot give to tensors: CUDA context and library workspaces, and the
# caching allocator's fragmentation.
RESERVED_GIB = 1.0
FRAGMENTATION = 0.05
# QLoRA does LoRA's FLOPs and also decodes every 4-bit weight twice per step (forward, dX): its
# throughput is taken as this fraction of LoRA's (an assumption until the GPU benchmarks measure it).
QLORA_THROUGHPUT = 0.8
# DoRA adds to LoRA's matmuls the row norms (float64, counted in the FLOPs) and a few passes over each
# adapted layer's (tokens, out) output (the scale, m's gradient). Its throughput is taken as this
# fraction of LoRA's: our DoRA layer's forward + backward took 1.04-1.14x our LoRA layer's in five
# CPU runs of bench_dora (4096 x 4096, 1024 tokens, r=16, fp32; 2026-12-02); not yet measured on a GPU.
DORA_THROUGHPUT = 0.92


class PlanError(ValueError):
    """A bad plan argument: the CLI prints its message on one line."""


# -- the model -----------------------------------------------------------------------------------

@dataclass
class Arch:
    name: str
    family: str            # "llama" (RMSNorm, gated MLP: Llama, Mistral, Qwen2, Mixtral, ...) or "gpt2"
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    experts: int = 0
    experts_per_token: int = 0


def load_config(model: str):
    """A transformers config from a preset name, a config.json file or a local model directory."""
    from transformers import AutoConfig  # optional: the planner reads transformers configs

    if model in PRESETS:
        model_type, kwargs = PRESETS[model]
        return AutoConfig.for_model(model_type, **kwargs)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise PlanError(f"--model {model}: the directory has no config.json")
        return AutoConfig.from_pretrained(model, local_files_only=True)
    if os.path.isfile(model):
        try:
            with open(model, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError:
            raise PlanError(f"--model {model}: not a text file (a weights file?); give a transformers config.json, "
                            f"the model's directory or a preset ({', '.join(PRESETS)})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"--model {model}: not a readable JSON config ({e})") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise PlanError(f"--model {model}: a transformers config.json needs a 'model_type' field")
        data = dict(data)
        try:
            return AutoConfig.for_model(data.pop("model_type"), **data)
        except ValueError as e:
            raise PlanError(f"--model {model}: {e}") from None
    raise PlanError(f"--model {model!r}: not a preset ({', '.join(PRESETS)}), a config.json file or a "
                    f"local model directory")


def arch_of(config, name: str) -> Arch:
    g = lambda *keys, default=None: next((getattr(config, k) for k in keys  # noqa: E731
                                         if getattr(config, k, None) is not None), default)
    hidden = g("hidden_size", "n_embd")
    heads = g("num_attention_heads", "n_head")
    if hidden is None or heads is None or g("num_hidden_layers", "n_layer") is None:
        raise PlanError(f"--model {name}: config {type(config).__name__} has no hidden size, heads or layers "
                        f"(a decoder-only language model is needed)")
    family = "gpt2" if config.model_type == "gpt2" else "llama"
    return Arch(
        name=name, family=family, model_type=config.model_type, layers=g("num_hidden_layers", "n_layer"),
        hidden=hidden, heads=heads, kv_heads=g("num_key_value_heads", default=heads),
        head_dim=g("head_dim", default=hidden // heads),
        intermediate=g("intermediate_size", "n_inner", default=4 * hidden), vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", True)),
        experts=g("num_local_experts", "num_experts", default=0) or 0,
        experts_per_token=g("num_experts_per_tok", default=0) or 0)


def meta_model(config) -> nn.Module:
    """The model built on the meta device: every parameter with its shape, no memory."""
    from transformers import AutoModelForCausalLM  # optional: the planner reads transformers configs

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            reason = str(e).split("\n")[0]
            raise PlanError(f"config {type(config).__name__}: not a causal language model "
                            f"({reason[:160]}{'...' if len(reason) > 160 else ''})") from None


def _unique_params(model: nn.Module):
    return list(model.parameters())  # parameters() yields a tied Parameter once


@dataclass
class Counts:
    total: int
    embedding: int              # input embeddings (and the output head when tied)
    lm_head: int                # untied output head
    linear: int                 # dense linear / Conv1D weights, output head excluded
    experts: int                # fused expert parameters (MoE), not nn.Linear
    other: int                  # norms, biases, position embeddings
    n_targets: int              # linear layers LoRA adapts
    lora: int                   # LoRA parameters (A and B) at the planned rank
    lora_per_target: dict       # name -> LoRA parameters
    targets_found: list         # target names, sorted
    quantized: int              # parameters of the layers QLoRA stores in NF4
    nf4_bytes: int              # their NF4 storage (codes, statistics, per-layer 256-entry map)
    matmul_per_token: int       # weight parameters one token multiplies with (experts: k of E)
    lora_matmul_per_token: int  # r * (in + out) summed over the adapted layers
    largest_layer: int          # parameters of the largest decoder layer (FSDP2's unsharded unit)
    largest_tensor: int         # elements of the largest parameter (full fine-tuning's largest trainable)
    largest_lora_tensor: int    # elements of the largest LoRA factor
    lora_qkv_first_layer: int = 0  # r * in_features summed over the first layer's adapted q, k, v
    trainable_roles: dict = field(default_factory=dict)  # LoRA: which inputs the adapted layers save
    dora: bool = False          # counted with DoRA adapters (lora includes the magnitude vectors)
    dora_rows: int = 0          # DoRA: output rows of the adapted layers (magnitude entries, cached norms)
    dora_in: int = 0            # DoRA: input features of the adapted layers, summed
    lora_rank: int = 0


_ROLES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "c_attn": "qkv", "o_proj": "o",
          "gate_proj": "up", "up_proj": "up", "c_fc": "up", "down_proj": "down"}


def count(config, arch: Arch, rank: int, targets, blocksize: int = 64, dora: bool = False) -> Counts:
    """Exact counts from the meta-device model, LoRA applied by `patch_linear` as training would
    (with `dora`, DoRA adapters: `lora` then includes each layer's magnitude vector)."""
    model = meta_model(config)
    params = _unique_params(model)
    total = sum(p.numel() for p in params)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_w = head.weight if head is not None else None
    lm_head = head_w.numel() if head_w is not None and head_w is not emb else 0
    heads = {id(head)} if head is not None else set()
    dense = [(path, m) for path, m, _, _ in iter_linear(model) if id(m) not in heads and not is_embedding(m)]
    linear = sum(m.weight.numel() for _, m in dense)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3)
    other = total - emb.numel() - lm_head - linear - experts
    try:
        chosen = select_targets(model, targets)
    except ValueError as e:
        raise PlanError(str(e)) from None
    quantized = sum(m.weight.numel() for _, m, _, _ in chosen)
    nf4 = sum(nf4_nbytes(m.weight.numel(), blocksize) + 256 * 4 for _, m, _, _ in chosen)
    with warnings.catch_warnings():  # what all-linear leaves frozen (MoE experts) is in the plan's own notes
        warnings.simplefilter("ignore", UserWarning)
        patch_linear(model, rank=rank, targets=targets, dora=dora)
    per_target: dict[str, int] = {}
    lora_mm = 0
    largest_lora = 0
    first_qkv = 0
    roles = {"qkv": False, "o": False, "up": False, "down": False}
    dora_rows = dora_in = 0
    for path, layer in lora_layers(model):
        name = path.rsplit(".", 1)[-1]
        n = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        largest_lora = max([largest_lora] + [p.numel() for p in layer.parameters() if p.requires_grad])
        per_target[name] = per_target.get(name, 0) + n
        rows = sum(m.numel() for m in layer.lora_magnitude_vector.values()) if dora else 0
        dora_rows += rows
        dora_in += layer.in_features if dora else 0
        lora_mm += n - rows  # the factors multiply with each token; the magnitudes scale rows
        if name in _ROLES:
            roles[_ROLES[name]] = True
        if _ROLES.get(name) == "qkv" and ".0." in f".{path}.":  # the first decoder layer's
            first_qkv += rank * layer.in_features
    # Matmul parameters per token: every dense linear and the output head; of the experts, k of E.
    mm = linear + (head_w.numel() if head_w is not None else 0)
    if experts:
        mm += experts * arch.experts_per_token // max(arch.experts, 1)
    layer_params = 0
    decoder = _decoder_layers(model)
    if decoder is not None and len(decoder):
        layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in decoder)
    lora_total = sum(per_target.values())
    return Counts(total=total, embedding=emb.numel(), lm_head=lm_head, linear=linear, experts=experts, other=other,
                  n_targets=len(chosen), lora=lora_total, lora_per_target=dict(sorted(per_target.items())),
                  targets_found=sorted(per_target), quantized=quantized, nf4_bytes=nf4, matmul_per_token=mm,
                  lora_matmul_per_token=lora_mm, largest_layer=layer_params,
                  largest_tensor=max(p.numel() for p in params), largest_lora_tensor=largest_lora,
                  lora_qkv_first_layer=first_qkv,
                  trainable_roles=roles, dora=dora, dora_rows=dora_rows,
                  dora_in=dora_in, lora_rank=rank)


def _decoder_layers(model: nn.Module):
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and sum(1 for _ in m[0].parameters()) > 2:
            return m
    return None


# -- memory --------------------------------------------------------------------------------------

@dataclass
class Setup:
    method: str
    rank: int = 16
    batch: int = 4
    seq: int = 2048
    gpus: int = 1
    gpu: GPU = GPUS["h100-80gb"]
    optimizer: str = "adamw"
    grad_ckpt: str = "auto"   # auto | on | off
    precision: str = "bf16-mixed"
    foreach: bool = True      # torch's multi-tensor optimizer step (its default on CUDA; CPU runs loop)


def _opt_bytes(optimizer: str) -> tuple[float, float]:
    """(state bytes, step temporaries) per trainable parameter."""
    if optimizer == "adamw":
        return 8.0, 4.0              # fp32 m and v; foreach AdamW's one fp32 temporary per parameter
    if optimizer == "adamw-8bit":
        return 2.0 + 8.0 / 256, 0.0  # bitsandbytes blockwise 8-bit m and v, an fp32 scale per 256
    return 4.0, 4.0                  # SGD with momentum: one fp32 buffer, foreach temporary


def activation_bytes_per_token(arch: Arch, counts: Counts, method: str, b: int, rank: int,
                               checkpointing: bool) -> dict:
    """Bytes autograd keeps per token at the end of the forward pass, by part (see `rules`)."""
    h, kv, inter, L = arch.hidden, arch.kv_heads * arch.head_dim, arch.intermediate, arch.layers
    full = method == "full"
    roles = {"qkv": True, "o": True, "up": True, "down": True} if full else counts.trainable_roles
    if arch.family == "gpt2":
        # LayerNorm inputs and outputs, q/k/v, the attention output and its merged copy, the MLP's
        # 4h pre- and post-GELU, three residual dropout masks (bool).
        layer = (2 * h * b + 2 * h * b + 3 * h * b + 2 * h * b + 2 * 4 * h * b + 3 * h + 16 + arch.heads * 4)
    else:
        # RMSNorm upcasts its input to fp32 and keeps it (2 norms); q after RoPE, k, v and the
        # attention output (SDPA keeps them and its log-sum-exp); gate, SiLU(gate), up; the norm
        # outputs and the MLP product only where a trainable layer needs its input; the normalized
        # values before the norm weight only when the norm weight trains (full).
        mlp_width = inter
        if arch.experts:
            mlp_width = inter * arch.experts_per_token
        layer = (2 * h * 4 + 2 * 4 + 2 * h * b + 2 * kv * b + arch.heads * 4 + 3 * mlp_width * b
                 + (h * b if roles["qkv"] else 0) + (h * b if roles["up"] else 0)
                 + (mlp_width * b if roles["down"] else 0) + (2 * h * b if full else 0))
        if arch.experts:
            layer += arch.experts * 4 + arch.experts_per_token * h * b  # router logits, dispatched tokens
    if not full:
        layer += b * rank * counts.n_targets // L  # each adapted layer keeps dropout(x) @ A.T
        if counts.dora:  # and, for m's gradient, its pre-scale output v (tokens x out, compute dtype)
            layer += b * counts.dora_rows // L
    out = {}
    if checkpointing:
        out["layers"] = L * h * b          # each decoder layer keeps only its input
        # One layer's activations while its backward runs, and that backward's gradient buffers
        # (two MLP-wide, one hidden-wide: measured).
        mlp = inter * max(arch.experts_per_token, 1) if arch.family != "gpt2" else 4 * h
        out["recomputed layer"] = layer + (2 * mlp + h) * b
    else:
        out["layers"] = L * layer
    # After the last layer: the final norm (fp32 input; its outputs when the head trains), and the
    # loss's fp32 log-probabilities over the vocabulary. With the embeddings frozen, the first
    # norm's input needs no gradient and is not kept.
    final = h * 4 + 4 + (2 * h * b if full else 0)
    if not full and not checkpointing:
        final -= h * 4
    out["final norm"] = final
    out["log-probs"] = arch.vocab * 4
    return out


def loss_workspace_per_token(arch: Arch, b: int) -> int:
    """Extra bytes per token while the loss's backward runs: the gradients of the log-probabilities
    and of the fp32 logits (and, measured in fp32 runs, one more vocabulary-sized fp32 tensor)."""
    return arch.vocab * (12 if b == 4 else 8)


@dataclass
class Memory:
    parts: dict               # name -> bytes per GPU, of the phase that sets the peak
    peak: int
    phase: str                # "backward" (activations live) or "optimizer step"
    phases: dict              # phase -> its peak
    checkpointing: bool
    shards: int               # 1: a whole replica per GPU; n: FSDP2 full sharding over n GPUs


def memory(arch: Arch, counts: Counts, s: Setup, checkpointing: bool, shards: int = 1) -> Memory:
    """Peak bytes per GPU, as the larger of two phases:

    - backward: weights, master weights, optimizer state, every activation the forward kept, the
      loss's backward workspace, and the first gradient backward writes (the output head's, in full
      fine-tuning; gradients and activations then trade places layer by layer);
    - optimizer step: weights, master weights, optimizer state, every gradient and the step's
      temporaries.
    With `shards` > 1 (FSDP2), parameters, gradients and optimizer state are divided by `shards`
    and two gathered layers (three in full fine-tuning: one for its unsharded gradients) are added."""
    b = 2 if s.precision == "bf16-mixed" else 4
    state, temp = _opt_bytes(s.optimizer)
    if s.method == "full":
        trainable = counts.total
        weights = counts.total * b
        master = counts.total * 4 if b == 2 else 0  # fp32 master copy under mixed precision
        grads = counts.total * b
        first_grad = (counts.lm_head or counts.embedding) * b
        casts = 0
    else:
        trainable = counts.lora
        frozen = counts.total - (counts.quantized if s.method == "qlora" else 0)
        weights = frozen * b + (counts.nf4_bytes if s.method == "qlora" else 0) + trainable * 4
        master = 0
        grads = trainable * 4          # adapters are kept and trained in fp32
        first_grad = 0
        casts = trainable * b if b != 4 else 0  # their compute-dtype copies, kept for backward
    static = {"weights": weights, "master weights": master, "optimizer state": int(trainable * state)}
    if counts.dora and s.method != "full":
        static["DoRA cached ||W||^2"] = 8 * counts.dora_rows  # float64 per output row of each adapted layer
    if s.foreach:
        opt_temp = int(trainable * temp)
    else:  # one parameter at a time: two temporaries of the largest one (AdamW's sqrt(v) and its update)
        largest = counts.largest_tensor if s.method == "full" else counts.largest_lora_tensor
        opt_temp = 2 * largest * 4 if temp else 0
    gathered = 0
    if shards > 1:
        static = {k: -(-v // shards) for k, v in static.items()}
        grads, opt_temp, first_grad = (-(-x // shards) for x in (grads, opt_temp, first_grad))
        gathered = counts.largest_layer * b * (3 if s.method == "full" else 2)
        static["FSDP2 gathered layers"] = gathered
    act = activation_bytes_per_token(arch, counts, s.method, b, s.rank, checkpointing)
    loss_ws = loss_workspace_per_token(arch, b)
    tokens = s.batch * s.seq
    backward = dict(static)
    if casts:
        backward["adapter compute copies"] = casts
    # The loss's backward runs before the first checkpointed layer is recomputed, so with
    # checkpointing the peak holds one or the other: the loss's tensors with the first gradient, or
    # a recomputed layer late in backward, when (the activations hardly shrinking) nearly every
    # gradient exists. Without checkpointing everything is live at the loss, and later gradients
    # and activations trade places.
    loss_part = tokens * (act["final norm"] + act["log-probs"] + loss_ws) + first_grad
    # At the first layer's recomputation every gradient but its own and the input embedding's exists.
    if s.method == "full":
        late_grads = max(grads - -(-(counts.largest_layer + counts.embedding) * b // shards), 0)
    else:
        late_grads = grads - grads // arch.layers
    recompute_part = tokens * act["recomputed layer"] + late_grads if "recomputed layer" in act else 0
    backward["activations: layers"] = tokens * act["layers"]
    if recompute_part > loss_part:
        backward["gradients"] = late_grads
        backward["activations: recomputed layer"] = tokens * act["recomputed layer"]
    else:
        backward["gradients"] = first_grad
        backward["activations: final norm"] = tokens * act["final norm"]
        backward["activations: log-probs"] = tokens * act["log-probs"]
        backward["loss backward workspace"] = tokens * loss_ws
    step = dict(static)
    step["gradients"] = grads
    step["optimizer step temporaries"] = opt_temp
    phases = {"backward": sum(backward.values()), "optimizer step": sum(step.values())}
    phase = max(phases, key=phases.get)
    return Memory(parts=backward if phase == "backward" else step, peak=phases[phase], phase=phase, phases=phases,
                  checkpointing=checkpointing, shards=shards)


def usable_bytes(gpu: GPU) -> int:
    return int((gpu.mem_gib * (1 - FRAGMENTATION) - RESERVED_GIB) * GiB)


# -- FLOPs and time ------------------------------------------------------------------------------

def flops_per_token(arch: Arch, counts: Counts, method: str, seq: int, checkpointing: bool,
                    tokens_per_pass: int | None = None) -> dict:
    """Training FLOPs per token: 2 per weight a token multiplies with in forward; causal attention
    2*seq*heads*head_dim per layer (QK^T and AV over seq/2 keys on average); backward twice the
    forward for trained weights, once (dX only) for frozen ones, twice for attention; the LoRA
    factors 2*r*(in+out) forward and twice that backward; checkpointing recomputes the layers' forward.
    DoRA (counts.dora) adds its row norms once per forward pass, whatever the tokens in it: W A^T
    (2*N*K*r per adapted layer), A A^T (2*r*r*K) and B (A A^T) (2*N*r*r), in float64, spread over
    `tokens_per_pass` (the micro-batch's tokens) and listed apart as "dora norms"."""
    mm = 2 * counts.matmul_per_token
    attn = 2 * arch.layers * seq * arch.heads * arch.head_dim
    head = 2 * arch.vocab * arch.hidden
    fwd = mm + attn
    if method == "full":
        bwd = 2 * mm + 2 * attn
    else:
        lora = 2 * counts.lora_matmul_per_token
        fwd += lora
        bwd = mm + 2 * attn + 2 * lora
        # With frozen embeddings the first layer's attention input needs no gradient: no dX through
        # its q, k, v projections (base weights and adapters).
        qkv_out = arch.heads * arch.head_dim + 2 * arch.kv_heads * arch.head_dim
        bwd -= 2 * arch.hidden * qkv_out
        if counts.trainable_roles.get("qkv"):
            bwd -= 2 * counts.lora_qkv_first_layer
    recompute = (fwd - head) if checkpointing else 0
    out = {"forward": fwd, "backward": bwd, "recompute": recompute}
    if counts.dora and method != "full":
        if not tokens_per_pass:
            raise ValueError("flops_per_token: DoRA's row norms need tokens_per_pass (the micro-batch's tokens)")
        r, passes = counts.lora_rank, 2 if checkpointing else 1
        norms = 2 * r * counts.quantized + 2 * r * r * (counts.dora_in + counts.dora_rows)
        out["dora norms"] = passes * norms / tokens_per_pass
    out["total"] = sum(out.values())
    return out


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class MethodPlan:
    method: str
    trainable: int
    memory: Memory
    fits: bool
    max_batch: int
    min_gpus: int | None
    flops_per_token: dict
    gpu_hours: float
    wall_hours: float
    artifact_bytes: int           # one variant on disk
    storage_bytes: int            # all variants on disk


@dataclass
class Plan:
    arch: Arch
    counts: Counts
    setup: dict
    methods: dict
    recommendation: dict
    assumptions: dict
    rules: list

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return d


def _fit(arch: Arch, counts: Counts, s: Setup, shards: int, usable: int) -> Memory:
    """The memory at `shards`, with checkpointing as asked (auto: on only when it does not fit off)."""
    if s.grad_ckpt in ("on", "off"):
        return memory(arch, counts, s, s.grad_ckpt == "on", shards)
    off = memory(arch, counts, s, False, shards)
    return off if off.peak <= usable else memory(arch, counts, s, True, shards)


def _layout(arch: Arch, counts: Counts, s: Setup, usable: int) -> Memory:
    """The memory of `s`: a replica per GPU (DDP) when one fits, else FSDP2 over the GPUs."""
    mem = _fit(arch, counts, s, 1, usable)
    if mem.peak > usable and s.gpus > 1:
        mem = _fit(arch, counts, s, s.gpus, usable)
    return mem


def largest_batch(arch: Arch, counts: Counts, s: Setup, usable: int, limit: int = 1 << 20) -> int:
    """The largest micro-batch (per GPU) this plan fits at, 0 if none, found on the plan's own fit test
    (the memory of each batch, with checkpointing and the layout chosen for it as for the batch
    asked): memory grows with the batch, so doubling then bisection finds the edge. A line through
    one batch's numbers cannot: which phase peaks, and checkpointing under auto, change with it."""
    fits = lambda b: _layout(arch, counts, dataclasses.replace(s, batch=b), usable).peak <= usable  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    if hi > limit:
        return lo
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan_method(arch: Arch, counts: Counts, s: Setup, tokens: int, variants: int, mfu: float | None) -> MethodPlan:
    """One method on the given GPUs: a replica per GPU (DDP) when one fits, else FSDP2 over them."""
    usable = usable_bytes(s.gpu)
    mem = _layout(arch, counts, s, usable)
    fits = mem.peak <= usable
    max_batch = largest_batch(arch, counts, s, usable)
    min_gpus = next((n for n in (1, *range(2, 4097)) if _fit(arch, counts, s, n, usable).peak <= usable), None)
    fl = flops_per_token(arch, counts, s.method, s.seq, mem.checkpointing, tokens_per_pass=s.batch * s.seq)
    util = (mfu if mfu is not None else s.gpu.mfu) * (QLORA_THROUGHPUT if s.method == "qlora" else 1.0)
    if counts.dora and s.method != "full":
        util *= DORA_THROUGHPUT
    gpu_hours = variants * tokens * fl["total"] / (s.gpu.tflops * 1e12 * util) / 3600
    if s.method == "full":
        artifact = counts.total * 2          # a bf16 safetensors checkpoint per variant
        storage = variants * artifact
    else:
        artifact = counts.lora * 4           # an fp32 adapter (peft's format) per variant
        storage = counts.total * 2 + variants * artifact  # and the base model once
    return MethodPlan(method=s.method, trainable=counts.total if s.method == "full" else counts.lora, memory=mem,
                      fits=fits, max_batch=int(max_batch), min_gpus=min_gpus, flops_per_token=fl,
                      gpu_hours=gpu_hours, wall_hours=gpu_hours / s.gpus, artifact_bytes=artifact,
                      storage_bytes=storage)


def gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


RANKS = {"instruction": 16, "task": 8, "domain": 64}  # the rank usually enough for each objective: make_plan's default


def recommend(arch: Arch, counts: Counts, methods: dict, objective: str, variants: int, examples: int,
              gpus: int, gpu: GPU, rank: int) -> dict:
    """A practitioner's rules, in order: the objective says what one would like (full fine-tuning
    for a new domain, LoRA for instruction or task tuning, which match it there and forget less),
    the hardware says what fits (full -> LoRA -> QLoRA, each step down only when the one above does
    not fit on the GPUs given), and the number of variants says what storing them costs."""
    full, lora = methods["full"], methods["lora"]
    reasons = []
    where = f"{gpus} x {gpu.name} ({gpu.mem_gib:g} GiB, {gib(usable_bytes(gpu))} usable)"
    if objective == "domain":
        order = ["full", "lora", "qlora"]
        reasons.append(f"objective 'domain': new knowledge ({examples:,} examples) is where full fine-tuning learns "
                       f"more than LoRA, so it comes first if it fits")
    else:
        order = ["lora", "qlora", "full"]
        reasons.append(f"objective '{objective}': LoRA (r={RANKS[objective]} is usually enough) reaches full "
                       f"fine-tuning's quality on {objective} tuning and forgets less of the base model; at r={rank} "
                       f"it trains {lora.trainable:,} of {counts.total:,} parameters "
                       f"({100 * lora.trainable / counts.total:.2f}%)")
    if rank != RANKS[objective]:
        reasons.append(f"every figure here is for the rank given, r={rank} ('{objective}' usually needs "
                       f"r={RANKS[objective]}: --rank {RANKS[objective]} costs that)")
    choice = None
    for m in order:
        p = methods[m]
        peak = f"{gib(p.memory.peak)} per GPU"
        how = f"FSDP2 over {p.memory.shards} GPUs" if p.memory.shards > 1 else (
            "DDP, one replica per GPU" if gpus > 1 else "one GPU")
        if p.fits:
            reasons.append(f"{m} fits on {where}: peak {peak} ({how}, gradient checkpointing "
                           f"{'on' if p.memory.checkpointing else 'off'}), largest micro-batch {p.max_batch}")
            choice = m
            break
        need = f"needs {p.min_gpus} GPUs of this kind" if p.min_gpus else "does not fit on any number of them"
        reasons.append(f"{m} does not fit on {where}: peak {peak} with {how}; it {need}")
    if choice is None:
        choice = min(METHODS, key=lambda m: methods[m].memory.peak)
        reasons.append(f"nothing fits; {choice} needs the least memory ({gib(methods[choice].memory.peak)} per GPU)")
    if choice == "qlora":
        reasons.append(f"QLoRA stores the {counts.quantized:,} adapted weights in NF4 "
                       f"({8 * counts.nf4_bytes / max(counts.quantized, 1):.3f} bits each); it costs about "
                       f"{1 / QLORA_THROUGHPUT - 1:.0%} more GPU time than LoRA and a small quantization error")
    if variants > 1:
        reasons.append(f"{variants} variants: {human_bytes(full.storage_bytes)} as full checkpoints "
                       f"({human_bytes(full.artifact_bytes)} each) against {human_bytes(lora.storage_bytes)} as "
                       f"one base and {variants} adapters ({human_bytes(lora.artifact_bytes)} each)")
    chosen = methods[choice]
    reasons.append(f"time: {chosen.gpu_hours:,.1f} GPU-hours for {variants} variant(s), {chosen.wall_hours:,.1f} h "
                   f"on {gpus} GPU(s) ({chosen.flops_per_token['total'] / 1e9:,.2f} GFLOP per token)")
    return {"method": choice, "rank": None if choice == "full" else rank, "reasons": reasons}


def make_plan(model: str = "llama-3-8b", method: str = "all", rank: int | None = None, targets="all-linear",
              batch: int = 4, seq: int = 2048, gpu: str | None = "h100-80gb", gpu_mem: float | None = None,
              gpus: int = 1, optimizer: str = "adamw", grad_ckpt: str = "auto", objective: str = "instruction",
              examples: int = 200_000, tokens_per_example: int | None = None, epochs: float = 1.0,
              variants: int = 1, precision: str = "bf16-mixed", mfu: float | None = None, config=None,
              dora: bool = False) -> Plan:
    """The whole plan. `rank`: the LoRA / QLoRA rank every figure is for (default: the objective's
    usual one, RANKS: instruction 16, task 8, domain 64); the recommendation names it.
    `config`: a transformers config to use instead of `model` (the name is kept).
    `dora`: LoRA and QLoRA with DoRA adapters (magnitude vectors, row norms, a kept output per layer)."""
    for name, value, choices in (("method", method, (*METHODS, "all")), ("optimizer", optimizer, OPTIMIZERS),
                                 ("grad-ckpt", grad_ckpt, ("auto", "on", "off")), ("objective", objective, OBJECTIVES),
                                 ("precision", precision, PRECISIONS)):
        if value not in choices:
            raise PlanError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
    if objective in RANKS and rank is None:
        rank = RANKS[objective]
    for name, value in (("rank", rank), ("batch", batch), ("seq", seq), ("gpus", gpus), ("examples", examples),
                        ("variants", variants)):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"--{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(epochs) and epochs > 0):
        raise PlanError(f"--epochs must be a positive number, got {epochs}")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    if gpu_mem is not None:
        if not (math.isfinite(gpu_mem) and gpu_mem > RESERVED_GIB):
            raise PlanError(f"--gpu-mem must be a number of GiB above {RESERVED_GIB}, got {gpu_mem}")
        base = GPUS.get(gpu) if gpu else None
        g = GPU(f"{gpu_mem:g}gib" if base is None else base.name, gpu_mem, base.tflops if base else 312.0,
                base.mfu if base else 0.40)
    elif gpu in GPUS:
        g = GPUS[gpu]
    else:
        raise PlanError(f"--gpu must be one of {', '.join(GPUS)} (or give --gpu-mem GiB), got {gpu!r}")
    if config is None:
        config = load_config(model)
    arch = arch_of(config, model)
    counts = count(config, arch, rank, targets, dora=dora)
    tokens = int(examples * (tokens_per_example or seq) * epochs)
    methods = {}
    for m in METHODS:
        setup = Setup(method=m, rank=rank, batch=batch, seq=seq, gpus=gpus, gpu=g, optimizer=optimizer,
                      grad_ckpt=grad_ckpt, precision=precision)
        methods[m] = plan_method(arch, counts, setup, tokens, variants, mfu)
    rec = recommend(arch, counts, methods, objective, variants, examples, gpus, g, rank)
    # --method M shows M, and beside it the method recommended when that is another: the
    # recommendation weighs every method, and named one the table did not have (qlora asked, full advised)
    shown = methods if method == "all" else {m: methods[m] for m in METHODS if m in (method, rec["method"])}
    assumptions = {
        "precision": precision,
        "weights": ("bf16 weights; full fine-tuning keeps an fp32 master copy of every weight; LoRA adapters "
                    "are kept and trained in fp32" if precision == "bf16-mixed" else "everything in fp32"),
        "optimizer": {"adamw": "AdamW (torch, foreach): fp32 m and v, one fp32 temporary per parameter in the step",
                      "adamw-8bit": "bitsandbytes AdamW8bit: 8-bit blockwise m and v",
                      "sgd": "SGD with momentum: one fp32 buffer"}[optimizer],
        "usable memory": f"{g.mem_gib:g} GiB x (1 - {FRAGMENTATION}) - {RESERVED_GIB} GiB = {gib(usable_bytes(g))}",
        "utilisation": f"{mfu if mfu is not None else g.mfu:.0%} of {g.tflops:g} TFLOP/s dense bf16 "
                       f"(QLoRA: x{QLORA_THROUGHPUT} for its 4-bit decode)",
        "tokens": f"{examples:,} examples x {tokens_per_example or seq:,} tokens x {epochs:g} epoch(s) = {tokens:,}",
        "attention": "SDPA / flash attention (no seq x seq matrix kept), causal",
        "checkpointing": "Hugging Face's per-decoder-layer gradient checkpointing",
        "qlora": "the adapted layers in NF4 (blocksize 64, double quantization), everything else bf16",
    }
    # (the Llama-family presets leave max_position_embeddings at transformers' default: not theirs)
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, k, None), int)), None) \
        if (model not in PRESETS or arch.family == "gpt2") else None
    if positions is not None and seq > positions:
        assumptions["sequence"] = (f"--seq {seq} is beyond the {positions} positions the model was built for "
                                   f"(GPT-2's learned position embeddings cannot run it at all); costed as asked")
    if arch.model_type not in LLAMA_LAYOUT and arch.family != "gpt2":
        assumptions["architecture"] = (f"model_type {arch.model_type!r} is not one lowrank models (the Llama family: "
                                       f"{', '.join(sorted(LLAMA_LAYOUT))}; gpt2): its activations are estimated with "
                                       f"the Llama layout, causal, as a decoder-only language model")
    if dora:
        assumptions["dora"] = (f"LoRA and QLoRA with DoRA adapters: + a magnitude entry per output row "
                               f"({counts.dora_rows:,}), each layer's pre-scale output kept for m's gradient, "
                               f"float64 row norms every forward pass; throughput x{DORA_THROUGHPUT} of LoRA's "
                               f"(measured on the CPU, not yet on a GPU)")
    setup_d = dict(model=model, rank=rank, targets=targets if isinstance(targets, str) else list(targets),
                   batch=batch, seq=seq, gpu=g.name, gpu_mem_gib=g.mem_gib, gpus=gpus, optimizer=optimizer,
                   grad_ckpt=grad_ckpt, objective=objective, examples=examples, epochs=epochs, variants=variants,
                   dora=dora, precision=precision, mfu=mfu if mfu is not None else g.mfu,
                   tokens_per_example=tokens_per_example or seq)
    return Plan(arch=arch, counts=counts, setup=setup_d, methods=shown, recommendation=rec,
                assumptions=assumptions, rules=RULES)


RULES = [
    "weights: frozen parameters x 2 B (bf16) or NF4 bytes (codes + block statistics); trainable x their dtype",
    "master weights: fp32 copy of the trainable weights under bf16 mixed precision (full fine-tuning)",
    "gradients: one per trainable parameter, in its dtype",
    "optimizer state: AdamW 8 B, AdamW-8bit 2.03 B, SGD-momentum 4 B per trainable parameter",
    "activations per layer and token (llama family, b = bytes of the compute dtype): 2 RMSNorm fp32 inputs "
    "8h + 8 B, q and attention output 2hb, k and v 2(kv heads x head dim)b, log-sum-exp 4 B per head, gate, "
    "SiLU and up 3Ib; plus hb for the attention input and for the MLP input, and Ib for the MLP product, "
    "when a trainable layer reads them; plus 2hb when the norms train (full); plus r x b per adapted layer",
    "with checkpointing: each layer keeps its input (hb per token) and one layer is recomputed at a time, "
    "its backward adding (2I + h)b of gradient buffers",
    "after the layers: the final norm's fp32 input, and the loss's fp32 log-probabilities (4V per token)",
    "loss backward: two more fp32 vocabulary-sized tensors per token (three in fp32 runs)",
    "FLOPs per token: 2 per multiplied weight forward; backward x2 for trained weights, x1 for frozen ones",
    "DoRA: + out x b per adapted layer and token (its pre-scale output, for m's gradient), + 8 B per output "
    "row (the cached float64 ||W||^2); row norms 2r(NK + rK + rN) float64 FLOPs per layer and forward pass",
]


# -- rendering -----------------------------------------------------------------------------------

def render(plan: Plan, console=None) -> None:
    """The plan as aligned tables (rich)."""
    console = console or Console()
    a, c = plan.arch, plan.counts
    console.print(f"[bold]{a.name}[/bold] ({a.model_type}): {a.layers} layers, hidden {a.hidden}, {a.heads} heads "
                  f"({a.kv_heads} KV), intermediate {a.intermediate}, vocab {a.vocab}"
                  + (f", {a.experts} experts (top-{a.experts_per_token})" if a.experts else ""))
    t = Table(title="parameters", show_edge=False)
    t.add_column("part")
    t.add_column("count", justify="right")
    for name, v in (("total", c.total), ("embeddings", c.embedding), ("output head (untied)", c.lm_head),
                    ("linear layers", c.linear), ("fused experts", c.experts), ("norms, biases, other", c.other)):
        if v or name == "total":
            t.add_row(name, f"{v:,}")
    for name, v in c.lora_per_target.items():
        t.add_row(f"LoRA r={plan.setup['rank']} on {name}", f"{v:,}")
    if c.dora:
        t.add_row(f"DoRA magnitudes ({c.n_targets} layers, in the LoRA counts)", f"{c.dora_rows:,}")
    t.add_row(f"{'DoRA' if c.dora else 'LoRA'} r={plan.setup['rank']}, {c.n_targets} layers", f"{c.lora:,}")
    t.add_row("QLoRA: the adapted layers in NF4", f"{human_bytes(c.nf4_bytes)}, "
              f"{8 * c.nf4_bytes / max(c.quantized, 1):.4f} bits/param")
    console.print(t)
    if c.experts:
        console.print("[yellow]note:[/yellow] the experts are fused 3-D parameters in this transformers version: "
                      "not LoRA targets, and not quantized by QLoRA")
    t = Table(title=f"per GPU: {plan.setup['gpus']} x {plan.setup['gpu']}, micro-batch {plan.setup['batch']} x "
                    f"{plan.setup['seq']} tokens", show_edge=False)
    t.add_column("")
    for m in plan.methods:
        t.add_column(f"{m} (DoRA)" if plan.setup.get("dora") and m != "full" else m, justify="right")
    names = []
    for p in plan.methods.values():
        names += [k for k in p.memory.parts if k not in names]
    for k in names:
        t.add_row(k, *(gib(p.memory.parts[k]) if k in p.memory.parts else "-" for p in plan.methods.values()))
    ps = list(plan.methods.values())
    t.add_row("[bold]peak[/bold]", *(f"[bold]{gib(p.memory.peak)}[/bold]" for p in ps))
    t.add_row("peak is in", *(p.memory.phase for p in ps))
    t.add_row("sharding", *((f"FSDP2 x{p.memory.shards}" if p.memory.shards > 1 else "none") for p in ps))
    t.add_row("gradient checkpointing", *(("on" if p.memory.checkpointing else "off") for p in ps))
    t.add_row("fits", *(("yes" if p.fits else "[red]no[/red]") for p in ps))
    t.add_row("largest micro-batch", *(str(p.max_batch) for p in ps))
    t.add_row("fewest GPUs", *(str(p.min_gpus) if p.min_gpus else "-" for p in ps))
    t.add_row("trainable", *(f"{p.trainable:,}" for p in ps))
    t.add_row("GFLOP / token", *(f"{p.flops_per_token['total'] / 1e9:,.2f}" for p in ps))
    t.add_row("GPU-hours (all variants)", *(f"{p.gpu_hours:,.1f}" for p in ps))
    t.add_row("one variant on disk", *(human_bytes(p.artifact_bytes) for p in ps))
    t.add_row("all variants on disk", *(human_bytes(p.storage_bytes) for p in ps))
    console.print(t)
    r = plan.recommendation
    console.print(f"[bold green]recommendation: {r['method']}"
                  + (f" at r={r['rank']}" if r["rank"] else "") + "[/bold green]")
    for reason in r["reasons"]:
        console.print(f"  - {reason}")
    console.print("assumptions:")
    for k, v in plan.assumptions.items():
        console.print(f"  {k}: {v}")
