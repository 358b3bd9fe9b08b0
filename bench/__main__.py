"""python -m bench [bench.run's arguments] [--no-static]: the microbenchmarks (`bench.run`), their
report (`bench.report`: every results folder's section of bench/REPORT.md, tables and plots), then
the static analysis of every kernel variant (`bench.static`, which rewrites its section of
bench/REPORT.md). The static part runs in its own interpreter without TRITON_INTERPRET: it compiles
real kernels for sm_90a and sm_80, no GPU needed."""
from __future__ import annotations

import os
import subprocess
import sys

from . import report, run


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    static = "--no-static" not in argv
    argv = [a for a in argv if a != "--no-static"]
    rc = run.main(argv)
    rc = report.main([]) or rc
    if static:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        report_md = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "REPORT.md"))
        rc = rc or subprocess.call([sys.executable, "-m", "bench.static", "--report", report_md], env=env)
    return rc


if __name__ == "__main__":
    sys.exit(main())
