"""Other attacks, run side by side with SPEAR on identical cases.

Every attack has the common call::

    attack_fn(model, update, *, batch_size, input_shape, update_kind="gradient", seed=0,
              time_budget=None, **options) -> spear.results.Reconstruction

where ``options`` are the attack's own keyword arguments (an unknown one is a
``TypeError``). The baselines leave ``certificate`` as ``None``; compute it with
``spear.certify``.

``"breaching-ig"`` is breaching's Inverting Gradients (:mod:`spear.baselines.breaching_ig`);
it is always listed, and runs when the optional extra is installed
(``pip install "spear[breaching]"``); without it, calling it raises
:class:`~spear.errors.InputError` naming the extra.

Examples
--------
>>> from spear.baselines import ATTACKS, get_attack
>>> sorted(ATTACKS)
['analytic', 'breaching-ig', 'gradient-matching']
>>> get_attack("analytic").__name__
'analytic_attack'
"""

from __future__ import annotations

from collections.abc import Callable

from spear.baselines.analytic import analytic_attack
from spear.baselines.breaching_ig import breaching_ig_attack
from spear.baselines.gradient_matching import gradient_matching_attack
from spear.baselines.labels import LabelInference, infer_labels
from spear.errors import InputError
from spear.results import Reconstruction

__all__ = [
    "ATTACKS",
    "LabelInference",
    "analytic_attack",
    "breaching_ig_attack",
    "get_attack",
    "gradient_matching_attack",
    "infer_labels",
]

#: Attack name -> function with the common call (see the module docstring).
ATTACKS: dict[str, Callable[..., Reconstruction]] = {
    "analytic": analytic_attack,
    "breaching-ig": breaching_ig_attack,
    "gradient-matching": gradient_matching_attack,
}


def get_attack(name: str) -> Callable[..., Reconstruction]:
    """The attack registered under ``name``.

    Parameters
    ----------
    name:
        A key of :data:`ATTACKS`, e.g. ``"analytic"``.

    Returns
    -------
    Callable[..., Reconstruction]
        The attack function.

    Raises
    ------
    InputError
        When no attack has that name; the message lists the available ones.
    """
    try:
        return ATTACKS[name]
    except KeyError:
        available = ", ".join(repr(key) for key in sorted(ATTACKS))
        raise InputError(f"unknown attack {name!r}; available attacks: {available}.") from None
