"""Large CPU buffers whose first touch is paid in 2 MiB pages (transparent huge pages).

A Krylov solver writes one new basis vector of ``n`` numbers per product. On the CPU the first
write to freshly allocated memory is a page fault per 4 KiB page in which the kernel maps and
zeroes the page: for an 11-million-parameter model (a 45 MB vector) that is 11 k faults, measured
15–20 ms of system time per vector, 10–14 % of a Hessian-vector product on ResNet-18. Asking the
kernel for transparent huge pages on the buffer (``madvise(MADV_HUGEPAGE)``, which Linux honours
where ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``) maps the same
memory in 2 MiB pages: 512 times fewer faults, the zeroing alone remains (measured 1–4 ms per
45 MB vector when the memory was in use recently).

Except under a hypervisor that takes free memory back (free page reporting: a ``virtio_balloon``
device with ``VIRTIO_BALLOON_F_REPORTING``, as Firecracker and QEMU offer, or Hyper-V's
``hv_balloon``, as WSL2 uses). The guest kernel reports free blocks of 2 MiB and more to the host,
which unmaps them; a huge page is cut from exactly such blocks, so its first touch faults on the
host too, 4 KiB at a time, while 4 KiB pages come from smaller, still-mapped free blocks. Measured
on such a VM (Firecracker, 11.2 M floats, CPU time per 45 MB column): 4 KiB pages 15–20 ms; huge
pages 1–3 ms when reused within a second of being freed, but 80–140 ms on their first use in a
process and 12–44 ms after 1–6 s idle (the reporting delay is 2 s). So there the huge-page path
would cost up to 7× more and ``use_huge_pages()`` is False (``free_pages_reported``). Where
the kernel has no free huge page at hand, ``/sys/kernel/mm/transparent_hugepage/defrag`` set to
``madvise`` (a common default) makes the fault compact memory first, which can also cost more than
4 KiB pages on a long-running, fragmented host. Since no host without free page reporting has been
measured, the huge-page path is **opt-in**: ``NEUROTHERMO_HUGE_PAGES=1`` turns it on (with a
``ResourceWarning`` under free page reporting, where it was measured to cost more); unset or ``0``
it is off and every buffer comes from torch's allocator.

``empty_large`` returns such a buffer as an ordinary tensor where it can (a CPU tensor of at least
``MIN_BYTES`` when ``use_huge_pages()``), and ``torch.empty`` / ``torch.zeros`` otherwise (every
accelerator: their own caching allocators are already fast). The memory is a private anonymous
mapping held by the tensor's storage (through ``torch.frombuffer``) and unmapped when the last
tensor using it dies. Anonymous memory starts zeroed, so ``zero=True`` costs nothing extra on that
path.
"""
from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20  # 2 MiB: the transparent huge page size on x86-64 and arm64 (4 KiB base pages)

# Below this size a buffer is left to torch's allocator: a few huge pages would save little, and
# rounding up to whole huge pages would waste up to half of a small buffer.
MIN_BYTES = 8 << 20


VIRTIO_BALLOON_F_REPORTING = 5  # feature bit of a virtio balloon that takes free pages back


def huge_pages_available() -> bool:
    """Whether transparent huge pages can be asked for here (Linux, ``mmap.MADV_HUGEPAGE``)."""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


@functools.lru_cache(maxsize=1)
def free_pages_reported(sysfs: str = "/sys") -> bool:
    """Whether this Linux kernel hands free memory back to a hypervisor (free page reporting), read
    once from sysfs: page reporting built in, and a bound virtio balloon offering
    ``VIRTIO_BALLOON_F_REPORTING`` or a bound Hyper-V balloon. Cold huge pages cost more than
    4 KiB pages there (module docstring). False where sysfs says nothing (not Linux, or no balloon).
    """
    root = Path(sysfs)
    if not (root / "module/page_reporting").exists():
        return False
    for features in (root / "bus/virtio/drivers/virtio_balloon").glob("virtio*/features"):
        try:
            bits = features.read_text().strip()
        except OSError:
            continue
        if len(bits) > VIRTIO_BALLOON_F_REPORTING and bits[VIRTIO_BALLOON_F_REPORTING] == "1":
            return True
    hv = root / "bus/vmbus/drivers/hv_balloon"
    return hv.is_dir() and any(e.is_symlink() and e.name != "module" for e in hv.iterdir())


