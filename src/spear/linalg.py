"""Numerical rank, truncated factorisation, kernels and the tolerances they use.

All linear algebra runs in float64. Tolerances are derived from the dtype the gradient
arrived in (its machine epsilon) and from the conditioning of the factorisation, never
hard-coded at the call sites: see :class:`Tolerances`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.sparse import csr_matrix, hstack, identity, vstack

__all__ = [
    "TINY_NORM",
    "Factorisation",
    "Tolerances",
    "above_rounding",
    "beyond_span",
    "clean_rank",
    "estimate_rank",
    "factorise",
    "gap_at",
    "kernel",
    "least_absolute_fit",
    "least_squares",
    "low_singular_basis",
    "noise_floor",
    "null_vectors",
    "orthonormal_basis",
    "pure_kernel",
    "pure_kernels",
    "rounding_rank",
    "smallest_singular_vector",
    "unit_rows",
    "zero_mask",
]

#: Positive floor for float64 norms and squared norms before a division (all-zero columns,
#: an update scaled to about 1e-300): far below any value the attack works with, and a
#: normal float64 number (not subnormal), so dividing by it neither raises nor loses digits.
TINY_NORM = 1e-300
#: Largest relative zero tolerance ever used: beyond it zeros and non-zeros of a ReLU
#: gradient are no longer separable and the attack reports that instead.
MAX_ZERO_TOL = 1e-3
#: Smallest relative zero tolerance (float64 roundoff of well-conditioned products).
MIN_ZERO_TOL = 1e-11
#: A zero of ``basis @ q`` is roundoff of size about ``eps * cond``; the tolerance leaves
#: this factor of head room above it.
ZERO_TOL_HEADROOM = 1e3
#: Singular values below ``RANK_FLOOR * eps * s_1`` are roundoff of the data's dtype.
RANK_FLOOR = 10.0
#: A value under that floor is still a direction of the update, not rounding, when it
#: stands this many times above the next value and above ``eps * s_1``, and the next is
#: itself under the floor (:func:`above_rounding`). The floor is an upper bound: the
#: rounding of float32 FedSGD updates is a band whose top measured 0.07 to 0.24
#: ``eps * s_1``, with neighbouring values inside it at most 1.25 apart (21 updates: MLPs
#: 784 -> 1000 at b = 25 to 128 and the two CNNs of :func:`spear.networks.build_cnn` at
#: b = 16 to 64). The weakest example of a trained network (a confidently classified
#: one) can sit between band and floor: Flower's trained CNN at b = 64, 1.36
#: ``eps * s_1``, 9.1 times the band's top.
ROUNDING_CLEARANCE = 4.0
#: Where the last singular value above the roundoff stands at least this far above the
#: first roundoff value, every value above the roundoff is an example, however small it
#: is next to the others (:func:`clean_rank`): roundoff values that happen to cross the
#: floor, and noise, sit within a factor of a few of their neighbours. Measured at the
#: rank of exact FedSGD and FedAvg updates (MLPs 784 -> 1000 and the two CNNs of
#: :func:`spear.networks.build_cnn`, b = 8 to 128): 1e5 to 6e13 in float64, 72 to 1e7 in
#: float32; two float64 examples 1e-6 apart leave a value 62 times the roundoff after it.
CLEAN_DROP = 30.0
#: Lower precisions (float32 and below): the tolerances come from the update's measured
#: noise floor, ``max(s_{b+1} / median(s_1..s_b), eps)`` (the roundoff past the rank
#: relative to a typical example's direction), times this head room. The weakest
#: direction ``s_b`` is no measure of it: two similar examples make ``s_b`` small without
#: making either column noisy. Measured on float32 FedSGD updates (Fashion-MNIST through
#: 784 -> 1000 / 2000, b = 16 to 256; 32x32 RGB through 3072 -> 2000, b = 25, 64): the
#: largest true zero of a normalised gradient column is 0.55 to 1.04 times that floor,
#: while ``s_{b+1} / s_b`` is 4 to 30 times larger than the floor.
LOW_PRECISION_HEADROOM = 10.0
#: Smallest zero tolerance for lower precisions, in units of their machine epsilon
#: (a product of two rounded numbers carries a few ulps).
LOW_PRECISION_MIN_ULPS = 8.0
#: Lower precisions: the degeneracy tolerance is this times the noise floor. A row subset
#: of the orthonormal basis moves by at most ``s_{b+1} / s_b`` in spectral norm (Wedin), so
#: a true kernel's smallest singular value stays below the floor itself; :func:`kernel`
#: adds a ``sqrt(k)`` of head room on top. Larger values merge the clearly non-zero second
#: singular value of a zero set (0.3 measured, 784 -> 1000, b = 64) with the kernel under
#: :data:`KERNEL_GAP`, and every kernel looks multi-dimensional.
LOW_PRECISION_DEGENERACY_HEADROOM = 1.0
#: Lower precisions: a zero set's kernel counts as one-dimensional only when its
#: second-smallest singular value is at least this fraction of :func:`expected_edge`. A
#: zero test as coarse as float32's lets a mixture of two or three examples with similar
#: ReLU patterns (same label, similar images) vanish, by accident, on a few units where
#: its entries nearly cancel; those rows pin its kernel to one dimension, but only just.
#: Measured (float32, untrained, Fashion-MNIST through 784 -> 256 / 1000 / 2000 and 32x32
#: RGB through 3072 -> 2000, b = 16 to 256; eleven batches): true columns' zero sets 0.39
#: to 1.0 of the edge; the mixtures that had filled the pool at b = 128, 0.02 to 0.34.
#: The rare true column below the bound is refused too; when it is the last one missing,
#: the search completes it from the others (:func:`spear.inversion.solve.complete_last`).
#: Correlated inputs are not rare: on float32 32x32 RGB patches at b = 64, 15 of the 19
#: directions missing when the search stalled measured 0.23 to 0.39. A bound of 0.2
#: solves that batch, but lets mixtures in on Fashion-MNIST at b = 128 (0 of 5 batches
#: exact, against 9 of 10).
LOW_PRECISION_SEPARATION = 0.4


@dataclass(frozen=True)
class Tolerances:
    """Tolerances for one problem, derived from its dtype and conditioning.

    Attributes
    ----------
    eps:
        Machine epsilon of the dtype the gradient arrived in.
    zero_tol:
        An entry ``v_j`` of a vector ``v`` in the gradient's column space counts as zero
        when ``|v_j| <= zero_tol * max |v|``.
    degeneracy_tol:
        A singular value of a row subset of an orthonormal basis counts as zero below
        this.
    separation:
        A zero set's kernel is one-dimensional only when the next singular value is at
        least this fraction of the one random rows would have
        (:func:`pure_kernel`); 0 (no such test) for float64.
    """

    eps: float
    zero_tol: float
    degeneracy_tol: float
    separation: float = 0.0

    @classmethod
    def derive(
        cls, dtype: torch.dtype, condition: float, noise_floor: float | None = None
    ) -> Tolerances:
        """Tolerances for data of ``dtype`` whose factorisation has ``condition``.

        Parameters
        ----------
        dtype:
            The dtype the gradient arrived in (float32 gradients carry about 7 digits).
        condition:
            ``sigma_1 / sigma_b`` of the weight gradient: roundoff in the basis grows
            with it.
        noise_floor:
            ``sigma_{b+1} / median(sigma_1..sigma_b)``, the roundoff the update carries
            past its rank relative to a typical example's direction (:func:`noise_floor`).
            Used for dtypes coarser than float64 (the zero test is
            ``LOW_PRECISION_HEADROOM`` times it); float64 ignores it.

        Examples
        --------
        >>> t64 = Tolerances.derive(torch.float64, 100.0)
        >>> t32 = Tolerances.derive(torch.float32, 100.0)
        >>> t64.zero_tol < t32.zero_tol <= MAX_ZERO_TOL
        True
        """
        eps = float(torch.finfo(dtype).eps)
        cond = max(1.0, float(condition)) if math.isfinite(condition) else 1e12
        zero_tol = ZERO_TOL_HEADROOM * eps * math.sqrt(cond)
        if dtype != torch.float64:
            # float32 and lower: ReLU zeros stay exact, only products and sums are rounded,
            # so the zero test sits just above the measured floor. A fixed 1e-4 (or the
            # float64 formula's 1e3 ulps) is far above it and blurs the kernel tests
            # (a (b-1)-row kernel then looks multi-dimensional and every one is refused).
            floor = eps * cond if noise_floor is None else max(noise_floor, eps)
            floor = max(floor, LOW_PRECISION_MIN_ULPS * eps)
            zero_tol = min(MAX_ZERO_TOL, LOW_PRECISION_HEADROOM * floor)
            degeneracy = min(zero_tol, LOW_PRECISION_DEGENERACY_HEADROOM * floor)
            return cls(
                eps=eps,
                zero_tol=zero_tol,
                degeneracy_tol=degeneracy,
                separation=LOW_PRECISION_SEPARATION,
            )
        zero_tol = min(MAX_ZERO_TOL, max(MIN_ZERO_TOL, zero_tol))
        return cls(eps=eps, zero_tol=zero_tol, degeneracy_tol=zero_tol)


@dataclass
class Factorisation:
    """``weight_grad ~= left @ right`` truncated at the numerical rank.

    Attributes
    ----------
    left:
        ``(m, b)`` float64, ``U_b diag(s_b)``.
    right:
        ``(b, n)`` float64 with orthonormal rows (``V_b^T``).
    singular_values:
        ``(min(m, n),)`` all singular values, descending.
    rank:
        ``b``.
    gap:
        ``s_b / s_{b+1}`` (``inf`` when ``s_{b+1} == 0`` or ``b == min(m, n)``).
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    gap: float

    @property
    def condition(self) -> float:
        """``s_1 / s_b``."""
        s = self.singular_values
        return float(s[0] / s[self.rank - 1]) if self.rank > 0 else math.inf


