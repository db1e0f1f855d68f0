"""What a learner is fed: the order of the data, the batch size, the dataset.

>>> [v.values["batch_size"] for v in BatchSize.make_variations(batch_size=(32, 64))]
[32, 64]
"""

from __future__ import annotations

import numbers
from typing import Any

from .base import Intervention, Variations
from .weights import seed_value


class DataOrder(Intervention):
    """Shuffle the training data with another seed (learners share batches unless this varies).

    ``at=k`` (default 0) spawns, as in Frankle et al. 2020: the learner follows the default data order (seed 0)
    for its first k updates, and its own from update k on. Exactly: with E steps per epoch and batch size B, let
    e, p = divmod(k, E). Epochs before e are the default permutations; in epoch e the first p batches are the
    default permutation's first p * B examples, and the rest of the epoch is the examples not yet seen, in the
    order they take in the learner's own permutation of epoch e (so each epoch still shows every example once);
    epochs after e (and epoch e itself when p == 0) are the learner's own permutations, the same as with
    ``at=0``. Dropout masks keep the default stream's key, so up to step k the learner is its seed-0 twin.

    >>> DataOrder.make_variations(seed=(1, 2), at=500)[1].values
    {'seed': 2, 'at': 500}
    """

    axes = {"seed": 0, "at": 0}
    prefix = "data"
    streams = {"data": "seed"}
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        return seed_value(axis, value, "DataOrder")

    def identity(self) -> dict[str, Any] | None:
        out = super().identity()
        if out is not None and out.get("at") == 0:
            del out["at"]  # at=0 is the plain data order: the ids it always had
        return out

    def first_active_step(self) -> int:
        return self.values["at"]

    def beyond_run(self, total_steps: int) -> str | None:
        at = self.values["at"]
        return None if self.is_default() or at < total_steps else f"at={at} changes the order from update {at + 1} on"


class BatchSize(Intervention):
    """Train with another batch size (default: the experiment's ``batch_size=``). Structural: each batch
    size is its own group, and with ``epochs=`` its own number of steps."""

    axes = {"batch_size": None}
    structural = frozenset({"batch_size"})
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"BatchSize batch_size must be a positive integer; got {value!r}.")
        return int(value)

    def on_setup(self, setup: Any) -> None:
        if self.values["batch_size"] is not None:
            setup.batch_size = self.values["batch_size"]

    def identity(self) -> None:
        return None  # the batch size is part of every learner's setup


class Dataset(Intervention):
    """Train on another dataset. Values are labelled: ``Dataset.make_variations(dataset={"clean": train,
    "noisy": (noisy_train, noisy_test)})``; a value is a training set or a (train, test) pair, in any form
    ``Experiment(dataset=...)`` takes. Without a test set, the experiment's ``test_dataset`` is used."""

    axes = {"dataset": None}
    structural = frozenset({"dataset"})
    builtin = True

    def __init__(self, dataset: Any = None, control: bool = False, label: str | None = None):
        super().__init__(control=control)
        self.source = dataset
        self.values["dataset"] = label if label is not None else (None if dataset is None else "dataset")
        self.given = ("dataset",) if dataset is not None else ()

    @classmethod
    def make_variations(cls, control: bool = False, dataset: Any = None, **axes: Any) -> Variations:
        if axes:
            raise ValueError(f"Dataset has no axis {next(iter(axes))!r}; give dataset={{'label': data, ...}}.")
        if not isinstance(dataset, dict) or not dataset:
            raise ValueError("Dataset.make_variations takes labelled datasets: dataset={'clean': train, "
                             "'noisy': (train2, test2)}.")
        items = [cls(data, control=control, label=str(label)) for label, data in dataset.items()]
        return Variations(cls, items, ("dataset",))

    def on_setup(self, setup: Any) -> None:
        if self.source is not None:
            setup.data = setup.context.data_source(self.values["dataset"], self.source)

    def identity(self) -> None:
        return None  # the data's values are part of every learner's setup

    def structure(self) -> tuple:
        return (("dataset", self.values["dataset"]),)
