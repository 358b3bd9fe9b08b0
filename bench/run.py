"""Run the microbenchmarks and write their JSON records.

    python -m bench.run --quick                      # every benchmark, quick shapes
    python -m bench.run --only lora_matmul --out DIR

Each benchmark is a module `bench/bench_<op>.py` with
    def run(quick: bool, device: str) -> list[bench.harness.Record]
and is listed in BENCHES. Results go to DIR/bench_<op>.json (default bench/results/<date>-<device>/).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
import traceback

import torch

from .harness import device_name, print_table, versions, write_json

BENCHES: list[str] = ["lora_matmul", "nf4_dequant", "nf4_lora_matmul", "merge", "sgmv"]


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


if __name__ == "__main__":
    sys.exit(main())
