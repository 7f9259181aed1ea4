"""Determinism: one seed for Python's ``random``, NumPy and torch."""
from __future__ import annotations

import random

import numpy as np
import torch

MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed


def seed_everything(seed: int) -> torch.Generator:
    """Seed ``random``, ``numpy.random`` and torch (CPU and CUDA); return a fresh CPU generator.

    The same seed gives the same numbers on the same machine, torch build and thread count.

    Args:
        seed: an integer from 0 to 2**63 − 1 (numpy's global generator gets ``seed mod 2**32``).

    Returns:
        A new CPU ``torch.Generator`` seeded with ``seed`` (for explicit ``generator=`` draws).

    Raises:
        ValueError: ``seed`` is not an integer in that range (a bool is refused too).

    Example:
        >>> import torch
        >>> import neurothermo as nt
        >>> _ = nt.seed_everything(0)
        >>> a = torch.rand(2)
        >>> _ = nt.seed_everything(0)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (2**63 - 1), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the legacy global generator is what user code draws from)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
