"""Mixed-adapter LoRA: `sgmv(x, out, ids, As, Bs, scalings)`, differentiable, with its references.

    y[m] = out[m] + s_i * x[m] @ A_i.T @ B_i.T      where i = ids[m]; y[m] = out[m] when ids[m] = -1

x: (M, K); out: (M, N) (the base layer's output); ids: (M,) integer adapter index per token;
As[i]: (r_i, K), Bs[i]: (N, r_i), ranks free to differ; scalings[i]: float.

It is a `torch.library.custom_op` (`lowrank::sgmv`, backward `lowrank::sgmv_backward`), so
torch.compile treats it as one opaque node: the ids are data, never a guard, which is how
switching the active adapter avoids recompiles (see `lowrank.adapters`). Gradients reach every
A_i / B_i; an adapter that no token used gets an exact zero gradient.

Two implementations behind one schema, chosen by `lowrank.ops.backend_for(x)`:
- reference (CPU): gather each adapter's tokens, LoRA in fp32, scatter back (a Python loop over
  adapters with a host sync per adapter, fine on the CPU);
- triton (CUDA, or LOWRANK_BACKEND=triton under the interpreter): `lowrank.kernels.sgmv`,
  segmented shrink / expand / weight-gradient kernels, metadata built on the device.
`sgmv_f64` / `sgmv_grads_f64` are float64 einsum oracles for tests.
"""
from __future__ import annotations

import torch

from . import ops


