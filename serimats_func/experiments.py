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
import runpy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from torch import nn

from .acceleration.compile_record import describe_policy
from .acceleration.prepare import ChunkSpeed, Speed
from .callbacks import Callbacks, check_callbacks
from .core import metrics as metric_registry
from .core import pytrees
from .core.data import as_tensors, steps_per_epoch
from .core.learners import initial_model_state
from .core.metrics import Data
from .interventions.optimizer import Optimizer, as_optimizer
from .jupyter import show_inline
from .loggers import Logger, metric_choices, metric_specs
from .plotter import Plotter
from .run import trial
from .run.checkpoints import load_learner, select_learner
from .run.forks import ForkTree, describe_forks, fork_tree, segments
from .run.grid import Grid, LearnerSpec, build_grid, class_name
from .run.identity import describe_callable, describe_class, digest
from .run.planning import Chunk, Plan, describe_group, make_plan
from .run.results import experiment_record
from .run.resume import Need, Start, start_of, state_at
from .run.runner import Learners, Runner, RunSettings, read_results
from .run.setup import Setup, SetupContext
from .run.training import Schedule, compile_outlook
from .store.zarr_store import Store

DEFAULT_OPTIMIZER = Optimizer(torch.optim.SGD, lr=0.01, momentum=0.9)
DEFAULT_STORE = Path("runs") / "serimats.zarr"  # every experiment's, unless store= says otherwise
MAX_INLINE_PLOTS = 4  # run(plot=True) in Jupyter shows at most this many of the PNGs it writes


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
        log_at: also record metrics at these steps (updates done), e.g. ``log_at=[1, 2, 5, 10]``.
        seed: the experiment seed, from which every random key derives.
        loss: ``loss(logits, y) -> scalar`` (mean over the batch); default cross-entropy.
        device: default CUDA when available. dtype: of parameters and inputs.
        eval_batch_size: examples per vmapped evaluation batch (default 256 on a CPU, 1024 on CUDA);
            it changes no number: losses are computed on the logits of the whole set.
        evaluate: record the train and test loss and accuracy (default True).
        store: the Zarr store's path; default ``runs/serimats.zarr``, one store for every experiment (a learner is
            found by its id, so an experiment reuses what any other stored). Give ``store=`` to keep a grid apart.
        name: the experiment's name in its store (default: made from its intervention classes' names); it selects
            the experiment's learners for ``serimats-func ls/plot/tensorboard --experiment NAME``, and names its
            plots folder ``runs/<name>_plots`` beside the default store. Not part of any learner's id.
        max_learners_per_chunk: cap on the learners trained together (memory decides otherwise).
        logger: a ``Logger`` (subclass) whose ``@register_metric`` methods are recorded too (besides the
            built-in metrics: see ``metrics``); ``@register_metric(every=..., at=...)`` records one at fewer steps.
        metrics: which built-in metrics are recorded, and when: a dict {name: dict(every=k, at=[...])} records
            that metric only at the logged steps that are multiples of k and at the steps ``at`` (logged too),
            NaN elsewhere; {name: False} does not record it, {name: True} records it at its default steps; a list
            of names records those optional built-ins (``MetricSpec.optional``) at their default steps. Names are
            checked against the registry.
        checkpoint_every: save the chunk in training every this many steps (default: every 10
            minutes), so that a crash loses at most the work since; ``run()`` resumes from it.
        compile: ``torch.compile`` the whole training step: ``"auto"`` (default: when a chunk would
            train long enough to repay it), True or False. See ``acceleration``.
        convolutions: how convolutions of many learners run: ``"auto"`` (measured per chunk) or a plan
            of ``convolutions.PLANS`` (``"vmap"``: torch.func's own).
        precision: ``"float32"`` (default), ``"tf32"`` or ``"bf16"``; the last two change results beyond
            float32 rounding, so their results are stored apart from float32 ones.
        keep_states, keep_every: also keep every learner's full state (params, buffers, optimizer state) in the
            store at these steps, or every this many steps; ``load_learner`` gives one back. The final state is
            always kept, so that asking for more steps later continues from it. Asking for a state the store
            lacks trains the learner again from the latest state it holds before that step.
        callbacks: objects watching the training as it goes, called at each chunk's start and end and after each
            step (see ``serimats_func.callbacks``); they change nothing, and learner ids do not depend on them.
        fork: train each prefix that learners share once and fork them from its state (default True; see
            ``serimats_func.run.forks``); False trains every learner from its own start. No number changes.

    Building an Experiment checks everything it can before anything is written: settings, data, model,
    interventions, metrics, and one trial training step of a few learners of each group on the CPU (see
    ``serimats_func.run.trial``). A mistake raises ``ValueError`` (or ``TypeError``) naming the problem and the fix.
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
        log_at: Sequence[int] = (),
        seed: int = 0,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        store: str | Path | None = None,
        name: str | None = None,
        eval_batch_size: int | None = None,
        evaluate: bool = True,
        max_learners_per_chunk: int | None = None,
        logger: Logger | None = None,
        checkpoint_every: int | None = None,
        keep_states: Sequence[int] = (),
        keep_every: int | None = None,
        progress: bool = True,
        compile: bool | str = "auto",
        convolutions: str = "auto",
        precision: str = "float32",
        callbacks: Sequence = (),
        fork: bool = True,
        metrics: Any = None,
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
        self.log_at = _log_at(log_at)
        if max_learners_per_chunk is not None:
            _positive_int("max_learners_per_chunk", max_learners_per_chunk)
        if checkpoint_every is not None:
            _positive_int("checkpoint_every", checkpoint_every)
        if keep_every is not None:
            _positive_int("keep_every", keep_every)
        if isinstance(keep_states, (str, bytes)) or not isinstance(keep_states, (Sequence, set, frozenset)) or any(
                isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0 for k in keep_states):
            raise ValueError(f"keep_states must be a list of steps (integers >= 0); got {keep_states!r}.")
        _flag("evaluate", evaluate)
        _flag("progress", progress)
        if store is not None and not isinstance(store, (str, Path)) and not hasattr(store, "__fspath__"):
            raise ValueError(f"store= takes the path of the Zarr store (a str or pathlib.Path such as "
                             f"'runs/sweep.zarr'); got {store!r} ({type(store).__name__}).")
        if name is not None:
            _checked_name(name)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer; got {seed!r}.")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point torch.dtype such as torch.float32 or torch.float64; "
                             f"got {dtype!r}.")
        self.default_optimizer = DEFAULT_OPTIMIZER if optimizer is None else as_optimizer(optimizer)
        self.requested_device = None if device is None else str(device)  # a shard on another node decides again
        self.device = _device(device)
        self.speed = Speed(compile=compile, convolutions=convolutions, precision=precision)
        self.speed_report: list[ChunkSpeed] = []  # per chunk trained by the last run(): choices and their cost

        default_test = None
        if test_dataset is not None:
            x_test, y_test = as_tensors(test_dataset, "test_dataset")
            default_test = (x_test.to(dtype).clone(), y_test.clone())
        self.context = SetupContext(loss, dtype, default_test)
        data = self.context.data_source(None, dataset)
        self.base = Setup(model=model, data=data, batch_size=batch_size, default_optimizer=self.default_optimizer,
                          context=self.context)
        _check_loss(loss, self.base.template, data.x[:2], data.y[:2])

        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or (1024 if self.device.type == "cuda" else 256)
        self.epochs, self.steps, self.log_every = epochs, steps, log_every
        self.seed, self.loss = int(seed), loss
        self.evaluate = evaluate
        self.max_learners_per_chunk, self.progress = max_learners_per_chunk, progress
        self.checkpoint_every = checkpoint_every
        self.keep_states, self.keep_every = sorted({int(k) for k in keep_states}), keep_every
        self.callbacks = check_callbacks(callbacks)
        if not isinstance(fork, bool):
            raise ValueError(f"fork must be True or False; got {fork!r}.")
        self.fork = fork
        self._prefix_needs: dict[str, tuple[int, tuple[int, ...]]] = {}  # prefix id -> (its last step, fork steps)
        self.poll_seconds = 0.5  # how often to look for learners that another process trains
        self._metric_keys: dict[tuple, dict[str, str]] = {}

        if isinstance(logger, type):
            raise ValueError(f"logger= takes a Logger instance; got the class {logger.__name__}: use logger={logger.__name__}().")
        if logger is not None and not isinstance(logger, Logger):
            raise ValueError(f"logger= takes a Logger instance (a subclass with @register_metric methods); got {logger!r}.")
        self.logger = logger or Logger()

        self.metric_choices = metric_choices(metrics, [n for n, spec in metric_registry.METRICS.items() if spec.optional])
        self.interventions = list(interventions) if isinstance(interventions, (list, tuple)) else [interventions]
        self.name = _checked_name(name) if name is not None else _default_name(self.interventions)
        self.grid: Grid = build_grid(self.interventions, self.base, self.seed)
        self._by_id = {s.id: s for s in self.grid.learners}
        self._check_metric_choices()
        self._check_log_at()
        self._check_steps_in_run()
        self.reads_control = self._check_metrics()
        _warn_controls_apart(self.grid)
        self._loss_key = digest(self.context.loss_description())
        self._code_keys = {n: digest(describe_callable(fn)) for n, fn in self.logger.metrics().items()}
        for group in trial.groups(self.grid.learners):  # what only shows in training fails now, not in run()
            setup = group[0].setup
            smallest = trial.smallest_batch(len(setup.data.x), setup.batch_size, self.schedule_of(setup).total_steps)
            trial.trial_step(group, self.loss, smallest)
        # compared with what they are at run() (after the trial step, which may move a model's Python counters)
        self._built_from = self._identity_inputs()
        self.store_given = store is not None
        self.store = Store(store if store is not None else DEFAULT_STORE)
        self.store.check()
        if store is None:
            _note_old_default_store(self.name, self.store)

    def _check_metric_choices(self) -> None:
        """Refuse ``metrics=`` names that this experiment cannot record (a metric needing the evaluation with
        ``evaluate=False``, one against the control in a grid without controls), and metric steps that no learner
        reaches: ``at`` past the run, or an ``every`` that matches no logged step but step 0."""
        for name, choice in self.metric_choices.items():
            spec = metric_registry.METRICS[name]
            if choice is False:
                continue
            if spec.evaluates and not self.evaluate:
                raise ValueError(f"metrics= asks for {name!r}, which is computed on the train or test set, but "
                                 "evaluate=False turns the evaluation off; drop one of the two.")
            if spec.against_control and not self.grid.has_controls:
                raise ValueError(f"metrics= asks for {name!r}, which compares each learner with its control, but no "
                                 "variation of this grid is a control; mark one with control=True (see Controls).")
        given = {n: w for n, w in self.metric_choices.items() if isinstance(w, metric_registry.When)}
        given.update(self.logger.metric_schedules())
        for setup in {id(s.setup): s.setup for s in self.grid.learners}.values():
            schedule = self.schedule_of(setup)
            group = describe_group(next(s for s in self.grid.learners if s.setup is setup))
            for name, when in given.items():
                late = [t for t in when.at or () if t > schedule.total_steps]
                if late:
                    raise ValueError(f"Metric {name!r} asks for step {late[0]} (at={list(when.at)}), past the last step "
                                     f"({schedule.total_steps}) of learners with {group}; give steps from 0 to "
                                     f"{schedule.total_steps}, or train longer (steps=, epochs=).")
                if when.every is not None and not when.always and not any(
                        t % when.every == 0 for t in schedule.log_steps if t > 0):
                    shown = ", ".join(map(str, schedule.log_steps[:6])) + (", ..." if len(schedule.log_steps) > 6 else "")
                    raise ValueError(f"Metric {name!r} every={when.every} is recorded at the logged steps that are "
                                     f"multiples of {when.every}, and for learners with {group} none is but step 0 "
                                     f"(logged steps: {shown}); log those steps (log_every={when.every}) or give "
                                     "the steps with at=[...].")

    def _check_log_at(self) -> None:
        for setup in {id(s.setup): s.setup for s in self.grid.learners}.values():
            total = self.schedule_of(setup).total_steps
            late = [step for step in self.log_at if step > total]
            if late:
                raise ValueError(f"log_at asks for step {late[0]}, past the last step ({total}) of learners with "
                                 f"{describe_group(next(s for s in self.grid.learners if s.setup is setup))}; "
                                 f"give steps from 0 to {total}.")

    def _check_steps_in_run(self) -> None:
        """Refuse kept states and intervention steps or windows that no learner reaches: they would silently
        change nothing (a perturbation after the last step leaves its learners equal to the control)."""
        for spec in self.grid.learners:
            total = self.schedule_of(spec.setup).total_steps
            late = [step for step in self.keep_states if step > total]
            if late:
                raise ValueError(f"keep_states asks for step {late[0]}, past the last step ({total}) of learners with "
                                 f"{describe_group(spec)}: no state would be kept there. Give steps from 0 to {total}, "
                                 "or train longer (steps=, epochs=).")
            for v in spec.interventions:
                problem = v.beyond_run(total)
                if problem:
                    raise ValueError(f"{type(v).__name__} {problem}, but learners with {describe_group(spec)} train "
                                     f"{total} steps, so it would never act and its learners would equal those without "
                                     f"it. Give steps within the run, or train longer (steps=, epochs=).")

    def _check_metrics(self) -> frozenset[str]:
        """Run the logger's metrics on a fresh learner of each setup (its data, its first batch), so that a broken
        one fails now, before anything is trained; returns the names of those that read ``learner.control``."""
        reads_control: set[str] = set()
        taken = [*self.grid.dims, *self.grid.scalars, "control", "control_learner"]
        for setup in {id(s.setup.template): s.setup for s in self.grid.learners}.values():
            probe = pytrees.stack([initial_model_state(setup.template, init_key=0, dropout_key=0)])
            d = setup.data
            test = None if d.x_test is None else Data(d.x_test, d.y_test)
            batch = Data(d.x[: setup.batch_size], d.y[: setup.batch_size])
            infos = self.logger.check(setup.template, probe.params, probe.buffers, Data(d.x, d.y), test, batch,
                                      taken=taken)
            reads_control.update(name for name, info in infos.items() if info.reads_control)
        return frozenset(reads_control)

    # -- what each learner needs --------------------------------------------------------------------------

    @property
    def template(self) -> nn.Module:
        """The experiment's own model template, prepared (lazy layers materialized, dropout keyed)."""
        return self.base.template

    @property
    def schedule(self) -> Schedule:
        """The schedule of learners with the experiment's own data and batch size."""
        return self.schedule_of(self.base)

    def schedule_of(self, setup: Setup) -> Schedule:
        """The schedule of learners with this setup's data and batch size: metrics are recorded at step 0, each epoch's
        end, the last step, every ``log_every``, at ``log_at`` and wherever a full state is kept (``keep_states``,
        ``keep_every``)."""
        spe = steps_per_epoch(len(setup.data.x), setup.batch_size)
        total = self.steps if self.steps is not None else spe * (self.epochs if self.epochs is not None else 1)
        every = range(self.keep_every, total + 1, self.keep_every) if self.keep_every else ()
        metric_at = (t for when in self.metric_schedules().values() for t in (when.at or ()))
        log_at = tuple(sorted({*self.log_at, *(k for k in (*self.keep_states, *every, *metric_at) if k <= total)}))
        return Schedule(total_steps=total, steps_per_epoch=spe, log_every=self.log_every, log_at=log_at)

    def metric_names(self) -> list[str]:
        """The recorded metrics, in the result's order: built-in ones, then the logger's."""
        return [m.name for m in self.builtin_metrics()] + self.logger.metric_names()

    def builtin_metrics(self) -> list[metric_registry.MetricSpec]:
        """The built-in metrics recorded (``metrics.recorded``: what ``evaluate``, the controls and ``metrics=``
        choose), each with the steps it is recorded at."""
        return metric_registry.recorded(self.evaluate, self.grid.has_controls, self.metric_choices)

    def metric_schedules(self) -> dict[str, metric_registry.When]:
        """When each recorded metric that is not recorded at every logged step is: built-in ones, then the logger's."""
        out = {m.name: m.when for m in self.builtin_metrics() if not m.when.always}
        return {**out, **self.logger.metric_schedules()}

    def metric_keys(self, spec: LearnerSpec) -> dict[str, str]:
        """Each metric recorded for ``spec`` and a digest of what decides its values beside the learner itself
        (each ``MetricSpec``'s ``depends_on``: code, loss, evaluation data, and for metrics against the control,
        the control's id)."""
        ingredients = {"loss": self._loss_key, "train": spec.setup.data.fingerprint,
                       "test": spec.setup.data.test_fingerprint, "control": self._control_beside(spec)}
        keys = {m.name: digest(m.key_parts(ingredients)) for m in self.builtin_metrics()}
        for name, user in metric_specs(self.logger, self.reads_control).items():
            keys[name] = digest(user.key_parts({**ingredients, "code": self._code_keys[name]}))
        if self.speed.precision != "float32":  # results of another precision are not float32 results
            keys = {k: digest([v, self.speed.precision]) for k, v in keys.items()}
        return keys

    def _control_beside(self, spec: LearnerSpec) -> str | None:
        """The id of the control that trains beside ``spec`` (None: it has none, or one of another structure)."""
        control = self._by_id.get(spec.control_id) if spec.control_id else None
        return control.id if control is not None and control.structure == spec.structure else None


    def keep_steps(self, schedule: Schedule) -> tuple[int, ...]:
        """The steps at which full states are kept (``keep_states``, ``keep_every``), up to the last."""
        every = range(self.keep_every, schedule.total_steps + 1, self.keep_every) if self.keep_every else ()
        return tuple(sorted({k for k in (*self.keep_states, *every) if k <= schedule.total_steps}))

    def need(self, spec: LearnerSpec, until: int | None = None, states: Sequence[int] = ()) -> Need:
        """What this experiment needs of a learner: metrics at its logged steps, kept states (and ``states``); of
        a prefix (``until`` its last fork step), the same up to there and its states at its fork steps."""
        schedule = self.schedule_of(spec.setup)
        if until is None and spec.prefix and spec.id in self._prefix_needs:
            until, states = self._prefix_needs[spec.id]
        total = schedule.total_steps if until is None else until
        keep = {k for k in self.keep_steps(schedule) if k <= total} | set(states)
        return Need(tuple(t for t in schedule.log_steps if t <= total), self.metric_keys(spec), tuple(sorted(keep)),
                    total)

    def _start(self, spec: LearnerSpec) -> Start | None:
        return start_of(self.store, spec.id, self.need(spec))

    def fork_tree(self) -> tuple[ForkTree, list[LearnerSpec], set[str]]:
        """Who forks from whom (``forks.fork_tree``; nothing with ``fork=False``), the learners left to train
        (grid learners the store does not serve, then the prefixes they fork from) and the ids of those served."""
        learners = self.grid.learners
        served = {s.id for s in learners if self._start(s) is None}
        to_train = [s for s in learners if s.id not in served]
        tree = ForkTree(grid_ids=frozenset(s.id for s in learners))
        if self.fork:
            tree = fork_tree(learners, {s.id for s in to_train}, lambda s: self.schedule_of(s.setup).total_steps,
                             in_store=lambda i: bool(self.store.holders(i)),
                             compatible=lambda a, b: self.metric_keys(a) == self.metric_keys(b))
            for spec in learners:  # a stored parent without its states at the fork steps trains up to there again
                forks = set(tree.fork_steps(spec.id))
                kept = {int(t) for source, _ in self.store.holders(spec.id, checkpoints=True) for t in source.state_steps}
                if spec.id in served and forks and not forks <= kept:
                    tree.refreshed.add(spec.id)
        self._prefix_needs = {i: (max(tree.fork_steps(i)), tree.fork_steps(i)) for i in tree.prefixes}
        refreshed = [s for s in learners if s.id in tree.refreshed]
        return tree, to_train + refreshed + list(tree.prefixes.values()), served

    @property
    def data_bytes(self) -> int:
        """Bytes of the train and test tensors, which go to the device whole."""
        sources = {id(s.setup.data): s.setup.data for s in self.grid.learners}
        return sum(d.nbytes for d in sources.values())

    # -- planning, training, results ----------------------------------------------------------------------

    def _identity_inputs(self) -> dict[str, Any]:
        """What ids and metric keys are made of that may change after the build (a global the loss reads, a
        tensor a closure holds, edited in place), described now: the loss, each template with its behaviour
        probe, the code of the intervention classes and of the metrics."""
        setups = {id(s.setup.template_info): s.setup for s in self.grid.learners}
        loss = describe_callable(self.loss)
        classes = {class_name(c): c for c in {type(v) for s in self.grid.learners for v in s.interventions}
                   if not c.builtin}
        return {
            "the loss": digest(loss),
            "the model or what its loss computes": sorted(s.template_digest(loss) for s in setups.values()),
            **{f"the code of {name}": digest(describe_class(c)) for name, c in classes.items()},
            **{f"the code of metric {n!r}": digest(describe_callable(fn)) for n, fn in self.logger.metrics().items()},
        }

    def _refresh_ids(self) -> None:
        """Take the ids again, from the code and values as they are now: when something they are made of changed
        since the build, the grid is built again with the new ids (and a warning says what changed), so that
        numbers are never stored under the id of what was there before."""
        now = self._identity_inputs()
        changed = [what for what, value in now.items() if value != self._built_from.get(what)]
        if not changed:
            return
        before = {s.id for s in self.grid.learners}
        self.context.forget_descriptions()
        self.grid = build_grid(self.interventions, self.base, self.seed)
        self._by_id = {s.id: s for s in self.grid.learners}
        self._loss_key = digest(self.context.loss_description())
        self._code_keys = {n: digest(describe_callable(fn)) for n, fn in self.logger.metrics().items()}
        self._built_from = now
        renamed = sum(s.id not in before for s in self.grid.learners)
        warnings.warn(
            f"{', '.join(changed)} changed since this Experiment was built (a global or a tensor that the code reads, "
            f"edited in between): {renamed} of {len(self.grid.learners)} learners now have new ids, and run() trains "
            "and stores them under those (the learners stored under the old ids stay in the store, unused). Build the "
            "Experiment after setting what its code reads.", stacklevel=3)

    def plan(self, learners: list[LearnerSpec] | None = None) -> Plan:
        """What ``run()`` would do: learners in the store vs. to train (from scratch, continuing from stored
        states, or forking from a shared prefix), groups, chunks, memory, ``learner_steps``. Changes nothing. Ids
        are taken again first: see ``run()``."""
        self._refresh_ids()
        return self._plan(learners)

    def _plan(self, learners: list[LearnerSpec] | None = None) -> Plan:
        tree, nodes, served = self.fork_tree()
        only = None if learners is None else {s.id for s in learners}
        parts = segments(tree, nodes, lambda s: self.schedule_of(s.setup).total_steps,
                         lambda s, until, states: self.need(s, until, states),
                         lambda s, need, lineage: start_of(self.store, s.id, need, lineage), only)
        grid_ids = [s.id for s in self.grid.learners if only is None or s.id in only]
        reaches = {(p.spec.id, p.stop) for p in parts}

        def again_start(control: LearnerSpec, step: int) -> Start | None:
            """A control's state at ``step``: stored, or written by one of this run's earlier chunks."""
            found = state_at(self.store, [control.id], step)
            if found is None and (control.id, step) in reaches:
                found = Start(step, first_unstored=step, pending=True)
            return found

        plan = make_plan(self.grid, parts, self.eval_batch_size, self.device, self.max_learners_per_chunk,
                         data_bytes=self.data_bytes, learners=len(grid_ids),
                         in_store=sum(1 for i in grid_ids if i in served), again_start=again_start,
                         refreshed=frozenset(tree.refreshed))
        plan.forks = describe_forks(tree, parts, {i: s.coords for i, s in self._by_id.items()})
        plan.total_steps, plan.store = self.schedule.total_steps, str(self.store.path)
        plan.speed = self.speed.describe(self.context.dtype)
        if self.speed.compile == "auto":
            plan.compile_outlook = lambda: self._compile_outlook(plan)
        return plan

    def _compile_outlook(self, plan: Plan) -> list[str]:
        """``compile="auto"`` in ``plan()``: the policy with the expected cost of a first (cold) compile here, then
        per group of the plan (its largest chunk) what is expected (``training.compile_outlook``)."""
        largest: dict[tuple, Chunk] = {}
        for chunk in plan.chunks:
            if chunk.structure not in largest or len(chunk.learners) > len(largest[chunk.structure].learners):
                largest[chunk.structure] = chunk
        lines, warm = [], 0
        for chunk in largest.values():
            total = self.schedule_of(chunk.learners[0].setup).total_steps
            words, is_warm = compile_outlook(chunk.learners, self.loss, self.device, self.speed,
                                             (chunk.stop if chunk.stop is not None else total) - chunk.start)
            warm += is_warm
            lines.append(f"  {chunk.description}, {len(chunk.learners)} learners: {words}")
        return [f"compile: {describe_policy(self.device, warm, len(largest))}", *lines]

    def run(self, plot: bool = False, executor: Any = None, shards: int | None = None) -> xr.Dataset:
        """Train the learners missing from the store, then return the whole grid's results.
        With ``plot=True``, also save the plots (``Plotter.save_all``) as PNGs in ``plots_folder`` next
        to the store; in Jupyter, show the few that ``Plotter.headline`` names (the main metric's curves and the
        growth of the distance to the control; at most 4 files) and name the others. With a submitit ``executor``
        (``submitit.AutoExecutor(folder)``: Slurm on a cluster, local processes elsewhere), train them as
        ``shards`` jobs (default 1) and wait for them (see ``serimats_func.cluster``)."""
        if executor is not None:
            from .cluster import run_sharded

            self.record()
            ds = run_sharded(self, executor, 1 if shards is None else shards)
        else:
            if shards is not None:
                raise ValueError("shards= needs an executor=, e.g. submitit.AutoExecutor('runs/jobs').")
            plan = self.plan()  # ids taken again, from the code and values as they are now
            self.record()
            if plan.chunks:
                self.speed_report = []
                self._runner().train(plan)
                self._built_from = self._identity_inputs()  # training may move a model's Python counters
            else:
                self.store.clean()
            ds = self.results()
        if plot:
            plotter = Plotter(ds)
            plots = plotter.save_each(self.plots_folder)
            shown = [path for name in plotter.headline() for path in plots.get(name, [])][:MAX_INLINE_PLOTS]
            show_inline(shown, [path for paths in plots.values() for path in paths], self.plots_folder)
        return ds

    def learners_to_train(self) -> list[LearnerSpec]:
        """The grid's learners that ``run()`` would train (and write)."""
        out: dict[str, LearnerSpec] = {}
        for chunk in self.plan().chunks:
            out.update((s.id, s) for s in chunk.to_write if not s.prefix)
        return list(out.values())

    def train_only(self, ids: Sequence[str]) -> int:
        """Train those of the learners ``ids`` that are still missing (a shard's work), and the prefixes they fork
        from (unless another process trains them: then it waits for them); returns how many."""
        wanted = set(ids)
        self._refresh_ids()
        learners = [s for s in self.grid.learners if s.id in wanted]
        learners += [s for s in self.fork_tree()[0].ancestors(wanted) if s.id not in wanted]
        plan = self._plan(learners)
        if plan.chunks:
            self.speed_report = []
            self._runner().train(plan, learners)
            self._built_from = self._identity_inputs()  # training may move a model's Python counters
        return plan.to_train

    def record(self) -> None:
        """Record in the store which learners this experiment's name names, and where they lie in its grid (a small
        record, written once per name and grid; ``run()`` does it): ``serimats-func ls/plot/tensorboard --experiment``
        and ``open_store(path, experiment=...)`` read it."""
        self.store.record_experiment(experiment_record(self.name, self.grid))

    def folder(self, kind: str) -> Path:
        """A folder of this experiment's outputs beside its store: ``runs/<name>_<kind>`` beside the default store
        (one per experiment), ``<store name>_<kind>`` beside a store given with ``store=``."""
        if self.store_given:
            return self.store.path.with_name(f"{self.store.path.stem}_{kind}")
        return self.store.path.parent / f"{self.name}_{kind}"

    @property
    def plots_folder(self) -> Path:
        """Where ``run(plot=True)`` writes its PNGs: ``runs/<name>_plots`` beside the default store, ``<store
        name>_plots`` beside a store given with ``store=``."""
        return self.folder("plots")

    def _runner(self) -> Runner:
        """The run loop, given this experiment's parts and settings as they are now (a shard may have changed
        ``device`` and ``progress``); the chunks it trains report their speed choices into ``speed_report``."""
        settings = RunSettings(
            name=self.name, loss=self.loss, device=self.device, eval_batch_size=self.eval_batch_size,
            evaluate=self.evaluate, controls=self.grid.has_controls, reads_control=self.reads_control,
            metrics=self.logger.metrics(), metric_dims=self.logger.metric_dims(),
            metric_when=self.logger.metric_schedules(), builtins=tuple(self.builtin_metrics()),
            checkpoint_every=self.checkpoint_every, speed=self.speed, progress=self.progress,
            poll_seconds=self.poll_seconds)
        learners = Learners(schedule_of=self.schedule_of, metric_keys=self.metric_keys, keep_steps=self.keep_steps,
                            start=self._start)
        return Runner(self.store, settings, learners, self._plan, Callbacks(self.callbacks), self.speed_report)

    def results(self) -> xr.Dataset:
        """The grid's results as stored (NaN for learners not trained yet)."""
        steps = {step for s in self.grid.learners for step in self.schedule_of(s.setup).log_steps}
        attrs = {"experiment": self.name, "store": str(self.store.path), "seed": self.seed,
                 "steps": self.schedule.total_steps, "batch_size": self.batch_size}
        return read_results(self.store, self.grid, self.need, self.metric_names(), sorted(steps), attrs)

    def load_learner(self, step: int | None = None, *, with_scheduler: bool = False, **coords) -> tuple:
        """A learner of this grid, chosen by its coordinates (``epsilon=0.01, seed=3``), as a plain ``nn.Module``
        with its weights and buffers at ``step`` (default: the latest kept) and a ``torch.optim`` optimizer with
        its state (and, with ``with_scheduler=True``, its torch scheduler): see ``serimats_func.load_learner``."""
        specs = {s.id: s for s in self.grid.learners}
        learner_id, _ = select_learner({i: s.config for i, s in specs.items()}, coords, f"the experiment {self.name!r}")
        return load_learner(self.store, specs[learner_id].setup.model, step, with_scheduler=with_scheduler,
                            learner=learner_id)


