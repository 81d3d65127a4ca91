"""Plain result records returned by the attacks.

Every attack in the project (SPEAR's solvers and the baselines) returns one of these, so
that evaluation code can treat them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spear.noise import NoiseEstimate

__all__ = ["LayerReconstruction", "Reconstruction", "SolverStats"]


@dataclass
class SolverStats:
    """What a disaggregation solver did.

    Attributes
    ----------
    name:
        The solver's name (``"sampling"``, ``"peeling"``, ``"sparse"``, ...).
    samples:
        Kernel samples (row subsets or starting points) it drew.
    candidates:
        Candidate directions that passed its sparsity filter.
    found:
        Examples it peeled (verified and kept). A complete solve (``"solve"``) peels the
        examples whose directions the search steps pooled.
    seconds:
        Wall time it used.
    """

    name: str
    samples: int = 0
    candidates: int = 0
    found: int = 0
    seconds: float = 0.0


@dataclass
class LayerReconstruction:
    """The inputs of one linear+ReLU layer rebuilt from its gradient.

    Attributes
    ----------
    inputs:
        ``(k, n)`` float64: the recovered inputs, one row per example, in some order. Only
        verified examples are returned: ``k == batch_size`` when :attr:`complete`.
    batch_size:
        ``b``, the number of distinct examples in the update (given or from the rank).
    complete:
        True when all ``b`` examples were recovered.
    verified:
        True only when the result is :attr:`complete` and every example has been checked
        against the update: its gradient column is zero exactly where the ReLU pattern of
        its own ``W x + c`` predicts (the layer's weights were given, and the update is
        not noisy). The rows of a partial result passed the same check one by one. Without
        the weights only the sparsity of the gradient columns backs them, which narrow
        layers, correlated real images or float32 gradients can fool: treat such rows as
        candidates. The same meaning as :attr:`Reconstruction.verified`, for a result
        without labels.
    output_grads:
        ``(m, k)`` float64: the gradient with respect to the layer's pre-activations for
        each recovered example (column ``i`` belongs to ``inputs[i]``), scaled so that
        ``weight_grad ~= output_grads @ inputs`` when complete.
    singular_values:
        ``(min(m, n),)`` float64: the singular values of the weight gradient, which
        revealed the batch size.
    rank_gap:
        ``sigma_b / sigma_{b+1}`` (``inf`` when ``sigma_{b+1}`` is zero): how clearly the
        rank stood out.
    sparsity:
        ``(k,)`` fraction of zero entries in each recovered example's column of ``G``.
    consistency:
        ``(k,)`` fraction of units whose on/off state, predicted from the layer's weight
        and bias, agrees with the zero pattern of the example's gradient column (``None``
        when the weights were not given).
    residual:
        Relative Frobenius error ``||dW - G X^T|| / ||dW||`` of the recovered part.
    precision:
        The relative precision the data's dtype allows (about ``1e-16`` for float64,
        ``1e-7`` for float32); exact means agreement to this precision.
    solvers:
        One :class:`SolverStats` per solver that ran, in order.
    found_by:
        ``(k,)`` for each returned example, the name of the step that peeled it
        (``"peeling"``, ``"solve"`` for a complete solve, ``"exhaustive"``); empty for
        results made without the step pipeline.
    seconds:
        Total wall time.
    notes:
        Plain-language findings (partial recovery, duplicates, precision, ...).
    interrupted:
        True when Ctrl-C stopped the search; the examples verified until then are
        returned.
    noise:
        For a noisy update (DP noise): the noise estimated from its spectrum, with the
        batch size and how clearly it stands out (:class:`spear.noise.NoiseEstimate`);
        ``None`` otherwise.
    error_rms:
        ``(k,)`` for an approximate result: each example's predicted root-mean-square error
        per input coordinate, in the inputs' units, from the noise floor (NaN where the
        noise model does not bound the error: see :attr:`noise_consistent`); ``None`` for
        exact results.
    noise_consistent:
        For an approximate result: whether the residual of the update recomputed from it
        is what the estimated noise alone leaves (:attr:`residual_ratio` near 1); ``None``
        otherwise.
    residual_ratio:
        For an approximate result: ``||[dW | db] - G [X^T | 1]||_F`` over the residual the
        estimated noise alone leaves after the fit (about 1 when only noise is left).
    zero_row_sigma:
        For an approximate result: the noise std read from the units every example
        leaves off (their update is noise alone); ``None`` when there are none.
    dropout:
        Solved for an active Dropout right after the layer's ReLU (``invert_layer(...,
        dropout=True)``): each example was checked only on the units it turns off, and
        the result is not :attr:`verified` on its own.
    """

    inputs: torch.Tensor
    batch_size: int
    complete: bool
    verified: bool
    output_grads: torch.Tensor
    singular_values: torch.Tensor
    rank_gap: float
    sparsity: torch.Tensor
    consistency: torch.Tensor | None
    residual: float
    precision: float
    solvers: list[SolverStats] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    found_by: list[str] = field(default_factory=list)
    noise: NoiseEstimate | None = None
    error_rms: torch.Tensor | None = None
    noise_consistent: bool | None = None
    residual_ratio: float | None = None
    zero_row_sigma: float | None = None
    dropout: bool = False

    @property
    def found(self) -> int:
        """Number of verified examples returned."""
        return int(self.inputs.shape[0])

    @property
    def samples(self) -> int:
        """Kernel samples drawn over all solvers."""
        return sum(s.samples for s in self.solvers)

    @property
    def candidates(self) -> int:
        """Candidate directions kept over all solvers."""
        return sum(s.candidates for s in self.solvers)


@dataclass
class Reconstruction:
    """A client's batch rebuilt from its update.

    Attributes
    ----------
    inputs:
        ``(k, *input_shape)`` in the model's input space (or in the attacked layer's input
        feature space when the first layer could not be attacked; see :attr:`notes`).
    labels:
        ``(k,)`` int64 class indices, or ``None`` when they could not be recovered.
    certificate:
        Relative error of the update recomputed from this reconstruction, or ``None``
        when it cannot be defined (the reason is in :attr:`notes`).
    verified:
        True only when every returned example and every returned label has been checked
        against the update: the reconstruction is complete, each example passed its own
        ReLU-pattern check, the update recomputed from examples *and* labels matches the
        observed one (:attr:`certificate` below
        :data:`spear.certificate.VERIFIED_BELOW` for the model's dtype) and every label
        fits softmax cross-entropy. A FedAvg delta cannot be recomputed, so its labels
        are never certified and this is False; see :attr:`examples_verified`.
    examples_verified:
        True when every one of the ``b`` examples is checked (the labels aside): their
        ReLU patterns and the certificate of the update kind (for a delta: the layer's
        delta lies in the span of the examples).
    batch_size:
        ``b``, the number of distinct examples found in the update.
    complete:
        True when all ``b`` examples were recovered.
    layer:
        Name of the attacked layer (``model.named_modules()`` key).
    feature_space:
        True when :attr:`inputs` are features entering the attacked layer, not model inputs.
    layer_result:
        The underlying :class:`LayerReconstruction`.
    notes:
        Plain-language findings.
    interrupted:
        True when Ctrl-C stopped the layer inversion; what was verified until then is
        returned (labels and certificate computed for it).
    estimate:
        What :attr:`inputs` are: ``"exact"`` (the exact attack), ``"approximate"`` (a
        noisy update inverted with the layer's weights, :mod:`spear.noisy`) or
        ``"gradient-matching"`` (the optimisation baseline, from random inputs or from
        the approximate estimate, where the noise hides the batch; the notes say which).
        Only exact results can be verified.
    error_rms:
        ``(k,)`` predicted root-mean-square error per input coordinate of each returned
        example for an approximate result (``None`` otherwise); see
        :func:`spear.noisy.predicted_psnr`.
    noise:
        The noise estimated from a noisy update (:class:`spear.noise.NoiseEstimate`), or
        ``None``.
    images:
        Model inputs when :attr:`inputs` are features (a layer behind convolutions, or a
        deeper layer), else ``None``; see :mod:`spear.images`. The first
        :attr:`images_from_features` are rebuilt from the recovered features, in the order
        of :attr:`inputs`; when examples are missing, gradient-matching estimates of those
        follow (``(b, *input_shape)`` in all). Estimates unless :attr:`images_determined`.
    image_labels:
        Labels of :attr:`images`: :attr:`labels` for those rebuilt from features, then the
        missing examples' labels inferred from the classifier head's gradient; ``None``
        when not known.
    images_from_features:
        How many of :attr:`images` (the first ones) are rebuilt from recovered features.
    images_determined:
        True when the batch is complete, the features determine every image in
        :attr:`images` (the layers before the attacked one are locally invertible there)
        and the images reproduce them to rounding; then :attr:`certificate` is computed
        from the images.
    image_feature_residual:
        ``(k,)`` relative error of the features recomputed from :attr:`images`.
    multiplicity:
        ``(k,)`` int64: how many times the batch holds each of :attr:`inputs` (an example
        whose column fits its loss with ``c`` times the divisor of the others is counted
        ``c`` times: a duplicate, or at float32's precision possibly ``c`` examples whose
        gradients agree to rounding, shown as their mean; :attr:`notes` say which);
        ``None`` when the labels are not known. Its sum is the batch size the update
        shows; ``torch.repeat_interleave(rec.inputs, rec.multiplicity, dim=0)`` gives
        one row per example of the batch.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None
    certificate: float | None
    verified: bool
    batch_size: int
    complete: bool
    layer: str
    feature_space: bool = False
    layer_result: LayerReconstruction | None = None
    examples_verified: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    estimate: str = "exact"
    error_rms: torch.Tensor | None = None
    noise: NoiseEstimate | None = None
    images: torch.Tensor | None = None
    images_determined: bool = False
    image_feature_residual: torch.Tensor | None = None
    image_labels: torch.Tensor | None = None
    images_from_features: int = 0
    multiplicity: torch.Tensor | None = None
