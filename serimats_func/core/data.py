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


REREAD = 8  # the first items are read twice: a dataset whose reads differ has a random transform


def _stack_items(dataset, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(dataset) == 0:
        raise DataError(f"{name} is empty.")
    with torch.random.fork_rng(devices=[]):  # a random transform draws from the global RNG: not ours to move
        items = [_item(dataset, i, name) for i in range(len(dataset))]
        for i in range(min(REREAD, len(items))):
            again = _item(dataset, i, name)
            if not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(items[i], again, strict=True)):
                raise DataError(_random_transform_message(dataset, name, i))
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _item(dataset, i: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    item = dataset[i]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{name}[{i}] is a {type(item).__name__}; expected an (x, y) pair.")
    x, y = item
    if not isinstance(x, (torch.Tensor, np.ndarray, int, float)):
        raise DataError(f"{name}[{i}] has an input of type {type(x).__name__} (a PIL image?): give the "
                        "dataset a transform that makes tensors, e.g. transforms.ToTensor().")
    return torch.as_tensor(x), torch.as_tensor(y)


def random_transforms(dataset: object) -> list[str]:
    """The dataset's transforms (``transform`` and ``target_transform``, through ``.dataset`` of wrappers such as
    ``Subset``, inside ``Compose``) that look random: named ``Random*`` or one of torchvision's random ones;
    the whole transform when none does.

    >>> from torchvision import transforms as T
    >>> class Data(list):
    ...     transform = T.Compose([T.ToTensor(), T.RandomHorizontalFlip()])
    >>> random_transforms(Data())
    ['RandomHorizontalFlip(p=0.5)']
    """
    found, whole, seen = [], [], set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        for attr in ("transform", "target_transform"):
            t = getattr(dataset, attr, None)
            if t is None or not callable(t):
                continue
            whole.append(_one_line(t))
            parts = t.transforms if isinstance(getattr(t, "transforms", None), (list, tuple)) else [t]
            found += [_one_line(p) for p in parts if type(p).__name__.startswith("Random") or type(p).__name__ in _RANDOM]
        dataset = getattr(dataset, "dataset", None)
    return found or whole


_RANDOM = frozenset({"ColorJitter", "GaussianBlur", "GaussianNoise", "AutoAugment", "RandAugment", "TrivialAugmentWide",
                     "AugMix", "ElasticTransform", "ScaleJitter", "RandomApply", "RandomChoice", "RandomOrder"})


def _one_line(t: object) -> str:
    text = " ".join(repr(t).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _random_transform_message(dataset: object, name: str, i: int) -> str:
    named = random_transforms(dataset)
    which = f" ({'; '.join(named)})" if named else ""
    return (f"{name} gives different values on two reads of item {i}: its transform is random{which}. The data is "
            "read once, when the Experiment is built, so a random transform would be drawn once and frozen for every "
            "epoch and learner (and drawn anew at each build, so no learner would ever be reused). Keep the dataset's "
            "transform deterministic (ToTensor, Normalize) and augment in the training step with "
            "serimats_func.interventions.Augment, drawn per learner, example and step from the learner's key: "
            "Augment(crop=4, flip=True) is RandomCrop(32, padding=4) then RandomHorizontalFlip(); translate=0.1 is "
            "RandomAffine(degrees=0, translate=(0.1, 0.1)); noise=0.05 adds Gaussian noise.")


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