def _log_at(steps: Sequence[int]) -> tuple[int, ...]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, (Sequence, range)):
        raise ValueError(f"log_at takes a list of steps, e.g. log_at=[1, 10, 100]; got {steps!r}.")
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"log_at takes steps (numbers of updates done, integers >= 0); got {step!r}.")
    return tuple(sorted({int(step) for step in steps}))


def _warn_controls_apart(grid: Grid) -> None:
    """Warn when learners cannot train beside their control (another model, batch size or optimizer class)."""
    by_id = {s.id: s for s in grid.learners}
    apart = [(s, by_id[s.control_id]) for s in grid.learners
             if s.control_id in by_id and by_id[s.control_id].structure != s.structure]
    if apart:
        learner, control = apart[0]
        warnings.warn(
            f"{len(apart)} learner(s) cannot train beside their control, which needs another training step "
            f"(e.g. the learner at {learner.coords} trains as {describe_group(learner)}, its control as "
            f"{describe_group(control)}): their control_* metrics are NaN. Metrics against a control need the learner "
            "and its control in one vmapped step: the same model, batch size and optimizer class.", stacklevel=3)

def _check_loss(loss: Callable, template: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    template.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            value = loss(template(x), y)
    except Exception as error:
        raise ValueError(f"loss(logits, y) failed on a batch: {type(error).__name__}: {error}") from error
    finally:
        template.train()
    if not isinstance(value, torch.Tensor) or value.ndim != 0 or not value.dtype.is_floating_point:
        raise ValueError(f"loss(logits, y) must return a scalar float tensor (the batch mean); got {value!r:.80}.")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r} (a {type(value).__name__}, which would be "
                         f"taken as {bool(value)}).")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device= takes a torch device such as 'cpu' or 'cuda'; got {device!r}: {error}") from error
    if device.type == "meta":
        raise ValueError("device='meta' holds shapes without values, so nothing could be trained or recorded there; "
                         "use device='cpu' or 'cuda', or leave it out.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device here; use device='cpu' or leave it out.")
    return device


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


