"""``Experiment``: a grid of learners, trained together, results in a Zarr store.

>>> import tempfile
>>> from serimats_func import Experiment, datasets
>>> from serimats_func.models import MLP
>>> from serimats_func.interventions import PerturbWeights
>>> train, test = datasets.mnist1d()
>>> exp = Experiment(MLP(), train, [PerturbWeights.make_variations(epsilon=(0.0, 0.01), seed=range(2))],
...                  test_dataset=test, steps=5, store=tempfile.mkdtemp() + "/doc.zarr", progress=False)
>>> ds = exp.run()
>>> dict(ds.sizes)
{'epsilon': 2, 'seed': 2, 'step': 2}
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from . import pytrees
from .checkpoints import Checkpoints
from .data import as_tensors, fingerprint, steps_per_epoch
from .grid import Grid, build_grid
from .identity import describe_callable, describe_module
from .interventions import Optimizer
from .learners import initial_model_state, prepare_template
from .loggers import Logger
from .metrics import DEFAULT_METRICS
from .planning import Plan, make_plan
from .plotter import Plotter
from .results import assemble
from .store import Store
from .training import Schedule, TrainingData, train_chunk

DEFAULT_OPTIMIZER = Optimizer(torch.optim.SGD, lr=0.01, momentum=0.9)


class Experiment:
    """A collection of learners differentiated by interventions.

    Args:
        model: the template, any ``nn.Module`` mapping a batch of inputs to logits.
        dataset: training data, a map-style Dataset of (x, y) or a tuple of tensors (x, y).
        interventions: ``make_variations(...)`` results (or single interventions); variations of
            one class are concatenated, classes multiply.
        test_dataset: data for the test metrics (else they are NaN).
        optimizer: the optimizer of learners that no ``Optimizer`` variation sets; default
            ``Optimizer(torch.optim.SGD, lr=0.01, momentum=0.9)``. A torch.optim class is accepted.
        batch_size, epochs, steps: training length (default one epoch); the last batch of an
            epoch may be smaller, as with a DataLoader.
        log_every: also record metrics every this many steps (besides step 0, epoch ends, last).
        seed: the experiment seed, from which every random key derives.
        loss: ``loss(logits, y) -> scalar`` (mean over the batch); default cross-entropy.
        device: default CUDA when available. dtype: of parameters and inputs.
        eval_batch_size: examples per vmapped evaluation batch (default 256 on a CPU, 1024 on CUDA).
        store: the Zarr store's path; default ``runs/<name>.zarr``.
        max_learners_per_chunk: cap on the learners trained together (memory decides otherwise).
        logger: a ``Logger`` (subclass) whose ``@register_metric`` methods are recorded too.
        checkpoint_every: save the chunk in training every this many steps (default: every 10
            minutes), so that a crash loses at most the work since; ``run()`` resumes from it.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: object,
        interventions: Sequence = (),
        test_dataset: object | None = None,
        *,
        optimizer: Optimizer | type | None = None,
        batch_size: int = 64,
        epochs: int | None = None,
        steps: int | None = None,
        log_every: int | None = None,
        seed: int = 0,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        store: str | Path | None = None,
        name: str | None = None,
        eval_batch_size: int | None = None,
        max_learners_per_chunk: int | None = None,
        logger: Logger | None = None,
        checkpoint_every: int | None = None,
        progress: bool = True,
    ):
        _positive_int("batch_size", batch_size)
        if eval_batch_size is not None:
            _positive_int("eval_batch_size", eval_batch_size)
        if epochs is not None and steps is not None:
            raise ValueError("Give epochs= or steps=, not both.")
        if epochs is not None:
            _positive_int("epochs", epochs)
        if steps is not None:
            _positive_int("steps", steps)
        if log_every is not None:
            _positive_int("log_every", log_every)
        if max_learners_per_chunk is not None:
            _positive_int("max_learners_per_chunk", max_learners_per_chunk)
        if checkpoint_every is not None:
            _positive_int("checkpoint_every", checkpoint_every)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer; got {seed!r}.")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type; got {dtype}.")
        if isinstance(optimizer, type):
            optimizer = Optimizer(optimizer)
        if optimizer is not None and (not isinstance(optimizer, Optimizer) or optimizer.values["optimizer"] is None):
            raise ValueError(f"optimizer= takes a torch.optim class or Optimizer(torch.optim.Adam, lr=1e-3); got {optimizer!r}.")
        self.default_optimizer = optimizer or DEFAULT_OPTIMIZER
        self.device = _device(device)

        self.x, self.y = as_tensors(dataset, "dataset")
        self.x = self.x.to(dtype)
        self.x_test = self.y_test = None
        if test_dataset is not None:
            self.x_test, self.y_test = as_tensors(test_dataset, "test_dataset")
            self.x_test = self.x_test.to(dtype)
            if self.x_test.shape[1:] != self.x.shape[1:]:
                raise ValueError(f"test_dataset inputs have shape {tuple(self.x_test.shape[1:])} but dataset "
                                 f"inputs {tuple(self.x.shape[1:])}.")
        labels = int(self.y.max()) + 1 if self.y_test is None else max(int(self.y.max()), int(self.y_test.max())) + 1
        self.template = prepare_template(model, self.x[:2], num_classes=labels)
        _check_loss(loss, self.template, self.x[:2], self.y[:2])

        # Evaluation batches: small on a CPU, where learners x batch x width must stay in cache.
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or (1024 if self.device.type == "cuda" else 256)
        spe = steps_per_epoch(len(self.x), batch_size)
        total = steps if steps is not None else spe * (epochs if epochs is not None else 1)
        self.schedule = Schedule(total_steps=total, steps_per_epoch=spe, log_every=log_every)
        self.seed, self.loss = int(seed), loss
        self.max_learners_per_chunk, self.progress = max_learners_per_chunk, progress
        self.checkpoint_every = checkpoint_every

        self.logger = logger or Logger()
        probe = pytrees.stack([initial_model_state(self.template, init_key=0, dropout_key=0)])
        self.logger.check(self.template, probe["params"], probe["buffers"])

        self.interventions = list(interventions) if isinstance(interventions, (list, tuple)) else [interventions]
        self.name = name or _default_name(self.interventions)
        self.grid: Grid = build_grid(self.interventions, self.default_optimizer, self.seed, self.setup)
        self.store = Store(store if store is not None else Path("runs") / f"{self.name}.zarr")
        self.store.check()

    @property
    def setup(self) -> dict:
        """What every learner of this experiment shares; part of each learner's id."""
        return {
            "model": describe_module(self.template),
            "parameters": {n: list(p.shape) for n, p in self.template.named_parameters()},
            "data": fingerprint(self.x, self.y),
            "test_data": fingerprint(self.x_test, self.y_test) if self.x_test is not None else None,
            "batch_size": self.batch_size,
            "steps": self.schedule.total_steps,
            "log_steps": list(self.schedule.log_steps),
            "loss": describe_callable(self.loss),
            "dtype": str(self.x.dtype),
            "metrics": {name: describe_callable(fn) for name, fn in self.logger.metrics().items()},
        }

    @property
    def data_bytes(self) -> int:
        """Bytes of the train and test tensors, which go to the device whole."""
        return pytrees.nbytes([self.x, self.y, self.x_test, self.y_test])

    def plan(self) -> Plan:
        """What ``run()`` would do: learners in the store vs. to train, groups, chunks, memory."""
        plan = make_plan(
            self.grid, self.store.index(), self.template, self.x[:2], self.batch_size,
            min(self.eval_batch_size, len(self.x)), self.device, self.max_learners_per_chunk,
            data_bytes=self.data_bytes,
        )
        plan.total_steps, plan.store = self.schedule.total_steps, str(self.store.path)
        return plan

    def run(self, plot: bool = False) -> xr.Dataset:
        """Train the learners missing from the store, then return the whole grid's results.
        With ``plot=True``, also save one PNG per metric next to the store."""
        plan = self.plan()
        if plan.chunks:
            self._train(plan)
        ds = self.results()
        if plot:
            Plotter(ds).save_all(self.store.path.with_name(self.store.path.stem + "_plots"))
        return ds

    def _train(self, plan: Plan) -> None:
        self.store.create()
        data = TrainingData(
            x=self.x.to(self.device), y=self.y.to(self.device),
            x_test=None if self.x_test is None else self.x_test.to(self.device),
            y_test=None if self.y_test is None else self.y_test.to(self.device),
            batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
        )
        total = sum(len(c.learners) for c in plan.chunks) * self.schedule.total_steps
        steps = list(self.schedule.log_steps)
        with tqdm(total=total, unit=" learner-steps", disable=not self.progress, desc=self.name) as bar:
            for i, chunk in enumerate(plan.chunks):
                bar.set_postfix_str(f"chunk {i + 1}/{len(plan.chunks)}: {len(chunk.learners)} learners")
                ids = [s.id for s in chunk.learners]
                checkpoints = Checkpoints(self.store.path / "checkpoints", ids, self.checkpoint_every)
                metrics = train_chunk(self.template, chunk.learners, data, self.schedule, self.loss, self.device,
                                      on_step=bar.update, metrics=self.logger.metrics(), checkpoints=checkpoints)
                self.store.write(ids, [s.config for s in chunk.learners], steps, metrics)
                checkpoints.remove()

    def results(self) -> xr.Dataset:
        """The grid's results as stored (NaN for learners not trained yet)."""
        stored_ids = self.store.index()
        present = [s.id for s in self.grid.learners if s.id in stored_ids]
        if present:
            stored = self.store.read(present)
        else:
            stored = xr.Dataset(coords={"learner": [], "step": list(self.schedule.log_steps)})
        grid = self.grid
        if len(present) < len(grid.learners):
            grid = Grid(grid.dims, grid.scalars, [(c, s) for c, s in grid.cells if s.id in stored_ids])
        attrs = {"experiment": self.name, "store": str(self.store.path), "seed": self.seed,
                 "steps": self.schedule.total_steps, "batch_size": self.batch_size}
        return assemble(grid, stored, attrs, order=list(DEFAULT_METRICS) + self.logger.metric_names())


def _check_loss(loss: Callable, template: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    template.eval()
    try:
        with torch.no_grad():
            value = loss(template(x), y)
    except Exception as error:
        raise ValueError(f"loss(logits, y) failed on a batch: {type(error).__name__}: {error}") from error
    finally:
        template.train()
    if not isinstance(value, torch.Tensor) or value.ndim != 0 or not value.dtype.is_floating_point:
        raise ValueError(f"loss(logits, y) must return a scalar float tensor (the batch mean); got {value!r:.80}.")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device here; use device='cpu' or leave it out.")
    return device


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


def _default_name(interventions: list) -> str:
    classes = []
    for item in interventions:
        cls = getattr(item, "cls", type(item))
        if cls.__name__ not in classes:
            classes.append(cls.__name__)
    words = [re.sub(r"(?<!^)(?=[A-Z])", "-", c).lower() for c in classes]
    return "_".join(words) or "experiment"


