"""Cost per Hessian-vector product against PyHessian, side by side in one run (issue 15, item 4).

    .venv/bin/python benchmarks/bench_curvature_hvp.py [--threads 1] [--rounds 2] [--products 8]
        [--batch 16] [--models resnet18 vit] [--allocation default|before|huge|small] [--solves-only]

Models from the foreign-model zoo (``tests/foreign_models.py``), eval mode (PyHessian forces it),
cross-entropy, float32, one batch of ``--batch`` images 3×32×32 (default 16):

* ResNet-18 in torchvision's layout, width 64 (11.2 M parameters at 10 classes), BatchNorm;
* the timm-layout ViT (fused ``qkv``, ``F.scaled_dot_product_attention``), zoo default size
  (0.03 M parameters: the per-call overhead shows, not the memory traffic).

PyHessian is the package itself (``pyhessian==0.1``, not a re-implementation): its products are
``torch.autograd.grad(gradsH, params, grad_outputs=v, retain_graph=True)`` on the gradient graph it
builds once per ``hessian(...)``, as neurothermo's ``"reverse"`` products on a single batch are.

Rows, in CPU seconds (``time.process_time``: robust to the other processes on a shared machine,
which wall time is not), with the ratio neurothermo / PyHessian:

* ``HVP alone``: one product alone, the first-order graph built beforehand. PyHessian:
  ``hessian_vector_product(gradsH, params, v)``; neurothermo: ``op.matvec(v)`` of
  ``hessian_operator`` (both one backward through the retained graph). ``bare autograd.grad``: the
  same product without neurothermo's wrapper (``torch.autograd.grad`` on the operator's own
  retained graph, the vector as views), the floor any wrapper around that graph has.
* ``in a solve``: a top-eigenvalue solve of ``--products`` products, everything included (building
  the graph, the start vector, the solver's own arithmetic, the returned vector) divided by the
  products. PyHessian: ``hessian(model, loss, data, cuda=False).eigenvalues(maxIter=m, tol=-1)``
  (power iteration); neurothermo: ``top_eigenvalues(max_hvp=m, tol=1e-12)`` (block Lanczos with
  partial reorthogonalisation). ``the same, full reorth.``: every product projected on the whole
  basis (``band_lanczos(reorth="full")``), everything else equal.
* ``whole solve to tol 1e-3``: total CPU seconds and products (PyHessian:
  ``eigenvalues(maxIter=100, tol=1e-3)`` from a seeded start, its stopping rule is the relative
  change of the Rayleigh quotient, not an error bound; neurothermo: ``top_eigenvalues(tol=1e-3)``,
  stopped on its error estimate), with both λ_max and their errors against a tol-1e-7 solve.
* ``page faults per product``: inside a solve, median of the rounds (``getrusage``).
* ``floor``: the CPU time of writing one new basis column of ``n`` floats (its first touch: the
  kernel maps and zeroes 11 k pages of 4 KiB, or 22 huge pages), in 4 KiB pages and in huge pages,
  the first block of the call and the fastest of three. A Krylov method stores one new vector per
  product and power iteration none, so this is a cost per product PyHessian does not have.

Like with like on the ViT (checked with ``torch.profiler``): both products run the same aten ops
(the math-backend attention, 24 ``bmm`` and 4 softmax-backward per product), except PyHessian's 32
extra ``AddBackward`` + 32 ``CopyBackwards`` nodes (its ``gradsH`` are ``p.grad + 0.``) and
neurothermo's two ``unflatten_dense_tensors`` and one ``_foreach_copy_`` (vector in, result out).
PyHessian cannot differentiate twice through the fused SDPA kernels (``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``), so its ViT rows run
inside ``sdpa_kernel(SDPBackend.MATH)``, the selection neurothermo makes itself. The rows alternate
between the libraries for ``--rounds`` rounds, the order reversed every round, after one warm-up
call each; each row reports the fastest round (the least disturbed by other load) and the
median and range of the per-round ratios (the noise); the load average is printed with the result.

Measured (2 CPU cores shared with other jobs at load average 11–17, threads 1; "before" is commit
5bbc5b8, run at the same time as "after" in a second process; "alone": two later runs of the final
code in one process, 4 rounds each, fastest-round ratio and per-round median (range); ResNet-18
b = 64: 3 rounds):

=========================  ======  =====  ==========================  ==========================
ResNet-18, b = 16          before  after  alone, run 1                alone, run 2
=========================  ======  =====  ==========================  ==========================
HVP alone                  0.91    1.04   0.92; 0.97 (0.92–1.02)      0.93; 0.91 (0.88–1.03)
in a solve, per product    1.20    1.14   1.08; 1.12 (1.08–1.15)      0.99; 1.14 (0.99–1.20)
  the same, full reorth.   1.33    1.20   1.19; 1.19 (1.11–1.30)      1.18; 1.22 (1.16–1.41)
whole solve to tol 1e-3    0.90    0.79   0.79                        0.77
=========================  ======  =====  ==========================  ==========================

To tol 1e-3 PyHessian used 35 products and stopped 3.7e-3 below λ_max = 2.62849 (a tol-1e-7
solve), neurothermo 20 products, error 8e-7. Floor (one new 45 MB basis column): 0.017–0.019 s,
10–12 % of PyHessian's product. ResNet-18 at b = 64 (HVP 0.30 s): HVP alone 1.02; 1.07
(1.02–1.15), in a solve 1.09; 1.09 (1.01–1.12), full reorth. 1.14; 1.18 (0.99–1.23), whole solve
to tol 1e-3 1.02 (18 vs 16 products, errors 2.6e-3 vs 1.1e-6), floor 5.4 % of a product.

=========================  ======  =====  ==========================  ==========================
ViT, b = 16                before  after  alone, run 1                alone, run 2
=========================  ======  =====  ==========================  ==========================
HVP alone                  1.01    1.17   1.11; 1.08 (1.00–1.38)      1.05; 1.04 (1.02–1.09)
in a solve, per product    1.08    0.84   1.08; 1.04 (0.99–1.08)      1.04; 1.00 (0.93–1.11)
whole solve to tol 1e-3    0.96    0.92   0.88                        0.99
=========================  ======  =====  ==========================  ==========================

(ViT to tol 1e-3: 20 vs 19 products, errors 1.4e-2 vs 2.1e-7.)

The ViT's standalone product, profiled (cProfile and ``torch.profiler``, 1 thread): the excess was
ours, the Python loop of ``split`` + 32 ``view`` calls that ``ParamSpace.views`` ran twice per
product (the vector in, the result column out), 0.15 ms of a 6 ms product; it is now one native
``unflatten_dense_tensors`` call each. Interleaved product by product (400 products per variant, the
order rotated every product, same process, load 2.7): neurothermo / PyHessian 1.015 before, 0.958
after; our wrapper alone (the product replaced by a stored result) 0.42 → 0.19 ms (5.8 → 3.3 % of
PyHessian's product); the bare ``autograd.grad`` on our graph 0.91–0.94 (our graph lacks
PyHessian's 64 extra nodes of its ``p.grad + 0.``), so what is left above the bare call is the wrapper's 3 %: two
native splits, one ``_foreach_copy_`` into the result column, the bookkeeping of ``matmat``.
This script, ``--rounds 5 --products 24``, code before (commit cdedf3a) and after run one after the
other at load 2.3–4.1, fastest-round ratio; median (range):

==============================  ========================  ========================
ViT, b = 16                     before                    after
==============================  ========================  ========================
HVP alone                       1.04; 0.96 (0.90–1.18)    1.02; 1.03 (0.95–1.05)
  bare autograd.grad                                      0.99; 0.99 (0.92–1.02)
in a solve, per product         1.06; 0.99 (0.90–1.12)    0.92; 0.92 (0.91–1.06)
whole solve to tol 1e-3         0.84                      1.01 (0.12 s vs 0.12 s)
ResNet-18, HVP alone            0.86; 0.86 (0.76–0.94)    0.97; 1.00 (0.91–1.11)
  bare autograd.grad                                      0.78; 0.83 (0.71–0.99)
ResNet-18, in a solve           1.18; 1.16 (1.06–1.18)    1.17; 1.24 (1.11–1.37)
ResNet-18, whole solve 1e-3     0.87                      0.66
==============================  ========================  ========================

Round to round these rows move by ±5–15 % on this machine (ResNet-18 HVP alone spans 0.76–1.11
across the two runs for a change that removes 0.1 ms of a 150 ms product): the effect on the ViT,
~5 % of a product, is below this script's noise and is measured by the interleaved comparison above.

Earlier in the same session, at load 0.4–9 and with PyHessian's start unseeded, the code before
gave 0.98 / 1.33 / 1.50 / 1.02 (ResNet-18) and 1.23 / 1.04 / 0.75 / 1.69 (ViT) for the four rows.

What a Lanczos step costs besides its product, now: the product is copied into its basis column
(one ``_foreach_copy_``; the first write of the column is the ``floor`` row), one pass reads the
band of 2–3 columns and the new vector (coefficients and the squared norm together, summed by
pieces in float64), one pass subtracts the band and normalises; a pass over the whole basis only
when the estimated loss of orthogonality exceeds ε^¾ (4–6 of 16–20 products in the tol-1e-3
solves, none of the 8 in the ``in a solve`` rows). Before: a copy, projection, subtraction, norm,
often a second projection, subtraction and norm, a division, a start vector built in two
temporaries, and three Ritz vectors returned (plus a clone) where one was used.

Why not reliably ≤ 1× per product inside a solve on ResNet-18 on CPU (before session 5): the basis
column's first touch alone is 5–12 % of a product here (PyHessian's power iteration keeps no basis
and reuses the allocator's warm memory for its few vectors), and the two remaining passes cost about
what PyHessian's own vector arithmetic does; the measured in-solve ratios, 0.99–1.20 per round
(medians 1.09–1.14), sat on that floor, with the round-to-round noise of this machine (±10 %) as
large as what is left above it. Per solve the target is met: to tol 1e-3 0.77–1.02× PyHessian's CPU
time, with an error 10³–10⁵ times smaller (PyHessian's stopping rule stops 0.3–1.4 % off).

Session 5: where a product's page faults came from, and what removes them. ``--allocation`` sets
neurothermo's allocation for the whole process (``before``: as the code before; ``default``: the
code now; ``huge``: huge pages forced); before and after must run in separate processes, since
glibc's malloc adapts its thresholds to the process's history (a run of standalone products first
changed the "before" solve rows by ~0.1). ``--solves-only`` runs the in-a-solve rows alone.
Counting page faults per product inside a solve (``getrusage``) showed two sources:

* The product's own temporaries, ~15 k faults per product that PyHessian does not have (before:
  23–30 k per product against PyHessian's 7–12 k). Lanczos copies each product into its basis
  column and dropped autograd's result at once; with nothing live above them, glibc returned the
  product's temporaries to the kernel after every product, and the next product faulted them in
  again. Power iteration keeps its vector across products and so never hits this.
  ``HessianOperator.hold_last_product`` now keeps each result until the next product exists (n
  numbers held): 16–18 k faults per product, sys time 35–40 ms instead of 45–55 ms (the last
  ``--solves-only`` pair: 31.9 k → 15.6 k faults per product, PyHessian 8–9 k).
* The new basis column, 11 k faults (4 KiB pages) = 17–22 ms, 8–11 % of a product. Transparent
  huge pages (``curvature/huge_pages.py``: an anonymous mapping with ``MADV_HUGEPAGE``, used for the
  basis, the restart temporaries and the returned Ritz block) cut this to 4.0–4.8 ms per column
  when the pages were freed less than a second before (the ``floor`` row, fastest block), but on
  this machine they are on by default nowhere: it is a Firecracker VM whose balloon reports free
  2 MiB blocks to the host (``VIRTIO_BALLOON_F_REPORTING``), which unmaps them, so a huge page's
  first touch faults on the host as well: 88–134 ms per column on the first block of a process
  (``floor``, "first block"). Forced on (``--allocation huge``), the in-a-solve row went to 1.24
  (median 1.49): the solves here are seconds apart, so their huge pages are always cold.
  Huge pages are therefore opt-in (``NEUROTHERMO_HUGE_PAGES=1``, with a warning where the kernel
  reports free pages: virtio balloon with reporting, Hyper-V balloon); by default they are off.
  On a host without free page reporting the floor row's huge-page figure is the expected cost;
  no such host was available to measure a whole solve on.

ResNet-18, b = 16, 8 products per solve, in a solve per product, neurothermo / PyHessian (fastest
round; median of 4 rounds), separate processes run one after the other, load average 3–6 on 2
cores (``--solves-only``; the ab rows: the same solves from a script, 4 rounds):

======================  ==================================================  ==================================================
run                     before (results freed at once)                      after (results held)
======================  ==================================================  ==================================================
--solves-only           0.96; 0.92 · 1.11; 1.14 · 1.15; 1.14 · 1.20; 1.09   1.09; 0.98 · 1.01; 1.00 · 1.09; 1.02 · 1.04; 0.98
ab script, medians      1.13 · 1.10 · 1.20                                  1.00 · 0.81 · 1.06
full script (all rows)  1.06; 0.99 · 0.97; 1.10                             1.10; 1.06 · 1.12; 1.12 · 1.16; 1.06
whole solve, tol 1e-3   0.57–0.91                                           0.58–0.77
======================  ==================================================  ==================================================

So per product inside a solve neurothermo is now at parity with PyHessian on ResNet-18 (medians
0.81–1.06 in the processes that run solves only, against 0.92–1.20 before; in the full script,
whose standalone product rows leave glibc's heap in another state, before and after cannot be told
apart: medians 0.99–1.10 and 1.06–1.12), not reliably below it:
the remaining difference is the new basis column (8–11 % of a product in 4 KiB pages), as large as
this machine's round-to-round noise. ViT (0.03 M parameters: nothing here is large enough to
change), in a solve: before 0.96–1.03 (medians 0.95–1.03), after 0.95–1.07 (medians 0.97–1.05),
all within the noise. HVP alone (the full script): ResNet-18 0.84–0.88 after, 1.06–1.13 before
(medians 0.86–0.92 against 0.96–1.06), ViT 0.88–1.08 after. Page faults per product in a solve,
full script, after: 18.8 k against PyHessian's 7.8 k (the basis column is 11 k of the difference).

Still possible, not done: the product is copied into its basis column and then read again by the
projection; projecting autograd's result in place and writing the column in the subtraction pass
would save one pass over n numbers per product (~3 %).

PyHessian is optional: ``.venv/bin/pip install --no-deps pyhessian==0.1``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import neurothermo as nt
from foreign_models import VisionTransformer, resnet18
from neurothermo.curvature import ConvergenceWarning, HessianOperator, hessian_operator
from neurothermo.curvature import huge_pages as hp
from neurothermo.curvature.lanczos import band_lanczos, lanczos
from neurothermo.curvature.operator import column_block

eigen_mod = sys.modules["neurothermo.curvature.eigen"]  # top_eigenvalues calls its `lanczos`

try:
    import pyhessian  # noqa: F401
    from pyhessian.utils import hessian_vector_product

    ph = sys.modules["pyhessian.hessian"]  # the package re-exports the class under the module name
except ImportError:  # pragma: no cover - optional peer
    ph = None

CE = nn.CrossEntropyLoss()


def problem(name: str, b: int = 16) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=64) if name == "resnet18" else VisionTransformer()
    g = torch.Generator().manual_seed(1)
    return model.eval(), torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)


def minor_faults() -> int:
    """Page faults of this process so far (the kernel mapping fresh memory); -1 without ``resource``."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return -1
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_seconds(fn: Callable[[], int]) -> float:
    """CPU seconds per product of ``fn`` (which returns how many products it ran)."""
    t0 = time.process_time()
    n = fn()
    return (time.process_time() - t0) / n


