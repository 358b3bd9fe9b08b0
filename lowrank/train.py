"""`lowrank train`: a fine-tuning job from a local model (or a preset) and a data file to checkpoints
that resume bit for bit, on one process or many (`torchrun`, DDP or FSDP2).

    lowrank train --model DIR|PRESET|config.json --data FILE --method full|lora|qlora --steps N --out DIR

Data: JSONL records with `text`, or `prompt` and `completion` (the loss on the completion only), or
plain text lines (a .txt file); optionally packed into `max_length` blocks; a held-out split (or
`eval_data`) for the eval loss.

# Note: batches and processes
`batch_size` is the global micro-batch: the sequences one forward/backward pass takes over all
processes together; each of the `world` processes takes its contiguous share (`batch_size` must
divide evenly). An optimizer step takes `grad_accum` micro-batches. The loss of a step is the mean
cross-entropy over every labelled token of its `batch_size * grad_accum` sequences, whatever their
split over micro-batches and processes (each micro-batch's token sum is divided by the step's
token count, counted from the data before the step). So the same command gives the same training
(up to float summation order) on 1 process or K, and the data order depends on the seed only.

# Note: checkpoints
OUT/checkpoint-<step>/ holds the adapter in peft's format (lora, qlora; `lowrank.save_adapter`)
or the whole model as transformers writes it with the tokenizer (full), plus `training_state.pt`
(optimizer, scheduler, RNG states, data position) and `trainer_state.json` (step, losses, the
settings a resumed run must share). Each is written complete into a hidden directory beside the
others and renamed into place, so a crash while saving leaves the earlier checkpoints as they
were; `CheckpointManager` then keeps the best `keep_best` by eval loss plus the last `keep_last`
and deletes the rest. Ctrl-C (SIGINT) finishes the current optimizer step, writes a checkpoint and
stops (a second Ctrl-C interrupts at once); `resume=True` continues from the latest checkpoint
with the same arithmetic as a run that never stopped.

Level 5 (jobs): imports levels 0-4.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import warnings
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .adapter_files import load_adapter, save_adapter
from .layer_types import linear_dims
from .nf4_linear import NF4Linear
from .modules_to_save import ModulesToSave
from .patch import lora_layers, patch_linear, select_targets
from .plan import load_config, meta_model
from .qlora import prepare_for_qlora_training

METHODS = ("full", "lora", "qlora")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The usual learning rates for a pretrained model (LoRA's about 10x full fine-tuning's).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
STATE_NAME = "training_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FORMAT = 1


def progress_bar(**kw):
    """A tqdm bar; redrawn every 10 s instead of 10 times a second when stderr is not a terminal."""
    return tqdm(mininterval=0.1 if sys.stderr.isatty() else 10.0, **kw)


# -- data ----------------------------------------------------------------------------------------

def read_records(path: str, what: str) -> list[dict]:
    """JSONL records ({"text"} or {"prompt", "completion"}), or plain text lines for a .txt file."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".txt"):
                out.append({"text": line})
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{what} {path}, line {i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not ({"text"} <= rec.keys() or {"prompt", "completion"} <= rec.keys()):
                raise ValueError(f"{what} {path}, line {i}: each record needs a 'text' field, or 'prompt' and "
                                 f"'completion'")
            out.append(rec)
    if len(out) < 2:
        raise ValueError(f"{what} {path}: needs at least 2 records, found {len(out)}")
    return out


def tokenize_record(rec: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of one record, unpadded: a `text` record is labelled whole; a prompt/completion
    record only on the completion (and the EOS appended to it), -100 on the prompt."""
    if "text" in rec:
        prompt, answer = [], list(tokenizer(str(rec["text"]))["input_ids"])
    else:
        prompt = list(tokenizer(str(rec["prompt"]))["input_ids"])
        answer = list(tokenizer(str(rec["completion"]), add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            answer = answer + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def encode(records: list[dict], tokenizer, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (n, seq) ids and labels (-100 on prompts and padding), truncated to seq; causal
    attention makes a mask needless."""
    ids = torch.full((len(records), seq), pad_id(tokenizer), dtype=torch.long)
    labels = torch.full((len(records), seq), -100, dtype=torch.long)
    for i, rec in enumerate(records):
        row, lab = (x[:seq] for x in tokenize_record(rec, tokenizer))
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return ids, labels


def tokenize_rows(records: list[dict], tokenizer, max_length: int, packing: bool) -> list[tuple[list, list]]:
    """Training rows: each record truncated to max_length, or (packing) every record, an EOS after
    each text one, concatenated and cut into max_length blocks (the last one shorter)."""
    rows = [tokenize_record(r, tokenizer) for r in records]
    if not packing:
        return [(ids[:max_length], lab[:max_length]) for ids, lab in rows]
    eos = tokenizer.eos_token_id
    ids_all, lab_all = [], []
    for ids, lab in rows:
        if eos is not None and (not ids or ids[-1] != eos):
            ids, lab = ids + [eos], lab + [eos]
        ids_all += ids
        lab_all += lab
    return [(ids_all[i:i + max_length], lab_all[i:i + max_length]) for i in range(0, len(ids_all), max_length)]


def collate(rows: list[tuple[list, list]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) right-padded to the longest row."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return ids, labels


class ByteTokenizer:
    """For a preset or a bare config with no tokenizer: UTF-8 bytes as ids 3..258, after PAD 0,
    BOS 1, EOS 2 (the model's vocabulary must have at least 259 entries)."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [b + 3 for b in text.encode("utf-8")]
        return {"input_ids": ([self.bos_token_id] + ids) if add_special_tokens else ids}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training rows' order in one epoch: a permutation drawn from (seed, epoch) alone, so a
    resumed run and any number of processes see the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return torch.randperm(n, generator=g).tolist()


class Batches:
    """The stream of global micro-batches: sequence i of the run is row order(i // n)[i % n]."""

    def __init__(self, rows: list, seed: int, batch_size: int, pad: int):
        self.rows, self.seed, self.batch_size, self.pad = rows, seed, batch_size, pad
        self._orders: dict[int, list[int]] = {}

    def rows_at(self, start: int, count: int) -> list:
        n, out = len(self.rows), []
        for i in range(start, start + count):
            epoch = i // n
            if epoch not in self._orders:
                self._orders = {epoch: epoch_order(n, self.seed, epoch)}
            out.append(self.rows[self._orders[epoch][i % n]])
        return out

    def micro_batches(self, step: int, grad_accum: int) -> list:
        """The grad_accum global micro-batches (ids, labels) of optimizer step `step` (0-based)."""
        first = step * grad_accum * self.batch_size
        return [collate(self.rows_at(first + j * self.batch_size, self.batch_size), self.pad)
                for j in range(grad_accum)]


# -- the job's settings ---------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything `lowrank train` takes; see `lowrank train --help` for each field."""
    model: str
    data: str
    out: str
    method: str = "lora"
    rank: int = 16
    alpha: float | None = None
    targets: object = "all-linear"
    dropout: float = 0.0
    lr: float | None = None
    warmup: int = 0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 100
    save_every: int = 500
    keep_best: int = 1
    keep_last: int = 1
    resume: bool = False
    seed: int = 0
    dtype: str = "fp32"
    gradient_checkpointing: bool | None = None
    max_length: int = 512
    packing: bool = False
    eval_data: str | None = None
    eval_split: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    tokenizer: str | None = None
    fsdp: bool = False
    progress: bool = True
    modules_to_save: list[str] | None = None  # modules trained whole beside the adapter (a new head)
    dora: bool = False  # DoRA adapters (lora / qlora)

    def check(self) -> None:
        """ValueError naming the first bad field."""
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("rank", "batch_size", "grad_accum", "max_length", "keep_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("warmup", "eval_every", "save_every", "keep_best"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"--steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr!r}")
        if self.eval_data is None and not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"--eval-split must be in [0, 1), got {self.eval_split!r}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("--max-grad-norm and --weight-decay must be >= 0")
        if self.dora and self.method == "full":
            raise ValueError("--dora is for lora / qlora (full fine-tuning has no adapter)")
        if self.method == "full" and (self.dropout or self.alpha is not None):
            raise ValueError(f"--{'dropout' if self.dropout else 'alpha'} is for lora / qlora (full fine-tuning has "
                             f"no adapter; its model's own dropout applies)")
        if self.modules_to_save and self.method == "full":
            raise ValueError("--modules-to-save is for lora / qlora (full fine-tuning trains every module)")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out!r} is a file, not a directory")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def checkpointing(self) -> bool:
        return self.method == "full" if self.gradient_checkpointing is None else self.gradient_checkpointing


# What a resumed run must share with the run that wrote the checkpoint (the rest — output folder,
# eval/save cadence, checkpoints kept, progress bar, FSDP or DDP — may change).
SHARED = ("model", "data", "method", "rank", "alpha", "targets", "dropout", "lr", "warmup", "batch_size",
          "grad_accum", "seed", "dtype", "max_length", "packing", "eval_data", "eval_split", "weight_decay",
          "max_grad_norm", "tokenizer", "modules_to_save", "dora")


# -- the process group ----------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """The process group `torchrun` describes in the environment (gloo on the CPU, nccl on GPUs),
    or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), device)
    return Dist(0, 1, device)


def _all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# -- model and tokenizer --------------------------------------------------------------------------

def _has_weights(path: str) -> bool:
    return any(f.endswith((".safetensors", ".bin")) or f.endswith(".safetensors.index.json")
               for f in os.listdir(path))


def model_config(spec: str):
    """The transformers config of a model directory, preset or config.json; ValueError unless it is
    a causal language model's."""
    try:
        config = load_config(spec)
    except OSError as e:
        raise ValueError(f"--model {spec}: {str(e).splitlines()[0]}") from None
    _check_causal(config, spec)
    return config


def load_model(spec: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """A transformers causal LM: a local model directory with weights (loaded offline), or a preset
    name / config.json / directory without weights (randomly initialised from `seed`)."""
    from transformers import AutoModelForCausalLM  # optional: lowrank train runs transformers models

    config = model_config(spec)
    if os.path.isdir(spec) and _has_weights(spec):
        try:
            return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=True)
        except OSError as e:
            raise ValueError(f"--model {spec}: {str(e).splitlines()[0]}") from None
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _check_causal(config, spec: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING  # optional: lowrank train runs transformers models

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"--model {spec}: {type(config).__name__} ({config.model_type}) is not a causal language "
                         f"model (transformers has no AutoModelForCausalLM for it)")


def load_tokenizer(model_spec: str, tokenizer_spec: str | None):
    """`tokenizer_spec`'s tokenizer, else the model directory's, else (a preset or a bare config)
    the byte tokenizer."""
    from transformers import AutoTokenizer  # optional: lowrank train runs transformers models

    where = tokenizer_spec or (model_spec if os.path.isdir(model_spec) else None)
    if where is None:
        return ByteTokenizer()
    if not os.path.isdir(where):
        raise ValueError(f"--tokenizer {where}: no such directory")
    if not any(f.startswith("tokenizer") for f in os.listdir(where)):
        if tokenizer_spec is None and not _has_weights(where):
            return ByteTokenizer()
        raise ValueError(f"{'--tokenizer' if tokenizer_spec else '--model'} {where}: no tokenizer files "
                         f"(tokenizer.json / tokenizer_config.json); pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {where}: {str(e).splitlines()[0]}") from None


def check_rank(model: nn.Module, targets, rank: int) -> None:
    """ValueError naming the first targeted layer narrower than `rank` (a factor would be rank-deficient)."""
    for path, module, *_ in select_targets(model, targets):
        n_in, n_out = linear_dims(module)
        if rank > min(n_in, n_out):
            raise ValueError(f"--rank {rank} is larger than layer {path} ({n_in} -> {n_out}); use --rank "
                             f"<= {min(n_in, n_out)} or other --targets")


def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Make `model` trainable by cfg.method: every weight (full), LoRA on the targets (lora), or
    the targets quantized to NF4 with LoRA (qlora); gradient checkpointing when asked."""
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # no KV cache while training
    gc_kwargs = {"use_reentrant": False}
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        check_rank(model, cfg.targets, cfg.rank)
        # fp32 adapters whatever the base's dtype (mixed precision: a bf16 base, fp32 master factors)
        patch_linear(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                     adapter_dtype=torch.float32, dora=cfg.dora,
                     modules_to_save=cfg.modules_to_save, quantize="nf4" if cfg.method == "qlora" else None,
                     compute_dtype=DTYPES[cfg.dtype] if cfg.method == "qlora" else None)
        if cfg.method == "qlora":
            prepare_for_qlora_training(model, gradient_checkpointing=cfg.checkpointing(),
                                       gradient_checkpointing_kwargs=gc_kwargs)
            return model
    if cfg.checkpointing():
        if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        elif callable(getattr(model, "gradient_checkpointing_enable", None)):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        else:
            raise ValueError(f"--gradient-checkpointing: {type(model).__name__} has no gradient_checkpointing_enable")
    return model


# -- loss, schedule -------------------------------------------------------------------------------

def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) over the labelled positions."""
    target = labels[:, 1:]
    mask = target != -100
    return nn.functional.cross_entropy(logits[:, :-1][mask].float(), target[mask], reduction="sum")


def labelled_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def lr_lambda(warmup: int, total: int):
    """The factor on the peak lr at optimizer step s (0-based): a linear warm-up (s + 1) / warmup that
    reaches 1 at its last step, s = warmup - 1 (step 0 without warm-up), then from that one step at
    the peak a cosine that would reach 0 at s = total, one past the last step (no step is wasted at
    lr 0, and the peak is taken once: the cosine used to start over at 1 on the step after the
    warm-up's last)."""
    peak = max(warmup - 1, 0)

    def factor(s: int) -> float:
        if s < peak:
            return (s + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - peak) / max(1, total - peak))))
    return factor


