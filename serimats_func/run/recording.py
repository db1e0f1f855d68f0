"""Recording a chunk's metrics at its logged steps, on the device, without copying to the host until the
chunk ends.

At each logged step the ``Recorder`` computes, for all N learners of the chunk at once, every built-in metric of
the registry (``metrics.METRICS``) that the chunk records, each a function of one ``metrics.Snapshot`` of the
stacked state: loss and accuracy on the whole train and test sets; weight norm, distance and cosine to each
learner's own initial weights; for learners whose control trains in the same chunk, the metrics against it
(each learner's control is a row of the same stacked state, gathered with a control index (N,):
``tree_map(lambda p: p[idx], params)``); and the logger's own metrics, vmapped. A diverged learner's metrics
are NaN from its divergence on (from the step ``diverged_at`` itself: ``nan_from_divergence``), and so are its
metrics against a control that diverged.

A metric recorded at chosen steps (``MetricSpec.every`` / ``at``, a ``metrics.When``) is computed only at the
logged steps it is due at, a choice made on the host from the step number (the step itself is unchanged); the
snapshot's evaluation pass runs only when a metric due there reads it. Elsewhere the metric holds a placeholder,
NaN of its shape when the records are stacked (the shape of a metric not yet due comes from running it on the
"meta" device, which computes no values).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core import pytrees
from ..core.data import TrainingData, batch_indices, stream_orders
from ..core.evaluation import evaluate_dataset, make_logits
from ..core.interpolation import PathEvaluation, along_path
from ..core.metrics import (
    Data,
    Evaluation,
    MetricFn,
    MetricSpec,
    Snapshot,
    When,
    gather,
    layer_norms,
    recorded,
    vmapped_metrics,
)
from ..core.state import ModelState
from ..core.step import LossFn
from .grid import LearnerSpec


def nan_from_divergence(metrics: Mapping[str, np.ndarray], steps: Sequence[int], diverged_at: np.ndarray,
                        control: np.ndarray | None = None, against: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Metrics (N, steps, ...) NaN at each logged step from a learner's ``diverged_at`` (N,; -1: never) on, the
    step whose training loss was first non-finite (its state after that many updates is the diverged one), and
    for the metrics ``against`` its control, from its control's too (``control`` (N,): the control's row).

    >>> out = nan_from_divergence({"loss": np.ones((2, 3))}, [0, 5, 10], np.array([5, -1]))
    >>> out["loss"].tolist()
    [[1.0, nan, nan], [1.0, 1.0, 1.0]]
    """
    never = np.iinfo(np.int64).max
    own = np.where(diverged_at >= 0, diverged_at, never)  # (N,)
    theirs = np.minimum(own, own[control]) if control is not None else own
    steps = np.asarray(steps, dtype=np.int64)
    out = {}
    for name, values in metrics.items():
        at = theirs if name in against else own
        off = steps[None, :] >= at[:, None]  # (N, steps)
        out[name] = np.where(off.reshape(off.shape + (1,) * (values.ndim - 2)), np.nan, values)
    return out


def builtin_metric_names(evaluate: bool, controls: bool) -> list[str]:
    """The built-in metrics an experiment records, in the result's order (``metrics.METRICS``).

    >>> builtin_metric_names(evaluate=False, controls=True)
    ['param_norm', 'init_distance', 'init_cosine', 'control_distance', 'control_layer_distance', 'control_cosine']
    """
    return [spec.name for spec in recorded(evaluate, controls)]


def control_index(specs: Sequence[LearnerSpec]) -> torch.Tensor:
    """Each learner's control as a row of the chunk (N,), -1 where it has none in the chunk.

    >>> from types import SimpleNamespace as S
    >>> control_index([S(id="c", control_id="c"), S(id="a", control_id="c"), S(id="b", control_id="z")]).tolist()
    [0, 0, -1]
    """
    row: dict[str, int] = {}
    for i, spec in enumerate(specs):
        row.setdefault(spec.id, i)
    return torch.tensor([row.get(s.control_id, -1) if s.control_id else -1 for s in specs], dtype=torch.int64)


