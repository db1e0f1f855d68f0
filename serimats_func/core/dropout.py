"""Dropout with a per-learner key.

``torch.nn.Dropout`` draws from the global RNG, so under ``vmap`` a learner's masks would depend
on its neighbours. The library swaps each ``nn.Dropout`` of a template for ``KeyedDropout``,
whose masks are a pure function of its ``key`` buffer (one per learner) and a call counter.

>>> import torch
>>> d = KeyedDropout(0.5, key=7)
>>> a = d(torch.ones(4, 8))
>>> _ = d.calls.zero_()
>>> b = d(torch.ones(4, 8))
>>> torch.equal(a, b)
True
"""

from __future__ import annotations

import torch
from torch import nn

from .keys import fold_in, uniform


class KeyedDropout(nn.Module):
    """Inverted dropout whose masks come from ``uniform(fold_in(key, calls), shape)``.
    ``channels=True`` drops whole channels of a (B, C, ...) input, as ``nn.Dropout1d/2d/3d``."""

    def __init__(self, p: float = 0.5, key: int = 0, channels: bool = False):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.channels = channels
        self.register_buffer("key", torch.tensor(key, dtype=torch.int64))
        self.register_buffer("calls", torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"p={self.p}, channels={self.channels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = x.shape[:2] + (1,) * (x.ndim - 2) if self.channels else x.shape
        keep = uniform(fold_in(self.key, self.calls), shape) >= self.p
        self.calls.add_(1)
        return x * keep.to(x.dtype) / (1.0 - self.p)


def swap_dropout(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` (and ``Dropout1d/2d/3d``) inside ``module``, in place, by a
    ``KeyedDropout``."""
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, KeyedDropout(child.p))
        elif type(child) in (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
            setattr(module, name, KeyedDropout(child.p, channels=True))
        else:
            swap_dropout(child)
    return module
