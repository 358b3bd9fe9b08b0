"""Render benchmark results (the JSON of `bench.run`) into bench/REPORT.md, with PNG plots.

    python -m bench.report                         # every results folder under bench/results/ (and only those)
    python -m bench.report DIR [DIR ...] [--report PATH]

Each results folder is one device on one date (`bench/results/<date>-<device>/bench_<op>.json`) and
gets its own section of the report, between markers, so that devices sit side by side and are never
mixed in one table; a section is replaced when its folder is rendered again, the rest of the file
(the static-analysis section of `bench.static`, other devices) is kept. Per op: a table of every
implementation's median time at each shape and dtype, lowrank's time as a ratio to each peer
measured in the same run (< 1: lowrank is faster), its fraction of the roofline drawn by the
ceilings the run measured first (`ceilings.json`: copy bandwidth, GEMM rate per dtype), and a plot of those ratios (`<folder>/report/<op>.png`) under a sentence
saying what it shows. A record whose benchmark failed (no time, or an error) is shown as failed.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
REPORT = os.path.join(HERE, "REPORT.md")

# The implementations lowrank's are compared with, in the order their columns appear (floor-2mm and copy are
# reference floors, not peers: lowrank / floor is > 1).
PEERS = ("peft", "peft+bnb", "bitsandbytes", "unfused", "F.linear", "frozen_dense", "dense_lora", "floor-2mm", "copy")
# lowrank's own implementation of an op, the one compared with the peers (first present wins).
OURS = ("lowrank", "reference")


@dataclass
class Results:
    folder: str
    meta: dict
    records: list[dict]
    ceilings: dict | None = None  # ceilings.json of the run (bench.run measures it first), if any

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))


def load(folder: str) -> Results:
    """Every bench_*.json of a results folder; ValueError naming the file that is not one."""
    records, meta = [], {}
    files = sorted(glob.glob(os.path.join(folder, "bench_*.json")))
    if not files:
        raise ValueError(f"bench.report: {folder} holds no bench_*.json")
    for path in files:
        try:
            with open(path) as f:
                payload = json.load(f)
            recs = payload["records"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"bench.report: {path} is not a bench.run result ({type(exc).__name__}: {exc})") from None
        meta = meta or payload.get("meta", {})
        records += recs
    ceilings = None
    path = os.path.join(folder, "ceilings.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                ceilings = json.load(f)
            float(ceilings["copy_GB/s"]), dict(ceilings["gemm_TFLOP/s"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"bench.report: {path} is not a bench.run ceilings file ({type(exc).__name__}: {exc})") \
                from None
    return Results(folder, meta, records, ceilings)


def failed(rec: dict) -> bool:
    t = rec.get("median_s")
    return (not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
            or bool((rec.get("extra") or {}).get("error")))


def _key(rec: dict) -> tuple:
    return json.dumps(rec["shape"], sort_keys=True), rec["dtype"]


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _ms(t: float) -> str:
    return f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}" if t < 1 else f"{t * 1e3:.1f}"


def op_tables(res: Results) -> dict[str, dict]:
    """op -> {"impls": [...], "peers": [...], "ours": impl or None, "rows": [(shape, dtype, {impl: rec})]}."""
    ops: dict[str, dict] = {}
    for rec in res.records:
        op = ops.setdefault(rec["op"], {"groups": {}, "impls": []})
        op["groups"].setdefault(_key(rec), {})[rec["impl"]] = rec
        if rec["impl"] not in op["impls"]:
            op["impls"].append(rec["impl"])
    for op in ops.values():
        impls = op["impls"]
        op["ours"] = next((i for i in OURS if i in impls), None)
        op["peers"] = [p for p in PEERS if p in impls and p != op["ours"]]
        ordered = ([op["ours"]] if op["ours"] else []) + [i for i in impls if i != op["ours"] and i not in op["peers"]]
        op["impls"] = ordered + op["peers"]
        op["rows"] = [(json.loads(shape), dtype, by_impl) for (shape, dtype), by_impl in op["groups"].items()]
    return ops


def ratio(by_impl: dict, ours: str | None, peer: str) -> float | None:
    """ours' time / peer's at one shape, or None when either is missing or failed."""
    a, b = by_impl.get(ours), by_impl.get(peer)
    if a is None or b is None or failed(a) or failed(b):
        return None
    return a["median_s"] / b["median_s"]


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}


def roofline_fraction(rec: dict, ceilings: dict | None) -> float | None:
    """How close a record came to its roofline: the larger of its TFLOP/s over the GEMM ceiling of
    its dtype and its GB/s over the copy bandwidth (its floor time over its time). Without
    ceilings, a fraction the benchmark recorded itself (frac_*), if any."""
    d = rec.get("derived") or {}
    if ceilings:
        fracs = []
        peak = ceilings["gemm_TFLOP/s"].get(_DTYPE_NAMES.get(rec["dtype"], rec["dtype"]))
        if peak and isinstance(d.get("TFLOP/s"), (int, float)):
            fracs.append(d["TFLOP/s"] / peak)
        if isinstance(d.get("GB/s"), (int, float)):
            fracs.append(d["GB/s"] / ceilings["copy_GB/s"])
        fracs = [f for f in fracs if math.isfinite(f)]
        return max(fracs) if fracs else None
    for src in (d, rec.get("extra") or {}):
        for k, v in src.items():
            if k.startswith("frac") and isinstance(v, (int, float)) and math.isfinite(v):
                return float(v)
    return None


def render_table(op: str, table: dict, ceilings: dict | None = None) -> list[str]:
    ours, peers, impls = table["ours"], table["peers"], table["impls"]
    fractions = any(roofline_fraction(r, ceilings) is not None for _, _, g in table["rows"] for r in g.values())
    head = ["shape", "dtype"] + [f"{i} (ms)" for i in impls]
    head += [f"{ours} / {p}" for p in peers] if ours else []
    head += [f"{ours}: of roofline" if ceilings else f"{ours}: of ceiling"] if fractions and ours else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, dtype, by_impl in table["rows"]:
        cells = [_shape_text(shape), dtype]
        for i in impls:
            rec = by_impl.get(i)
            cells.append("" if rec is None else "failed" if failed(rec) else _ms(rec["median_s"]))
        if ours:
            for p in peers:
                q = ratio(by_impl, ours, p)
                cells.append("" if q is None else f"**{q:.2f}**" if q < 1 else f"{q:.2f}")
        if fractions and ours:
            f = roofline_fraction(by_impl[ours], ceilings) if ours in by_impl and not failed(by_impl[ours]) else None
            cells.append("" if f is None else f"{f:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# What a record may carry besides its time (bench_train_step): shown per implementation.
EXTRAS = {"peak_bytes": "peak memory", "trainable": "trainable params", "optimizer_bytes": "optimizer state",
          "checkpoint_bytes": "checkpoint"}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_extras(op: str, records: list[dict]) -> list[str]:
    """The memory / size figures of an op's records, one row per implementation and shape."""
    rows = [r for r in records if r["op"] == op and not failed(r)
            and any(k in (r.get("extra") or {}) for k in EXTRAS)]
    if not rows:
        return []
    keys = [k for k in EXTRAS if any(k in r["extra"] for r in rows)]
    lines = ["", "| impl | shape | " + " | ".join(EXTRAS[k] for k in keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        cells = [r["impl"], _shape_text(r["shape"])]
        for k in keys:
            v = r["extra"].get(k)
            cells.append("" if v is None else f"{v:,d}" if k == "trainable" else _bytes(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(op: str, table: dict, path: str, title: str) -> bool:
    """A horizontal bar per (shape, peer): ours' time over the peer's, log scale, 1 marked. False
    when there is nothing to plot (no peer, or no shape where both ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, peers = table["ours"], table["peers"]
    bars = []
    for shape, dtype, by_impl in table["rows"]:
        for p in peers:
            q = ratio(by_impl, ours, p)
            if q is not None:
                bars.append((f"{_shape_text(shape)} {dtype} vs {p}", q))
    if not ours or not bars:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.4))
    labels, values = zip(*bars)
    colors = ["tab:green" if v < 1 else "tab:red" for v in values]
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"{ours} time / peer time (log; < 1: {ours} faster)")
    ax.set_title(title, fontsize=9)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


_SWEPT = {"M": "M", "r": "r", "hidden": "K"}  # a scaling sweep -> the shape key holding its value


def plot_lines(op: str, table: dict, path: str, title: str) -> bool:
    """A scaling sweep (`bench_scaling`): time against the swept variable, a line per implementation,
    log-log. False when the records are not a sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    var = None
    for shape, _, by_impl in table["rows"]:
        var = shape.get("sweep")
        if var not in _SWEPT:
            return False
        for impl, rec in by_impl.items():
            if not failed(rec):
                series.setdefault(impl, []).append((shape[_SWEPT[var]], rec["median_s"] * 1e3))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for impl in table["impls"]:
        pts = sorted(series.get(impl, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl,
                    linewidth=2.2 if impl == table["ours"] else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel({"M": "tokens M", "r": "rank r", "hidden": "hidden size K = N"}[var])
    ax.set_ylabel("forward + backward time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _barh(labels: list[str], values: list[float], path: str, title: str, xlabel: str, fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.3 * len(labels) + 1.4))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    for y, v in enumerate(values):
        ax.text(v, y, " " + format(v, fmt), va="center", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_plots(res: Results, tables: dict, report_dir: str, device: str, date: str) -> list[str]:
    """Two plots over all ops (`tables`: `op_tables(res)`): lowrank's fraction of the roofline per
    op and shape, and the peak memory of every training-step method and implementation."""
    lines = []
    bars = []
    for op, table in tables.items():
        for shape, dtype, by_impl in table["rows"]:
            rec = by_impl.get(table["ours"]) if table["ours"] else None
            f = roofline_fraction(rec, res.ceilings) if rec is not None and not failed(rec) else None
            if f is not None:
                bars.append((f"{op} {_shape_text(shape)} {dtype}", f))
    if bars and res.ceilings:
        png = os.path.join(res.folder, "report", "roofline.png")
        _barh([b[0] for b in bars], [b[1] for b in bars], png, f"fraction of the roofline, {device}, {date}",
              "lowrank's fraction of its roofline (1 = at the machine's measured ceiling)", ".2f")
        lines += ["", "### Fraction of the roofline", "",
                  f"How close lowrank's implementation of every op and shape came to the roofline drawn by this "
                  f"run's measured ceilings on {device} ({date}): 1 is the ceiling, small fractions are overhead or "
                  f"work the napkin model does not count.", "",
                  f"![roofline]({os.path.relpath(png, report_dir)})"]
    mem = [(f"{r['op'].split('.', 1)[-1]} {r['impl']}", r["extra"]["peak_bytes"] / 2**20) for r in res.records
           if not failed(r) and "peak_bytes" in (r.get("extra") or {})]
    if mem:
        png = os.path.join(res.folder, "report", "memory.png")
        _barh([m[0] for m in mem], [m[1] for m in mem], png, f"peak memory of one training step, {device}, {date}",
              "peak tensor memory (MiB): parameters, gradients, optimizer state, activations", ".0f")
        lines += ["", "### Memory per method", "",
                  f"Peak memory of one training step per method and implementation on {device} ({date}).", "",
                  f"![memory]({os.path.relpath(png, report_dir)})"]
    return lines


def begin_marker(name: str) -> str:
    return f"<!-- bench.report: {name} begin -->"


def end_marker(name: str) -> str:
    return f"<!-- bench.report: {name} end -->"


def render_section(res: Results, report_dir: str) -> str:
    meta = res.meta
    device = meta.get("device") or next((r.get("device") for r in res.records), "unknown device")
    date = meta.get("date", res.name[:10])
    vers = meta.get("versions") or {}
    lines = [begin_marker(res.name), f"## Results: {device}, {date}{' (quick run)' if meta.get('quick') else ''}", ""]
    lines.append(f"From `{os.path.relpath(res.folder, report_dir)}` (`python -m bench.run`); "
                 + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".")
    lines.append("Times are medians over repeats in one run; a ratio is lowrank's time over the peer's at the same "
                 "shape in that run (**bold**: lowrank faster). Other devices have their own sections.")
    c = res.ceilings
    if c:
        lines.append("Ceilings measured at the start of the run: copy {:.1f} GB/s; square GEMM ".format(c["copy_GB/s"])
                     + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in c["gemm_TFLOP/s"].items())
                     + "; \"of roofline\" is the larger of a record's TFLOP/s over its dtype's GEMM rate and its "
                       "GB/s over the copy bandwidth (napkin FLOPs and minimum bytes).")
    else:
        lines.append("No ceilings were measured in this run; \"of ceiling\" is what the benchmark itself recorded.")
    tables = op_tables(res)
    for op, table in tables.items():
        lines += ["", f"### {op}", ""]
        png = os.path.join(res.folder, "report", f"{op}.png")
        if op.startswith("scaling.") and plot_lines(op, table, png, f"{op}: time per implementation, {device}, {date}"):
            lines.append(f"Forward + backward time of every implementation as `{op.split('.', 1)[1]}` grows, the "
                         f"other sizes fixed, on {device} ({date}): where the lines part, one implementation "
                         f"pays for work the others avoid.")
            lines += ["", f"![{op}]({os.path.relpath(png, report_dir)})", ""]
        elif plot(op, table, png, f"{op}: {table['ours']} time / each peer's, {device}, {date}"):
            lines.append(f"{table['ours']}'s time over each peer's at every shape of `{op}` on {device} ({date}); "
                         f"bars left of 1 are shapes where lowrank is faster.")
            lines += ["", f"![{op}]({os.path.relpath(png, report_dir)})", ""]
        lines += render_table(op, table, res.ceilings)
        lines += render_extras(op, res.records)
        bad = [f"{r['impl']} at {_shape_text(r['shape'])}" for r in res.records if r["op"] == op and failed(r)]
        if bad:
            lines += ["", f"Failed (not timed): {'; '.join(bad)}."]
    lines += summary_plots(res, tables, report_dir, device, date)
    lines += ["", end_marker(res.name)]
    return "\n".join(lines)


def write_report(results: list[Results], report: str = REPORT, prune: bool = False) -> None:
    """Replace (or append) each results folder's section of `report`, keeping everything else
    (with prune=True, sections of folders not in `results` are dropped: rendering every folder
    removes the sections of deleted ones); written to a temporary file and renamed over the report."""
    text = open(report).read() if os.path.exists(report) else "# Benchmark report\n"
    report_dir = os.path.dirname(os.path.abspath(report))
    if prune:
        keep = {r.name for r in results}
        for name in re.findall(r"<!-- bench\.report: (.+?) begin -->", text):
            b, e = begin_marker(name), end_marker(name)
            if name not in keep and e in text:
                text = text[:text.index(b)].rstrip("\n") + "\n" + text[text.index(e) + len(e):].lstrip("\n")
    for res in sorted(results, key=lambda r: r.name):
        body = render_section(res, report_dir)
        b, e = begin_marker(res.name), end_marker(res.name)
        if b in text and e in text:
            text = text[:text.index(b)] + body + text[text.index(e) + len(e):]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    tmp = report + ".tmp"
    with open(tmp, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", help="results folders (default: every one under bench/results/)")
    parser.add_argument("--report", default=REPORT, help="the markdown file to update")
    args = parser.parse_args(argv)
    folders = args.folders or sorted(d for d in glob.glob(os.path.join(RESULTS, "*"))
                                     if glob.glob(os.path.join(d, "bench_*.json")))
    if not folders:
        print("bench.report: no results to render", file=sys.stderr)
        return 1
    write_report([load(f) for f in folders], args.report, prune=not args.folders)
    print(f"bench.report: {len(folders)} results folder(s) rendered into {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