def noise_floor(singular_values: torch.Tensor, rank: int) -> float:
    """``s_{b+1} / median(s_1..s_b)``: roundoff past the rank, relative to a typical example.

    Parameters
    ----------
    singular_values:
        ``(k,)`` descending.
    rank:
        ``b``.

    Returns
    -------
    float
        0 when there is nothing past the rank.

    Examples
    --------
    >>> noise_floor(torch.tensor([4.0, 2.0, 1.0, 1e-6], dtype=torch.float64), 3)
    5e-07
    """
    if rank <= 0 or rank >= singular_values.numel():
        return 0.0
    return float(singular_values[rank] / singular_values[:rank].median())


def estimate_rank(singular_values: torch.Tensor, eps: float) -> tuple[int, float]:
    """Numerical rank from the largest gap in the singular values.

    The rank is placed at the largest ratio ``s_k / s_{k+1}`` among the values that stand
    above the data's roundoff (``s_k > RANK_FLOOR * eps * s_1``); values below are noise of
    the dtype and never start a gap. When the value after the rank is roundoff, the gap
    is ``inf`` however small the ratio (the last example's gradient may be tiny, such as
    a confident one's, and still stand clear of the dtype's rounding).

    Parameters
    ----------
    singular_values:
        ``(r,)`` descending, non-negative.
    eps:
        Machine epsilon of the dtype the data arrived in.

    Returns
    -------
    rank:
        The numerical rank (0 for a zero matrix).
    gap:
        ``s_rank / s_{rank+1}``: ``inf`` when the values after the rank are roundoff,
        exactly zero or absent.

    Examples
    --------
    >>> estimate_rank(torch.tensor([3.0, 2.0, 1.0, 1e-17, 1e-18], dtype=torch.float64),
    ...               2.2e-16)
    (3, inf)
    >>> estimate_rank(torch.tensor([1.0, 1e-8, 5e-9, 1e-16], dtype=torch.float64), 2.2e-16)
    (1, 100000000.0)
    """
    s = singular_values.to(torch.float64)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0, math.inf
    signal = int((s > RANK_FLOOR * eps * s[0]).sum())
    nxt = torch.cat([s[1:], s.new_zeros(1)]) if signal == s.numel() else s[1 : signal + 1]
    head = s[:signal]
    ratios = head / nxt.clamp_min(torch.finfo(torch.float64).tiny)
    rank = int(torch.argmax(ratios)) + 1
    return rank, gap_at(s, rank, eps)


