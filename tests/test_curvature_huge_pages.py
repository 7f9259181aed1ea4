"""``huge_pages.empty_large``: large CPU buffers in 2 MiB pages, and the solvers that use them.

What is checked (no timing: speed is measured in ``benchmarks/bench_curvature_hvp.py``):
the fallback to ``torch.empty`` / ``torch.zeros`` wherever the huge-page path does not apply
(no ``MADV_HUGEPAGE``, free page reporting under a hypervisor, small sizes, other devices, a
refused mapping); the huge-page tensor itself (shape, dtype, zeros, alignment, writes); its memory
returned to the kernel when the last view dies (resident set size, Linux); and that the solvers give
bit-identical results on both paths, with ``EigenResult.vectors`` valid after the solve.
"""
from __future__ import annotations

import gc
import mmap
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import neurothermo as nt
from neurothermo.curvature import FunctionOperator, HessianOperator, hessian_operator, lanczos
from neurothermo.curvature import huge_pages as hp
from neurothermo.curvature.operator import column_block

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and MADV_HUGEPAGE: Linux")


class MmapSpy:
    """Counts ``mmap.mmap`` calls made by ``empty_large`` (and can make them fail)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail
        self.real = mmap.mmap

    def __call__(self, *args: object, **kwargs: object) -> mmap.mmap:
        self.calls += 1
        if self.fail:
            raise OSError(12, "Cannot allocate memory")
        return self.real(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> MmapSpy:
    s = MmapSpy()
    monkeypatch.setattr(hp.mmap, "mmap", s)
    return s


@pytest.fixture
def huge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The huge-page path for every size, whatever this machine's sysfs says."""
    if not hp.huge_pages_available():
        pytest.skip("no MADV_HUGEPAGE on this platform")
    monkeypatch.setattr(hp, "use_huge_pages", lambda: True)
    monkeypatch.setattr(hp, "MIN_BYTES", 0)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE


# -- the fallback -----------------------------------------------------------------------------------
def test_without_madv_hugepage_it_is_torch_empty(monkeypatch: pytest.MonkeyPatch, spy: MmapSpy) -> None:
    monkeypatch.delattr(hp.mmap, "MADV_HUGEPAGE", raising=False)
    monkeypatch.setattr(hp, "MIN_BYTES", 0)
    assert not hp.huge_pages_available() and not hp.use_huge_pages()
    t = hp.empty_large((3, 5), torch.float64, "cpu", zero=True)
    assert spy.calls == 0
    assert t.shape == (3, 5) and t.dtype == torch.float64 and t.is_contiguous()
    assert torch.equal(t, torch.zeros(3, 5, dtype=torch.float64))


