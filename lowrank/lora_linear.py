"""LoRALinear: a drop-in wrapper around nn.Linear, transformers' Conv1D or NF4Linear with LoRA
adapters, including its mixed-batch forward (rows on different adapters, through `lowrank::sgmv`).

Level 3: imports levels 0-3.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import backend_for
from .config import LoRAConfig
from .layer_types import is_conv1d, is_dense_linear, is_embedding, linear_dims, runs_own_forward
from .nf4_linear import NF4Linear
from .ops.dora import dora_linear, dora_scale, magnitude_rounded, row_norms, weight_row_sq_norms
from .ops.lora_matmul import lora_linear
from .ops.nf4_lora_matmul import nf4_lora_linear
from .ops.sgmv import metadata_for, sgmv


def is_linear(module: nn.Module) -> bool:
    """A linear layer LoRALinear can wrap: nn.Linear, GPT-2's Conv1D or lowrank's NF4Linear."""
    return is_dense_linear(module) or isinstance(module, NF4Linear)


def is_adaptable(module: nn.Module) -> bool:
    """A layer LoRALinear can wrap: a linear one (`is_linear`) or an nn.Embedding."""
    return is_linear(module) or is_embedding(module)


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * dropout(x) @ A.T @ B.T for the active adapter.

    The wrapped layer is kept as `base_layer` (its weight is not copied; `lowrank.unpatch` puts the
    very same module back). Adapters live in `lora_A[name]` (rank, in_features) and
    `lora_B[name]` (out_features, rank), in the base weight's dtype and device, so a GPT-2 Conv1D
    adapter has the same shapes as an nn.Linear one (peft's `fan_in_fan_out`). A DoRA adapter
    (config.dora) also has `lora_magnitude_vector[name]` (out_features,), initialised to the base
    weight's row norms ||W_i|| (an NF4 base: of its dequantized weight in the compute dtype), and
    runs `lowrank.ops.dora_linear` / `nf4_dora_linear` (peft's DoRA, norm detached).


    An nn.Embedding (num_embeddings V, embedding_dim D) is adapted as peft does it: in_features = V,
    out_features = D, A (r, V) starts at zero and B (D, r) normal (peft's lora_embedding_A / _B),
    and the output is base(x) + scaling * A.T[x] @ B.T (times the layer's `embed_scale` where it
    has one, as transformers' scaled embeddings do; no dropout, as in peft). Its weight is stored
    (V, D), i.e. (in, out): `fan_in_fan_out` is true, and merging is Conv1D's.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"LoRALinear wraps nn.Linear, transformers Conv1D, lowrank.NF4Linear or nn.Embedding, got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.embedding = is_embedding(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer) or self.embedding
        self.in_features, self.out_features = linear_dims(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only (peft's name)
        self.configs: dict[str, LoRAConfig] = {}
        # Multi-adapter state (lowrank.adapters): the active adapter's position in `configs` as a
        # device tensor (-1: none), kept in step with `active_adapter` by its setter, and the
        # per-row adapter ids of a mixed batch (None outside `lowrank.adapter_ids`) with the thread
        # that entered the block: only that thread's forwards use them.
        self.register_buffer("_active_index", torch.tensor(-1, dtype=torch.long), persistent=False)
        self._adapter_ids: torch.Tensor | None = None
        self._adapter_ids_thread: int | None = None
        self.active_adapter: str | None = None
        # lowrank.merge state: None, or a lowrank.merge.MergeState (which adapter is merged into
        # base_layer.weight, and the record that makes unmerge bit-exact).
        self.merged = None

    # -- attributes that code written for nn.Linear reads -------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def active_adapter(self) -> str | None:
        return self.__dict__.get("_active_name")

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.configs:
            raise ValueError(f"no adapter {name!r} on this layer (adapters: {list(self.configs)})")
        self.__dict__["_active_name"] = name
        with torch.no_grad():  # in place: a fresh tensor would be a new graph input to torch.compile
            self._active_index.fill_(-1 if name is None else list(self.configs).index(name))

    def scaling(self, name: str | None = None) -> float:
        return self.configs[name or self.active_adapter].scaling

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, config: LoRAConfig, activate: bool | None = None) -> None:
        """Add an adapter (A initialised as peft does, B = 0). activate: make it the active one
        (True), leave the active adapter as it is (False), or activate it only on a layer that has
        none (None). Model-level code (`lowrank.patch_linear`) decides for the whole model."""
        self.attach_adapter(config, *self.new_factors(config), activate=activate)

    def new_factors(self, config: LoRAConfig, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """(A, B) for `config` on this layer, allocated and initialised, in `dtype` (default: float32
        over a float16 / bfloat16 / NF4 base, as peft's autocast_adapter_dtype: a 16-bit factor
        loses most small optimizer updates to rounding; else the base weight's), and for a DoRA
        adapter the magnitude m = ||W_i|| too: (A, B, m); the layer is not touched (the allocation
        is what can fail: out of memory)."""
        if config.adapter_name in self.configs:
            raise ValueError(f"adapter {config.adapter_name!r} already exists on this layer")
        if config.dora and self.embedding:
            raise ValueError(f"adapter {config.adapter_name!r}: DoRA on an nn.Embedding is not supported (only "
                             f"linear layers); leave the embedding out of the targets or use plain LoRA")
        w = self.base_layer.weight
        if dtype is None:
            dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        a = torch.empty(config.rank, self.in_features, device=w.device, dtype=dtype)
        b = torch.zeros(self.out_features, config.rank, device=w.device, dtype=dtype)
        if self.embedding:  # peft's embedding init: A = 0, B ~ N(0, 1) (drawn in float32)
            a.zero_()
            if b.device.type != "meta":
                with torch.no_grad():
                    b.copy_(torch.randn(b.shape, device=b.device))
        else:
            init_lora_A_(a, config)
        if not config.dora:
            return a, b
        m = torch.empty(self.out_features, device=w.device, dtype=dtype)
        if w.device.type != "meta":
            # ||W_i|| in float64, rounded as the forward rounds the norms it divides m by
            # (ops.dora.magnitude_rounded): the scale m / n is then exactly 1 at initialisation
            m.copy_(magnitude_rounded(self.weight_sq_norms().sqrt(), dtype))
        return a, b, m

    def attach_adapter(self, config: LoRAConfig, a: torch.Tensor, b: torch.Tensor,
                       magnitude: torch.Tensor | None = None, activate: bool | None = None) -> None:
        """Register factors from `new_factors` as adapter `config.adapter_name` (magnitude: a DoRA
        adapter's m, required exactly when config.dora)."""
        name = config.adapter_name
        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if (magnitude is not None) != config.dora:
            raise ValueError(f"adapter {name!r}: a magnitude vector is needed exactly for a DoRA adapter "
                             f"(dora={config.dora}, magnitude {'given' if magnitude is not None else 'missing'})")
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        if magnitude is not None:
            self.lora_magnitude_vector[name] = nn.Parameter(magnitude)
        self.configs[name] = config
        if activate or (activate is None and self.active_adapter is None):
            self.active_adapter = name

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name`: lora_A, lora_B (and a DoRA adapter's magnitude)."""
        params = [self.lora_A[name], self.lora_B[name]]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    def weight_sq_norms(self) -> torch.Tensor:
        """||W_i||^2 of the base weight's rows, float64 (out_features,), for DoRA's norms: computed
        once and cached while the weight keeps its storage, version counter, shape, strides, dtype
        and device (an in-place update, a `.data =` swap, `.to()` all recompute it). An edit through
        `weight.data` in place bumps no counter: call `clear_weight_cache()` after one."""
        w = self.base_layer.weight  # an NF4 base: its packed 4-bit codes
        nf4 = isinstance(self.base_layer, NF4Linear)
        if torch.compiler.is_compiling():
            # Traced, the cache's key (a storage address) cannot be compared: the graph computes the
            # norms itself, one pass over W per forward (as peft's DoRA does each forward).
            return weight_row_sq_norms(self.base_layer.nf4 if nf4 else self.base_weight_nk(),
                                       self.base_layer.compute_dtype if nf4 else None)
        key = (w.data_ptr(), w._version, tuple(w.shape), tuple(w.stride()), w.dtype, w.device,
               self.base_layer.compute_dtype if nf4 else None)
        cached = self.__dict__.get("_weight_sq")
        if cached is None or cached[0] != key:
            source = self.base_layer.nf4 if nf4 else self.base_weight_nk()
            cached = (key, weight_row_sq_norms(source, self.base_layer.compute_dtype if nf4 else None))
            self.__dict__["_weight_sq"] = cached
        return cached[1]

    def clear_weight_cache(self) -> None:
        """Forget the cached ||W_i||^2 (see `weight_sq_norms`)."""
        self.__dict__.pop("_weight_sq", None)

    def base_weight_nk(self) -> torch.Tensor:
        """The base weight as (out_features, in_features): a view for Conv1D, no copy."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _takes_mixed_forward(self):  # a mixed batch, or several adapters under torch.compile
            return _mixed_forward(self, x)
        name = self.active_adapter
        if name is None or self.merged:
            return self.base_layer(_in_weight_dtype(self, x))
        cfg = self.configs[name]
        if self.embedding:
            out = self.base_layer(x)
            return out + _embedding_delta(self, x, name).to(out.dtype)
        if not x.is_floating_point():  # (a float x of another dtype is cast to the weight's, below)
            dtype = self.base_layer.compute_dtype if isinstance(self.base_layer, NF4Linear) else \
                self.base_layer.weight.dtype
            raise TypeError(f"LoRALinear({self.in_features}, {self.out_features}): input of dtype {x.dtype}; a "
                            f"linear layer takes floating-point inputs (it computes in {dtype})")
        if name in self.lora_magnitude_vector and isinstance(self.base_layer, NF4Linear):
            return self.base_layer.dora_forward(x, self.lora_A[name], self.lora_B[name],
                                                self.lora_magnitude_vector[name], cfg.scaling,
                                                cfg.dropout if self.training else 0.0, self.weight_sq_norms())
        if name in self.lora_magnitude_vector:
            _refuse_dora_over_own_forward(self)
            w = self.base_weight_nk()
            a, b, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name]
            if a.dtype != w.dtype:  # fp32 master adapters over a 16-bit base, as for LoRA below
                a, b, m = a.to(w.dtype), b.to(w.dtype), m.to(w.dtype)
            return dora_linear(x, w, a, b, m, cfg.scaling, bias=self.base_layer.bias,
                               dropout=cfg.dropout if self.training else 0.0, weight_sq=self.weight_sq_norms())
        if isinstance(self.base_layer, NF4Linear):  # the fused QLoRA op
            return self.base_layer.lora_forward(x, self.lora_A[name], self.lora_B[name], cfg.scaling,
                                                cfg.dropout if self.training else 0.0)
        if runs_own_forward(self.base_layer):  # the layer's own output (a subclass, hooks), plus LoRA
            return _unfused_forward(self, x, name)
        w = self.base_weight_nk()
        a, b = self.lora_A[name], self.lora_B[name]
        if a.dtype != w.dtype:  # master adapters in another dtype (fp32 over a bf16 base): cast for the
            a, b = a.to(w.dtype), b.to(w.dtype)  # fused op, differentiably (their gradients in their own dtype)
        return lora_linear(_to_weight_dtype(x, w.dtype), w, a, b, cfg.scaling, bias=self.base_layer.bias,
                           dropout=cfg.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        ranks = {n: c.rank for n, c in self.configs.items()}
        dora = f", dora={list(self.lora_magnitude_vector)}" if len(self.lora_magnitude_vector) else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={ranks}{dora}, "
                f"active={self.active_adapter!r}, fan_in_fan_out={self.fan_in_fan_out}")


def _refuse_dora_over_own_forward(layer: LoRALinear) -> None:
    if runs_own_forward(layer.base_layer):
        raise NotImplementedError(
            f"LoRALinear({layer.in_features}, {layer.out_features}): DoRA over a {type(layer.base_layer).__name__} "
            f"with a forward of its own or forward hooks: DoRA rescales x @ W.T, which such a layer need not "
            f"compute; use LoRA there")


def _unfused_forward(layer: LoRALinear, x: torch.Tensor, name: str) -> torch.Tensor:
    """base_layer(x) + scaling * dropout(x) @ A.T @ B.T in torch ops, for a base layer whose output
    is its own (`runs_own_forward`: a subclass's forward, accelerate's hooks, forward hooks), as
    peft computes every layer: the fused op would read the weight and skip them. The LoRA part runs
    in the adapters' dtype and is added in the output's."""
    out = layer.base_layer(x)
    cfg = layer.configs[name]
    a, b = layer.lora_A[name], layer.lora_B[name]
    h = x.to(a.dtype)
    if layer.training and cfg.dropout > 0.0:
        h = F.dropout(h, cfg.dropout, training=True)
    return out + ((h @ a.t()) @ b.t() * cfg.scaling).to(out.dtype)


def _embedding_delta(layer: LoRALinear, x: torch.Tensor, name: str) -> torch.Tensor:
    """scaling * A.T[x] @ B.T for an embedding layer (peft's lookup: the base layer's padding_idx,
    max_norm and the rest apply to A's columns too), times the layer's embed_scale if any."""
    base = layer.base_layer
    t = nn.functional.embedding(x, layer.lora_A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
                                base.scale_grad_by_freq, base.sparse)  # (..., r)
    delta = (t @ layer.lora_B[name].t()) * layer.configs[name].scaling
    scale = getattr(base, "embed_scale", None)
    if scale is not None:
        delta = delta * (scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale)
    return delta


def init_lora_A_(a: torch.Tensor, config: LoRAConfig) -> None:
    """Initialise A in place as peft does (drawn in float32, then cast): kaiming-uniform(a=sqrt(5))
    or normal(std=1/rank)."""
    if a.device.type == "meta":
        return
    a32 = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    if config.init == "kaiming":
        nn.init.kaiming_uniform_(a32, a=math.sqrt(5))
    else:
        nn.init.normal_(a32, std=1.0 / config.rank)
    with torch.no_grad():
        a.copy_(a32)


# -- the mixed-batch forward --------------------------------------------------------------------------
def _takes_mixed_forward(layer) -> bool:
    """Whether LoRALinear.forward goes through `_mixed_forward`: inside `lowrank.adapter_ids` in the
    thread that entered it (another thread's forward of the same model runs its active adapter as
    if there were no block), or under torch.compile for an unmerged layer with two or more adapters
    and no DoRA adapter (switching among them then changes a buffer, not a guarded attribute). Under torch.compile the
    thread is not checked: dynamo guards on the ids attribute, not on the calling thread."""
    if layer._adapter_ids is not None and (torch.compiler.is_compiling()
                                           or layer._adapter_ids_thread == threading.get_ident()):
        return True
    return (len(layer.configs) > 1 and not getattr(layer, "merged", False) and not len(layer.lora_magnitude_vector)
            and torch.compiler.is_compiling())


def _in_weight_dtype(layer, x: torch.Tensor) -> torch.Tensor:
    """x cast to the weight's dtype where the layer computes in it (a dense base of lowrank's own
    forward, outside autocast) and x is a float of another dtype: an fp32 layer given bf16 input
    computes in fp32 on every path (the fused op, a mixed batch, the base rows, adapters disabled or
    merged) instead of only with an adapter running (plain nn.Linear raises there)."""
    if layer.embedding or isinstance(layer.base_layer, NF4Linear) or runs_own_forward(layer.base_layer):
        return x
    return _to_weight_dtype(x, layer.base_layer.weight.dtype)


def _to_weight_dtype(x: torch.Tensor, w_dtype: torch.dtype) -> torch.Tensor:
    """x in w_dtype when both are floating point and x's differs, outside autocast (which decides)."""
    if x.dtype == w_dtype or not x.is_floating_point() or not w_dtype.is_floating_point \
            or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(w_dtype)


def _mixed_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward for mixed batches (`layer._adapter_ids` set by `lowrank.adapter_ids`) and
    for the active adapter under torch.compile (`layer._active_index`, a buffer, so switching
    adapters changes data, not a guard). Every adapter of the layer goes into one `lowrank::sgmv`."""
    names = list(layer.configs)
    dora = len(layer.lora_magnitude_vector) > 0
    if dora and not layer.embedding and not isinstance(layer.base_layer, NF4Linear):
        _refuse_dora_over_own_forward(layer)
    x = _in_weight_dtype(layer, x)
    out = None if dora and names else layer.base_layer(x)  # DoRA: the base GEMM without its bias, below
    if not names:
        return out
    if getattr(layer, "merged", False):
        raise ValueError("a merged LoRALinear cannot run mixed-adapter batches; unmerge it first")
    if layer.embedding:
        return out + _mixed_embedding_delta(layer, x, names).to(out.dtype)
    k, n = layer.in_features, layer.out_features
    x2 = x.reshape(-1, k)  # (M, K)
    m = x2.shape[0]
    ids = layer._adapter_ids
    if ids is None:
        ids_tok, meta = layer._active_index.expand(m), []
    else:
        rows = 1 if x.dim() == 1 else x.shape[0]
        if ids.shape[0] != rows:  # a (batch * seq, K) flattening cannot be told from a batch: refused
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
    if dora:
        return _mixed_dora(layer, x, h, ids_tok, meta)
    As, Bs = [layer.lora_A[a] for a in names], [layer.lora_B[a] for a in names]
    # The adapters' dtype can differ from the activations': an NF4 base keeps fp32 adapters in a
    # bf16 model, and autocast makes the base output bf16 beside fp32 x. As peft does, the LoRA
    # part runs in the adapters' dtype and the sum comes back in the base output's dtype.
    dt = As[0].dtype
    y = sgmv(h.to(dt), out.reshape(-1, n).to(dt), ids_tok, As, Bs, [c.scaling for c in cfgs], meta)
    return y.view(out.shape).to(out.dtype)


def _mixed_embedding_delta(layer, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The LoRA term of an embedding layer for a mixed batch (or the active adapter under
    torch.compile): each adapter's lookup on every token, kept where the token's id picks it."""
    ids = layer._adapter_ids
    if ids is None:
        tok = layer._active_index.expand(x.shape[:1] if x.dim() else ())
    else:
        rows = 1 if x.dim() <= 1 else x.shape[0]
        if ids.shape[0] != rows:
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries but an embedding LoRALinear input has {rows} "
                             f"rows (shape {tuple(x.shape)}): give one adapter per row (sequence)")
        tok = ids.to(x.device)
    tok = tok.reshape(tok.shape + (1,) * (x.dim() - tok.dim() + 1))  # (rows, 1, ..., 1): broadcast over tokens
    total = None
    for i, name in enumerate(names):
        delta = _embedding_delta(layer, x, name)
        term = delta * (tok == i).to(delta.dtype)
        total = term if total is None else total + term
    return total


def _mixed_dora(layer, x: torch.Tensor, h: torch.Tensor, ids_tok: torch.Tensor, meta) -> torch.Tensor:
    """`_mixed_forward` for a layer with DoRA adapters: each token on its own adapter, LoRA or DoRA (or
    the base layer), as if run alone, through one `lowrank::sgmv`; differentiable (m included).
    With S the per-adapter row scales (m / ||W + s B A|| for a DoRA adapter, 1 for a LoRA adapter and
    for base tokens) and L(h) the tokens' LoRA terms (sgmv):
        y = x W^T + bias + (S - 1) (.) h W^T + S (.) L(h) = (x W^T - h W^T) + bias + S (.) (h W^T + L(h)),
    peft's DoRA (and LoRA where S = 1); without dropout h = x and y = S (.) (x W^T + L(x)) + bias."""
    names = list(layer.configs)
    cfgs = [layer.configs[a] for a in names]
    k, n = layer.in_features, layer.out_features
    x2 = x.reshape(-1, k)  # (M, K)
    As, Bs = [layer.lora_A[a] for a in names], [layer.lora_B[a] for a in names]
    dt = As[0].dtype  # the adapters' dtype, as in _mixed_forward
    xw = _base_without_bias(layer, x2)  # (M, N)
    hw = xw if h is x2 else _base_without_bias(layer, h)
    v = sgmv(h.to(dt), hw.to(dt), ids_tok, As, Bs, [c.scaling for c in cfgs], meta)  # h W^T + L(h)
    nf4 = isinstance(layer.base_layer, NF4Linear)
    source = layer.base_layer.nf4 if nf4 else layer.base_weight_nk()
    ones = torch.ones(n, dtype=dt, device=x.device)
    scales = [ones]
    for a, cfg in zip(names, cfgs):
        if a not in layer.lora_magnitude_vector:
            scales.append(ones)
            continue
        norms = row_norms(source, layer.lora_A[a], layer.lora_B[a], cfg.scaling, layer.weight_sq_norms(),
                          layer.base_layer.compute_dtype if nf4 else None)
        scales.append(dora_scale(layer.lora_magnitude_vector[a], norms, dt))
    valid = (ids_tok >= 0) & (ids_tok < len(names))
    s_tok = torch.stack(scales)[torch.where(valid, ids_tok + 1, 0)]  # (M, N): each token's adapter's scale
    y = s_tok * v
    if h is not x2:
        y = y + (xw - hw).to(dt)
    bias = layer.base_layer.bias
    if bias is not None:
        y = y + bias.to(dt)
    return y.view(*x.shape[:-1], n).to(xw.dtype)


def _base_without_bias(layer, x2: torch.Tensor) -> torch.Tensor:
    """x2 @ W^T for the layer's base weight (dense, or NF4 through the QLoRA op in its compute dtype)."""
    base = layer.base_layer
    if isinstance(base, NF4Linear):
        xc = x2.to(base.compute_dtype)
        return nf4_lora_linear(xc, base.nf4, xc.new_empty((0, layer.in_features)),
                               xc.new_empty((layer.out_features, 0)), 0.0).to(x2.dtype)
    return F.linear(x2, layer.base_weight_nk())


def _tokens_and_meta(ids, m: int, n_adapters: int, x):
    """Per-token ids and (Triton path) segment metadata for a mixed batch. `lowrank.adapter_ids`
    gives all layers with the same adapter list one ids tensor: the first layer of a forward
    builds both and caches them on that tensor, the others reuse them (one sort a batch, not one
    a layer). The key holds the tensor's version (ids changed in place miss) and whether a CUDA
    graph is being captured (a capture records its own metadata build, so replays with new ids
    rebuild it). Not cached while torch.compile traces, nor for ids made under torch.inference_mode
    (an inference tensor has no version counter: a change in place could not be seen)."""
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    uncached = torch.compiler.is_compiling() or ids.is_inference()
    key = None if uncached else (m, n_adapters, str(x.device), ids._version, capturing)
    cache = None if uncached else ids.__dict__.setdefault("_lowrank_meta", {})
    if cache is not None and key in cache:
        return cache[key]
    ids_tok = ids if ids.shape[0] == m else ids.repeat_interleave(m // ids.shape[0], output_size=m)
    meta = metadata_for(ids_tok, n_adapters) if backend_for(x) == "triton" else []
    if cache is not None:
        cache[key] = (ids_tok, meta)
    return ids_tok, meta
