"""The vmapped training step and evaluation: pure functions over stacked learner state.

One step, for every learner of a group at once: forward, loss, ``torch.func.grad``, optimizer
update. Learners that share a data order get the batch unbatched (``in_dims=None``), which is
much cheaper than one copy per learner.

>>> import torch
>>> from serimats_func.models import MLP
>>> from serimats_func.learners import prepare_template, initial_model_state
>>> from serimats_func.optimizers import functional_twin
>>> from serimats_func import pytrees
>>> template = prepare_template(MLP(widths=(8,)), torch.zeros(4, 40))
>>> model = pytrees.stack([initial_model_state(template, k, 0) for k in range(3)])  # N = 3
>>> twin = functional_twin(torch.optim.SGD, lr=0.1)
>>> opt = pytrees.stack([twin.init(pytrees.index(model["params"], i)) for i in range(3)])
>>> hp = pytrees.stack([twin.hparams(lr=0.1)] * 3)
>>> step = make_train_step(template, twin, torch.nn.functional.cross_entropy, shared_batch=True)
>>> params, buffers, opt, loss = step(model["params"], model["buffers"], opt, hp, torch.randn(4, 40), torch.arange(4))
>>> loss.shape
torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad_and_value, vmap

from .learners import forward
from .optimizers import FunctionalOptimizer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_train_step(template: nn.Module, twin: FunctionalOptimizer, loss_fn: LossFn, shared_batch: bool) -> Callable:
    """``step(params, buffers, opt_state, hparams, x, y) -> (params, buffers, opt_state, loss)``
    over N learners: state leaves (N, ...); x (B, ...) if ``shared_batch`` else (N, B, ...)."""

    def one_learner(params, buffers, opt_state, hparams, x, y):
        def loss_of(p):
            b = {k: v.clone() for k, v in buffers.items()}  # updated in place by BatchNorm, dropout
            return loss_fn(forward(template, p, b, x), y), b

        grads, (loss, new_buffers) = grad_and_value(loss_of, has_aux=True)(params)
        new_params, new_opt_state = twin.update(grads, opt_state, params, hparams)
        return new_params, new_buffers, new_opt_state, loss

    data_dim = None if shared_batch else 0
    return vmap(one_learner, in_dims=(0, 0, 0, 0, data_dim, data_dim))


def make_evaluate(template: nn.Module, loss_fn: LossFn) -> Callable:
    """``evaluate(params, buffers, x, y) -> (loss_sum, correct)``, each (N,), for a shared batch
    x (B, ...). Call with the template in eval mode."""

    def one_learner(params, buffers, x, y):
        logits = forward(template, params, buffers, x)  # (B, classes)
        loss_sum = loss_fn(logits, y) * y.shape[0]
        correct = (logits.argmax(dim=-1) == y).sum()
        return loss_sum, correct

    return vmap(one_learner, in_dims=(0, 0, None, None))


def evaluate_dataset(
    evaluate: Callable, params, buffers, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy (fraction) of every learner over all of (x, y): two (N,) tensors."""
    loss_total, correct_total = 0.0, 0
    for start in range(0, len(x), batch_size):
        loss_sum, correct = evaluate(params, buffers, x[start : start + batch_size], y[start : start + batch_size])
        loss_total = loss_total + loss_sum.to(torch.float64)
        correct_total = correct_total + correct
    return loss_total / len(x), correct_total.to(torch.float64) / len(x)