def clean_rank(singular_values: torch.Tensor, eps: float) -> int | None:
    """The number of singular values before the last clean drop: the last value that
    stands at least :data:`CLEAN_DROP` above both the next value and the dtype's roundoff
    floor (``RANK_FLOOR * eps * s_1``). In an exact update each value before it is an
    example; in a noisy one it is the drop into the noise band. ``None`` where no such
    drop exists (a band of noise or roundoff throughout, or nothing past the values).

    The largest ratio (:func:`estimate_rank`) can sit before such a value: two examples
    a hair apart (one label, one ReLU pattern, distance ``d``) leave a singular value of
    about ``d^2`` of the largest, and a confidently classified example a tiny one. A rank
    that leaves it out explains the update only up to it. The roundoff after the last
    example is not one value but a band (float64: measured 15 to 25 ``eps * s_1`` on a
    200 x 784 gradient), part of which can sit above the floor; the drop is looked for
    wherever it is, not only at the floor's edge.

    Parameters
    ----------
    singular_values:
        ``(r,)`` descending, non-negative.
    eps:
        Machine epsilon of the dtype the data arrived in.

    Examples
    --------
    >>> s = torch.tensor([1.0, 0.3, 9e-13, 1.5e-16, 1e-16], dtype=torch.float64)
    >>> estimate_rank(s, 2.2e-16)[0], clean_rank(s, 2.2e-16)
    (2, 3)
    >>> s = torch.tensor([1.0, 0.3, 3e-12, 5e-15, 4e-15, 3e-15], dtype=torch.float64)
    >>> clean_rank(s, 2.2e-16)
    3
    """
    s = singular_values.to(torch.float64)
    if s.numel() < 2 or float(s[0]) == 0.0:
        return None
    floor = RANK_FLOOR * eps * float(s[0])
    drops = s[:-1] >= CLEAN_DROP * s[1:].clamp_min(floor)
    where = torch.nonzero(drops).flatten()
    return int(where[-1]) + 1 if where.numel() > 0 else None


