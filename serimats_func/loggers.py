"""``Logger``: which metrics are recorded. Add your own with ``@register_metric``.

Every experiment records the built-in metrics (the registry ``metrics.METRICS``: train/test loss and
accuracy, weight norm and distance to init, and, with controls, distance, cosine and agreement with the
control). A metric of your own is a method written for one learner, as in the seed: it receives a
``learner`` (see ``metrics.Learner``: ``learner.model`` holds this learner's parameters, and
``learner.train``, ``learner.test``, ``learner.batch``, ``learner.control`` give data and the control) and
returns a tensor: a scalar, or a small tensor whose dimensions ``@register_metric(dims=(...))`` names
(default ``<metric>_dim0``, ...). The library vmaps it over the learners and records it at the logged steps, or
at fewer: ``@register_metric(every=k)`` at the logged steps that are multiples of k (step 0 included),
``@register_metric(at=[...])`` at those steps (which the experiment then logs), both: at either; NaN at the
other logged steps, and computed only where it is due (an expensive metric costs only there).

>>> import torch
>>> class WeightNorm(Logger):
...     @register_metric
...     def weight_norm(self, learner):
...         return torch.norm(learner.model.fc1.weight)
...     @register_metric(dims=("unit",))
...     def unit_norms(self, learner):
...         return learner.model.fc1.weight.norm(dim=1)
...     @register_metric(at=[0, 100])
...     def fc1_trace(self, learner):
...         return learner.model.fc1.weight.diagonal().sum()
>>> WeightNorm().metric_names(), WeightNorm().metric_dims(), WeightNorm().metric_schedules()
(['weight_norm', 'unit_norms', 'fc1_trace'], {'unit_norms': ('unit',)}, {'fc1_trace': When(every=None, at=(0, 100))})
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .core import pytrees
from .core.metrics import (
    DEFAULT_METRICS,
    METRICS,
    Data,
    MetricFn,
    MetricSpec,
    When,
    metric_on_one,
    user_key,
    vmapped_metrics,
)

MAX_METRIC_SIZE = 10_000  # entries of one metric for one learner at one step

# The names ``Logger``'s own checks read. ``identity`` describes a user's Logger subclass with the code of its base
# class and the values that code reads, so these are part of every user metric's key in the store: they stay the
# built-in metrics of before the registry (``metrics.METRICS`` begins with them), and ``metric_specs`` checks
# names against the whole registry.
BUILTIN_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "param_norm", "init_distance", "init_cosine",
                   "control_distance", "control_layer_distance", "control_cosine", "control_agreement",
                   "control_test_loss_diff")
BUILTIN_DIMS = {"control_layer_distance": ("layer",)}


def register_metric(fn: Callable | None = None, *, dims: Sequence[str] | None = None, every: int | None = None,
                    at: Sequence[int] | None = None) -> Callable:
    """Mark a ``Logger`` method ``fn(self, learner) -> tensor`` as a metric named ``fn.__name__``. Use it bare
    for a scalar, or as ``@register_metric(dims=("unit",))`` to name the dimensions of a tensor-valued one.
    ``every=k``: record it only at the logged steps that are multiples of k (step 0 included); ``at=[...]``: at
    these steps, which become logged steps of the run (as with ``log_at``); both: at either. Elsewhere it is NaN,
    and not computed."""
    when = checked_when(every, at, "register_metric")

    def mark(f: Callable) -> Callable:
        f.is_metric = True
        f.metric_dims = None if dims is None else tuple(dims)
        f.metric_when = when
        return f

    if fn is not None:
        return mark(fn)
    if dims is not None and (isinstance(dims, str) or not all(isinstance(d, str) and d for d in dims)):
        raise ValueError(f"register_metric(dims=...) takes a tuple of dimension names, e.g. dims=('unit',); got {dims!r}.")
    return mark


def checked_when(every: object, at: object, where: str) -> When:
    """``every`` and ``at`` as a ``When``, refused (naming ``where`` they were given) unless ``every`` is a
    positive integer and ``at`` a list of steps (integers >= 0); whether the steps lie in the run is checked
    when the ``Experiment`` is built."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1):
        raise ValueError(f"{where}(every=...) takes a positive integer k (record at the logged steps that are "
                         f"multiples of k); got {every!r}.")
    if at is not None:
        if isinstance(at, (str, bytes)) or not isinstance(at, (Sequence, range, set, frozenset)):
            raise ValueError(f"{where}(at=...) takes a list of steps, e.g. at=[0, 500]; got {at!r}.")
        bad = [t for t in at if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0]
        if bad:
            raise ValueError(f"{where}(at=...) takes steps (numbers of updates done, integers >= 0); got {bad[0]!r} "
                             f"in at={list(at)!r}.")
        if not len(at):
            raise ValueError(f"{where}(at=[]) names no step, so the metric would never be recorded; give steps, or "
                             "leave the metric out.")
        at = tuple(sorted({int(t) for t in at}))
    return When(None if every is None else int(every), at)


