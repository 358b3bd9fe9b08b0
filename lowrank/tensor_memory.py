"""Peak tensor memory on any device, the CPU included: what `torch.cuda.max_memory_allocated`
measures on a GPU, for code that runs on the CPU.

`TensorMemory` is a `TorchDispatchMode`: every tensor an operator returns (in forward, in the
autograd backward run on this thread, in the optimizer) has its storage recorded with its size
and a weak reference; after each operator the storages that died are dropped and the live total
is compared with the peak. Storages that exist before the mode is entered are counted when passed
in `start_with` (the model's parameters, their gradients and buffers, the optimizer's state), so the peak is
absolute, not a delta. Temporaries an operator allocates and frees inside itself are not seen
(the GPU allocator would see them), and neither are allocations outside torch's operators.

Level 0: imports only torch.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _tensors(objects) -> Iterable[torch.Tensor]:
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
            for m in obj.modules():  # tensors held outside parameters and buffers (an NF4Weight's codes)
                for v in vars(m).values():
                    if isinstance(v, torch.Tensor):
                        yield v
                    elif hasattr(v, "__dict__") and not isinstance(v, (torch.nn.Module, type)):
                        yield from (u for u in vars(v).values() if isinstance(u, torch.Tensor))
        elif isinstance(obj, Iterable):
            yield from _tensors(obj)
        else:
            raise TypeError(f"TensorMemory: start_with takes tensors, modules, optimizers or iterables of "
                            f"them, got {type(obj).__name__}")


class TensorMemory(TorchDispatchMode):
    """Track live tensor storage bytes while the context is active.

        with TensorMemory(start_with=[model, optimizer]) as mem:
            train_step()
        mem.peak_bytes, mem.current_bytes

    Only the thread that entered the mode is seen (like any dispatch mode)."""

    def __init__(self, start_with=()):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        for t in _tensors(start_with):
            self._add(t)
        self.start_bytes = self.current_bytes
        self.peak_bytes = self.current_bytes

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
            return
        key = storage._cdata
        known = self._live.get(key)
        if known is not None and not known[0].expired():
            return
        if known is not None:
            self.current_bytes -= known[1]
        n = storage.nbytes()
        self._live[key] = (StorageWeakRef(storage), n)
        self.current_bytes += n

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current_bytes -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Storages that died since the last operator are gone before this one allocated its
        # outputs; its inputs are alive (args holds them) and counted, as an allocator sees them.
        self._sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out
