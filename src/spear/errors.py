"""Exceptions with messages a user can act on: what was expected, what was found, what to try."""

from __future__ import annotations

__all__ = ["BatchTooLargeError", "InputError", "NoReluSparsityError", "NotAttackableError"]


class InputError(ValueError):
    """Arguments that do not fit together (shapes, dtypes, non-finite values, names)."""


class BatchTooLargeError(ValueError):
    """The weight gradient's rank cannot reveal the batch (``b >= m`` or ``b > n``)."""


class NoReluSparsityError(ValueError):
    """The gradient has no exact zeros where a ReLU after the layer would put them."""


class NotAttackableError(ValueError):
    """No layer of the model is a linear layer followed by a ReLU."""
