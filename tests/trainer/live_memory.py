"""Peak bytes of live tensors on the CPU, counted at the dispatcher: what a GPU's allocator would have to hold
(torch.cuda.max_memory_allocated's counterpart), without the allocator's caching, fragmentation or context."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Within the mode: every storage an op creates counts from its creation until it is freed. Storages that
    existed before (a module's parameters and buffers, given to `existing`) are never counted again, so a view
    of a weight is not a new allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def existing(self, module: torch.nn.Module) -> int:
        """Marks the module's storages as already there; returns their bytes (each storage once)."""
        total = 0
        for t in list(module.parameters()) + list(module.buffers()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._sizes:
                self._sizes[storage.data_ptr()] = 0
                total += storage.nbytes()
        return total

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self._sizes or size == 0:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        if self._sizes.get(key) == size:
            del self._sizes[key]
            self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._count(t)
        return out
