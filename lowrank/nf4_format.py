"""The NF4 storage format (bitsandbytes' exactly): `NF4Weight`, `quantize_nf4`, dequantize in pure
torch, and state-dict exchange with bitsandbytes. Level 0: imports torch and the standard library.

The format (bitsandbytes 0.50, `quant_type="nf4"`):
- The weight is flattened row-major and cut into blocks of `blocksize` consecutive elements (a
  block may span rows when in_features % blocksize != 0). absmax (fp32) per block.
- Each element becomes a 4-bit index into the 16-value NF4 table `NF4_VALUES`: x is scaled by the
  fp32 reciprocal of the block's absmax (full blocks) or divided by it (the trailing partial
  block: bitsandbytes' reference does that), clamped to [-1, 1], and the code is the number of
  table midpoints strictly below it (ties go to the lower code). An all-zero block is scaled by
  1/1e-38 and so gets code 7 (0.0) everywhere, with absmax 0.
- Two codes a byte, the first element in the HIGH nibble; an odd element count pads a zero.
- Double quantization: offset = mean(absmax) (fp32); absmax - offset is quantized in blocks of
  256 to 8 bits with bitsandbytes' signed dynamic map (see `# Note: nested quantization`).
  Decoding: absmax[b] = fp32(fp32(dynamic_code()[q[b]] * nested_absmax[b // 256]) + offset), two
  roundings, no fused multiply-add; then w = fp32(NF4_VALUES[c] * absmax[block]) rounded once to
  the output dtype.

# Note: nested quantization
bitsandbytes' CPU library (the oracle in CI) quantizes the 8-bit absmax statistics through a
65536-entry lookup table, not by nearest value: with v = (x * (1/absmax2)) clamped to [-1, 1],
i = trunc(fp32(fp32((v + 1) * 0.5) * 65535) + 0.5), code = LUT[i], where LUT[i] counts the
midpoints of the dynamic map below fp32(-1 + fp32(2i / 65535)). This differs from the nearest
code for about 0.3% of values. A block whose values are all zero
gets code 0 with absmax 0. We reproduce that rule exactly; decoding is the same for any encoder.

# Note: bitsandbytes' CPU dequantize and blocks that span rows
bitsandbytes 0.50.2's AVX-512 CPU `dequantize_4bit` indexes absmax per row (`row * (K //
blocksize) + k // blocksize`) whenever K % 16 == 0, which is wrong when K % blocksize != 0 (a
block spans rows): it returns weights off by up to 5x for e.g. (4, 48) with blocksize 64. The
format is the flattened one (bitsandbytes' CUDA kernels and its pure-torch backend agree on it);
we follow the format, and the tests compare with bitsandbytes' CPU op only where it is right.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from . import native
from .dtypes import check_dtype

# bitsandbytes.functional.get_4bit_type("nf4"), written out: regenerating the quantiles with
# scipy is off by an ulp in some entries.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# Elements quantized per chunk: at most _CHUNK[device] (1M on a GPU bounds the temporaries to
# ~9 MB whatever the layer's size), and at most what keeps the chunk's temporaries (about
# _TEMP_BYTES an element at their peak: fp32 scaled values + int32 codes + uint8 codes) under
# half of the layer's dense bytes, so that quantizing while patching peaks near one dense layer
# above the result (a test holds the CPU peak to 1.25 dense layers). _MIN_CHUNK keeps small
# layers to a few chunks.
_CHUNK = {"cuda": 1 << 20, "cpu": 1 << 24}
_TEMP_BYTES = 9
_MIN_CHUNK = 1 << 16
_DEQUANT_CHUNK = 1 << 20

_code_cache: dict = {}


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values as fp32 on `device` (cached)."""
    key = ("nf4", torch.device(device or "cpu"))
    if key not in _code_cache:
        _code_cache[key] = torch.tensor(NF4_VALUES, dtype=torch.float32, device=key[1])
    return _code_cache[key]


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values in [-0.993, 1]).

    Seven exponent levels 10^-6 ... 10^0; at level i the linear fraction grid has 2^i + 1 points
    in [0.1, 1]; the code values are the fp32 midpoints of consecutive grid points times
    +-10^(i-6) (the product taken in fp32), plus 0 and 1.
    """
    key = ("dynamic", torch.device(device or "cpu"))
    if key not in _code_cache:
        values = []
        for i in range(7):
            grid = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
            mids = (grid[:-1] + grid[1:]) / 2.0
            scale = torch.tensor(10.0 ** (i - 6), dtype=torch.float32)
            values += (scale * mids).tolist() + (-scale * mids).tolist()
        values += [0.0, 1.0]
        _code_cache[key] = torch.tensor(sorted(values), dtype=torch.float32, device=key[1])
    return _code_cache[key]


def _pair_table(device) -> torch.Tensor:
    """(256, 2) fp32: byte -> (NF4 value of its high nibble, of its low nibble)."""
    key = ("nf4-pairs", torch.device(device))
    if key not in _code_cache:
        code = nf4_code(device)
        _code_cache[key] = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
    return _code_cache[key]


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2  # fp32, as bitsandbytes computes them


def _dynamic_lut(device) -> torch.Tensor:
    """The 65536-entry index -> code table of bitsandbytes' CPU 8-bit quantizer (int64)."""
    key = ("dynamic-lut", torch.device(device))
    if key not in _code_cache:
        # Built on the CPU: CUDA torch divides by a scalar as a multiply by its reciprocal, which
        # rounds differently from bitsandbytes' true division.
        i = torch.arange(65536, dtype=torch.float32)
        grid = -1.0 + (2.0 * i) / 65535.0  # fp32: exact product, rounded quotient, rounded sum
        _code_cache[key] = torch.bucketize(grid, _midpoints(dynamic_code()), right=False).to(device)
    return _code_cache[key]


