"""Metric functions of one learner's state, vmapped over learners.

The default metrics (loss and accuracy on whole datasets) are computed by ``step.evaluate_dataset``;
this module runs the others: functions ``metric(learner) -> scalar tensor`` written for one model,
where ``learner.model`` is the template holding that learner's parameters.

>>> import torch
>>> from serimats_func.models import MLP
>>> from serimats_func.learners import prepare_template, initial_model_state
>>> from serimats_func import pytrees
>>> template = prepare_template(MLP(widths=(8,)), torch.zeros(2, 40))
>>> state = pytrees.stack([initial_model_state(template, k, 0) for k in range(3)])
>>> f = vmapped_metrics(template, {"norm": lambda learner: learner.model[1].weight.norm()})
>>> f(state["params"], state["buffers"])["norm"].shape
torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

DEFAULT_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


@dataclass
class Learner:
    """What a metric sees of one learner."""

    model: nn.Module  # the template, holding this learner's params and buffers during the call
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


MetricFn = Callable[[Learner], torch.Tensor]


class _Probe(nn.Module):
    """Runs a metric inside ``functional_call`` so that ``model``'s attributes are the learner's."""

    def __init__(self, model: nn.Module, metric: MetricFn):
        super().__init__()
        self.model = model
        self.metric = metric

    def forward(self, params: dict, buffers: dict) -> torch.Tensor:
        return self.metric(Learner(self.model, params, buffers))


def vmapped_metrics(template: nn.Module, metrics: Mapping[str, MetricFn]) -> Callable:
    """``f(params, buffers) -> {name: (N,) tensor}`` for stacked learner state (N, ...)."""
    probes = {name: _Probe(template, fn) for name, fn in metrics.items()}

    def one_learner(params, buffers):
        state = {f"model.{k}": v for k, v in {**params, **buffers}.items()}
        return {name: functional_call(probe, state, (params, buffers)) for name, probe in probes.items()}

    return vmap(one_learner)
