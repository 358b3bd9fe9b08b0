"""`lowrank compare`: full fine-tuning, LoRA and QLoRA measured on one compute budget — what each
trains, costs in memory and time, gains on the task and loses of general ability.

The built-in setting needs no download: a small Llama-architecture model is first pretrained on a
built-in "general" corpus (three skills: counting with a stride, copying, and a fixed Markov
chain), cached under the user's cache directory; it is then fine-tuned on a narrow task it has never
seen (copying a sequence through a fixed permutation of its symbols) by each method from the same starting weights. Every method gets the
same training FLOPs (or the same wall-clock with `budget="time"`), counted by `lowrank.plan`'s
FLOP model for this architecture, so a method that is cheaper per step takes more steps.

Measured per method: trainable parameters, peak memory (process resident peak; on a GPU the CUDA
allocator's peak), peak live tensor bytes (`TensorMemory` on the CPU, the allocator peak on a GPU)
next to the planner's prediction for the same setup, seconds per step and tokens/s, task loss and
accuracy before and after, general-corpus loss before and after (forgetting), and the checkpoint
size on disk (a full model or an adapter).

Level 5 (jobs): imports levels 0-5 (lowrank.plan).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field

import safetensors.torch
import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from .adapter_files import save_adapter
from .patch import patch_linear, trainable_parameters
from .plan import Setup, arch_of, count, flops_per_token, memory
from .tensor_memory import TensorMemory
from .train import encode, progress_bar, read_records

METHODS = ("full", "lora", "qlora", "dora", "qdora")  # dora / qdora: LoRA / QLoRA with DoRA adapters
DEFAULT_METHODS = ("full", "lora", "qlora")
NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "qdora": "QLoRA+DoRA"}


def _plan_method(method: str) -> tuple[str, bool]:
    """(the planner's method, DoRA adapters or not) for one of METHODS."""
    return {"dora": ("lora", True), "qdora": ("qlora", True)}.get(method, (method, False))

# -- the built-in world --------------------------------------------------------------------------
# Token ids: 0 BOS, 1 SEP, 2-5 task markers, 8.. data symbols.
BOS, SEP, COUNT, COPY, MARKOV, MAP = 0, 1, 2, 3, 4, 5
FIRST_SYMBOL, SYMBOLS = 8, 40
VOCAB = FIRST_SYMBOL + SYMBOLS
SEQ = 32
HALF = (SEQ - 2) // 2  # symbols in the prompt of a copy / reverse sequence


def builtin_config():
    from transformers import LlamaConfig  # optional: the built-in model is a transformers Llama

    return LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def _markov_table() -> torch.Tensor:
    """A fixed transition matrix over the symbols: each has three likely successors."""
    g = torch.Generator().manual_seed(1234)
    table = torch.full((SYMBOLS, SYMBOLS), 0.02 / SYMBOLS)
    for s in range(SYMBOLS):
        nxt = torch.randperm(SYMBOLS, generator=g)[:3]
        table[s, nxt] += torch.tensor([0.55, 0.28, 0.15])
    return table / table.sum(1, keepdim=True)


_MARKOV = _markov_table()


def general_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of n general-corpus sequences: a third each of counting, copying, Markov text."""
    kind = torch.randint(0, 3, (n,), generator=g)
    ids = torch.empty(n, SEQ, dtype=torch.long)
    start = torch.randint(0, SYMBOLS, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    count_seq = (start + stride * torch.arange(SEQ - 1)) % SYMBOLS
    prompt = torch.randint(0, SYMBOLS, (n, HALF), generator=g)
    copy_seq = torch.cat([prompt, torch.full((n, 1), SEP - FIRST_SYMBOL), prompt], 1)
    chain = torch.empty(n, SEQ - 1, dtype=torch.long)
    chain[:, 0] = start[:, 0]
    for t in range(1, SEQ - 1):
        chain[:, t] = torch.multinomial(_MARKOV[chain[:, t - 1]], 1, generator=g)[:, 0]
    body = torch.where(kind[:, None] == 0, count_seq, torch.where(kind[:, None] == 1, copy_seq, chain))
    ids[:, 1:] = body + FIRST_SYMBOL
    ids[kind == 1, 1 + HALF] = SEP
    ids[:, 0] = torch.tensor([COUNT, COPY, MARKOV])[kind]
    return ids, ids.clone()


_PERMUTATION = torch.randperm(SYMBOLS, generator=torch.Generator().manual_seed(4321))


def task_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of n task sequences: MAP x1..xk SEP f(x1)..f(xk), with f a fixed permutation of
    the symbols (copying, which pretraining taught, through a lookup it did not); the loss on the
    answer only."""
    prompt = torch.randint(0, SYMBOLS, (n, HALF), generator=g)
    ids = torch.cat([torch.full((n, 1), MAP), prompt + FIRST_SYMBOL, torch.full((n, 1), SEP),
                     _PERMUTATION[prompt] + FIRST_SYMBOL], 1)
    labels = ids.clone()
    labels[:, : HALF + 2] = -100
    return ids, labels


# -- measuring -----------------------------------------------------------------------------------

def _rss_peak_reset() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@torch.no_grad()
def evaluate(model: nn.Module, batches: list) -> tuple[float, float]:
    """(mean loss per labelled token, next-token accuracy on the labelled tokens)."""
    model.eval()
    total, right, n = 0.0, 0, 0
    for ids, labels in batches:
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = labels[:, 1:]
        mask = target != -100
        total += nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
        right += (logits.argmax(-1)[mask] == target[mask]).sum().item()
        n += int(mask.sum())
    model.train()
    return total / n, right / n


def _train_step(model, opt, ids, labels) -> float:
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


# -- workloads: what is trained and evaluated -----------------------------------------------------

# Learning rates per method: the built-in model's (pretrained at 3e-3), and the usual ones for a
# pretrained transformers model (LoRA's about 10x full fine-tuning's).
BUILTIN_LR = {"full": 3e-4, "lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "qdora": 1e-3}
MODEL_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "dora": 2e-4, "qdora": 2e-4}


def cache_dir() -> str:
    root = os.environ.get("LOWRANK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lowrank")
    return os.path.join(root, "compare")


def _save_atomic(state: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pretrained_builtin(steps: int = 400, batch: int = 32, lr: float = 3e-3, seed: int = 0,
                       progress: bool = True, cache: bool = True) -> nn.Module:
    """The built-in model after `steps` of pretraining on the general corpus; cached on disk (keyed on
    everything that changes the weights) so later runs load it."""
    from transformers import LlamaForCausalLM  # optional: the built-in model is a transformers Llama

    config = builtin_config()
    key = hashlib.sha256(json.dumps([config.to_dict(), steps, batch, lr, seed, SEQ, _MARKOV.sum().item(),
                                     _PERMUTATION.tolist(), torch.__version__.split("+")[0]], sort_keys=True,
                                    default=str).encode())
    path = os.path.join(cache_dir(), f"general-{key.hexdigest()[:16]}.safetensors")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if cache and os.path.isfile(path):
        try:
            model.load_state_dict(safetensors.torch.load_file(path))
            return model
        except (OSError, RuntimeError, ValueError, safetensors.SafetensorError):
            pass  # a damaged cache file: pretrain again and replace it
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 30) * 0.5 *
                                              (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    bar = progress_bar(iterable=range(steps), desc="pretraining the built-in model on its general corpus (cached after "
               "this run)", disable=not progress, leave=False)
    for _ in bar:
        loss = _train_step(model, opt, *general_batch(batch, g))
        sched.step()
        bar.set_postfix(loss=f"{loss:.3f}")
    if cache:
        _save_atomic(model.state_dict(), path)
    return model


@dataclass
class Workload:
    """A starting model, a stream of training batches, and the task and general evaluation sets."""
    description: str
    config: object
    seq: int
    batches: object                 # (batch size, torch.Generator) -> (ids, labels)
    eval_sets: dict                 # "task" / "general" -> [(ids, labels), ...]
    start: dict | None = None       # the built-in model's starting weights
    model_dir: str | None = None    # or a local transformers model, loaded afresh per method
    default_lr: dict = field(default_factory=lambda: dict(BUILTIN_LR))

    def model(self) -> nn.Module:
        if self.model_dir is not None:
            from transformers import AutoModelForCausalLM  # optional: compare runs transformers models

            return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32, local_files_only=True)
        from transformers import LlamaForCausalLM  # optional: the built-in model is a transformers Llama

        model = LlamaForCausalLM(self.config)
        model.load_state_dict(self.start)
        return model


def builtin_workload(pretrain_steps: int = 400, seed: int = 0, progress: bool = True, cache: bool = True,
                     eval_batches: int = 4) -> Workload:
    model = pretrained_builtin(steps=pretrain_steps, seed=seed, progress=progress, cache=cache)
    g = torch.Generator().manual_seed(10_000 + seed)
    evals = {"task": [task_batch(64, g) for _ in range(eval_batches)],
             "general": [general_batch(64, g) for _ in range(eval_batches)]}
    return Workload(description=f"built-in Llama (4 layers, hidden 128, 4 heads / 2 KV, vocab {VOCAB}), pretrained "
                                f"{pretrain_steps} steps on counting, copying and Markov text; task: copy through "
                                f"a fixed permutation",
                    config=model.config, seq=SEQ, batches=task_batch, eval_sets=evals,
                    start={k: v.detach().clone() for k, v in model.state_dict().items()})


def file_workload(model_dir: str, data: str, general: str | None = None, seq: int = 256, seed: int = 0,
                  eval_examples: int = 64, generations: int = 32, progress: bool = True) -> Workload:
    """A local transformers model and the user's data; the general corpus is `general` or, without
    it, the model's own sampled continuations of its BOS token (its general behaviour before tuning)."""
    from transformers import AutoConfig, AutoTokenizer  # optional: compare runs transformers models

    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model {model_dir}: not a local transformers model directory (no config.json)")
    records = read_records(data, "--data")  # a missing or malformed file is named before the model loads
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {model_dir}: no usable tokenizer there (save the model's tokenizer beside it, "
                         f"tokenizer.save_pretrained(DIR)); transformers said: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=g).tolist()
    n_eval = max(1, min(eval_examples, len(records) // 10))
    evals_r, train_r = [records[i] for i in order[:n_eval]], [records[i] for i in order[n_eval:]]
    train_ids, train_labels = encode(train_r, tokenizer, seq)
    eval_ids, eval_labels = encode(evals_r, tokenizer, seq)
    if general is not None:
        gen = read_records(general, "--general")[:eval_examples]
        gen_ids, gen_labels = encode([{"text": r.get("text", f"{r.get('prompt', '')}{r.get('completion', '')}")}
                                       for r in gen], tokenizer, seq)
        general_desc = f"general corpus {general}"
    else:
        wl = Workload("", config, seq, None, {}, model_dir=model_dir)
        model = wl.model().eval()
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        torch.manual_seed(seed)
        with torch.no_grad():
            gen_ids = model.generate(torch.full((generations, 1), bos), do_sample=True, max_new_tokens=seq - 1,
                                     min_new_tokens=seq - 1, pad_token_id=bos, top_k=0, top_p=1.0)
        gen_labels = gen_ids.clone()
        general_desc = f"{generations} of the model's own samples"

    def batches(n, gen_):
        idx = torch.randint(0, train_ids.shape[0], (n,), generator=gen_)
        return train_ids[idx], train_labels[idx]

    chunk = lambda a, b: [(a[i:i + 16], b[i:i + 16]) for i in range(0, a.shape[0], 16)]  # noqa: E731
    return Workload(description=f"{model_dir} on {data} ({len(train_r)} training, {n_eval} held-out records; "
                                f"{general_desc})",
                    config=config, seq=seq, batches=batches,
                    eval_sets={"task": chunk(eval_ids, eval_labels), "general": chunk(gen_ids, gen_labels)},
                    model_dir=model_dir, default_lr=dict(MODEL_LR))


# -- one method ----------------------------------------------------------------------------------

@dataclass
class MethodResult:
    method: str
    trainable: int
    steps: int
    seconds_per_step: float
    tokens_per_s: float
    train_flops: float
    rss_peak_bytes: int         # process resident peak over the training (CPU)
    tensor_peak_bytes: int      # live tensors at the peak of one step (TensorMemory; CUDA allocator on a GPU)
    predicted_peak_bytes: int   # lowrank.plan's memory model for the same step
    task_loss: tuple            # (before, after)
    task_acc: tuple
    general_loss: tuple
    general_acc: tuple
    checkpoint_bytes: int
    curve: dict = field(default_factory=dict)  # training FLOPs -> (task loss, general loss)




def prepare(model: nn.Module, method: str, rank: int) -> nn.Module:
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        base, dora = _plan_method(method)
        patch_linear(model, rank=rank, quantize="nf4" if base == "qlora" else None,
                     compute_dtype=torch.float32 if base == "qlora" else None, dora=dora)
    return model


def _to(batch, device):
    return tuple(t.to(device) for t in batch)


def run_method(method: str, work: Workload, *, rank: int, batch: int, budget_flops: float | None,
               budget_seconds: float | None, lr: float, seed: int, out_dir: str, device: str = "cpu",
               evals: int = 6, progress: bool = True) -> MethodResult:
    """Fine-tune the workload's starting model with one method for the budget; measure it."""
    torch.manual_seed(seed)
    model = work.model().to(device)
    ev = {k: [_to(b, device) for b in v] for k, v in work.eval_sets.items()}
    task_before, general_before = evaluate(model, ev["task"]), evaluate(model, ev["general"])
    prepare(model, method, rank)
    trainable, _ = trainable_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    arch = arch_of(work.config, "compare")
    base, dora = _plan_method(method)
    counts = count(work.config, arch, rank, "all-linear", dora=dora)
    step_flops = flops_per_token(arch, counts, base, work.seq, False, tokens_per_pass=batch * work.seq)["total"] \
        * batch * work.seq
    steps = None if budget_flops is None else max(3, int(budget_flops // step_flops))
    g = torch.Generator().manual_seed(seed + 7)
    model.train()
    # Step 1 allocates the optimizer state; step 2 is measured.
    _train_step(model, opt, *_to(work.batches(batch, g), device))
    ids, labels = _to(work.batches(batch, g), device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _train_step(model, opt, ids, labels)
        tensor_peak = torch.cuda.max_memory_allocated()
    else:
        with TensorMemory([model, opt]) as mem:
            _train_step(model, opt, ids, labels)
        tensor_peak = mem.peak_bytes
    predicted = memory(arch, counts, Setup(method=base, rank=rank, batch=batch, seq=work.seq, optimizer="adamw",
                                           grad_ckpt="off", precision="fp32",
                                           foreach=device == "cuda"), False).peak
    resettable = _rss_peak_reset()
    done, t_train, curve, next_eval = 2, 0.0, {}, 1
    bar = progress_bar(total=steps, desc=f"{method:>5}", disable=not progress, leave=True, unit="step")
    bar.update(2)
    while (done < steps) if steps is not None else (t_train < budget_seconds):
        b = _to(work.batches(batch, g), device)
        t0 = time.perf_counter()
        loss = _train_step(model, opt, *b)
        if device == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        done += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{(done - 2) * batch * work.seq / max(t_train, 1e-9):,.0f}")
        progress_frac = done / steps if steps is not None else t_train / budget_seconds
        if progress_frac >= next_eval / evals:
            curve[done * step_flops] = (evaluate(model, ev["task"][:2])[0], evaluate(model, ev["general"][:2])[0])
            next_eval += 1
    bar.close()
    rss_peak = rss_peak_bytes() if resettable or device == "cpu" else 0
    task_after, general_after = evaluate(model, ev["task"]), evaluate(model, ev["general"])
    path = os.path.join(out_dir, method)
    if method == "full":
        _save_atomic(model.state_dict(), os.path.join(path, "model.safetensors"))
    else:
        save_adapter(model, path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    timed = max(done - 2, 1)
    return MethodResult(method=method, trainable=trainable, steps=done, seconds_per_step=t_train / timed,
                        tokens_per_s=timed * batch * work.seq / max(t_train, 1e-9), train_flops=done * step_flops,
                        rss_peak_bytes=rss_peak, tensor_peak_bytes=tensor_peak, predicted_peak_bytes=predicted,
                        task_loss=(task_before[0], task_after[0]), task_acc=(task_before[1], task_after[1]),
                        general_loss=(general_before[0], general_after[0]),
                        general_acc=(general_before[1], general_after[1]), checkpoint_bytes=size,
                        curve={f"{k:.6g}": v for k, v in sorted(curve.items())})


# -- the comparison ------------------------------------------------------------------------------

@dataclass
class Comparison:
    setting: dict
    results: dict            # method -> MethodResult
    reading: str

    def to_json(self) -> dict:
        return {"setting": self.setting, "results": {m: dataclasses.asdict(r) for m, r in self.results.items()},
                "reading": self.reading}


def compare(methods=DEFAULT_METHODS, *, rank: int = 4, batch: int = 16, full_steps: int = 120, budget: str = "flops",
            seconds: float | None = None, out_dir: str = "lowrank-compare", seed: int = 0, lr: dict | None = None,
            progress: bool = True, workload: Workload | None = None, pretrain_steps: int = 400,
            cache: bool = True, device: str = "cpu") -> Comparison:
    """Fine-tune with each method on one budget and measure. The budget is the training FLOPs of
    `full_steps` steps of full fine-tuning (budget="flops"), or `seconds` of training per method
    (budget="time"). The workload defaults to the built-in one."""
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"compare: methods must be among {', '.join(METHODS)}, got {methods}")
    if budget not in ("flops", "time"):
        raise ValueError(f"compare: budget must be 'flops' or 'time', got {budget!r}")
    if budget == "time" and not (seconds and seconds > 0):
        raise ValueError("compare: budget 'time' needs seconds > 0")
    if budget != "time" and seconds is not None:  # it would be ignored: every method gets the same FLOPs
        raise ValueError(f"compare: seconds={seconds!r} is for budget 'time' (--budget time --seconds S); the "
                         f"budget is {budget!r}")
    for name, v in (("rank", rank), ("batch", batch), ("full_steps", full_steps), ("pretrain_steps", pretrain_steps)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"compare: {name} must be a positive integer, got {v!r}")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"compare: device must be 'cpu' or 'cuda' (with a GPU present), got {device!r}")
    work = workload or builtin_workload(pretrain_steps=pretrain_steps, seed=seed, progress=progress, cache=cache)
    lr = {**work.default_lr, **(lr or {})}
    budget_flops = None
    if budget == "flops":
        arch = arch_of(work.config, "compare")
        full_counts = count(work.config, arch, rank, "all-linear")
        budget_flops = full_steps * batch * work.seq * flops_per_token(arch, full_counts, "full", work.seq,
                                                                       False)["total"]
    os.makedirs(out_dir, exist_ok=True)
    results = {m: run_method(m, work, rank=rank, batch=batch, budget_flops=budget_flops, budget_seconds=seconds,
                             lr=lr[m], seed=seed, out_dir=out_dir, device=device, progress=progress)
               for m in methods}
    setting = {"workload": work.description, "rank": rank, "batch": batch, "seq": work.seq, "budget": budget,
               "budget_flops": budget_flops, "budget_seconds": seconds, "lr": {m: lr[m] for m in methods},
               "seed": seed, "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__}
    comparison = Comparison(setting=setting, results=results, reading=reading(results, budget))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(comparison.to_json(), f, indent=1)
    plot(results, os.path.join(out_dir, "curves.png"))
    return comparison


def reading(results: dict, budget: str = "flops") -> str:
    """One paragraph: each method's share of full fine-tuning's task gain, its memory and forgetting."""
    def gain(r):
        return r.task_loss[0] - r.task_loss[1]

    def forgot(r):
        return r.general_loss[1] - r.general_loss[0]

    names = NAMES
    full = results.get("full")
    parts = []
    for m, r in results.items():
        if full is None or m == "full":
            parts.append(f"{names[m]}: task loss {r.task_loss[0]:.3f} -> {r.task_loss[1]:.3f}, general loss "
                         f"{r.general_loss[0]:.3f} -> {r.general_loss[1]:.3f}")
            continue
        share = f"{gain(r) / gain(full):.0%}" if gain(full) > 0 else "n/a"
        parts.append(f"{names[m]} reached {share} of full fine-tuning's task-loss gain ({gain(r):.3f} vs "
                     f"{gain(full):.3f}) with {r.tensor_peak_bytes / full.tensor_peak_bytes:.0%} of its peak tensor "
                     f"memory and {r.trainable / full.trainable:.2%} of its trainable parameters, and its general "
                     f"loss moved by {forgot(r):+.3f} where full fine-tuning's moved by {forgot(full):+.3f}")
    same = "training FLOPs" if budget == "flops" else "training time"
    return "; ".join(parts) + f". Every method had the same {same}."


def plot(results: dict, path: str) -> str | None:
    """Task and general loss against training FLOPs, one line per method (PNG); None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for m, r in results.items():
        xs = [0.0] + [float(k) for k in r.curve]
        axes[0].plot(xs, [r.task_loss[0]] + [v[0] for v in r.curve.values()], marker="o", label=m)
        axes[1].plot(xs, [r.general_loss[0]] + [v[1] for v in r.curve.values()], marker="o", label=m)
    for ax, title in zip(axes, ("task loss", "general-corpus loss (forgetting)")):
        ax.set_title(title)
        ax.set_xlabel("training FLOPs")
        ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


ROWS = ("trainable", "steps", "s/step", "tokens/s", "peak RSS", "peak tensors", "plan's prediction", "task loss",
        "task accuracy", "general loss", "general accuracy", "checkpoint")


def table_rows(comparison: Comparison) -> dict:
    """Row name -> one formatted cell per method (the table `render` prints)."""
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    arrow = lambda a, f: f"{f(a[0])} -> {f(a[1])}"  # noqa: E731
    rs = list(comparison.results.values())
    return {
        "trainable": [f"{r.trainable:,}" for r in rs],
        "steps": [str(r.steps) for r in rs],
        "s/step": [f"{r.seconds_per_step:.3f}" for r in rs],
        "tokens/s": [f"{r.tokens_per_s:,.0f}" for r in rs],
        "peak RSS": [mib(r.rss_peak_bytes) if r.rss_peak_bytes else "-" for r in rs],
        "peak tensors": [mib(r.tensor_peak_bytes) for r in rs],
        "plan's prediction": [f"{mib(r.predicted_peak_bytes)} ({r.predicted_peak_bytes / r.tensor_peak_bytes - 1:+.1%})"
                              for r in rs],
        "task loss": [arrow(r.task_loss, lambda x: f"{x:.3f}") for r in rs],
        "task accuracy": [arrow(r.task_acc, lambda x: f"{x:.1%}") for r in rs],
        "general loss": [arrow(r.general_loss, lambda x: f"{x:.3f}") for r in rs],
        "general accuracy": [arrow(r.general_acc, lambda x: f"{x:.1%}") for r in rs],
        "checkpoint": [mib(r.checkpoint_bytes) for r in rs],
    }


def render(comparison: Comparison, console=None) -> None:
    console = console or Console()
    s = comparison.setting
    same = (f"{s['budget_flops']:.3g} training FLOPs" if s["budget"] == "flops"
            else f"{s['budget_seconds']:g} s of training")
    t = Table(title=f"lowrank compare: each method on {same}", show_edge=False)
    t.add_column("")
    for m in comparison.results:
        t.add_column(m, justify="right")
    for name, cells in table_rows(comparison).items():
        t.add_row(name, *cells)
    console.print(s["workload"])
    console.print(t)
    console.print(comparison.reading)
