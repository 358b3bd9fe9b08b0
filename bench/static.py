"""What the GPU will run, known without one: every Triton kernel variant a launcher or autotuner
can choose, compiled for sm_90a (H100/H200) and sm_80 (A100), with what ptxas says of it.

    python -m bench.static                       # every variant, both targets; table + JSON
    python -m bench.static --dtypes bf16,fp16 --targets sm_90a --json -    # JSON lines on stdout
    python -m bench.static --report bench/REPORT.md                     # rewrite the report's section
    python -m bench.static --targets sm_90a --driver                    # on the H200: the driver's counts too

Run it without TRITON_INTERPRET (it compiles real kernels; no GPU is needed: Triton compiles to PTX
for a named target and its bundled ptxas assembles it). Per variant: registers per thread, spill
stores / loads and stack frame (ptxas -v), shared memory (Triton's metadata), the tensor-core
instruction the PTX uses (wgmma on Hopper, mma.sync on Ampere-style paths, none) and how many,
and occupancy (blocks per SM from registers, shared memory and warps). Variants the launchers
prune on a target (too much shared memory, too many live accumulators with dropout) are listed
as pruned with the estimate that pruned them, and not compiled. A roofline at Llama-3-8B shapes
puts each op's FLOPs and minimum bytes against the H200's measured ceilings.

The variant lists come from the launchers themselves (`_gemm_configs`, `gemm_config_fits`,
`_heuristic_config`, the block helpers, `_config`, `_TUNE_CONFIGS` / `_prune_tuned`), so a change
of tiles there changes what is checked here.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# Per target: compute capability, shared memory one block may use, shared memory per SM, registers
# per SM, warps per SM, blocks per SM (CUDA occupancy tables for sm_90 and sm_80).
TARGETS = {
    "sm_90a": dict(cap=90, smem_block=232448, smem_sm=233472, regs_sm=65536, warps_sm=64, blocks_sm=32),
    "sm_80": dict(cap=80, smem_block=166912, smem_sm=167936, regs_sm=65536, warps_sm=64, blocks_sm=32),
}
# The H200's measured ceilings (../shared/FINDINGS.md): dense bf16 GEMM and device-copy bandwidth.
H200_FLOPS = 790e12
H200_BYTES = 4.3e12
DTYPES = ("bf16", "fp16", "fp32")
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
# fp32 variants (IEEE / tf32 dots, twice the bytes per element) may spill this much at most, in
# bytes of spill stores; measured: at most 52, in rank-128 backward tiles on sm_80.
FP32_SPILL_BOUND = 64


@dataclass
class Variant:
    kernel: str               # module.kernel
    dtype: str
    target: str
    consts: dict
    num_warps: int
    num_stages: int
    sig: dict = field(repr=False)      # argument name -> Triton type for the non-constexpr arguments
    attrs: dict = field(repr=False)
    choice: str = ""          # how a launcher picks it: "autotune", "heuristic M<=16", ...
    gemm: bool = False        # a GEMM-shaped kernel (tensor cores expected on sm_90a at tile M >= 64)
    tile_m: int | None = None # rows of the output tile (BLOCK_M unless the kernel says otherwise)
    pruned: str = ""          # why the launcher never launches it on this target ("" if it may)
    fn: object = field(default=None, repr=False)
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        blocks = "x".join(str(v) for k, v in self.consts.items() if k.startswith("BLOCK_") and k != "BLOCK_R")
        extra = [f"r{self.consts['BLOCK_R']}"] if "BLOCK_R" in self.consts else []
        extra += [k.lower() for k in ("DROPOUT", "HAS_BIAS", "W_TRANSPOSED", "HAS_SCALE") if self.consts.get(k)]
        if "ALIGNED" in self.consts and not self.consts["ALIGNED"]:
            extra.append("gather")
        if self.consts.get("SPLIT_Q", 1) > 1:
            extra.append("splitq")
        return f"{blocks} w{self.num_warps} s{self.num_stages}" + (" " + ",".join(extra) if extra else "")


# -- signatures ----------------------------------------------------------------------------------

_FLOATS = {"scaling", "p", "inv_keep", "lora_scale"}
_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_yn", "stride_br", "stride_dyn", "stride_ak", "stride_dxk",
                 "stride_bias"}


def _signature(fn, dtype: str, consts: dict, pointer_types: dict, unit_strides=_UNIT_STRIDES):
    """(signature, constexprs, attrs) for `fn`: pointers default to the operand dtype (16-byte
    aligned), `pointer_types` overrides; the innermost strides are constexpr 1 where the launcher's
    tensors are contiguous; other ints i32 (strides and sizes divisible by 16)."""
    sig, attrs, consts = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in unit_strides:
            sig[name], consts[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name == "n_elements":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name in ("N", "K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _variant(fn, module, dtype, target, consts, warps, stages, choice, pointer_types=None, gemm=False, pruned="",
             options=None, unit_strides=_UNIT_STRIDES, tile_m=None):
    sig, consts, attrs = _signature(fn, dtype, consts, pointer_types or {}, unit_strides)
    return Variant(kernel=f"{module}.{fn.__name__}", dtype=dtype, target=target, consts=consts, num_warps=warps,
                   num_stages=stages, sig=sig, attrs=attrs, choice=choice, gemm=gemm, pruned=pruned, fn=fn,
                   options=dict(options or {}), tile_m=tile_m if tile_m is not None else consts.get("BLOCK_M"))


# -- the variants the launchers can choose -------------------------------------------------------

def lora_matmul_variants(dtype: str, target: str) -> list[Variant]:
    from lowrank.kernels import lora_matmul as lm

    t = TARGETS[target]
    lowp = dtype != "fp32"
    prec = dict(LOWP=lowp, PREC="ieee" if lowp else "tf32")
    f32 = {n: "*fp32" for n in ("t_ptr", "dt_ptr", "db_ptr", "da_ptr", "ws_ptr", "wst_ptr", "scale_ptr")}
    f32["seed_ptr"] = "*i64"
    out = []
    gemms = [(c.kwargs, c.num_warps, c.num_stages, "autotune") for c in lm._gemm_configs()]
    for m, name in ((16, "heuristic M<=16"), (64, "heuristic M<=64"), (4096, "heuristic M>64")):
        h = dict(lm._heuristic_config(m))
        gemms.append(({k: v for k, v in h.items() if k.isupper()}, h["num_warps"], h.get("num_stages", 3), name))
    for kw, warps, stages, choice in gemms:
        for block_r in sorted({lm._gemm_block_r(16), lm._gemm_block_r(lm.MAX_RANK)}):
            # DoRA (ops.dora's Triton path) runs the same tiles with the scale epilogue / scaled dY.
            for kernel, flags in ((lm._lora_fwd_kernel, [dict(HAS_BIAS=True, HAS_SCALE=False, STORE_V=False),
                                                         dict(HAS_BIAS=True, HAS_SCALE=True, STORE_V=True)]),
                                  (lm._lora_dx_kernel, [dict(DROPOUT=False, HAS_SCALE=False),
                                                        dict(DROPOUT=True, HAS_SCALE=False),
                                                        dict(DROPOUT=False, HAS_SCALE=True)])):
                for flag in flags:
                    consts = dict(kw, BLOCK_R=block_r, **flag, **prec)
                    why = lm.gemm_config_fits(kw, warps, stages, ELEM[dtype], block_r, t["smem_block"],
                                              dropout=flag.get("DROPOUT", False), cap_major=t["cap"] // 10,
                                              dx=kernel is lm._lora_dx_kernel, scale=flag["HAS_SCALE"])
                    out.append(_variant(kernel, "lora_matmul", dtype, target, consts, warps, stages, choice, f32,
                                        gemm=True, pruned="" if why is True else why))
    for m in (16, 8192):
        for block_r in (16, lm.MAX_RANK):
            (bm_s, bk_s), (bm_d, bn_d) = lm._shrink_blocks(m), lm._dt_db_blocks(m, lowp, block_r)
            bm_a, bk_a = lm._da_blocks(lowp, block_r)
            out += [
                _variant(lm._lora_shrink_kernel, "lora_matmul", dtype, target,
                         dict(BLOCK_M=bm_s, BLOCK_K=bk_s, BLOCK_R=block_r, ATOMIC=True, DROPOUT=True, **prec), 4, 3,
                         f"launcher M={m}", f32),
                *[_variant(lm._lora_dt_db_kernel, "lora_matmul", dtype, target,
                           dict(BLOCK_M=bm_d, BLOCK_N=bn_d, BLOCK_R=block_r, ATOMIC_DT=True, ATOMIC_DB=True,
                                HAS_SCALE=scaled, **prec),
                           8 if bm_d == 128 else 4, 3, f"launcher M={m}", f32) for scaled in (False, True)],
                _variant(lm._lora_da_kernel, "lora_matmul", dtype, target,
                         dict(BLOCK_M=bm_a, BLOCK_K=bk_a, BLOCK_R=block_r, ATOMIC=True, DROPOUT=True, **prec), 4, 3,
                         f"launcher M={m}", f32, tile_m=block_r),
            ]
    for block_r in (16, lm.MAX_RANK):
        bm_p, bn_p, bk_p = lm._small_m_blocks(lowp, block_r)
        out += [
            _variant(lm._lora_small_m_partial_kernel, "lora_matmul", dtype, target,
                     dict(BLOCK_M=bm_p, BLOCK_N=bn_p, BLOCK_K=bk_p, BLOCK_R=block_r, DROPOUT=True, **prec), 4, 4,
                     "launcher M<=16", f32),
            *[_variant(lm._lora_small_m_epilogue_kernel, "lora_matmul", dtype, target,
                       dict(BLOCK_M=bm_p, BLOCK_N=bn_p, BLOCK_R=block_r, HAS_BIAS=True, HAS_SCALE=scaled,
                            STORE_V=scaled, **prec), 4, 2,
                       "launcher M<=16", f32) for scaled in (False, True)],
        ]
    return _dedupe(out)


def nf4_lora_matmul_variants(dtype: str, target: str) -> list[Variant]:
    import torch

    from lowrank.kernels import nf4_lora_matmul as K

    t = TARGETS[target]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    jobs = []
    # DoRA (ops.dora's NF4 Triton path): the forward's scale epilogue and v store, the dX direction's
    # scaled dY; the launchers' tile rules see the scale (scaled).
    for transposed in (True, False):
        for aligned in (True, False):
            for scaled in (False, True):
                for m in (1, 64, 4096):
                    cfg = K._config(m, False, torch_dtype, aligned, t["smem_block"], scaled and not transposed)
                    jobs.append((transposed, aligned, scaled, m, cfg, f"fixed M={m}"))
                for c in K._prune_tuned(K._TUNE_CONFIGS, {}, IEEE=dtype == "fp32", ALIGNED=aligned,
                                        CAP=t["cap"] // 10, HAS_SCALE=scaled, W_TRANSPOSED=transposed):
                    jobs.append((transposed, aligned, scaled, 4096,
                                 dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages), "autotune M>16"))
    out = []
    for transposed, aligned, scaled, m, cfg, choice in jobs:
        split = 3 if m <= 16 else 1
        consts = dict(W_TRANSPOSED=transposed, ALIGNED=aligned, BLOCKSIZE=64, HAS_LORA=True, R_PAD=16,
                      HAS_BIAS=True, IEEE=dtype == "fp32", INTERPRETED=False, SPLIT_Q=split,
                      HAS_SCALE=scaled, STORE_V=scaled and transposed,
                      **{k: v for k, v in cfg.items() if k.isupper()})
        ptrs = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "scale_ptr": "*fp32",
                "out_ptr": "*fp32" if split > 1 else f"*{dtype}", "v_ptr": "*fp32" if split > 1 else f"*{dtype}"}
        out.append(_variant(K._nf4_lora_matmul_kernel, "nf4_lora_matmul", dtype, target, consts,
                            cfg["num_warps"], cfg["num_stages"], choice, ptrs, gemm=True, unit_strides=()))
    return _dedupe(out)


def nf4_dequant_variants(dtype: str, target: str) -> list[Variant]:
    from lowrank.kernels import nf4_dequant as K

    ptrs = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
            "offset_ptr": "*fp32", "code_ptr": "*fp32"}
    return [_variant(K._nf4_dequant_kernel, "nf4_dequant", dtype, target,
                     dict(BLOCKSIZE=bs, NESTED_BLOCKSIZE=256, NESTED=True, BLOCK=2048, INTERPRETED=False), 4, 3,
                     "launcher", ptrs, options={"enable_fp_fusion": False}) for bs in (64, 4096)]


def sgmv_variants(dtype: str, target: str) -> list[Variant]:
    import torch

    from lowrank.kernels import sgmv as K

    b = K._blocks(torch.device("cuda"), r_max=64)
    prec, _ = K._precision({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    tables = dict(order_ptr="*i64", seg_start_ptr="*i64", seg_len_ptr="*i64", rank_ptr="*i32", tile_seg_ptr="*i64",
                  tile_m0_ptr="*i64", roff_ptr="*i64", wtab_ptr="*i64", scale_ptr="*fp32", t_ptr="*fp32",
                  out_ptr="*fp32", g_ptr="*fp32")
    return [
        _variant(K._sgmv_shrink_kernel, "sgmv", dtype, target,
                 dict(SCALED=True, PRECISION=prec, BLOCK_M=b["BLOCK_M"], BLOCK_R=b["SHRINK_R"], BLOCK_K=b["BLOCK_K"]),
                 4, 3, "launcher", tables, gemm=True, unit_strides=()),
        _variant(K._sgmv_expand_kernel, "sgmv", dtype, target,
                 dict(SCALED=True, HAS_SRC=True, PRECISION=prec, BLOCK_M=b["BLOCK_M"], BLOCK_R=b["BLOCK_R"],
                      BLOCK_N=b["BLOCK_N"]), 4, 3, "launcher", tables, gemm=True, unit_strides=()),
        _variant(K._sgmv_wgrad_kernel, "sgmv", dtype, target,
                 dict(SCALED=True, PRECISION=prec, BLOCK_M=b["BLOCK_M"], BLOCK_R=b["BLOCK_R"], BLOCK_K=b["BLOCK_K"]),
                 4, 3, "launcher", tables, gemm=True, unit_strides=(), tile_m=b["BLOCK_R"]),
    ]


def dora_norms_variants(dtype: str, target: str) -> list[Variant]:
    """DoRA's float64 W A^T / ||W||^2 kernel (`lowrank/kernels/dora_norms.py`): dense and NF4 (aligned and
    gather decode) at the padded ranks its launcher makes; float64 MMAs, never wgmma (not a GEMM here)."""
    from lowrank.kernels import dora_norms as K

    out = []
    for nf4, aligned in ((False, False), (True, True), (True, False)):
        for r_pad in (16, 32, 64, K.MAX_RANK):
            cfg = K._config(r_pad, interpret=False)
            consts = dict(NF4=nf4, ALIGNED=aligned, BLOCKSIZE=64, HAS_A=True, WANT_SQ=True, INTERPRETED=False,
                          R_PAD=r_pad, **{k: v for k, v in cfg.items() if k.isupper()})
            ptrs = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "p_ptr": "*fp64",
                    "sq_ptr": "*fp64", "a_ptr": "*fp32" if nf4 else f"*{dtype}"}
            out.append(_variant(K._dora_norms_kernel, "dora_norms", dtype, target, consts, cfg["num_warps"],
                                cfg["num_stages"], f"launcher r<={r_pad}" + (" nf4" if nf4 else ""), ptrs,
                                tile_m=cfg["BLOCK_N"]))
    return _dedupe(out)


FAMILIES = {"lora_matmul": lora_matmul_variants, "nf4_lora_matmul": nf4_lora_matmul_variants,
            "nf4_dequant": nf4_dequant_variants, "sgmv": sgmv_variants, "dora_norms": dora_norms_variants}


def _dedupe(variants: list[Variant]) -> list[Variant]:
    seen, out = set(), []
    for v in variants:
        key = (v.kernel, v.dtype, v.target, json.dumps(v.consts, sort_keys=True), v.num_warps, v.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def variants(dtypes=DTYPES, targets=tuple(TARGETS), families=tuple(FAMILIES)) -> list[Variant]:
    return [v for f in families for t in targets for d in dtypes for v in FAMILIES[f](d, t)]


# -- compiling and reading ptxas -----------------------------------------------------------------

def _ptxas() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else "ptxas"


def _occupancy(regs: int, smem: int, warps: int, t: dict) -> int:
    """Resident blocks per SM: registers (allocated per warp in 256-register units), shared memory
    (plus 1 KB the driver reserves per block), warps and the block limit."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = t["regs_sm"] // (per_warp * warps)
    by_smem = t["smem_sm"] // (smem + 1024) if smem else t["blocks_sm"]
    return max(0, min(by_regs, by_smem, t["warps_sm"] // warps, t["blocks_sm"]))


def compile_variant(v: Variant) -> dict:
    """Compile one variant and read what ptxas reports; a dict (see `row`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = TARGETS[v.target]
    rec = dict(kernel=v.kernel, dtype=v.dtype, target=v.target, config=v.label, choice=v.choice, gemm=v.gemm,
               block_m=v.tile_m, pruned=v.pruned, consts=v.consts, num_warps=v.num_warps,
               num_stages=v.num_stages)
    if v.pruned:
        return rec
    start = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=v.fn, signature={**v.sig}, constexprs=v.consts, attrs=v.attrs),
                           target=GPUTarget("cuda", t["cap"], 32),
                           options={"num_warps": v.num_warps, "num_stages": v.num_stages, **v.options})
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a finding, recorded
        rec.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        return rec
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([_ptxas(), f"-arch={v.target}", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True, timeout=300)
    finally:
        os.unlink(f.name)
    info = res.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else 0  # noqa: E731
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    mma = len(re.findall(r"\bmma\.sync", ptx))
    regs = num(r"Used (\d+) registers")
    rec.update(registers=regs, spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
               stack=num(r"(\d+) bytes stack frame"), shared=k.metadata.shared,
               mma="wgmma" if wgmma else "mma.sync" if mma else "none", mma_count=wgmma or mma,
               blocks_per_sm=_occupancy(regs, k.metadata.shared, v.num_warps, t),
               compile_s=round(time.perf_counter() - start, 2))
    if res.returncode != 0:
        rec["error"] = f"ptxas: {info.strip().splitlines()[-1][:300] if info.strip() else res.returncode}"
    if DRIVER and _device_cap() == t["cap"]:
        # The driver's own view: load the cubin (no launch) and read the function's attributes.
        try:
            k._init_handles()
            rec.update(driver_registers=k.n_regs, driver_spills=k.n_spills)
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            rec["driver_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rec


DRIVER = False  # --driver: also load each sm_90a cubin on the GPU present and record its counts


def _device_cap() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def run(vs: list[Variant], jobs: int = 2, progress=None) -> list[dict]:
    """Compile the variants (ptxas runs as a subprocess, Triton's passes release the GIL in part:
    two threads keep two cores busy)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        out = []
        for rec in pool.map(compile_variant, vs):
            out.append(rec)
            if progress:
                progress(rec)
    return out


# -- findings ------------------------------------------------------------------------------------

def problems(records: list[dict], fp32_spill_bound: int = FP32_SPILL_BOUND) -> list[str]:
    """What the tests forbid: a choosable variant that fails to compile, spills (16-bit; fp32 beyond
    the bound), exceeds the target's shared memory, or is a GEMM with BLOCK_M >= 64 that does not
    use wgmma on sm_90a."""
    out = []
    for r in records:
        if r["pruned"]:
            continue
        name = f"{r['kernel']} {r['dtype']} {r['target']} {r['config']}"
        if "error" in r:
            out.append(f"{name}: {r['error']}")
            continue
        bound = fp32_spill_bound if r["dtype"] == "fp32" else 0
        if r["spill_stores"] > bound or (r["dtype"] != "fp32" and r["spill_loads"]):
            out.append(f"{name}: {r['spill_stores']} bytes of spill stores, {r['spill_loads']} of spill loads "
                       f"({r['registers']} registers)")
        if r["shared"] > TARGETS[r["target"]]["smem_block"]:
            out.append(f"{name}: {r['shared']} bytes of shared memory > {TARGETS[r['target']]['smem_block']}")
        if (r["target"] == "sm_90a" and r["gemm"] and (r["block_m"] or 0) >= 64 and r["dtype"] != "fp32"
                and r["mma"] != "wgmma"):
            out.append(f"{name}: a GEMM with a {r['block_m']}-row output tile without wgmma ({r['mma']})")
    return out


# -- the roofline --------------------------------------------------------------------------------

LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}


def roofline(rank: int = 16, itemsize: int = 2) -> list[dict]:
    """Each op at Llama-3-8B shapes (training: 8192 tokens; decoding: 1 and 16): FLOPs and minimum
    bytes (each operand read once, each output written once) against the H200's ceilings."""
    rows = []
    for layer, (k, n) in LLAMA3_8B.items():
        for m in (8192, 16, 1):
            r = rank
            ops = {
                "lora_fwd": (2 * m * n * k + 2 * m * n * r, (m * k + n * k + n * r + m * n) * itemsize + 4 * m * r),
                "lora_dx": (2 * m * n * k + 2 * m * k * r, (m * n + n * k + r * k + m * k) * itemsize + 4 * m * r),
                "nf4_lora_fwd": (2 * m * n * k + 2 * m * r * (n + k),
                                 (m * k + m * n + r * (n + k)) * itemsize + n * k // 2 + n * k // 64),
                "nf4_dequant": (0, n * k // 2 + n * k // 64 + n * k * itemsize),
            }
            for op, (fl, by) in ops.items():
                if op == "nf4_dequant" and m != 8192:
                    continue
                t_c, t_m = fl / H200_FLOPS, by / H200_BYTES
                rows.append(dict(op=op, layer=layer, M=m, N=n, K=k, flops=fl, bytes=by,
                                 intensity=round(fl / by, 1), floor_us=round(max(t_c, t_m) * 1e6, 2),
                                 bound="compute" if t_c > t_m else "memory"))
    return rows


# -- output --------------------------------------------------------------------------------------

def table(records: list[dict]) -> str:
    head = "| kernel | dtype | target | config | choice | regs | spill st/ld | smem | mma | blocks/SM |"
    lines = [head, "|" + "---|" * 10]
    for r in records:
        if r["pruned"]:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['target']} | {r['config']} | {r['choice']} | "
                         f"pruned: {r['pruned']} | | | | |")
        elif "error" in r:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['target']} | {r['config']} | {r['choice']} | "
                         f"error: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['target']} | {r['config']} | {r['choice']} | "
                         f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} | "
                         f"{r['mma']} x{r['mma_count']} | {r['blocks_per_sm']} |")
    return "\n".join(lines)


