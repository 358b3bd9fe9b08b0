"""What sm_90a (H200) and sm_80 (A100) will run, checked without a GPU: every Triton kernel variant a
launcher or autotuner can choose (`python -m bench.static`) compiles, fits the target's shared
memory, uses wgmma for GEMM tiles of 64 rows or more on sm_90a, and, for fp16 / bf16, spills no
register. The tables are printed (pytest -s, or on failure)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import static as S
from lowrank.kernels import lora_matmul as lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="the GPU machine runs bench.static in bench/gpu_check.sh")]

def _records(dtypes: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.static", "--dtypes", dtypes, "--json", "-"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def low():
    return _records("bf16,fp16")


@pytest.fixture(scope="module")
def fp32():
    return _records("fp32")


def test_16bit_variants_compile_fit_use_wgmma_and_never_spill(low):
    print(S.table(low))
    kernels = {(r["kernel"], r["target"]) for r in low}
    for fam in ("_lora_fwd_kernel", "_lora_dx_kernel", "_lora_da_kernel", "_lora_dt_db_kernel", "_lora_shrink_kernel",
                "_lora_small_m_partial_kernel", "_nf4_lora_matmul_kernel", "_nf4_dequant_kernel", "_sgmv_shrink_kernel",
                "_sgmv_expand_kernel", "_sgmv_wgrad_kernel", "_dora_norms_kernel"):
        for target in S.TARGETS:
            assert any(k.endswith(fam) and t == target for k, t in kernels), (fam, target)
    compiled = [r for r in low if not r["pruned"]]
    assert len(compiled) > 150
    assert S.problems(low) == []
    assert any(r["mma"] == "wgmma" for r in compiled if r["target"] == "sm_90a")
    assert all(r["mma"] != "wgmma" for r in compiled if r["target"] == "sm_80")


def test_fp32_variants_compile_fit_and_spill_at_most_the_stated_bound(fp32):
    print(S.table(fp32))
    assert len([r for r in fp32 if not r["pruned"]]) > 80
    assert S.problems(fp32) == []  # fp32 spills up to S.FP32_SPILL_BOUND (64) bytes are allowed
    nf4 = [r for r in fp32 if r["kernel"].endswith("_nf4_lora_matmul_kernel") and not r["pruned"]]
    assert nf4 and all(r["spill_stores"] == 0 for r in nf4)


def test_pruning_matches_what_the_compiler_allocates(low, fp32):
    """The launchers' shared-memory estimate for the LoRA GEMM tiles bounds what Triton allocated,
    and the fp32 forward at 128x256x64 (294,912 B of operand tiles) is pruned on sm_90a."""
    for r in low + fp32:
        if r["pruned"] or not r["kernel"].endswith(("_lora_fwd_kernel", "_lora_dx_kernel")):
            continue
        c = r["consts"]
        est = (r["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * c["BLOCK_N"])
               + c["BLOCK_R"] * (c["BLOCK_N"] + 2 * c["BLOCK_M"])) * S.ELEM[r["dtype"]]
        assert r["shared"] <= est, r
    big = [r for r in fp32 if r["kernel"].endswith("_lora_fwd_kernel") and r["target"] == "sm_90a"
           and r["config"].startswith("128x256x64")]
    assert big and all("shared memory" in r["pruned"] for r in big)


def test_problems_flags_what_it_should():
    """The check can fail: a spill, a shared-memory overflow and a GEMM without wgmma are each caught."""
    base = dict(kernel="k", dtype="bf16", target="sm_90a", config="c", pruned="", gemm=True, block_m=128,
                registers=255, spill_stores=0, spill_loads=0, shared=1000, mma="wgmma")
    assert S.problems([base]) == []
    assert "spill" in S.problems([dict(base, spill_stores=4, spill_loads=4)])[0]
    assert "shared memory" in S.problems([dict(base, shared=300_000)])[0]
    assert "without wgmma" in S.problems([dict(base, mma="mma.sync")])[0]
    assert S.problems([dict(base, mma="mma.sync", block_m=16)]) == []
    assert S.problems([dict(base, dtype="fp32", spill_stores=40, spill_loads=40)], fp32_spill_bound=64) == []


def test_register_rules():
    """The launchers' register budgets (measured with bench.static) in a few cases."""
    fits = lm.gemm_config_fits
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    assert fits(tile, 8, 3, 2, 32, 232448, dropout=True, cap_major=9, dx=True) is True
    assert fits(tile, 8, 3, 2, 32, 166912, dropout=True, cap_major=8, dx=True) is not True
    assert fits(dict(tile, BLOCK_N=256), 8, 3, 2, 32, 232448, cap_major=9) is True
    assert "Hopper" in fits(dict(tile, BLOCK_N=256), 8, 2, 2, 32, 166912, cap_major=8)
    assert "shared memory" in fits(dict(tile, BLOCK_N=256), 8, 3, 4, 32, 232448, cap_major=9)
