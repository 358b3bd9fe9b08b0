"""The `lowrank` command.

    lowrank plan --model PRESET|config.json|DIR [--method all] [--rank R] [--gpu h100-80gb] ...
                                           full fine-tuning vs LoRA vs QLoRA: counts, memory per GPU,
                                           time, and a recommendation (`lowrank plan -h`)
    lowrank compare [--methods full,lora,qlora] [--budget flops|time] [--model DIR --data FILE]
                                           the methods trained on one budget and measured (`make demo`)
    lowrank train --model DIR|PRESET --data FILE [--method full|lora|qlora] [--steps N] --out DIR ...
                                           fine-tune: progress bar, eval, checkpoints kept by eval
                                           loss, Ctrl-C and --resume, torchrun (DDP / --fsdp)
    lowrank demo [--steps 60] [--rank 8] [--out DIR]
                                           train a small Llama (from a config, random init) with LoRA
                                           on a built-in synthetic task and show the loss going down,
                                           then save the adapter (peft format) and merge it
    lowrank inspect ADAPTER [--base DIR] [--plot FILE] [--json] [--top-k 4]
                                           per layer: singular values of s*B@A, effective rank, energy,
                                           condition number, norm relative to the base; rank collapse
                                           and a suggested rank
    lowrank merge BASE ADAPTER OUT [--dtype auto] [--requantize] [--force]
                                           the adapter merged into the model's safetensors shards (one
                                           shard in memory at a time), loadable by from_pretrained
    lowrank info                           versions, native library build, kernel backend
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

from . import __version__, native
from . import compare as compare_job
from . import inspect_adapter as inspect_job
from . import merge_files as merge_files_job
from . import plan as plan_job
from . import train as train_job
from .adapter_files import save_adapter
from .backend import backend_for
from .merge import merge_and_unload
from .patch import lora_layers, patch_linear, trainable_parameters


def _progress(i: int, n: int, loss: float, t0: float, width: int = 30) -> None:
    done = int(width * i / n)
    rate = i / max(time.perf_counter() - t0, 1e-9)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} loss {loss:.4f} {rate:.1f} it/s")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def synthetic_batch(batch: int, seq: int, vocab: int, generator):
    """The built-in task: each sequence counts upwards mod `vocab` from a random start with a
    random stride in {1, 2, 3}; the model must infer the stride from the prefix."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + stride * torch.arange(seq)) % vocab