ENV = "NEUROTHERMO_HUGE_PAGES"  # "1": huge pages wherever available; "0" or unset: never


def use_huge_pages() -> bool:
    """Whether ``empty_large`` backs large CPU tensors with huge pages: only when the environment
    variable ``NEUROTHERMO_HUGE_PAGES`` is ``1`` and the platform has ``MADV_HUGEPAGE`` (opt-in:
    the gain is unmeasured where free pages stay with the guest, and measured negative where they
    are reported to a hypervisor, which is warned about). The setting changes only the cost of
    first writes, never a value.

    Raises:
        ValueError: ``NEUROTHERMO_HUGE_PAGES`` set to anything but ``0`` or ``1``.
    """
    choice = os.environ.get(ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise ValueError(f"{ENV}={choice!r}: use 1 (huge pages wherever available), 0 (never) or "
                         "leave it unset (automatic)")
    if choice != "1" or not huge_pages_available():
        return False
    if free_pages_reported():
        warnings.warn(f"{ENV}=1 under free page reporting (a hypervisor takes free memory back): "
                      "huge pages were measured to cost 1-7x more per first write there than 4 KiB "
                      f"pages; unset {ENV} to use torch's allocator", ResourceWarning, stacklevel=3)
    return True


def empty_large(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, *,
                zero: bool = False) -> Tensor:
    """An uninitialised (``zero=False``) or zero-filled contiguous tensor of ``shape``, backed by
    2 MiB pages where that makes its first touch cheaper (module docstring).

    The huge-page path is taken for a CPU tensor of at least ``MIN_BYTES`` bytes when
    ``use_huge_pages()``; the mapping is rounded up to whole huge pages, its start aligned
    to one, and released when the tensor (and every view of it) is gone. If the kernel refuses the
    mapping or the advice, or on any other device, size or platform, the result is
    ``torch.empty`` / ``torch.zeros``: the values and every later computation are the same on
    both paths, only the cost of the first write differs.

    Args:
        shape: the tensor's shape (non-negative sizes).
        dtype: its dtype.
        device: its device; anything but the CPU goes to ``torch.empty`` / ``torch.zeros``.
        zero: fill with zeros (free on the huge-page path: anonymous memory starts zeroed).

    Returns:
        A contiguous tensor of ``shape``, ``dtype`` on ``device``.

    Raises:
        RuntimeError: from ``torch.empty`` (e.g. a negative size) on the fallback path.
        ValueError: ``NEUROTHERMO_HUGE_PAGES`` set to anything but ``0`` or ``1``.

    Example:
        >>> import torch
        >>> from neurothermo.curvature.huge_pages import empty_large
        >>> t = empty_large((3, 1 << 20), torch.float32, "cpu", zero=True)  # 12 MiB
        >>> t.shape, float(t.abs().sum()), t.is_contiguous()
        (torch.Size([3, 1048576]), 0.0, True)
    """
    device = torch.device(device)
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    fallback = torch.zeros if zero else torch.empty
    if device.type != "cpu" or nbytes < MIN_BYTES or not use_huge_pages():
        return fallback(shape, dtype=dtype, device=device)
    # whole huge pages, plus one so that the start can be aligned to a huge page whatever address
    # the kernel picks (Linux ≥ 6.7 aligns mappings of whole huge pages itself)
    length = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE + HUGE_PAGE
    try:
        # private: a shared anonymous mapping is shmem, whose huge pages follow another setting
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, OverflowError):
        return fallback(shape, dtype=dtype, device=device)
    # THP compiled out or disabled for this process: 4 KiB pages, still correct
    with contextlib.suppress(OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # holds ``buf`` until the storage dies
    skip = -raw.data_ptr() % HUGE_PAGE
    return raw[skip:skip + nbytes].view(dtype).view(shape)
