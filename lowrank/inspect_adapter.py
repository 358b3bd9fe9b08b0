"""`lowrank inspect ADAPTER`: the spectrum of every layer's update s * B @ A, from the factors alone. Level 5.

    report = inspect_adapter("adapter_dir", base="model_dir", top_k=4)
    render(report)                   # a table, the flagged layers and the suggested rank
    report.to_json()                 # the same, machine-readable
    plot(report, "spectrum.png")     # heat map: layers x singular value index (matplotlib)

# Note: the singular values from the r x r factors
With B = Q_B R_B (B (N, r)) and A^T = Q_A R_A (A (r, K)), s B A = s Q_B (R_B R_A^T) Q_A^T, and Q_B,
Q_A have orthonormal columns, so the singular values of s B A are |s| times those of the small
R_B R_A^T (min(N, r) x min(K, r)). Everything in float64; the N x K matrix is never formed.

# Note: the numbers per layer
With sigma_1 >= ... >= sigma_r (zeros where min(N, K) < r):
- energy e_i = sigma_i^2 / sum_j sigma_j^2 (the squared Frobenius norm's share); `energy_top_k` =
  e_1 + ... + e_k; `rank90` / `rank99` = the fewest singular values holding 90% / 99% of the energy
  (truncating the update to rank99 leaves at most 10% of its Frobenius norm).
- effective rank (Roy & Vetterli, 2007): exp(-sum_i p_i ln p_i) with p_i = sigma_i / sum_j sigma_j,
  between 1 (one direction) and r (all equal).
- condition number sigma_1 / sigma_r (inf when sigma_r is 0).
- with the base model: |s B A|_F / |W|_F (Frobenius norms; the base tensor read from its file alone;
  a bitsandbytes NF4 weight is decoded first).
- a DoRA adapter: the spectrum is still that of s B A (the direction update); its magnitudes m also
  rescale every row, so with the base |dW|/|W| is the merged weight's change |W' - W|_F / |W|_F
  (W' = m / ||W + s B A||_rows (.) (W + s B A), `dora_change`). A DoRA layer with B = 0 is flagged
  `magnitude-only` rather than `zero` (its magnitudes may have trained; with the base, `zero` when
  W' = W).

# Note: rank collapse and the suggested rank
A layer is flagged `collapsed` when its rank99 <= r / 4 (at r >= 4): three quarters of its rank
hold under 1% of the update's energy. A layer whose update is 0 (B = 0: never trained) is flagged
`zero`. The suggested rank for the next run is the smallest power of two >= the largest rank99
over the non-zero layers, at most the largest r of the adapter: a rank that keeps 99% of every
layer's energy. These are heuristics about the trained update, not about the task.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch

from .adapter_files import AdapterLayer, read_adapter
from .checkpoint import Checkpoint

COLLAPSE_FRACTION = 0.25  # rank99 <= r * this: collapsed (see the Note)


def singular_values(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """float64 singular values of scaling * lora_B @ lora_A, descending, length r (zeros where
    min(N, K) < r), from the QR factors of B and A^T (see the Note); never forms the N x K matrix."""
    a, b = lora_A.detach().double().cpu(), lora_B.detach().double().cpu()  # (r, K), (N, r)
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
        raise ValueError(f"singular_values: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not (r, K) "
                         f"and (N, r)")
    r_b = torch.linalg.qr(b, mode="r").R  # (min(N, r), r)
    r_a = torch.linalg.qr(a.t(), mode="r").R  # (min(K, r), r)
    sv = torch.linalg.svdvals(r_b @ r_a.t()) * abs(scaling)  # (min(N, K, r),)
    return torch.cat([sv, sv.new_zeros(r - sv.numel())])


@dataclasses.dataclass
class LayerReport:
    path: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    scaling: float
    singular_values: list[float]
    norm: float  # |s B A|_F
    effective_rank: float
    rank90: int
    rank99: int
    energy_top_k: float
    condition: float
    relative_norm: float | None  # |s B A|_F / |W|_F, with the base (DoRA: |W' - W|_F / |W|_F, the merge's)
    flags: list[str]
    dora: bool = False  # a DoRA layer: rows also rescaled by its magnitudes (see the Note)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["condition"] = None if math.isinf(self.condition) else self.condition  # JSON has no inf
        return d


@dataclasses.dataclass
class InspectReport:
    adapter: str
    base: str | None
    top_k: int
    layers: list[LayerReport]
    suggested_rank: int | None  # None when every layer is zero
    rule: str
    saved_modules: dict = dataclasses.field(default_factory=dict)  # modules_to_save path -> parameters held

    def to_json(self) -> dict:
        return {"adapter": self.adapter, "base": self.base, "top_k": self.top_k,
                "suggested_rank": self.suggested_rank, "rule": self.rule, "modules_to_save": self.saved_modules,
                "collapsed": [lr.path for lr in self.layers if "collapsed" in lr.flags],
                "zero": [lr.path for lr in self.layers if "zero" in lr.flags],
                "layers": [lr.to_json() for lr in self.layers]}


def spectrum_stats(sv: torch.Tensor, top_k: int) -> dict:
    """effective_rank, rank90, rank99, energy_top_k, condition of descending singular values (the Note)."""
    r = sv.numel()
    total2 = float((sv * sv).sum())
    if total2 == 0.0:
        return {"effective_rank": 0.0, "rank90": 0, "rank99": 0, "energy_top_k": 0.0, "condition": math.inf}
    energy = torch.cumsum(sv * sv, 0) / total2
    p = sv / sv.sum()
    p = p[p > 0]
    # the fewest values holding the fraction (a tiny tolerance: cumsum of shares may end at 1 - 1e-16)
    held = lambda frac: min(int((energy < frac - 1e-12).sum()) + 1, r)  # noqa: E731
    return {"effective_rank": math.exp(float(-(p * p.log()).sum())), "rank90": held(0.90), "rank99": held(0.99),
            "energy_top_k": float(energy[min(top_k, r) - 1]),
            "condition": math.inf if float(sv[-1]) == 0.0 else float(sv[0] / sv[-1])}


def dora_change(weight: torch.Tensor, layer: AdapterLayer) -> float:
    """|W' - W|_F for a DoRA layer merged (W' = m / ||W + s B A||_rows (.) (W + s B A), peft's merge),
    in float64; `weight` (out, in)."""
    v = weight.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    norms = torch.linalg.vector_norm(v, dim=1)
    scale = torch.where(norms > 0, layer.magnitude.double() / norms, torch.zeros_like(norms))
    return float(torch.linalg.vector_norm(scale[:, None] * v - weight.double()))


def _layer_report(layer: AdapterLayer, top_k: int, base_norm: float | None,
                  change: float | None = None) -> LayerReport:
    """change: |W' - W|_F of a DoRA layer, with the base (`dora_change`)."""
    sv = singular_values(layer.lora_A, layer.lora_B, layer.scaling)
    stats = spectrum_stats(sv, top_k)
    norm = float(sv.norm())
    dora = layer.magnitude is not None
    moved = norm if change is None else change
    flags = []
    if norm == 0.0 and not (dora and (change is None or change > 0)):
        flags.append("zero")
    elif norm == 0.0:  # DoRA, B = 0: the magnitudes may still rescale the rows (they do when change > 0)
        flags.append("magnitude-only")
    elif layer.rank >= 4 and stats["rank99"] <= layer.rank * COLLAPSE_FRACTION:
        flags.append("collapsed")
    rel = None if base_norm is None else (moved / base_norm if base_norm > 0 else math.inf)
    return LayerReport(layer.path, tuple(layer.shape), layer.rank, layer.scaling, sv.tolist(), norm,
                       relative_norm=rel, flags=flags, dora=dora, **stats)


