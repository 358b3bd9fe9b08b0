"""DoRA linear layer, a training step's forward + backward: lowrank's DoRA (`lowrank.ops.dora_linear`,
no N x K matrix) against lowrank's LoRA, peft's DoRA, peft's LoRA and the frozen layer, one run.

    python -m bench.run --only dora
    python -m bench.bench_dora [--quick] [--repeat 5] [--threads N]

The issue's point (CPU, fp32, a 4096 x 4096 layer, M = 1024, r = 16): our DoRA <= 1.10x our LoRA, and
>= 1.6x faster than peft's DoRA (which builds the dense B @ A and W + s B A on every step). Every
impl runs on the same weights; a call is y = f(x) then autograd.grad(y, (x, A, B[, m]), dY) (the
floor: (x,) only). The impls are timed interleaved, one call each per round, and each figure is the
median over the rounds: on a shared machine a slow spell then hits every impl alike. `extra` holds
the ratios ("vs_lora": to lowrank's LoRA, "vs_peft_dora", "vs_floor") and the bytes autograd keeps
from forward to backward beyond x and the weights ("saved_MiB", counted by saved_tensors_hooks).
"dora.norms" times the row norms alone against the fp32 GEMM W A^T (what float64 accuracy costs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.harness import Record, derived, device_name, print_table, versions, write_json
from lowrank.ops.dora import dora_linear, dora_row_norms, weight_row_sq_norms
from lowrank.ops.lora_matmul import lora_linear

BASELINE = "lowrank-lora"
OP = "dora"


def _peft_layer(w, a, b, alpha, dora):
    """peft's lora.Linear (use_dora as asked) around an nn.Linear holding w, with A and B set (peft
    initialises m = ||W|| at injection, as its DoRA does)."""
    from peft import LoraConfig, inject_adapter_in_model

    n, k = w.shape
    holder = nn.Module()
    holder.proj = nn.Linear(k, n, bias=False, device="meta")
    holder.proj.weight = nn.Parameter(w, requires_grad=False)
    inject_adapter_in_model(LoraConfig(r=a.shape[0], lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"],
                                       use_dora=dora), holder)
    layer = holder.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if dora:
        params.append(layer.lora_magnitude_vector["default"].weight)
    return layer, params


def impls(s: dict) -> dict:
    """name -> (fn(x), parameters that get gradients besides x)."""
    w, a, b, m, scaling, alpha = s["w"], s["a"], s["b"], s["m"], s["scaling"], s["alpha"]
    w2 = weight_row_sq_norms(w)  # cached once per layer, as LoRALinear does (W is frozen)
    return {
        "F.linear": (lambda x: F.linear(x, w), []),
        "lowrank-lora": (lambda x: lora_linear(x, w, a, b, scaling), [a, b]),
        "lowrank-dora": (lambda x: dora_linear(x, w, a, b, m, scaling, weight_sq=w2), [a, b, m]),
        "peft-lora": _peft_layer(w, a.detach(), b.detach(), alpha, dora=False),
        "peft-dora": _peft_layer(w, a.detach(), b.detach(), alpha, dora=True),
    }


def saved_bytes(fn, x, keep) -> int:
    """Bytes autograd keeps for backward (distinct storages), except those of `keep` (x, the weights)."""
    seen = {t.untyped_storage().data_ptr() for t in keep}
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def flops(m, k, n, r) -> float:
    """The LoRA layer's forward + backward (dX, dA, dB; no dW), as bench_lora_matmul counts it."""
    fwd = 2 * m * n * k + 2 * m * k * r + 2 * m * n * r
    return fwd + 2 * m * n * k + 2 * m * k * r + 4 * m * n * r + 2 * m * k * r


# On a GPU: the Llama-3-8B goal (DoRA <= 1.10x our LoRA), bf16, a 4096-token micro-batch,
# the shapes of its attention and MLP projections (k_proj stands for v_proj too).
LLAMA3_8B = (("q_proj", 4096, 4096), ("k_proj", 4096, 1024), ("gate_proj", 4096, 14336),
             ("down_proj", 14336, 4096))