def above_rounding(singular_values: torch.Tensor, count: int, eps: float) -> bool:
    """Whether the ``count``-th singular value is a direction of the update rather than
    the rounding of its dtype: above ``RANK_FLOOR * eps * s_1``, or, where the value
    after it is under that floor (the rounding's band), at least
    :data:`ROUNDING_CLEARANCE` times that value and above ``eps * s_1``.

    Parameters
    ----------
    singular_values:
        ``(k,)`` descending, non-negative.
    count:
        ``1 <= count <= k``.
    eps:
        Machine epsilon of the dtype the data arrived in.

    Examples
    --------
    >>> eps = 1.2e-7  # float32
    >>> s = torch.tensor([1.0, 1e-3, 1.6e-7, 1.8e-8, 1.7e-8], dtype=torch.float64)
    >>> above_rounding(s, 2, eps), above_rounding(s, 3, eps), above_rounding(s, 4, eps)
    (True, True, False)
    """
    s = singular_values.to(torch.float64)
    value, top = float(s[count - 1]), float(s[0])
    floor = RANK_FLOOR * eps * top
    if value > floor:
        return True
    following = float(s[count]) if count < s.numel() else 0.0
    return following <= floor and value > max(eps * top, ROUNDING_CLEARANCE * following)


def rounding_rank(singular_values: torch.Tensor, count: int, eps: float) -> int | None:
    """Where the first ``count`` singular values fall into the dtype's rounding: ``count``
    where the ``count``-th stands above it (:func:`above_rounding`), else the last value
    above it where the values drop cleanly into the rounding there (that value at least
    :data:`ROUNDING_CLEARANCE` times the next); ``None`` where they sink into it without
    such a drop (float64's rounding is a band that reaches above ``RANK_FLOOR``, whose
    neighbouring values stand close together).

    Parameters
    ----------
    singular_values:
        ``(k,)`` descending, non-negative.
    count:
        ``1 <= count <= k``.
    eps:
        Machine epsilon of the dtype the data arrived in.

    Examples
    --------
    >>> s = torch.tensor([1.0, 1e-3, 1.6e-7, 1.8e-8, 1.7e-8], dtype=torch.float64)
    >>> rounding_rank(s, 4, 1.2e-7), rounding_rank(s, 2, 1.2e-7)
    (3, 2)
    >>> band = torch.tensor([1.0, 1e-3, 2.5e-15, 2e-15, 1.8e-15], dtype=torch.float64)
    >>> print(rounding_rank(band, 4, 2.2e-16))  # float64: its band crosses the floor
    None
    """
    s = singular_values.to(torch.float64)
    last = next((k for k in range(count, 0, -1) if above_rounding(s, k, eps)), 0)
    if last == count:
        return count
    if last == 0 or float(s[last - 1]) < ROUNDING_CLEARANCE * float(s[last]):
        return None
    return last


def gap_at(singular_values: torch.Tensor, rank: int, eps: float) -> float:
    """``s_rank / s_{rank+1}`` of ``singular_values`` ``(k,)`` (descending): ``inf`` when
    ``s_{rank+1}`` is absent or roundoff (at most ``RANK_FLOOR * eps * s_1``), ``0`` at
    rank 0.

    Examples
    --------
    >>> gap_at(torch.tensor([3.0, 2.0, 1e-17], dtype=torch.float64), 2, 2.2e-16)
    inf
    >>> gap_at(torch.tensor([3.0, 2.0, 1e-3], dtype=torch.float64), 2, 2.2e-16)
    2000.0
    """
    if rank <= 0:
        return 0.0
    following = float(singular_values[rank]) if rank < singular_values.numel() else 0.0
    if following <= RANK_FLOOR * eps * float(singular_values[0]):
        return math.inf
    return float(singular_values[rank - 1]) / following