def demo(steps: int = 60, rank: int = 8, seed: int = 0, lr: float = 3e-3, quiet: bool = False,
         out_dir: str | None = None) -> list[float]:
    """Patch a small random Llama with LoRA and train it; returns the loss per step. With out_dir,
    then save the adapter there (peft format) and merge it into the model."""
    from transformers import LlamaConfig, LlamaForCausalLM  # optional: the demo builds a Llama

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    patch_linear(model, rank=rank)
    trainable, total = trainable_parameters(model)
    say = (lambda *a: None) if quiet else print
    say(f"Llama from a config: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; "
        f"LoRA r={rank} on {len(list(lora_layers(model)))} linear layers")
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        ids = synthetic_batch(16, 32, cfg.vocab_size, g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not quiet:
            _progress(step, steps, losses[-1], t0)
    k = max(1, steps // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    say(f"loss: first {k} steps {first:.4f} -> last {k} steps {last:.4f}")
    if out_dir is not None:
        model.eval()
        ids = synthetic_batch(4, 32, cfg.vocab_size, g)
        with torch.no_grad():
            lora_logits = model(input_ids=ids).logits
        save_adapter(model, out_dir)
        say(f"adapter saved in peft's format: {out_dir}/adapter_config.json, adapter_model.safetensors")
        merge_and_unload(model)
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - lora_logits).abs().max().item()
        say(f"merged into the base weights (native merge, one rounding): max |logit diff| vs LoRA model {diff:.2e}")
    return losses


def info() -> None:
    print(f"lowrank {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    try:
        import triton  # optional

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (reference path only)")
    print(f"native library: {native.info()}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {dev}: backend {backend_for(torch.empty(0, device=dev))}")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, unless the help already says it or there is none (None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "(default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2, no usage dump; --help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _targets(text: str):
    return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="full fine-tuning vs LoRA vs QLoRA: will it fit, what will it cost")
    p.add_argument("--model", default="llama-3-8b",
                   help=f"a preset ({', '.join(plan_job.PRESETS)}), a config.json or a local model directory")
    p.add_argument("--method", default="all", choices=(*plan_job.METHODS, "all"))
    p.add_argument("--rank", type=_positive_int, default=None,
                   help="LoRA / QLoRA rank (default: the objective's usual one: instruction 16, task 8, domain 64)")
    p.add_argument("--targets", type=_targets, default="all-linear",
                   help="all-linear, or comma-separated module names (q_proj,v_proj)")
    p.add_argument("--batch", type=_positive_int, default=4, help="micro-batch per GPU, in sequences")
    p.add_argument("--seq", type=_positive_int, default=2048, help="tokens per sequence")
    p.add_argument("--gpu", default="h100-80gb", choices=tuple(plan_job.GPUS))
    p.add_argument("--gpu-mem", type=float, default=None, help="GPU memory in GiB (overrides --gpu's)")
    p.add_argument("--gpus", type=_positive_int, default=1)
    p.add_argument("--optimizer", default="adamw", choices=plan_job.OPTIMIZERS)
    p.add_argument("--grad-ckpt", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--precision", default="bf16-mixed", choices=plan_job.PRECISIONS)
    p.add_argument("--objective", default="instruction", choices=plan_job.OBJECTIVES)
    p.add_argument("--examples", type=_positive_int, default=200_000)
    p.add_argument("--tokens-per-example", type=_positive_int, default=None, help="default: --seq")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--variants", type=_positive_int, default=1, help="fine-tuned variants to train and store")
    p.add_argument("--mfu", type=float, default=None, help="assumed utilisation, 0-1 (default: per GPU kind)")
    p.add_argument("--dora", action="store_true", help="LoRA and QLoRA with DoRA adapters")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="full fine-tuning, LoRA and QLoRA trained on one budget and measured")
    p.add_argument("--methods", default="full,lora,qlora",
                   help="comma-separated: full, lora, qlora, dora (LoRA with DoRA adapters), qdora (QLoRA with DoRA)")
    p.add_argument("--rank", type=_positive_int, default=4)
    p.add_argument("--batch", type=_positive_int, default=16)
    p.add_argument("--steps", type=_positive_int, default=120,
                   help="the budget: the training FLOPs of this many full fine-tuning steps")
    p.add_argument("--budget", default="flops", choices=("flops", "time"))
    p.add_argument("--seconds", type=float, default=None, help="with --budget time: seconds of training per method")
    p.add_argument("--lr", default=None, help="learning rates, e.g. full=3e-4,lora=1e-3,qlora=1e-3")
    p.add_argument("--out", default="lowrank-compare", help="results.json, curves.png and the checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=_positive_int, default=400)
    p.add_argument("--no-cache", action="store_true", help="pretrain the built-in model again, cache nothing")
    p.add_argument("--model", default=None, help="a local transformers model directory (instead of the built-in)")
    p.add_argument("--data", default=None, help="with --model: JSONL of {text} or {prompt, completion}")
    p.add_argument("--general", default=None, help="with --model: the general corpus (JSONL or .txt)")
    p.add_argument("--seq", type=_positive_int, default=256, help="with --model: tokens per sequence")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="the spectrum of each layer of a LoRA adapter: effective rank, rank "
                                       "collapse, a rank for the next run")
    p.add_argument("adapter", help="a peft LoRA adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="the base transformers model directory: adds |s*B@A|_F / |W|_F")
    p.add_argument("--plot", default=None, help="write a PNG heat map (layers x singular values) here")
    p.add_argument("--top-k", type=_positive_int, default=4, help="report the energy share of the top k values")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_inspect(args) -> None:
    report = inspect_job.inspect_adapter(args.adapter, base=args.base, top_k=args.top_k)
    if args.plot:
        inspect_job.plot(report, args.plot)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        inspect_job.render(report)
        if args.plot:
            print(f"heat map: {args.plot}")


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into a transformers model's files, one shard at a time")
    p.add_argument("base", help="the base transformers causal-LM directory (config.json, safetensors; NF4 "
                                "bitsandbytes 4-bit checkpoints too)")
    p.add_argument("adapter", help="a peft LoRA adapter directory")
    p.add_argument("out", help="the merged model's directory (written complete, then renamed into place)")
    p.add_argument("--dtype", default="auto", choices=tuple(merge_files_job.DTYPES),
                   help="auto keeps each tensor's stored dtype")
    p.add_argument("--requantize", action="store_true",
                   help="NF4 base: quantize the merged layers back to NF4 instead of writing a dense model")
    p.add_argument("--force", action="store_true", help="replace OUT if it is not empty")


def run_merge(args) -> None:
    stats = merge_files_job.merge_files(args.base, args.adapter, args.out, requantize=args.requantize,
                                        dtype=args.dtype, force=args.force, progress=True)
    mib = 2.0 ** 20
    print(f"merged {stats.layers} layer(s) into {stats.shards} shard(s): {stats.out} (largest set of tensors held at "
          f"once {stats.largest_held_bytes / mib:.1f} MiB; largest base shard {stats.largest_shard_bytes / mib:.1f} "
          f"MiB, model {stats.total_bytes / mib:.1f} MiB)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a local model (or a preset) on a JSONL / text file: full, LoRA, QLoRA",
                       description="Fine-tune with full fine-tuning, LoRA or QLoRA; checkpoints under "
                                   "OUT/checkpoint-<step>/ (peft adapter, or the whole model for full). Runs "
                                   "unchanged under torchrun --nproc-per-node K (DDP, or --fsdp for FSDP2).")
    p.add_argument("--model", required=True,
                   help="a local transformers model directory, or a preset / config.json (random weights)")
    p.add_argument("--data", required=True,
                   help="JSONL of {text} or {prompt, completion} (loss on the completion only), or a .txt file")
    p.add_argument("--out", required=True, help="the output directory (checkpoints, log.jsonl)")
    p.add_argument("--method", default="lora", choices=train_job.METHODS, help="what is trained")
    p.add_argument("--rank", type=_positive_int, default=None,
                   help=f"LoRA rank (default: {train_job.TrainConfig.rank}); lora / qlora only")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--targets", type=_targets, default=None,
                   help="all-linear (the default), or comma-separated module names (q_proj,v_proj); lora / qlora only")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    lrs = ", ".join(f"{k} {v:g}" for k, v in train_job.DEFAULT_LR.items())
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {lrs})")
    p.add_argument("--warmup", type=_nonneg_int, default=0, help="linear warm-up steps, then cosine decay to 0")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, default=None, help="epochs over the training split (default: 1)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="global micro-batch, in sequences, split over the processes")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--eval-every", type=_nonneg_int, default=100, help="eval loss every N steps (0: only at checkpoints, to rank them for --keep-best)")
    p.add_argument("--save-every", type=_nonneg_int, default=500,
                   help="checkpoint every N steps (0: only at the end and on Ctrl-C)")
    p.add_argument("--keep-best", type=_nonneg_int, default=1, help="keep the K checkpoints with the lowest eval loss")
    p.add_argument("--keep-last", type=_positive_int, default=1, help="and the N latest checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="data order, eval split, initial weights, dropout")
    p.add_argument("--dtype", default="fp32", choices=tuple(train_job.DTYPES),
                   help="the model's weights (qlora: the compute dtype); LoRA and QLoRA factors stay fp32 either way")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for full, off for lora / qlora)")
    p.add_argument("--max-length", type=_positive_int, default=512, help="tokens per sequence (longer are cut)")
    p.add_argument("--packing", action="store_true", help="pack the training records into --max-length blocks")
    p.add_argument("--eval-data", default=None, help="held-out records (default: --eval-split of --data)")
    p.add_argument("--eval-split", type=float, default=0.05, help="fraction of --data held out for eval")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer directory (default: --model's; a preset gets a byte tokenizer)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--modules-to-save", type=_names, default=None,
                   help="comma-separated modules trained whole beside the adapter (peft's modules_to_save, e.g. "
                        "lm_head), saved in its checkpoints")
    p.add_argument("--dora", action="store_true", help="DoRA adapters (weight-decomposed LoRA) for lora / qlora")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args) -> int:
    adapter = {name: getattr(args, name) for name in ("rank", "targets") if getattr(args, name) is not None}
    if args.method == "full" and adapter:
        raise ValueError(f"--{next(iter(adapter))} is for lora / qlora (full fine-tuning has no adapter: it trains "
                         f"every weight)")
    cfg = train_job.TrainConfig(
        model=args.model, data=args.data, out=args.out, method=args.method, alpha=args.alpha, **adapter,
        dropout=args.dropout, lr=args.lr, warmup=args.warmup, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, eval_every=args.eval_every,
        save_every=args.save_every, keep_best=args.keep_best, keep_last=args.keep_last, resume=args.resume,
        seed=args.seed, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
        max_length=args.max_length, packing=args.packing, eval_data=args.eval_data, eval_split=args.eval_split,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, tokenizer=args.tokenizer, fsdp=args.fsdp,
        progress=not args.no_progress, modules_to_save=args.modules_to_save, dora=args.dora)
    result = train_job.train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = "n/a" if result.eval_loss is None else f"{result.eval_loss:.4f}"
        print(f"{'stopped' if result.interrupted else 'done'} at step {result.steps}/{result.total_steps}; eval loss "
              f"{ev}; last checkpoint {result.last_checkpoint}; best {result.best_checkpoint}")
    return 130 if result.interrupted else 0


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated module names, got {text!r}")
    return names


