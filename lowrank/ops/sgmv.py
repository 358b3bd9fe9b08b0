"""Mixed-adapter LoRA: `sgmv(x, out, ids, As, Bs, scalings)`, differentiable, with its references.

    y[m] = out[m] + s_i * x[m] @ A_i.T @ B_i.T      where i = ids[m]; y[m] = out[m] when ids[m] = -1

x: (M, K); out: (M, N) (the base layer's output); ids: (M,) integer adapter index per token;
As[i]: (r_i, K), Bs[i]: (N, r_i), ranks free to differ; scalings[i]: float.

It is a `torch.library.custom_op` (`lowrank::sgmv`, backward `lowrank::sgmv_backward`), so
torch.compile treats it as one opaque node: the ids are data, never a guard, which is how
switching the active adapter avoids recompiles (see `lowrank.adapters`). Gradients reach every
A_i / B_i; an adapter that no token used gets an exact zero gradient.

Two implementations behind one schema, chosen by `lowrank.backend.backend_for(x)`:
- reference (CPU): gather each adapter's tokens, LoRA in fp32, scatter back (a Python loop over
  adapters with a host sync per adapter, fine on the CPU);
- triton (CUDA, or LOWRANK_BACKEND=triton under the interpreter): `lowrank.kernels.sgmv`,
  segmented shrink / expand / weight-gradient kernels, metadata built on the device.
`LoRALinear`'s mixed-batch forward (`lowrank.lora_linear`) is what calls it.

Level 2: imports torch and levels 0-1 (the kernels only on the Triton path: Triton is optional).
"""
from __future__ import annotations

import torch

from lowrank.backend import backend_for


def _kernels():
    """`lowrank.kernels.sgmv`, imported on the Triton path only (Triton is optional)."""
    from lowrank.kernels import sgmv

    return sgmv


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


def sgmv(x, out, ids, As, Bs, scalings, meta: list | None = None):
    """Differentiable mixed-adapter LoRA (see the module docstring); returns a new (M, N) tensor.

    meta: optional `segment_metadata(ids, ...)` tensors (see `metadata_for`) built once and shared
    by every layer of a model that sees the same ids; the Triton path builds them when absent.
    The Triton path reads every A_i / B_i in place (no packed copy)."""
    check_sgmv_args(x, out, ids, As, Bs, scalings)
    return torch.ops.lowrank.sgmv(x, out, ids.long(), list(As), list(Bs), [float(s) for s in scalings],
                                  list(meta or []))


def _on_kernels(x: torch.Tensor) -> bool:
    """The Triton kernels take x: the Triton backend, and not float64 (the kernels' tl.dot has no
    float64 accumulator; float64 runs the reference path, as ops.lora_linear does)."""
    return backend_for(x) == "triton" and x.dtype != torch.float64


# -- the custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("lowrank::sgmv", mutates_args=())
def _sgmv_op(x: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, As: list[torch.Tensor],
             Bs: list[torch.Tensor], scalings: list[float], meta: list[torch.Tensor]) -> torch.Tensor:
    if _on_kernels(x):
        return _triton_forward(x, out, ids, As, Bs, scalings, meta)
    return reference_forward(x, out, ids, As, Bs, scalings)


@_sgmv_op.register_fake
def _(x, out, ids, As, Bs, scalings, meta):
    return torch.empty_like(out)


@torch.library.custom_op("lowrank::sgmv_backward", mutates_args=())
def _sgmv_backward_op(dy: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, As: list[torch.Tensor],
                      Bs: list[torch.Tensor], scalings: list[float], meta: list[torch.Tensor]) -> list[torch.Tensor]:
    if _on_kernels(x):
        dx, das, dbs = _triton_backward(dy, x, ids, As, Bs, scalings, meta)
    else:
        dx, das, dbs = reference_backward(dy, x, ids, As, Bs, scalings)
    return [dx, *das, *dbs]


@_sgmv_backward_op.register_fake
def _(dy, x, ids, As, Bs, scalings, meta):
    return [torch.empty_like(x), *(torch.empty_like(a) for a in As), *(torch.empty_like(b) for b in Bs)]


