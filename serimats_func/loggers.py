"""``Logger``: which metrics are recorded. Add your own with ``@register_metric``.

A metric is written for one learner, as in the seed: it receives a ``learner`` whose ``model`` is
the template module holding this learner's parameters (``learner.model.fc1.weight``), plus its
``params`` and ``buffers`` dicts, and returns a scalar tensor. The library vmaps it over every
learner and records it at the same steps as the default metrics (train/test loss and accuracy).

>>> import torch
>>> class WeightNorm(Logger):
...     @register_metric
...     def weight_norm(self, learner):
...         return torch.norm(learner.model.fc1.weight)
>>> WeightNorm().metric_names()
['weight_norm']
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .metrics import DEFAULT_METRICS, MetricFn, vmapped_metrics


def register_metric(fn: Callable) -> Callable:
    """Mark a ``Logger`` method ``fn(self, learner) -> scalar tensor`` as a metric named ``fn.__name__``."""
    fn.is_metric = True
    return fn


class Logger:
    """Records the default metrics (``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``)
    and every method marked with ``@register_metric``."""

    def metric_names(self) -> list[str]:
        names = []
        for cls in reversed(type(self).__mro__):
            for name, value in vars(cls).items():
                if getattr(value, "is_metric", False) and name not in names:
                    names.append(name)
        clash = [n for n in names if n in DEFAULT_METRICS]
        if clash:
            raise ValueError(f"Metric name {clash[0]!r} is taken by a default metric; rename the method.")
        return names

    def metrics(self) -> dict[str, MetricFn]:
        """The registered metrics, bound to this logger: name -> ``fn(learner)``."""
        return {name: getattr(self, name) for name in self.metric_names()}

    def check(self, template: nn.Module, params: dict, buffers: dict) -> None:
        """Run every metric on stacked learner state: a broken metric fails here, before anything
        is trained, with the metric's name in the message."""
        for name, fn in self.metrics().items():
            try:
                value = vmapped_metrics(template, {name: fn})(params, buffers)[name]
            except Exception as error:
                raise ValueError(f"Metric {name!r} failed on a learner: {type(error).__name__}: {error}") from error
            if value.ndim != 1 or not value.dtype.is_floating_point:
                raise ValueError(f"Metric {name!r} must return a scalar float tensor; got shape "
                                 f"{tuple(value.shape[1:])} and dtype {value.dtype}.")


__all__ = ["Logger", "register_metric", "DEFAULT_METRICS"]
