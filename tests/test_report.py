"""bench/report.py: results JSON rendered into REPORT.md sections with tables and plots, from a small
fixture of records (one device per section, failed benchmarks shown as failed, nothing else touched)."""
import math
import os

import pytest

from bench import report
from bench.harness import Record, write_json

pytest.importorskip("matplotlib")


def _rec(op, shape, impl, t, extra=None, derived=None):
    return Record(op=op, shape=shape, dtype="bf16", impl=impl, median_s=t, derived=derived or {},
                  device="cpu test x2", versions={"torch": "9.9"}, extra=extra or {})


def _fixture(folder, device="cpu test x2", date="2026-01-02T03:04:05", lowrank_t=0.002):
    recs = [
        _rec("merge", {"r": 16}, "lowrank", lowrank_t, derived={"frac_copy_bw": 0.25}),
        _rec("merge", {"r": 16}, "peft", 0.004),
        _rec("merge", {"r": 64}, "lowrank", 0.006),
        _rec("merge", {"r": 64}, "peft", 0.003),
        _rec("merge", {"r": 64}, "lowrank-noexact", float("nan"), extra={"error": "RuntimeError('boom')"}),
    ]
    write_json(recs, os.path.join(folder, "bench_merge.json"),
               meta={"device": device, "date": date, "quick": True, "versions": {"torch": "9.9"}})
    write_json([_rec("nf4_gemv", {"M": 1}, "lowrank", 0.001), _rec("nf4_gemv", {"M": 1}, "bitsandbytes", 0.01)],
               os.path.join(folder, "bench_nf4_lora_matmul.json"), meta={"device": device, "date": date})