def metric_choices(metrics: object, optional_names: Collection[str] = ()) -> dict[str, When | bool]:
    """``Experiment(metrics=...)`` as ``metrics.recorded`` takes it: a list of built-in metric names (optional
    ones to record, at their default steps), or a dict {name: dict(every=..., at=...) | True | False} (when to
    record it; True: at its default steps; False: not at all). Unknown names are refused with the list of names;
    ``None`` as a value is refused too (it could mean either: say True or False)."""
    if metrics is None:
        return {}
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, (Mapping, Sequence, set, frozenset)):
        raise ValueError(f"metrics= takes a list of built-in metric names (e.g. metrics=['control_barrier']) or a dict "
                         f"{{name: dict(every=..., at=...)}} (e.g. metrics={{'test_acc': dict(every=100)}}); got {metrics!r}.")
    items = metrics.items() if isinstance(metrics, Mapping) else [(name, True) for name in metrics]
    out: dict[str, When | bool] = {}
    for name, choice in items:
        if name not in METRICS:
            optional = [n for n in METRICS if n in optional_names]
            hint = f" (optional ones: {', '.join(optional)})" if optional else ""
            raise ValueError(f"metrics= names {name!r}, which is no built-in metric; they are: {', '.join(METRICS)}"
                             f"{hint}. A Logger's own metric takes its steps from @register_metric(every=..., at=...).")
        if isinstance(choice, bool):
            out[name] = choice
        elif isinstance(choice, Mapping):
            unknown = [k for k in choice if k not in ("every", "at")]
            if unknown:
                raise ValueError(f"metrics={{{name!r}: ...}} takes dict(every=..., at=...); got the key {unknown[0]!r}.")
            out[name] = checked_when(choice.get("every"), choice.get("at"), f"metrics={{{name!r}: dict}}")
        elif choice is None:
            raise ValueError(f"metrics={{{name!r}: None}} could mean 'not recorded' or 'at every logged step': say "
                             f"False (not recorded), True (at its default steps) or dict(every=..., at=...).")
        else:
            raise ValueError(f"metrics={{{name!r}: ...}} takes dict(every=..., at=...), True or False; got {choice!r}.")
    return out


class _LastOp(TorchFunctionMode):
    """Remembers the last torch function a metric called and the shapes of its tensor arguments, so that a
    failure can be reported with the shapes that caused it."""

    last: tuple[Callable, list[tuple[int, ...]]] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.last = (func, [tuple(t.shape) for t in pytrees.leaves((args, kwargs)) if isinstance(t, torch.Tensor)])
        return func(*args, **kwargs)

    def describe(self) -> str:
        if self.last is None:
            return ""
        func, shapes = self.last
        name = getattr(func, "__name__", repr(func))
        owner = getattr(func, "__qualname__", "").split(".")[0]
        where = "Tensor." if owner in ("TensorBase", "Tensor") else "torch." if getattr(func, "__module__", "") == "torch" else ""
        shown = " and ".join(str(s) for s in shapes) if shapes else "no tensors"
        return f" {where}{name} got tensors of shapes {shown}."


