"""The training loop of one chunk: initial states, batches fed by index, the vmapped step, and
metrics at the logged steps. No Python control flow depends on a learner's values, and nothing
is copied to the host until the chunk ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from . import pytrees
from .checkpoints import Checkpoints
from .data import batch_indices, epoch_orders, steps_per_epoch
from .grid import LearnerSpec
from .interventions import perturb_weights, perturbation_directions
from .learners import initial_model_state
from .metrics import DEFAULT_METRICS, MetricFn, vmapped_metrics
from .optimizers import functional_twin
from .step import LossFn, evaluate_dataset, make_evaluate, make_train_step


@dataclass(frozen=True)
class Schedule:
    """How long to train and when to record metrics.

    >>> Schedule(total_steps=10, steps_per_epoch=4, log_every=None).log_steps
    (0, 4, 8, 10)
    """

    total_steps: int
    steps_per_epoch: int
    log_every: int | None = None

    @property
    def log_steps(self) -> tuple[int, ...]:
        """Steps (updates done) at which metrics are recorded: 0, each epoch end, the last step,
        and every ``log_every``."""
        steps = {0, self.total_steps, *range(self.steps_per_epoch, self.total_steps + 1, self.steps_per_epoch)}
        if self.log_every:
            steps.update(range(0, self.total_steps + 1, self.log_every))
        return tuple(sorted(steps))


@dataclass
class TrainingData:
    """Train and test tensors, already on the device."""

    x: torch.Tensor  # (n, ...)
    y: torch.Tensor  # (n,)
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    batch_size: int
    eval_batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.x), self.batch_size)


def initial_state(template: nn.Module, specs: Sequence[LearnerSpec], device: torch.device) -> dict:
    """Stacked initial state of the chunk's learners, built on the CPU (so it is the same on any
    device), then moved: params, buffers (N, ...), optimizer state and hyperparameters."""
    model = pytrees.stack([initial_model_state(template, s.init_key, s.dropout_key) for s in specs])
    if any(s.epsilon != 0 for s in specs):
        directions = pytrees.stack(
            [perturbation_directions(pytrees.index(model["params"], i), s.perturb_key) for i, s in enumerate(specs)]
        )
        epsilon = torch.tensor([s.epsilon for s in specs], dtype=torch.float64)  # (N,)
        relative = torch.tensor([s.relative for s in specs])  # (N,)
        model["params"] = vmap(perturb_weights)(model["params"], directions, epsilon, relative)
    twin = functional_twin(specs[0].optimizer_class, **specs[0].optimizer_values)
    n = len(specs)
    opt_state = pytrees.stack([twin.init(pytrees.index(model["params"], i)) for i in range(n)])
    hparams = pytrees.stack([twin.hparams(**s.optimizer_values) for s in specs])
    state = {"params": model["params"], "buffers": model["buffers"], "opt": opt_state, "hparams": hparams}
    return pytrees.to(state, device)


def train_chunk(
    template: nn.Module,
    specs: Sequence[LearnerSpec],
    data: TrainingData,
    schedule: Schedule,
    loss_fn: LossFn,
    device: torch.device,
    on_step: Callable[[int], None] = lambda n: None,
    metrics: Mapping[str, MetricFn] | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict[str, np.ndarray]:
    """Train one chunk of learners of one structure; returns each metric as (N, len(log_steps)).
    With ``checkpoints``, resume from the last one and save new ones when due.

    A lone learner is trained as two identical copies: with a learner axis of 1, torch turns
    batched matmuls into plain ones whose rounding differs, and a learner must give the same
    numbers whether it trains alone or in a batch."""
    n_learners = len(specs)
    specs = list(specs) * 2 if n_learners == 1 else list(specs)
    twin = functional_twin(specs[0].optimizer_class, **specs[0].optimizer_values)
    resumed = checkpoints.load(device) if checkpoints is not None else None
    start, state, records = resumed if resumed else (0, initial_state(template, specs, device), None)
    params, buffers, opt, hparams = state["params"], state["buffers"], state["opt"], state["hparams"]

    data_keys = list(dict.fromkeys(s.data_key for s in specs))
    shared = len(data_keys) == 1
    which_order = torch.tensor([data_keys.index(s.data_key) for s in specs], device=device)  # (N,)
    step_fn = make_train_step(template, twin, loss_fn, shared_batch=shared)
    evaluate = make_evaluate(template, loss_fn)

    custom = vmapped_metrics(template, metrics) if metrics else None
    records = records or {m: [] for m in DEFAULT_METRICS}
    log_steps = set(schedule.log_steps)

    def record() -> None:
        template.eval()
        sets = [("train", data.x, data.y), ("test", data.x_test, data.y_test)]
        for name, x, y in sets:
            if x is None:
                nan = torch.full((len(specs),), float("nan"), dtype=torch.float64, device=device)
                loss, acc = nan, nan
            else:
                loss, acc = evaluate_dataset(evaluate, params, buffers, x, y, data.eval_batch_size)
            records[f"{name}_loss"].append(loss)
            records[f"{name}_acc"].append(acc)
        if custom is not None:
            for name, value in custom(params, buffers).items():
                records.setdefault(name, []).append(value.to(torch.float64))
        template.train()

    template.train()
    with torch.no_grad():
        if start == 0 and 0 in log_steps:
            record()
        on_step(start * n_learners)
        orders = None
        for step in range(start, schedule.total_steps):
            epoch, position = divmod(step, schedule.steps_per_epoch)
            if position == 0 or orders is None:
                orders = epoch_orders(data_keys, epoch, len(data.x), device)  # (K, n)
            idx = batch_indices(orders, position, data.batch_size)  # (K, B)
            if shared:
                xb, yb = data.x[idx[0]], data.y[idx[0]]  # (B, ...)
            else:
                idx = idx[which_order]  # (N, B)
                xb, yb = data.x[idx], data.y[idx]  # (N, B, ...)
            params, buffers, opt, _ = step_fn(params, buffers, opt, hparams, xb, yb)
            if step + 1 in log_steps:
                record()
            on_step(n_learners)
            if checkpoints is not None and step + 1 < schedule.total_steps and checkpoints.due(step + 1):
                state = {"params": params, "buffers": buffers, "opt": opt, "hparams": hparams}
                checkpoints.save(step + 1, state, records)
    return {m: torch.stack(v, dim=1)[:n_learners].cpu().numpy() for m, v in records.items()}  # (N, n_log)