def pyhessian_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int,
                   ctx: Callable[[], object]) -> tuple[Callable[[], int], Callable[[], int]]:
    def product() -> int:
        with ctx():  # type: ignore[attr-defined]
            h = ph.hessian(model, CE, data=(x, y), cuda=False)
            v = [torch.randn_like(p) for p in h.params]
            t0 = time.process_time()
            for _ in range(m):
                hessian_vector_product(h.gradsH, h.params, v)
            spent = time.process_time() - t0
        model.zero_grad(set_to_none=True)  # backward(create_graph=True) left graphs in .grad
        product.spent = spent  # type: ignore[attr-defined]
        return m

    def solve() -> int:
        with ctx():  # type: ignore[attr-defined]
            ph.hessian(model, CE, data=(x, y), cuda=False).eigenvalues(maxIter=m, tol=-1)
        model.zero_grad(set_to_none=True)
        return m

    return product, solve


@contextlib.contextmanager
def allocation(hold: bool, huge: bool | None) -> Iterator[None]:
    """Run neurothermo with ``HessianOperator.hold_last_product = hold`` and large CPU buffers in
    huge pages (True), in 4 KiB pages (False) or as this machine's default decides (None).
    ``allocation(False, False)`` is the allocation behaviour of the code before (commit 7ed2f77)."""
    held, use = HessianOperator.hold_last_product, hp.use_huge_pages
    HessianOperator.hold_last_product = hold
    if huge is not None:
        hp.use_huge_pages = lambda: huge  # type: ignore[assignment]
    try:
        yield
    finally:
        HessianOperator.hold_last_product, hp.use_huge_pages = held, use  # type: ignore[method-assign]


