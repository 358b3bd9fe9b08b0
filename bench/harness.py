"""The shared benchmark harness.

- `bench(fn, inputs)`: warm-up, then the median over repeats. On CUDA each call is timed with
  CUDA events; on the CPU with perf_counter. `inputs` is a list of argument tuples that the calls
  rotate through, so that the working set is larger than the last-level cache
  (`rotating_inputs` sizes that list).
- `Record`: one measured row, `{op, shape, dtype, impl, median_s, derived, device, versions}`;
  `derived` holds TFLOP/s and/or GB/s computed from napkin-math FLOPs and minimum bytes.
- `write_json(records, path)` writes a list of records; `print_table` prints them.
Performance is always reported as a ratio against a baseline measured in the same run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

# Larger than any last-level cache we run on (H200 L2: 60 MB; server CPUs: tens of MB).
CACHE_BYTES = 256 * 2**20


@dataclasses.dataclass
class Record:
    op: str
    shape: dict
    dtype: str
    impl: str
    median_s: float
    derived: dict
    device: str
    versions: dict
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}"


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "peft", "bitsandbytes", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    try:
        import lowrank

        out["lowrank"] = lowrank.__version__
    except Exception:
        out["lowrank"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def rotating_inputs(make: Callable[[], tuple], bytes_per_set: int, cache_bytes: int = CACHE_BYTES,
                    max_sets: int = 64) -> list[tuple]:
    """Enough independent input sets (each from `make()`) to exceed the cache; at least 1."""
    n = max(1, min(max_sets, -(-cache_bytes // max(bytes_per_set, 1))))
    return [make() for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable, inputs: Sequence[tuple], warmup: int = 3, repeat: int = 20,
          device: torch.device | str | None = None, max_seconds: float | None = None) -> float:
    """Median seconds of one call `fn(*inputs[i % len(inputs)])`."""
    if device is None:
        first = next((a for a in inputs[0] if isinstance(a, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    _sync(device)
    times = []
    start_all = time.perf_counter()
    for i in range(repeat):
        args = inputs[(warmup + i) % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


def derived(seconds: float, flops: float | None = None, bytes_moved: float | None = None) -> dict:
    out = {}
    if flops is not None:
        out["TFLOP/s"] = flops / seconds / 1e12
    if bytes_moved is not None:
        out["GB/s"] = bytes_moved / seconds / 1e9
    return out


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (reads + writes counted), the memory ceiling."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 256 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), [()], warmup=2, repeat=10, device=device)
    return 2 * nbytes / t / 1e9


GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def measure_gemm_rate(device: torch.device | str, dtype: torch.dtype, n: int | None = None) -> float:
    """TFLOP/s of a square matmul of size n (4096 on a GPU, 2048 on the CPU) in `dtype`: the
    compute ceiling the machine reaches with torch's own GEMM."""
    device = torch.device(device)
    n = n or (4096 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = bench(lambda: a @ b, [()], warmup=2, repeat=5 if device.type == "cpu" else 20, device=device)
    return 2 * n**3 / t / 1e12


def measure_ceilings(device: torch.device | str) -> dict:
    """The machine's ceilings, measured now: {"copy_GB/s": ..., "gemm_TFLOP/s": {dtype name: ...}}."""
    return {"copy_GB/s": measure_copy_bandwidth(device),
            "gemm_TFLOP/s": {str(dt).replace("torch.", ""): measure_gemm_rate(device, dt) for dt in GEMM_DTYPES}}


# The units a record's `derived` figures may carry (each key names its unit), and fractions.
UNITS = ("TFLOP/s", "GB/s", "tokens/s")


def check_units(records: Sequence[Record]) -> None:
    """ValueError naming the record whose time is not in seconds or whose derived figure has no unit
    (a key that is not one of UNITS nor a fraction `frac_*`)."""
    for r in records:
        if not isinstance(r.median_s, (int, float)):
            raise ValueError(f"{r.op} {r.impl} {r.shape}: median_s must be seconds (a number), got {r.median_s!r}")
        bad = [k for k in r.derived if k not in UNITS and not k.startswith("frac")]
        if bad:
            raise ValueError(f"{r.op} {r.impl} {r.shape}: derived figure(s) {bad} have no unit; use one of {UNITS} "
                             f"or a frac_* fraction")


def write_json(records: Sequence[Record], path: str, meta: dict | None = None) -> None:
    check_units(records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"meta": meta or {}, "records": [r.to_dict() for r in records]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def print_table(records: Sequence[Record], baseline_impl: str | None = None) -> None:
    """One line a record; with baseline_impl, the ratio of each time to that impl's at the same op/shape."""
    base = {}
    if baseline_impl is not None:
        for r in records:
            if r.impl == baseline_impl:
                base[(r.op, json.dumps(r.shape, sort_keys=True), r.dtype)] = r.median_s
    for r in records:
        key = (r.op, json.dumps(r.shape, sort_keys=True), r.dtype)
        ratio = f" x{r.median_s / base[key]:.2f} vs {baseline_impl}" if key in base else ""
        d = " ".join(f"{v:.2f} {k}" for k, v in r.derived.items())
        print(f"{r.op:<18} {json.dumps(r.shape):<44} {r.dtype:<9} {r.impl:<14} "
              f"{r.median_s * 1e6:10.1f} us  {d}{ratio}", flush=True)
