"""Tests for spear.linalg: rank, factorisation, kernels, tolerances."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import layer_case

from spear.linalg import (
    GRAM_THRESHOLD,
    LOW_PRECISION_HEADROOM,
    LOW_PRECISION_MIN_ULPS,
    MAX_ZERO_TOL,
    MIN_ZERO_TOL,
    Tolerances,
    above_rounding,
    clean_rank,
    estimate_rank,
    factorise,
    kernel,
    least_absolute_fit,
    least_squares,
    low_singular_basis,
    null_vectors,
    orthonormal_basis,
    pure_kernel,
    rounding_rank,
    unit_rows,
    zero_mask,
)

EPS64 = float(torch.finfo(torch.float64).eps)
EPS32 = float(torch.finfo(torch.float32).eps)


def _low_rank(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, n, generator=g, dtype=torch.float64
    )


# ---------------------------------------------------------------- rank


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(2, 60),
    n=st.integers(2, 60),
    r=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_factorise_finds_the_exact_rank_and_reproduces_the_matrix(
    m: int, n: int, r: int, seed: int
) -> None:
    r = min(r, m - 1, n - 1) if min(m, n) > 1 else 1
    r = max(r, 1)
    a = _low_rank(m, n, r, seed)
    fac = factorise(a, EPS64)
    assert fac.rank == r
    assert fac.left.shape == (m, r) and fac.right.shape == (r, n)
    assert float((fac.left @ fac.right - a).abs().max()) <= 1e-12 * float(a.abs().max())
    # right has orthonormal rows
    eye = fac.right @ fac.right.T
    assert torch.allclose(eye, torch.eye(r, dtype=torch.float64), atol=1e-12)
    assert fac.gap > 1e6
    assert fac.condition >= 1.0


def test_estimate_rank_zero_matrix_and_full_rank() -> None:
    assert estimate_rank(torch.zeros(5, dtype=torch.float64), EPS64) == (0, math.inf)
    s = torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64)
    rank, gap = estimate_rank(s, EPS64)
    assert rank == 3 and gap == math.inf


def test_estimate_rank_ignores_gaps_inside_the_roundoff_floor() -> None:
    # a huge ratio between two values that are both roundoff must not set the rank
    s = torch.tensor([1.0, 0.5, 1e-15, 1e-30], dtype=torch.float64)
    rank, _ = estimate_rank(s, EPS64)
    assert rank == 2


def test_clean_rank_counts_a_small_value_far_above_the_roundoff() -> None:
    # two examples a hair apart leave a small singular value (9e-13 of the first) that
    # still stands thousands of times above float64's roundoff: it is an example, and
    # the largest ratio (at 7) leaves it out
    s = torch.tensor([1.0, 0.8, 0.5, 0.36, 0.32, 0.26, 0.23, 9e-13, 1.5e-16, 1e-16])
    assert estimate_rank(s.double(), EPS64)[0] == 7
    assert clean_rank(s.double(), EPS64) == 8
    # noise fills every direction after the examples (a full-rank band): the last clean
    # drop is the one into it, and a band with no drop at all gives none
    noisy = torch.tensor([1.0, 0.8, 0.5, 1e-9, 8e-10, 6e-10, 5e-10, 4e-10, 3e-10, 2e-10])
    assert clean_rank(noisy.double(), EPS64) == 3
    assert clean_rank(noisy[3:].double(), EPS64) is None
    # small directions that do end in a clean drop into the roundoff are part of the
    # update, and an answer at rank 3 would leave them unexplained
    ending = torch.tensor([1.0, 0.8, 0.5, 1e-9, 8e-10, 6e-10, 5e-10, 4e-10, 3e-15, 2e-15])
    assert clean_rank(ending.double(), EPS64) == 8
    # in float32 the same small value is roundoff
    assert clean_rank(s.double(), EPS32) == 7


def test_clean_rank_finds_the_drop_where_the_roundoff_band_crosses_the_floor() -> None:
    # float64 roundoff after the last example is a band of 15 to 25 eps (measured on a
    # 200 x 784 gradient), partly above the floor of 10 eps: the drop into it still counts
    s = torch.tensor([1.0, 0.6, 0.3, 0.07, 3e-12, 5e-15, 4e-15, 3e-15, 3e-15, 1e-15])
    assert clean_rank(s.double(), EPS64) == 5
    # roundoff above the floor that falls into exact zeros is no example
    band = torch.tensor([1.0, 0.5, 0.2, 4e-15, 3e-15, 0.0, 0.0])
    assert clean_rank(band.double(), EPS64) == 3


def test_estimate_rank_float32_floor_is_coarser() -> None:
    # 1e-9 relative is signal for float64 but roundoff for float32
    s = torch.tensor([1.0, 0.9, 1e-9, 1e-20], dtype=torch.float64)
    assert estimate_rank(s, EPS64)[0] == 3
    assert estimate_rank(s, EPS32)[0] == 2


def test_estimate_rank_small_last_value_clear_of_roundoff_is_a_clear_gap() -> None:
    # a float32 update whose last example's gradient is tiny (a confident example of a
    # trained network: 7e-6 of the largest) with roundoff after it: the gap is clear,
    # although the ratio (466) is small; noise above the roundoff leaves the ratio
    s = torch.tensor([1.0, 0.2, 0.03, 2.4e-4, 7e-6, 1.5e-8, 1.4e-8], dtype=torch.float64)
    assert estimate_rank(s, EPS32) == (5, math.inf)
    noisy = torch.diag(torch.tensor([1.0, 0.5, 0.1, 1e-3, 9e-4, 8e-4], dtype=torch.float64))
    assert factorise(noisy, EPS32, rank=3).gap == pytest.approx(100.0)
    a = torch.diag(s)
    assert factorise(a, EPS32, rank=5).gap == math.inf
    assert factorise(a, EPS64, rank=5).gap == pytest.approx(7e-6 / 1.5e-8)


def test_factorise_with_given_rank_truncates() -> None:
    a = _low_rank(20, 15, 6, 0)
    fac = factorise(a, EPS64, rank=4)
    assert fac.rank == 4 and fac.left.shape == (20, 4)
    s = torch.linalg.svdvals(a)
    assert fac.gap == pytest.approx(float(s[3] / s[4]), rel=1e-12)


def test_factorise_float32_gradient_rank() -> None:
    case = layer_case(80, 40, 7, seed=3, dtype=torch.float32)
    fac = factorise(case.weight_grad.to(torch.float64), EPS32)
    assert fac.rank == 7


# ---------------------------------------------------------------- tolerances


def test_tolerances_scale_with_dtype_and_condition() -> None:
    t64 = Tolerances.derive(torch.float64, 10.0)
    t64_bad = Tolerances.derive(torch.float64, 1e8)
    t32 = Tolerances.derive(torch.float32, 10.0)
    assert MIN_ZERO_TOL <= t64.zero_tol < t32.zero_tol <= MAX_ZERO_TOL
    assert t64.zero_tol <= t64_bad.zero_tol
    # float32: from the measured noise floor s_{b+1}/s_b, well below the old fixed 1e-4
    t32_floor = Tolerances.derive(torch.float32, 10.0, noise_floor=2e-6)
    assert t32_floor.zero_tol == pytest.approx(LOW_PRECISION_HEADROOM * 2e-6)
    assert t32_floor.degeneracy_tol < t32_floor.zero_tol
    assert t32.zero_tol >= LOW_PRECISION_HEADROOM * LOW_PRECISION_MIN_ULPS * EPS32 * 0.999
    # a noise floor never changes float64
    assert Tolerances.derive(torch.float64, 10.0, noise_floor=1e-3) == t64
    assert t64.eps == EPS64 and t32.eps == EPS32
    # infinite condition does not blow up the tolerance
    assert Tolerances.derive(torch.float64, math.inf).zero_tol <= MAX_ZERO_TOL


@pytest.mark.parametrize("d", [1, 2, 5, 9])
def test_null_vectors_are_unit_kernel_vectors(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    mats = torch.randn(50, d - 1, d, generator=gen, dtype=torch.float64)
    w = null_vectors(mats)
    assert w.shape == (50, d)
    assert torch.allclose(w.norm(dim=1), torch.ones(50, dtype=torch.float64))
    residual = (mats @ w[:, :, None]).abs()  # (50, d - 1, 1); empty for d = 1
    assert bool((residual < 1e-12).all())
    if d > 1:  # independent rows: the kernel vector, up to sign
        ref = torch.linalg.svd(mats, full_matrices=True).Vh[:, -1, :]
        assert torch.allclose((ref * w).sum(dim=1).abs(), torch.ones(50, dtype=torch.float64))


# ---------------------------------------------------------------- small helpers


def test_unit_rows_fixes_norm_and_sign() -> None:
    v = torch.tensor([[3.0, -4.0], [0.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    u = unit_rows(v)
    assert torch.allclose(u[0], torch.tensor([-0.6, 0.8], dtype=torch.float64))
    assert torch.equal(u[1], torch.zeros(2, dtype=torch.float64))
    assert float(u[2].norm()) == pytest.approx(1.0)
    assert float(u[2, 0]) > 0  # largest-magnitude entry made positive
    # same direction up to sign and scale gives the same unit row
    assert torch.allclose(unit_rows(-7 * v[:1]), u[:1])


def test_zero_mask_is_relative_to_each_column() -> None:
    v = torch.tensor([[1.0, 1e-6], [1e-12, 1e-18], [0.5, 1e-7]], dtype=torch.float64)
    mask = zero_mask(v, 1e-10)
    assert mask.tolist() == [[False, False], [True, True], [False, False]]


def test_orthonormal_basis_spans_the_columns() -> None:
    a = _low_rank(30, 8, 5, 1)
    basis = orthonormal_basis(a, 5)
    assert torch.allclose(basis.T @ basis, torch.eye(5, dtype=torch.float64), atol=1e-12)
    proj = basis @ (basis.T @ a)
    assert float((proj - a).abs().max()) < 1e-10 * float(a.abs().max())


# ---------------------------------------------------------------- kernels


def test_kernel_of_true_zero_sets_is_the_true_direction() -> None:
    case = layer_case(120, 50, 8, seed=5)
    fac = factorise(case.weight_grad, EPS64)
    basis = orthonormal_basis(fac.left, fac.rank)
    g = case.output_grads
    coords = torch.linalg.lstsq(basis, g).solution  # (r, b) true directions
    coords = coords / coords.norm(dim=0)
    tol = Tolerances.derive(torch.float64, fac.condition)
    for i in range(g.shape[1]):
        zeros = g[:, i] == 0
        ker, sv = kernel(basis[zeros], tol.degeneracy_tol)
        assert ker.shape == (8, 1)
        assert abs(float(ker[:, 0] @ coords[:, i])) == pytest.approx(1.0, abs=1e-10)
        assert sv.shape == (8,) and bool((sv[1:] >= sv[:-1]).all())
        pure = pure_kernel(basis[zeros], tol.degeneracy_tol)
        assert pure is not None
        assert abs(float(pure @ coords[:, i])) == pytest.approx(1.0, abs=1e-10)


def test_kernel_of_a_shared_zero_set_is_multidimensional_and_not_pure() -> None:
    case = layer_case(120, 50, 8, seed=6)
    fac = factorise(case.weight_grad, EPS64)
    basis = orthonormal_basis(fac.left, fac.rank)
    g = case.output_grads
    both = (g[:, 0] == 0) & (g[:, 1] == 0)
    assert int(both.sum()) >= 8
    ker, _ = kernel(basis[both], 1e-10)
    assert ker.shape[1] == 2
    assert pure_kernel(basis[both], 1e-10) is None


@pytest.mark.parametrize("dims", [0, 1, 3])
@pytest.mark.parametrize("rows_count", [40, 10])
def test_low_singular_basis_gram_and_svd_paths_agree(dims: int, rows_count: int) -> None:
    """The kernel read from the Gram matrix (thresholds >= GRAM_THRESHOLD, float32-sized)
    spans the same space as the SVD's, including the directions fewer rows cannot see."""
    gen = torch.Generator().manual_seed(dims + rows_count)
    r = 12
    q = torch.linalg.qr(torch.randn(200, r, generator=gen, dtype=torch.float64)).Q
    hidden = torch.linalg.qr(torch.randn(r, dims, generator=gen, dtype=torch.float64)).Q
    rows = q[torch.randperm(200, generator=gen)[:rows_count]]
    rows = rows - (rows @ hidden) @ hidden.T  # exactly zero on `dims` directions
    rows = rows + 1e-7 * torch.randn(rows.shape, generator=gen, dtype=torch.float64)
    expected = max(dims, r - rows_count)
    for limit in (GRAM_THRESHOLD, 1e-6):  # Gram path, SVD path
        ker = low_singular_basis(rows, limit * math.sqrt(r))
        assert ker.shape == (r, expected)
        assert torch.allclose(ker.T @ ker, torch.eye(expected, dtype=torch.float64), atol=1e-10)
        assert float((rows @ ker).norm()) < 1e-5
        if rows_count >= r:  # the hidden directions themselves span the kernel
            assert float((hidden - ker @ (ker.T @ hidden)).norm()) < 1e-5