def ours_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              m: int) -> dict[str, Callable[[], int]]:
    def product() -> int:
        with hessian_operator(model, CE, (x, y), mode="eval") as op:
            v = torch.randn(op.size)
            t0 = time.process_time()
            for _ in range(m):
                op.matvec(v)
            product.spent = time.process_time() - t0  # type: ignore[attr-defined]
        return m

    def bare() -> int:  # the floor of any wrapper: the autograd call alone on the same graph
        with hessian_operator(model, CE, (x, y), mode="eval") as op:
            grads, params = op._grads[0], op._plist  # type: ignore[index]
            v = op.space.views(torch.randn(op.size))
            t0 = time.process_time()
            for _ in range(m):
                torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            bare.spent = time.process_time() - t0  # type: ignore[attr-defined]
        return m

    def solve() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return nt.top_eigenvalues(model, CE, (x, y), max_hvp=m, tol=1e-12, mode="eval").n_hvp

    def solve_full() -> int:  # the same solve with full reorthogonalisation
        eigen_mod.lanczos = functools.partial(band_lanczos, reorth="full")
        try:
            return solve()
        finally:
            eigen_mod.lanczos = lanczos

    return {"nt product": product, "nt bare": bare, "nt solve": solve, "nt solve full": solve_full}


def fresh_column_seconds(n: int, huge: bool) -> tuple[float, float]:
    """CPU seconds to write ``n`` numbers into a fresh column of a Krylov basis (first touch of its
    pages: the part of a Lanczos step's cost that storing the basis makes unavoidable), in 4 KiB
    pages or in huge pages: (the first block of the call, the fastest of three)."""
    src = torch.randn(n)
    times = []
    with allocation(True, huge):
        for _ in range(3):
            V = column_block(n, 5, torch.float32, "cpu", zero=False)
            t0 = time.process_time()
            for j in range(4):
                V[:, j].copy_(src)
            times.append((time.process_time() - t0) / 4)
            del V
    return times[0], min(times)


