"""Sparse directions of a noisy rank-b update: IRLS polish, zero counts, the missing span.

A synthetic update ``A = G [X^T | 1] + N`` with ``G`` half zeros, in float64, and the same
rounded to float32 noise levels: every check is against the true directions.
"""

from __future__ import annotations

import pytest
import torch

from spear.inversion.sparse_directions import (
    missing_span,
    polish_direction,
    span_distance,
    zero_count,
)


def _update(
    m: int, n: int, b: int, sigma: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A rank-``b`` ``(m, n + 1)`` update plus noise of std ``sigma``, its top-``b`` SVD.

    Returns ``(basis (m, b), singular (b,), right (b, n + 1), directions (b, b), examples
    (b, n + 1), unit)``: ``directions`` are the true gradient columns in ``basis``
    coordinates (unit columns) and ``unit`` is ``sigma / s_b``.
    """
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, b, generator=gen, dtype=torch.float64)
    g = g * (torch.rand(m, b, generator=gen, dtype=torch.float64) < 0.5)
    x = torch.rand(b, n, generator=gen, dtype=torch.float64)
    examples = torch.cat([x, torch.ones(b, 1, dtype=torch.float64)], dim=1)
    a = g @ examples + sigma * torch.randn(m, n + 1, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    basis = u[:, :b]
    directions = basis.T @ g
    directions = directions / directions.norm(dim=0)
    return basis, s[:b], vh[:b], directions, examples, sigma / float(s[b - 1])


@pytest.mark.parametrize("sigma", [0.0, 1e-6, 1e-4])
def test_polish_turns_a_mispredicted_zero_set_into_the_example_direction(sigma: float) -> None:
    m, b = 600, 12
    basis, _, _, directions, _, unit = _update(m, 80, b, sigma)
    truth = directions[:, 0]
    zeros = (basis @ truth).abs() <= 1e-9 + 10 * unit
    # a tenth of the predicted zero set is wrong: rows where the example is on
    on = (~zeros).nonzero()[:, 0]
    rows = zeros.clone()
    rows[on[: int(0.1 * int(zeros.sum()))]] = True
    _, vectors = torch.linalg.eigh(basis[rows].T @ basis[rows])
    start = vectors[:, 0]
    assert abs(float(start @ truth)) < 0.999  # least squares is pulled off by the wrong rows
    polished = polish_direction(basis, start, rows, unit)
    assert abs(float(polished @ truth)) > 1 - 1e-6
    assert float(polished.norm()) == pytest.approx(1.0)


def test_zero_count_of_an_example_direction_is_its_zero_set() -> None:
    basis, _, _, directions, _, unit = _update(500, 60, 10, 1e-6, seed=1)
    g = basis @ directions
    for i in range(10):
        expected = int((g[:, i].abs() <= 3 * unit).sum())
        assert zero_count(basis, directions[:, i], unit) == expected
        assert expected > 200  # about half of 500


def test_missing_span_holds_exactly_the_examples_not_yet_known() -> None:
    m, n, b, k = 300, 40, 8, 5
    _, singular, right, directions, examples, _ = _update(m, n, b, 0.0, seed=2)
    span = missing_span(directions[:, :k], singular, right)
    assert span.shape == (b - k, n + 1)
    q = torch.linalg.qr(span.T).Q  # (n + 1, b - k) orthonormal
    for i in range(b):
        left = examples[i] - q @ (q.T @ examples[i])
        relative = float(left.norm() / examples[i].norm())
        if i < k:
            assert relative > 0.1  # a known example is not in the span
        else:
            assert relative < 1e-10  # a missing one is


def test_span_distance() -> None:
    e = torch.eye(3, dtype=torch.float64)
    assert span_distance(e[:, :2], e[:, 2]) == pytest.approx(1.0)
    assert span_distance(e[:, :2], e[:, 0]) == pytest.approx(0.0, abs=1e-15)
    assert span_distance(e[:, :0], e[:, 1]) == pytest.approx(1.0)
