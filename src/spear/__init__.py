"""spear: exact reconstruction of federated-learning clients' batches from their updates.

The public API::

    rec = spear.attack(model, update)              # model + client update -> batch
    err = spear.certify(model, update, inputs, labels)
    layer = spear.invert_layer(weight_grad, bias_grad, weight=W, bias=c)
    m = spear.metrics.match(rec.inputs, truth)     # pair with the truth, errors, PSNR

See the README for the command line (``spear demo``, ``spear attack``, ``spear bench``).
"""

from spear import metrics
from spear.attack import attack
from spear.certificate import VERIFIED_BELOW, certify
from spear.errors import (
    BatchTooLargeError,
    InputError,
    NoReluSparsityError,
    NotAttackableError,
)
from spear.layer import invert_layer
from spear.results import LayerReconstruction, Reconstruction

__version__ = "0.1.0"

__all__ = [
    "VERIFIED_BELOW",
    "BatchTooLargeError",
    "InputError",
    "LayerReconstruction",
    "NoReluSparsityError",
    "NotAttackableError",
    "Reconstruction",
    "__version__",
    "attack",
    "certify",
    "invert_layer",
    "metrics",
]
