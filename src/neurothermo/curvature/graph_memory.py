"""How much memory a kept autograd graph takes, and how much it may take.

``HessianOperator`` keeps the first-order graph of every microbatch (each product is then one backward
through it, as PyHessian does) only when ``microbatches × bytes of the first graph`` fits
``graph_budget``; otherwise each product rebuilds its microbatch's graph.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


def graph_budget(device: torch.device) -> int:
    """Bytes the kept first-order graphs may take: half the free memory of ``device`` (CUDA:
    ``mem_get_info``; CPU: available physical pages; 0 where it cannot be read, so no reuse)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) // 2
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        except (ValueError, OSError, AttributeError):
            return 0
    return 0


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Count the bytes of the distinct storages an autograd graph saves (parameters excluded: they
    exist anyway): the memory kept alive by holding on to that graph."""

    def __init__(self, params: list[Tensor]) -> None:
        self.bytes = 0
        seen = {p.untyped_storage().data_ptr() for p in params}

        def pack(t: Tensor) -> Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                self.bytes += t.untyped_storage().nbytes()
            return t

        super().__init__(pack, lambda t: t)
