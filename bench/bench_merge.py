"""merge: lowrank.ops merge_ (native library) against peft's LoRA merge on the same layers.

Llama-3-8B projection shapes (out x in), r in {16, 64}. For each: median time of one merge,
GB/s counting the floor traffic 2 * bytes(W) (read W once, write it once) and that as a fraction
of the copy bandwidth measured in the same run; then numerics on the same data:
  correct_frac  fraction of elements equal to the correctly rounded W + s * B @ A (float64 oracle)
  restored_frac fraction of elements equal to the original after merge + unmerge
  record_frac   (lowrank, exact=True) the unmerge record's bytes / W's bytes, as a merged layer
                stores it (packed); record_frac_unpacked: as merge_ returns it (int32 indices)
Impls: lowrank (exact=True, the default), lowrank-noexact (exact=False), peft (LoraLayer.merge,
safe_merge=False: delta rounded to the weight dtype, then added -- two roundings).

Data: W ~ N(0, 0.02) (Llama-like), A as peft initialises it (kaiming-uniform), B drawn so that
rms(s * B @ A) = DELTA_RATIO * rms(W) (a trained adapter's update, ~10% of the weight).
Timing alternates merge (timed) with unmerge (not timed) so W stays the same, and alternates the
implementations within each repeat, so that load on a shared machine hits them alike.
On the CPU, "merge_roundtrip" records then time merge + unmerge at deltas of 5% and 30% of W's rms
(fp16 and bf16, r 16 and 64; quick: 1024x4096; full: also q, gate and down), "vs_peft" in extra;
lowrank's exact unmerge is the one `lowrank.unmerge` runs (fast=True with the CPU library's record).
Beside them "floor-2mm": the product B @ A twice in fp32 as torch computes it (torch.mm into a
preallocated output: oneDNN / MKL sgemm, the fp32 product stored), the least a round trip that
forms the product in memory, as peft's does, costs (peft's adds its casts and adds). lowrank never
stores the product (its rank loop feeds the rounding from registers), so this bounds peft's kind
of round trip, not lowrank's.
"dora_merge_roundtrip" (every device): DoRA merge + exact unmerge at 1024x4096, fp16 / bf16, r 16 and
64, delta 5%: the native library, the same op's pure-torch float64 path (the same bits) and peft's
DoRA merge + unmerge. Alone: `python -m bench.bench_merge --dora --threads 2`.
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn as nn

from .harness import Record, device_name, measure_copy_bandwidth, versions

BASELINE = "peft"

# (name, out_features, in_features) of Llama-3-8B's LoRA targets
LLAMA3_8B = [("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("gate_proj", 14336, 4096), ("down_proj", 4096, 14336)]
DELTA_RATIO = 0.1


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peft_layer(w, a, b, alpha, dora=False):
    """A peft LoRA Linear (DoRA with dora=True) over a copy of w with the given factors (built through
    get_peft_model)."""
    from peft import LoraConfig, get_peft_model

    n, k = w.shape
    r = a.shape[0]
    holder = nn.Module()
    holder.lin = nn.Linear(k, n, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        holder.lin.weight.copy_(w)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0,
                                                 use_dora=dora))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return model, layer


def _inputs(n, k, r, dtype, device, gen, delta_ratio=DELTA_RATIO):
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype).to(device)
    bound = 1.0 / math.sqrt(k)  # kaiming_uniform(a=sqrt(5)) on (r, k)
    a = ((torch.rand(r, k, generator=gen) * 2 - 1) * bound).to(dtype).to(device)
    alpha = 2 * r
    s = alpha / r
    # rms(s * B @ A) = s * sigma_B * sqrt(r) * rms(A); rms(A) = bound / sqrt(3)
    sigma_b = delta_ratio * 0.02 / (s * math.sqrt(r) * bound / math.sqrt(3))
    b = (torch.randn(n, r, generator=gen) * sigma_b).to(dtype).to(device)
    return w, a, b, alpha, s


def _oracle(w, a, b, s):
    from lowrank.ops.merge_torch import round_f64

    return round_f64(w.double() + s * (b.double() @ a.double()), w.dtype)


def _eq_frac(x, y):
    iv = torch.int32 if x.element_size() == 4 else torch.int16
    return (x.view(iv) == y.view(iv)).double().mean().item()


def run(quick: bool, device: str) -> list[Record]:
    from lowrank.merge import MergeState
    from lowrank.ops.merge import merge_, record_allows_fast_unmerge, unmerge_

    device = torch.device(device)
    dev = device_name(device)
    vers = versions()
    copy_gbps = measure_copy_bandwidth(device)
    print(f"copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
    if quick and device.type == "cpu":
        shapes, ranks, dtypes, repeat = LLAMA3_8B[:2], [16, 64], [torch.bfloat16], 9
    elif quick:
        shapes, ranks, dtypes, repeat = LLAMA3_8B, [16, 64], [torch.bfloat16], 10
    else:
        shapes, ranks, dtypes, repeat = LLAMA3_8B, [16, 64], [torch.bfloat16, torch.float16], 20
    gen = torch.Generator().manual_seed(0)
    records = []
    for name, n, k in shapes:
        for r in ranks:
            for dtype in dtypes:
                w, a, b, alpha, s = _inputs(n, k, r, dtype, device, gen)
                w0 = w.clone()
                oracle = _oracle(w0, a, b, s)
                bytes_w = w.numel() * w.element_size()
                peft_model, layer = _peft_layer(w0, a, b, alpha)

                # numerics (one merge + unmerge each)
                stats = {}
                wk = w0.clone()
                rec = merge_(wk, a, b, s, True)
                packed = MergeState.pack("bench", s, True, rec[0], rec[1], w.numel(), ())
                stats["lowrank"] = {"correct_frac": _eq_frac(wk, oracle),
                                    "record_frac": packed.record_bytes() / bytes_w,
                                    "record_frac_unpacked": (rec[0].numel() * 4 + rec[1].numel() * rec[1].element_size()) / bytes_w,
                                    "recorded_elements_frac": rec[0].numel() / w.numel()}
                unmerge_(wk, a, b, s, *rec, fast=record_allows_fast_unmerge(wk, a))
                stats["lowrank"]["restored_frac"] = _eq_frac(wk, w0)
                wk = w0.clone()
                merge_(wk, a, b, s, False)
                stats["lowrank-noexact"] = {"correct_frac": _eq_frac(wk, oracle)}
                unmerge_(wk, a, b, s)
                stats["lowrank-noexact"]["restored_frac"] = _eq_frac(wk, w0)
                layer.merge()
                stats["peft"] = {"correct_frac": _eq_frac(layer.base_layer.weight.detach(), oracle)}
                layer.unmerge()
                stats["peft"]["restored_frac"] = _eq_frac(layer.base_layer.weight.detach(), w0)
                with torch.no_grad():
                    layer.base_layer.weight.copy_(w0)
                del wk, oracle

                # timing: merge timed, unmerge not; implementations interleaved
                times = {k_: [] for k_ in stats}
                for _ in range(1 + repeat):
                    for impl in times:
                        _sync(device)
                        t0 = time.perf_counter()
                        if impl == "peft":
                            layer.merge()
                        else:
                            out = merge_(w, a, b, s, impl == "lowrank")
                        _sync(device)
                        times[impl].append(time.perf_counter() - t0)
                        if impl == "peft":
                            layer.unmerge()
                            with torch.no_grad():
                                layer.base_layer.weight.copy_(w0)
                        elif impl == "lowrank":
                            unmerge_(w, a, b, s, *out, fast=record_allows_fast_unmerge(w, a))
                        else:
                            w.copy_(w0)
                for impl, ts in times.items():
                    t = statistics.median(ts[1:])  # the first is a warm-up
                    gbps = 2 * bytes_w / t / 1e9
                    records.append(Record(
                        op="merge", shape={"layer": name, "out": n, "in": k, "r": r}, dtype=str(dtype).replace("torch.", ""),
                        impl=impl, median_s=t, derived={"GB/s": gbps, "frac_copy_bw": gbps / copy_gbps},
                        device=dev, versions=vers,
                        extra={**stats[impl], "copy_GBps": copy_gbps, "delta_ratio": DELTA_RATIO}))
                if device.type == "cuda":
                    records.append(_cuda_kernel_record(w, a, b, s, name, r, dtype, copy_gbps, dev, vers, repeat))
                peft_t = statistics.median(times["peft"][1:])
                line = " ".join(f"{impl}: {statistics.median(ts[1:]) * 1e3:.1f} ms (x{peft_t / statistics.median(ts[1:]):.2f} vs peft) "
                                f"correct {stats[impl]['correct_frac']:.5f} restored {stats[impl]['restored_frac']:.5f}"
                                for impl, ts in times.items())
                print(f"{name} {n}x{k} r={r} {dtype}: {line}; record {stats['lowrank']['record_frac']:.3f} of W bytes",
                      flush=True)
                del peft_model, layer, w, w0
    if device.type == "cpu":
        records += _round_trips(quick, device, dev, vers)
    records += _dora_round_trips(quick, device, dev, vers)
    return records


def _round_trips(quick: bool, device, dev: str, vers: dict) -> list[Record]:
    """Merge + unmerge (a round trip: what switching adapters costs), exact (lowrank's default,
    bit-exact unmerge) and not, against peft's merge + unmerge, at a delta of 5% and 30% of W's rms
    (the exact path's cost used to grow with the delta). Implementations interleaved per repeat."""
    from lowrank.ops.merge import merge_, record_allows_fast_unmerge, unmerge_

    shapes = [("1024x4096", 1024, 4096)] + ([] if quick else [(n_, o, i) for n_, o, i in LLAMA3_8B if n_ != "k_proj"])
    gen = torch.Generator().manual_seed(1)
    records = []
    for name, n, k in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            for r in (16, 64):
                for ratio in (0.05, 0.3):
                    w, a, b, alpha, s = _inputs(n, k, r, dtype, device, gen, ratio)
                    w0 = w.clone()
                    _, layer = _peft_layer(w0, a, b, alpha)
                    fast = record_allows_fast_unmerge(w, a)
                    a32, b32 = a.float(), b.float()
                    prod = torch.empty(n, k)
                    times = {"lowrank": [], "lowrank-noexact": [], "peft": [], "floor-2mm": []}
                    for _ in range(1 + (5 if quick else 9)):
                        for impl, ts in times.items():
                            t0 = time.perf_counter()
                            if impl == "peft":
                                layer.merge()
                                layer.unmerge()
                            elif impl == "floor-2mm":
                                torch.mm(b32, a32, out=prod)
                                torch.mm(b32, a32, out=prod)
                            else:  # lowrank.unmerge's call: fast with the CPU library's own record
                                out = merge_(w, a, b, s, impl == "lowrank")
                                unmerge_(w, a, b, s, *out, fast=fast)
                            ts.append(time.perf_counter() - t0)
                            if impl == "peft":
                                with torch.no_grad():
                                    layer.base_layer.weight.copy_(w0)
                            elif impl == "lowrank-noexact":
                                w.copy_(w0)
                    if not torch.equal(w.view(torch.int16), w0.view(torch.int16)):
                        raise AssertionError(f"merge_roundtrip {name} {dtype} r={r}: exact unmerge did not restore W")
                    med = {impl: statistics.median(ts[1:]) for impl, ts in times.items()}
                    w_bytes = 4 * w.numel() * w.element_size()  # W read and written by merge and by unmerge
                    for impl, t in med.items():
                        records.append(Record(
                            op="merge_roundtrip", shape={"layer": name, "r": r, "delta": ratio},
                            dtype=str(dtype).replace("torch.", ""), impl=impl, median_s=t,
                            derived={} if impl == "floor-2mm" else {"GB/s": w_bytes / t / 1e9},
                            device=dev, versions=vers, extra={"delta_ratio": ratio, "vs_peft": t / med["peft"],
                                   "threads": torch.get_num_threads()}))
                    print(f"merge_roundtrip {name} {dtype} r={r} delta {ratio:.0%}: " + " ".join(
                        f"{impl} {t * 1e3:.1f} ms (x{t / med['peft']:.2f})" for impl, t in med.items()), flush=True)
                    del layer, w, w0, prod
    return records


def _cuda_kernel_record(w, a, b, s, name, r, dtype, copy_gbps, dev, vers, repeat):
    """The CUDA kernel alone (exact=False, factors prepared once), timed with CUDA events: what
    the op costs without its Python-side preparation (~10 small launches) and record handling."""
    import ctypes

    from lowrank import native
    from lowrank.ops.merge import _factors, _ptr

    lib = native.cuda()
    n, k = w.shape
    b32, a32, rb, cb, ab = _factors(w, a, b, s)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    args = (_ptr(w), n, k, w.stride(0), native.dtype_code(w.dtype), _ptr(b32), _ptr(a32), r, _ptr(rb), _ptr(cb), ab)
    ts = []
    for i in range(2 * (repeat + 1)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        native.check(lib.lowrank_cuda_merge(*args, s if i % 2 == 0 else -s, None, None, 0, None, stream), "merge")
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(ts[2:])
    gbps = 2 * w.numel() * w.element_size() / t / 1e9
    print(f"  cuda kernel alone: {t * 1e6:.1f} us, {gbps:.0f} GB/s = {gbps / copy_gbps:.2f} of copy", flush=True)
    return Record(op="merge", shape={"layer": name, "out": n, "in": k, "r": r}, dtype=str(dtype).replace("torch.", ""),
                  impl="lowrank-kernel", median_s=t, derived={"GB/s": gbps, "frac_copy_bw": gbps / copy_gbps},
                  device=dev, versions=vers, extra={"copy_GBps": copy_gbps})


def _dora_round_trips(quick: bool, device, dev: str, vers: dict, repeat: int | None = None) -> list[Record]:
    """DoRA merge + unmerge (`lowrank.ops.dora_merge`, exact: bit-exact unmerge) on the native library
    against the same op's pure-torch float64 path (LOWRANK_NO_NATIVE=1: the same bits) and peft's
    DoRA (`LoraLayer.merge` + `unmerge` of a LoraConfig(use_dora=True) layer: what its
    merge_and_unload does, undone): 1024 x 4096, fp16 / bf16, r 16 and 64, a delta of 5% of W's rms,
    m = ||W|| per row perturbed by 1%. Implementations interleaved per repeat."""
    import os

    from lowrank.ops.dora_merge import dora_merge_, dora_unmerge_

    gen = torch.Generator().manual_seed(2)
    repeat = repeat or (3 if quick else 5)
    n, k, ratio = 1024, 4096, 0.05
    records = []
    for dtype in (torch.float16, torch.bfloat16):
        for r in (16, 64):
            w, a, b, alpha, s = _inputs(n, k, r, dtype, device, gen, ratio)
            a, b = a.float(), b.float()  # DoRA factors in fp32, as lowrank and peft train them
            m = w.double().norm(dim=1) * (1 + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64).to(device))
            w0 = w.clone()
            model, layer = _peft_layer(w0, a, b, alpha, dora=True)
            with torch.no_grad():
                layer.lora_magnitude_vector["default"].weight.copy_(m)
            impls = {"lowrank-native": "0", "lowrank-torch64": "1", "peft-dora": None}
            times = {impl: [] for impl in impls}
            env = os.environ.get("LOWRANK_NO_NATIVE")
            try:
                for _ in range(1 + repeat):
                    for impl, flag in impls.items():
                        _sync(device)
                        t0 = time.perf_counter()
                        if flag is None:
                            layer.merge()
                            layer.unmerge()
                        else:
                            os.environ["LOWRANK_NO_NATIVE"] = flag
                            out = dora_merge_(w, a, b, m, s)
                            dora_unmerge_(w, a, b, s, *out)
                        _sync(device)
                        times[impl].append(time.perf_counter() - t0)
                        if flag is None:
                            with torch.no_grad():
                                layer.base_layer.weight.copy_(w0)
                        elif not torch.equal(w.view(torch.int16), w0.view(torch.int16)):
                            raise AssertionError(f"dora_merge_roundtrip {dtype} r={r} {impl}: W not restored")
            finally:
                if env is None:
                    os.environ.pop("LOWRANK_NO_NATIVE", None)
                else:
                    os.environ["LOWRANK_NO_NATIVE"] = env
            med = {impl: statistics.median(ts[1:]) for impl, ts in times.items()}
            for impl, t in med.items():
                records.append(Record(
                    op="dora_merge_roundtrip", shape={"out": n, "in": k, "r": r, "delta": ratio},
                    dtype=str(dtype).replace("torch.", ""), impl=impl, median_s=t,
                    derived={"GB/s": 4 * w.numel() * w.element_size() / t / 1e9}, device=dev, versions=vers,
                    extra={"delta_ratio": ratio, "vs_peft": t / med["peft-dora"],
                           "vs_torch64": t / med["lowrank-torch64"], "record_frac": out[1].numel() / w.numel(),
                           "threads": torch.get_num_threads(), "repeat": repeat}))
            print(f"dora_merge_roundtrip {n}x{k} {dtype} r={r} delta {ratio:.0%}: " + " ".join(
                f"{impl} {t * 1e3:.1f} ms (x{t / med['peft-dora']:.2f} peft)" for impl, t in med.items())
                + f"; native x{med['lowrank-torch64'] / med['lowrank-native']:.1f} faster than torch64", flush=True)
            del model, layer, w, w0
    return records


def main(argv=None) -> None:
    """python -m bench.bench_merge [--dora | --roundtrip] [--quick] [--threads N] [--repeat R] [--json PATH]:
    everything, or the DoRA merge round trips alone, or the LoRA ones alone (`python -m bench.run --only
    merge` runs everything too)."""
    import argparse
    import sys

    from .harness import print_table, write_json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dora", action="store_true", help="only the DoRA merge + unmerge round trips")
    parser.add_argument("--roundtrip", action="store_true",
                        help="only the LoRA merge + unmerge round trips (CPU: 1024x4096; without --quick also "
                             "the q, gate and down shapes)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.dora:
        records = _dora_round_trips(args.quick, device, device_name(device), versions(), args.repeat)
    elif args.roundtrip:
        records = _round_trips(args.quick, device, device_name(device), versions())
    else:
        records = run(args.quick, args.device)
    if args.json:
        write_json(records, args.json, meta={"device": records[0].device, "versions": records[0].versions,
                                             "command": "python -m bench.bench_merge "
                                             + " ".join(argv if argv is not None else sys.argv[1:])})
    print_table(records, "peft-dora" if args.dora else BASELINE)


if __name__ == "__main__":
    main()
