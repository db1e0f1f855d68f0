"""Interventions: what makes one learner differ from another.

An intervention class names a kind of change; an instance is one variation, with a value for each of
its axes. ``make_variations(**axes)`` is the product of its axes. An experiment concatenates the
variations of one class and multiplies those of different classes. Each class acts through pure
functions at named points of the training step (see ``Intervention``), vmapped over learners.

>>> vs = PerturbWeights.make_variations(epsilon=(0.001, 0.01), seed=range(3))
>>> len(vs), vs[0].values["epsilon"]
(6, 0.001)
"""

from .activations import PerturbActivations
from .augment import Augment
from .base import Derived, Intervention, Numbers, Variations
from .data import BatchSize, DataOrder, Dataset
from .dropout import DropoutMasks
from .gradients import ClipGradients, PerturbGradients
from .hyperparameters import PerturbHyperparameter, PerturbMomentum
from .model import Model
from .optimizer import Optimizer
from .optimizer_state import ResetOptimizerState
from .schedule import LRSchedule
from .weights import InitWeights, PerturbWeights, perturb_weights

# The seed's names.
InitWeightsIntervention = InitWeights
PerturbWeightsIntervention = PerturbWeights
OptimizerIntervention = Optimizer
DataOrderIntervention = DataOrder
PerturbMomentumIntervention = PerturbMomentum
PerturbHyperparameterIntervention = PerturbHyperparameter
PerturbGradientsIntervention = PerturbGradients
PerturbActivationsIntervention = PerturbActivations
ModelIntervention = Model
ResetOptimizerStateIntervention = ResetOptimizerState
LRScheduleIntervention = LRSchedule
ClipGradientsIntervention = ClipGradients

__all__ = [
    "Augment",
    "BatchSize",
    "ClipGradients",
    "ClipGradientsIntervention",
    "DataOrder",
    "DataOrderIntervention",
    "Dataset",
    "Derived",
    "DropoutMasks",
    "InitWeights",
    "InitWeightsIntervention",
    "Intervention",
    "LRSchedule",
    "LRScheduleIntervention",
    "Model",
    "ModelIntervention",
    "Numbers",
    "Optimizer",
    "OptimizerIntervention",
    "PerturbActivations",
    "PerturbActivationsIntervention",
    "PerturbGradients",
    "PerturbGradientsIntervention",
    "PerturbHyperparameter",
    "PerturbHyperparameterIntervention",
    "PerturbMomentum",
    "PerturbMomentumIntervention",
    "PerturbWeights",
    "PerturbWeightsIntervention",
    "ResetOptimizerState",
    "ResetOptimizerStateIntervention",
    "Variations",
    "perturb_weights",
]