class Logger:
    """Records the built-in metrics and every method marked with ``@register_metric``."""

    def metric_names(self) -> list[str]:
        names = []
        for cls in reversed(type(self).__mro__):
            for name, value in vars(cls).items():
                if getattr(value, "is_metric", False) and name not in names:
                    names.append(name)
        clash = [n for n in names if n in BUILTIN_METRICS]
        if clash:
            raise ValueError(f"Metric name {clash[0]!r} is taken by a built-in metric ({', '.join(BUILTIN_METRICS)}); "
                             "rename the method.")
        return names

    def metrics(self) -> dict[str, MetricFn]:
        """The registered metrics, bound to this logger: name -> ``fn(learner)``."""
        return {name: getattr(self, name) for name in self.metric_names()}

    def metric_dims(self) -> dict[str, tuple[str, ...]]:
        """Dimension names of the metrics that declared them with ``@register_metric(dims=...)``."""
        out = {}
        for name in self.metric_names():
            dims = getattr(getattr(type(self), name), "metric_dims", None)
            if dims is not None:
                out[name] = dims
        return out

    def metric_schedules(self) -> dict[str, When]:
        """When the metrics that ``@register_metric(every=..., at=...)`` limits are recorded."""
        out = {}
        for name in self.metric_names():
            when = getattr(getattr(type(self), name), "metric_when", None)
            if when is not None and not when.always:
                out[name] = when
        return out

    def check(self, template: nn.Module, params: dict, buffers: dict, train: Data | None = None,
              test: Data | None = None, batch: Data | None = None, taken: Sequence[str] = ()) -> dict[str, MetricInfo]:
        """Run every metric on a learner (``params``, ``buffers`` stacked (N, ...), N >= 1), alone and vmapped:
        a broken metric fails here, before anything is trained, with its name and the shapes of the failing
        operation's tensors in the message. Returns each metric's dimension names, shape and whether it reads
        the control. ``taken``: names the metrics' dimensions may not use (the grid's coordinates)."""
        _check_names(self.metric_names(), taken)
        infos = {name: self._check_one(name, fn, template, params, buffers, train, test, batch)
                 for name, fn in self.metrics().items()}
        _check_dims(infos, taken)
        return infos

    def _check_one(self, name: str, fn: MetricFn, template: nn.Module, params: dict, buffers: dict,
                   train: Data | None, test: Data | None, batch: Data | None) -> MetricInfo:
        one_params, one_buffers = pytrees.index(params, 0), pytrees.index(buffers, 0)
        mode = _LastOp()
        template.eval()
        try:
            with mode, torch.random.fork_rng(devices=[]):
                value, reads_control = metric_on_one(template, fn, one_params, one_buffers, train, test, batch)
        except Exception as error:
            raise ValueError(f"Metric {name!r} failed on a learner:{mode.describe()} {type(error).__name__}: {error}") from error
        finally:
            template.train()
        if not isinstance(value, torch.Tensor) or value.is_complex():
            raise ValueError(f"Metric {name!r} must return a real tensor (a scalar or a small tensor); got {value!r:.80}.")
        if value.numel() > MAX_METRIC_SIZE:
            raise ValueError(f"Metric {name!r} returns {value.numel()} numbers per learner and step (shape "
                             f"{tuple(value.shape)}); a metric is a scalar or a small tensor (at most {MAX_METRIC_SIZE}). "
                             "Reduce it (a norm per row, a histogram) before returning it.")
        declared = getattr(getattr(type(self), name), "metric_dims", None)
        if declared is None:
            dims = tuple(f"{name}_dim{i}" for i in range(value.ndim))
        elif len(declared) != value.ndim:
            raise ValueError(f"Metric {name!r} declares dims={declared} but returns a tensor of shape {tuple(value.shape)}; "
                             f"give one name per dimension.")
        else:
            dims = declared
        template.eval()
        try:
            stacked = vmapped_metrics(template, {name: fn}, train, test)(params, buffers, batch=batch)[name]
        except Exception as error:
            raise ValueError(f"Metric {name!r} works on one learner but not under torch.func.vmap, which runs it for "
                             f"every learner at once: {type(error).__name__}: {error}. Avoid .item(), Python branches "
                             "on tensor values and in-place changes of the learner's tensors.") from error
        finally:
            template.train()
        if stacked.shape[1:] != value.shape:
            raise ValueError(f"Metric {name!r} returns shape {tuple(value.shape)} for one learner but "
                             f"{tuple(stacked.shape[1:])} per learner under vmap; return the same shape for any learner.")
        return MetricInfo(dims, tuple(value.shape), reads_control)