def test_report_tables_ratios_plots_and_failures(tmp_path):
    folder = tmp_path / "results" / "2026-01-02-cpu-test"
    _fixture(str(folder))
    out = tmp_path / "REPORT.md"
    static = "# Benchmark report\n\n<!-- bench.static: begin -->\nstatic table\n<!-- bench.static: end -->\n"
    out.write_text(static)
    assert report.main([str(folder), "--report", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(static.rstrip("\n"))  # the static section is kept as it was
    assert "## Results: cpu test x2, 2026-01-02T03:04:05 (quick run)" in text
    rows = [line for line in text.splitlines() if line.startswith("| r=")]
    assert rows[0].split(" | ")[1:] == ["bf16", "2.000", "", "4.000", "**0.50**", "0.25 |"]  # ratio < 1 in bold
    assert "| r=64 | bf16 | 6.000 | failed | 3.000 | 2.00 |" in text
    assert "Failed (not timed): lowrank-noexact at r=64." in text
    assert "| M=1 | bf16 | 1.000 | 10.00 | **0.10** |" in text
    for op in ("merge", "nf4_gemv"):
        png = folder / "report" / f"{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
        assert f"![{op}](results/2026-01-02-cpu-test/report/{op}.png)" in text
    assert "nan" not in text.lower()


def test_report_sections_replace_in_place_and_devices_stay_apart(tmp_path):
    a, b = tmp_path / "results" / "2026-01-02-cpu-a", tmp_path / "results" / "2026-01-02-gpu-b"
    _fixture(str(a), device="cpu a")
    _fixture(str(b), device="NVIDIA H200", lowrank_t=0.001)
    out = tmp_path / "REPORT.md"
    report.write_report([report.load(str(a)), report.load(str(b))], str(out))
    first = out.read_text()
    assert first.count("## Results:") == 2 and first.index("cpu a") < first.index("NVIDIA H200")
    _fixture(str(a), device="cpu a", lowrank_t=0.008)  # a new run of one device replaces its section only
    report.write_report([report.load(str(a))], str(out))
    second = out.read_text()
    assert second.count("## Results:") == 2 and second.count(report.begin_marker(a.name)) == 1
    assert "| r=16 | bf16 | 8.000 |" in second and "| r=16 | bf16 | 1.000 |" in second
    section_b = lambda t: t[t.index(report.begin_marker(b.name)):t.index(report.end_marker(b.name))]  # noqa: E731
    assert section_b(first) == section_b(second)


def test_report_refuses_what_is_not_a_result(tmp_path):
    with pytest.raises(ValueError, match="no bench_"):
        report.load(str(tmp_path))
    (tmp_path / "bench_x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bench_x.json is not a bench.run result"):
        report.load(str(tmp_path))
    assert report.failed({"median_s": math.nan}) and report.failed({"median_s": 1.0, "extra": {"error": "x"}})


def test_roofline_fraction_from_the_runs_ceilings(tmp_path):
    """With ceilings.json (bench.run measures it first) a record's fraction is the larger of its
    TFLOP/s over its dtype's GEMM rate and its GB/s over the copy bandwidth."""
    folder = tmp_path / "2026-01-03-cpu"
    recs = [_rec("lora", {"M": 8}, "lowrank", 0.002, derived={"TFLOP/s": 0.5, "GB/s": 30.0}),
            _rec("lora", {"M": 8}, "peft", 0.004, derived={"TFLOP/s": 0.25, "GB/s": 15.0}),
            _rec("lora", {"M": 512}, "lowrank", 0.01, derived={"TFLOP/s": 1.5, "GB/s": 2.0}),
            _rec("lora", {"M": 512}, "peft", 0.02)]
    write_json(recs, str(folder / "bench_lora.json"), meta={"device": "cpu", "date": "2026-01-03"})
    from bench.run import write_ceilings

    write_ceilings({"copy_GB/s": 40.0, "gemm_TFLOP/s": {"float32": 1.0, "bfloat16": 2.0, "float16": 2.0}},
                   str(folder / "ceilings.json"), "cpu")
    out = tmp_path / "REPORT.md"
    report.write_report([report.load(str(folder))], str(out))
    text = out.read_text()
    assert "lowrank: of roofline" in text and "copy 40.0 GB/s" in text
    assert "| M=8 | bf16 | 2.000 | 4.000 | **0.50** | 0.75 |" in text     # memory-bound: 30 / 40
    assert "| M=512 | bf16 | 10.00 | 20.00 | **0.50** | 0.75 |" in text  # compute-bound: 1.5 / 2.0
    assert "### Fraction of the roofline" in text and (folder / "report" / "roofline.png").stat().st_size > 2000
    (folder / "ceilings.json").write_text("{}")
    with pytest.raises(ValueError, match="ceilings.json is not"):
        report.load(str(folder))


def test_python_m_bench_renders_the_report_after_the_run(monkeypatch):
    """`python -m bench`: bench.run, then bench.report over every results folder, then bench.static
    (in its own interpreter) unless --no-static; a failing step's status is returned."""
    import bench.__main__ as entry

    calls = []
    monkeypatch.setattr(entry.run, "main", lambda argv: calls.append(("run", argv)) or 0)
    monkeypatch.setattr(entry.report, "main", lambda argv: calls.append(("report", argv)) or 0)
    monkeypatch.setattr(entry.subprocess, "call", lambda cmd, env: calls.append(("static", cmd[2])) or 3)
    assert entry.main(["--quick", "--no-static"]) == 0
    assert calls == [("run", ["--quick"]), ("report", [])]
    calls.clear()
    assert entry.main(["--quick"]) == 3
    assert calls == [("run", ["--quick"]), ("report", []), ("static", "bench.static")]


def test_extras_table_for_training_steps(tmp_path):
    folder = tmp_path / "2026-01-04-cpu"
    extra = {"peak_bytes": 3 * 2**20, "trainable": 1234567, "optimizer_bytes": 2048, "checkpoint_bytes": 10}
    write_json([_rec("train_step.lora", {"tokens": 256}, "lowrank", 0.3, extra=extra),
                _rec("train_step.lora", {"tokens": 256}, "peft", 0.4, extra=extra)],
               str(folder / "bench_train_step.json"), meta={"device": "cpu", "date": "2026-01-04"})
    out = tmp_path / "REPORT.md"
    report.write_report([report.load(str(folder))], str(out))
    text = out.read_text()
    assert "| impl | shape | peak memory | trainable params | optimizer state | checkpoint |" in text
    assert "| lowrank | tokens=256 | 3.0 MiB | 1,234,567 | 2.0 KiB | 10 B |" in text
    assert "### Memory per method" in text and (folder / "report" / "memory.png").stat().st_size > 2000


def test_scaling_sweeps_are_drawn_as_lines(tmp_path):
    folder = tmp_path / "2026-01-05-cpu"
    recs = [_rec("scaling.M", {"sweep": "M", "M": m, "K": 64, "N": 64, "r": 8}, impl, t * m)
            for m in (16, 64, 256) for impl, t in (("reference", 1e-5), ("peft", 2e-5), ("F.linear", 5e-6))]
    write_json(recs, str(folder / "bench_scaling.json"), meta={"device": "cpu", "date": "2026-01-05"})
    out = tmp_path / "REPORT.md"
    report.write_report([report.load(str(folder))], str(out))
    text = out.read_text()
    assert "Forward + backward time of every implementation as `M` grows" in text
    png = folder / "report" / "scaling.M.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert "| K=64 M=64 N=64 r=8 sweep=M | bf16 | 0.640 | 1.280 | 0.320 | **0.50** | 2.00 |" in text


def test_rendering_every_folder_drops_the_sections_of_deleted_ones(tmp_path, monkeypatch):
    results = tmp_path / "results"
    a, b = results / "2026-01-06-a", results / "2026-01-06-b"
    _fixture(str(a), device="cpu a")
    _fixture(str(b), device="cpu b")
    out = tmp_path / "REPORT.md"
    out.write_text("# Benchmark report\n\n<!-- bench.static: begin -->\nstatic\n<!-- bench.static: end -->\n")
    monkeypatch.setattr(report, "RESULTS", str(results))
    assert report.main(["--report", str(out)]) == 0
    assert "cpu a" in out.read_text() and "cpu b" in out.read_text()
    import shutil

    shutil.rmtree(b)
    assert report.main(["--report", str(out)]) == 0
    text = out.read_text()
    assert "cpu a" in text and "cpu b" not in text and report.begin_marker(b.name) not in text
    assert "<!-- bench.static: begin -->\nstatic\n<!-- bench.static: end -->" in text