def _lrs(text):
    if text is None:
        return None
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in compare_job.METHODS:
            raise ValueError(f"--lr: unknown method {name.strip()!r} ({', '.join(compare_job.METHODS)})")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--lr: {item!r} is not method=number") from None
        if not (math.isfinite(out[name.strip()]) and out[name.strip()] > 0):
            raise ValueError(f"--lr: {item!r}: a learning rate must be a positive number")
    return out


def run_plan(args) -> None:
    plan = plan_job.make_plan(
        model=args.model, method=args.method, rank=args.rank, targets=args.targets, batch=args.batch, seq=args.seq,
        gpu=args.gpu, gpu_mem=args.gpu_mem, gpus=args.gpus, optimizer=args.optimizer, grad_ckpt=args.grad_ckpt,
        objective=args.objective, examples=args.examples, tokens_per_example=args.tokens_per_example,
        epochs=args.epochs, variants=args.variants, precision=args.precision, mfu=args.mfu, dora=args.dora)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        plan_job.render(plan)


def run_compare(args) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if (args.data or args.general) and not args.model:
        raise ValueError("--data and --general need --model (a local transformers model directory)")
    if args.model and not args.data:
        raise ValueError("--model needs --data (JSONL of {text} or {prompt, completion})")
    work = None
    if args.model:
        work = compare_job.file_workload(args.model, args.data, args.general, seq=args.seq, seed=args.seed,
                                         progress=not args.json)
    result = compare_job.compare(methods, rank=args.rank, batch=args.batch, full_steps=args.steps,
                                 budget=args.budget, seconds=args.seconds, out_dir=args.out, seed=args.seed,
                                 lr=_lrs(args.lr), progress=not args.json, workload=work,
                                 pretrain_steps=args.pretrain_steps, cache=not args.no_cache, device=args.device)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        compare_job.render(result)
        print(f"results: {args.out}/results.json, curves: {args.out}/curves.png")


