"""Scaling: how a LoRA layer's forward+backward time grows with the tokens (M), the rank and the hidden
size, a line per implementation, so a reader sees where fused beats unfused and where it stops
mattering.

    python -m bench.run --only scaling [--quick]

One sweep at a time around a base point (CPU: M=256, K=N=1024, r=16, fp32, all threads; GPU:
M=4096, K=N=4096, r=16, bf16): records `scaling.M`, `scaling.rank`, `scaling.hidden` with the
swept variable in the shape. Implementations: F.linear (the frozen layer: the floor), peft's LoRA
layer, "unfused" (plain torch, the LoRA branch as two more matmuls and an add, the way Unsloth's
and most hand-written LoRA layers compute it), lowrank's CPU path ("reference") and, on a GPU,
lowrank's fused kernels ("lowrank"). `bench.report` draws each sweep as lines (log-log).
"""
from __future__ import annotations

import torch

from .bench_lora_matmul import _impls
from .harness import Record, bench, derived, device_name, versions

BASELINE = "peft"


def sweeps(device: torch.device, quick: bool) -> tuple[dict, dict]:
    if device.type == "cuda":
        base = {"M": 4096, "K": 4096, "N": 4096, "r": 16}
        grid = {"M": [16, 256, 4096, 16384], "r": [8, 16, 32, 64, 128], "hidden": [1024, 2048, 4096, 8192]}
    else:
        base = {"M": 256, "K": 1024, "N": 1024, "r": 16}
        grid = {"M": [16, 64, 256, 1024], "r": [8, 16, 32, 64, 128], "hidden": [512, 1024, 2048]}
    if quick:
        grid = {k: v[:: 2] + ([v[-1]] if len(v) % 2 == 0 else []) for k, v in grid.items()}
    return base, grid


def run(quick: bool, device: str) -> list[Record]:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base, grid = sweeps(dev, quick)
    name, ver = device_name(dev), versions()
    records = []
    for var, values in grid.items():
        for v in values:
            m, k, n, r = base["M"], base["K"], base["N"], base["r"]
            if var == "M":
                m = v
            elif var == "r":
                r = v
            else:
                k = n = v
            g = torch.Generator().manual_seed(0)
            s = {"w": (torch.randn(n, k, generator=g) * k ** -0.5).to(dev, dtype),
                 "a": (torch.randn(r, k, generator=g) * k ** -0.5).to(dev, dtype).requires_grad_(),
                 "b": (torch.randn(n, r, generator=g) * 0.01).to(dev, dtype).requires_grad_(),
                 "alpha": 2 * r, "scaling": 2.0}
            x = torch.randn(m, k, generator=g).to(dev, dtype).requires_grad_()
            dy = torch.randn(m, n, generator=g).to(dev, dtype)
            impls = dict(_impls(device, m))
            impls.pop("lowrank-gemm", None)
            shape = {"sweep": var, "M": m, "K": k, "N": n, "r": r}
            flops = 2 * m * n * k * 2 + 2 * m * r * (k + n) * 3
            for impl, build in impls.items():
                fn, params = build(s)
                wrt = [x, *params] if impl != "F.linear" else [x]
                t = bench(lambda: torch.autograd.grad(fn(x), wrt, dy), [()], warmup=2, repeat=10 if quick else 20,
                          device=dev, max_seconds=2.0 if dev.type == "cpu" else None)
                records.append(Record(op=f"scaling.{var}", shape=shape, dtype=str(dtype).removeprefix("torch."),
                                      impl=impl, median_s=t, derived=derived(t, flops), device=name, versions=ver,
                                      extra={"threads": torch.get_num_threads()}))
    return records
