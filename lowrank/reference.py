"""Pure-torch references: the CPU path of every op and the oracle of every test.

Two kinds live here:
- `lora_linear` is the production reference path (CPU tensors, or no Triton): plain torch ops
  in the input dtype, differentiable through autograd, with no M x N temporary beyond the output
  (the LoRA term is accumulated into the base GEMM's output with `addmm_`).
- `*_f64` functions recompute the same maths in float64 with `einsum`, given an explicit dropout
  mask, for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(x, weight, lora_A, lora_B, scaling: float, bias=None, dropout: float = 0.0):
    """y = x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T.

    x: (..., K); weight: (N, K) (any strides); lora_A: (r, K); lora_B: (N, r); bias: (N,).
    Dropout (a fresh torch mask, p=dropout) applies to the LoRA branch only, as in peft.
    """
    out = F.linear(x, weight, bias)  # (..., N): the only M x N buffer
    if scaling == 0.0:
        return out
    h = F.dropout(x, dropout, training=True) if dropout > 0.0 else x
    t = F.linear(h, lora_A)  # (..., r)
    if not out.is_contiguous():
        out = out.contiguous()
    out2d = out.view(-1, out.shape[-1])  # (M, N), a view of out
    out2d.addmm_(t.reshape(-1, t.shape[-1]), lora_B.t(), alpha=scaling)
    return out


def lora_linear_f64(x, weight, lora_A, lora_B, scaling: float, bias=None, mask=None):
    """float64 einsum reference of `lora_linear`. mask: the dropout multiplier (0 or 1/(1-p)) or None."""
    x64, w64 = x.double(), weight.double()
    a64, b64 = lora_A.double(), lora_B.double()
    y = torch.einsum("...k,nk->...n", x64, w64)
    if bias is not None:
        y = y + bias.double()
    h = x64 if mask is None else x64 * mask.double()
    t = torch.einsum("...k,rk->...r", h, a64)
    return y + scaling * torch.einsum("...r,nr->...n", t, b64)


def lora_linear_grads_f64(x, weight, lora_A, lora_B, scaling: float, dy, mask=None):
    """float64 (dX, dA, dB) of `lora_linear` for upstream gradient dy (W and bias frozen)."""
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