def test_kernel_empty_and_too_few_rows() -> None:
    ker, sv = kernel(torch.zeros(0, 4, dtype=torch.float64), 1e-10)
    assert ker.shape == (4, 4) and bool((sv == 0).all())
    rows = torch.randn(2, 4, dtype=torch.float64)
    ker, _ = kernel(rows, 1e-10)
    assert ker.shape == (4, 2)
    assert float((rows @ ker).abs().max()) < 1e-12
    assert pure_kernel(rows, 1e-10) is None  # fewer rows than r - 1 is never pure


def test_least_absolute_fit_is_exact_on_the_rows_a_minority_leaves_alone() -> None:
    """Rows that should be zero, a tenth of them hit by large errors: least squares is
    pulled off on every coefficient, the L1 fit is exact."""
    gen = torch.Generator().manual_seed(0)
    design = torch.randn(300, 40, generator=gen, dtype=torch.float64)
    coeffs = torch.randn(40, generator=gen, dtype=torch.float64)
    target = -design @ coeffs
    hit = torch.randperm(300, generator=gen)[:30]
    target[hit] += 5 * torch.randn(30, generator=gen, dtype=torch.float64)
    plain = torch.linalg.lstsq(design, -target[:, None]).solution[:, 0]
    assert float((plain - coeffs).abs().max()) > 1e-2
    fitted = least_absolute_fit(target, design)
    assert fitted is not None
    assert float((fitted - coeffs).abs().max()) < 1e-9


