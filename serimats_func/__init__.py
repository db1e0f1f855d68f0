"""serimats-func: train a grid of training variations as a few vectorized runs.

>>> from serimats_func import Experiment, datasets
"""

from . import datasets
from .experiments import Experiment
from .interpolation import interpolate
from .run.checkpoints import load_learner
from .store.zarr_store import open_store

__all__ = ["Experiment", "datasets", "interpolate", "load_learner", "open_store"]
__version__ = "0.1.0"