def suggest_rank(layers: list[LayerReport]) -> int | None:
    """The smallest power of two >= the largest rank99 of the non-zero layers, at most the largest r
    (the Note); None when every layer is zero."""
    live = [lr for lr in layers if lr.norm > 0]  # (a DoRA layer with B = 0 has no direction update to rank)
    if not live:
        return None
    need = max(lr.rank99 for lr in live)
    return min(1 << (need - 1).bit_length(), max(lr.rank for lr in layers))


def inspect_adapter(adapter: str | os.PathLike, base: str | os.PathLike | None = None, top_k: int = 4,
                    allow_pickle: bool = False) -> InspectReport:
    """The per-layer spectrum report of the peft LoRA adapter in directory `adapter` (written by
    peft or lowrank; read and checked by `read_adapter`). base: a transformers model directory
    (safetensors) whose weights give each layer's relative norm; each base tensor is read alone,
    and must have the layer's (out, in) shape (or (in, out): Conv1D). ValueError / FileNotFoundError
    for files that do not fit."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"inspect: top_k must be an int >= 1, got {top_k!r}")
    found = read_adapter(adapter, allow_pickle=allow_pickle)
    base_norms: dict[str, float] = {}
    changes: dict[str, float] = {}  # DoRA layers with the base: |W' - W|_F of the merge
    if base is not None:
        ckpt = Checkpoint(base, "inspect --base")
        keys = ckpt.resolve([layer.path for layer in found.layers], "inspect --base")
        for layer in found.layers:
            key, (n, k) = keys[layer.path], layer.shape
            if ckpt.is_nf4(key):  # a bitsandbytes 4-bit weight: the norm of what it decodes to
                nf4 = ckpt.nf4_weight(key)
                if tuple(nf4.shape) != (n, k):
                    raise ValueError(f"inspect --base: the NF4 weight {key} in {base!r} is {tuple(nf4.shape)}; the "
                                     f"adapter's layer {layer.path} needs ({n}, {k})")
                w = nf4.dequantize(torch.float32)
                base_norms[layer.path] = float(torch.linalg.vector_norm(w.double()))
                if layer.magnitude is not None:
                    changes[layer.path] = dora_change(w, layer)
                continue
            if ckpt.shape(key) not in ((n, k), (k, n)) or ckpt.dtype(key) is None \
                    or not ckpt.dtype(key).is_floating_point:
                raise ValueError(f"inspect --base: {key} in {base!r} is {ckpt.dtype(key)} {ckpt.shape(key)}; the "
                                 f"adapter's layer {layer.path} needs a dense ({n}, {k}) weight")
            w = ckpt.tensor(key)
            base_norms[layer.path] = float(torch.linalg.vector_norm(w.double()))
            if layer.magnitude is not None:
                changes[layer.path] = dora_change(w if ckpt.shape(key) == (n, k) else w.t(), layer)
    layers = [_layer_report(layer, top_k, base_norms.get(layer.path), changes.get(layer.path))
              for layer in found.layers]
    rule = ("smallest power of two >= the largest rank99 (values holding 99% of the energy) over non-zero layers, "
            "at most r; collapsed: rank99 <= r/4")
    saved = {p: sum(t.numel() for t in state.values()) for p, state in sorted(found.saved.items())}
    return InspectReport(os.fspath(adapter), None if base is None else os.fspath(base), top_k, layers,
                         suggest_rank(layers), rule, saved)


def render(report: InspectReport, out=None) -> None:
    """The report as a plain-text table on `out` (default stdout)."""
    say = (lambda s: print(s, file=out))
    k = report.top_k
    say(f"adapter {report.adapter}: {len(report.layers)} layer(s)")
    if report.saved_modules:
        say("modules_to_save (trained whole, not low-rank): " + ", ".join(
            f"{p} ({n:,d} parameters)" for p, n in report.saved_modules.items()))
    head = f"{'layer':<44} {'shape':>11} {'r':>4} {'eff.rank':>8} {'r90':>4} {'r99':>4} {f'top{k}':>7} {'cond':>9}"
    head += f" {'|dW|/|W|':>9}" if report.base else ""
    say(head + "  flags")
    for lr in report.layers:
        cond = "inf" if math.isinf(lr.condition) else f"{lr.condition:.3g}"
        line = (f"{lr.path[-44:]:<44} {f'{lr.shape[0]}x{lr.shape[1]}':>11} {lr.rank:>4} {lr.effective_rank:>8.2f} "
                f"{lr.rank90:>4} {lr.rank99:>4} {100 * lr.energy_top_k:>6.1f}% {cond:>9}")
        if report.base:
            line += f" {lr.relative_norm:>9.3g}"
        say(line + ("  " + ",".join(lr.flags) if lr.flags else ""))
    collapsed = [lr.path for lr in report.layers if "collapsed" in lr.flags]
    zero = [lr.path for lr in report.layers if "zero" in lr.flags]
    if collapsed:
        say(f"rank collapse in {len(collapsed)} of {len(report.layers)} layer(s) (99% of the update's energy in "
            f"r/4 or fewer directions): {', '.join(collapsed[:4])}{' ...' if len(collapsed) > 4 else ''}")
    if zero:
        say(f"{len(zero)} layer(s) have a zero update (B = 0: untrained): {', '.join(zero[:4])}"
            f"{' ...' if len(zero) > 4 else ''}")
    dora = [lr for lr in report.layers if lr.dora]
    if dora:
        say(f"DoRA adapter ({len(dora)} layer(s)): the spectrum is of the direction update s B A; the magnitudes "
            f"also rescale each output row (m_i / ||W_i + s (B A)_i||), "
            + ("so |dW|/|W| is the merged weight's change, |W' - W| / |W|" if report.base else
               "which only --base can measure (the merged change needs W)"))
        only = [lr.path for lr in dora if "magnitude-only" in lr.flags]
        if only:
            say(f"{len(only)} DoRA layer(s) with B = 0: their update, if any, is the magnitudes' alone: "
                f"{', '.join(only[:4])}{' ...' if len(only) > 4 else ''}")
    if report.suggested_rank is None:
        say("no suggested rank: every layer's direction update s B A is zero")
    else:
        r_max = max(lr.rank for lr in report.layers)
        say(f"suggested rank for the next run: {report.suggested_rank} (adapter r={r_max}; rule: {report.rule})")


def plot(report: InspectReport, path: str | os.PathLike) -> None:
    """A PNG heat map: one row per layer, one column per singular value index, colour = log10 of the
    singular value relative to the layer's largest. Needs matplotlib (ValueError naming it if absent)."""
    try:
        from matplotlib.figure import Figure  # optional: only --plot draws (no pyplot: no global backend state)
    except ImportError:
        raise ValueError("inspect --plot needs matplotlib: pip install matplotlib (or lowrank[jobs])") from None
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):  # (else the error would name the temporary file below)
        raise ValueError(f"inspect --plot {path}: no directory {parent}")
    width = max(len(lr.singular_values) for lr in report.layers)
    grid = torch.full((len(report.layers), width), math.nan, dtype=torch.float64)
    for i, lr in enumerate(report.layers):
        sv = torch.tensor(lr.singular_values, dtype=torch.float64)
        if float(sv[0]) > 0:
            grid[i, : sv.numel()] = torch.log10((sv / sv[0]).clamp_min(1e-12))
    fig = Figure(figsize=(min(4 + 0.25 * width, 20), min(2 + 0.22 * len(report.layers), 40)))
    ax = fig.subplots()
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=-6, vmax=0, interpolation="nearest")
    ax.set_yticks(range(len(report.layers)), [lr.path for lr in report.layers], fontsize=6)
    ax.set_xlabel("singular value index")
    ax.set_title(f"spectrum of s*B@A per layer: {os.path.basename(os.path.normpath(report.adapter))}")
    fig.colorbar(im, ax=ax, label="log10(sigma_i / sigma_1)")
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