def factorise(weight_grad: torch.Tensor, eps: float, rank: int | None = None) -> Factorisation:
    """Truncated SVD of the weight gradient at its numerical (or given) rank.

    Parameters
    ----------
    weight_grad:
        ``(m, n)`` float64.
    eps:
        Machine epsilon of the dtype the gradient arrived in.
    rank:
        Use this rank instead of estimating it.

    Returns
    -------
    Factorisation
    """
    u, s, vh = torch.linalg.svd(weight_grad, full_matrices=False)
    b, gap = estimate_rank(s, eps)
    if rank is not None:
        b = max(0, min(int(rank), s.numel()))
        gap = gap_at(s, b, eps)
    return Factorisation(left=u[:, :b] * s[:b], right=vh[:b], singular_values=s, rank=b, gap=gap)


#: LAPACK driver of :func:`least_squares` on the CPU: the SVD-based ``gelsd``, whose
#: results do not depend on where its inputs sit in memory. PyTorch's default there,
#: ``gelsy`` (QR with column pivoting), gives results that differ in their last bits
#: with the inputs' memory alignment (measured with PyTorch's MKL build: up to 5e-16 on
#: copies of the same matrices at other offsets), so that two runs of the attack with the
#: same seed took different paths through its searches and returned different results.
CPU_LEAST_SQUARES_DRIVER = "gelsd"


