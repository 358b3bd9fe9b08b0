"""TrainableTokens: some rows of an embedding trained, the rest frozen (peft's
`trainable_token_indices`): new or retrained tokens without unfreezing the whole vocabulary. Level 3.

Per adapter the layer holds `token_indices[name]` (row ids) and a trainable
`trainable_tokens_delta[name]` (len(ids), embedding_dim) that starts as a copy of those rows: as in
peft the parameter holds the rows' new values (not a difference), and the forward gives what a
lookup in the base weight with those rows replaced gives (the trained tokens' outputs swapped in,
differentiable in the new rows; neither the base weight written nor a copy of it made). A head whose weight is tied to the embedding (GPT-2's
lm_head) is wrapped too, sharing the same parameters, so a token's new row is both what it embeds
to and what scores it, as the tie means.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer_types import is_embedding, real_values


def check_token_indices(path: str, module: nn.Module, indices) -> list[int]:
    """The row ids as a list of distinct ints inside the embedding; TypeError / ValueError naming
    the module otherwise."""
    if not is_embedding(module):
        raise TypeError(f"trainable_token_indices: {path!r} is a {type(module).__name__}, not an nn.Embedding")
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise TypeError(f"trainable_token_indices for {path!r} must be a list of token ids, got {indices!r}")
    ids = list(indices)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"trainable_token_indices for {path!r} must be a non-empty list of ints, got {indices!r}")
    bad = [i for i in ids if not 0 <= i < module.num_embeddings]
    if bad:
        raise ValueError(f"trainable_token_indices for {path!r}: {bad[:5]} outside the vocabulary "
                         f"[0, {module.num_embeddings})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"trainable_token_indices for {path!r} lists a token twice: {ids}")
    if real_values(module.weight).device.type == "meta":
        raise ValueError(f"trainable_token_indices: {path!r} is on the meta device (no rows to start from)")
    return ids


class TrainableTokens(nn.Module):
    """`base_layer` (an nn.Embedding, or a head tied to one) with some rows replaced per adapter."""

    def __init__(self, base_layer: nn.Module, tied_to: "TrainableTokens | None" = None):
        super().__init__()
        if tied_to is None and not is_embedding(base_layer):
            raise TypeError(f"TrainableTokens wraps an nn.Embedding (or a head tied to one), got "
                            f"{type(base_layer).__name__}")
        if tied_to is not None and not (isinstance(base_layer, nn.Linear) or is_embedding(base_layer)):
            raise TypeError(f"a layer tied to trainable tokens must be an nn.Linear head or another nn.Embedding "
                            f"holding the same weight (T5's and BART's encoder / decoder embed_tokens), got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self.__dict__["tied_to"] = tied_to  # not a submodule: the embedding owns the parameters
        self.__dict__["_active_name"] = None
        self._adapter_ids = None  # lowrank.adapter_ids: model-level ids into _adapter_names, and its thread
        self._adapter_names: list[str] = []
        self._adapter_ids_thread = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def active_adapter(self) -> str | None:
        return self.__dict__["_active_name"]

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.token_indices:
            raise ValueError(f"no trainable tokens for adapter {name!r} (has {list(self.token_indices)})")
        self.__dict__["_active_name"] = name

    def new_rows(self, indices: list[int]) -> torch.Tensor:
        """The starting values of the rows: a copy of the base weight's (not attached yet)."""
        w = self.base_layer.weight.detach()
        return w.index_select(0, torch.tensor(indices, device=w.device)).clone()

    def attach(self, name: str, indices: list[int], rows: torch.Tensor | nn.Parameter) -> None:
        if name in self.token_indices:
            raise ValueError(f"adapter {name!r} already has trainable tokens here")
        self.trainable_tokens_delta[name] = rows if isinstance(rows, nn.Parameter) else nn.Parameter(rows)
        self.token_indices[name] = list(indices)
        self.__dict__.pop("_index_cache", None)

    def detach_adapter(self, name: str) -> None:
        if self.active_adapter == name:
            self.active_adapter = None
        del self.trainable_tokens_delta[name]
        del self.token_indices[name]
        self.__dict__.pop("_index_cache", None)

    def weight_for(self, name: str) -> torch.Tensor:
        """The base weight with adapter `name`'s rows in place (a new tensor; the base is untouched)."""
        w = self.base_layer.weight
        idx, _ = self._indices(name, w.device)
        return w.index_copy(0, idx, self.trainable_tokens_delta[name].to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self._adapter_ids
        if ids is not None and (torch.compiler.is_compiling() or self._adapter_ids_thread == threading.get_ident()):
            return self._mixed_forward(x, ids)
        name = self.active_adapter
        return self.base_layer(x) if name is None else self._forward_with(x, name)

    def _mixed_forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row b of `x` with the rows of adapter ids[b] (`self._adapter_names[ids[b]]`; the base
        weight where that adapter has no tokens here)."""
        rows = 1 if x.dim() <= 1 else x.shape[0]
        if ids.shape[0] != rows:
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries but a TrainableTokens input has {rows} rows "
                             f"(shape {tuple(x.shape)}): give one adapter per row (sequence)")
        out = self.base_layer(x)
        ids = ids.to(out.device)
        for i, name in enumerate(self._adapter_names):
            if name in self.token_indices:
                pick = (ids == i).reshape((rows,) + (1,) * (out.dim() - 1))
                out = torch.where(pick, self._forward_with(x, name), out)
        return out

    def _indices(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the adapter's token ids, a (V,) table of each token's row in the delta, -1 for the rest) on
        `device`, built once per adapter and device (attach / detach_adapter drop them)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        key = (name, str(device))
        if key not in cache:
            idx = torch.tensor(self.token_indices[name], device=device)
            table = torch.full((self.base_layer.weight.shape[0],), -1, dtype=torch.long, device=device)
            table[idx] = torch.arange(idx.numel(), device=device)
            cache[key] = (idx, table)
        return cache[key]

    def _forward_with(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The base layer's output with adapter `name`'s rows: only the outputs those rows touch are
        replaced (the looked-up tokens, or the head's logit columns), never a copy of the (V, D)
        weight. max_norm (which renormalises the looked-up rows in place) and a trained padding row
        (whose gradient nn.Embedding zeroes) take the whole-weight lookup instead."""
        base = self.base_layer
        w = base.weight
        rows = self.trainable_tokens_delta[name].to(w.dtype)
        idx, table = self._indices(name, w.device)
        if isinstance(base, nn.Linear):  # a tied head: the trained tokens' logit columns recomputed
            bias = None if base.bias is None else base.bias.index_select(0, idx)
            out = F.linear(x, w, base.bias)
            return out.index_copy(out.dim() - 1, idx, F.linear(x, rows, bias))
        if base.max_norm is not None or (base.padding_idx is not None and base.padding_idx in self.token_indices[name]):
            w = self.weight_for(name)
            out = F.embedding(x, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
        else:
            out = F.embedding(x, w, base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, base.sparse)
            pos = table[x]  # each token's row in the delta, -1 for the untrained ones
            out = torch.where((pos >= 0).unsqueeze(-1), rows[pos.clamp_min(0)], out)
        scale = getattr(base, "embed_scale", None)  # transformers' scaled embeddings scale in forward
        if scale is not None:
            out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
        return out

    def extra_repr(self) -> str:
        tokens = {n: len(ids) for n, ids in self.token_indices.items()}
        return f"tokens={tokens}, active={self.active_adapter!r}, tied={self.tied_to is not None}"
