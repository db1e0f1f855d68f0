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
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.data import TrainingData, batch_indices, stream_orders
from ..core.evaluation import evaluate_dataset, make_logits
from ..core.metrics import (
    Data,
    Evaluation,
    MetricFn,
    Snapshot,
    gather,
    layer_norms,
    recorded,
    vmapped_metrics,
)
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
    """Computes and keeps a chunk's metrics: call it with the state after ``step`` updates."""

    def __init__(self, specs: Sequence[LearnerSpec], data: TrainingData, template: nn.Module, loss_fn: LossFn,
                 device: torch.device, initial_params: Mapping[str, torch.Tensor], *, evaluate: bool = True,
                 controls: bool = False, metrics: Mapping[str, MetricFn] | None = None,
                 reads_control: Collection[str] = (), steps_per_epoch: int = 1,
                 records: dict[str, list[torch.Tensor]] | None = None, logits_fn: Callable | None = None,
                 evaluation: Callable[[dict, torch.Tensor], tuple[Callable, int | None]] | None = None):
        self.template, self.loss_fn, self.data, self.device = template, loss_fn, data, device
        self.initial = initial_params  # (N, ...), kept on the device
        self.initial_norms = layer_norms(initial_params)  # (N, L)
        self.evaluate, self.controls, self.steps_per_epoch = evaluate, controls, steps_per_epoch
        self.builtins = recorded(evaluate, controls)  # metrics.METRICS that this chunk records
        self.logits_fn = logits_fn or make_logits(template)  # the training step's (accelerated) layers, if given
        self.evaluation = evaluation  # (state, x) -> (logits_fn, learners per pass (None: all)); default: logits_fn, all
        index = control_index(specs).to(device)  # (N,)
        self.has_control = index >= 0  # (N,)
        self.control = torch.where(self.has_control, index, torch.arange(len(specs), device=device))  # (N,)
        self.data_keys = list(dict.fromkeys(s.data_stream for s in specs))
        self.which_order = torch.tensor([self.data_keys.index(s.data_stream) for s in specs], device=device)  # (N,)
        self.shared = len(self.data_keys) == 1
        self.reads_control = set(reads_control)
        self.custom = None
        if metrics:
            train = Data(data.x, data.y)
            test = None if data.x_test is None else Data(data.x_test, data.y_test)
            self.custom = vmapped_metrics(template, metrics, train, test, shared_batch=self.shared)
        self.records: dict[str, list[torch.Tensor]] = records if records is not None else {}

    def batch(self, step: int) -> Data:
        """The training batch of update ``step`` (what a learner trains on next): (B, ...) shared, else (N, B, ...)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        idx = batch_indices(stream_orders(self.data_keys, epoch, len(self.data.x), self.steps_per_epoch,
                                          self.data.batch_size, self.device), position,
                            self.data.batch_size)  # (K, B)
        idx = idx[0] if self.shared else idx[self.which_order]
        return Data(self.data.x[idx], self.data.y[idx])

    def __call__(self, state: dict, step: int) -> None:
        """Record every metric of the N learners in ``state`` after ``step`` updates."""
        self.template.eval()
        try:
            values, control_values = self._compute(state, step)
        finally:
            self.template.train()
        diverged = state.diverged_at >= 0  # (N,)
        control_off = diverged | diverged[self.control] | ~self.has_control  # (N,)
        for name, value in {**values, **control_values}.items():
            off = control_off if name in control_values else diverged
            off = off.view(-1, *([1] * (value.ndim - 1)))
            self.records.setdefault(name, []).append(torch.where(off, torch.nan, value.to(torch.float64)))

    def _compute(self, state: dict, step: int) -> tuple[dict, dict]:
        params, buffers = state.params, state.buffers
        snapshot = Snapshot(params, self.initial, self.control, lambda split, predictions: self._evaluate(
            state, split, predictions), self.initial_norms, predict=self.controls)
        values: dict[str, torch.Tensor] = {}
        against: dict[str, torch.Tensor] = {}  # metrics against the control
        for spec in self.builtins:
            (against if spec.against_control else values)[spec.name] = spec.fn(snapshot)
        if self.custom is not None:
            control = (gather(params, self.control), gather(buffers, self.control))
            for name, value in self.custom(params, buffers, control=control, batch=self.batch(step)).items():
                (against if name in self.reads_control else values)[name] = value
        return values, against

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

    def against_control(self) -> set[str]:
        """The recorded metrics that compare a learner with its control."""
        return {spec.name for spec in self.builtins if spec.against_control} | (
            self.reads_control if self.custom is not None else set())

    def results(self, n: int) -> dict[str, np.ndarray]:
        """Each metric of the first ``n`` learners as (n, logged steps, *its own dims), on the host."""
        return {m: torch.stack(v, dim=1)[:n].cpu().numpy() for m, v in self.records.items()}