def roofline_table(rows: list[dict]) -> str:
    lines = ["| op | layer | M | N | K | GFLOP | MB | FLOP/B | floor (us) | bound |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['op']} | {r['layer']} | {r['M']} | {r['N']} | {r['K']} | {r['flops'] / 1e9:.3f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['intensity']} | {r['floor_us']} | {r['bound']} |")
    return "\n".join(lines)


REPORT_BEGIN = "<!-- bench.static: begin -->"
REPORT_END = "<!-- bench.static: end -->"


def write_report(path: str, records: list[dict], command: str) -> None:
    """Replace the static section of the report (or append it), keeping the rest of the file."""
    bad = problems(records)
    compiled = [r for r in records if not r["pruned"] and "error" not in r]
    spilling = [r for r in compiled if r["spill_stores"]]
    body = "\n".join([
        REPORT_BEGIN,
        "## Static analysis: what sm_90a and sm_80 will run (no GPU needed)",
        "",
        f"`{command}` on {datetime.date.today().isoformat()}: {len(records)} variants "
        f"({len(compiled)} compiled, {sum(1 for r in records if r['pruned'])} pruned by their launchers), "
        f"{len(spilling)} with spills, {len(bad)} findings the tests forbid.",
        "Registers and spills from ptxas -v, shared memory from Triton, occupancy from the CUDA tables.",
        "",
        *(["Findings:", *[f"- {b}" for b in bad], ""] if bad else []),
        table(records),
        "",
        "### Roofline at Llama-3-8B shapes (H200: 790 TFLOP/s bf16, 4.3 TB/s, measured)",
        "",
        roofline_table(roofline()),
        REPORT_END,
    ])
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark report\n"
    if REPORT_BEGIN in text and REPORT_END in text:
        text = text[:text.index(REPORT_BEGIN)] + body + text[text.index(REPORT_END) + len(REPORT_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench.static compiles real kernels: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the records as JSON lines here ('-': stdout)")
    parser.add_argument("--out", default=None, help="folder for static.json (default bench/results/<date>-static)")
    parser.add_argument("--report", default=None, help="rewrite the static section of this markdown file")
    parser.add_argument("--driver", action="store_true",
                        help="on a GPU: also load each cubin of its architecture and record the driver's register "
                             "and spill counts (driver_registers, driver_spills)")
    args = parser.parse_args(argv)
    global DRIVER
    DRIVER = args.driver
    vs = variants(args.dtypes.split(","), args.targets.split(","), args.families.split(","))
    stream = sys.stdout if args.json == "-" else None

    def progress(rec):
        if stream:
            print(json.dumps(rec, default=str), file=stream, flush=True)

    records = run(vs, args.jobs, progress)
    if args.json and args.json != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
    if not stream:
        print(table(records))
        print()
        print(roofline_table(roofline()))
        out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{datetime.date.today()}-static")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "static.json"), "w") as f:
            json.dump({"records": records, "roofline": roofline(), "targets": TARGETS}, f, indent=1, default=str)
        for b in problems(records):
            print("FINDING:", b)
    if args.report:
        write_report(args.report, records, "python -m bench.static " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
