"""A transformers model directory's safetensors files, read one tensor or one shard at a time. Level 0.

    ckpt = Checkpoint(directory)         # headers only: which key lives in which file, shapes, dtypes
    ckpt.shape("model.layers.0.self_attn.q_proj.weight")
    w = ckpt.tensor("model.layers.0.self_attn.q_proj.weight")
    keys = ckpt.resolve(["model.layers.0.self_attn.q_proj"])   # adapter module paths -> weight keys

The weights are `model.safetensors`, or the shards a `model.safetensors.index.json` names. Nothing
is loaded until asked for: the headers give every key's shape and dtype.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from .nf4_format import NF4Weight

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# The keys bitsandbytes stores beside a 4-bit `<path>.weight` (transformers' save_pretrained).
NF4_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")

# safetensors' dtype names (the header's) -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    """The safetensors weights of a transformers model directory: `files` (in the index's order, or
    the one file), `key_file` (key -> file name), `config` (config.json). FileNotFoundError for a
    directory without config.json or safetensors weights (a pickled pytorch_model.bin is refused:
    loading it can run code); ValueError for an index naming missing files or keys not in them."""

    def __init__(self, directory: str | os.PathLike, where: str = "checkpoint"):
        self.directory = os.fspath(directory)
        d = self.directory
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{where}: {d!r} is not a directory")
        config_file = os.path.join(d, CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{where}: no {CONFIG_NAME} in {d!r}: not a transformers model directory")
        try:
            with open(config_file, encoding="utf-8") as f:
                self.config = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: {config_file} is not valid JSON ({exc})") from None
        if not isinstance(self.config, dict):
            raise ValueError(f"{where}: {config_file} is not a JSON object")
        index_file = os.path.join(d, INDEX_NAME)
        self.index = None
        if os.path.isfile(index_file):
            with open(index_file, encoding="utf-8") as f:
                self.index = json.load(f)
            weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{where}: {index_file} has no weight_map")
            self.files = list(dict.fromkeys(weight_map.values()))
        elif os.path.isfile(os.path.join(d, SINGLE_NAME)):
            self.files = [SINGLE_NAME]
        else:
            pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                       if os.path.isfile(os.path.join(d, n))]
            extra = (f" (it has {pickled[0]}: pickle files can run code when loaded; convert the model to "
                     f"safetensors first, e.g. save_pretrained(..., safe_serialization=True))") if pickled else ""
            raise FileNotFoundError(f"{where}: no {SINGLE_NAME} or {INDEX_NAME} in {d!r}{extra}")
        self.key_file: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype | None] = {}
        self.file_bytes: dict[str, int] = {}
        for name in self.files:
            full = os.path.join(d, name)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{where}: {INDEX_NAME} names {name}, which is not in {d!r}")
            self.file_bytes[name] = os.path.getsize(full)
            try:
                with safe_open(full, framework="pt", device="cpu") as f:
                    for key in f.keys():
                        s = f.get_slice(key)
                        self.key_file[key] = name
                        self._shape[key] = tuple(s.get_shape())
                        self._dtype[key] = SAFETENSORS_DTYPES.get(s.get_dtype())
            except SafetensorError as exc:  # truncated, or not a safetensors file at all
                raise ValueError(f"{where}: {full!r} is not a readable safetensors file ({exc})") from None
        if self.index is not None:
            wrong = [k for k, v in self.index["weight_map"].items() if self.key_file.get(k) != v]
            if wrong:
                raise ValueError(f"{where}: {INDEX_NAME} places {wrong[0]} in {self.index['weight_map'][wrong[0]]}, "
                                 f"which does not hold it ({len(wrong)} such key(s))")

    def keys(self, name: str | None = None) -> list[str]:
        """Every key, or those of file `name`, in file order."""
        return [k for k, f in self.key_file.items() if name is None or f == name]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def dtype(self, key: str) -> torch.dtype | None:
        """The key's torch dtype (None for a safetensors dtype torch has no name for here)."""
        return self._dtype[key]

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from its file (the others stay on disk)."""
        with safe_open(os.path.join(self.directory, self.key_file[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def is_nf4(self, key: str) -> bool:
        """Whether `key` (a `.weight`) is a bitsandbytes 4-bit weight (its quant_state key exists)."""
        return key + ".quant_state.bitsandbytes__nf4" in self.key_file

    def nf4_weight(self, key: str, loaded: dict | None = None) -> NF4Weight:
        """The bitsandbytes NF4 weight stored under `key` and its statistics keys, taken from `loaded`
        (a shard already in memory) where there, else read from their files (they may lie in
        another shard). ValueError for fp4 or malformed statistics (`NF4Weight.from_bnb`)."""
        sd = {}
        for suffix in ("",) + NF4_SUFFIXES:
            k = key + suffix
            if loaded is not None and k in loaded:
                sd[k] = loaded[k]
            elif k in self.key_file:
                sd[k] = self.tensor(k)
        return NF4Weight.from_bnb(sd, key[: -len("weight")])

    def resolve(self, paths: list[str], where: str = "checkpoint") -> dict[str, str]:
        """{module path: the checkpoint key of its `.weight`} for module paths as an adapter names
        them (`model.layers.0.self_attn.q_proj`). The checkpoint may name modules with a prefix more
        (an adapter made on the bare `LlamaModel`, a checkpoint of `LlamaForCausalLM`) or one less
        (a GPT-2 checkpoint without `transformer.`): one prefix rule that finds every path is chosen,
        the identity first. ValueError naming the paths no rule finds, or when two rules do."""
        weights = [k[: -len(".weight")] for k in self.key_file if k.endswith(".weight")]
        rules = None
        for p in paths:
            found = set()
            for q in weights:
                if q == p:
                    found.add(("add", ""))
                elif q.endswith("." + p):
                    found.add(("add", q[: len(q) - len(p)]))
                elif p.endswith("." + q):
                    found.add(("strip", p[: len(p) - len(q)]))
            rules = found if rules is None else rules & found
            if not rules:
                raise ValueError(f"{where}: no weight for adapter layer {p} in {self.directory!r} (looked for "
                                 f"{p}.weight, also with a prefix added or removed): the adapter does not fit this "
                                 f"model, or the weight is tied to another and not stored")
        if not paths:
            return {}
        rule = ("add", "") if ("add", "") in rules else (min(rules) if len(rules) == 1 else None)
        if rule is None:
            raise ValueError(f"{where}: the adapter's layer paths fit the checkpoint's keys in several ways "
                             f"({sorted(rules)}); cannot tell which weights it belongs to")
        kind, prefix = rule
        return {p: (prefix + p if kind == "add" else p[len(prefix):]) + ".weight" for p in paths}
