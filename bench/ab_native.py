"""A/B of two builds of the native CPU library in one process: merge + unmerge round trips through
each, alternating, on the same data (the way `lowrank.ops.merge_` drives the library).

    python -m bench.ab_native OTHER.so [--exact] [--rank 64] [--dtype fp16] [--delta 0.3]
                              [--rounds 40] [--shape 1024x4096]

Threads: OMP_NUM_THREADS in the environment (e.g. OMP_NUM_THREADS=1 python -m bench.ab_native ...).

OTHER.so is another build of liblowrank_cpu.so (e.g. a worktree of an older commit, built with
`LOWRANK_NO_CUDA=1 python setup.py build_native`); the other side is this checkout's
lowrank/_lib/liblowrank_cpu.so. Both are copied to a temporary folder and loaded side by side.
On a shared machine whose speed drifts by tens of percent from minute to minute, two processes
run one after the other cannot resolve a change of a few percent; alternating the two builds
round trip by round trip in one process exposes them to the same drift. Prints each side's min
and median and the ratio of medians (this / other: < 1, this build is faster). Data as
bench_merge's round trips: W ~ N(0, 0.02), a delta of `--delta` of W's rms. Exact round trips
check that W comes back bit for bit; a build with lowrank_cpu_unmerge_strided (ABI 6) unmerges with
it, as `lowrank.unmerge` does, an older one with the certified unmerge and a restore.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import tempfile
import time

import torch

from lowrank import native
from lowrank.ops.merge import _cpu_merge, _cpu_unmerge_fast, _ptr, _record_capacity

from .bench_merge import _inputs

THIS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lowrank", "_lib",
                    "liblowrank_cpu.so")


def _load(path: str, tmp: str, name: str):
    dst = os.path.join(tmp, f"lib_{name}.so")
    shutil.copy(path, dst)
    lib = ctypes.CDLL(dst)
    native._declare(lib, "cpu")
    return lib


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", help="the other build of liblowrank_cpu.so")
    parser.add_argument("--exact", action="store_true", help="exact merge (record) + unmerge + restore")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--delta", type=float, default=0.05, help="the delta's rms as a fraction of W's")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--shape", default="1024x4096", help="out x in")
    args = parser.parse_args(argv)
    n, k = (int(v) for v in args.shape.split("x"))
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"this": _load(THIS, tmp, "this"), "other": _load(args.other, tmp, "other")}
        gen = torch.Generator().manual_seed(0)
        w, a, b, _alpha, s = _inputs(n, k, args.rank, dtype, "cpu", gen, args.delta)
        w0 = w.clone()
        cap = _record_capacity(w, a, b, s)
        rec = (torch.empty(cap, dtype=torch.int32), torch.empty(cap, dtype=dtype), ctypes.c_int64(0))
        code = native.dtype_code(dtype)

        def round_trip(lib):
            if args.exact and hasattr(lib, "lowrank_cpu_unmerge_strided"):  # lowrank.unmerge's fast unmerge
                native.check(_cpu_merge(lib, w, a, b, s, rec), "merge")
                native.check(_cpu_unmerge_fast(lib, w, a, b, s, rec[0], rec[1], rec[2].value), "fast unmerge")
            elif args.exact:
                native.check(_cpu_merge(lib, w, a, b, s, rec), "merge")
                native.check(_cpu_merge(lib, w, a, b, -s), "unmerge")
                native.check(lib.lowrank_cpu_restore(_ptr(w), n, k, k, code, _ptr(rec[0]), _ptr(rec[1]),
                                                     rec[2].value), "restore")
            else:
                native.check(_cpu_merge(lib, w, a, b, s), "merge")
                native.check(_cpu_merge(lib, w, a, b, -s), "unmerge")
                w.copy_(w0)

        times = {name: [] for name in libs}
        order = list(libs.items())
        for i in range(args.rounds + 1):
            for name, lib in (order if i % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                round_trip(lib)
                if i:  # the first round warms both up
                    times[name].append(time.perf_counter() - t0)
        if args.exact and not torch.equal(w.view(torch.int16), w0.view(torch.int16)):
            raise AssertionError("an exact round trip did not restore W")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.shape} {args.dtype} r={args.rank} delta {args.delta:.0%} {'exact' if args.exact else 'noexact'} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.rounds} round trips each: " + "  ".join(
              f"{name} min {min(ts) * 1e3:.2f} median {med[name] * 1e3:.2f} ms" for name, ts in times.items())
          + f"  this/other {med['this'] / med['other']:.3f}")


if __name__ == "__main__":
    main()
