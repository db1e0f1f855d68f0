"""The typed state of a chunk of N learners: NamedTuples (pytrees that optree and torch.func both walk), each
leaf with the learner axis N first when stacked.

>>> import torch
>>> s = ModelState(params={"w": torch.zeros(3, 2)}, buffers={})  # N = 3
>>> s.params["w"].shape
torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class ModelState(NamedTuple):
    """A learner's model: what ``on_init`` hooks receive and return."""

    params: dict[str, torch.Tensor]  # name -> (N, ...)
    buffers: dict[str, torch.Tensor]  # name -> (N, ...): BatchNorm statistics, dropout keys


class InterventionData(NamedTuple):
    """What one intervention class's hooks need of each learner of the chunk."""

    n: dict[str, Any]  # the learner's numbers: axis -> (N, ...) bool, int64 or float64
    key: torch.Tensor  # (N,) int64: the class's random key
    active: torch.Tensor  # (N,) bool: whether the class changes this learner at all
    windows: torch.Tensor  # (N, K, 2) int64: steps [start, end) in which its step hooks act
    state: Any = ()  # its own state (N, ...), for classes with ``init_state``; else () (no leaf)


class ChunkState(NamedTuple):
    """Everything that evolves in training, for N learners."""

    params: dict[str, torch.Tensor]  # name -> (N, ...)
    buffers: dict[str, torch.Tensor]  # name -> (N, ...)
    opt: Any  # the optimizer's typed state (SGDState, AdamState...), leaves (N, ...)
    hparams: dict[str, torch.Tensor]  # name -> (N,) float64: this learner's numeric hyperparameters
    diverged_at: torch.Tensor  # (N,) int64: the step at which the loss was first non-finite (-1: never)
    interventions: dict[str, InterventionData]  # class name -> its data

    @property
    def model(self) -> ModelState:
        return ModelState(self.params, self.buffers)
