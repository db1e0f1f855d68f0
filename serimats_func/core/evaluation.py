"""Evaluation of N learners on a whole data set: logits of a shared batch under vmap (or one learner after
another, as the ``"serial"`` plan trains them), loss and accuracy exactly over the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import vmap

from ..acceleration import convolutions
from . import pytrees
from .learners import forward
from .step import LossFn, _channels_last, _same


def make_logits(template: nn.Module, layers: Mapping[str, str] | None = None, per_learner: bool = False) -> Callable:
    """``logits(params, buffers, x) -> (N, B, classes)`` for a shared batch x (B, ...). Call with the
    template in eval mode (``layers``: as for ``make_train_step``; the accelerated copy follows the
    template's mode). ``per_learner``: one learner after another, as the ``"serial"`` plan trains them."""
    if per_learner:
        def looped(p, b, x):
            layout = _channels_last if x.device.type == "cpu" and x.ndim == 4 else _same
            x = layout(x)
            return torch.stack([forward(template, {k: layout(v[i]) for k, v in p.items()}, {k: v[i] for k, v in b.items()}, x)
                                for i in range(len(next(iter(p.values()))))])

        return looped
    if not layers:
        return vmap(lambda p, b, x: forward(template, p, b, x), in_dims=(0, 0, None))
    model = convolutions.accelerate(template, layers)

    def logits(p, b, x):
        model.train(template.training)
        return forward(model, p, b, x)

    return vmap(logits, in_dims=(0, 0, None))


def evaluate_dataset(logits_fn: Callable, loss_fn: LossFn, params, buffers, x: torch.Tensor, y: torch.Tensor,
                     batch_size: int, predictions: bool = False,
                     learners_per_pass: int | None = None) -> tuple[torch.Tensor, ...]:
    """Loss and accuracy (fraction) of every learner on all of (x, y), two (N,) float64 tensors. The loss
    is ``loss_fn`` on the logits of the whole set, whatever the evaluation batch size, so it is exact for
    any loss (weighted, summed...). A learner with non-finite logits has accuracy NaN, not the accuracy of
    argmax over NaN. With ``predictions=True``, also each learner's argmax predictions (N, n).
    ``learners_per_pass`` (at least 2; default all) evaluates the learners in groups, each over the whole set:
    less memory, sometimes faster, the same numbers (each learner's logits are computed alone within the
    vmapped operations; tests/test_speed.py checks they are bitwise the same)."""
    def one_pass(p, b) -> tuple[torch.Tensor, ...]:
        first = logits_fn(p, b, x[:batch_size])  # (k, B, classes)
        logits = first.new_empty(first.shape[0], len(x), *first.shape[2:])  # (k, n, classes), allocated once:
        logits[:, : first.shape[1]] = first  # no survivor of one batch between the next one's blocks in the heap
        del first
        for s in range(batch_size, len(x), batch_size):
            logits[:, s : s + batch_size] = logits_fn(p, b, x[s : s + batch_size])
        loss = vmap(loss_fn, in_dims=(0, None))(logits, y)  # (k,)
        finite = torch.isfinite(logits).flatten(1).all(dim=1)  # (k,)
        predicted = logits.argmax(dim=-1)  # (k, n)
        accuracy = (predicted == y).sum(dim=1).to(torch.float64) / len(y)
        return (loss.to(torch.float64), torch.where(finite, accuracy, torch.nan)) + ((predicted,) if predictions else ())

    n = None if learners_per_pass is None else len(pytrees.leaves(params)[0])
    if n is None or learners_per_pass >= n:
        return one_pass(params, buffers)
    group = max(2, learners_per_pass)
    parts = []
    for start in range(0, n, group):
        part = slice(start, min(n, start + group))
        if part.stop - part.start == 1:  # a lone last learner: evaluate it with its neighbour (same numbers)
            part = slice(part.start - 1, part.stop)
        out = one_pass(pytrees.index(params, part), pytrees.index(buffers, part))
        parts.append(tuple(t[start - part.start :] for t in out))
    return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))
