#!/usr/bin/env bash
# The GPU check: one call on the H200 machine (no network there), from the repository root:
#
#   bash bench/gpu_check.sh              # on the GPU machine; writes under $OUT
#   bash bench/gpu_check.sh --dry-run    # here: the same steps, CUDA parts skipped or on the CPU
#
# Steps, each under its own time limit AND inside one overall budget (LOWRANK_GPU_BUDGET, default
# 360 s): a step gets min(its limit, what is left of the budget), so the whole run ends within
# ~6 minutes even when a step hangs; steps that find no time left are recorded as rc=124, 0 s.
#   1. install the carried wheels (.whl/: bitsandbytes, and rich with markdown-it-py, mdurl and
#      pygments for lowrank plan / compare: `../shared/tools/gpu-wheels.sh rich markdown-it-py mdurl
#      pygments`; the machine lacks them) with
#      pip --no-index --no-deps --target, and put that folder on PYTHONPATH;
#   2. build the native library with nvcc (sm_90;
#      53 s wall / 13 s CPU for both libraries on the 2-core dev machine);
#   3. pytest -m gpu over tests/ (the GPU tests of every test file);
#   4. one step per benchmark in bench/run.py's BENCHES (python -m bench.run --quick --only NAME),
#      so that a slow one cannot take the others' results with it; then `lowrank compare --device
#      cuda` (the planner's memory prediction against max_memory_allocated);
#   5. the rest of the suite on CUDA, last: it gets whatever time is left.
# Output: $OUT/gpu_check.log (everything), $OUT/gpu_check.json (per step: rc, seconds, the last
# pytest line), $OUT/pytest_*.xml (JUnit), $OUT/bench/bench_<op>.json.
set -u
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
OUT="${OUT:-/tmp/lowrank-gpu-check}"
PY="${PYTHON:-python3}"
SITE="${LOWRANK_SITE:-/tmp/lowrank-site}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STEPS="$OUT/.steps.tsv"
: > "$LOG"
: > "$STEPS"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
# A dry run on the 2-core dev machine runs the CPU benchmarks and the interpreter: 20 minutes.
if [ "$DRY" = 1 ]; then BUDGET="${LOWRANK_GPU_BUDGET:-1200}"; else BUDGET="${LOWRANK_GPU_BUDGET:-360}"; fi