def test_small_tensors_and_other_devices_use_torch_allocators(monkeypatch: pytest.MonkeyPatch,
                                                              spy: MmapSpy) -> None:
    monkeypatch.setattr(hp, "use_huge_pages", lambda: True)
    small = hp.empty_large((hp.MIN_BYTES // 4 - 1,), torch.float32, "cpu")
    assert small.numel() == hp.MIN_BYTES // 4 - 1
    meta = hp.empty_large((1 << 22,), torch.float32, "meta")  # 16 MiB, but not on the CPU
    assert meta.device.type == "meta" and meta.shape == (1 << 22,)
    if torch.cuda.is_available():
        cuda = hp.empty_large((1 << 22,), torch.float32, "cuda", zero=True)
        assert cuda.device.type == "cuda" and float(cuda.abs().sum()) == 0.0
    assert spy.calls == 0


def test_a_refused_mapping_falls_back(monkeypatch: pytest.MonkeyPatch, huge: None) -> None:
    monkeypatch.setattr(hp.mmap, "mmap", MmapSpy(fail=True))
    t = hp.empty_large((4, 7), torch.float32, "cpu", zero=True)
    assert t.shape == (4, 7) and torch.equal(t, torch.zeros(4, 7))


def test_refused_advice_keeps_a_correct_buffer(monkeypatch: pytest.MonkeyPatch, huge: None,
                                               spy: MmapSpy) -> None:
    monkeypatch.setattr(hp.mmap, "MADV_HUGEPAGE", -1)  # an advice the kernel rejects (EINVAL)
    t = hp.empty_large((2, 1000), torch.float32, "cpu", zero=True)
    assert spy.calls == 1 and torch.equal(t, torch.zeros(2, 1000))  # the mapping, 4 KiB pages
    t[1] = 3.0
    assert float(t.sum()) == 3000.0


# -- free page reporting (read from a fake sysfs) --------------------------------------------------
def fake_sysfs(root: Path, *, reporting: bool = True, virtio: str | None = None,
               hv: tuple[str, ...] = ()) -> str:
    if reporting:
        (root / "module/page_reporting/parameters").mkdir(parents=True)
    if virtio is not None:
        dev = root / "bus/virtio/drivers/virtio_balloon/virtio0"
        dev.mkdir(parents=True)
        (dev / "features").write_text(virtio + "\n")
    if hv:
        drv = root / "bus/vmbus/drivers/hv_balloon"
        drv.mkdir(parents=True)
        (root / "target").mkdir(exist_ok=True)
        for name in hv:
            (drv / name).symlink_to(root / "target")
    return str(root)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"virtio": "0110010" + "0" * 57}, True),  # bit 5 = VIRTIO_BALLOON_F_REPORTING
    ({"virtio": "0110000" + "0" * 57}, False),  # a balloon without reporting
    ({"virtio": "0110010", "reporting": False}, False),  # kernel without page reporting
    ({"hv": ("9527e630-d0ae-497b-adce-e80ab0175caf",)}, True),  # a bound Hyper-V balloon
    ({"hv": ("module",)}, False),  # the driver's module link only: no device bound
    ({}, False),
])
def test_free_page_reporting_is_read_from_sysfs(tmp_path: Path, kwargs: dict[str, object],
                                               expected: bool) -> None:
    root = fake_sysfs(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert hp.free_pages_reported.__wrapped__(root) is expected


def test_huge_pages_are_opt_in(monkeypatch: pytest.MonkeyPatch, spy: MmapSpy) -> None:
    # unset: torch's allocator, whatever the platform offers (no host without free page
    # reporting was measured, so the huge-page path is not the default anywhere)
    monkeypatch.delenv(hp.ENV, raising=False)
    monkeypatch.setattr(hp, "free_pages_reported", lambda: False)
    monkeypatch.setattr(hp, "MIN_BYTES", 0)
    assert not hp.use_huge_pages()
    hp.empty_large((8, 8), torch.float32, "cpu")
    assert spy.calls == 0


def test_opting_in_under_free_page_reporting_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hp.huge_pages_available():
        pytest.skip("no MADV_HUGEPAGE on this platform")
    monkeypatch.setenv(hp.ENV, "1")
    monkeypatch.setattr(hp, "free_pages_reported", lambda: True)
    with pytest.warns(ResourceWarning, match="free page reporting.*unset NEUROTHERMO_HUGE_PAGES"):
        assert hp.use_huge_pages()


# -- the huge-page tensor ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_huge_page_tensor_is_an_ordinary_contiguous_tensor(huge: None, spy: MmapSpy,
                                                           dtype: torch.dtype) -> None:
    t = hp.empty_large((3, 1001), dtype, "cpu", zero=True)
    assert spy.calls == 1
    assert t.shape == (3, 1001) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert t.data_ptr() % hp.HUGE_PAGE == 0  # starts on a huge page whatever address mmap gave
    assert torch.equal(t, torch.zeros(3, 1001, dtype=dtype))  # anonymous memory starts zeroed
    src = torch.arange(3 * 1001).reshape(3, 1001).to(dtype)
    t.copy_(src)
    assert torch.equal(t, src)
    block = column_block(1001, 3, dtype, "cpu")  # the Krylov layout: columns contiguous
    assert spy.calls == 2 and block.shape == (1001, 3) and block[:, 1].is_contiguous()


