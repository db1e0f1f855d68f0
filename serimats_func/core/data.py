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
    elif isinstance(dataset, dict):
        keys = ", ".join(repr(k) for k in list(dataset)[:4])
        raise DataError(f"{name} is a dict (keys {keys}); give a tuple (x, y) of tensors, e.g. "
                        f"(d['x'], d['y']), or a map-style Dataset of (x, y) pairs (TensorDataset(x, y)).")
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