def _checked_name(name: object) -> str:
    """An experiment name: a plain name (it names a record in the store and a folder beside it), never a path."""
    if not isinstance(name, str):
        raise ValueError(f"name= takes a string, such as name='momentum-sweep'; got {name!r}.")
    if not name or name.startswith(".") or any(c in name for c in "/\\") or not name.isprintable() or len(name) > 200:
        plain = re.sub(r"[^\w.+=,-]+", "_", name).strip("._")[:200] or "experiment"
        raise ValueError(f"name={name!r} cannot name an experiment: a name selects its learners in the store and names "
                         f"its plots folder beside the store (runs/<name>_plots), so it must be a plain name, not a path: "
                         f"no '/' or '\\', not starting with '.', printable, at most 200 characters. Use e.g. "
                         f"name={plain!r}; to choose where the store is, pass store='path/to/store.zarr'.")
    return name


def _note_old_default_store(name: str, store: Store) -> None:
    """Warn, until this experiment has run on the default store, that the store an earlier version made for it
    (``runs/<name>.zarr``) is not read: its learners would be trained again."""
    old = store.path.parent / f"{name}.zarr"
    if (old / "zarr.json").is_file() and old != store.path and (
            not store.path.exists() or name not in store.experiments()):
        warnings.warn(f"{old} is the store that earlier versions made for this experiment by default; the default store "
                      f"is now {store.path}, one store for every experiment. To reuse the learners stored in {old}, pass "
                      f"store={str(old)!r}; else they are trained again into {store.path}.", stacklevel=3)


