"""How good is a reconstruction? Matching, exactness, PSNR, SSIM, label accuracy.

Pure functions in the style of torchmetrics. An attack returns its examples in some
order, possibly fewer (``k``) than the batch size (``b``); :func:`match` pairs them with
the true examples (Hungarian algorithm on the mean squared error) and every other metric
works on that pairing. Compare in *pixel space*: undo any input normalisation first
(:meth:`spear.data.Normalization.invert`).

Inputs may be ``torch.Tensor`` or ``numpy`` arrays of shape ``(k, ...)`` and ``(b, ...)``
with the same per-example shape; they are compared in ``float64``.

Examples
--------
>>> import torch
>>> truth = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
>>> found = truth[[2, 0]]  # two of three, shuffled
>>> m = match(found, truth)
>>> m.rec_index.tolist(), m.truth_index.tolist(), m.unmatched_truth.tolist()
([1, 0], [0, 2], [1])
>>> exact_rate(found, truth)
0.6666666666666666
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

__all__ = [
    "DEFAULT_REL_TOL",
    "Matching",
    "exact_rate",
    "label_accuracy",
    "match",
    "psnr",
    "singled_out",
    "ssim",
    "summarize",
]

#: Default exactness tolerance, relative to the data's scale ``max |truth|``: an example is
#: recovered *exactly* when every entry is within ``1e-6 * scale`` of the truth. float64
#: solutions of well-conditioned problems are ~1e-12 off; ``1e-6`` also admits solutions
#: from float32 gradients (machine epsilon 1.2e-7) while still far below one grey level
#: (1/255 ~ 4e-3) of an 8-bit image.
DEFAULT_REL_TOL = 1e-6
#: Rank tolerance of :func:`singled_out`, relative to the largest singular value of the
#: examples still in play: float64 truth has roundoff near 1e-16, so a singular value
#: above ``1e-10`` of the largest is a dimension, not rounding.
SINGLED_OUT_RANK_TOL = 1e-10

ArrayLike = torch.Tensor | NDArray[Any]


def _as_rows(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """``(n, ...)`` tensor/array -> ``(n, d)`` float64 numpy array."""
    if isinstance(values, torch.Tensor):
        array = values.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        raise ValueError(f"{name} must have a batch axis, shape (n, ...); found a scalar.")
    return array.reshape(array.shape[0], math.prod(array.shape[1:]))


def _as_array(values: ArrayLike) -> NDArray[np.float64]:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _check_same_example_shape(reconstruction: ArrayLike, truth: ArrayLike) -> None:
    rec_shape, truth_shape = tuple(reconstruction.shape[1:]), tuple(truth.shape[1:])
    if rec_shape != truth_shape and math.prod(rec_shape) != math.prod(truth_shape):
        raise ValueError(
            f"reconstruction examples have shape {rec_shape} but truth examples have shape "
            f"{truth_shape}; both must describe the same inputs (reshape one of them, and "
            "undo any normalisation first)."
        )


@dataclass(frozen=True)
class Matching:
    """A one-to-one pairing of reconstructed and true examples, with per-pair errors.

    ``p = min(k, b)`` pairs, sorted by ``truth_index``.

    Attributes
    ----------
    rec_index:
        ``(p,)`` int64: row of the reconstruction in each pair.
    truth_index:
        ``(p,)`` int64: row of the truth in each pair (increasing).
    max_abs_error:
        ``(p,)`` float64: ``max |r - t|`` over the entries of each pair (data units).
    relative_error:
        ``(p,)`` float64: ``||r - t|| / ||t||`` (Euclidean; ``0`` when both are zero,
        ``inf`` when only ``t`` is).
    mse:
        ``(p,)`` float64: mean squared error of each pair (data units squared).
    unmatched_truth:
        ``(b - p,)`` int64: true examples with no reconstruction (sorted).
    unmatched_rec:
        ``(k - p,)`` int64: reconstructions left over when ``k > b`` (sorted).
    batch_size:
        ``b``, the number of true examples.
    scale:
        ``max |truth|``, the data's scale, which relative tolerances multiply.
    """

    rec_index: NDArray[np.int64]
    truth_index: NDArray[np.int64]
    max_abs_error: NDArray[np.float64]
    relative_error: NDArray[np.float64]
    mse: NDArray[np.float64]
    unmatched_truth: NDArray[np.int64]
    unmatched_rec: NDArray[np.int64]
    batch_size: int
    scale: float

    @property
    def num_matched(self) -> int:
        """``p``, the number of pairs."""
        return int(self.rec_index.shape[0])

    def exact(self, tol: float) -> NDArray[np.bool_]:
        """``(p,)`` bool: pairs whose max absolute error is at most ``tol`` (data units).

        For a tolerance relative to the data, pass ``rel_tol * matching.scale``.
        """
        result: NDArray[np.bool_] = self.max_abs_error <= tol
        return result


def match(reconstruction: ArrayLike, truth: ArrayLike) -> Matching:
    """Optimal one-to-one matching of reconstructed to true examples by mean squared error.

    Solves the assignment problem (:func:`scipy.optimize.linear_sum_assignment`) on the
    ``(k, b)`` matrix of mean squared errors between flattened examples. When ``k != b``
    (partial or surplus reconstructions) ``min(k, b)`` pairs are formed.

    Parameters
    ----------
    reconstruction:
        ``(k, ...)`` reconstructed examples, any order.
    truth:
        ``(b, ...)`` true examples, the same per-example shape.

    Returns
    -------
    Matching
        Pairs sorted by truth index, with per-pair errors.

    Examples
    --------
    >>> import torch
    >>> truth = torch.eye(3)
    >>> m = match(truth[[2, 0, 1]] + 0.001, truth)
    >>> m.rec_index.tolist(), bool(m.exact(0.01).all())
    ([1, 2, 0], True)
    """
    _check_same_example_shape(reconstruction, truth)
    rec = _as_rows(reconstruction, "reconstruction")
    true = _as_rows(truth, "truth")
    k, b = rec.shape[0], true.shape[0]
    scale = float(np.abs(true).max()) if true.size else 0.0
    if k and b:
        # ||r||^2 + ||t||^2 - 2 r.t avoids a (k, b, d) temporary; only used to choose the
        # pairs, whose errors are then recomputed exactly below.
        cost = ((rec**2).sum(1)[:, None] + (true**2).sum(1)[None, :] - 2.0 * rec @ true.T) / max(
            rec.shape[1], 1
        )
        rows, cols = linear_sum_assignment(np.maximum(cost, 0.0))
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    order = np.argsort(cols)
    rec_index = np.asarray(rows[order], dtype=np.int64)
    truth_index = np.asarray(cols[order], dtype=np.int64)
    difference = rec[rec_index] - true[truth_index]
    if difference.shape[1]:
        max_abs = np.abs(difference).max(axis=1)
        mse = (difference**2).mean(axis=1)
    else:
        max_abs = mse = np.zeros(difference.shape[0])
    error_norm = np.linalg.norm(difference, axis=1)
    truth_norm = np.linalg.norm(true[truth_index], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(
            truth_norm > 0, error_norm / truth_norm, np.where(error_norm > 0, np.inf, 0.0)
        )
    return Matching(
        rec_index=rec_index,
        truth_index=truth_index,
        max_abs_error=max_abs.astype(np.float64),
        relative_error=relative.astype(np.float64),
        mse=mse.astype(np.float64),
        unmatched_truth=np.setdiff1d(np.arange(b), truth_index).astype(np.int64),
        unmatched_rec=np.setdiff1d(np.arange(k), rec_index).astype(np.int64),
        batch_size=b,
        scale=scale,
    )


def exact_rate(
    reconstruction: ArrayLike,
    truth: ArrayLike,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    matching: Matching | None = None,
) -> float:
    """Fraction of true examples recovered exactly.

    An example counts when its matched reconstruction has ``max |r - t| <= rel_tol *
    max |truth|`` (the tolerance scales with the whole truth batch). The denominator is the
    batch size ``b``: examples without a reconstruction count as failures.

    Parameters
    ----------
    reconstruction, truth:
        ``(k, ...)`` and ``(b, ...)``.
    rel_tol:
        Tolerance relative to the data's scale (see :data:`DEFAULT_REL_TOL`).
    matching:
        A precomputed :func:`match` of the same arrays (saves recomputing it).

    Returns
    -------
    float
        In ``[0, 1]``; ``1.0`` for an empty batch.

    Examples
    --------
    >>> import torch
    >>> truth = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    >>> exact_rate(truth + torch.tensor([[1e-5, 0.0], [0.1, 0.0]]), truth)
    0.5
    """
    found = match(reconstruction, truth) if matching is None else matching
    if found.batch_size == 0:
        return 1.0
    return float(found.exact(rel_tol * found.scale).sum()) / found.batch_size


def _paired(
    reconstruction: ArrayLike, truth: ArrayLike, matching: Matching | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    rec, true = _as_array(reconstruction), _as_array(truth)
    if matching is not None:
        return rec[matching.rec_index], true[matching.truth_index]
    if rec.shape != true.shape:
        raise ValueError(
            f"reconstruction {rec.shape} and truth {true.shape} must have the same shape to "
            "be compared row by row; pass matching=match(reconstruction, truth) to pair "
            "them first."
        )
    return rec, true


@overload
def psnr(
    reconstruction: ArrayLike,
    truth: ArrayLike,
    data_range: float = ...,
    *,
    matching: Matching | None = ...,
    reduction: Literal["mean"] = ...,
) -> float: ...


@overload
def psnr(
    reconstruction: ArrayLike,
    truth: ArrayLike,
    data_range: float = ...,
    *,
    matching: Matching | None = ...,
    reduction: Literal["none"],
) -> NDArray[np.float64]: ...


def psnr(
    reconstruction: ArrayLike,
    truth: ArrayLike,
    data_range: float = 1.0,
    *,
    matching: Matching | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> float | NDArray[np.float64]:
    """Peak signal-to-noise ratio in decibels, per example.

    ``10 log10(data_range^2 / mse)`` for each pair, identical to
    :func:`skimage.metrics.peak_signal_noise_ratio` except that a perfect reconstruction
    gives ``inf`` instead of a division by zero.

    Parameters
    ----------
    reconstruction, truth:
        ``(b, ...)`` each, compared row by row; or any ``(k, ...)`` / ``(b, ...)`` with
        ``matching`` (then the ``p`` matched pairs are compared).
    data_range:
        Span of the pixel values (``1.0`` for images in ``[0, 1]``).
    matching:
        Pairing from :func:`match`.
    reduction:
        ``"mean"`` for the mean over pairs (``inf`` if any pair is exact, ``nan`` when
        there are no pairs), ``"none"`` for the ``(p,)`` array.

    Returns
    -------
    float or numpy.ndarray
        Decibels.

    Examples
    --------
    >>> import torch
    >>> truth = torch.zeros(2, 1, 4, 4)
    >>> rec = truth.clone(); rec[1] += 0.1
    >>> psnr(rec, truth, reduction="none").round(3).tolist()
    [inf, 20.0]
    """
    rec, true = _paired(reconstruction, truth, matching)
    count = rec.shape[0] if rec.ndim else 0
    mse = ((rec - true) ** 2).reshape(count, -1).mean(axis=1) if count else np.zeros(0)
    with np.errstate(divide="ignore"):
        values = np.where(mse > 0, 10.0 * np.log10(data_range**2 / mse), np.inf)
    values = np.asarray(values, dtype=np.float64)
    if reduction == "none":
        return values
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none'; found {reduction!r}.")
    return float(values.mean()) if count else math.nan


@overload
def ssim(
    reconstruction: ArrayLike,
    truth: ArrayLike,
    data_range: float = ...,
    *,
    matching: Matching | None = ...,
    win_size: int | None = ...,
    reduction: Literal["mean"] = ...,
) -> float: ...


@overload
def ssim(
    reconstruction: ArrayLike,
    truth: ArrayLike,
    data_range: float = ...,
    *,
    matching: Matching | None = ...,
    win_size: int | None = ...,
    reduction: Literal["none"],
) -> NDArray[np.float64]: ...


def ssim(
    reconstruction: ArrayLike,
    truth: ArrayLike,
    data_range: float = 1.0,
    *,
    matching: Matching | None = None,
    win_size: int | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> float | NDArray[np.float64]:
    """Structural similarity per image, via :func:`skimage.metrics.structural_similarity`.

    Parameters
    ----------
    reconstruction, truth:
        ``(b, C, H, W)`` or ``(b, H, W)`` images compared row by row, or any ``k`` / ``b``
        with ``matching``. Multi-channel images use ``channel_axis`` (SSIM averaged over
        channels).
    data_range:
        Span of the pixel values.
    matching:
        Pairing from :func:`match`.
    win_size:
        Odd side of the sliding window. Default: scikit-image's 7, or for images smaller
        than 7 pixels the largest odd size that fits (at least 3; smaller images raise).
    reduction:
        ``"mean"`` (``nan`` with no pairs) or ``"none"`` for the ``(p,)`` array.

    Returns
    -------
    float or numpy.ndarray
        Values in ``[-1, 1]``, ``1`` for identical images.

    Examples
    --------
    >>> import torch
    >>> truth = torch.linspace(0, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    >>> ssim(truth, truth)
    1.0
    """
    from skimage.metrics import structural_similarity

    rec, true = _paired(reconstruction, truth, matching)
    if true.ndim not in (3, 4):
        raise ValueError(
            f"ssim needs images of shape (b, C, H, W) or (b, H, W); found {true.shape}. "
            "Reshape flat inputs to their image shape first (e.g. x.reshape(-1, 1, 28, 28))."
        )
    if true.ndim == 3:
        rec, true = rec[:, None], true[:, None]
    height, width = true.shape[2:]
    if win_size is None:
        win_size = min(7, min(height, width) - (1 - min(height, width) % 2))
    if win_size < 3 or win_size % 2 == 0 or win_size > min(height, width):
        raise ValueError(
            f"ssim needs an odd window of at least 3 that fits the {height}x{width} images; "
            f"found win_size={win_size}. Images smaller than 3x3 have no SSIM: use psnr or "
            "max_abs_error instead."
        )
    values = np.empty(true.shape[0], dtype=np.float64)
    for index in range(true.shape[0]):
        if true.shape[1] == 1:
            values[index] = structural_similarity(  # type: ignore[no-untyped-call]
                true[index, 0], rec[index, 0], data_range=data_range, win_size=win_size
            )
        else:
            values[index] = structural_similarity(  # type: ignore[no-untyped-call]
                np.moveaxis(true[index], 0, -1),
                np.moveaxis(rec[index], 0, -1),
                data_range=data_range,
                win_size=win_size,
                channel_axis=-1,
            )
    if reduction == "none":
        return values
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none'; found {reduction!r}.")
    return float(values.mean()) if values.size else math.nan


def label_accuracy(pred: ArrayLike, truth_labels: ArrayLike, matching: Matching) -> float:
    """Fraction of true examples whose matched reconstruction got the right label.

    Parameters
    ----------
    pred:
        ``(k,)`` labels of the reconstructed examples (row ``i`` of the reconstruction).
    truth_labels:
        ``(b,)`` true labels.
    matching:
        The pairing from :func:`match`; unmatched true examples count as wrong (the
        denominator is ``b``).

    Returns
    -------
    float
        In ``[0, 1]``; ``1.0`` for an empty batch.

    Examples
    --------
    >>> import torch
    >>> truth = torch.eye(3)
    >>> m = match(truth[[1, 2]], truth)
    >>> label_accuracy(torch.tensor([1, 0]), torch.tensor([0, 1, 2]), m)
    0.3333333333333333
    """
    predicted = _as_array(pred).reshape(-1)
    labels = _as_array(truth_labels).reshape(-1)
    if labels.shape[0] != matching.batch_size:
        raise ValueError(
            f"truth_labels has {labels.shape[0]} entries but the matching is for a batch of "
            f"{matching.batch_size}."
        )
    if matching.num_matched and predicted.shape[0] <= int(matching.rec_index.max()):
        raise ValueError(
            f"pred has {predicted.shape[0]} entries but the matching refers to "
            f"reconstruction row {int(matching.rec_index.max())}; pass one label per "
            "reconstructed example."
        )
    if matching.batch_size == 0:
        return 1.0
    correct = predicted[matching.rec_index] == labels[matching.truth_index]
    return float(correct.sum()) / matching.batch_size


def summarize(
    reconstruction: ArrayLike,
    truth: ArrayLike,
    pred_labels: ArrayLike | None = None,
    truth_labels: ArrayLike | None = None,
    data_range: float = 1.0,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
) -> dict[str, float | int | None]:
    """All metrics of one reconstruction as a flat, JSON-friendly dict.

    Parameters
    ----------
    reconstruction, truth:
        ``(k, ...)`` and ``(b, ...)`` in pixel space.
    pred_labels, truth_labels:
        ``(k,)`` and ``(b,)`` labels, or None (then ``label_accuracy`` is None).
    data_range:
        Span of the pixel values, for PSNR and SSIM.
    rel_tol:
        Exactness tolerance relative to ``max |truth|``.

    Returns
    -------
    dict
        ``batch_size`` (b), ``found`` (k), ``matched`` (p), ``exact_rate`` (over b),
        ``psnr_mean`` / ``psnr_median`` (dB over the p pairs; ``inf`` when exact),
        ``ssim_mean`` (None unless the examples are images of at least 3x3),
        ``max_abs_error`` (worst pair), ``label_accuracy`` (over b). Statistics over no
        pairs are None.

    Examples
    --------
    >>> import torch
    >>> truth = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> s = summarize(truth[[3, 1, 0]], truth)
    >>> s["found"], s["batch_size"], s["exact_rate"], s["psnr_mean"]
    (3, 4, 0.75, inf)
    """
    matching = match(reconstruction, truth)
    pairs = matching.num_matched
    psnr_values = psnr(reconstruction, truth, data_range, matching=matching, reduction="none")
    ssim_mean: float | None = None
    shape = tuple(truth.shape[1:])
    if pairs and len(shape) in (2, 3) and min(shape[-2:]) >= 3:
        ssim_mean = ssim(reconstruction, truth, data_range, matching=matching)
    accuracy: float | None = None
    if pred_labels is not None and truth_labels is not None:
        accuracy = label_accuracy(pred_labels, truth_labels, matching)
    return {
        "batch_size": matching.batch_size,
        "found": int(reconstruction.shape[0]),
        "matched": pairs,
        "exact_rate": exact_rate(reconstruction, truth, rel_tol=rel_tol, matching=matching),
        "psnr_mean": float(psnr_values.mean()) if pairs else None,
        "psnr_median": float(np.median(psnr_values)) if pairs else None,
        "ssim_mean": ssim_mean,
        "max_abs_error": float(matching.max_abs_error.max()) if pairs else None,
        "label_accuracy": accuracy,
    }


def singled_out(
    columns: ArrayLike,
    inputs: ArrayLike | None = None,
    *,
    read: Literal["both", "columns", "inputs"] = "both",
    zero_tol: float = 0.0,
) -> list[int]:
    """How many examples of a batch its zero sets give, wave by wave, as the examples
    found are peeled: measured on the truth, what an attack that reads zero sets can
    recover exactly (docs/algorithm.md, "Identifiability"). The model after the layer
    can settle more (fact 12: on Flower's trained CNN at b = 16, seed 2, zero sets give
    9 of 16 and ``spear.attack`` all 16).

    ``dW = G X^T`` with ``G = columns`` and ``X = inputs``. An example's *input* is
    given by a unit on for it alone among the examples not found yet (that row of the
    update is its input, up to scale), and, reading the inputs, by its input's zero set
    when that leaves the others' inputs a space of one dimension less than their number
    (an extreme ray of the cone of nonnegative inputs, fact 13; its scale and column
    come from the model after the layer). Those examples are peeled, and the test
    repeats on the rest. An example's *gradient direction* is given, reading the
    columns, by its column's zero set in the same way (fact 4), and, reading the inputs,
    by a coordinate nonzero for its input alone (that column of the update is its
    column); directions alone give examples only once every example left has one
    (fact 2), and then all of them. Where ``G`` has rank below ``b`` (the update does
    not show the examples one by one) only the examples a unit is on for alone count.

    Parameters
    ----------
    columns:
        ``(m, b)`` the true gradients with respect to the layer's pre-activations, one
        column per example.
    inputs:
        ``(b, n)`` the true inputs of the layer (needed unless ``read="columns"``).
    read:
        Which zero sets to read: the columns', the inputs' or both.
    zero_tol:
        An entry is zero when ``|v| <= zero_tol * max |array|`` (``0``: exact zeros, as
        ReLU and max-pool give them in float64).

    Returns
    -------
    list[int]
        The examples given in each wave; their sum is the total.

    Examples
    --------
    >>> import torch
    >>> g = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]])
    >>> singled_out(g, read="columns")  # 0 owns unit 0; then 1 owns unit 1, 2 the rest
    [1, 2]
    >>> singled_out(torch.ones(4, 3), read="columns")  # no zeros, no unit of its own
    []
    """
    grads = _as_rows(columns, "columns").T  # (b, m)
    b = grads.shape[0]
    g_zero = np.abs(grads) <= zero_tol * float(np.abs(grads).max(initial=0.0))
    x: NDArray[np.float64] | None = None
    if read in ("both", "inputs"):
        if inputs is None:
            raise ValueError(f'singled_out(read="{read}") needs inputs (b, n); found None.')
        x = _as_rows(inputs, "inputs")
        if x.shape[0] != b:
            raise ValueError(
                f"columns show {b} examples but inputs {x.shape[0]}: pass columns (m, b) "
                "and inputs (b, n) of the same batch."
            )
    x_zero = None if x is None else np.abs(x) <= zero_tol * float(np.abs(x).max(initial=0.0))
    if _rank(grads) < b:
        alone = len(_alone(g_zero, list(range(b))))
        return [alone] if alone else []
    cols = read in ("both", "columns")
    left = list(range(b))
    waves: list[int] = []
    while left:
        given = set(_alone(g_zero, left))
        directed = set()
        if x is not None and x_zero is not None:
            given |= {i for i in left if _kernel_of_zeros(x, x_zero, i, left)}
            directed |= set(_alone(x_zero, left))
        if cols:
            directed |= {i for i in left if _kernel_of_zeros(grads, g_zero, i, left)}
        if given | directed >= set(left):
            waves.append(len(left))
            break
        if not given:
            break
        waves.append(len(given))
        left = [i for i in left if i not in given]
    return waves


def _alone(zero: NDArray[np.bool_], left: list[int]) -> list[int]:
    """The examples of ``left`` nonzero somewhere no other example of ``left`` is
    (``zero`` ``(b, d)``: rows are examples)."""
    on = ~zero[left]
    own = (on & (on.sum(axis=0) == 1)).any(axis=1)
    return [i for i, mine in zip(left, own.tolist(), strict=True) if mine]


def _kernel_of_zeros(
    side: NDArray[np.float64], zero: NDArray[np.bool_], i: int, left: list[int]
) -> bool:
    """Whether the zero set of example ``i`` leaves the rows ``left`` of ``side``
    ``(b, d)`` a space of ``len(left) - 1`` dimensions (its direction is the kernel)."""
    rest = side[left]  # (r, d)
    block = rest[:, zero[i]]  # (r, |Z_i|)
    if block.size == 0 or len(left) == 1:
        return False
    return _rank(block, float(np.linalg.norm(rest, 2))) == len(left) - 1


def _rank(block: NDArray[np.float64], scale: float | None = None) -> int:
    """Singular values of ``block`` above :data:`SINGLED_OUT_RANK_TOL` times ``scale``
    (by default its own largest)."""
    values = np.linalg.svd(block, compute_uv=False)
    top = scale if scale is not None else float(values.max(initial=0.0))
    return int((values > SINGLED_OUT_RANK_TOL * top).sum())