def run(quick: bool, device: str, repeat: int | None = None, m: int = 1024, k: int = 4096, n: int = 4096,
        r: int = 16) -> list[Record]:
    """CPU: the issue's 4096 x 4096 layer, M = 1024, fp32 (halved with quick). CUDA: that layer, then
    Llama-3-8B's projections in bf16 at M = 4096 (2048 with quick)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        if quick:
            m, k, n = m // 2, k // 2, n // 2
        return run_shape(dev, m, k, n, r, torch.float32, repeat or (3 if quick else 5))
    records = run_shape(dev, m, k, n, r, torch.float32, repeat or (3 if quick else 5))
    for layer, k_, n_ in LLAMA3_8B:
        records += run_shape(dev, 2048 if quick else 4096, k_, n_, r, torch.bfloat16, repeat or (3 if quick else 5),
                             layer=layer)
    return records


def run_shape(dev: torch.device, m: int, k: int, n: int, r: int, dtype: torch.dtype, repeat: int,
              layer: str | None = None) -> list[Record]:
    """Every impl at one shape and dtype, interleaved rounds (the module's doc)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dev, dtype)
    s = {"w": w, "a": (torch.randn(r, k, generator=g) * k ** -0.5).to(dev, dtype).requires_grad_(),
         "b": (torch.randn(n, r, generator=g) * 0.01).to(dev, dtype).requires_grad_(),
         "alpha": 2 * r, "scaling": 2.0}
    s["m"] = w.float().norm(dim=1).to(dtype).requires_grad_()
    x = torch.randn(m, k, generator=g).to(dev, dtype).requires_grad_()
    dy = torch.randn(m, n, generator=g).to(dev, dtype)
    built = impls(s)
    calls = {name: (lambda fn=fn, wrt=[x, *params]: torch.autograd.grad(fn(x), wrt, dy))
             for name, (fn, params) in built.items()}
    saved = {name: saved_bytes(fn, x, [x, w, *params]) for name, (fn, params) in built.items()}
    for call in calls.values():  # warm-up
        call()
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    shape, name, ver = {"M": m, "K": k, "N": n, "r": r}, device_name(dev), versions()
    if layer:
        shape["layer"] = layer
    dname = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    records = _norm_records(s, repeat, dev, {k_: v for k_, v in shape.items() if k_ != "M"}, name, ver, dname)
    for impl, t in med.items():
        records.append(Record(op=f"{OP}.fwd+bwd", shape=shape, dtype=dname, impl=impl, median_s=t,
                              derived=derived(t, flops(m, k, n, r)), device=name, versions=ver,
                              extra={"vs_lora": t / med["lowrank-lora"], "vs_peft_dora": t / med["peft-dora"],
                                     "vs_floor": t / med["F.linear"], "saved_MiB": saved[impl] / 2 ** 20,
                                     "repeat": repeat, "threads": torch.get_num_threads()}))
    return records


def _norm_records(s: dict, repeat: int, dev: torch.device, shape: dict, name: str, ver: dict,
                  dname: str = "fp32") -> list[Record]:
    """The row norms alone ("dora.norms": `dora_row_norms` with ||W||^2 cached, float64 W A^T) beside
    the fp32 GEMM W A^T they replace in a cheaper, less exact design ("fp32 W@A^T"), medians of
    `repeat` interleaved rounds: what the norms' accuracy costs."""
    w, a, b, w2 = s["w"], s["a"].detach(), s["b"].detach(), weight_row_sq_norms(s["w"])
    calls = {"lowrank-norms": lambda: dora_row_norms(w, a, b, s["scaling"], weight_sq=w2),
             f"{dname} W@A^T": lambda: w @ a.t()}
    times = {impl: [] for impl in calls}
    for call in calls.values():
        call()
    for _ in range(max(repeat, 5)):
        for impl, call in calls.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[impl].append(time.perf_counter() - t0)
    return [Record(op=f"{OP}.norms", shape=shape, dtype=dname, impl=impl, median_s=statistics.median(ts),
                   derived={}, device=name, versions=ver, extra={"threads": torch.get_num_threads()})
            for impl, ts in times.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved rounds (default 5; 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = run(args.quick, args.device, args.repeat)
    if args.json:
        write_json(records, args.json, meta={"device": records[0].device, "versions": records[0].versions,
                                             "quick": args.quick, "command": "python -m bench.bench_dora "
                                             + " ".join(argv if argv is not None else sys.argv[1:])})
    print_table(records, BASELINE)
    for rec in records:
        e = rec.extra
        if rec.op != f"{OP}.fwd+bwd":
            print(f"{rec.impl:<14} {rec.median_s * 1e3:9.1f} ms  ({rec.op})")
            continue
        print(f"{rec.impl:<14} {rec.median_s * 1e3:9.1f} ms  x{e['vs_lora']:.3f} our LoRA  x{e['vs_peft_dora']:.3f} "
              f"peft DoRA  x{e['vs_floor']:.3f} frozen layer  saved {e['saved_MiB']:.1f} MiB")


if __name__ == "__main__":
    main()
