"""Learners on the straight path between two sets of weights (linear mode connectivity, Frankle et al. 2020):
the loss and error of ``(1 - alpha) * a + alpha * b`` for N pairs of learners (a, b) at A values of alpha, and
the error barrier of such a path.

Every floating-point tensor is interpolated, parameters and buffers alike: a BatchNorm layer on the path uses
the interpolated running mean and variance (its statistics are not recomputed for the interpolated weights).
Integer buffers (BatchNorm's ``num_batches_tracked``, a dropout layer's key and call counter) are not
interpolated: every point takes ``a``'s. The points are ``torch.lerp(a, b, alpha)``: exactly ``a`` at
alpha = 0, exactly ``b`` at alpha = 1, and exactly ``a`` everywhere when ``a`` equals ``b``. They are evaluated
in eval mode on the whole data set, as ``evaluation.evaluate_dataset`` evaluates learners.

>>> from serimats_func.models import MLP
>>> from serimats_func.core.learners import prepare_template, initial_model_states
>>> template = prepare_template(MLP(widths=(8,)), torch.zeros(2, 40))
>>> a, b = initial_model_states(template, [1, 2], [0, 0]), initial_model_states(template, [3, 3], [0, 0])
>>> x, y = torch.randn(50, 40, generator=torch.Generator().manual_seed(0)), torch.arange(50) % 10
>>> path = along_path(template, torch.nn.functional.cross_entropy, a, b, torch.tensor([0.0, 0.5, 1.0]), x, y)
>>> path.loss.shape, path.error.dtype
(torch.Size([2, 3]), torch.float64)
>>> bool(path.loss[0, 2] == path.loss[1, 2])  # both paths end at the same b
True
>>> barrier(torch.tensor([[0.1, 0.4, 0.2]])).tolist()  # the peak above the mean of the two ends, 0.15
[0.25]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from . import pytrees
from .evaluation import evaluate_dataset, make_logits
from .state import ModelState
from .step import LossFn


class PathEvaluation(NamedTuple):
    """N paths evaluated at A points each."""

    loss: torch.Tensor  # (N, A) float64: the loss on the whole data set
    error: torch.Tensor  # (N, A) float64: 1 - accuracy (NaN where the logits are not finite)


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], at: torch.Tensor) -> dict[str, torch.Tensor]:
    """The points ``(1 - at[k]) * a[k] + at[k] * b[k]`` of K pairs of stacked tensors (K, ...) -> (K, ...), as
    ``torch.lerp``; integer tensors are ``a``'s.

    >>> p = interpolate({"w": torch.tensor([[0.0], [2.0]]), "n": torch.tensor([1, 2])},
    ...                 {"w": torch.tensor([[1.0], [4.0]]), "n": torch.tensor([5, 6])}, torch.tensor([0.5, 0.25]))
    >>> p["w"].flatten().tolist(), p["n"].tolist()
    ([0.5, 2.5], [1, 2])
    """
    out = {}
    for name, start in a.items():
        if start.is_floating_point():
            weight = at.to(start.dtype).view(-1, *([1] * (start.ndim - 1)))  # (K, 1...)
            out[name] = torch.lerp(start, b[name], weight)
        else:
            out[name] = start
    return out


def along_path(template: nn.Module, loss_fn: LossFn, a: ModelState, b: ModelState, alphas: torch.Tensor,
               x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000, points_per_pass: int | None = None,
               logits_fn: Callable | None = None) -> PathEvaluation:
    """Loss and error on all of (x, y) of the points ``(1 - alpha) * a + alpha * b`` of N paths (``a``, ``b``:
    stacked states (N, ...); ``alphas`` (A,)): ``PathEvaluation`` of (N, A). The template is evaluated in eval
    mode (its mode is restored after); ``batch_size`` examples per forward pass; ``points_per_pass`` points
    (learners) per pass over the data (default all N * A: at most that many interpolated states are held at once);
    ``logits_fn``: ``evaluation.make_logits``'s function to use (default ``make_logits(template)``)."""
    if a.params.keys() != b.params.keys() or a.buffers.keys() != b.buffers.keys():
        raise ValueError("The two ends of the path are different models: "
                         f"{sorted(a.params) + sorted(a.buffers)} against {sorted(b.params) + sorted(b.buffers)}.")
    alphas = torch.as_tensor(alphas, dtype=torch.float64, device=x.device).flatten()
    n, n_alphas = len(pytrees.leaves(a.params)[0]), len(alphas)
    total = n * n_alphas
    group = total if points_per_pass is None else max(1, min(points_per_pass, total))
    logits_fn = logits_fn or make_logits(template)
    losses, errors = [], []
    training = template.training
    template.eval()
    try:
        with torch.no_grad():
            for start in range(0, total, group):
                points = torch.arange(start, min(total, start + group), device=x.device)  # flat index i * A + j
                lone = len(points) == 1  # a lone point is evaluated twice: a learner axis of 1 rounds otherwise
                rows = points.repeat(2) if lone else points
                path, at = rows // n_alphas, alphas[rows % n_alphas]
                ends = [pytrees.index(state, path) for state in (a, b)]
                params = interpolate(ends[0].params, ends[1].params, at)  # (K, ...)
                buffers = interpolate(ends[0].buffers, ends[1].buffers, at)
                loss, acc = evaluate_dataset(logits_fn, loss_fn, params, buffers, x, y, batch_size)
                losses.append(loss[:1] if lone else loss)
                errors.append(1 - (acc[:1] if lone else acc))
    finally:
        template.train(training)
    return PathEvaluation(torch.cat(losses).view(n, n_alphas), torch.cat(errors).view(n, n_alphas))


def barrier(curve: torch.Tensor) -> torch.Tensor:
    """The barrier of paths evaluated at evenly spaced points from one end to the other, ``curve`` (N, A): the
    largest value on the path minus the mean of the two ends' values, (N,). NaN where a point is NaN."""
    return curve.amax(dim=1) - (curve[:, 0] + curve[:, -1]) / 2