def check_sgmv_args(x, out, ids, As, Bs, scalings, where: str = "sgmv") -> None:
    if x.dim() != 2 or out.dim() != 2 or ids.dim() != 1:
        raise ValueError(f"{where}: x and out must be 2-D and ids 1-D, got shapes {tuple(x.shape)}, "
                         f"{tuple(out.shape)}, {tuple(ids.shape)}")
    m, k = x.shape
    n = out.shape[1]
    if out.shape[0] != m or ids.shape[0] != m:
        raise ValueError(f"{where}: x {tuple(x.shape)}, out {tuple(out.shape)} and ids {tuple(ids.shape)} must "
                         f"have the same number of rows")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: ids must be int32 or int64, got {ids.dtype}")
    if not (len(As) == len(Bs) == len(scalings)) or not As:
        raise ValueError(f"{where}: need as many A, B and scalings (>= 1), got {len(As)}, {len(Bs)}, {len(scalings)}")
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape[0] != n or b.shape[1] != a.shape[0]:
            raise ValueError(f"{where}: adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                             f"x {tuple(x.shape)} -> out {tuple(out.shape)} (need A (r, {k}), B ({n}, r))")
        if a.dtype != x.dtype or b.dtype != x.dtype:
            raise TypeError(f"{where}: adapter {i}: A {a.dtype} / B {b.dtype} differ from x {x.dtype}")
        if a.device != x.device or b.device != x.device:
            raise ValueError(f"{where}: adapter {i} is on {a.device}, x on {x.device}")
    if out.dtype != x.dtype or out.device != x.device or ids.device != x.device:
        raise ValueError(f"{where}: out ({out.dtype}, {out.device}) and ids ({ids.device}) must match x "
                         f"({x.dtype}, {x.device})")


def sgmv(x, out, ids, As, Bs, scalings, meta: list | None = None, packed: list | None = None):
    """Differentiable mixed-adapter LoRA (see the module docstring); returns a new (M, N) tensor.

    meta: optional `segment_metadata(ids, ...)` tensors (see `metadata_for`) built once and shared
    by every layer of a model that sees the same ids; the Triton path builds them when absent.
    packed: optional [A packed, B^T packed] of these very As / Bs (`pack_weights`), which the
    Triton path otherwise concatenates on every call; the caller keeps them current."""
    check_sgmv_args(x, out, ids, As, Bs, scalings)
    if packed:
        r, k, n = sum(a.shape[0] for a in As), x.shape[1], out.shape[1]
        if len(packed) != 2 or tuple(packed[0].shape) != (r, k) or tuple(packed[1].shape) != (r, n):
            raise ValueError(f"sgmv: packed weights must be [({r}, {k}), ({r}, {n})], got "
                             f"{[tuple(p.shape) for p in packed]}")
    return torch.ops.lowrank.sgmv(x, out, ids.long(), list(As), list(Bs), [float(s) for s in scalings],
                                  list(meta or []), list(packed or []))


# -- the custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("lowrank::sgmv", mutates_args=())
def _sgmv_op(x: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, As: list[torch.Tensor],
             Bs: list[torch.Tensor], scalings: list[float], meta: list[torch.Tensor],
             packed: list[torch.Tensor]) -> torch.Tensor:
    if ops.backend_for(x) == "triton":
        return _triton_forward(x, out, ids, As, Bs, scalings, meta, packed)
    return reference_forward(x, out, ids, As, Bs, scalings)


@_sgmv_op.register_fake
def _(x, out, ids, As, Bs, scalings, meta, packed):
    return torch.empty_like(out)


@torch.library.custom_op("lowrank::sgmv_backward", mutates_args=())
def _sgmv_backward_op(dy: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, As: list[torch.Tensor],
                      Bs: list[torch.Tensor], scalings: list[float], meta: list[torch.Tensor],
                      packed: list[torch.Tensor]) -> list[torch.Tensor]:
    if ops.backend_for(x) == "triton":
        dx, das, dbs = _triton_backward(dy, x, ids, As, Bs, scalings, meta, packed)
    else:
        dx, das, dbs = reference_backward(dy, x, ids, As, Bs, scalings)
    return [dx, *das, *dbs]


@_sgmv_backward_op.register_fake
def _(dy, x, ids, As, Bs, scalings, meta, packed):
    return [torch.empty_like(x), *(torch.empty_like(a) for a in As), *(torch.empty_like(b) for b in Bs)]


def _setup_context(ctx, inputs, output):
    x, out, ids, As, Bs, scalings, meta, packed = inputs
    ctx.n = len(As)
    ctx.n_meta = len(meta)
    ctx.n_packed = len(packed)
    ctx.scalings = scalings
    ctx.save_for_backward(x, ids, *As, *Bs, *meta, *packed)


def _backward(ctx, dy):
    x, ids, *rest = ctx.saved_tensors
    As, Bs = rest[:ctx.n], rest[ctx.n:2 * ctx.n]
    meta, packed = rest[2 * ctx.n:2 * ctx.n + ctx.n_meta], rest[2 * ctx.n + ctx.n_meta:]
    grads = torch.ops.lowrank.sgmv_backward(dy.contiguous(), x, ids, As, Bs, ctx.scalings, meta, packed)
    dx, das, dbs = grads[0], grads[1:1 + ctx.n], grads[1 + ctx.n:]
    return dx, dy, None, list(das), list(dbs), None, [None] * ctx.n_meta, [None] * ctx.n_packed


_sgmv_op.register_autograd(_backward, setup_context=_setup_context)


# -- reference implementation (the CPU path) -------------------------------------------------------
def reference_forward(x, out, ids, As, Bs, scalings):
    y = out.clone()
    for i, (a, b, s) in enumerate(zip(As, Bs, scalings)):
        idx = (ids == i).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        t = x.index_select(0, idx).float() @ a.float().t()  # (m_i, r_i) fp32
        y[idx] = (y.index_select(0, idx).float() + s * (t @ b.float().t())).to(y.dtype)
    return y


def reference_backward(dy, x, ids, As, Bs, scalings):
    dx = torch.zeros_like(x)
    das, dbs = [], []
    for i, (a, b, s) in enumerate(zip(As, Bs, scalings)):
        idx = (ids == i).nonzero().squeeze(1)
        if idx.numel() == 0:
            das.append(torch.zeros_like(a))
            dbs.append(torch.zeros_like(b))
            continue
        xs, gs = x.index_select(0, idx).float(), dy.index_select(0, idx).float()
        t = xs @ a.float().t()  # (m_i, r_i)
        dt = s * (gs @ b.float())  # (m_i, r_i)
        dx[idx] = (dt @ a.float()).to(dx.dtype)
        das.append((dt.t() @ xs).to(a.dtype))
        dbs.append((s * (gs.t() @ t)).to(b.dtype))
    return dx, das, dbs


# -- Triton implementation -------------------------------------------------------------------------
_TABLES: dict = {}


def _tables(As, scalings, device) -> dict:
    """Per-segment rank, packed row offset and scaling as device tensors (segment 0 = base model,
    rank 0). Cached by value so that a CUDA-graph capture (after one warm-up call) never copies
    from the host."""
    ranks = tuple(int(a.shape[0]) for a in As)
    key = (ranks, tuple(scalings), str(device))
    hit = _TABLES.get(key)
    if hit is None:
        roff = [0]
        for r in ranks[:-1]:
            roff.append(roff[-1] + r)
        hit = {"ranks": ranks,
               "rank": torch.tensor((0, *ranks), dtype=torch.int32, device=device),
               "roff": torch.tensor([0, *roff], dtype=torch.int32, device=device),
               "scale": torch.tensor([0.0, *scalings], dtype=torch.float32, device=device)}
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = hit
    return hit


def _pack(As, Bs):
    """A packed (sum r_i, K), B^T packed (sum r_i, N): one copy of the adapters' weights, no padding."""
    return torch.cat(list(As), 0), torch.cat([b.t() for b in Bs], 0)


def pack_weights(As, Bs) -> list[torch.Tensor]:
    """[A packed, B^T packed] for `sgmv(packed=...)`: detached copies (the op's own backward gives
    each A_i / B_i its gradient)."""
    with torch.no_grad():
        return list(_pack([a.detach() for a in As], [b.detach() for b in Bs]))


def _meta(ids, n_adapters, device, meta):
    from .kernels import sgmv as k

    if meta:
        return k.metadata_from_list(meta)
    return k.segment_metadata(ids, n_adapters, k._blocks(device)["BLOCK_M"])


def metadata_for(ids: torch.Tensor, n_adapters: int) -> list[torch.Tensor]:
    """The Triton path's segment metadata for token ids (M,), as the list `sgmv(meta=...)` takes."""
    from .kernels import sgmv as k

    meta = k.segment_metadata(ids.long(), n_adapters, k._blocks(ids.device)["BLOCK_M"])
    return [meta[key] for key in k.META_KEYS]


def _triton_forward(x, out, ids, As, Bs, scalings, meta=(), packed=()):
    from .kernels import sgmv as k

    tables = _tables(As, scalings, x.device)
    r_max = max(tables["ranks"])
    a_pk, bt_pk = packed if packed else _pack(As, Bs)
    meta = _meta(ids, len(As), x.device, meta)
    t = torch.empty(x.shape[0], r_max, device=x.device, dtype=torch.float32)
    k.shrink(x, a_pk, t, meta, tables, r_max, scaled=False)
    y = torch.empty_like(out)
    k.expand(t, bt_pk, out, y, meta, tables, scaled=True)  # writes every row, base rows = out
    return y


def _triton_backward(dy, x, ids, As, Bs, scalings, meta=(), packed=()):
    from .kernels import sgmv as k

    tables = _tables(As, scalings, x.device)
    ranks = tables["ranks"]
    r_max = max(ranks)
    a_pk, bt_pk = packed if packed else _pack(As, Bs)
    meta = _meta(ids, len(As), x.device, meta)
    m = x.shape[0]
    t = torch.empty(m, r_max, device=x.device, dtype=torch.float32)
    k.shrink(x, a_pk, t, meta, tables, r_max, scaled=False)  # recomputed: cheaper than saving (M, r)
    dt = torch.empty_like(t)
    k.shrink(dy, bt_pk, dt, meta, tables, r_max, scaled=True)  # dT = s * dY @ B
    dx = torch.empty_like(x)
    k.expand(dt, a_pk, None, dx, meta, tables, scaled=False)  # dX = dT @ A (0 on base rows)
    da_pk = torch.empty_like(a_pk)
    k.wgrad(dt, x, da_pk, meta, tables, r_max, scaled=False)  # dA = dT^T X
    dbt_pk = torch.empty_like(bt_pk)
    k.wgrad(t, dy, dbt_pk, meta, tables, r_max, scaled=True)  # dB^T = s * T^T dY
    # Outputs of a custom op may not alias each other: one copy per adapter (r_i x (K + N), small).
    das = [d.clone() for d in torch.split(da_pk, list(ranks), 0)]
    dbs = [d.t().contiguous() for d in torch.split(dbt_pk, list(ranks), 0)]
    return dx, das, dbs


# -- float64 oracles for tests ----------------------------------------------------------------------
def sgmv_f64(x, out, ids, As, Bs, scalings):
    """float64 y of `sgmv`, with a dense one-hot mask instead of any gather."""
    y = out.double().clone()
    for i, (a, b, s) in enumerate(zip(As, Bs, scalings)):
        sel = (ids == i).double()[:, None]
        y = y + sel * (s * torch.einsum("mk,rk,nr->mn", x.double(), a.double(), b.double()))
    return y


def sgmv_grads_f64(dy, x, ids, As, Bs, scalings):
    """float64 (dx, [dA_i], [dB_i]) of `sgmv` for upstream gradient dy (dout = dy is implied)."""
    dy64, x64 = dy.double(), x.double()
    dx = torch.zeros_like(x64)
    das, dbs = [], []
    for i, (a, b, s) in enumerate(zip(As, Bs, scalings)):
        sel = (ids == i).double()[:, None]
        g = dy64 * sel
        t = torch.einsum("mk,rk->mr", x64, a.double())
        dt = s * torch.einsum("mn,nr->mr", g, b.double())
        dx = dx + torch.einsum("mr,rk->mk", dt, a.double())
        das.append(torch.einsum("mr,mk->rk", dt, x64))
        dbs.append(s * torch.einsum("mn,mr->nr", g, t))
    return dx, das, dbs


# -- the LoRALinear branch ---------------------------------------------------------------------------
def takes(layer) -> bool:
    """Whether LoRALinear.forward goes through `layer_forward`: inside `lowrank.adapter_ids`, or
    under torch.compile for an unmerged layer with two or more adapters (switching among them then
    changes a buffer, not a guarded attribute)."""
    if layer._adapter_ids is not None:
        return True
    return len(layer.configs) > 1 and not getattr(layer, "merged", False) and torch.compiler.is_compiling()


def layer_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward for mixed batches (`layer._adapter_ids` set by `lowrank.adapter_ids`) and
    for the active adapter under torch.compile (`layer._active_index`, a buffer, so switching
    adapters changes data, not a guard). Every adapter of the layer goes into one `lowrank::sgmv`."""
    names = list(layer.configs)
    out = layer.base_layer(x)
    if not names:
        return out
    if getattr(layer, "merged", False):
        raise ValueError("a merged LoRALinear cannot run mixed-adapter batches; unmerge it first")
    k, n = layer.in_features, layer.out_features
    x2 = x.reshape(-1, k)  # (M, K)
    m = x2.shape[0]
    ids = layer._adapter_ids
    if ids is None:
        ids_tok, meta = layer._active_index.expand(m), []
    else:
        rows = 1 if x.dim() == 1 else x.shape[0]
        # A 2-D input may be a (batch * seq, K) flattening of the rows, in row-major order.
        flat = x.dim() == 2 and ids.shape[0] > 0 and rows % ids.shape[0] == 0
        if ids.shape[0] != rows and not flat:
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries but a LoRALinear({k} -> {n}) input has "
                             f"{rows} rows (shape {tuple(x.shape)}): give one adapter per row (sequence)")
        ids_tok, meta = _tokens_and_meta(ids, m, len(names), x)
    cfgs = [layer.configs[a] for a in names]
    h = x2
    if layer.training and any(c.dropout > 0.0 for c in cfgs):
        # Each token gets its own adapter's dropout probability (0 for base tokens).
        p = torch.tensor([0.0] + [c.dropout for c in cfgs], device=x.device, dtype=torch.float32)
        valid = (ids_tok >= 0) & (ids_tok < len(cfgs))
        p_tok = p[torch.where(valid, ids_tok + 1, 0)][:, None]  # (M, 1)
        keep = torch.rand(x2.shape, device=x.device) >= p_tok
        h = x2 * (keep / (1.0 - p_tok)).to(x2.dtype)
    As, Bs = [layer.lora_A[a] for a in names], [layer.lora_B[a] for a in names]
    # Not while a CUDA graph is captured: the graph must pack from the live parameters on each
    # replay, or weights updated in place (load_adapter, an optimizer) would never reach it.
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    packed = _layer_packed(layer, As, Bs) if ops.backend_for(x) == "triton" and not capturing else None
    # The adapters' dtype can differ from the activations': an NF4 base keeps fp32 adapters in a
    # bf16 model, and autocast makes the base output bf16 beside fp32 x. As peft does, the LoRA
    # part runs in the adapters' dtype and the sum comes back in the base output's dtype.
    dt = As[0].dtype
    y = sgmv(h.to(dt), out.reshape(-1, n).to(dt), ids_tok, As, Bs, [c.scaling for c in cfgs], meta, packed)
    return y.view(out.shape).to(out.dtype)


def _layer_packed(layer, As, Bs):
    """The layer's adapters packed for the kernels, cached on the layer.

    # Note: why cache, and when the cache is stale
    Packing is two concatenations of every adapter of the layer: at 16 adapters of ranks 8-64 on a
    4096 x 4096 layer that is ~16 MB of bf16 copied per layer per call, plus its launches, which
    alone would break the 1.2x-of-one-adapter goal. The cache holds the parameters themselves
    (identity, not id(): a freed tensor's id can be reused), their `_version` (bumped by every
    in-place update: optimizer steps, load_adapter's copy_, merge) and data_ptr (`p.data = t`).
    Adding or deleting an adapter changes the list and misses. Cost: one extra copy of the
    layer's adapter weights. Not used while torch.compile traces (inductor fuses the cat)."""
    if torch.compiler.is_compiling() or any(t.is_inference() for t in (*As, *Bs)):
        return None  # inference tensors have no version counter to key on
    key = tuple((t, t._version, t.data_ptr()) for t in (*As, *Bs))
    hit = layer.__dict__.get("_sgmv_packed")
    if hit is not None and len(hit[0]) == len(key) and all(
            a[0] is b[0] and a[1:] == b[1:] for a, b in zip(hit[0], key)):
        return hit[1]
    packed = pack_weights(As, Bs)
    layer.__dict__["_sgmv_packed"] = (key, packed)
    return packed


def _tokens_and_meta(ids, m: int, n_adapters: int, x):
    """Per-token ids and (Triton path) segment metadata for a mixed batch. `lowrank.adapter_ids`
    gives all layers with the same adapter list one ids tensor: the first layer of a forward
    builds both and caches them on that tensor, the others reuse them (one sort a batch, not one
    a layer). The key holds the tensor's version (ids changed in place miss) and whether a CUDA
    graph is being captured (a capture records its own metadata build, so replays with new ids
    rebuild it). Not cached while torch.compile traces."""
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (m, n_adapters, str(x.device), ids._version, capturing)
    cache = None if torch.compiler.is_compiling() else ids.__dict__.setdefault("_lowrank_meta", {})
    if cache is not None and key in cache:
        return cache[key]
    ids_tok = ids if ids.shape[0] == m else ids.repeat_interleave(m // ids.shape[0], output_size=m)
    meta = metadata_for(ids_tok, n_adapters) if ops.backend_for(x) == "triton" else []
    if cache is not None:
        cache[key] = (ids_tok, meta)
    return ids_tok, meta