def least_squares(design: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares solution ``x`` of ``design @ x = target``.

    ``design`` ``(*, m, k)``, ``target`` ``(*, m, j)``; returns ``(*, k, j)``, as
    ``torch.linalg.lstsq(design, target).solution``. On the CPU with
    :data:`CPU_LEAST_SQUARES_DRIVER`, so that the same inputs give the same bits
    wherever they are stored (runs are reproducible); elsewhere with the device's only
    driver (``gels`` on CUDA: ``design`` of full column rank).
    """
    driver = CPU_LEAST_SQUARES_DRIVER if design.device.type == "cpu" else None
    return torch.linalg.lstsq(design, target, driver=driver).solution


def orthonormal_basis(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """``(m, rank)`` orthonormal basis of the leading column space of ``matrix`` (m, k)."""
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank].contiguous()


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm with the sign fixed (largest-magnitude entry positive).

    Parameters
    ----------
    vectors:
        ``(k, r)``.

    Returns
    -------
    torch.Tensor
        ``(k, r)``; rows of zero norm stay zero.
    """
    norms = vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    out = vectors / norms
    idx = out.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(out.gather(1, idx))
    sign[sign == 0] = 1.0
    return out * sign


def zero_mask(values: torch.Tensor, zero_tol: float) -> torch.Tensor:
    """Which entries are zero relative to each column's largest magnitude.

    Parameters
    ----------
    values:
        ``(m, k)``: one vector per column.
    zero_tol:
        Relative tolerance.

    Returns
    -------
    torch.Tensor
        ``(m, k)`` bool.
    """
    magnitude = values.abs()
    return magnitude <= zero_tol * magnitude.amax(dim=0, keepdim=True)


def null_vectors(mats: torch.Tensor) -> torch.Tensor:
    """A unit kernel vector of each ``(d - 1) x d`` matrix of a batch.

    The last column of the complete QR factor of each transpose is orthogonal to the
    matrix's ``d - 1`` rows (Householder QR is backward stable, so its product with the
    matrix is roundoff). It is the kernel vector up to sign when the rows are independent
    and some kernel vector otherwise, as the smallest right singular vector would be, and
    batched QR costs a fraction of a batched SVD (measured: 8,320 matrices 7 x 8 in 36 ms
    against 139 ms; 512 matrices 31 x 32 in 19 ms against 328 ms).

    Parameters
    ----------
    mats:
        ``(N, d - 1, d)``.

    Returns
    -------
    torch.Tensor
        ``(N, d)`` unit vectors ``w`` with ``mats[i] @ w[i]`` at roundoff.

    Examples
    --------
    >>> a = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    >>> null_vectors(a).abs()
    tensor([[0., 0., 1.]], dtype=torch.float64)
    """
    n, rows, d = mats.shape
    if rows == 0:
        return torch.ones(n, d, dtype=mats.dtype, device=mats.device)
    q, _ = torch.linalg.qr(mats.mT, mode="complete")  # (N, d, d)
    return q[:, :, -1]


#: Singular values are read from the eigenvalues of the Gram matrix ``rows^T rows`` (about
#: half the cost of an SVD: measured 1.3 ms against 2.6 ms for 150 x 120 rows, one
#: thread) when the threshold they are compared with is at least this. Those eigenvalues
#: carry float64 roundoff of about ``1e-16 ||rows||^2`` (at most ``1e-16`` for rows of an
#: orthonormal basis), at least ``1e6`` times below the squared threshold; the kernel
#: vectors carry that roundoff over the gap between the squared singular values on either
#: side of the threshold, ``1e-6`` where the gap is the squared threshold itself, well
#: inside the zero tolerances that go with such thresholds (low-precision updates:
#: float32's are above ``1e-5``). Smaller thresholds (float64) keep the SVD.
GRAM_THRESHOLD = 1e-5


def _ascending_spectrum(rows: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values ``(r,)`` of ``rows`` ``(k, r)``, ascending and zero-padded when
    ``k < r``, and the right singular vectors ``(r, r)`` as columns in the same order: from
    the Gram matrix where ``limit`` (the threshold they will be compared with) is at least
    :data:`GRAM_THRESHOLD`, else from an SVD (complete only when ``k < r``)."""
    k, r = rows.shape
    if limit >= GRAM_THRESHOLD:
        values, vectors = torch.linalg.eigh(rows.T @ rows)  # ascending
        return values.clamp_min(0.0).sqrt(), vectors
    _, s, vh = torch.linalg.svd(rows, full_matrices=k < r)
    full = torch.zeros(r, dtype=rows.dtype, device=rows.device)
    full[: s.numel()] = s
    return torch.flip(full, dims=[0]), torch.flip(vh, dims=[0]).T


def low_singular_basis(rows: torch.Tensor, limit: float) -> torch.Tensor:
    """``(r, d)`` orthonormal basis of the right singular vectors of ``rows`` ``(k, r)``
    whose singular values are at most ``limit`` (with every direction ``rows`` cannot
    see when ``k < r``): the numerical kernel, from the Gram matrix's eigenvectors where
    ``limit >= GRAM_THRESHOLD``, else from an SVD."""
    values, vectors = _ascending_spectrum(rows, limit)
    return vectors[:, : int((values <= limit).sum())]


def smallest_singular_vector(rows: torch.Tensor, limit: float) -> torch.Tensor:
    """``(r,)`` unit right singular vector of ``rows`` ``(k, r)``, ``k >= r``, with the
    smallest singular value (the least-squares kernel vector), from the Gram matrix where
    ``limit`` (the degeneracy tolerance of the problem) is at least ``GRAM_THRESHOLD``,
    else from an SVD."""
    return _ascending_spectrum(rows, limit)[1][:, 0]


def kernel(rows: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerical kernel of a row subset of an orthonormal basis.

    Parameters
    ----------
    rows:
        ``(k, r)`` float64, rows of an ``(m, r)`` matrix with orthonormal columns.
    tol:
        Singular values at or below ``tol * sqrt(k)`` count as zero (a kernel vector of
        such a subset has entries of the size of the zero tolerance on each row).

    Returns
    -------
    basis:
        ``(r, d)`` orthonormal basis of the kernel (``d`` may be 0).
    singular_values:
        ``(r,)`` the singular values, padded with zeros when ``k < r``, ascending.
    """
    k, r = rows.shape
    if k == 0:
        return (
            torch.eye(r, dtype=rows.dtype, device=rows.device),
            torch.zeros(r, dtype=rows.dtype, device=rows.device),
        )
    limit = tol * math.sqrt(k)
    values, vectors = _ascending_spectrum(rows, limit)
    return vectors[:, : int((values <= limit).sum())], values


def least_absolute_fit(target: torch.Tensor, design: torch.Tensor) -> torch.Tensor | None:
    """Coefficients ``c`` ``(k,)`` minimising ``sum_j |target_j + (design @ c)_j|``.

    Where most rows of ``target + design @ c`` should be exactly zero and a minority are
    not (a zero set predicted by a pattern some of whose units moved), least squares
    spreads the wrong rows' error over every coefficient; this L1 fit is exact on the
    right rows when the wrong ones are few enough (docs/algorithm.md, fact 11). It is
    solved as a linear program (SciPy's HiGHS) in ``k + n`` variables.

    Parameters
    ----------
    target:
        ``(n,)`` float64.
    design:
        ``(n, k)`` float64.

    Returns
    -------
    torch.Tensor | None
        ``(k,)`` float64 on ``design``'s device, or ``None`` when the program fails.
    """
    n, k = design.shape
    a = design.detach().cpu().numpy()
    t = target.detach().cpu().numpy()
    slack = identity(n, format="csr")
    # |target + design c| <= s, row by row: design c - s <= -target, -design c - s <= target
    a_ub = vstack([hstack([csr_matrix(a), -slack]), hstack([csr_matrix(-a), -slack])]).tocsr()
    cost = np.concatenate([np.zeros(k), np.ones(n)])
    res = linprog(
        cost,
        A_ub=a_ub,
        b_ub=np.concatenate([-t, t]),
        bounds=[(None, None)] * k + [(0, None)] * n,
        method="highs",
    )
    if res.status != 0:
        return None
    return torch.from_numpy(res.x[:k]).to(dtype=design.dtype, device=design.device)


def beyond_span(kern: torch.Tensor, span: torch.Tensor, tol: float) -> torch.Tensor | None:
    """The one direction of ``span(kern)`` outside ``span(span)``, when there is exactly one.

    Parameters
    ----------
    kern:
        ``(r, d)`` orthonormal columns (a kernel).
    span:
        ``(r, k)`` orthonormal columns (known directions).
    tol:
        A principal vector of ``kern`` within this distance of ``span(span)`` lies in it.

    Returns
    -------
    torch.Tensor | None
        ``(r,)`` unit vector of ``span(kern)`` orthogonal to its part in ``span(span)``,
        or ``None`` when ``span(kern)`` reaches more or fewer than one dimension beyond.
    """
    d = kern.shape[1]
    if not (bool(torch.isfinite(kern).all()) and bool(torch.isfinite(span).all())):
        return None
    if span.shape[1] == 0:
        return kern[:, 0] if d == 1 else None
    u, _, _ = torch.linalg.svd(kern.T @ span, full_matrices=True)  # (d, d), nearest first
    vecs = kern @ u
    dist = (vecs - span @ (span.T @ vecs)).norm(dim=0)
    outside = torch.nonzero(dist > tol).flatten()
    if outside.numel() != 1:
        return None
    w = vecs[:, int(outside[0])]
    return w / w.norm()


#: A row whose leverage in a row subset is within this of 1 is essential to it.
ESSENTIAL_LEVERAGE = 1e-6
#: A kernel is clearly one-dimensional when the next singular value is this many times
#: above the degeneracy threshold.
KERNEL_GAP = 100.0


#: With a separation test (lower precisions), a zero set needs at least this many times
#: ``r - 1`` rows: just above ``r - 1`` rows, any subset is near-degenerate and the test
#: cannot tell a column from a mixture (true columns' zero sets measured 3.5 to 4 times
#: ``r - 1`` at b = 128 to 256; 784 -> 1000 / 2000).
SEPARATION_MIN_ROWS = 2.0


def expected_edge(rows: torch.Tensor) -> float:
    """Smallest singular value expected of ``rows`` ``(k, r)`` were they a random subset.

    ``k`` random rows of an ``(m, r)`` orthonormal basis have singular values down to
    about ``(sqrt(k) - sqrt(r - 1)) / sqrt(m)`` (the lower Marchenko-Pastur edge, one
    dimension left for the kernel); ``m`` is read off the rows' mean squared norm,
    ``r / m``.
    """
    k, r = rows.shape
    counts = torch.tensor([k], device=rows.device)
    return float(_expected_edges(counts, (rows**2).sum().reshape(1), r)[0])


def pure_kernel(rows: torch.Tensor, tol: float, separation: float = 0.0) -> torch.Tensor | None:
    """The kernel direction of a zero set, when it is one-dimensional and stable.

    A vector mixing several examples' gradient columns vanishes on their common zero set
    (whose kernel has the dimension of the mix) and, because it was fitted there, on a few
    extra rows where the mixed entries happen to cancel. Each such extra row is essential:
    leaving it out raises the kernel's dimension. A true column's zero set has no
    essential row. So the kernel is accepted only when it is one-dimensional and no row
    has leverage (diagonal of the hat matrix of ``rows``' column space) near 1
    (docs/algorithm.md, fact 10).

    Parameters
    ----------
    rows:
        ``(k, r)`` float64 rows of an orthonormal basis.
    tol:
        Degeneracy tolerance as in :func:`kernel`.
    separation:
        The second-smallest singular value must be at least this fraction of
        :func:`expected_edge` (``Tolerances.separation``; 0 for float64).

    Returns
    -------
    torch.Tensor | None
        ``(r,)`` unit kernel vector, or ``None``.
    """
    k, r = rows.shape
    if k < r:
        return None
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)
    energy = (rows**2).sum().reshape(1)
    counts = torch.tensor([k], device=rows.device)
    if not bool(_one_stable_kernel(s[None], counts, energy, r, tol, separation)[0]):
        return None
    leverage = (u[:, : r - 1] ** 2).sum(dim=1)
    if float(leverage.max()) > 1.0 - ESSENTIAL_LEVERAGE:
        return None
    return vh[-1]


#: :func:`pure_kernels` takes the singular values of at most this many entries
#: (zero sets x rows x columns) at a time.
PURE_KERNEL_CHUNK = 1 << 23


def pure_kernels(
    rows: torch.Tensor, zero_sets: torch.Tensor, tol: float, separation: float = 0.0
) -> list[torch.Tensor | None]:
    """:func:`pure_kernel` of ``rows[zero_sets[:, i]]`` for every column ``i``.

    Most zero sets of a search fail on their singular values alone (their kernel is
    several-dimensional, or not separated). Those values come for all zero sets at once
    from one batched decomposition of ``rows`` with the other rows masked out (zero rows
    change no singular value); only the zero sets that pass get the full test.

    Parameters
    ----------
    rows:
        ``(m, r)`` float64 rows of an orthonormal basis.
    zero_sets:
        ``(m, N)`` bool.
    tol, separation:
        As in :func:`pure_kernel`.

    Returns
    -------
    list[torch.Tensor | None]
        ``N`` entries: the ``(r,)`` unit kernel vector, or ``None``.
    """
    m, r = rows.shape
    n = zero_sets.shape[1]
    counts = zero_sets.sum(dim=0)  # (N,)
    energy = zero_sets.T.to(rows.dtype) @ (rows**2).sum(dim=1)  # (N,)
    passed = torch.zeros(n, dtype=torch.bool, device=rows.device)
    step = max(1, PURE_KERNEL_CHUNK // max(1, m * r))
    for start in range(0, n, step):
        part = slice(start, min(n, start + step))
        sets = zero_sets[:, part]
        if not bool((counts[part] >= r).any()):
            continue
        s = torch.linalg.svdvals(rows[None] * sets.T[:, :, None].to(rows.dtype))  # (n_i, r)
        passed[part] = _one_stable_kernel(s, counts[part], energy[part], r, tol, separation)
    return [
        pure_kernel(rows[zero_sets[:, i]], tol, separation) if bool(passed[i]) else None
        for i in range(n)
    ]


def _one_stable_kernel(
    s: torch.Tensor,
    counts: torch.Tensor,
    energy: torch.Tensor,
    r: int,
    tol: float,
    separation: float,
) -> torch.Tensor:
    """Which zero sets have one clearly separated kernel direction, from singular values.

    Parameters
    ----------
    s:
        ``(N, r)`` descending singular values of each zero set's rows (zero-padded when a
        set has fewer than ``r`` rows).
    counts:
        ``(N,)`` rows in each zero set.
    energy:
        ``(N,)`` squared Frobenius norm of each zero set's rows.
    r, tol, separation:
        Columns of the basis, and the tolerances of :func:`pure_kernel`.

    Returns
    -------
    torch.Tensor
        ``(N,)`` bool.
    """
    k = counts.to(s.dtype)
    limit = tol * torch.sqrt(k)
    small = s <= limit[:, None]
    ok = (counts >= r) & (small.sum(dim=1) == 1) & small[:, -1]
    if r > 1:
        # a second direction nearly in the kernel: not clearly one-dimensional
        ok &= s[:, -2] > KERNEL_GAP * limit
    if separation > 0.0:
        # nearly a two-dimensional kernel, or too few rows to tell
        ok &= counts >= SEPARATION_MIN_ROWS * (r - 1)
        if r > 1:
            ok &= s[:, -2] >= separation * _expected_edges(counts, energy, r)
    return ok


def _expected_edges(counts: torch.Tensor, energy: torch.Tensor, r: int) -> torch.Tensor:
    """:func:`expected_edge` of ``N`` zero sets from their row counts and energies ``(N,)``."""
    k = counts.to(energy.dtype).clamp(min=1)
    width = (torch.sqrt(k) - math.sqrt(max(r - 1, 0))).clamp(min=0.0)
    return width * torch.sqrt(energy / (k * r))