@torch.no_grad()
def evaluate(model: nn.Module, rows: list, batch_size: int, pad: int, device) -> float:
    """Mean loss per labelled token over the eval rows (every process evaluates all of them)."""
    was = model.training
    model.eval()
    total, n = torch.zeros((), dtype=torch.float64), 0
    for i in range(0, len(rows), batch_size):
        ids, labels = collate(rows[i:i + batch_size], pad)
        ids, labels = ids.to(device), labels.to(device)
        total += token_loss_sum(model(input_ids=ids).logits, labels).double().cpu()
        n += labelled_tokens(labels)
    model.train(was)
    return float(total) / max(n, 1)


# -- checkpoints ----------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Checkpoint:
    step: int
    path: str
    eval_loss: float | None


class CheckpointManager:
    """The checkpoints in `out`: writes each atomically and keeps the best `keep_best` by eval loss
    (those with one) plus the last `keep_last` by step, deleting the rest."""

    def __init__(self, out: str, keep_best: int, keep_last: int):
        if keep_last < 1 or keep_best < 0:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1 (the resume point) and keep_best >= 0, got "
                             f"{keep_last}, {keep_best}")
        self.out, self.keep_best, self.keep_last = out, keep_best, keep_last

    def checkpoints(self) -> list[Checkpoint]:
        """The complete checkpoints, by step."""
        found = []
        if os.path.isdir(self.out):
            for name in os.listdir(self.out):
                m = CHECKPOINT_RE.match(name)
                path = os.path.join(self.out, name)
                if not m or not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
                    continue
                with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
                    found.append(Checkpoint(int(m.group(1)), path, json.load(f).get("eval_loss")))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def kept(self, found: list[Checkpoint]) -> set[int]:
        """The steps to keep: the last keep_last, and the keep_best lowest eval losses (the later step wins a tie)."""
        keep = {c.step for c in found[-self.keep_last:]}
        scored = sorted((c for c in found if c.eval_loss is not None and math.isfinite(c.eval_loss)),
                        key=lambda c: (c.eval_loss, -c.step))
        return keep | {c.step for c in scored[: self.keep_best]}

    def best(self) -> Checkpoint | None:
        scored = [c for c in self.checkpoints() if c.eval_loss is not None and math.isfinite(c.eval_loss)]
        return min(scored, key=lambda c: (c.eval_loss, -c.step)) if scored else None

    def prune(self) -> list[str]:
        """Delete what `kept` does not keep (each renamed away first, so no half-deleted checkpoint
        looks complete); returns the deleted paths."""
        found = self.checkpoints()
        keep = self.kept(found)
        gone = []
        for c in found:
            if c.step not in keep:
                trash = os.path.join(self.out, f".{os.path.basename(c.path)}.deleting")
                os.replace(c.path, trash)
                shutil.rmtree(trash, ignore_errors=True)
                gone.append(c.path)
        return gone

    def clean_stale(self) -> None:
        """What an interrupted save or delete left: hidden staging and trash directories."""
        if os.path.isdir(self.out):
            for name in os.listdir(self.out):
                if name.startswith(".checkpoint-") and name.endswith((".saving", ".deleting")):
                    shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)

    def write(self, step: int, fill) -> str:
        """`fill(directory)` writes a checkpoint's files into a staging directory beside the others;
        it is fsynced and renamed to checkpoint-<step> (replacing one of that step), then pruned."""
        os.makedirs(self.out, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".saving", dir=self.out)
        final = os.path.join(self.out, f"checkpoint-{step}")
        try:
            fill(stage)
            for name in os.listdir(stage):
                if os.path.isfile(os.path.join(stage, name)):
                    with open(os.path.join(stage, name), "rb") as f:
                        os.fsync(f.fileno())
            _fsync_dir(stage)
            if os.path.exists(final):
                trash = os.path.join(self.out, f".checkpoint-{step}.old.deleting")
                os.replace(final, trash)
                os.rename(stage, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(stage, final)
            _fsync_dir(self.out)
        finally:
            if os.path.isdir(stage):
                shutil.rmtree(stage, ignore_errors=True)
        self.prune()
        return final


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of process `rank`'s random stream (dropout masks) in optimizer step `step` (0-based),
    set at the start of every step: each process draws its own masks (one seed on every process
    gave every process the same masks: the second half of a batch got the first half's), and a
    resumed run draws what an uninterrupted one draws, whatever the RNG state saved with it. 32
    bits (torch's CPU generator keeps the seed's low 32), from a hash of the three numbers."""
    digest = hashlib.blake2b(f"lowrank-dropout/{seed}/{step}/{rank}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the job --------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int                      # optimizer steps done in all (a resumed run counts the earlier ones)
    total_steps: int
    train_loss: float | None        # the last step's loss
    eval_loss: float | None         # the last eval loss
    interrupted: bool
    last_checkpoint: str | None
    best_checkpoint: str | None
    trainable: int
    tokens_per_s: float


class _Stop:
    """Signals while training: SIGINT (Ctrl-C) and SIGTERM (what torchrun sends its workers when it
    is interrupted, and what schedulers send before preempting) ask the loop to stop after the
    current optimizer step and write a checkpoint; a second SIGINT raises KeyboardInterrupt at once.
    Only in the main thread (Python delivers signals there)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if _main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Job:
    """One training run's state (model, optimizer, data, checkpoints) and its loop."""

    def __init__(self, cfg: TrainConfig, d: Dist, on_step=None):
        self.cfg, self.d, self.on_step = cfg, d, on_step
        self.manager = CheckpointManager(cfg.out, cfg.keep_best, cfg.keep_last)

    # setup ----------------------------------------------------------------------------------------
    def data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
        records = read_records(cfg.data, "--data")
        if cfg.eval_data is not None:
            train_r, eval_r = records, read_records(cfg.eval_data, "--eval-data")
        elif cfg.eval_split > 0:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            n_eval = max(1, round(cfg.eval_split * len(records)))
            eval_r, train_r = [records[i] for i in order[:n_eval]], [records[i] for i in order[n_eval:]]
        else:
            train_r, eval_r = records, []
        if not train_r:
            raise ValueError(f"--eval-split {cfg.eval_split} leaves no training record of the {len(records)} in "
                             f"{cfg.data}")
        self.pad = pad_id(self.tokenizer)
        self.train_rows = tokenize_rows(train_r, self.tokenizer, cfg.max_length, cfg.packing)
        self.eval_rows = tokenize_rows(eval_r, self.tokenizer, cfg.max_length, False)
        if sum(labelled_tokens(torch.tensor([lab])) for _, lab in self.train_rows) == 0:
            raise ValueError(f"--data {cfg.data}: no labelled token within --max-length {cfg.max_length} (every "
                             f"completion cut off?)")
        self.batches = Batches(self.train_rows, cfg.seed, cfg.batch_size, self.pad)
        # Batches run on across epoch boundaries (see Batches): E epochs are E * rows sequences.
        per_step = cfg.batch_size * cfg.grad_accum
        if len(self.train_rows) < per_step:
            warnings.warn(f"--data {cfg.data}: {len(self.train_rows)} training sequence(s), fewer than one optimizer "
                          f"step takes (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} = {per_step}): "
                          f"every step repeats sequences (the batches run on into the next epochs)", UserWarning,
                          stacklevel=2)
        self.total = cfg.steps if cfg.steps is not None else max(1, math.ceil((cfg.epochs or 1.0) *
                                                                             len(self.train_rows) / per_step))
        self.train_records, self.eval_records = len(train_r), len(eval_r)

    def shared_settings(self) -> dict:
        s = {k: getattr(self.cfg, k) for k in SHARED}
        s["lr"] = self.cfg.learning_rate()
        s["total_steps"] = self.total
        s["targets"] = s["targets"] if isinstance(s["targets"], str) else list(s["targets"])
        return json.loads(json.dumps(s))

    def build(self) -> None:
        cfg, d = self.cfg, self.d
        self.resume_from = self.manager.latest() if cfg.resume else None
        if not cfg.resume and self.manager.latest() is not None:
            held = os.path.basename(self.manager.latest().path)
            raise ValueError(f"--out {cfg.out} already holds checkpoints ({held}): pass --resume to continue that run, "
                             f"or choose another --out")
        if cfg.resume and self.resume_from is None:
            raise ValueError(f"--resume: no checkpoint in {cfg.out} (checkpoint-<step>/ with {TRAINER_STATE_NAME})")
        state = None
        if self.resume_from is not None:
            with open(os.path.join(self.resume_from.path, TRAINER_STATE_NAME), encoding="utf-8") as f:
                saved = json.load(f)
            mine = self.shared_settings()
            diff = [k for k in mine if saved.get("settings", {}).get(k) != mine[k]]
            if diff:
                raise ValueError(f"--resume from {self.resume_from.path}: these settings differ from the run that "
                                 f"wrote it: " + ", ".join(f"{k} {saved['settings'].get(k)!r} -> {mine[k]!r}"
                                                     for k in diff))
            state = torch.load(os.path.join(self.resume_from.path, STATE_NAME), weights_only=True)
        # Before any weight is read: not a causal LM, a rank no layer can take, tokens it has no embedding for.
        config = model_config(cfg.model)
        if cfg.method != "full":
            check_rank(meta_model(config), cfg.targets, cfg.rank)
        top = max(max(ids, default=0) for ids, _ in self.train_rows + self.eval_rows)
        if top >= config.vocab_size:
            raise ValueError(f"the tokenizer gives token id {top}, but --model {cfg.model} has a vocabulary of "
                             f"{config.vocab_size}; pass the model's own tokenizer (--tokenizer DIR)")
        dtype = DTYPES[cfg.dtype]
        source = self.resume_from.path if (state is not None and cfg.method == "full") else cfg.model
        model = load_model(source, dtype, cfg.seed).to(d.device)  # quantized (qlora) on the device it trains on
        torch.manual_seed(cfg.seed)  # the LoRA factors' initial values: the same on every process and every run
        prepare_model(model, cfg)
        if state is not None and cfg.method != "full":
            load_adapter(model, self.resume_from.path)
        self.model = model
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.wrapped = self._wrap(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.warmup, self.total))
        self.step = 0
        self.last_eval = None
        if state is not None:
            self._load_optimizer(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            self.step = int(state["step"])
            self.last_eval = self.resume_from.eval_loss
        else:
            torch.manual_seed(cfg.seed + 1)  # the same whatever was built before (each step reseeds: dropout_seed)
            random.seed(cfg.seed + 1)

    def _wrap(self, model: nn.Module) -> nn.Module:
        cfg, d = self.cfg, self.d
        if d.world == 1 and not cfg.fsdp:
            return model
        if cfg.fsdp:
            return shard_fsdp2(model)
        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def _load_optimizer(self, saved: dict) -> None:
        if self.cfg.fsdp:
            set_optimizer_state_dict(self.model, self.opt, self._named_optimizer_state(saved),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(saved)

    def _named_optimizer_state(self, saved: dict) -> dict:
        """`saved` keyed by parameter names, as FSDP2's full optimizer state dict is: a checkpoint of a
        run without --fsdp (one process, DDP) keys its state by position in the optimizer's
        parameter list (torch's Optimizer.state_dict), which set_optimizer_state_dict does not read
        (KeyError 'state.0.step': such a run could not be resumed with --fsdp)."""
        groups = saved.get("param_groups", [])
        if not any(isinstance(i, int) for g in groups for i in g.get("params", ())):
            return saved
        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [names[id(p)] for g in self.opt.param_groups for p in g["params"]]
        held = sum(len(g["params"]) for g in groups)
        if held != len(order):
            raise ValueError(f"--resume: the checkpoint's optimizer holds {held} parameters, this run trains "
                             f"{len(order)}")
        return {"state": {order[i]: v for i, v in saved["state"].items()},
                "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups]}

    # one step ------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, int, float]:
        """One optimizer step: (its mean loss per labelled token, tokens it read over all processes,
        its learning rate)."""
        cfg, d = self.cfg, self.d
        micro = self.batches.micro_batches(self.step, cfg.grad_accum)
        n_tok = max(1, sum(labelled_tokens(lab) for _, lab in micro))
        tokens = sum(int((ids != self.pad).sum()) for ids, _ in micro)
        share = cfg.batch_size // d.world
        lo, hi = d.rank * share, (d.rank + 1) * share
        total = torch.zeros((), dtype=torch.float64)
        for j, (ids, labels) in enumerate(micro):
            ids, labels = ids[lo:hi].to(d.device), labels[lo:hi].to(d.device)
            sync = j == len(micro) - 1 or not hasattr(self.wrapped, "no_sync")
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                loss_sum = token_loss_sum(self.wrapped(input_ids=ids).logits, labels)
                # DDP and FSDP average the gradients over processes: scale by world to get the sum.
                (loss_sum * (d.world / n_tok)).backward()
            total += loss_sum.detach().double().cpu()
        lr = self.opt.param_groups[0]["lr"]
        self._optimizer_phase = True
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self._optimizer_phase = False
        return float(_all_sum(d, total)) / n_tok, tokens, lr

    # checkpoints ---------------------------------------------------------------------------------
    def save(self, eval_loss: float | None, train_loss: float | None, rng: dict | None = None) -> str | None:
        """A checkpoint of the state after self.step steps (all processes call it; rank 0 writes);
        `rng`: the RNG states to record (default: the current ones)."""
        cfg, d = self.cfg, self.d
        optim_state = self._optimizer_state()
        full_state = adapter_state = None
        if cfg.fsdp and cfg.method == "full":  # whole tensors gathered to rank 0's CPU (a collective)
            full_state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
        elif cfg.fsdp:  # only the adapter's factors, one at a time: never the (sharded) base model whole
            adapter_state = {}
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    whole = p.full_tensor() if hasattr(p, "full_tensor") else p
                    if d.main:
                        adapter_state[name] = whole.detach().cpu()
        path = None
        if d.main:
            state = {"optimizer": optim_state, "scheduler": self.sched.state_dict(), "rng": rng or rng_state(),
                     "step": self.step, "sequences_seen": self.step * cfg.grad_accum * cfg.batch_size,
                     "world_size": d.world}
            info = {"format": FORMAT, "step": self.step, "eval_loss": eval_loss, "train_loss": train_loss,
                    "total_steps": self.total, "sequences_seen": state["sequences_seen"],
                    "epoch": state["sequences_seen"] / len(self.train_rows), "settings": self.shared_settings()}

            def fill(stage: str) -> None:
                if cfg.method == "full":
                    self.model.save_pretrained(stage, state_dict=full_state)
                    if hasattr(self.tokenizer, "save_pretrained"):
                        self.tokenizer.save_pretrained(stage)
                elif adapter_state is not None:
                    save_adapter(adapter_skeleton(self.model.config, cfg, adapter_state), stage)
                else:
                    save_adapter(self.model, stage)
                torch.save(state, os.path.join(stage, STATE_NAME))
                with open(os.path.join(stage, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
                    json.dump(info, f, indent=1)

            path = self.manager.write(self.step, fill)
        _barrier(d)
        return path

    def _optimizer_state(self) -> dict:
        if self.cfg.fsdp:
            # The root keeps its parameters gathered after a forward (an eval just ran): reshard, so
            # that the model's parameters are the sharded ones the optimizer holds.
            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            return get_optimizer_state_dict(self.model, self.opt,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.opt.state_dict()

    # the loop ------------------------------------------------------------------------------------
    def eval_loss(self) -> float | None:
        if not self.eval_rows:
            return None
        return evaluate(self.wrapped if self.cfg.fsdp else self.model, self.eval_rows, self.cfg.batch_size,
                        self.pad, self.d.device)

    def run(self) -> TrainResult:
        cfg, d = self.cfg, self.d
        if d.main:
            self.manager.clean_stale()
        bar = progress_bar(total=self.total, initial=self.step, desc=f"lowrank train ({cfg.method})", unit="step",
                           disable=not (cfg.progress and d.main), dynamic_ncols=True)
        log = open(os.path.join(cfg.out, "log.jsonl"), "a", encoding="utf-8") if d.main else None
        loss, tokens_done, seconds, interrupted = None, 0, 0.0, False
        last_saved = self.resume_from.step if self.resume_from is not None else None
        held, whole = nf4_resident_bytes(self.model)
        if whole:  # QLoRA: each process's resident NF4 bytes, for the log (sharded under FSDP2)
            per_rank = [held]
            if d.world > 1:
                per_rank = [None] * d.world
                dist.all_gather_object(per_rank, held)
            if log:
                log.write(json.dumps({"nf4_resident_bytes_per_rank": per_rank, "nf4_bytes": whole}) + "\n")
        self._optimizer_phase = self._in_step = False
        self.wrapped.train()
        try:
            with _Stop() as stop:
                while self.step < self.total:
                    t0 = time.perf_counter()
                    self._step_start_rng = rng_state()  # what a checkpoint of a step cut short records
                    torch.manual_seed(dropout_seed(cfg.seed, self.step, d.rank))
                    self._in_step = True
                    loss, tokens, lr = self.train_step()
                    self._in_step = False
                    seconds += time.perf_counter() - t0
                    tokens_done += tokens
                    bar.update(1)
                    rate = tokens_done / max(seconds, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                    if log:
                        log.write(json.dumps({"step": self.step, "loss": loss, "lr": lr}) + "\n")
                    done = self.step == self.total
                    ev = None
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or done):
                        ev = self.last_eval = self.eval_loss()
                    saving = done or (cfg.save_every and self.step % cfg.save_every == 0)
                    if saving:
                        if ev is None and cfg.keep_best:
                            ev = self.last_eval = self.eval_loss()
                        self.save(ev, loss)
                        last_saved = self.step
                    if ev is not None:
                        if log:
                            log.write(json.dumps({"step": self.step, "eval_loss": ev}) + "\n")
                        if d.main and cfg.progress:
                            bar.write(f"step {self.step}: eval loss {ev:.4f}")
                    if log:
                        log.flush()
                    if self.on_step is not None:
                        self.on_step(self.step)
                    flag = _all_sum(d, torch.tensor(float(stop.requested)))
                    if float(flag) > 0 and not done:
                        interrupted = True
                        break
        except KeyboardInterrupt:
            interrupted = True
            if self._optimizer_phase:
                raise KeyboardInterrupt("interrupted while the optimizer updated the weights: no checkpoint written "
                                        "for this step; resume from the last one") from None
            if self.d.world > 1:
                raise  # another process may be inside a collective: no checkpoint can be agreed on
        finally:
            bar.close()
            if log:
                log.close()
        if interrupted and last_saved != self.step:
            self.opt.zero_grad(set_to_none=True)  # a step cut short leaves gradients behind
            self.save(None, loss, rng=self._step_start_rng if self._in_step else None)
            if d.main:
                print(f"lowrank train: interrupted; checkpoint at step {self.step} in "
                      f"{os.path.join(cfg.out, f'checkpoint-{self.step}')} (--resume continues)", file=sys.stderr)
        latest, best = self.manager.latest(), self.manager.best()
        return TrainResult(steps=self.step, total_steps=self.total, train_loss=loss, eval_loss=self.last_eval,
                           interrupted=interrupted, last_checkpoint=latest.path if latest else None,
                           best_checkpoint=best.path if best else None, trainable=self.trainable,
                           tokens_per_s=tokens_done / max(seconds, 1e-9))


# Note: NF4 under FSDP2
# FSDP2 shards what a module registers as parameters; an NF4Linear keeps its 4-bit storage in an
# NF4Weight, which FSDP would leave whole on every process. `expose_nf4_storage` registers the
# storage's large tensors (codes, block statistics, nested statistics) as frozen uint8 / fp32
# parameters of their NF4Linear, so `fully_shard` cuts them along dim 0 like any weight (they stay
# 4-bit: an all-gather moves the packed bytes, never a dense copy), and a forward pre-hook points
# the NF4Weight at the gathered tensors FSDP2 puts in their place for the forward. The QLoRA op
# saves those tensors for backward, and FSDP2 gathers into the same storage again before backward.
# The tiny shared tables (nested code, offset) stay whole on each process. FSDP2 requires one dtype
# among a group's *trainable* parameters only, so frozen uint8 / bf16 storage beside fp32 adapters
# is fine.
NF4_EXPOSED = ("packed", "absmax", "nested_absmax")


def expose_nf4_storage(model: nn.Module) -> int:
    """Register every NF4Linear's 4-bit storage as frozen parameters (see the Note); returns how many
    layers were changed. Only for a model about to be sharded by FSDP2 for training."""
    layers = []
    for module in model.modules():
        if isinstance(module, NF4Linear) and not hasattr(module, "nf4_packed"):
            for name in NF4_EXPOSED:
                t = getattr(module.nf4, name)
                if t is not None:
                    module.register_parameter(f"nf4_{name}", nn.Parameter(t, requires_grad=False))
            layers.append(module)
    # The hook goes on the NF4Linear and on its parent: a LoRALinear calls its base layer's
    # lora_forward directly, which runs no hook of the NF4Linear's.
    exposed = {id(m) for m in layers}
    for module in model.modules():
        children = [c for c in ([module] if id(module) in exposed else []) + list(module.children())
                    if id(c) in exposed]
        if children:
            module.register_forward_pre_hook(lambda _m, _args, children=children: [_point_nf4_at_parameters(c)
                                                                                   for c in children] and None)
    return len(layers)


def _point_nf4_at_parameters(module: nn.Module) -> None:
    module.nf4 = dataclasses.replace(module.nf4, **{name: getattr(module, f"nf4_{name}") for name in NF4_EXPOSED
                                                   if getattr(module.nf4, name) is not None})


def nf4_resident_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of NF4 storage this process holds, bytes of the whole NF4 storage) over the model's
    NF4Linear layers — codes, block statistics and nested statistics; the per-layer constant tables
    (256-entry nested code, offset: 1028 bytes a layer) are left out. The first counts every storage
    the layers refer to for those (their parameters' local shards, the NF4Weight's tensors, gathered
    copies not yet freed), each once, by its allocation."""
    held, whole = {}, 0
    for module in model.modules():
        if not isinstance(module, NF4Linear):
            continue
        tensors = [getattr(module, f"nf4_{n}", None) for n in NF4_EXPOSED]
        tensors += [getattr(module.nf4, n) for n in NF4_EXPOSED]
        for t in tensors:
            if t is None:
                continue
            local = t.to_local() if hasattr(t, "to_local") else t
            storage = local.untyped_storage()
            held[storage.data_ptr()] = max(held.get(storage.data_ptr(), 0), storage.nbytes())
        for n in NF4_EXPOSED:
            t = getattr(module.nf4, n)
            if t is not None:
                whole += t.numel() * t.element_size()
    return sum(held.values()), whole


def adapter_skeleton(config, cfg: TrainConfig, factors: dict) -> nn.Module:
    """The model of `config` on the meta device (no memory), patched as `cfg` patches, holding the
    whole adapter `factors` ({parameter name: tensor}, gathered from the shards): what
    `save_adapter` writes under FSDP2 without gathering the base model."""
    skeleton = meta_model(config)
    # modules_to_save copies: gathered as `<path>.modules_to_save.default.<param>`; their paths get no
    # LoRA (as on the trained model), and their wrappers are built here around meta originals (a
    # meta module cannot be copied for training, so patch_linear's modules_to_save is not used).
    saved = sorted({k.split(".modules_to_save.", 1)[0] for k in factors if ".modules_to_save." in k})
    inside = (lambda p, _m: any(p == q or p.startswith(q + ".") for q in saved)) if saved else None
    patch_linear(skeleton, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets, dora=cfg.dora,
                 adapter_dtype=torch.float32, exclude=inside)
    for path in saved:
        original = skeleton.get_submodule(path)
        wrapper = ModulesToSave(original)
        copy = wrapper.new_copy()
        for pname, _ in list(copy.named_parameters()):
            key = f"{path}.modules_to_save.default.{pname}"
            if key not in factors:
                raise ValueError(f"adapter_skeleton: no gathered tensor for {key}")
            owner, _, leaf = pname.rpartition(".")
            (copy.get_submodule(owner) if owner else copy)._parameters[leaf] = nn.Parameter(factors[key],
                                                                                           requires_grad=False)
        wrapper.attach_copy("default", copy)
        wrapper.active_adapter = "default"
        parent, _, attr = path.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, attr, wrapper)
    for path, layer in lora_layers(skeleton):
        for which in ("lora_A", "lora_B", "lora_magnitude_vector") if cfg.dora else ("lora_A", "lora_B"):
            table = getattr(layer, which)
            for name in list(table):
                key = f"{path}.{which}.{name}"
                if key not in factors:
                    raise ValueError(f"adapter_skeleton: no gathered tensor for {key}")
                table[name] = nn.Parameter(factors[key], requires_grad=False)
    return skeleton


def shard_fsdp2(model: nn.Module) -> nn.Module:
    """FSDP2: `fully_shard` on each decoder layer (the classes the model lists in
    `_no_split_modules`), then on the whole model; NF4 storage sharded too (see the Note)."""
    expose_nf4_storage(model)
    names = set(getattr(model, "_no_split_modules", None) or ())
    for m in list(model.modules()):
        if type(m).__name__ in names:
            fully_shard(m)
    fully_shard(model)
    # The NF4Weights still hold the whole tensors the shards were cut from: point them at the
    # shards, so that only the shards stay resident (the pre-hook swaps in gathered ones).
    for m in model.modules():
        if isinstance(m, NF4Linear) and hasattr(m, "nf4_packed"):
            _point_nf4_at_parameters(m)
    return model


def train(cfg: TrainConfig, on_step=None) -> TrainResult:
    """Run the job `cfg` describes (see the module's Notes); `on_step(step)` is called after each
    optimizer step (and its eval and checkpoint). Raises ValueError for a bad setting, file or model
    before anything is written. Under torchrun, every process calls it; rank 0 writes."""
    cfg.check()
    owned = not dist.is_initialized()
    d = setup_distributed()
    try:
        return _train(cfg, d, on_step)
    finally:
        if owned and dist.is_initialized():  # the group this call made: gone before the interpreter exits
            # The job's model, DDP reducer and FSDP2 state sit in reference cycles: collect them now,
            # while the group and the interpreter are whole, rather than whenever the collector runs
            # (at exit, gloo's work objects would be torn down after the group).
            gc.collect()
            with contextlib.suppress(RuntimeError):  # a peer that already failed
                dist.barrier()  # no process tears down gloo's connections while another still uses them
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, on_step) -> TrainResult:
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global micro-batch and must divide evenly over "
                         f"{d.world} processes")
    if cfg.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp needs several processes: run under torchrun --nproc-per-node K")
    job = _Job(cfg, d, on_step)
    job.data()
    job.build()
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
    _barrier(d)
    return job.run()
