"""The shared benchmark harness (bench/harness.py)."""
import json
import time

import torch

from bench import harness


def test_median_of_repeats_and_rotation():
    calls = []
    sleeps = [0.004, 0.001, 0.001, 0.001, 0.03]

    def fn(i):
        calls.append(i)
        time.sleep(sleeps[len(calls) % len(sleeps)])

    inputs = [(0,), (1,), (2,)]
    t = harness.bench(fn, inputs, warmup=2, repeat=5, device="cpu")
    assert calls == [0, 1, 2, 0, 1, 2, 0]  # warm-up then repeats, rotating through the sets
    assert 0.0009 < t < 0.02  # the median ignores the single 30 ms outlier


def test_rotating_inputs_exceed_the_cache():
    sets = harness.rotating_inputs(lambda: (torch.empty(1024),), bytes_per_set=4096, cache_bytes=40_000)
    assert len(sets) == 10 and sets[0][0] is not sets[1][0]
    assert len(harness.rotating_inputs(lambda: (), bytes_per_set=10**12)) == 1


def test_records_are_written_atomically_as_json(tmp_path):
    rec = harness.Record(op="lora_matmul", shape={"M": 16, "K": 64, "N": 32, "r": 8}, dtype="bfloat16",
                         impl="lowrank", median_s=2e-3, derived=harness.derived(2e-3, flops=4e9, bytes_moved=2e6),
                         device="cpu", versions=harness.versions())
    path = tmp_path / "sub" / "out.json"
    harness.write_json([rec], str(path), meta={"quick": True})
    data = json.loads(path.read_text())
    assert list(path.parent.iterdir()) == [path]
    (row,) = data["records"]
    assert set(row) >= {"op", "shape", "dtype", "impl", "median_s", "derived", "device", "versions"}
    assert row["derived"]["TFLOP/s"] == 4e9 / 2e-3 / 1e12 and row["derived"]["GB/s"] == 2e6 / 2e-3 / 1e9
    assert row["versions"]["torch"] == torch.__version__


def test_gemm_rate_is_the_flops_over_the_median_time(monkeypatch):
    """measure_gemm_rate counts 2 n^3 FLOPs over bench's median; ceilings cover every GEMM dtype."""
    monkeypatch.setattr(harness, "bench", lambda fn, inputs, **kw: (fn(), 0.002)[1])
    assert harness.measure_gemm_rate("cpu", torch.float32, n=100) == 2 * 100**3 / 0.002 / 1e12
    monkeypatch.setattr(harness, "measure_copy_bandwidth", lambda device: 12.5)
    monkeypatch.setattr(harness, "measure_gemm_rate", lambda device, dt: {torch.float32: 1.0}.get(dt, 2.0))
    c = harness.measure_ceilings("cpu")
    assert c == {"copy_GB/s": 12.5, "gemm_TFLOP/s": {"float32": 1.0, "bfloat16": 2.0, "float16": 2.0}}


def test_every_derived_figure_has_a_unit(tmp_path):
    rec = harness.Record(op="x", shape={}, dtype="bf16", impl="lowrank", median_s=0.1, derived={"GB/s": 1.0,
                         "frac_bw": 0.5, "TFLOP/s": 2.0, "tokens/s": 3.0}, device="cpu", versions={})
    harness.write_json([rec], str(tmp_path / "ok.json"))
    rec.derived["speed"] = 4.0
    import pytest

    with pytest.raises(ValueError, match=r"\['speed'\] have no unit"):
        harness.write_json([rec], str(tmp_path / "bad.json"))
    assert not (tmp_path / "bad.json").exists()