# step NAME LIMIT_S CMD...: run with a time limit, record "name rc seconds last-pytest-line".
step() {
    local name=$1 limit=$2
    shift 2
    # A dry run does on 2 shared CPU cores what the H200 does: 4x the GPU limits.
    if [ "$DRY" = 1 ]; then limit=$(( limit * 4 )); fi
    # 15 s of the budget stay for the JSON summary and the kill grace of a timed-out step.
    local left=$(( T0 + BUDGET - 15 - $(date +%s) ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 0 ]; then
        echo "=== [$name] skipped: the ${BUDGET}s budget is spent"
        printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "not run: budget spent" >> "$STEPS"
        return
    fi
    echo "=== [$name] (limit ${limit}s, at +$(( $(date +%s) - T0 ))s): $*"
    local start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/.step.out"
    local rc=${PIPESTATUS[0]}
    local secs=$(( $(date +%s) - start ))
    local last
    last=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/.step.out" | tail -1 | tr '\t' ' ')
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$last" >> "$STEPS"
    echo "=== [$name] rc=$rc in ${secs}s"
}

echo "lowrank GPU check, $(date -Iseconds), dry-run=$DRY, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
step env 20 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; $PY -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"

# 1. Carried wheels.
if ls .whl/*.whl >/dev/null 2>&1; then
    step wheels 40 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
else
    echo "no .whl/ folder: nothing to install (../shared/tools/gpu-wheels.sh fetches the wheels)"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. the native library (lowrank/kernels/ is in the source tree itself).
if [ "$DRY" = 1 ]; then
    LOWRANK_NO_CUDA=1 step native 90 "$PY" setup.py build_native
else
    LOWRANK_CUDA_ARCHS="${LOWRANK_CUDA_ARCHS:-90}" step native 60 "$PY" setup.py build_native
fi

# 3. GPU tests. LOWRANK_AUTOTUNE=0: fixed block sizes (an autotuning run per new test shape would
# compile and time every config); the benchmarks below autotune.
export LOWRANK_AUTOTUNE=0
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers")
step pytest_gpu 90 "${PYTEST[@]}" tests -m gpu --junitxml="$OUT/pytest_gpu.xml"
unset LOWRANK_AUTOTUNE

# 4. Benchmarks (quick grids), one step each, every name in bench/run.py's BENCHES. Limits from
# the quick grids: lora_matmul 14 points x 4 impls (+ CUDA graphs at M <= 16) and two autotuned
# GEMMs (~11 configs each to compile once); nf4_dequant one 4096^2 weight; nf4_lora_matmul one
# 4096^3 QLoRA step (autotuned, + the fixed tiles) and the M=1 GEMV; merge 4 Llama shapes x 2
# ranks; sgmv q_proj x 3 adapter counts; train_step a ~1.1B Llama, 5 (method, impl) steps (last: skipped
# when the budget is spent).
BENCH_LIMITS="lora_matmul=80 nf4_dequant=15 nf4_lora_matmul=35 merge=40 sgmv=30 scaling=40 train_step=45"
for name in $("$PY" -c "from bench.run import BENCHES; print(' '.join(BENCHES))"); do
    limit=30
    for kv in $BENCH_LIMITS; do
        if [ "${kv%%=*}" = "$name" ]; then limit=${kv#*=}; fi
    done
    step "bench_$name" "$limit" "$PY" -m bench.run --quick --only "$name" --out "$OUT/bench"
done
# The report of those results ($OUT/REPORT.md, plots in $OUT/bench/report/): to commit, copy
# $OUT/bench to bench/results/<date>-<gpu>/ and run `python -m bench.report` here.
step report 20 "$PY" -m bench.report "$OUT/bench" --report "$OUT/REPORT.md"

# 4a. bench.static on the GPU machine: every sm_90a variant compiled there, with the driver's own
# register and spill counts beside ptxas's (driver_registers / driver_spills), in $OUT/static/.
if [ "$DRY" = 1 ]; then STATIC_DRIVER=""; else STATIC_DRIVER="--driver"; fi
step static 60 env -u TRITON_INTERPRET "$PY" -m bench.static --targets sm_90a --jobs 8 $STATIC_DRIVER \
    --out "$OUT/static" --json "$OUT/static/static.jsonl"

# 4b. lowrank compare on the GPU: each method's CUDA allocator peak (max_memory_allocated) next to
# the planner's prediction for the same step, in $OUT/compare/results.json.
if [ "$DRY" = 1 ]; then CMP_DEV=cpu; else CMP_DEV=cuda; fi
step compare 45 "$PY" -m lowrank.cli compare --device "$CMP_DEV" --steps 40 --pretrain-steps 100 --no-cache \
    --out "$OUT/compare" --json

# 5. The rest of the suite on CUDA (interpreter-sized shapes), with what time is left.
export LOWRANK_AUTOTUNE=0
if [ "$DRY" = 1 ]; then
    # The interpreter is too slow for the whole suite inside a dry run: one file as a smoke test.
    step pytest_suite 30 "${PYTEST[@]}" -m "not gpu" tests/test_lora_matmul.py -k "odd_shapes or wiring or layer" \
        --junitxml="$OUT/pytest_suite.xml"
else
    step pytest_suite 120 "${PYTEST[@]}" tests -m "not gpu" --junitxml="$OUT/pytest_suite.xml"
fi
unset LOWRANK_AUTOTUNE

"$PY" - "$STEPS" "$OUT/gpu_check.json" "$DRY" "$T0" <<'EOF'
import json, sys, time, datetime
steps_path, out, dry, t0 = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
steps = []
for line in open(steps_path):
    name, rc, secs, last = (line.rstrip("\n").split("\t") + [""])[:4]
    steps.append({"step": name, "rc": int(rc), "seconds": int(secs), "summary": last})
payload = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": dry,
           "total_seconds": int(time.time()) - t0, "ok": all(s["rc"] == 0 for s in steps), "steps": steps}
try:
    import torch
    payload["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    payload["torch"] = torch.__version__
except Exception as exc:  # the summary must still be written
    payload["device"] = f"unknown ({exc})"
json.dump(payload, open(out, "w"), indent=1)
print(json.dumps(payload, indent=1))
EOF
rm -f "$OUT/.step.out" "$OUT/.steps.tsv"
echo "done in $(( $(date +%s) - T0 ))s; log $LOG"
