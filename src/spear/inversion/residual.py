"""The residual problem: what is left of the update once found examples are peeled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spear.inversion.pool import DirectionPool

__all__ = ["Residual"]


@dataclass
class Residual:
    """The residual problem and what has been recovered so far (all float64)."""

    left: torch.Tensor  # (m, b) residual left factor: dW_res = left @ right
    bias: torch.Tensor | None  # (m,) residual bias gradient
    coords: list[torch.Tensor]  # found examples, (b,) coordinates in the row space
    grads: list[torch.Tensor]  # their gradient columns, (m,)
    directions: DirectionPool  # exact unit gradient directions (m,) not yet peeled

    @property
    def found(self) -> int:
        return len(self.coords)

    def peel(self, coord: torch.Tensor, grad: torch.Tensor) -> None:
        """Remove a verified example's contribution ``grad coord^T``."""
        self.left = self.left - torch.outer(grad, coord)
        if self.bias is not None:
            self.bias = self.bias - grad
        self.coords.append(coord)
        self.grads.append(grad)
