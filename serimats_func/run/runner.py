"""The run loop: claim learners in the store, plan them again, train their chunks, write the results; and
read the results back. ``Experiment`` checks its arguments and connects the parts; this module does the work,
given what it needs explicitly (the store, a plan function, each learner's schedule and metric keys, the
settings of ``RunSettings``), and never sees the ``Experiment`` itself.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from ..acceleration.prepare import ChunkSpeed, Speed
from ..callbacks import Callbacks, ChunkInfo
from ..core.data import TrainingData
from ..core.metrics import BUILTIN_DIMS, MetricFn, MetricSpec, When, builtin_labels
from ..core.step import LossFn
from ..jupyter import progress_bar
from ..store.locks import Claims
from ..store.zarr_store import DamagedSourceError, FlatState, Store
from .checkpoints import Checkpoints
from .grid import Grid, LearnerSpec
from .planning import Chunk, Plan
from .results import assemble
from .resume import Need, Start, start_of
from .setup import Setup
from .training import ChunkStart, Schedule, train_chunk


@dataclass(frozen=True)
class RunSettings:
    """How an experiment's learners are trained and recorded, beyond what each learner is: read once, when a run
    starts (so that a shard may change ``device`` and ``progress`` before it trains)."""

    name: str
    loss: LossFn
    device: torch.device
    eval_batch_size: int
    evaluate: bool = True
    controls: bool = False  # record metrics against each learner's control
    reads_control: Collection[str] = frozenset()  # custom metrics that read learner.control
    metrics: Mapping[str, MetricFn] = field(default_factory=dict)  # custom metrics, by name
    metric_dims: Mapping[str, Sequence[str]] = field(default_factory=dict)  # their own dimensions
    metric_when: Mapping[str, When] = field(default_factory=dict)  # when custom metrics are recorded (default: always)
    builtins: tuple[MetricSpec, ...] | None = None  # the built-in metrics recorded (default metrics.recorded(...))
    checkpoint_every: int | None = None
    speed: Speed = field(default_factory=Speed)
    progress: bool = True
    poll_seconds: float = 0.5  # how often to look for learners that another process trains


@dataclass(frozen=True)
class Learners:
    """What each learner needs, as functions of its spec (or setup): its schedule, its metrics' keys, the steps
    whose full states are kept, and where it starts (None: the store serves it)."""

    schedule_of: Callable[[Setup], Schedule]
    metric_keys: Callable[[LearnerSpec], dict[str, str]]
    keep_steps: Callable[[Schedule], tuple[int, ...]]
    start: Callable[[LearnerSpec], Start | None]


class Runner:
    """Trains plans of learners into ``store``. ``plan(learners)`` plans them (None: the whole grid) against the
    store as it is now; ``report`` receives what each chunk's speed choices cost; ``callbacks`` watch it."""

    def __init__(self, store: Store, settings: RunSettings, learners: Learners,
                 plan: Callable[[list[LearnerSpec] | None], Plan], callbacks: Callbacks | Sequence = (),
                 report: list[ChunkSpeed] | None = None):
        self.store, self.settings, self.learners, self.plan = store, settings, learners, plan
        self.callbacks = callbacks if isinstance(callbacks, Callbacks) else Callbacks(callbacks)
        self.report = report if report is not None else []
        self._chunks = 0

    def train(self, plan: Plan, learners: list[LearnerSpec] | None = None) -> None:
        """Train the plan's chunks (a plan of ``learners``, default the whole grid). Each learner is claimed
        first (a lock in the store that dies with this process): learners another live process trains are skipped,
        then waited for, and trained here if that process dies first. A learner is never trained by two processes
        at once, nor stored twice."""
        s = self.settings
        self.store.create()
        total = plan.learner_steps
        data_cache: dict[tuple[int, int], TrainingData] = {}
        with self.store.claims() as claims, progress_bar(total=total, desc=s.name, unit=" learner-steps",
                                                         disable=not s.progress) as bar:
            self.store.clean(claims)
            while plan.chunks:
                trained = False
                for i, chunk in enumerate(plan.chunks):
                    with self.store.writing("claims on learners", claims.folder):
                        mine = set(claims.claim(spec.id for spec in chunk.learners))
                    if not mine:
                        continue
                    try:  # the store may have changed before the claims: plan these learners again
                        again = self.plan([spec for spec in chunk.learners if spec.id in mine])
                        for part in again.chunks:
                            if part.pending:  # it starts from a state not written yet (a later segment, a prefix)
                                continue
                            bar.set_postfix_str(f"chunk {i + 1}/{len(plan.chunks)}: {len(part.learners)} learners")
                            self.train_chunk(part, claims, bar, data_cache, again.evaluation_learners.get(part.structure))
                            trained = True
                    except DamagedSourceError:  # set aside (with a warning): plan again without it
                        _release_quietly(claims, mine)
                        trained = True
                        break
                    except BaseException:
                        _release_quietly(claims, mine)  # the error that stopped the run is the one to see
                        raise
                    with self.store.writing("the release of claims on learners", claims.folder):
                        claims.release(mine)
                plan = self.plan(learners)  # what is left: learners that other processes train
                if plan.chunks and not trained:
                    bar.set_postfix_str(f"waiting for {plan.to_train} learners that another process trains")
                    time.sleep(s.poll_seconds)

    def train_chunk(self, chunk: Chunk, claims: Claims, bar: tqdm, data_cache: dict,
                    evaluation_learners: int | None = None) -> None:
        """Train one chunk of claimed learners and write its results (a Ctrl-C saves it as a checkpoint)."""
        s = self.settings
        specs = chunk.learners
        setup = specs[0].setup
        schedule = self.learners.schedule_of(setup)
        data = data_cache.get((id(setup.data), setup.batch_size)) or self.training_data(setup)
        data_cache[(id(setup.data), setup.batch_size)] = data
        ids, configs = [spec.id for spec in specs], [spec.config for spec in specs]
        keys = [self.learners.metric_keys(spec) for spec in specs]
        environment = _environment(s.device)
        dims = {**BUILTIN_DIMS, **s.metric_dims}
        labels = {**builtin_labels(), "layer": list(setup.param_names)}
        checkpoints = Checkpoints(self.store, ids, configs, keys, environment, s.checkpoint_every, dims=dims,
                                  labels=labels)
        last = schedule.total_steps if chunk.stop is None else chunk.stop
        written = [r for r, spec in enumerate(specs) if spec.id not in chunk.again]  # controls trained again: stored
        info = ChunkInfo(self._chunks, tuple(ids), chunk.start, last)
        self._chunks += 1
        try:
            self.callbacks.on_chunk_start(info)
            result = train_chunk(specs, data, schedule, s.loss, s.device, on_step=self._on_step(info, bar),
                                 metrics=s.metrics, checkpoints=checkpoints, evaluate=s.evaluate,
                                 start=self.chunk_start(chunk, schedule, keys, self.learners.keep_steps(schedule)),
                                 keep=self.learners.keep_steps(schedule),
                                 controls=s.controls, reads_control=s.reads_control, speed=s.speed, report=self.report,
                                 evaluation_learners=evaluation_learners, stop=last, builtins=s.builtins,
                                 when=s.metric_when)
            self.callbacks.on_chunk_end(info, result)
            checkpoints.follow(chunk.start, None, lambda: (result.steps, result.metrics), result.states)
            checkpoints.track(last, result.states[last])
            states = {step: {path: (values[written], dtype) for path, (values, dtype) in state.items()}
                      for step, state in result.states.items()}
            self.store.write([ids[r] for r in written], [configs[r] for r in written], result.steps,
                             {m: v[written] for m, v in result.metrics.items()},
                             per_learner={"diverged_at": result.diverged_at[written]},
                             metric_keys=[keys[r] for r in written], attrs=environment, states=states, dims=dims,
                             labels=labels)
        except KeyboardInterrupt:
            raise checkpoints.interrupted(last) from None
        self.store.prune_checkpoints(claims)
        unserved = [specs[r].id for r in written if last == schedule.total_steps and not specs[r].prefix
                    and self.learners.start(specs[r]) is not None]  # a prefix or a segment: served when all are
        if unserved:
            raise RuntimeError(f"Learners {unserved[:3]} were trained but the store does not serve them: a bug, please "
                               "report it with the experiment's settings.")

    def _on_step(self, info: ChunkInfo, bar: tqdm) -> Callable[[int, object, object], None]:
        """What ``training.train_chunk`` calls at the chunk's start and after each update: the progress bar (in
        learner-steps), then the callbacks (with the loss of the chunk's own learners)."""
        n, done = len(info.ids), [info.start]
        callbacks = self.callbacks if self.callbacks.watch_steps else None

        def on_step(step: int, state: object, loss: object) -> None:
            bar.update((step - done[0]) * n)
            done[0] = step
            if callbacks is not None:
                callbacks.on_step(info, step, state, None if loss is None else loss[:n])

        return on_step

    def chunk_start(self, chunk: Chunk, schedule: Schedule, keys: list[dict[str, str]],
                    keep: Sequence[int] = ()) -> ChunkStart:
        """The chunk's stored states and what of earlier steps its batch carries: the metric values at logged steps
        before its start that no batch holds for some of its learners (they are in checkpoints, or they are those
        of the prefix a learner forks from), and the states kept at ``keep`` steps before it that no batch holds
        (they are in checkpoints)."""
        first = min(s.first_unstored for s in chunk.starts)
        prefix = tuple(t for t in schedule.log_steps if first <= t < chunk.start)
        records = {}
        if prefix:
            names = list(dict.fromkeys(m for k in keys for m in k))
            held = self.store.read([(start.metrics_from or s.id, prefix, k)
                                    for s, start, k in zip(chunk.learners, chunk.starts, keys, strict=True)], names,
                                   checkpoints=True)
            records = {m: held[m].values for m in names}  # (N, len(prefix), *own dims)
        states = None
        if chunk.start > 0:
            states = self.store.read_states([(s.source, s.position, s.step) for s in chunk.starts])
        return ChunkStart(chunk.start, states, prefix, records, self.carried_states(chunk, keep))

    def carried_states(self, chunk: Chunk, keep: Sequence[int]) -> dict[int, FlatState]:
        """The states kept at ``keep`` steps before the chunk's start that no batch holds for some of its learners,
        read from where the store holds them (a checkpoint): {step: flat state (N, ...)}."""
        out: dict[int, FlatState] = {}
        for step in (k for k in keep if k < chunk.start):
            holders = [self.store.holders(spec.id) for spec in chunk.learners]
            if all(any(src.kind == "batch" and step in src.state_steps for src, _ in held) for held in holders):
                continue
            flats = self.store.read_states([next((src, p, step) for src, p in held if step in src.state_steps)
                                            for held in holders])
            out[step] = {path: (np.stack([f[path][0] for f in flats]), dtype) for path, (_, dtype) in flats[0].items()}
        return out

    def training_data(self, setup: Setup) -> TrainingData:
        """The setup's train and test tensors on the device."""
        d, device = setup.data, self.settings.device
        return TrainingData(
            x=d.x.to(device), y=d.y.to(device),
            x_test=None if d.x_test is None else d.x_test.to(device),
            y_test=None if d.y_test is None else d.y_test.to(device),
            batch_size=setup.batch_size, eval_batch_size=self.settings.eval_batch_size,
        )


