"""QLoRA microbenchmarks: the fused NF4 LoRA matmul (lowrank/kernels/nf4_lora_matmul.py) through
`lowrank.ops.nf4_lora_linear`.

    python -m bench.run --only nf4_lora_matmul [--quick]
    python -m bench.bench_nf4_lora_matmul      # the kernel's register / spill report for sm_90 (no GPU)

CUDA: fused QLoRA forward+backward vs peft + bitsandbytes Linear4bit + LoRA and vs dense bf16 LoRA
(`ops.lora_linear`) at the same shapes, autotuned and with the fixed tiles; M = 1 forward vs
bitsandbytes' 4-bit inference path (matmul_4bit -> gemv). CPU (fp32 compute): the native tiled
decode + GEMM against peft + bitsandbytes, our dense LoRA and the frozen dense layer (forward +
input gradient: the floor), and the native fused M = 1 pass at 4096^2 against `matmul_4bit`.

Bytes counted (minimum traffic): M = 1 forward = the 4-bit weight bytes (x and y are negligible).
"""
from __future__ import annotations

import torch

import lowrank
from lowrank.nf4_format import quantize_nf4

from .bench_nf4_dequant import bnb_modules, nf4_bytes, nf4_record
from .harness import Record, bench

BASELINE = "bitsandbytes"


def bench_qlora(quick: bool, device: str) -> list[Record]:
    """QLoRA forward+backward: fused Triton kernels on CUDA (bf16); on the CPU the reference path
    (dequantize + torch, fp32: bf16 GEMMs are slow there) at small shapes, for the record."""
    bnb, _ = bnb_modules()
    dev = torch.device(device)
    r = 16
    if dev.type == "cuda":
        dtype = torch.bfloat16
        shapes = [(4096, 4096, 4096)] if quick else [(4096, 4096, 4096), (4096, 4096, 11008),
                                                      (4096, 11008, 4096), (16384, 4096, 4096)]
    else:
        dtype = torch.float32
        shapes = [(256, 1024, 1024), (512, 2048, 2048)]
    out = []
    for m, k, n in shapes:
        shape = {"M": m, "K": k, "N": n, "r": r}
        flops = 2 * m * n * k * 2 + 2 * m * r * (k + n) * 3  # fwd + dX GEMMs, LoRA terms (no dW)
        w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
        nf4 = quantize_nf4(w)
        x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
        a = (torch.randn(r, k, device=dev) / k**0.5).to(dtype).requires_grad_()
        b = (torch.randn(n, r, device=dev) * 0.01).to(dtype).requires_grad_()
        dy = torch.randn(m, n, device=dev, dtype=dtype)

        def step_ours():
            lowrank.ops.nf4_lora_linear(x, nf4, a, b, 2.0).backward(dy)

        def step_bf16():
            lowrank.ops.lora_linear(x, w, a, b, 2.0).backward(dy)

        t = bench(step_ours, [()], device=dev)
        out.append(nf4_record("qlora_fwd_bwd", shape, dtype, "lowrank", t, dev, flops=flops))
        if dev.type == "cuda":  # the fixed heuristic tiles (`_config`) against what autotuning picked
            from lowrank.kernels import nf4_lora_matmul as K

            tuned, K.AUTOTUNE = K.AUTOTUNE, False
            try:
                t = bench(step_ours, [()], warmup=2, device=dev)
                out.append(nf4_record("qlora_fwd_bwd", shape, dtype, "lowrank-heuristic", t, dev, flops=flops))
            finally:
                K.AUTOTUNE = tuned
        t = bench(step_bf16, [()], device=dev)
        out.append(nf4_record("qlora_fwd_bwd", shape, dtype, "dense_lora", t, dev, flops=flops))
        if dev.type == "cpu":  # the floor: the frozen dense layer's forward and input gradient (two GEMMs)
            t = bench(lambda: torch.nn.functional.linear(x, w).backward(dy), [()], device=dev)
            out.append(nf4_record("qlora_fwd_bwd", shape, dtype, "frozen_dense", t, dev, flops=flops))
        if bnb is not None:
            try:
                from peft import LoraConfig, get_peft_model

                base = torch.nn.Sequential(bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype,
                                                             compress_statistics=True, quant_type="nf4"))
                base[0].weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=True,
                                                   quant_type="nf4")
                base = base.to(dev)
                pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
                for p in pm.parameters():
                    if p.requires_grad:
                        p.data = p.data.to(dtype)

                def step_peft():
                    pm(x).backward(dy)

                t = bench(step_peft, [()], device=dev)
                out.append(nf4_record("qlora_fwd_bwd", shape, dtype, "peft+bnb", t, dev, flops=flops))
            except Exception as exc:  # record why the baseline is missing rather than fail the run
                out.append(nf4_record("qlora_fwd_bwd", shape, dtype, "peft+bnb", float("nan"), dev, error=repr(exc)))
        out += bench_gemv(k, n, dtype, dev, bnb, w=w, nf4=nf4, a=a, b=b)
    if dev.type == "cpu":
        out += bench_gemv(4096, 4096, torch.float32, dev, bnb)
    return out


