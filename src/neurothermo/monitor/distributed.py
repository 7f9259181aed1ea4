"""The monitor under ``torch.distributed``: DistributedDataParallel and FSDP2 (``fully_shard``).

Each rank holds its own ``b`` samples of a global batch of ``B = W·b`` (``W`` ranks, equal local
batch sizes, as ``DistributedSampler`` gives). What the monitor reads and how it becomes the
column a single process gives on the global batch:

* ``p.grad`` after DDP's backward is already the all-reduced mean ``g_B = (1/W) Σ_r g_r`` of the
  ranks' mean-loss gradients, which with equal ``b`` is the gradient of the mean loss over the
  global batch. Layer and unit gradient energies, balance ratios and charges (from the parameters,
  identical on every rank) are therefore computed locally and need no communication.
* The batch size of the temperature ``lr/B`` is the global one, ``W·b``.
* The loss is the all-reduced mean of the ranks' mean losses (the global mean loss).
* Per-sample squared gradient norms ``‖g_i‖²`` (for ``Tr Σ`` and the entropic terms) belong to
  the rank that holds sample ``i``: they are gathered (rank order, as the global batch
  ``cat(batch_0, …, batch_{W−1})``) before the unbiased estimates are formed.
* Only rank 0 hands rows to the writer; every rank keeps the same history.

Under FSDP2 the parameters and gradients are ``DTensor`` shards: the squared sums the monitor
takes are assembled from the full tensors (``DTensor.full_tensor()``, one all-gather per tensor
per recorded step, as FSDP's own forward does), so the same columns come out; see docs/monitor.md.

The monitor's own extra passes (per-sample norms, sharpness) run on the module inside the DDP
wrapper, so they never start DDP's gradient all-reduce.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Dist:
    """The process group the monitor reduces over: ``rank`` of ``world`` ranks."""

    rank: int
    world: int
    group: Any = None

    def mean(self, t: Tensor) -> Tensor:
        """The mean of a tensor over the ranks (a copy; ``t`` is left as it was)."""
        import torch.distributed as dist

        out = t.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out / self.world

    def sizes(self, b: int, device: torch.device) -> list[int]:
        """Every rank's local batch size, in rank order."""
        import torch.distributed as dist

        mine = torch.tensor([b], dtype=torch.int64, device=device)
        out = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [int(s) for s in torch.cat(out).tolist()]

    def gather(self, v: Tensor, sizes: list[int]) -> Tensor:
        """``cat`` of every rank's vector ``v`` (lengths ``sizes``) in rank order."""
        import torch.distributed as dist

        m = max(sizes)
        padded = torch.zeros(m, dtype=v.dtype, device=v.device)
        padded[: v.numel()] = v.reshape(-1)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return torch.cat([o[:s] for o, s in zip(out, sizes)])


def unwrap(model: nn.Module) -> tuple[nn.Module, Dist | None]:
    """The module whose parameters the monitor reads, and the group to reduce over (or None).

    A ``DistributedDataParallel`` wrapper is removed (its ``.module`` is monitored, so column names
    are those of a single process); an FSDP2 model (``fully_shard``) is kept as it is. A model in
    a single process (no initialised process group, or a group of one) gives ``None``.

    Raises:
        ValueError: a ``DataParallel`` model (one process, several devices: its ``p.grad`` is
            already the global gradient, so pass ``model.module``).
    """
    if isinstance(model, nn.DataParallel):
        raise ValueError("ThermoMonitor on nn.DataParallel: pass model.module (the gradients it "
                         "leaves are already the global batch's); for several processes use "
                         "DistributedDataParallel")
    from torch.nn.parallel import DistributedDataParallel as DDP

    wrapped = isinstance(model, DDP)
    inner: nn.Module = model.module if wrapped else model  # type: ignore[assignment]
    sharded = is_sharded(inner)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return inner, None
    group: Any = None
    if wrapped:
        group = model.process_group
    elif not sharded:
        return inner, None  # a plain module in a process group: each rank monitors its own model
    world = dist.get_world_size(group)
    if world == 1:
        return inner, None
    return inner, Dist(rank=dist.get_rank(group), world=world, group=group)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a ``DTensor`` (FSDP2 ``fully_shard`` / tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def full(t: Tensor | None) -> Tensor | None:
    """The full (unsharded) tensor of a ``DTensor``, a plain tensor as it is."""
    if t is None:
        return None
    to_full = getattr(t, "full_tensor", None)
    return to_full() if callable(to_full) else t


def attach(monitor: Any) -> None:
    """Reduce over the default process group when a framework hands the monitor the unwrapped model.

    The Hugging Face Trainer and Lightning wrap the model in DDP themselves and give callbacks the
    inner module: a monitor built on it would record each rank's own half. With an initialised
    group of more than one rank this sets the monitor's reductions (as for a DDP model) and keeps
    the writer on rank 0 only. A monitor that already has them is left as it is.
    """
    monitor.reduce_across_ranks()


def default_group() -> Dist | None:
    """The reductions over the default process group, or None without one (or with one rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return None if world == 1 else Dist(rank=dist.get_rank(), world=world)


def full_tensors(tensors: Mapping[str, Tensor | None]) -> dict[str, Tensor | None]:
    """``{name: full tensor}`` of sharded ``DTensor`` parameters or gradients (FSDP2): one
    all-gather per tensor, every rank taking part in the same order."""
    return {n: full(t) for n, t in tensors.items()}


def check_sharded(symmetries: Any, noise_every: int | None, sharpness_every: int | None) -> None:
    """What the monitor supports on FSDP2-sharded models, with the way out for the rest.

    Raises:
        ValueError: ``symmetries="auto"`` (detection runs the model on plain tensors, which mixed
            with sharded parameters fails: detect on the model before ``fully_shard`` and pass
            the list), or noise terms / sharpness requested (their extra per-sample and Hessian
            passes read unsharded parameters).
    """
    if symmetries == "auto":
        raise ValueError(
            "ThermoMonitor on an FSDP2 (fully_shard) model cannot detect symmetries: run "
            "syms = nt.find_symmetries(model, example_inputs) before fully_shard and pass "
            "symmetries=syms (or symmetries=None)")
    if noise_every is not None or sharpness_every is not None:
        raise ValueError(
            "ThermoMonitor on an FSDP2 (fully_shard) model records gradient energies, balance and "
            "charges; the noise terms and sharpness need per-sample and Hessian passes over "
            "unsharded parameters: pass noise_every=None and sharpness_every=None (or monitor "
            "the model under DDP, where they are reduced across ranks)")
