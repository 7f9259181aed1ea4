"""Representation alignment (docs/theory.md §3): metrics, layer × layer maps, null calibration, theory.

Metrics on two feature matrices ``A: (N, D_a)``, ``B: (N, D_b)`` — the same N samples in the same
order, any device — each returning a float:

=========================  ============================================  =========================
metric                     invariant to                                  range / direction
=========================  ============================================  =========================
``mutual_knn``             rotation, isotropic scale, column permutation [0, 1], higher = aligned
``cycle_knn``              same (not symmetric)                          [0, 1]
``cknna``                  same (unbiased form: not symmetric)           ≈ [0, 1] (not a bound)
``cka`` (linear, rbf)      + translation                                 [0, 1] (unbiased: ≤ 1)
``svcca``                  + translation (+ any invertible map, full d)  [0, 1]
``procrustes_distance``    + translation                                 [0, π/2], LOWER = aligned
``gram_alignment``         rotation, isotropic scale, column permutation cosine [0, 1];
                                                                         pearson_offdiag [−1, 1]
=========================  ============================================  =========================

Every choice that changes the number is an argument, with platonic-rep's choice as the default
where it defines one in its metric functions (cosine neighbours, ``k = 10``, biased CKA, unbiased
CKNNA); ``normalize`` (row L2 normalisation) and ``clip_quantile`` (outlier clipping), which
platonic-rep applies in its measuring script to every metric, are arguments of every metric,
off except for the k-NN metrics (``normalize=True``).

``permutation_null`` calibrates a score against shuffled pairings, ``grouped_alignment`` gives
maps on disjoint groups of samples with standard errors (for comparing two scores), ``alignment_matrix`` builds a
labelled layer × layer table (``.max`` = platonic-rep's "model alignment"), ``capture_features``
collects per-layer features with hooks, and ``platonic_kernel`` / ``kernel_distance`` give the
theory's predicted kernel K* and a layer's distance to it.
"""
from neurothermo.alignment._common import AlignmentWarning, clip_outliers
from neurothermo.alignment.capture import auto_layers, capture_features
from neurothermo.alignment.cca import svcca
from neurothermo.alignment.cka import cka
from neurothermo.alignment.gram import gram_alignment
from neurothermo.alignment.grouped import GroupedAlignment, grouped_alignment
from neurothermo.alignment.knn import cknna, cycle_knn, knn_indices, mutual_knn
from neurothermo.alignment.matrix import AlignmentMatrix, alignment_matrix
from neurothermo.alignment.null import PermutationNull, permutation_null
from neurothermo.alignment.procrustes import procrustes_distance
from neurothermo.alignment.theory import kernel_distance, platonic_kernel

__all__ = [
    "AlignmentMatrix",
    "AlignmentWarning",
    "GroupedAlignment",
    "PermutationNull",
    "alignment_matrix",
    "auto_layers",
    "capture_features",
    "cka",
    "cknna",
    "clip_outliers",
    "cycle_knn",
    "gram_alignment",
    "grouped_alignment",
    "kernel_distance",
    "knn_indices",
    "mutual_knn",
    "permutation_null",
    "platonic_kernel",
    "procrustes_distance",
    "svcca",
]
