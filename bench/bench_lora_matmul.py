"""LoRA linear layer: F.linear (the floor), peft's LoRA layer, lowrank's reference path and its fused
Triton kernels, forward and forward+backward, bf16, Llama-3-8B projection shapes.

    python -m bench.run --only lora_matmul [--quick]
    python -m bench.bench_lora_matmul [--quick] [--device cpu]

Every impl runs on the same weights. Forward is timed under no_grad (inference); forward+backward
is y = f(x) then autograd.grad(y, (x, A, B), dY) (for the floor: (x,) only), so nothing
accumulates into .grad between calls. Each record's `extra` holds the time ratio to the floor
and to peft at the same point ("vs_floor", "vs_peft": < 1 is faster), and for M <= 16 the forward's
fraction of the measured copy bandwidth ("frac_bw", from the minimum bytes).

At M <= 16 on CUDA, "lowrank-gemm" times the kernels with the small-M split-K path turned off
(lowrank/kernels/lora_matmul.py, Note on small M), so one run shows which of the two paths is faster.

On the CPU the kernels are not timed (they would run in Triton's interpreter): the CPU path
(`lowrank.ops.lora_matmul.lora_linear_reference`) runs against peft's layer at shapes scaled down 8x
(bf16, one thread), then a training step's layer, 1024 x 2048 x 2048 r=16 fp32 on all threads, whose
"vs_floor" is the LoRA overhead over the frozen layer's forward + input gradient.
"lowrank" is the `lowrank::lora_linear_fwd` custom op itself (the kernels, with autograd), without
the argument checks of `lowrank.ops.lora_linear` in front of it.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.harness import Record, bench, derived, device_name, measure_copy_bandwidth, print_table, rotating_inputs, versions
from lowrank.ops.lora_matmul import lora_linear_reference

BASELINE = "F.linear"
OP = "lora_matmul"

# Llama-3-8B: q/o (4096->4096), k/v (4096->1024), gate/up (4096->14336), down (14336->4096); (K, N).
LLAMA3_8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
M_ALL = [1, 16, 512, 4096, 16384]
RANKS = [8, 16, 64]


def grid(quick: bool, device: str):
    """(K, N, M, r) points. Quick on the GPU: q/o and gate/up and down at M in {1, 16, 4096, 16384},
    r=16, plus r=8 and r=64 at M=4096 on q/o (autotuning dominates a quick run's time)."""
    if device.startswith("cuda"):
        if not quick:
            return [(k, n, m, r) for k, n in LLAMA3_8B for m in M_ALL for r in RANKS]
        pts = [(k, n, m, 16) for k, n in [(4096, 4096), (4096, 14336), (14336, 4096)] for m in (1, 16, 4096, 16384)]
        return pts + [(4096, 4096, 4096, 8), (4096, 4096, 4096, 64)]
    # CPU: Llama shapes / 8, small M (2 shared cores).
    shapes = [(k // 8, n // 8) for k, n in LLAMA3_8B]
    if quick:
        return [(k, n, m, 16) for k, n in shapes[:3:2] for m in (1, 16, 512)]
    return [(k, n, m, r) for k, n in shapes for m in (1, 16, 512) for r in RANKS]


def flops(m, k, n, r, backward: bool) -> float:
    fwd = 2 * m * n * k + 2 * m * k * r + 2 * m * n * r
    if not backward:
        return fwd
    # dX = dY@W (+ dT@A), dT and dB (4MNr), dA (2MKr)
    return fwd + 2 * m * n * k + 2 * m * k * r + 4 * m * n * r + 2 * m * k * r


def min_bytes(m, k, n, r, backward: bool, itemsize: int = 2) -> float:
    fwd = (m * k + n * k + r * k + n * r + m * n) * itemsize
    if not backward:
        return fwd
    # + read dY, W, A, B again, write dX, dA, dB (x re-read for dA)
    return fwd + (m * n + n * k + m * k + m * k + 2 * (r * k + n * r)) * itemsize


def _peft_layer(w, a, b, alpha):
    """peft's lora.Linear around an nn.Linear that holds w, with A and B as its adapter weights."""
    from peft import LoraConfig, inject_adapter_in_model

    n, k = w.shape
    holder = nn.Module()
    holder.proj = nn.Linear(k, n, bias=False, device="meta")
    holder.proj.weight = nn.Parameter(w, requires_grad=False)
    inject_adapter_in_model(LoraConfig(r=a.shape[0], lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]),
                            holder)
    layer = holder.proj
    layer.lora_A["default"].weight = nn.Parameter(a)
    layer.lora_B["default"].weight = nn.Parameter(b)
    return layer


def _fused(x, w, a, b, scaling):
    """The kernels through their custom op (`lowrank::lora_linear_fwd`, differentiable), no dropout."""
    return torch.ops.lowrank.lora_linear_fwd(x, w, a, b, None, None, float(scaling), 0.0)[0]


def _without_small_m(fn):
    """fn with the small-M path off (lowrank/kernels/lora_matmul.py, Note on small M): the plain GEMM path."""
    from lowrank.kernels import lora_matmul

    def call(x):
        saved, lora_matmul.SMALL_M_MAX = lora_matmul.SMALL_M_MAX, 0
        try:
            return fn(x)
        finally:
            lora_matmul.SMALL_M_MAX = saved
    return call


def _impls(device: str, m: int = 0):
    """name -> make(set) -> (fn(x), params needing grads besides x). At M <= 16 on CUDA also
    "lowrank-gemm": the kernels with the small-M split-K path off, to compare the two paths."""
    out = {
        "F.linear": lambda s: (lambda x: F.linear(x, s["w"]), []),
        "peft": lambda s: _peft_impl(s),
        "reference": lambda s: (lambda x: lora_linear_reference(x, s["w"], s["a"], s["b"], s["scaling"]),
                                [s["a"], s["b"]]),
        # plain torch, the LoRA branch as two more matmuls and an add (Unsloth's and most hand-written layers)
        "unfused": lambda s: (lambda x: F.linear(x, s["w"]) + s["scaling"] * F.linear(F.linear(x, s["a"]), s["b"]),
                              [s["a"], s["b"]]),
    }
    if device.startswith("cuda"):
        from lowrank.kernels import lora_matmul

        out["lowrank"] = lambda s: (lambda x: _fused(x, s["w"], s["a"], s["b"], s["scaling"]), [s["a"], s["b"]])
        if m <= lora_matmul.SMALL_M_MAX:
            out["lowrank-gemm"] = lambda s: (_without_small_m(out["lowrank"](s)[0]), [s["a"], s["b"]])
    return out


def _graphed(call):
    """call captured in a CUDA graph (after a warm-up that autotunes and compiles): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    return g.replay


def _peft_impl(s):
    layer = _peft_layer(s["w"], s["a"], s["b"], s["alpha"])
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def run(quick: bool, device: str) -> list[Record]:
    dev = torch.device(device)
    if dev.type != "cpu":
        return _run(quick, dev)
    # One thread: on a shared CPU a 2-thread matmul waits at its barrier for a descheduled thread
    # (we saw medians jump in 16 ms steps, the scheduler's time slice, with the default 2 threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = _run(quick, dev)
    finally:
        torch.set_num_threads(threads)
    return records + _cpu_training_layer(dev)


def _cpu_training_layer(dev: torch.device, m: int = 1024, k: int = 2048, n: int = 2048, r: int = 16) -> list[Record]:
    """A LoRA training step's layer on the CPU, fp32, all threads: forward + backward of the reference
    path (`lora_linear_reference`: dX, dA, dB) and of peft's layer against the frozen layer's forward
    + input gradient (F.linear; "vs_floor" is the LoRA overhead)."""
    name, ver = device_name(dev), versions()
    g = torch.Generator().manual_seed(0)
    s = {"w": torch.randn(n, k, generator=g) * k ** -0.5,
         "a": (torch.randn(r, k, generator=g) * k ** -0.5).requires_grad_(),
         "b": (torch.randn(n, r, generator=g) * 0.01).requires_grad_(),
         "alpha": 2 * r, "scaling": 2.0}
    x = torch.randn(m, k, generator=g, requires_grad=True)
    dy = torch.randn(m, n, generator=g)
    shape = {"M": m, "K": k, "N": n, "r": r}
    times, records = {}, []
    for impl, build in _impls("cpu").items():
        fn, params = build(s)
        wrt = [x, *params]
        t = bench(lambda: torch.autograd.grad(fn(x), wrt, dy), [()], warmup=3, repeat=20)
        times[impl] = t
        records.append(Record(op=f"{OP}.fwd+bwd", shape=shape, dtype="fp32", impl=impl, median_s=t,
                              derived=derived(t, flops(m, k, n, r, True), min_bytes(m, k, n, r, True, 4)),
                              device=name, versions=ver, extra={"threads": torch.get_num_threads()}))
    for rec in records:
        rec.extra["vs_floor"] = rec.median_s / times["F.linear"]
        rec.extra["vs_peft"] = rec.median_s / times["peft"]
    return records


def _run(quick: bool, dev: torch.device) -> list[Record]:
    device = str(dev)
    dtype = torch.bfloat16
    name = device_name(dev)
    ver = versions()
    copy_bw = measure_copy_bandwidth(dev)
    records: list[Record] = []
    repeat = 10 if quick and dev.type == "cuda" else 30
    max_s = 2.0 if dev.type == "cpu" else None
    for k, n, m, r in grid(quick, device):
        alpha = 2 * r

        def make():
            return ({"w": torch.randn(n, k, device=dev, dtype=dtype) * k ** -0.5,
                     "a": (torch.randn(r, k, device=dev, dtype=dtype) * k ** -0.5).requires_grad_(),
                     "b": (torch.randn(n, r, device=dev, dtype=dtype) * 0.01).requires_grad_(),
                     "x": torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True),
                     "dy": torch.randn(m, n, device=dev, dtype=dtype),
                     "alpha": alpha, "scaling": alpha / r},)

        # Weights rotate too: at M=1 the weight is the whole working set, and 4096x4096 bf16 fits in L2.
        sets = rotating_inputs(make, (m * k + n * k + r * k + n * r + m * n) * 2)
        shape = {"M": m, "K": k, "N": n, "r": r}
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            times = {}
            # At M <= 16 an eager call costs its launches (CPU) more than its GPU work: the forward
            # is also timed as CUDA graph replays ("+graph"), the way a decoding loop runs it.
            graph = dev.type == "cuda" and m <= 16 and not backward
            variants = [(impl, build, g) for impl, build in _impls(device, m).items() for g in ((False, True) if graph else (False,))]
            for impl, build, use_graph in variants:
                built = [(build(s[0]), s[0]) for s in sets]
                calls = []
                for (fn, params), s in built:
                    if backward:
                        wrt = [s["x"], *params]

                        def call(fn=fn, x=s["x"], dy=s["dy"], wrt=wrt):
                            torch.autograd.grad(fn(x), wrt, dy)
                    else:

                        def call(fn=fn, x=s["x"]):
                            with torch.no_grad():
                                fn(x)
                    calls.append((call,))
                if use_graph:
                    impl = impl + "+graph"
                    try:
                        calls = [(_graphed(c),) for (c,) in calls]
                    except Exception as exc:  # report and go on: the eager rows still stand
                        print(f"bench_lora_matmul: CUDA graph capture failed for {impl} at {shape}: {exc!r}")
                        continue
                t = bench(lambda c: c(), calls, warmup=3, repeat=repeat, device=dev, max_seconds=max_s)
                times[impl] = t
                d = derived(t, flops(m, k, n, r, backward), min_bytes(m, k, n, r, backward))
                if m <= 16:
                    d["frac_bw"] = d["GB/s"] / copy_bw
                records.append(Record(op=f"{OP}.{mode}", shape=shape, dtype="bf16", impl=impl, median_s=t,
                                      derived=d, device=name, versions=ver, extra={"copy_GB/s": copy_bw, "threads": torch.get_num_threads()}))
            for rec in records[-len(times):]:
                tag = "+graph" if rec.impl.endswith("+graph") else ""
                if "F.linear" + tag in times:
                    rec.extra["vs_floor"] = rec.median_s / times["F.linear" + tag]
                if "peft" + tag in times:
                    rec.extra["vs_peft"] = rec.median_s / times["peft" + tag]
            del built, calls
        del sets
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    records = run(args.quick, args.device)
    print_table(records, BASELINE)
    for rec in records:
        if rec.impl != BASELINE and "vs_floor" in rec.extra and "vs_peft" in rec.extra:
            print(f"{rec.op:<20} M={rec.shape['M']:<6} K={rec.shape['K']:<6} N={rec.shape['N']:<6} r={rec.shape['r']:<3} "
                  f"{rec.impl:<10} x{rec.extra['vs_floor']:.2f} floor  x{rec.extra['vs_peft']:.2f} peft")


if __name__ == "__main__":
    main()
