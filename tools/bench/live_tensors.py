"""Live tensor memory inside a block, by storage (pure torch; benchmarks and the PnP math tests)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage allocated inside the mode (by storage, views counted once),
    and the largest single allocation: measured allocations, not time."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.largest = {}, 0, 0, 0

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.live:
                    size = t.untyped_storage().nbytes()
                    self.live[ptr] = [size, 0]
                    self.now += size
                    self.peak = max(self.peak, self.now)
                    self.largest = max(self.largest, size)
                self.live[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out
