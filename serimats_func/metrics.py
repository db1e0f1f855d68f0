"""Metric functions over stacked learner state (N, ...): the built-in metrics on weights and against a
control, and the machinery that vmaps a metric written for one model over every learner.

Built-in metrics (besides ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, which
``step.evaluate_dataset`` computes), all over the parameters (not buffers) taken as one flat vector,
in float64:

- ``param_norm``: ``||w||``; ``init_distance``: ``||w - w0||`` and ``init_cosine``: cos(w, w0), where
  ``w0`` is the learner's own initial weights (after any perturbation at init).
- With controls: ``control_distance`` ``||w - wc||``, ``control_layer_distance`` (the same per parameter
  tensor: a ``layer`` dimension labelled by parameter name, ``fc1.weight``, ``fc1.bias``...),
  ``control_cosine`` cos(w, wc), ``control_agreement`` (fraction of test examples whose argmax prediction is
  the control's) and ``control_test_loss_diff`` (test loss minus the control's).

>>> import torch
>>> a = {"w": torch.tensor([[3.0, 4.0], [3.0, 4.0]]), "b": torch.tensor([[0.0], [1.0]])}  # N = 2
>>> out = weight_metrics(a, a)
>>> out["param_norm"].tolist(), out["init_distance"].tolist(), out["init_cosine"].tolist()
([5.0, 5.0990195135927845], [0.0, 0.0], [1.0, 1.0])
>>> control_metrics(a, torch.tensor([0, 0]))["control_layer_distance"].tolist()  # learner 1 vs learner 0
[[0.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, vmap

DEFAULT_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
WEIGHT_METRICS = ("param_norm", "init_distance", "init_cosine")
CONTROL_METRICS = ("control_distance", "control_layer_distance", "control_cosine", "control_agreement",
                   "control_test_loss_diff")
BUILTIN_METRICS = DEFAULT_METRICS + WEIGHT_METRICS + CONTROL_METRICS
BUILTIN_DIMS = {"control_layer_distance": ("layer",)}  # metrics with a dimension of their own
METRICS_VERSION = 1  # part of the built-in metrics' keys in the store: bump when their definition changes


# -- built-in metrics on weights ------------------------------------------------------------------------

def layer_norms(tree: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The norm of each tensor of N learners (N, ...), accumulated in float64: (N, L), L tensors in dict order."""
    return torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float64) for t in tree.values()], 1)


def _total(norms: torch.Tensor) -> torch.Tensor:
    """The norm of all tensors as one vector, from their norms (N, L): (N,)."""
    return norms.square().sum(1).sqrt()