def _stored_at(tensor: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``tensor`` that starts ``offset`` elements into a fresh buffer (another
    memory alignment)."""
    buffer = torch.zeros(tensor.numel() + 16, dtype=tensor.dtype)
    copy = buffer[offset : offset + tensor.numel()].view(tensor.shape)
    copy.copy_(tensor)
    return copy


@pytest.mark.parametrize("shape", [(120, 28, 3), (400, 32, 32), (1000, 64, 1), (50, 400, 3)])
def test_least_squares_gives_the_same_bits_wherever_its_inputs_are_stored(
    shape: tuple[int, int, int],
) -> None:
    # the searches branch on the last bits of their products, so a solve whose bits
    # depend on the memory alignment of its inputs makes two runs with the same seed
    # differ (PyTorch's default CPU driver, gelsy, with MKL: up to 5e-16 here)
    m, k, j = shape
    generator = torch.Generator().manual_seed(m + k)
    design = torch.randn(m, k, dtype=torch.float64, generator=generator)
    target = torch.randn(m, j, dtype=torch.float64, generator=generator)
    first = least_squares(design, target)
    assert torch.allclose(first, torch.linalg.pinv(design) @ target, rtol=1e-9, atol=1e-12)
    for offset in range(1, 8):
        again = least_squares(_stored_at(design, offset), _stored_at(target, offset))
        assert torch.equal(again, first)


def test_least_squares_of_a_rank_deficient_design_is_the_minimum_norm_solution() -> None:
    generator = torch.Generator().manual_seed(3)
    design = torch.randn(80, 5, dtype=torch.float64, generator=generator) @ torch.randn(
        5, 12, dtype=torch.float64, generator=generator
    )  # (80, 12) of rank 5
    target = torch.randn(80, 2, dtype=torch.float64, generator=generator)
    found = least_squares(design, target)
    assert torch.allclose(found, torch.linalg.pinv(design) @ target, rtol=1e-8, atol=1e-10)
    batched = least_squares(torch.stack([design, 2 * design]), torch.stack([target, target]))
    assert torch.allclose(batched[0], found, rtol=1e-10, atol=1e-12)
    assert torch.allclose(batched[1], found / 2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("m", "n", "r", "seed"), [(120, 400, 30, 0), (300, 784, 64, 1)])
def test_float32_rounding_is_no_direction_and_a_weak_example_above_it_is(
    m: int, n: int, r: int, seed: int
) -> None:
    # a rank-r product rounded to float32: its rounding is a band far under
    # RANK_FLOOR * eps * s_1 whose values are not directions; one more rank-one term
    # at 2 eps * s_1, under that floor but well above the band, is one
    exact = _low_rank(m, n, r, seed)
    s = torch.linalg.svdvals(exact.float().double())
    assert rounding_rank(s, r + 10, EPS32) == r
    assert not above_rounding(s, r + 1, EPS32)
    g = torch.Generator().manual_seed(seed + 100)
    u = torch.randn(m, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, n, generator=g, dtype=torch.float64)
    weak = u @ v / (u.norm() * v.norm()) * 2 * EPS32 * float(s[0])
    s = torch.linalg.svdvals((exact + weak).float().double())
    assert 1.0 < float(s[r] / s[0]) / EPS32 < 10.0
    assert above_rounding(s, r + 1, EPS32)
    assert rounding_rank(s, r + 10, EPS32) == r + 1


def test_values_sinking_through_the_rounding_without_a_drop_give_no_rounding_rank() -> None:
    # halving at every step from 1 to 1e-12: no value stands four times above the next,
    # so the spectrum shows no place where the update's directions end and its rounding
    # begins; one clean drop of 30 into a flat band shows it
    halving = 0.5 ** torch.arange(40, dtype=torch.float64)
    assert rounding_rank(halving, 30, EPS32) is None
    band = torch.cat([halving[:21], torch.full((10,), float(halving[20]) / 30.0)])
    assert float(band[20]) < 10 * EPS32  # under RANK_FLOOR units: only the drop tells
    assert rounding_rank(band, 25, EPS32) == 21
