"""Every float64 oracle of the test suite, written independently of the code under test.

- Ops: `lora_linear_f64`, `lora_linear_grads_f64`, `sgmv_f64`, `sgmv_grads_f64` (einsum in
  float64, an explicit dropout multiplier).
- Dropout masks: `lora_dropout_mask` recomputes the keep decision of the LoRA kernels from
  Philox4x32-10 itself (numpy, no Triton), `nf4_dropout_mask` the QLoRA op's from torch's
  generator; both keep an element with probability 1 - p.
- Rounding: `round_once(x64, dtype)` rounds float64 to float32 / float16 / bfloat16 once, to
  nearest even, with numpy (torch's float64 -> float16 cast goes through float32: two roundings).
- Models: `merged_f64(model, adapter)`, a float64 copy of a patched model with one adapter merged
  into plain layers (NF4 bases decoded first).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

import lowrank


# -- the LoRA linear op ---------------------------------------------------------------------------
def lora_linear_f64(x, weight, lora_A, lora_B, scaling: float, bias=None, mask=None):
    """y = x W^T + b + s (x * mask) A^T B^T in float64. mask: the dropout multiplier or None."""
    x64, w64 = x.double(), weight.double()
    a64, b64 = lora_A.double(), lora_B.double()
    y = torch.einsum("...k,nk->...n", x64, w64)
    if bias is not None:
        y = y + bias.double()
    h = x64 if mask is None else x64 * mask.double()
    t = torch.einsum("...k,rk->...r", h, a64)
    return y + scaling * torch.einsum("...r,nr->...n", t, b64)


def lora_linear_grads_f64(x, weight, lora_A, lora_B, scaling: float, dy, mask=None):
    """float64 (dX, dA, dB) of `lora_linear_f64` for upstream gradient dy (W and bias frozen)."""
    x64, w64, a64, b64, dy64 = (t.double() for t in (x, weight, lora_A, lora_B, dy))
    m = None if mask is None else mask.double()
    h = x64 if m is None else x64 * m
    t = torch.einsum("...k,rk->...r", h, a64)  # (..., r)
    dt = scaling * torch.einsum("...n,nr->...r", dy64, b64)  # (..., r)
    db = scaling * torch.einsum("...n,...r->nr", dy64, t)
    da = torch.einsum("...r,...k->rk", dt, h)
    dh = torch.einsum("...r,rk->...k", dt, a64)
    dx = torch.einsum("...n,nk->...k", dy64, w64) + (dh if m is None else dh * m)
    return dx, da, db


# -- the mixed-adapter op -------------------------------------------------------------------------
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


# -- dropout masks --------------------------------------------------------------------------------
_PHILOX_ROUND_A, _PHILOX_ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_KEY_A, _PHILOX_KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_M32 = np.uint64(0xFFFFFFFF)


def philox_uniform(seed: int, offsets: np.ndarray) -> np.ndarray:
    """Triton's `tl.rand(seed, offsets)` for int64 offsets, from its definition: Philox4x32-10 with
    key (seed low, seed high 32 bits) on counter (offset low, offset high, 0, 0); the first output
    word as an int32, folded to [0, 2^31) and scaled by 4.6566127342e-10 in float32."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    off = offsets.astype(np.int64).view(np.uint64)
    c0, c1 = off & _M32, off >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    for _ in range(10):
        p0, p2 = _PHILOX_ROUND_A * c0, _PHILOX_ROUND_B * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = ((p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32)
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    x = c0.astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def lora_dropout_mask(seed: int, m: int, k: int, p: float) -> torch.Tensor:
    """The (m, k) float64 dropout multiplier of the LoRA kernels for `seed`: element (i, j) is kept
    (multiplier 1 / (1 - p)) when tl.rand(seed, i * k + j) >= p, else dropped (0)."""
    offsets = np.arange(m, dtype=np.int64)[:, None] * k + np.arange(k, dtype=np.int64)[None, :]
    keep = philox_uniform(seed, offsets) >= np.float32(p)
    return torch.from_numpy(keep.astype(np.float64) / (1.0 - p))


def nf4_dropout_mask(shape, dtype, p: float, device="cpu") -> torch.Tensor:
    """The float64 dropout multiplier the QLoRA op draws from torch's generator in its current
    state (call torch.manual_seed first, as before the op): Bernoulli(1 - p) keeps, exactly
    1 / (1 - p) where kept."""
    keep = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p)
    return keep.double() / (1.0 - p)


# -- rounding -------------------------------------------------------------------------------------
def round_once(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype with one rounding to nearest even (NaN stays NaN, overflow gives Inf)."""
    a = x64.detach().double().cpu().numpy()
    if dtype == torch.float32:
        return torch.from_numpy(a.astype(np.float32))
    if dtype == torch.float16:
        with np.errstate(over="ignore"):  # overflow to Inf is the right answer
            return torch.from_numpy(a.astype(np.float16))
    if dtype != torch.bfloat16:
        raise TypeError(f"round_once: no rounding to {dtype}")
    # bfloat16 keeps 8 significant bits: scale each value by its ulp (2^(e - 8) for a = m 2^e with
    # 0.5 <= |m| < 1; 2^-133 at least, the subnormal spacing), round half to even, scale back.
    # Every step but np.rint is exact.
    with np.errstate(invalid="ignore", over="ignore"):
        _, exp = np.frexp(a)
        e = np.maximum(exp - 8, -133)
        r = np.ldexp(np.rint(np.ldexp(a, -e)), e)
        r = np.where(np.abs(r) >= 2.0 ** 128, np.copysign(np.inf, a), r)  # past bf16's largest value
        r = np.where(np.isfinite(a), r, a)
    return torch.from_numpy(r).to(torch.bfloat16)  # exact: r is a bfloat16 value


# -- whole models ---------------------------------------------------------------------------------
def merged_f64(model: nn.Module, adapter="active") -> nn.Module:
    """A float64 copy of a lowrank-patched model where each layer's adapter (its active one, or
    `adapter`; None for the base model) is merged into a plain base layer: W + s * B @ A
    (transposed for Conv1D); an NF4 base becomes an nn.Linear holding its decoded weight."""
    ref = copy.deepcopy(model)
    for path, layer in list(lowrank.lora_layers(ref)):
        base = layer.base_layer
        if isinstance(base, lowrank.NF4Linear):
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=torch.float64)
            with torch.no_grad():
                dense.weight.copy_(base.nf4.dequantize().double())
                if base.bias is not None:
                    dense.bias.copy_(base.bias.double())
            base = dense
        else:
            base = base.double()
        name = layer.active_adapter if adapter == "active" else adapter
        if name is not None and name in layer.configs:
            with torch.no_grad():
                delta = layer.scaling(name) * layer.lora_B[name].double() @ layer.lora_A[name].double()
                base.weight += delta.t() if layer.fan_in_fan_out else delta
        parent, _, attr = path.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, attr, base)
    return ref.double()
