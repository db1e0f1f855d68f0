"""serimats-func: train a grid of training variations as a few vectorized runs.

>>> from serimats_func import Experiment, datasets
"""

from . import datasets
from .experiments import Experiment

__all__ = ["Experiment", "datasets"]
__version__ = "0.1.0"