def _cosine(norm_a: torch.Tensor, norm_b: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """cos(a, b) from ||a||, ||b|| and ||a - b||, as 1 - (||a-b||^2 - (||a||-||b||)^2) / (2 ||a|| ||b||):
    exactly 1 for equal vectors, and accurate near 1, where a . b / (||a|| ||b||) loses its digits."""
    gap = (distance.square() - (norm_a - norm_b).square()) / (2 * norm_a * norm_b)
    return (1 - gap).clamp(-1.0, 1.0)


def weight_metrics(params: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor],
                   norms: torch.Tensor | None = None, initial_norms: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``param_norm``, ``init_distance``, ``init_cosine`` of N learners: params and initial (N, ...); each (N,).
    ``norms``, ``initial_norms``: their ``layer_norms`` if already known. Differences are taken in the weights'
    own dtype (exact for nearby float32 weights), norms accumulated in float64."""
    norm = _total(layer_norms(params) if norms is None else norms)  # (N,)
    norm0 = _total(layer_norms(initial) if initial_norms is None else initial_norms)
    distance = _total(layer_norms({k: params[k] - initial[k] for k in params}))
    return {"param_norm": norm, "init_distance": distance, "init_cosine": _cosine(norm, norm0, distance)}


def gather(tree: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Learner ``index[i]``'s tensors in row i: (N, ...) -> (len(index), ...)."""
    return {k: v[index] for k, v in tree.items()}


def control_metrics(params: Mapping[str, torch.Tensor], control_index: torch.Tensor,
                    norms: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``control_distance``, ``control_layer_distance`` (N, L), ``control_cosine`` of N learners against the
    learners ``control_index`` (N,) names in the same stack; ``norms``: ``layer_norms(params)`` if known."""
    layers = layer_norms({k: v - v[control_index] for k, v in params.items()})  # (N, L)
    distance = _total(layers)
    norm = _total(layer_norms(params) if norms is None else norms)
    return {"control_distance": distance, "control_layer_distance": layers,
            "control_cosine": _cosine(norm, norm[control_index], distance)}


def agreement(predictions: torch.Tensor, control_index: torch.Tensor) -> torch.Tensor:
    """Fraction of examples where a learner's prediction (N, n) is its control's: (N,) float64."""
    return (predictions == predictions[control_index]).double().mean(1)


# -- metrics written for one model ------------------------------------------------------------------------

class Data(NamedTuple):
    """Examples on the device: ``x`` (n, ...), ``y`` (n,). Unpacks as ``x, y = learner.test``."""

    x: torch.Tensor
    y: torch.Tensor


class Learner:
    """What a metric sees of one learner (a custom metric is written for one model, as in the seed).

    - ``model``: the template ``nn.Module`` holding this learner's parameters and buffers, in eval mode:
      ``learner.model.fc1.weight``, ``learner.model(x)`` (logits of a batch).
    - ``params``, ``buffers``: the same tensors, as dicts by name.
    - ``train``, ``test``: the whole training and test sets, ``Data(x, y)`` (``test`` is None without a
      test set).
    - ``batch``: the training batch this learner takes at the next update (before batch interventions),
      ``Data(x, y)``, for gradient-like metrics.
    - ``control``: its control, a ``Learner`` with ``model``, ``params``, ``buffers``. A metric that reads
      it is NaN for learners without a control.
    """

    def __init__(self, model: nn.Module, params: dict, buffers: dict, train: Data | None = None,
                 test: Data | None = None, batch: Data | None = None, control: Learner | None = None):
        self.model, self.params, self.buffers = model, params, buffers
        self.train, self.test, self.batch = train, test, batch
        self._control = control
        self.read_control = False

    @property
    def control(self) -> Learner:
        self.read_control = True
        if self._control is None:
            raise AttributeError("this learner has no control here")
        return self._control


MetricFn = Callable[[Learner], torch.Tensor]


class _Probe(nn.Module):
    """Runs a metric inside ``functional_call`` so that ``model``'s (and ``control``'s) attributes are the
    learner's (and its control's)."""

    def __init__(self, model: nn.Module, control: nn.Module, metric: MetricFn, train: Data | None, test: Data | None):
        super().__init__()
        self.model, self.control = model, control
        self.metric, self.train_data, self.test_data = metric, train, test

    def forward(self, params: dict, buffers: dict, control_params: dict, control_buffers: dict,
                batch: Data | None) -> torch.Tensor:
        control = Learner(self.control, control_params, control_buffers, self.train_data, self.test_data, batch)
        learner = Learner(self.model, params, buffers, self.train_data, self.test_data, batch, control)
        return self.metric(learner)


def _state(params: dict, buffers: dict, control_params: dict, control_buffers: dict) -> dict:
    own = {f"model.{k}": v for k, v in {**params, **buffers}.items()}
    return {**own, **{f"control.{k}": v for k, v in {**control_params, **control_buffers}.items()}}


def control_copy(template: nn.Module) -> nn.Module:
    """A second module for the control's tensors (one module cannot hold two learners' tensors at once)."""
    return copy.deepcopy(template).eval()


def metric_on_one(template: nn.Module, fn: MetricFn, params: dict, buffers: dict, train: Data | None = None,
                  test: Data | None = None, batch: Data | None = None) -> tuple[torch.Tensor, bool]:
    """Run ``fn`` on one learner's unstacked state, its own control being itself: (value, whether it read
    ``learner.control``)."""
    learners: list[Learner] = []

    def recording(learner: Learner) -> torch.Tensor:
        learners.append(learner)
        return fn(learner)

    probe = _Probe(template, control_copy(template), recording, train, test)
    value = functional_call(probe, _state(params, buffers, params, buffers), (params, buffers, params, buffers, batch))
    return value, learners[0].read_control


def vmapped_metrics(template: nn.Module, metrics: Mapping[str, MetricFn], train: Data | None = None,
                    test: Data | None = None, shared_batch: bool = True) -> Callable:
    """``f(params, buffers, control=None, batch=None) -> {name: (N, *shape)}`` for stacked learner state
    (N, ...); ``control`` is the (params, buffers) of each learner's control, stacked the same way (default:
    the learner itself); ``batch`` is a ``Data`` of (B, ...) if ``shared_batch`` else (N, B, ...). Call with
    ``template`` in eval mode.

    >>> from serimats_func.models import MLP
    >>> from serimats_func.learners import prepare_template, initial_model_state
    >>> from serimats_func import pytrees
    >>> template = prepare_template(MLP(widths=(8,)), torch.zeros(2, 40)).eval()
    >>> state = pytrees.stack([initial_model_state(template, k, 0) for k in range(3)])
    >>> f = vmapped_metrics(template, {"norm": lambda learner: learner.model[1].weight.norm()})
    >>> f(state.params, state.buffers)["norm"].shape
    torch.Size([3])
    """
    control_module = control_copy(template)
    probes = {name: _Probe(template, control_module, fn, train, test) for name, fn in metrics.items()}

    def one_learner(params, buffers, control_params, control_buffers, batch):
        state = _state(params, buffers, control_params, control_buffers)
        args = (params, buffers, control_params, control_buffers, batch)
        return {name: functional_call(probe, state, args) for name, probe in probes.items()}

    def run(params: dict, buffers: dict, control: tuple[dict, dict] | None = None, batch: Data | None = None) -> dict:
        control_params, control_buffers = control if control is not None else (params, buffers)
        batch_dim = None if (batch is None or shared_batch) else 0
        return vmap(one_learner, in_dims=(0, 0, 0, 0, batch_dim))(params, buffers, control_params, control_buffers, batch)

    return run
