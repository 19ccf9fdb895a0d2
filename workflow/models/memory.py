"""What a pass of a network holds at once at its fullest, counted on PyTorch's meta device (shapes, no
memory), so that a stage can refuse a batch over its cap before anything is allocated.

    with torch.inference_mode(), PeakBytes() as counter:
        meta_module(torch.zeros(batch, *shape, device="meta"))
    counter.peak   # bytes

No command of its own: workflow.models.builders (train, sample), workflow.models.latent (encode) and
workflow.models.inception (fid_reference, evaluate, fid_sweep) measure their passes with it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30


class PeakBytes(TorchDispatchMode):
    """Counts the bytes of each storage an op allocates (a view or an in-place result shares a storage
    already counted, or an input's) until the storage is freed, and keeps the largest total: what a
    forward pass holds at its fullest. Temporaries inside one kernel (its workspace) are not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.counted or key in inputs:
                continue
            nbytes = storage.nbytes()
            self.counted.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)  # storages outlive the tensors that view them
        return out


def peak_bytes(run) -> int:
    """The peak PeakBytes counts over `run()` without gradients; over meta tensors nothing is allocated."""
    with torch.inference_mode(), PeakBytes() as counter:
        run()
    return counter.peak
