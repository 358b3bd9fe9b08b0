"""Run the microbenchmarks and write their JSON records.

    python -m bench.run --quick                      # every benchmark, quick shapes
    python -m bench.run --only lora_matmul --out DIR

The machine's ceilings (copy bandwidth; square-GEMM rate in fp32, bf16, fp16) are measured first and
written to DIR/ceilings.json; `bench.report` gives each record's fraction of that roofline.
Each benchmark is a module `bench/bench_<op>.py` with
    def run(quick: bool, device: str) -> list[bench.harness.Record]
and is listed in BENCHES. Results go to DIR/bench_<op>.json (default bench/results/<date>-<device>/).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import sys
import traceback

import torch

from .harness import device_name, measure_ceilings, print_table, versions, write_json

BENCHES: list[str] = ["lora_matmul", "dora", "nf4_dequant", "nf4_lora_matmul", "merge", "sgmv", "scaling",
                      "train_step"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shape grid (minutes, not hours)")
    parser.add_argument("--only", action="append", default=[], help="run only these ops (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output folder")
    args = parser.parse_args(argv)
    dev = device_name(args.device)
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results",
        f"{datetime.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '-', dev).strip('-')}")
    ceilings = measure_ceilings(args.device)
    print("ceilings: copy {:.1f} GB/s; GEMM ".format(ceilings["copy_GB/s"])
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in ceilings["gemm_TFLOP/s"].items()), flush=True)
    write_ceilings(ceilings, os.path.join(out, "ceilings.json"), dev)
    failed = 0
    for name in BENCHES:
        if args.only and name not in args.only:
            continue
        print(f"== bench_{name} on {dev}", flush=True)
        try:
            mod = importlib.import_module(f"bench.bench_{name}")
            records = mod.run(quick=args.quick, device=args.device)
        except Exception:
            traceback.print_exc()
            failed += 1
            continue
        print_table(records, getattr(mod, "BASELINE", None))
        write_json(records, os.path.join(out, f"bench_{name}.json"),
                   meta={"device": dev, "versions": versions(), "quick": args.quick,
                         "date": datetime.datetime.now().isoformat(timespec="seconds")})
    print(f"results in {out}")
    return 1 if failed else 0


def write_ceilings(ceilings: dict, path: str, device: str) -> None:
    """ceilings.json beside the results: what every record's "of roofline" fraction is taken against."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"device": device, "date": datetime.datetime.now().isoformat(timespec="seconds"), **ceilings}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