def bench_gemv(k: int, n: int, dtype, dev, bnb, w=None, nf4=None, a=None, b=None, r: int = 16) -> list[Record]:
    """M = 1 (decode), the QLoRA op with its adapter against bitsandbytes' 4-bit inference matmul
    (`matmul_4bit`) without one: the 4-bit weight is the traffic."""
    if w is None:
        w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
        nf4 = quantize_nf4(w)
        a = (torch.randn(r, k, device=dev) / k**0.5).to(dtype)
        b = (torch.randn(n, r, device=dev) * 0.01).to(dtype)
    x1 = torch.randn(1, k, device=dev, dtype=dtype)
    s1 = {"M": 1, "K": k, "N": n}
    out = []
    with torch.no_grad():
        t = bench(lambda: lowrank.ops.nf4_lora_linear(x1, nf4, a, b, 2.0), [()], device=dev)
        out.append(nf4_record("nf4_gemv", s1, dtype, "lowrank", t, dev, nbytes=nf4_bytes(n, k)))
        if bnb is not None:
            qw, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            t = bench(lambda: bnb.matmul_4bit(x1, qw.t(), quant_state=qs), [()], device=dev)
            out.append(nf4_record("nf4_gemv", s1, dtype, "bitsandbytes", t, dev, nbytes=nf4_bytes(n, k)))
    return out


def run(quick: bool, device: str) -> list[Record]:
    return bench_qlora(quick, device)


def ptxas_report() -> list[str]:
    """Registers, spills and shared memory of the fused kernel's GPU configs, compiled for sm_90
    with Triton's bundled ptxas: no GPU needed (run without TRITON_INTERPRET)."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowrank.kernels import nf4_lora_matmul as K

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    strides = ["stride_am", "stride_aq", "stride_lm", "stride_lr", "stride_rr", "stride_rp", "stride_om", "stride_op"]
    lines = []
    for m in (1, 64, 4096):
        cfg = K._config(m, False)
        split = 3 if m <= 16 else 1
        for transposed in (True, False):
            sig = {"a_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                   "l_ptr": "*bf16", "r_ptr": "*bf16", "bias_ptr": "*bf16",
                   "out_ptr": "*fp32" if split > 1 else "*bf16",
                   "M": "i32", "P": "i32", "Q": "i32", "K_W": "i32", "lora_scale": "fp32", "q_per_split": "i32", "m_bucket": "i32",
                   **{s: "i32" for s in strides}}
            ce = dict(W_TRANSPOSED=transposed, ALIGNED=True, BLOCKSIZE=64, HAS_LORA=True, R_PAD=16, HAS_BIAS=True,
                      IEEE=False, INTERPRETED=False, SPLIT_Q=split, **{k: v for k, v in cfg.items() if k.isupper()})
            sig.update({c: "constexpr" for c in ce})
            kern = triton.compile(ASTSource(K._nf4_lora_matmul_kernel, sig, ce), target=GPUTarget("cuda", 90, 32),
                                  options={k: v for k, v in cfg.items() if not k.isupper()})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(kern.asm["ptx"])
            res = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
            os.unlink(f.name)
            info = "; ".join(x.split(":", 1)[-1].strip() for x in res.stderr.splitlines()
                             if "registers" in x or "spill" in x)
            lines.append(f"M={m:<5} {'fwd' if transposed else 'dX '} {cfg} smem={kern.metadata.shared}: {info}")
    return lines


if __name__ == "__main__":
    print("\n".join(ptxas_report()))
