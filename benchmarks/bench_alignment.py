"""Alignment benchmark: time and peak memory, side by side in one run (CPU, float32).

Cases (issue 8), each measured in a fresh subprocess so that its peak resident memory is its own
(peak RSS minus the RSS just before the case, inputs already built):

1. ``mutual_knn`` at N = 10,000, D = 512, k = 10 vs
   * the reference algorithm as platonic-rep publishes it: full ``argsort`` of each ``N × N`` Gram
     matrix (diagonal filled with −1e8) and two dense ``N × N`` float masks;
   * the bare Gram matmuls ``A Aᵀ`` and ``B Bᵀ`` (the least work any exact method does).
2. an 8 × 8 layer ``alignment_matrix`` (mutual k-NN, and linear CKA) vs computing the 16 layers'
   Gram matrices once. (platonic-rep recomputes both layers' neighbours for each of the 64 pairs:
   64 × case 1's reference, reported as an estimate, not run.)
3. linear CKA in feature-space form vs the explicit-centring form ``tr(K H L H)`` with an ``N × N``
   centring matrix ``H`` (platonic-rep's ``hsic_biased``): that form is O(N³), so this comparison
   runs at N = 2,000 (D = 512); the feature-space form is also timed at N = 10,000.

Run: ``python benchmarks/bench_alignment.py`` (add ``--small`` for a 5× smaller smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

N, D, K, LAYERS, N_CKA = 10_000, 512, 10, 8, 2_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def reference_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """platonic-rep's mutual_knn, from its published description (L2-normalised inputs)."""
    def knn(x: torch.Tensor) -> torch.Tensor:
        return (x @ x.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :k]

    n = a.shape[0]
    ka, kb = knn(a), knn(b)
    rows = torch.arange(n).unsqueeze(1)
    ma = torch.zeros(n, n)
    mb = torch.zeros(n, n)
    ma[rows, ka] = 1.0
    mb[rows, kb] = 1.0
    return float(((ma * mb).sum(dim=1) / k).mean())


