"""Mixed-adapter batches: one LoRA linear layer, rows spread over 1, 4 or 16 adapters.

Impls, all on the same layer, batch and adapters (ranks cycling 8, 16, 32, 64; Llama-3-8B shapes):
- single_adapter: the same batch with one adapter for every row, the normal LoRALinear path
  (BASELINE; on the H200 lowrank_mixed should stay within 1.2x of it at 16 adapters);
- lowrank_mixed: `with lowrank.adapter_ids(model, ids)` -> lowrank::sgmv (Triton SGMV kernels
  on CUDA, the gather/scatter reference on the CPU);
- peft_mixed: peft's `adapter_names=` mixed-batch forward (a Python loop over adapters with
  gather / index-add; lowrank_mixed should be >= 5x faster);
- one_at_a_time: each adapter's rows as their own batch, one forward per adapter;
- lowrank_batch_setup: entering `adapter_ids` and building the segment metadata, which a model
  pays once per batch for all its layers (lowrank_mixed is the per-layer cost after it).
Rows are assigned round-robin (row b -> adapter b mod n). On a CPU the impls take turns over a
few rounds and keep their best, because the development machine is shared.

    python -m bench.run --only sgmv --quick            # CPU: fp32, 256 tokens, q_proj shape
"""
from __future__ import annotations

import threading
import warnings

import torch
import torch.nn as nn

from .harness import Record, bench, derived, device_name, versions

BASELINE = "single_adapter"

# Llama-3-8B linear layers (in_features, out_features).
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
RANK_CYCLE = (8, 16, 32, 64)


class _One(nn.Module):
    def __init__(self, k, n, dtype, device):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False, dtype=dtype, device=device)


def _ranks(n_adapters):
    return [RANK_CYCLE[i % len(RANK_CYCLE)] for i in range(n_adapters)]


def _lowrank_model(k, n, ranks, dtype, device):
    import lowrank

    model = _One(k, n, dtype, device)
    for i, r in enumerate(ranks):
        lowrank.add_adapter(model, f"a{i}", rank=r, targets=["proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval()


def _peft_layer(k, n, ranks, dtype, device):
    import peft

    model = _One(k, n, dtype, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=ranks[0], lora_alpha=2 * ranks[0], target_modules=["proj"]),
                                 adapter_name="a0")
        for i, r in enumerate(ranks[1:], start=1):
            pm.add_adapter(f"a{i}", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    return pm.base_model.model.proj.to(device=device, dtype=dtype).eval()


def _measure(fns: dict, rounds: int, dev, **reps) -> dict:
    """Median seconds of each callable; with rounds > 1 the impls take turns and each keeps its best
    round, so that load from other processes on a shared CPU hits all of them alike."""
    best = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = bench(fn, [()], device=dev, **reps)
            best[name] = min(t, best.get(name, float("inf")))
    return best


def run(quick: bool, device: str) -> list[Record]:
    import lowrank
    from lowrank.backend import backend_for
    from lowrank.lora_linear import _tokens_and_meta

    dev = torch.device(device)
    cpu = dev.type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16  # bf16 GEMMs on a CPU measure its emulation, not this op
    if cpu:
        shapes = {"q_proj": SHAPES["q_proj"]}
        rows, seq = 8, 32
        rounds, reps = (3 if quick else 6), dict(warmup=1, repeat=5, max_seconds=10.0)
    else:
        shapes = {"q_proj": SHAPES["q_proj"]} if quick else SHAPES
        rows, seq = 16, 256
        rounds, reps = 1, dict(warmup=5, repeat=30)
    m = rows * seq
    records = []
    meta = {"device": device_name(dev), "versions": versions()}
    for shape_name, (k, n) in shapes.items():
        x = torch.randn(rows, seq, k, dtype=dtype, device=dev)
        for n_ad in (1, 4, 16):
            ranks = _ranks(n_ad)
            names = [f"a{b % n_ad}" for b in range(rows)]
            shape = {"layer": shape_name, "M": m, "K": k, "N": n, "rows": rows, "n_adapters": n_ad, "ranks": ranks}
            r_tok = sum(ranks[b % n_ad] for b in range(rows)) / rows  # mean rank per token
            flops = 2 * m * k * n + 2 * m * r_tok * (k + n)
            byts = x.element_size() * (m * k + k * n + m * n + sum(r * (k + n) for r in ranks))

            model = _lowrank_model(k, n, ranks, dtype, dev)
            layer = model.proj
            peft_layer = _peft_layer(k, n, ranks, dtype, dev)
            with lowrank.adapter_ids(model, names):
                ids = layer._adapter_ids  # this batch's ids; its segment metadata is cached on it
            groups = [(f"a{i}", x[[b for b in range(rows) if b % n_ad == i]]) for i in range(n_ad)]

            def single():
                # Switch only when one_at_a_time left another adapter active (in the warm-up): on a
                # GPU set_adapter is a fill_ launch per layer, which would flatter the ratio.
                if layer.active_adapter != "a0":
                    lowrank.set_adapter(model, "a0")
                layer(x)

            def mixed():
                # What each layer of a model pays inside `with lowrank.adapter_ids(...)`: the ids and
                # their metadata are built once a batch (lowrank_batch_setup) and shared by all layers.
                layer._adapter_ids, layer._adapter_ids_thread = ids, threading.get_ident()
                layer(x)
                layer._adapter_ids, layer._adapter_ids_thread = None, None

            def setup():
                with lowrank.adapter_ids(model, names):
                    _tokens_and_meta(layer._adapter_ids, m, n_ad, x)

            def one_at_a_time():
                for name, xs in groups:
                    lowrank.set_adapter(model, name)
                    layer(xs)

            fns = {"single_adapter": single, "lowrank_mixed": mixed, "one_at_a_time": one_at_a_time,
                   "peft_mixed": lambda: peft_layer(x, adapter_names=names), "lowrank_batch_setup": setup}
            with torch.no_grad():
                times = _measure(fns, rounds, dev, **reps)
            for impl, t in times.items():
                extra = {"backend": backend_for(x)} if impl.startswith("lowrank") else {}
                if impl == "single_adapter":
                    extra["note"] = "every row on adapter a0 (rank 8)"
                if impl == "lowrank_batch_setup":
                    extra["note"] = "once per batch for the whole model, not per layer"
                d = {} if impl == "lowrank_batch_setup" else derived(t, flops, byts)
                records.append(Record("sgmv", shape, str(dtype).replace("torch.", ""), impl, t,
                                      d, meta["device"], meta["versions"], extra))
            del model, layer, peft_layer, groups, ids
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return records