def metric_specs(logger: Logger, reads_control: Collection[str] = ()) -> dict[str, MetricSpec]:
    """A logger's metrics as ``MetricSpec`` records (the built-in metrics' type), bound to it; ``reads_control``:
    those that read ``learner.control`` (``Logger.check`` finds them out). (Not a ``Logger`` method: the code of
    the ``Logger`` class is part of every user metric's key in the store.)"""
    clash = [n for n in logger.metric_names() if n in METRICS]
    if clash:
        raise ValueError(f"Metric name {clash[0]!r} is taken by a built-in metric ({', '.join(METRICS)}); "
                         "rename the method.")
    dims, schedules = logger.metric_dims(), logger.metric_schedules()
    return {name: MetricSpec(name, fn, dims.get(name, ()), key=user_key,
                             depends_on=("code", "test") + (("control",) if name in reads_control else ()),
                             every=schedules.get(name, When()).every, at=schedules.get(name, When()).at)
            for name, fn in logger.metrics().items()}


class MetricInfo(NamedTuple):
    """What ``Logger.check`` found out about a metric."""

    dims: tuple[str, ...]  # names of its own dimensions
    shape: tuple[int, ...]  # for one learner at one step
    reads_control: bool  # it reads learner.control: NaN for learners without one


def coordinate_names(taken: Sequence[str] = ()) -> dict[str, str]:
    """Every name a result or ``open_store`` gives a coordinate or a variable of its own, and what it is: a metric
    named so would clash with it. ``taken``: the grid's coordinates (its axes and one-valued axes...)."""
    from .optimizers import REGISTRY
    from .store.zarr_store import CONFIG_COORDS, ENVIRONMENT, STORE_VARIABLES

    names = {n: "a coordinate of the grid" for n in taken}
    names.update({n: "an optimizer hyperparameter, a coordinate of open_store" for f in REGISTRY.values()
                  for n in f.arguments})
    names.update({n: "a coordinate of open_store (where a batch was trained)" for n in ENVIRONMENT})
    names.update({n: "a coordinate of open_store (each learner's configuration)" for n in CONFIG_COORDS})
    names.update({d: "the dimension of control_layer_distance" for dims in BUILTIN_DIMS.values() for d in dims})
    names.update({n: "a dimension or variable of every result" for n in STORE_VARIABLES})
    names.update({"control": "a coordinate of every result", "control_learner": "a coordinate of every result"})
    return names


def _check_names(names: Sequence[str], taken: Sequence[str]) -> None:
    """Refuse a metric named like a coordinate (``lr``, ``step``, ``device``, a grid axis): its values and the
    coordinate would clash in the result and in ``open_store``."""
    reserved = coordinate_names(taken)
    for name in names:
        if name in reserved:
            raise ValueError(f"Metric {name!r} is named like {reserved[name]} ({name!r}); the result and open_store "
                             f"would hold both under one name. Rename the method (e.g. {name + '_metric'!r}).")


def _check_dims(infos: dict[str, MetricInfo], taken: Sequence[str]) -> None:
    reserved = {"learner", "step", *(d for dims in BUILTIN_DIMS.values() for d in dims), *taken}
    sizes: dict[str, tuple[str, int]] = {}
    for name, info in infos.items():
        other = next((m for m, i in infos.items() if name in i.dims), None)
        if other is not None:
            raise ValueError(f"Metric {name!r} is named like a dimension of metric {other!r}; the result would hold "
                             "both under one name. Rename the method or the dimension in dims=.")
        for dim, size in zip(info.dims, info.shape, strict=True):
            if dim in reserved:
                raise ValueError(f"Metric {name!r} names a dimension {dim!r}, which the result already has (a grid "
                                 f"coordinate, step, learner or layer); choose another name in dims=.")
            if dim in sizes and sizes[dim][1] != size:
                other, other_size = sizes[dim]
                raise ValueError(f"Metrics {other!r} and {name!r} both name the dimension {dim!r} but have sizes "
                                 f"{other_size} and {size}; give them different names in dims=.")
            sizes.setdefault(dim, (name, size))


__all__ = ["Logger", "register_metric", "DEFAULT_METRICS", "BUILTIN_METRICS"]
