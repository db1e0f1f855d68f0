"""The tests' one way to build an Experiment, as a plain function: ``make_experiment(interventions, store=...,
**settings)``. The ``experiment`` fixture in conftest.py wraps it (with a fresh store per call), and scripts
that tests run in another process (tests/store_worker.py, the scripts the identity tests write) import it
from here, so every test builds its experiments the same way."""

from __future__ import annotations

import functools

#: What every test experiment trains unless a test says otherwise: 16 steps of batch 32, no progress bar.
DEFAULTS = {"steps": 16, "batch_size": 32, "progress": False}


@functools.lru_cache(maxsize=1)
def small_mnist1d():
    """The first 512 / 256 examples of the standard MNIST-1D split: fast to train on. Built once per process."""
    from torch.utils.data import TensorDataset

    from serimats_func import datasets

    train, test = datasets.mnist1d()
    return (TensorDataset(*(t[:512] for t in train.tensors)), TensorDataset(*(t[:256] for t in test.tensors)))


def make_experiment(interventions=(), *, store, model=None, data=None, **settings):
    """An Experiment of ``interventions`` on ``data`` = (train, test) (test may be None; default: the small
    MNIST-1D split) with ``model`` (default: a 32-unit MLP) and DEFAULTS. Any Experiment argument in
    ``settings`` overrides a default; ``epochs=`` replaces the default ``steps``."""
    from serimats_func import Experiment
    from serimats_func.models import MLP

    train, test = data if data is not None else small_mnist1d()
    defaults = {k: v for k, v in DEFAULTS.items() if not (k == "steps" and "epochs" in settings)}
    model = model if model is not None else MLP(widths=(32,))
    return Experiment(model, train, list(interventions), test_dataset=test, store=store, **{**defaults, **settings})