@linux
def test_memory_is_returned_when_the_last_view_dies(huge: None) -> None:
    """Touch 64 MiB, drop the tensor: the resident set falls back (no leak over repeated solves'
    worth of buffers); a view keeps the memory alive and readable until it goes too."""
    n = (64 << 20) // 4
    gc.collect()
    base = rss_bytes()
    for _ in range(4):
        t = hp.empty_large((4, n // 4), torch.float32, "cpu")
        t.fill_(1.5)
        assert rss_bytes() - base > 56 << 20  # all 64 MiB touched and resident
        view = t[2, 10:20]
        del t
        gc.collect()
        assert rss_bytes() - base > 56 << 20  # the view holds the mapping
        assert torch.equal(view, torch.full((10,), 1.5))
        del view
        gc.collect()
        assert rss_bytes() - base < 8 << 20  # unmapped: back to where it started


# -- the solvers on both paths -------------------------------------------------------------------------
def both_paths(monkeypatch: pytest.MonkeyPatch, run: object) -> tuple[object, object]:
    """``run()`` with every large buffer from ``torch.empty`` and then from huge pages."""
    if not hp.huge_pages_available():
        pytest.skip("no MADV_HUGEPAGE on this platform")
    monkeypatch.setattr(hp, "MIN_BYTES", 0)
    monkeypatch.setattr(hp, "use_huge_pages", lambda: False)
    plain = run()  # type: ignore[operator]
    monkeypatch.setattr(hp, "use_huge_pages", lambda: True)
    spy = MmapSpy()
    monkeypatch.setattr(hp.mmap, "mmap", spy)
    paged = run()  # type: ignore[operator]
    assert spy.calls >= 2  # the basis and the returned Ritz vectors at least
    return plain, paged


def test_lanczos_with_restarts_is_bit_identical_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """k = 3, a basis of 16: several thick restarts (their temporaries come from empty_large too)."""
    g = torch.Generator().manual_seed(3)
    n = 600
    U = torch.randn(n, 8, generator=g)
    d = torch.linspace(0.0, 1.0, n)
    op_fn = FunctionOperator(lambda V: d[:, None] * V + U @ (U.T @ V), n, torch.float32, "cpu")

    def run() -> tuple[torch.Tensor, torch.Tensor, int]:
        r = lanczos(op_fn, 3, tol=1e-6, max_basis=16, generator=torch.Generator().manual_seed(0))
        return r.values, r.vectors, r.n_matvec

    (v0, x0, m0), (v1, x1, m1) = both_paths(monkeypatch, run)  # type: ignore[misc]
    assert m0 == m1 > 16  # it did restart
    assert torch.equal(v0, v1) and torch.equal(x0, x1)
    # and the answer is right: the dense float64 spectrum of the same operator
    H = torch.diag(d.double()) + U.double() @ U.double().T
    ref = torch.linalg.eigvalsh(H).flip(0)[:3]
    assert torch.allclose(v1, ref, rtol=1e-5)  # tol 1e-6 on the estimate, float32 products


def test_top_eigenvalues_bit_identical_and_vectors_stay_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    ce = nn.CrossEntropyLoss()

    def run() -> nt.EigenResult:
        return nt.top_eigenvalues(model, ce, (x, y), k=2, tol=1e-6)

    r0, r1 = both_paths(monkeypatch, run)
    assert isinstance(r0, nt.EigenResult) and isinstance(r1, nt.EigenResult)
    assert torch.equal(r0.values, r1.values) and r0.n_hvp == r1.n_hvp
    for a, b in zip(r0.vectors, r1.vectors):
        assert all(torch.equal(a[n], b[n]) for n in a)
    # the vectors are views into one mmap-backed block: still valid after other allocations
    del r0
    gc.collect()
    nt.top_eigenvalues(model, ce, (x, y), k=2, tol=1e-6)
    with hessian_operator(model, ce, (x, y)) as op:
        for lam, vec, res in zip(r1.values.tolist(), r1.vectors, r1.residuals.tolist()):
            u = op.space.flatten(vec)
            hu = op.matvec(u)
            assert abs(float(u.norm()) - 1.0) < 1e-5
            assert float((hu - lam * u).norm()) < 10 * res + 1e-5  # the residual it reported


def test_holding_the_last_product_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    out = []
    for hold in (False, True):
        monkeypatch.setattr(HessianOperator, "hold_last_product", hold)
        with hessian_operator(model, nn.CrossEntropyLoss(), (x, y)) as op:
            out.append((op.matvec(v), op.matvec(2 * v)))
            assert (op._last_product is not None) is hold
            op.release()
            assert op._last_product is None
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert torch.allclose(out[1][1], 2 * out[1][0], rtol=1e-5, atol=1e-7)  # linear


@pytest.mark.parametrize(("env", "reported", "expected"), [
    ("", False, False), ("", True, False), ("1", False, True), ("0", False, False), (" 1 ", False, True)])
def test_environment_variable_overrides_the_automatic_choice(monkeypatch: pytest.MonkeyPatch, env: str,
                                                             reported: bool, expected: bool) -> None:
    if not hp.huge_pages_available():
        pytest.skip("no MADV_HUGEPAGE on this platform")
    monkeypatch.setenv(hp.ENV, env)
    monkeypatch.setattr(hp, "free_pages_reported", lambda: reported)
    assert hp.use_huge_pages() is expected


def test_a_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hp.ENV, "yes")
    with pytest.raises(ValueError, match="NEUROTHERMO_HUGE_PAGES='yes'.*1.*0"):
        hp.use_huge_pages()
    monkeypatch.setenv(hp.ENV, "1")
    monkeypatch.delattr(hp.mmap, "MADV_HUGEPAGE", raising=False)
    assert not hp.use_huge_pages()  # forced on, but the platform cannot
