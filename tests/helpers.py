"""Shared test helpers: the tolerance rule, poisoning, mismatch reports, the command line in-process."""
from __future__ import annotations

import contextlib
import io
import warnings

import torch

from lowrank import cli
from lowrank.backend import triton_available

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# Smallest error we tolerate regardless of the baseline: a few ulps of the output dtype.
_ULP_FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def where_mismatch(a: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor | float, k: int = 5) -> str:
    """A short report of the worst elements, with indices."""
    diff = (a.double() - ref.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    flat = diff.flatten()
    top = torch.topk(flat, min(k, flat.numel()))
    rows = []
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), diff.shape))
        rows.append(f"  at {idx}: got {a.flatten()[i].item():.6g}, ref {ref.flatten()[i].item():.6g}, |err| {v:.3g}")
    return "\n".join(rows)


def assert_close(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor | None = None,
                 factor: float = 2.0, name: str = "output", bound: float = 0.0) -> None:
    """The flash-attention rule: err(out) <= factor * err(baseline) + floor, against a float64 reference.

    baseline: the same computation done by plain torch in out's dtype (None: compare to the floor
    scaled by the reference's magnitude only). NaN in `out` never passes (unless the reference
    has NaN at the same place). bound: a rounding-error bound the caller derived for this
    computation in out's dtype (where the result cancels and the baseline can be lucky); the floor
    is the larger of it and the ulp floor.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref64)
    assert torch.equal(nan_out, nan_ref), f"{name}: NaN pattern differs ({int(nan_out.sum())} NaN vs {int(nan_ref.sum())} in the reference)"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = max(_ULP_FLOOR[out.dtype] * max(scale, 1.0), bound)
    tol = floor
    if baseline is not None:
        tol = factor * max_err(baseline, ref64) + floor
    err = max_err(torch.nan_to_num(out), torch.nan_to_num(ref64))
    assert err <= tol, f"{name} ({out.dtype}): max |err| {err:.3g} > tol {tol:.3g}\n{where_mismatch(out, ref64, tol)}"


def assert_close_rows(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, factor: float = 2.0,
                      name: str = "output") -> None:
    """`assert_close` row by row: each row's tolerance comes from that row's own magnitude and its
    own baseline error, so a small row (a small adapter's tokens beside a large one's) is held to
    its own scale, not to the largest row's."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    for i in range(out.shape[0]):
        assert_close(out[i], ref64[i], baseline[i], factor, name=f"{name} row {i}")


def dora_factors(n: int, k: int, r: int, seed: int = 0, zero_rows=()):
    """(generator, W (n, k), A (r, k), B (n, r)) in fp32 for a DoRA test case, the rows in `zero_rows`
    of W and B zero (a zero norm); the generator goes on to draw the rest of the case."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    a = torch.randn(r, k, generator=g) / k ** 0.5
    b = 0.3 * torch.randn(n, r, generator=g)
    if zero_rows:
        w[list(zero_rows)] = 0
        b[list(zero_rows)] = 0
    return g, w, a, b


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "weight", nan_payload: bool = True):
    """Bitwise equality; with nan_payload=False any NaN matches any NaN (same positions)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    ba, bb = bits(a), bits(b)
    if not nan_payload:
        na, nb = torch.isnan(a), torch.isnan(b)
        assert torch.equal(na, nb), f"{what}: NaN positions differ"
        ba, bb = ba[~na], bb[~nb]
    bad = (ba != bb).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.shape[0]} element(s) differ, first at {bad[0].tolist()}: "
                              f"{a[tuple(bad[0])].item()!r} vs {b[tuple(bad[0])].item()!r}")


def backends() -> list[str]:
    """The LOWRANK_BACKEND values a model-level test runs on: the reference path, and the Triton
    kernels (in Triton's interpreter without a GPU) whenever Triton imports."""
    return ["reference", "triton"] if triton_available() else ["reference"]


# On a GPU every new shape class and flag set is a fresh Triton compile (~1 s): the property tests
# of the NF4 kernels draw fewer examples there (the interpreter runs the same source on many).
GPU_FEW = 6


def examples(n: int) -> int:
    return GPU_FEW if torch.cuda.is_available() else n


def saved_for_backward(fn):
    """(result, [saved tensors]) of fn() under saved_tensors_hooks: what autograd holds from
    forward to backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def run_python(code: str, *args: str, env: dict | None = None, timeout: float = 120):
    """`python -c code args...` in a fresh interpreter: the CompletedProcess (text output)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def run_cli(*args: str) -> tuple[int, str]:
    """`lowrank ARGS` in this process: (exit code, what it wrote to stderr). An argparse refusal's
    SystemExit gives the code; a Python warning raised meanwhile is appended to the text as a process
    of its own would print it (so "one line on stderr" still sees a leaked warning). ~0.1 s where a
    `python -m lowrank.cli` subprocess took 3-5 s on the CI machine (torch and the CLI's imports)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = cli.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    leaked = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return code, err.getvalue() + leaked
