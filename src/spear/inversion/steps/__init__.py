"""The steps of the attack, one file each, behind one interface (:class:`Step`)."""

from spear.inversion.steps.base import Step, StepReport
from spear.inversion.steps.complete import CompleteSolve
from spear.inversion.steps.cone import InputCone
from spear.inversion.steps.exhaustive import ExhaustiveSolve
from spear.inversion.steps.focused import FocusedSampling
from spear.inversion.steps.last import LastDirection
from spear.inversion.steps.line import LineScan
from spear.inversion.steps.peeling import RowPeeling
from spear.inversion.steps.rebase import Rebase
from spear.inversion.steps.search import DirectionSearch
from spear.inversion.steps.setup import PrunePool, RoundSetup
from spear.inversion.steps.subspace import SubspaceCompletion
from spear.inversion.steps.tentative import TentativeCompletion

__all__ = [
    "CompleteSolve",
    "DirectionSearch",
    "ExhaustiveSolve",
    "FocusedSampling",
    "InputCone",
    "LastDirection",
    "LineScan",
    "PrunePool",
    "Rebase",
    "RoundSetup",
    "RowPeeling",
    "Step",
    "StepReport",
    "SubspaceCompletion",
    "TentativeCompletion",
]