class Recorder:
    """Computes and keeps a chunk's metrics: call it with the state after ``step`` updates. ``builtins``: the
    built-in metrics it records (default ``recorded(evaluate, controls)``), each with its ``When``; ``when``: the
    schedules of the custom ``metrics`` (default: every logged step). At a logged step only the metrics due there
    are computed (the evaluation only if one of them reads it): a decision on the step number, on the host; the
    others are NaN there."""

    def __init__(self, specs: Sequence[LearnerSpec], data: TrainingData, template: nn.Module, loss_fn: LossFn,
                 device: torch.device, initial_params: Mapping[str, torch.Tensor], *, evaluate: bool = True,
                 controls: bool = False, metrics: Mapping[str, MetricFn] | None = None,
                 reads_control: Collection[str] = (), steps_per_epoch: int = 1,
                 records: dict[str, list[torch.Tensor]] | None = None, logits_fn: Callable | None = None,
                 evaluation: Callable[[dict, torch.Tensor], tuple[Callable, int | None]] | None = None,
                 builtins: Sequence[MetricSpec] | None = None, when: Mapping[str, When] | None = None):
        self.template, self.loss_fn, self.data, self.device = template, loss_fn, data, device
        self.initial = initial_params  # (N, ...), kept on the device
        self.initial_norms = layer_norms(initial_params)  # (N, L)
        self.evaluate, self.controls, self.steps_per_epoch = evaluate, controls, steps_per_epoch
        self.builtins = list(builtins) if builtins is not None else recorded(evaluate, controls)
        self.logits_fn = logits_fn or make_logits(template)  # the training step's (accelerated) layers, if given
        self.evaluation = evaluation  # (state, x) -> (logits_fn, learners per pass (None: all)); default: logits_fn, all
        index = control_index(specs).to(device)  # (N,)
        self.has_control = index >= 0  # (N,)
        self.control = torch.where(self.has_control, index, torch.arange(len(specs), device=device))  # (N,)
        self.data_keys = list(dict.fromkeys(s.data_stream for s in specs))
        self.which_order = torch.tensor([self.data_keys.index(s.data_stream) for s in specs], device=device)  # (N,)
        self.shared = len(self.data_keys) == 1
        self.reads_control = set(reads_control)
        self.metrics = dict(metrics or {})
        self.when = {name: (when or {}).get(name, When()) for name in self.metrics}
        self._custom: dict[tuple[str, ...], Callable] = {}  # vmapped custom metrics, by the names due together
        self._shapes: dict[str, tuple[int, ...]] = {}  # each metric's own shape (for one learner), once known
        self.records: dict[str, list[torch.Tensor | None]] = records if records is not None else {}
        for name, values in self.records.items():
            if values:
                self._shapes[name] = tuple(values[0].shape[1:])

    @property
    def names(self) -> list[str]:
        """The metrics recorded, built-in ones first."""
        return [spec.name for spec in self.builtins] + list(self.metrics)

    def due(self, step: int) -> tuple[list[MetricSpec], list[str]]:
        """The built-in and custom metrics to compute at logged step ``step``."""
        return [s for s in self.builtins if s.when.due(step)], [n for n in self.metrics if self.when[n].due(step)]

    def batch(self, step: int) -> Data:
        """The training batch of update ``step`` (what a learner trains on next): (B, ...) shared, else (N, B, ...)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        idx = batch_indices(stream_orders(self.data_keys, epoch, len(self.data.x), self.steps_per_epoch,
                                          self.data.batch_size, self.device), position,
                            self.data.batch_size)  # (K, B)
        idx = idx[0] if self.shared else idx[self.which_order]
        return Data(self.data.x[idx], self.data.y[idx])

    def __call__(self, state: dict, step: int) -> None:
        """Record the metrics due at ``step`` of the N learners in ``state`` after ``step`` updates; the others
        get a placeholder, NaN when stacked."""
        builtins, custom = self.due(step)
        self.template.eval()
        try:
            values, control_values = self._compute(state, step, builtins, custom)
        finally:
            self.template.train()
        diverged = state.diverged_at >= 0  # (N,)
        control_off = diverged | diverged[self.control] | ~self.has_control  # (N,)
        for name in self.names:
            value = values.get(name, control_values.get(name))
            if value is not None:
                off = control_off if name in control_values else diverged
                off = off.view(-1, *([1] * (value.ndim - 1)))
                value = torch.where(off, torch.nan, value.to(torch.float64))
                self._shapes.setdefault(name, tuple(value.shape[1:]))
            self.records.setdefault(name, []).append(value)

    def _compute(self, state: dict, step: int, builtins: Sequence[MetricSpec], custom: Sequence[str]) -> tuple[dict, dict]:
        params, buffers = state.params, state.buffers
        predict = self.controls and any(s.against_control and "test" in s.depends_on for s in builtins)
        snapshot = Snapshot(params, self.initial, self.control, lambda split, predictions: self._evaluate(
            state, split, predictions), self.initial_norms, predict=predict,
            along_path=lambda split, alphas: self._along_path(state, split, alphas))
        values: dict[str, torch.Tensor] = {}
        against: dict[str, torch.Tensor] = {}  # metrics against the control
        for spec in builtins:
            (against if spec.against_control else values)[spec.name] = spec.fn(snapshot)
        if custom:
            control = (gather(params, self.control), gather(buffers, self.control))
            for name, value in self._vmapped(tuple(custom))(params, buffers, control=control, batch=self.batch(step)).items():
                (against if name in self.reads_control else values)[name] = value
        return values, against

    def _vmapped(self, names: tuple[str, ...]) -> Callable:
        """The custom metrics ``names`` vmapped over the learners (one function per set of metrics due together)."""
        if names not in self._custom:
            train = Data(self.data.x, self.data.y)
            test = None if self.data.x_test is None else Data(self.data.x_test, self.data.y_test)
            self._custom[names] = vmapped_metrics(self.template, {n: self.metrics[n] for n in names}, train, test,
                                                  shared_batch=self.shared)
        return self._custom[names]

    def _learn_shapes(self, state: dict, names: Sequence[str]) -> None:
        """The own shapes of the metrics ``names`` (for their NaN placeholders when they were never due yet):
        computed on the "meta" device, which computes shapes and no values, or, for a metric that does not run
        there, by computing it once on ``state`` (its value is not recorded)."""
        self.template.eval()
        try:
            with torch.no_grad():
                self._shapes_of(state, names)
        finally:
            self.template.train()

    def _shapes_of(self, state: dict, names: Sequence[str]) -> None:
        step = 0  # the batch a custom metric reads: any will do for its shape
        meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
        params, buffers = pytrees.tree_map(meta, (state.params, state.buffers))
        control, n = self.control.to("meta"), len(self.control)

        def evaluate(split: str, predictions: bool) -> Evaluation:
            x = self.data.x if split == "train" else self.data.x_test
            nan = torch.empty(n, dtype=torch.float64, device="meta")
            return Evaluation(nan, nan, None if not predictions or x is None else
                              torch.empty(n, len(x), dtype=torch.int64, device="meta"))

        def along_path(split: str, alphas: torch.Tensor) -> PathEvaluation:
            nan = torch.empty(n, len(alphas), dtype=torch.float64, device="meta")
            return PathEvaluation(nan, nan)

        specs = {s.name: s for s in self.builtins}
        for name in names:
            try:
                if name in specs:
                    snapshot = Snapshot(params, pytrees.tree_map(meta, self.initial), control, evaluate,
                                        meta(self.initial_norms), predict=self.controls, along_path=along_path)
                    value = specs[name].fn(snapshot)
                else:
                    value = self._meta_custom(name, params, buffers, control, step)
            except Exception:  # a metric that needs values: compute it once
                values, against = self._compute(state, step, [specs[name]] if name in specs else [],
                                                [] if name in specs else [name])
                value = {**values, **against}[name]
            self._shapes[name] = tuple(value.shape[1:])

    def _meta_custom(self, name: str, params: dict, buffers: dict, control: torch.Tensor, step: int) -> torch.Tensor:
        meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
        train = Data(meta(self.data.x), meta(self.data.y))
        test = None if self.data.x_test is None else Data(meta(self.data.x_test), meta(self.data.y_test))
        fn = vmapped_metrics(self.template, {name: self.metrics[name]}, train, test, shared_batch=self.shared)
        batch = pytrees.tree_map(meta, self.batch(step))
        return fn(params, buffers, control=(gather(params, control), gather(buffers, control)), batch=Data(*batch))[name]

    def _evaluate(self, state: dict, split: str, predictions: bool) -> Evaluation:
        """Loss and accuracy of the N learners on the whole ``split`` ("train" or "test"), NaN without it."""
        x, y = (self.data.x, self.data.y) if split == "train" else (self.data.x_test, self.data.y_test)
        if x is None:
            nan = torch.full((len(self.control),), torch.nan, dtype=torch.float64, device=self.device)
            return Evaluation(nan, nan)
        logits_fn, group = self.evaluation(state, x) if self.evaluation else (self.logits_fn, None)
        out = evaluate_dataset(logits_fn, self.loss_fn, state.params, state.buffers, x, y,
                               self.data.eval_batch_size, predictions=predictions, learners_per_pass=group)
        return Evaluation(*out)

    def _along_path(self, state: dict, split: str, alphas: torch.Tensor) -> PathEvaluation:
        """Loss and error (N, A) on the whole ``split`` of the points ``alphas`` of the straight path from each
        learner to its control, as many points per pass as the evaluation evaluates learners; NaN without it."""
        x, y = (self.data.x, self.data.y) if split == "train" else (self.data.x_test, self.data.y_test)
        n = len(self.control)
        if x is None:
            nan = torch.full((n, len(alphas)), torch.nan, dtype=torch.float64, device=self.device)
            return PathEvaluation(nan, nan)
        logits_fn, group = self.evaluation(state, x) if self.evaluation else (self.logits_fn, None)
        learner = ModelState(state.params, state.buffers)
        control = ModelState(gather(state.params, self.control), gather(state.buffers, self.control))
        return along_path(self.template, self.loss_fn, learner, control, alphas.to(self.device), x, y,
                          batch_size=self.data.eval_batch_size, points_per_pass=group or n, logits_fn=logits_fn)

    def against_control(self) -> set[str]:
        """The recorded metrics that compare a learner with its control."""
        return {spec.name for spec in self.builtins if spec.against_control} | (self.reads_control & set(self.metrics))

    def results(self, n: int, state: dict, steps: int | None = None) -> dict[str, np.ndarray]:
        """Each metric of the first ``n`` learners as (n, logged steps, *its own dims) (the first ``steps`` logged
        steps, default all), on the host; NaN where it was not due (``state``: the chunk's state now, for the
        shapes of metrics never due yet)."""
        unknown = [m for m, values in self.records.items() if m not in self._shapes and values[:steps]]
        if unknown:
            self._learn_shapes(state, unknown)
        out = {}
        for m, values in self.records.items():
            values = values[:steps]
            if not values:
                continue
            first = next(v for v in values if v is not None) if any(v is not None for v in values) else None
            nan = torch.full((len(self.control), *self._shapes[m]), torch.nan, dtype=torch.float64,
                             device=self.device if first is None else first.device)
            out[m] = torch.stack([nan if v is None else v for v in values], dim=1)[:n].cpu().numpy()
        return out
