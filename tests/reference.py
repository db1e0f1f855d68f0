"""Plain PyTorch twins of what the library does: one learner, one nn.Module, one torch.optim optimizer,
a Python loop, and each intervention done by hand (a changed ``param_groups`` value in a window, noise added
to ``.grad``, a forward hook...). Tests compare the library's recorded metrics with these.

The twin takes from the library only what defines a learner, not how it trains: its initial weights
(``initial_model_state`` with the learner's init key), its data order (``epoch_order`` with its data key),
and the counter-based noise of its intervention keys (``keys.normal``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from serimats_func.core import keys
from serimats_func.core.data import epoch_order, steps_per_epoch
from serimats_func.core.learners import initial_model_state
from serimats_func.run.grid import LearnerSpec


def noise(key: int, shape, dtype, *stream) -> torch.Tensor:
    """The library's noise for a class key and stream (strings or ints), drawn outside any vmap."""
    k = torch.tensor(key, dtype=torch.int64)
    for part in stream:
        k = keys.fold_in(k, keys.string_key(part) if isinstance(part, str) else torch.tensor(part, dtype=torch.int64))
    return keys.normal(k, tuple(shape), dtype)


def windows_hold(windows, step: int) -> bool:
    return windows is None or any(s <= step < (float("inf") if e is None else e) for s, e in windows)


class Twin:
    """One learner trained by hand. Subclass hooks: ``before_step`` (set param_groups), ``on_grads``,
    ``after_step``, ``forward_hooks`` (installed on the module)."""

    def __init__(self, spec: LearnerSpec, data: tuple[torch.Tensor, torch.Tensor], loss: Callable = nn.functional.cross_entropy):
        setup = spec.setup
        self.spec, self.loss = spec, loss
        self.x, self.y = data
        self.module = copy.deepcopy(setup.template)
        state = initial_model_state(setup.template, spec.init_key, spec.dropout_key)
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(state.params[name])
        self.base = dict(setup.optimizer_values)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = setup.optimizer_class(trainable, foreach=False, **self.base)
        self.batch_size = setup.batch_size

    def train_loss(self) -> float:
        self.module.eval()
        with torch.no_grad():
            value = float(self.loss(self.module(self.x), self.y))
        self.module.train()
        return value

    def run(self, steps: int, log_every: int) -> dict[int, float]:
        n = len(self.x)
        spe = steps_per_epoch(n, self.batch_size)
        losses = {0: self.train_loss()}
        order = None
        for step in range(steps):
            epoch, position = divmod(step, spe)
            if position == 0:
                order = epoch_order(self.spec.data_key, epoch, n)
            idx = order[position * self.batch_size : (position + 1) * self.batch_size]
            self.before_step(step)
            self.optimizer.zero_grad()
            self.step = step
            self.loss(self.module(self.x[idx]), self.y[idx]).backward()
            self.on_grads(step)
            self.optimizer.step()
            self.after_step(step)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                losses[step + 1] = self.train_loss()
        return losses

    def before_step(self, step: int) -> None:
        pass

    def on_grads(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass


def assert_same_learner(module: nn.Module, optimizer: torch.optim.Optimizer, final: nn.Module,
                        final_optimizer: torch.optim.Optimizer) -> None:
    """A learner trained on in plain PyTorch equals the stored one (float64, 1e-10): its tensors and every
    optimizer state key."""
    for (name, p), q in zip(module.state_dict().items(), final.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    for mine, theirs in zip(optimizer.state.values(), final_optimizer.state.values(), strict=True):
        assert set(mine) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(mine[key].double(), theirs[key].double(), rtol=1e-10, atol=1e-12, msg=key)
