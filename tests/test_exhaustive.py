"""Small layers: the exhaustive search returns every example wherever brute force finds it.

The property behind it: on a layer small enough to enumerate, whether the attack succeeds
must not depend on the CPU, its BLAS kernels or the number of threads, only on the
problem. Brute force (every ``(b-1)``-row subset, :func:`tests.conftest.reference_directions`,
counting zeros on live rows) says which problems are solvable from the zero patterns;
wherever it finds every true gradient column, :func:`spear.invert_layer` with the layer's
weights must return every example exactly, with one thread and with two. The exhaustive
step goes further for one example whose zero set has only ``b - 1`` live rows (its own
ReLU pattern completes it); the known cases below pin that.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tests.conftest import LayerCase, assert_exact, layer_case, reference_directions

import spear
from spear.exhaustive import combinations_by_last, exhaustive_subsets
from spear.linalg import orthonormal_basis
from spear.solvers.polish import live_rows


@st.composite
def small_layers(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """``(m, n, b, seed)`` with ``m <= 16``, ``b <= 5``, ``b < m``."""
    m = draw(st.integers(6, 16))
    b = draw(st.integers(1, min(5, m - 1)))
    n = draw(st.integers(b, 16))
    seed = draw(st.integers(0, 10**6))
    return m, n, b, seed


def _threads(count: int):  # type: ignore[no-untyped-def]
    """Run with ``count`` intra-op threads, restoring the setting afterwards."""

    class _Threads:
        def __enter__(self) -> None:
            self.before = torch.get_num_threads()
            torch.set_num_threads(count)

        def __exit__(self, *exc: object) -> None:
            torch.set_num_threads(self.before)

    return _Threads()


def _brute_force_finds_every_column(case: LayerCase) -> bool:
    """Full rank ``b``, and every true column among the brute-force reference's (zero on
    more live rows than the ``b - 1`` that determine it)."""
    b = case.inputs.shape[0]
    if int(torch.linalg.matrix_rank(case.weight_grad)) < b:
        return False
    if b == 1:
        return True
    true_dirs = case.output_grads / case.output_grads.norm(dim=0)
    reference = reference_directions(case.weight_grad, b, live_only=True)
    if reference.shape[1] == 0:
        return False
    return bool(((reference.T @ true_dirs).abs().amax(dim=0) > 1 - 1e-9).all())


def _check_small_layer(m: int, n: int, b: int, seed: int) -> None:
    case = layer_case(m, n, b, seed=seed)
    assume(_brute_force_finds_every_column(case))
    _check_exact(case, m, n, b, seed)


def _check_exact(case: LayerCase, m: int, n: int, b: int, seed: int) -> None:
    rec = spear.invert_layer(
        case.weight_grad,
        case.bias_grad,
        weight=case.weight,
        bias=case.bias,
        # b == n: the rank cannot tell b from min(m, n), so the caller must say it
        batch_size=b if b >= n else None,
        time_budget=120.0,  # a cap, not a target: exactness is what is tested
    )
    assert rec.complete, (m, n, b, seed, rec.notes)
    assert_exact(rec.inputs, case.inputs)


@pytest.mark.parametrize("threads", [1, 2])
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same cases on every CI run; wider random sweeps run by hand
    suppress_health_check=[HealthCheck.too_slow],
)
@given(params=small_layers())
def test_small_layers(threads: int, params: tuple[int, int, int, int]) -> None:
    with _threads(threads):
        _check_small_layer(*params)


def test_known_hard_small_layers() -> None:
    """Cases the sampled search missed, some with examples whose live zero set has exactly
    ``b - 1`` rows (only their own ReLU pattern singles them out)."""
    for m, n, b, seed in [
        (12, 12, 4, 0),
        (12, 6, 2, 849935),
        (10, 9, 4, 104993),
        (12, 16, 5, 587472),
        (16, 7, 5, 750381),
        (9, 7, 5, 295528),
    ]:
        case = layer_case(m, n, b, seed=seed)
        for threads in (1, 2):
            with _threads(threads):
                _check_exact(case, m, n, b, seed)


def test_exhaustive_stage_is_recorded() -> None:
    case = layer_case(12, 6, 2, seed=849935)
    rec = spear.invert_layer(case.weight_grad, case.bias_grad, weight=case.weight, bias=case.bias)
    assert rec.complete
    assert rec.solvers[0].name == "exhaustive"
    assert rec.solvers[0].found == 2


def test_combinations_come_in_order_of_their_last_item() -> None:
    combos = list(combinations_by_last(6, 3))
    assert len(combos) == 20 and len({tuple(c) for c in combos}) == 20
    lasts = [c[-1] for c in combos]
    assert lasts == sorted(lasts)


def test_large_layers_are_not_enumerated() -> None:
    case = layer_case(200, 50, 10, seed=0)
    basis = orthonormal_basis(case.weight_grad @ case.weight_grad.T, 10)
    assert exhaustive_subsets(int(live_rows(basis, 1e-11).sum()), 10) > 20_000
    rec = spear.invert_layer(case.weight_grad, case.bias_grad, weight=case.weight, bias=case.bias)
    assert "exhaustive" not in [s.name for s in rec.solvers]
    assert rec.complete