def read_results(store: Store, grid: Grid, need: Callable[[LearnerSpec], Need], metric_names: Sequence[str],
                 steps: Sequence[int], attrs: Mapping) -> xr.Dataset:
    """The grid's results as stored at ``steps`` (NaN for learners the store does not serve all that
    ``need(spec)`` asks of yet)."""
    return store.retrying(lambda: _read_results(store, grid, need, metric_names, steps, attrs))


def _read_results(store: Store, grid: Grid, need: Callable[[LearnerSpec], Need], metric_names: Sequence[str],
                  steps: Sequence[int], attrs: Mapping) -> xr.Dataset:
    requests, present = [], set()
    for spec in grid.learners:
        wanted = need(spec)
        if start_of(store, spec.id, wanted) is None:
            present.add(spec.id)
            requests.append((spec.id, wanted.steps, wanted.metric_keys))
    stored = store.read(requests, list(metric_names))
    shown = grid
    if len(present) < len(grid.learners):
        shown = Grid(grid.dims, grid.scalars, [(c, s) for c, s in grid.cells if s.id in present])
    return assemble(shown, stored, sorted(steps), dict(attrs), order=list(metric_names), controls=grid.has_controls)


def _release_quietly(claims: Claims, ids) -> None:
    """Let go of claims while another error ends the run: a failure here (a lost permission) must not hide it;
    a claim's lock dies with the process anyway."""
    try:
        claims.release(ids)
    except Exception:
        pass


def _environment(device: torch.device) -> dict:
    """Where a batch was trained: recorded with it (ids do not depend on it)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "python": platform.python_version()}