def reference_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Biased linear CKA with an explicit centring matrix (platonic-rep's hsic_biased)."""
    def hsic(k: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
        h = torch.eye(k.shape[0], dtype=k.dtype) - 1.0 / k.shape[0]
        return torch.trace(k @ h @ lm @ h)

    k, lm = a @ a.T, b @ b.T
    return float(hsic(k, lm) / torch.sqrt(hsic(k, k) * hsic(lm, lm)))


def _inputs(case: str, n: int, d: int) -> dict[str, object]:
    torch.manual_seed(0)
    if case.startswith(("knn", "gram2")):
        a = torch.nn.functional.normalize(_features(n, d, 1), dim=1)
        b = torch.nn.functional.normalize(a @ torch.randn(d, d) + _features(n, d, 2), dim=1)
        return {"a": a, "b": b}
    if case.startswith(("matrix", "gram16")):
        base = _features(n, d, 1)
        return {
            "la": {f"a{i}": base @ torch.randn(d, d) + i * _features(n, d, 10 + i) for i in range(LAYERS)},
            "lb": {f"b{i}": base @ torch.randn(d, d) + i * _features(n, d, 20 + i) for i in range(LAYERS)},
        }
    a = _features(n, d, 1)
    return {"a": a, "b": a @ torch.randn(d, d) + _features(n, d, 2)}


def _compute(case: str, x: dict[str, object]) -> float:
    from neurothermo import alignment as al

    a, b, la, lb = x.get("a"), x.get("b"), x.get("la"), x.get("lb")
    if case == "knn_ours":
        return al.mutual_knn(a, b, K)
    if case == "knn_reference":
        return reference_mutual_knn(a, b, K)  # type: ignore[arg-type]
    if case == "gram2":
        return float((a @ a.T)[0, 0] + (b @ b.T)[0, 0])  # type: ignore[operator]
    if case == "matrix_knn":
        return al.alignment_matrix(la, lb, "mutual_knn", k=K).max  # type: ignore[arg-type]
    if case == "matrix_cka":
        return al.alignment_matrix(la, lb, "cka").max  # type: ignore[arg-type]
    if case == "gram16":
        return sum(float((v @ v.T)[0, 0]) for v in (*la.values(), *lb.values()))  # type: ignore[union-attr]
    if case in ("cka_feature", "cka_feature_10k"):
        return al.cka(a, b)
    if case == "cka_explicit":
        return reference_cka(a, b)  # type: ignore[arg-type]
    raise ValueError(case)


def run_case(case: str, scale: int) -> dict[str, float]:
    n = N_CKA // scale if case in ("cka_feature", "cka_explicit") else N // scale
    _compute(case, _inputs(case, 300, D))  # warm-up: thread pools, lazy library loading, allocator
    x = _inputs(case, n, D)
    before = _rss_bytes()
    t0 = time.perf_counter()
    value = _compute(case, x)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": max(0, _peak_bytes() - before) / 2**20, "value": value}


def measure(case: str, scale: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--case", case, "--scale", str(scale)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.scale)))
        return
    scale = 5 if args.small else 1
    n, n_cka = N // scale, N_CKA // scale
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU; "
          f"N={n}, D={D}, k={K}")
    r = {c: measure(c, scale) for c in ("knn_ours", "knn_reference", "gram2", "matrix_knn",
                                        "matrix_cka", "gram16", "cka_feature", "cka_explicit",
                                        "cka_feature_10k")}

    def row(name: str, c: str) -> None:
        print(f"  {name:<46} {r[c]['seconds']:8.2f} s  {r[c]['peak_mb']:8.0f} MB   value {r[c]['value']:.6g}")

    print("\n1. mutual k-NN")
    row("ours (blocked top-k)", "knn_ours")
    row("reference (full argsort + dense masks)", "knn_reference")
    row("bare Gram matmuls A Aᵀ, B Bᵀ", "gram2")
    o, ref, g = r["knn_ours"], r["knn_reference"], r["gram2"]
    print(f"  speed-up vs reference: {ref['seconds'] / o['seconds']:.1f}×   (target ≥ 5×)")
    print(f"  peak memory / reference: {o['peak_mb'] / max(ref['peak_mb'], 1e-9):.3f}   (target ≤ 0.25)")
    print(f"  time / bare Gram matmuls: {o['seconds'] / g['seconds']:.2f}   (target ≤ 2)")
    print(f"  same value as reference: {abs(o['value'] - ref['value']) < 1e-6} (float32 masks there)")

    print(f"\n2. {LAYERS} × {LAYERS} alignment_matrix")
    row("alignment_matrix(mutual_knn)", "matrix_knn")
    row("alignment_matrix(cka)", "matrix_cka")
    row(f"{2 * LAYERS} Gram matrices, once", "gram16")
    print(f"  mutual_knn map / 16 Grams: {r['matrix_knn']['seconds'] / r['gram16']['seconds']:.2f}   (target ≤ 2)")
    print(f"  CKA map / 16 Grams: {r['matrix_cka']['seconds'] / r['gram16']['seconds']:.2f}")
    est = LAYERS * LAYERS * ref["seconds"]
    print(f"  per-pair recomputation as platonic-rep (estimate 64 × case 1 reference): {est:.0f} s "
          f"= {est / r['matrix_knn']['seconds']:.0f}× ours")

    print(f"\n3. linear CKA (explicit centring is O(N³): compared at N={n_cka}, D={D})")
    row(f"feature space, N={n_cka}", "cka_feature")
    row(f"explicit N×N centring matrix, N={n_cka}", "cka_explicit")
    row(f"feature space, N={n}", "cka_feature_10k")
    f, e = r["cka_feature"], r["cka_explicit"]
    print(f"  speed-up: {e['seconds'] / f['seconds']:.1f}×   peak memory ratio: "
          f"{f['peak_mb'] / max(e['peak_mb'], 1e-9):.3f}   same value: {abs(f['value'] - e['value']) < 1e-4}")


if __name__ == "__main__":
    main()
