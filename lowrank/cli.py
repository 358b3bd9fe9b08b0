"""The `lowrank` command.

    lowrank demo [--steps 60] [--rank 8] [--out DIR]
                                           train a small Llama (from a config, random init) with LoRA
                                           on a built-in synthetic task and show the loss going down,
                                           then save the adapter (peft format) and merge it
    lowrank info                           versions, native library build, kernel backend
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import __version__, native
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank", description="LoRA / QLoRA kernel engine for PyTorch")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="train a small Llama with LoRA on a synthetic task")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="lowrank-demo-adapter", help="where to save the trained adapter")
    sub.add_parser("info", help="versions, native build and kernel backend")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        demo(args.steps, args.rank, args.seed, args.lr, out_dir=args.out)
    elif args.cmd == "info":
        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