def bench_root() -> str | None:
    """The source checkout whose bench/ goes with this lowrank (an editable install), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "bench", "__main__.py")) else None


def run_bench(argv: list[str]) -> int:
    """`lowrank bench ...` = `python -m bench ...` in the checkout (the benchmarks are not part of
    the installed package: they need peft, bitsandbytes and the repository's results folder)."""
    root = bench_root()
    if root is None:
        print("lowrank bench: error: the benchmarks live in the source checkout (bench/), which this installation "
              "does not have; clone the repository and install it with `pip install -e .`", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *argv], cwd=root)


def main(argv=None) -> int:
    parser = _Parser(prog="lowrank", description="LoRA / QLoRA kernel engine for PyTorch")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_plan(sub)
    _add_compare(sub)
    _add_inspect(sub)
    _add_merge(sub)
    _add_train(sub)
    p = sub.add_parser("demo", help="train a small Llama with LoRA on a synthetic task")
    p.add_argument("--steps", type=_positive_int, default=60)
    p.add_argument("--rank", type=_positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="lowrank-demo-adapter", help="where to save the trained adapter")
    sub.add_parser("info", help="versions, native build and kernel backend")
    # `lowrank bench ARGS` hands ARGS to `python -m bench` untouched (listed here for --help only)
    sub.add_parser("bench", help="the benchmarks and their report: python -m bench's arguments (--quick, --only, "
                                 "--out, --no-static); needs a source checkout")
    for name, p in sub.choices.items():  # --debug after the command too (lowrank plan ... --debug)
        if name != "bench":
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the traceback of an error")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return run_bench(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.cmd == "plan":
            run_plan(args)
        elif args.cmd == "compare":
            run_compare(args)
        elif args.cmd == "merge":
            run_merge(args)
        elif args.cmd == "inspect":
            run_inspect(args)
        elif args.cmd == "train":
            return run_train(args)
        elif args.cmd == "demo":
            demo(args.steps, args.rank, args.seed, args.lr, out_dir=args.out)
        elif args.cmd == "info":
            info()
    except (ValueError, TypeError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split("\n"))  # one line: a multi-line problem list joined
        print(f"lowrank {args.cmd}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            traceback.print_exc()
        print(f"lowrank {args.cmd}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


def _exit(code: int) -> None:
    """Exit with `code`. A worker under torchrun (WORLD_SIZE > 1) whose job has finished, its process
    group destroyed and its files written, leaves with os._exit after flushing its streams: the
    interpreter's finalization would tear down gloo's C++ state in an unspecified order, which
    aborted a worker now and then ("terminate called without an active exception", SIGABRT) after
    a run that had succeeded, failing the whole torchrun job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def entry() -> None:
    """The `lowrank` console script."""
    _exit(main())


if __name__ == "__main__":
    entry()