@dataclass
class NF4Weight:
    """A 2-D weight stored as NF4 (bitsandbytes layout). All tensors live on one device.

    packed:  uint8 ((numel + 1) // 2, 1): two codes a byte, first element in the high nibble.
    absmax:  fp32 (blocks,) without double quantization; uint8 (blocks,) with it.
    shape:   (out_features, in_features) of the dense weight; dtype: its dtype (what
             `dequantize()` returns by default and what bitsandbytes records).
    nested_absmax: fp32 (ceil(blocks / 256),); nested_code: fp32 (256,); offset: fp32 scalar
             tensor; all None without double quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device}, {self.bits_per_param():.3f} bits/param)")

    # -- basic properties ----------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized storage (codes + statistics; the shared 16/256-entry maps excluded)."""
        n = self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            n += self.nested_absmax.numel() * 4 + 4
        return n

    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def to(self, device) -> "NF4Weight":
        """The same weight on `device` (no dtype change is possible: the storage is the format)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code),
                       offset=move(self.offset))

    def tensors(self) -> dict:
        return {k: getattr(self, k) for k in ("packed", "absmax", "nested_absmax", "nested_code", "offset")
                if getattr(self, k) is not None}

    # -- decoding ------------------------------------------------------------------------------
    def block_absmax(self) -> torch.Tensor:
        """fp32 (blocks,) absmax, the nested statistics decoded (two fp32 roundings, no FMA)."""
        if not self.double_quant:
            return self.absmax.float()
        scale = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        decoded = self.nested_code[self.absmax.long()] * scale  # rounded once
        return decoded + self.offset  # rounded twice

    def codes(self) -> torch.Tensor:
        """uint8 (numel,) code indices in element order."""
        flat = self.packed.reshape(-1)
        return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: self.numel]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (default: the original dtype); each value is
        fp32(NF4 * absmax) rounded once to dtype, bit-identical to bitsandbytes. On the CPU the
        native library decodes it in one pass (`lowrank_cpu_nf4_dequantize`); without it, and on
        other devices, `dequantize_torch`."""
        dtype = dtype or self.dtype
        check_dtype(dtype, "NF4Weight.dequantize")
        if self.device.type == "cpu":
            lib = native.for_device(self.device)
            if lib is not None:
                return self._dequantize_native(lib, dtype)
        return self.dequantize_torch(dtype)

    def _native_args(self) -> tuple[list, tuple]:
        """(the storage arguments of the native NF4 entry points, the tensors that must outlive the call)."""
        packed, absmax = self.packed.contiguous(), self.absmax.contiguous()
        code = nf4_code(self.device)
        dq = self.double_quant
        nested = self.nested_absmax.contiguous() if dq else None
        nested_code = self.nested_code.contiguous().float() if dq else None
        args = [packed.data_ptr(), absmax.data_ptr(), int(dq), nested.data_ptr() if dq else None,
                nested_code.data_ptr() if dq else None, float(self.offset) if dq else 0.0, code.data_ptr()]
        return args, (packed, absmax, code, nested, nested_code)

    def _dequantize_native(self, lib, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype)
        args, _keep = self._native_args()
        status = lib.lowrank_cpu_nf4_dequantize(*args, self.numel, self.blocksize, self.nested_blocksize,
                                                out.data_ptr(), native.dtype_code(dtype))
        native.check(status, "NF4Weight.dequantize")
        return out

    def decode_tile_native(self, rows: tuple[int, int], cols: tuple[int, int], out: torch.Tensor) -> bool:
        """Decode W[rows[0]:rows[1], cols[0]:cols[1]] into `out` (that shape, x dtype, unit column
        stride; any row stride), bit-identical to the same elements of `dequantize(out.dtype)`, with
        the native CPU library. False (nothing written) when that path does not apply: not on the
        CPU, no native library (or LOWRANK_NO_NATIVE=1), or K or the column range not in whole
        blocks. The QLoRA op decodes cache-sized tiles with it."""
        n, k = self.shape
        (r0, r1), (c0, c1) = rows, cols
        bs = self.blocksize
        if self.device.type != "cpu" or k % bs or c0 % bs or c1 % bs:
            return False
        lib = native.for_device(self.device)
        if lib is None:
            return False
        if not (0 <= r0 <= r1 <= n and 0 <= c0 <= c1 <= k):
            raise ValueError(f"NF4Weight.decode_tile_native: rows {rows} / cols {cols} outside the weight "
                             f"{tuple(self.shape)}")
        if (out.device.type != "cpu" or tuple(out.shape) != (r1 - r0, c1 - c0) or
                (out.numel() and (out.stride(1) != 1 or out.stride(0) < c1 - c0))):
            raise ValueError(f"NF4Weight.decode_tile_native: out must be a CPU ({r1 - r0}, {c1 - c0}) tensor with "
                             f"unit column stride, got {tuple(out.shape)} strides {out.stride()} on {out.device}")
        if out.numel() == 0:
            return True
        args, _keep = self._native_args()
        status = lib.lowrank_cpu_nf4_decode_tile(*args, n, k, bs, self.nested_blocksize, r0, r1, c0, c1,
                                                 out.data_ptr(), max(out.stride(0), 1), native.dtype_code(out.dtype))
        native.check(status, "NF4Weight.decode_tile_native")
        return True

    def matmul_native(self, x2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """fp32 (M, N) = x2 (M, K) @ deq(W).T, the weight decoded and multiplied in one pass by the
        native CPU library (`lowrank_cpu_nf4_matmul`: the 4-bit weight read once, each value rounded
        to x2's dtype as `dequantize(x2.dtype)` would hold it, products summed in fp32). None when
        that path does not apply: not on the CPU, no native library (or LOWRANK_NO_NATIVE=1), K not
        a multiple of the blocksize. `out`: an optional fp32 (M, N) contiguous buffer to write."""
        n, k = self.shape
        if self.device.type != "cpu" or x2.device.type != "cpu" or k % self.blocksize != 0:
            return None
        lib = native.for_device(self.device)
        if lib is None:
            return None
        check_dtype(x2.dtype, "NF4Weight.matmul_native", "x dtype")
        if x2.dim() != 2 or x2.shape[1] != k:
            raise ValueError(f"NF4Weight.matmul_native: x must be (M, {k}) for the NF4 weight {tuple(self.shape)}, "
                             f"got {tuple(x2.shape)}")
        x2 = x2.contiguous()
        m = x2.shape[0]
        if out is None:
            out = torch.empty((m, n), dtype=torch.float32)
        elif out.dtype != torch.float32 or tuple(out.shape) != (m, n) or not out.is_contiguous():
            raise ValueError(f"NF4Weight.matmul_native: out must be a contiguous float32 ({m}, {n}) tensor, got "
                             f"{out.dtype} {tuple(out.shape)}")
        if out.numel() == 0 or k == 0:
            return out.zero_()
        args, _keep = self._native_args()
        status = lib.lowrank_cpu_nf4_matmul(x2.data_ptr(), m, *args, n, k, self.blocksize, self.nested_blocksize,
                                            out.data_ptr(), native.dtype_code(x2.dtype))
        native.check(status, "NF4Weight.matmul_native")
        return out

    def dequantize_torch(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`dequantize` in torch operations only (any device; the CPU fallback and the native
        decode's twin in the tests)."""
        dtype = dtype or self.dtype
        check_dtype(dtype, "NF4Weight.dequantize")
        n, bs = self.numel, self.blocksize
        absmax = self.block_absmax()
        table = _pair_table(self.device)
        flat_packed = self.packed.view(-1)
        out = torch.empty(n, dtype=dtype, device=self.device)
        # Chunks of whole blocks keep the fp32 temporaries small and reused (one pass over a large
        # weight would allocate fresh pages for every call, which is far slower on the CPU).
        step = max(_DEQUANT_CHUNK // bs, 1) * bs
        for start in range(0, n, step):
            stop = min(start + step, n)
            # one gather of a (hi, lo) value pair per byte, not two nibble unpacks
            vals = torch.index_select(table, 0, flat_packed[start // 2: (stop + 1) // 2].int()).view(-1)
            vals = vals[: stop - start]
            full = ((stop - start) // bs) * bs
            b0 = start // bs
            chunk = torch.empty(stop - start, dtype=torch.float32, device=self.device)
            chunk[:full] = (vals[:full].view(-1, bs) * absmax[b0: b0 + full // bs, None]).view(-1)
            if full < stop - start:  # the trailing partial block of the whole weight
                chunk[full:] = vals[full:] * absmax[-1]
            out[start:stop] = chunk  # the one rounding to dtype
        return out.view(self.shape)

    # -- bitsandbytes interchange --------------------------------------------------------------
    def quant_state_dict(self) -> dict:
        """The JSON-able part of bitsandbytes' QuantState.as_dict(packed=True)."""
        d = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
             "shape": list(self.shape)}
        if self.double_quant:
            d.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                      "nested_offset": float(self.offset.item())})
        return d

    def to_bnb_state_dict(self, prefix: str = "") -> dict:
        """The tensors `bnb.nn.Linear4bit.state_dict()` writes for its weight (bias excluded):
        `weight`, `weight.absmax`, `weight.quant_map`, and with double quantization
        `weight.nested_absmax`, `weight.nested_quant_map`; plus `weight.quant_state.bitsandbytes__nf4`
        (the JSON of blocksize/dtype/shape/offset as uint8 bytes)."""
        p = prefix + "weight"
        out = {p: self.packed, p + ".absmax": self.absmax, p + ".quant_map": nf4_code(self.device).clone()}
        if self.double_quant:
            out[p + ".nested_absmax"] = self.nested_absmax
            out[p + ".nested_quant_map"] = self.nested_code.clone()
        meta = json.dumps(self.quant_state_dict()).encode("utf-8")
        out[p + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(meta), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb(cls, source, prefix: str = "") -> "NF4Weight":
        """Adopt bitsandbytes' storage without re-quantizing (tensors are shared, not copied).

        source: a `bnb.nn.Linear4bit` (or its `Params4bit` weight) quantized with nf4, or a state
        dict with the keys `to_bnb_state_dict` writes (after `prefix`).
        """
        if isinstance(source, dict):
            return cls._from_state_dict(source, prefix)
        weight = getattr(source, "weight", source)
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError(f"NF4Weight.from_bnb: {type(source).__name__} has no quant_state; move the "
                             f"bitsandbytes layer to a device first (that is when bitsandbytes quantizes)")
        if qs.quant_type != "nf4":
            raise ValueError(f"NF4Weight.from_bnb: quant_type {qs.quant_type!r} is not supported, only 'nf4'")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("NF4Weight.from_bnb: the layer holds bitsandbytes' CPU inference packing; "
                             "save it with state_dict() and pass that instead")
        packed = weight.data if isinstance(weight, torch.Tensor) else weight
        packed = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
        kw = {}
        if qs.nested:
            kw = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                      offset=torch.as_tensor(qs.offset, dtype=torch.float32), nested_blocksize=qs.state2.blocksize)
        w = cls(packed=packed.reshape(-1, 1), absmax=qs.absmax, shape=tuple(qs.shape), dtype=qs.dtype,
                blocksize=qs.blocksize, **kw)
        w.validate()
        return w

    @classmethod
    def _from_state_dict(cls, sd: dict, prefix: str) -> "NF4Weight":
        p = prefix + "weight"
        key = p + ".quant_state.bitsandbytes__nf4"
        if key not in sd:
            fp4 = p + ".quant_state.bitsandbytes__fp4"
            if fp4 in sd:
                raise ValueError("NF4Weight.from_bnb: the state dict holds an fp4 weight; only nf4 is supported")
            raise ValueError(f"NF4Weight.from_bnb: missing key {key!r} (keys: {sorted(sd)[:8]})")
        meta = json.loads(bytes(sd[key].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        if meta.get("quant_type", "nf4") != "nf4":
            raise ValueError(f"NF4Weight.from_bnb: quant_type {meta.get('quant_type')!r} is not supported")
        packed = sd[p]
        packed = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
        kw = {}
        if p + ".nested_absmax" in sd:
            device = packed.device
            kw = dict(nested_absmax=sd[p + ".nested_absmax"], nested_code=sd[p + ".nested_quant_map"],
                      offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device),
                      nested_blocksize=int(meta["nested_blocksize"]))
        w = cls(packed=packed.reshape(-1, 1), absmax=sd[p + ".absmax"], shape=tuple(meta["shape"]),
                dtype=getattr(torch, meta["dtype"]), blocksize=int(meta["blocksize"]), **kw)
        if p + ".quant_map" in sd and not torch.equal(sd[p + ".quant_map"].cpu().float(), nf4_code()):
            raise ValueError("NF4Weight.from_bnb: weight.quant_map is not the NF4 table")
        w.validate()
        return w

    def validate(self) -> None:
        """ValueError if the tensors do not fit the format and shape."""
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight: shape must be 2-D (out_features, in_features), got {self.shape}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4Weight: blocksize {self.blocksize} is not one of {BLOCKSIZES}")
        blocks = -(-self.numel // self.blocksize)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(f"NF4Weight: packed must be uint8 with {(self.numel + 1) // 2} bytes for shape "
                             f"{self.shape}, got {self.packed.dtype} with {self.packed.numel()}")
        if self.absmax.numel() != blocks:
            raise ValueError(f"NF4Weight: absmax must have {blocks} entries for shape {self.shape} and blocksize "
                             f"{self.blocksize}, got {self.absmax.numel()}")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8 or self.nested_code is None or self.offset is None:
                raise ValueError("NF4Weight: double quantization needs uint8 absmax, nested_code and offset")
            if self.nested_absmax.numel() != -(-blocks // self.nested_blocksize) or self.nested_code.numel() != 256:
                raise ValueError(f"NF4Weight: nested_absmax must have {-(-blocks // self.nested_blocksize)} entries "
                                 f"and nested_code 256, got {self.nested_absmax.numel()} and "
                                 f"{self.nested_code.numel()}")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"NF4Weight: absmax must be float32 without double quantization, got {self.absmax.dtype}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raise_not_finite(weight: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{where}: the weight of shape {tuple(weight.shape)} holds {int(bad.sum())} NaN/Inf "
                         f"value(s) (first at {idx}: {weight[idx].item()}); NF4 cannot represent them")


def _quantize_4bit_chunk(flat: torch.Tensor, blocksize: int, bounds: torch.Tensor):
    """(codes uint8, absmax fp32) of a 1-D chunk whose length is a multiple of blocksize except
    possibly for the last chunk."""
    x = flat.float()  # flat itself when it is fp32: never written to
    n = x.numel()
    full = (n // blocksize) * blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).view(-1)  # one fp32 temporary
    if full < n:
        tail_max = x[full:].abs().max()
        tail = torch.clamp(x[full:] / tail_max.clamp(min=1e-38), -1, 1)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, tail])
    del x, blocks  # the fp32 copy of a low-precision chunk is not needed for the codes
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


def _quantize_dynamic(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """bitsandbytes' CPU 8-bit blockwise quantizer (see `# Note: nested quantization`):
    (codes uint8 (n,), absmax fp32 (blocks,))."""
    n = values.numel()
    pad = (-n) % blocksize
    x = torch.nn.functional.pad(values.float(), (0, pad)).view(-1, blocksize)
    absmax = x.abs().amax(dim=1)
    zero = absmax == 0
    scaled = torch.clamp(x * (1.0 / torch.where(zero, torch.ones_like(absmax), absmax))[:, None], -1, 1)
    # A subnormal absmax has an infinite fp32 reciprocal: values become +-Inf (clamped to +-1) and
    # zeros become NaN, which bitsandbytes' CPU quantizer turns into code 0, as index 0 does here.
    scaled = torch.nan_to_num(scaled, nan=-1.0)
    index = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)  # fp32 ops, then truncation
    codes = _dynamic_lut(values.device)[index].to(torch.uint8)
    codes[zero] = 0
    return codes.view(-1)[:n], absmax


@torch.no_grad()
def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of a `numel`-element NF4 weight's storage, as `NF4Weight.nbytes` counts them (codes,
    block statistics, nested statistics and offset; the shared 16/256-entry maps excluded), without
    quantizing anything: ceil(n/2) + blocks (uint8 absmax) + 4*ceil(blocks/256) + 4 with double
    quantization, ceil(n/2) + 4*blocks without."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4_nbytes: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if numel < 1:
        raise ValueError(f"nf4_nbytes: numel must be >= 1, got {numel}")
    blocks = -(-numel // blocksize)
    if not double_quant:
        return (numel + 1) // 2 + 4 * blocks
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D (out_features, in_features) weight to NF4, byte-identical to
    `bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type="nf4")` (bitsandbytes' CPU backend for CPU tensors).

    Works in chunks of whole blocks whose temporaries stay under half the layer's dense bytes
    (and 1M elements on a GPU, 16M on the CPU).
    Raises ValueError for NaN/Inf, a bad blocksize or shape; TypeError for a non-float dtype.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_nf4: weight must be a torch.Tensor, got {type(weight).__name__}")
    check_dtype(weight.dtype, "quantize_nf4", "weight dtype")
    if weight.dim() != 2:
        raise ValueError(f"quantize_nf4: weight must be 2-D (out_features, in_features), "
                         f"got shape {tuple(weight.shape)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.numel() == 0:
        raise ValueError(f"quantize_nf4: weight of shape {tuple(weight.shape)} is empty")
    flat = weight.contiguous().view(-1)
    n = flat.numel()
    bounds = _midpoints(nf4_code(weight.device))
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    step = _chunk_step(weight, blocksize)
    for start in range(0, n, step):
        codes, am = _quantize_4bit_chunk(flat[start:start + step], blocksize, bounds)
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), 7)])  # bucketize(0) = 7: the padded zero
        packed[start // 2: start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
        absmax[start // blocksize: start // blocksize + am.numel()] = am
    if not bool(torch.isfinite(absmax).all()):  # a NaN/Inf element makes its block's absmax NaN/Inf
        _raise_not_finite(weight, "quantize_nf4")
    out = NF4Weight(packed=packed.view(-1, 1), absmax=absmax, shape=tuple(weight.shape), dtype=weight.dtype,
                    blocksize=blocksize)
    if double_quant:
        qabsmax, nested, offset = _double_quant(absmax, "quantize_nf4", weight)
        out = replace(out, absmax=qabsmax, nested_absmax=nested, nested_code=dynamic_code(weight.device).clone(),
                      offset=offset)
    return out


def _chunk_step(weight: torch.Tensor, blocksize: int) -> int:
    """Elements per chunk of a pass over `weight` (a multiple of blocksize, hence even): temporaries
    under half the layer's dense bytes, and at most _CHUNK[device]."""
    cap = _CHUNK.get(weight.device.type, _CHUNK["cuda"])
    chunk = min(cap, max(_MIN_CHUNK, weight.numel() * weight.element_size() // (2 * _TEMP_BYTES)))
    return max(chunk // blocksize, 1) * blocksize


def _double_quant(absmax: torch.Tensor, where: str, weight: torch.Tensor):
    """(uint8 codes, nested absmax, offset) of bitsandbytes' double quantization of the fp32 block
    maxima. ValueError where its statistics are not finite: the mean of block maxima near float32's
    largest value overflows (bitsandbytes then stores an Inf offset and decodes NaN weights), and a
    decoded maximum may round past it."""
    offset = absmax.mean()
    qabsmax, nested = _quantize_dynamic(absmax - offset)
    decoded = dynamic_code(absmax.device)[qabsmax.long()] * nested.repeat_interleave(NESTED_BLOCKSIZE)[: absmax.numel()]
    if not bool(torch.isfinite(offset) & torch.isfinite(decoded + offset).all()):
        raise ValueError(f"{where}: the weight of shape {tuple(weight.shape)} has block maxima up to "
                         f"{absmax.max().item():.3g}, too close to float32's largest value for double "
                         f"quantization (their mean or a decoded maximum overflows to Inf); quantize it "
                         f"with double_quant=False")
    return qabsmax, nested, offset


@torch.no_grad()
def check_quantizable(weight: torch.Tensor, blocksize: int, double_quant: bool, where: str) -> None:
    """ValueError, naming `where`, unless `quantize_nf4(weight, blocksize, double_quant)` would
    succeed: every element finite, and the double-quantization statistics too. A pass over the
    weight in chunks, without codes: what `patch_linear(quantize="nf4")` runs on every layer before
    it swaps the first one."""
    flat = weight.detach().contiguous().view(-1)
    n = flat.numel()
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    step = _chunk_step(weight, blocksize)
    for start in range(0, n, step):
        x = flat[start:start + step]
        full = (x.numel() // blocksize) * blocksize
        b0 = start // blocksize
        absmax[b0: b0 + full // blocksize] = x[:full].view(-1, blocksize).abs().amax(dim=1).float()
        if full < x.numel():
            absmax[-1] = x[full:].abs().max().float()
    if not bool(torch.isfinite(absmax).all()):  # NaN / Inf anywhere make their block's maximum so
        _raise_not_finite(weight, where)
    if double_quant:
        _double_quant(absmax, where, weight)