def _default_name(interventions: list) -> str:
    classes = []
    for item in interventions:
        cls = getattr(item, "cls", type(item))
        if cls.__name__ not in classes:
            classes.append(cls.__name__)
    words = [re.sub(r"(?<!^)(?=[A-Z])", "-", c).lower() for c in classes]
    return "_".join(words) or "experiment"


@dataclass(frozen=True)
class ScriptSource:
    """An experiment defined by a Python script: a shard's job runs the script (not as ``__main__``, so an
    ``if __name__ == "__main__": exp.run()`` block does not run) and takes the Experiment it defines."""

    path: str
    name: str | None = None

    def load(self) -> Experiment:
        return find_experiment(runpy.run_path(self.path, run_name="__serimats_func_job__"), self.path, self.name)


def find_experiment(namespace: dict[str, Any], where: str, name: str | None = None) -> Experiment:
    """The Experiment a script defines (the one named ``name`` when it defines several)."""
    found = {k: v for k, v in namespace.items() if isinstance(v, Experiment)}
    if name is not None:
        if name not in found:
            raise ValueError(f"{where} defines no Experiment named {name!r}; it defines: {', '.join(found) or 'none'}.")
        return found[name]
    if len(found) != 1:
        raise ValueError(f"{where} must define exactly one Experiment at module level (found "
                         f"{', '.join(found) or 'none'}); name one with --experiment.")
    return next(iter(found.values()))