def measure(name: str, m: int, rounds: int, b: int, solves_only: bool = False) -> None:
    model, x, y = problem(name, b)
    n_params = sum(p.numel() for p in model.parameters())
    ctx = (lambda: sdpa_kernel(SDPBackend.MATH)) if name == "vit" else (lambda: _Null())
    ours = ours_rows(model, x, y, m)
    ph_p, ph_s = pyhessian_rows(model, x, y, m, ctx)
    for fn in () if solves_only else (ph_p, ours["nt product"], ours["nt bare"]):  # warm-up: lazy setup
        fn()
    runs: dict[str, list[float]] = {}
    faults: dict[str, list[float]] = {}
    for r in range(rounds):  # the order alternates round by round, so drifting load hits both
        products = () if solves_only else (
            ("ph product", ph_p), ("nt product", ours["nt product"]), ("nt bare", ours["nt bare"]))
        solves = (("ph solve", ph_s), ("nt solve", ours["nt solve"])) + (
            () if solves_only else (("nt solve full", ours["nt solve full"]),))
        for key, fn in products if r % 2 == 0 else products[::-1]:
            fn()
            runs.setdefault(key, []).append(fn.spent / m)  # type: ignore[attr-defined]
        for key, fn in solves if r % 2 == 0 else solves[::-1]:
            f0 = minor_faults()
            runs.setdefault(key, []).append(cpu_seconds(fn))
            faults.setdefault(key, []).append((minor_faults() - f0) / m)
    best = {key: min(v) for key, v in runs.items()}
    counted = {"n": 0}
    inner = ph.hessian_vector_product

    def counting(*a: object) -> object:
        counted["n"] += 1
        return inner(*a)

    ph.hessian_vector_product = counting  # counting costs nothing measurable
    try:
        with ctx():  # type: ignore[attr-defined]
            torch.manual_seed(0)  # PyHessian draws its start vector from the global generator
            t0 = time.process_time()
            h = ph.hessian(model, CE, data=(x, y), cuda=False)
            lam_ph = h.eigenvalues(maxIter=100, tol=1e-3)[0][0]
            t_ph = time.process_time() - t0
    finally:
        ph.hessian_vector_product = inner
    model.zero_grad(set_to_none=True)
    stats: dict[str, int] = {}
    eigen_mod.lanczos = functools.partial(band_lanczos, stats=stats)
    try:
        t0 = time.process_time()
        res = nt.top_eigenvalues(model, CE, (x, y), tol=1e-3, mode="eval")
        t_nt = time.process_time() - t0
    finally:
        eigen_mod.lanczos = lanczos
    ref = nt.top_eigenvalues(model, CE, (x, y), tol=1e-7, mode="eval").lambda_max  # the reference
    col = fresh_column_seconds(n_params, False)
    col_huge = fresh_column_seconds(n_params, True)
    print(f"\n{name}: {n_params / 1e6:.2f} M parameters, b = {b}, {m} products per solve, "
          f"fastest of {rounds} alternating rounds, CPU seconds; last column: the ratio per round, "
          "median (min–max)")
    print(f"  {'':32s} {'PyHessian':>10s} {'neurothermo':>12s} {'ratio':>7s}")
    if name == "vit":
        print("  attention: both sides build their graph and differentiate it with SDPA's math backend "
              "(PyHessian inside sdpa_kernel(SDPBackend.MATH), neurothermo selects it itself)")
    for row, theirs, mine in (("HVP alone, per product", "ph product", "nt product"),
                              ("  bare autograd.grad, our graph", "ph product", "nt bare"),
                              ("in a solve, per product", "ph solve", "nt solve"),
                              ("  the same, full reorth.", "ph solve", "nt solve full")):
        if mine not in runs:
            continue
        a, c = best[theirs], best[mine]
        per_round = sorted(o / t for o, t in zip(runs[mine], runs[theirs]))
        print(f"  {row:32s} {a:10.4f} {c:12.4f} {c / a:7.2f}   {statistics.median(per_round):.2f} "
              f"({per_round[0]:.2f}–{per_round[-1]:.2f})")
    if faults["ph solve"][0] >= 0:
        print(f"  {'  page faults per product':32s} {statistics.median(faults['ph solve']):10.0f} "
              f"{statistics.median(faults['nt solve']):12.0f}   (median of the rounds)")
    print(f"  {'whole solve to tol 1e-3':32s} {t_ph:10.2f} {t_nt:12.2f} {t_nt / t_ph:7.2f}")
    print(f"    products {counted['n']} vs {res.n_hvp} ({stats.get('full_passes')} with a full "
          f"reorthogonalisation pass); λ_max {lam_ph:.6g} vs {res.lambda_max:.6g}, error against "
          f"a tol-1e-7 solve ({ref:.6g}): {abs(lam_ph - ref) / ref:.1e} vs "
          f"{abs(res.lambda_max - ref) / ref:.1e}")
    print(f"  floor: writing one new basis column ({n_params * 4 / 1e6:.0f} MB, first touch) costs, "
          f"4 KiB pages: {col[1]:.4f} s = {col[1] / best['ph solve']:.1%} of PyHessian's product in a solve "
          f"(first block {col[0]:.4f} s); huge pages: {col_huge[1]:.4f} s = "
          f"{col_huge[1] / best['ph solve']:.1%} (first block {col_huge[0]:.4f} s); PyHessian "
          "stores no basis")


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--products", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--models", nargs="*", default=["resnet18", "vit"])
    ap.add_argument("--allocation", choices=("default", "before", "huge", "small"), default="default",
                    help="neurothermo's large CPU buffers for the whole run: this machine's default, "
                         "as before (4 KiB pages, each product's result freed at once), huge pages "
                         "forced, or 4 KiB pages (results held)")
    ap.add_argument("--solves-only", action="store_true",
                    help="only the in-a-solve rows and the whole solve (the process runs nothing "
                         "else, so its allocator's state comes from solves alone)")
    args = ap.parse_args()
    if ph is None:
        print("PyHessian is not installed (pip install --no-deps pyhessian==0.1): nothing to compare",
              file=sys.stderr)
        return
    torch.set_num_threads(args.threads)
    hold, huge = {"default": (True, None), "before": (False, False), "huge": (True, True),
                  "small": (True, False)}[args.allocation]
    with allocation(hold, huge):
        pages = "huge pages" if hp.use_huge_pages() else (
            "4 KiB pages (free page reporting)" if hp.huge_pages_available() and huge is not False
            and hp.free_pages_reported() else "4 KiB pages")
        print(f"torch {torch.__version__}, threads {args.threads}, load average before "
              f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}, {os.cpu_count()} CPUs; allocation "
              f"{args.allocation}: {pages}, each product's result "
              f"{'held until the next' if hold else 'freed at once'}")
        for name in args.models:
            measure(name, args.products, args.rounds, args.batch, args.solves_only)
    print(f"\nload average after {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
