"""Data on the device, batches gathered by index, data orders drawn from keys.

Any map-style dataset of ``(x, y)`` pairs (torchvision's included) or an ``(x, y)`` tuple of
tensors becomes two tensors, moved to the device once. Each learner's batch order comes from its
data key; learners that share a key share one batch.

>>> import torch
>>> x, y = as_tensors((torch.zeros(10, 3), torch.arange(10)))
>>> order = epoch_order(data_key=1, epoch=0, n=10)
>>> sorted(order.tolist()) == list(range(10))
True
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .keys import derive_key, generator


class DataError(ValueError):
    """A dataset that cannot be used as given."""


def as_tensors(dataset: object, name: str = "dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: inputs (float) and integer class labels, from a Dataset or an ``(x, y)``
    tuple of tensors or arrays."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(
        isinstance(t, (torch.Tensor, np.ndarray)) for t in dataset
    ):
        x, y = (torch.as_tensor(t) for t in dataset)
    elif hasattr(dataset, "tensors") and len(dataset.tensors) == 2:  # TensorDataset
        x, y = dataset.tensors
    elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        x, y = _stack_items(dataset, name)
    else:
        raise DataError(f"{name} must be a map-style torch Dataset of (x, y) pairs or a tuple (x, y) "
                        f"of tensors; got {type(dataset).__name__}.")
    return _checked(x, y, name)


def _stack_items(dataset, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(dataset) == 0:
        raise DataError(f"{name} is empty.")
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"{name}[{i}] is a {type(item).__name__}; expected an (x, y) pair.")
        x, y = item
        if not isinstance(x, (torch.Tensor, np.ndarray, int, float)):
            raise DataError(f"{name}[{i}] has an input of type {type(x).__name__} (a PIL image?): give the "
                            "dataset a transform that makes tensors, e.g. transforms.ToTensor().")
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    return torch.stack(xs), torch.stack(ys)


def _checked(x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) == 0:
        raise DataError(f"{name} is empty.")
    if len(x) != len(y):
        raise DataError(f"{name} has {len(x)} inputs but {len(y)} labels.")
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{name} labels must be integer class indices of shape (N,); got {y.dtype} {tuple(y.shape)}.")
    if int(y.min()) < 0:
        raise DataError(f"{name} labels must be >= 0; found {int(y.min())}.")
    if not x.dtype.is_floating_point:
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name} inputs contain NaN or infinite values.")
    return x, y.long()


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of the tensors' values, dtypes and shapes: names a dataset in learner ids."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over ``n`` examples; the last one may be smaller (as DataLoader's)."""
    return math.ceil(n / batch_size)


def epoch_order(data_key: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of ``range(n)`` that a learner with ``data_key`` sees in ``epoch``."""
    return torch.randperm(n, generator=generator(derive_key(data_key, "epoch", epoch)))


def epoch_orders(data_keys: Sequence[int], epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """One permutation per distinct data key: (K, n) int64 on ``device``."""
    return torch.stack([epoch_order(k, epoch, n) for k in data_keys]).to(device)


class DataStream(NamedTuple):
    """A learner's data order: its own ``key``; with ``at > 0``, the ``base`` key's order for the first ``at``
    updates (``DataOrder(at=...)``). Learners with equal streams share batches."""

    key: int
    base: int | None = None
    at: int = 0


def stream_order(stream: DataStream, epoch: int, n: int, steps_per_epoch: int, batch_size: int) -> torch.Tensor:
    """The permutation of ``range(n)`` that ``stream`` feeds in ``epoch``: the base order before its fork epoch,
    its own after; in the epoch where it forks mid-way, the base order's first batches, then the examples not
    yet seen in the order of its own permutation of that epoch.

    >>> s = DataStream(key=1, base=0, at=3)
    >>> order = stream_order(s, 0, 10, steps_per_epoch=5, batch_size=2)
    >>> order[:6].tolist() == epoch_order(0, 0, 10)[:6].tolist(), sorted(order.tolist()) == list(range(10))
    (True, True)
    >>> stream_order(s, 1, 10, 5, 2).tolist() == epoch_order(1, 1, 10).tolist()
    True
    """
    if stream.base is None or stream.at <= 0:
        return epoch_order(stream.key, epoch, n)
    fork_epoch, position = divmod(stream.at, steps_per_epoch)
    if epoch < fork_epoch:
        return epoch_order(stream.base, epoch, n)
    own = epoch_order(stream.key, epoch, n)
    if epoch > fork_epoch or position == 0:
        return own
    base = epoch_order(stream.base, epoch, n)
    seen = min(n, position * batch_size)
    rank = torch.empty_like(own)
    rank[own] = torch.arange(n)  # rank[i]: where example i comes in the learner's own order
    rest = base[seen:]
    return torch.cat([base[:seen], rest[torch.argsort(rank[rest])]])


def stream_orders(streams: Sequence[DataStream], epoch: int, n: int, steps_per_epoch: int, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """One permutation per distinct stream: (K, n) int64 on ``device``."""
    return torch.stack([stream_order(s, epoch, n, steps_per_epoch, batch_size) for s in streams]).to(device)


def batch_indices(orders: torch.Tensor, position: int, batch_size: int) -> torch.Tensor:
    """Indices of batch ``position`` of an epoch: (K, B) from orders (K, n)."""
    return orders[:, position * batch_size : (position + 1) * batch_size]


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