def _setup_context(ctx, inputs, output):
    x, out, ids, As, Bs, scalings, meta = inputs
    ctx.n = len(As)
    ctx.n_meta = len(meta)
    ctx.scalings = scalings
    ctx.save_for_backward(x, ids, *As, *Bs, *meta)


def _backward(ctx, dy):
    x, ids, *rest = ctx.saved_tensors
    As, Bs, meta = rest[:ctx.n], rest[ctx.n:2 * ctx.n], rest[2 * ctx.n:]
    grads = torch.ops.lowrank.sgmv_backward(dy.contiguous(), x, ids, As, Bs, ctx.scalings, meta)
    dx, das, dbs = grads[0], grads[1:1 + ctx.n], grads[1 + ctx.n:]
    return dx, dy, None, list(das), list(dbs), None, [None] * ctx.n_meta


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
    """Per-segment rank, row offset in the packed weight gradients, and scaling as device tensors (segment 0 = base model,
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


def _meta(ids, n_adapters, device, meta):
    k = _kernels()
    if meta:
        return k.metadata_from_list(meta)
    return k.segment_metadata(ids, n_adapters, k._blocks(device)["BLOCK_M"])


def metadata_for(ids: torch.Tensor, n_adapters: int) -> list[torch.Tensor]:
    """The Triton path's segment metadata for token ids (M,), as the list `sgmv(meta=...)` takes."""
    k = _kernels()
    meta = k.segment_metadata(ids.long(), n_adapters, k._blocks(ids.device)["BLOCK_M"])
    return [meta[key] for key in k.META_KEYS]


def _triton_forward(x, out, ids, As, Bs, scalings, meta=()):
    k = _kernels()
    tables = _tables(As, scalings, x.device)
    r_max = max(tables["ranks"])
    meta = _meta(ids, len(As), x.device, meta)
    t = torch.empty(x.shape[0], r_max, device=x.device, dtype=torch.float32)
    k.shrink(x, k.weight_table(As, x.device), t, meta, tables, r_max, scaled=False)
    y = torch.empty_like(out)
    bts = k.weight_table([b.t() for b in Bs], x.device)  # B_i.T: a view, read in place
    k.expand(t, bts, out, y, meta, tables, scaled=True)  # writes every row, base rows = out
    return y


def _triton_backward(dy, x, ids, As, Bs, scalings, meta=()):
    k = _kernels()
    tables = _tables(As, scalings, x.device)
    ranks = tables["ranks"]
    r_max = max(ranks)
    meta = _meta(ids, len(As), x.device, meta)
    a_tab, bt_tab = k.weight_table(As, x.device), k.weight_table([b.t() for b in Bs], x.device)
    m = x.shape[0]
    t = torch.empty(m, r_max, device=x.device, dtype=torch.float32)
    k.shrink(x, a_tab, t, meta, tables, r_max, scaled=False)  # recomputed: cheaper than saving (M, r)
    dt = torch.empty_like(t)
    k.shrink(dy, bt_tab, dt, meta, tables, r_max, scaled=True)  # dT = s * dY @ B
    dx = torch.empty_like(x)
    k.expand(dt, a_tab, None, dx, meta, tables, scaled=False)  # dX = dT @ A (0 on base rows)
    da_pk = torch.empty(sum(ranks), x.shape[1], device=x.device, dtype=x.dtype)
    k.wgrad(dt, x, da_pk, meta, tables, r_max, scaled=False)  # dA = dT^T X, packed rows
    dbt_pk = torch.empty(sum(ranks), dy.shape[1], device=x.device, dtype=x.dtype)
    k.wgrad(t, dy, dbt_pk, meta, tables, r_max, scaled=True)  # dB^T = s * T^T dY
    # Outputs of a custom op may not alias each other: one copy per adapter (r_i x (K + N), small).
    das = [d.clone() for d in torch.split(da_pk, list(ranks), 0)]
    dbs = [d.t().contiguous() for d in torch.split(dbt_pk, list(ranks), 0)]
    return dx, das, dbs
