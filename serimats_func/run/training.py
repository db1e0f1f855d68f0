"""The training loop of one chunk: initial states, the chunk's step built from its learners'
interventions, batches fed by index, and metrics at the logged steps. Nothing in the loop depends on a
learner's values, and nothing is copied to the host until the chunk ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.func import vmap

from ..acceleration import compile_record, convolutions, plan_cache
from ..acceleration import prepare as acceleration
from ..acceleration.prepare import ChunkSpeed, Speed
from ..core import pytrees
from ..core.data import DataStream, TrainingData, batch_indices, stream_orders
from ..core.evaluation import make_logits
from ..core.hook_points import POINTS, implemented
from ..core.learners import initial_model_states
from ..core.metrics import MetricFn, MetricSpec, When
from ..core.metrics import recorded as recorded_metrics
from ..core.purity import check_pure
from ..core.state import ChunkState, InterventionData
from ..core.step import Hook, Hooks, LossFn, initial_hooks, make_train_step
from ..interventions.base import Intervention, Numbers
from ..store.zarr_store import FlatState
from .checkpoints import Checkpoints, flatten, restore
from .grid import LearnerSpec, class_name
from .recording import Recorder, nan_from_divergence


@dataclass(frozen=True)
class Schedule:
    """How long to train and when to record metrics.

    >>> Schedule(total_steps=10, steps_per_epoch=4, log_every=None).log_steps
    (0, 4, 8, 10)
    >>> Schedule(total_steps=10, steps_per_epoch=4, log_every=5, log_at=(1, 2)).log_steps
    (0, 1, 2, 4, 5, 8, 10)
    """

    total_steps: int
    steps_per_epoch: int
    log_every: int | None = None
    log_at: tuple[int, ...] = ()

    @property
    def log_steps(self) -> tuple[int, ...]:
        """Steps (updates done) at which metrics are recorded: 0, each epoch end, the last step,
        every ``log_every`` and the steps of ``log_at``."""
        steps = {0, self.total_steps, *range(self.steps_per_epoch, self.total_steps + 1, self.steps_per_epoch)}
        if self.log_every:
            steps.update(range(0, self.total_steps + 1, self.log_every))
        steps.update(s for s in self.log_at if s <= self.total_steps)
        return tuple(sorted(steps))


def chunk_hooks(specs: Sequence[LearnerSpec]) -> Hooks:
    """The hooks of a chunk's step: each class's, at each point of ``hook_points.POINTS`` it implements, when any
    learner of the chunk needs them (a class whose learners all leave the step alone is left out of it). The
    chunk's learners share each class's non-numeric values (``Intervention.structure``), so its first variation
    stands for the class; each learner's hook sees its own numbers (``Intervention.for_learner``)."""
    points: dict[str, list[Hook]] = {p.method: [] for p in POINTS}
    by_class = _variations_by_class(specs)
    for name, variations in sorted(by_class.items(), key=lambda kv: (kv[1][0].order, kv[0])):
        owner = variations[0]
        stateful = _stateful(owner)
        in_step = any(v.active_in_step() for v in variations)
        for point in POINTS:
            if point.method not in implemented(type(owner)):
                continue
            if point.in_step and not in_step or not point.in_step and all(v.is_default() for v in variations):
                continue
            module = owner.values.get("module") if point.method == "on_activations" else None
            points[point.method].append(Hook(name, owner, point.method, owner.windowed and point.in_step, stateful, module))
    return Hooks({k: tuple(v) for k, v in points.items() if v})


def _stateful(v: Intervention) -> bool:
    return callable(getattr(type(v), "init_state", None))


def _variations_by_class(specs: Sequence[LearnerSpec]) -> dict[str, list[Intervention]]:
    by_class: dict[str, list[Intervention]] = {}
    for spec in specs:
        for v in spec.interventions:
            by_class.setdefault(class_name(type(v)), []).append(v)
    return by_class


def _tensor(value: object) -> object:
    """A learner's numbers as tensors: bool, int64 or float64; tuples of numbers as 1-d tensors."""
    if isinstance(value, dict):
        return {k: _tensor(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or (isinstance(value, tuple) and value and all(isinstance(v, bool) for v in value)):
        return torch.tensor(value, dtype=torch.bool)
    if isinstance(value, int) or (isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in value)):
        return torch.tensor(value, dtype=torch.int64)
    return torch.tensor(value, dtype=torch.float64)


def intervention_data(specs: Sequence[LearnerSpec], hooks: Hooks) -> dict:
    """Per class that has hooks in this chunk: its learners' numbers, keys, activity, windows and state,
    stacked (N, ...)."""
    by_class = _variations_by_class(specs)
    out = {}
    for name in hooks.names:
        variations = by_class[name]
        windows = [v.windows() for v in variations]
        k = max(len(w) for w in windows)
        padded = [list(w) + [(0, 0)] * (k - len(w)) for w in windows]
        out[name] = InterventionData(
            n=pytrees.stack([_tensor(v.numbers(s.setup)) for v, s in zip(variations, specs, strict=True)]),
            key=torch.tensor([s.keys[name] for s in specs], dtype=torch.int64),
            active=torch.tensor([not v.is_default() for v in variations]),
            windows=torch.tensor(padded, dtype=torch.int64).reshape(len(specs), k, 2),
            state=pytrees.stack([_init_state(v, s) for v, s in zip(variations, specs, strict=True)])
            if _stateful(variations[0]) else (),
        )
    return out


def _init_state(v: Intervention, spec: LearnerSpec) -> object:
    template = spec.setup.template
    params = {n: p.detach().clone() for n, p in template.named_parameters()}
    numbers = _tensor(v.numbers(spec.setup))
    return pytrees.tree_map(lambda t: t.clone(), v.init_state(params, Numbers(numbers)))


def initial_state(specs: Sequence[LearnerSpec], hooks: Hooks, device: torch.device) -> ChunkState:
    """Stacked initial state of the chunk's learners, built on the CPU (so it is the same on any device),
    then moved: params, buffers (N, ...), interventions' data, optimizer state and hyperparameters."""
    setup = specs[0].setup
    model = initial_model_states(setup.template, [s.init_key for s in specs], [s.dropout_key for s in specs])
    model, inter = initial_hooks(hooks, model, intervention_data(specs, hooks))
    twin = chunk_optimizer(specs)
    state = ChunkState(
        params=model.params, buffers=model.buffers,
        opt=vmap(twin.init)({k: model.params[k] for k in setup.trainable_names}),
        hparams=_hyperparameters(twin, specs),
        diverged_at=torch.full((len(specs),), -1, dtype=torch.int64),
        interventions=inter,
    )
    return pytrees.tree_map(lambda t: t.to(device).contiguous(), state)  # no expanded (stride 0) leaves


def _hyperparameters(twin, specs: Sequence[LearnerSpec]) -> dict[str, torch.Tensor]:
    """Each learner's numeric hyperparameters, stacked (N,) float64; resolved once per distinct setting."""
    resolved: dict[str, dict[str, torch.Tensor]] = {}
    rows = []
    for s in specs:
        key = repr([sorted(p.values.items()) for p in s.setup.optimizer_parts])
        if key not in resolved:
            resolved[key] = s.setup.optimizer_hparams(twin)
        rows.append(resolved[key])
    return {k: torch.stack([row[k] for row in rows]) for k in twin.numeric}


def _orders(streams: Sequence[DataStream], epoch: int, data: TrainingData, device: torch.device) -> torch.Tensor:
    """An epoch's data orders (K, n) on ``device``; drawn on the CPU, copied without waiting on CUDA."""
    orders = stream_orders(streams, epoch, len(data.x), data.steps_per_epoch, data.batch_size, torch.device("cpu"))
    if device.type == "cuda":
        return orders.pin_memory().to(device, non_blocking=True)
    return orders.to(device)


def _structure_key(specs: Sequence[LearnerSpec], hooks: Hooks, twin, shared: bool, loss_fn: LossFn, speed: Speed) -> tuple:
    """What a chunk's step is made of, for the caches of convolution plans and compiled steps: chunks with equal
    keys run the same code on the same shapes."""
    setup = specs[0].setup
    points = tuple((point.method, tuple((h.name, h.module) for h in hooks.at(point.method))) for point in POINTS)
    return (id(setup.template), tuple(setup.data.x.shape[1:]), setup.batch_size, setup.dtype,
            tuple(setup.trainable_names), twin.name, setup.optimizer_structure(), points, shared, id(loss_fn),
            speed.precision, specs[0].structure)


def _stable_key(specs: Sequence[LearnerSpec], hooks: Hooks, twin, shared: bool, loss_fn: LossFn, speed: Speed) -> str:
    """What ``_structure_key`` names, in terms that mean the same in another process (the model's layers and
    shapes in place of its id, the loss function's name in place of its id), for the disk cache of plans."""
    setup = specs[0].setup
    template = setup.template
    points = tuple((point.method, tuple((h.name, h.module) for h in hooks.at(point.method))) for point in POINTS)
    loss = f"{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', type(loss_fn).__qualname__)}"
    return plan_cache.digest((repr(template), tuple((k, tuple(v.shape), str(v.dtype)) for k, v in template.state_dict().items()),
                              tuple(setup.data.x.shape[1:]), setup.batch_size, str(setup.dtype), tuple(setup.trainable_names),
                              twin.name, setup.optimizer_structure(), points, shared, loss, speed.precision))


def compile_outlook(specs: Sequence[LearnerSpec], loss_fn: LossFn, device: torch.device, speed: Speed,
                    steps_left: int) -> tuple[str, bool]:
    """What ``compile="auto"`` expects for a chunk of ``specs`` before it trains, for ``plan()``: in words (the eager
    estimate when a step time is remembered, in ``plan_cache`` or ``compile_record``, and the decision), and whether
    inductor's cache is warm for its step (``compile_record``)."""
    specs = list(specs) * 2 if len(specs) == 1 else list(specs)  # a lone learner trains as two copies
    n, setup = len(specs), specs[0].setup
    hooks, twin = chunk_hooks(specs), chunk_optimizer(specs)
    shared = len({s.data_stream for s in specs}) == 1
    batch = (min(setup.batch_size, len(setup.data.x)), *setup.data.x.shape[1:])
    shape = batch if shared else (n, *batch)
    digest = plan_cache.digest((_stable_key(specs, hooks, twin, shared, loss_fn, speed), shape))
    convolutional = bool(convolutions.convolutions_of(setup.template))
    step_s = None
    if speed.precision == "bf16" or (speed.convolutions == "auto" and not convolutional):
        plan = "vmap"
    elif speed.convolutions == "auto":
        cached = plan_cache.lookup(plan_cache.entry_key("train", digest, n, device))
        plan = cached["choice"] if cached else acceleration.default_plan(device, n)
        step_s = cached.get("step_s") if cached else None
    else:
        plan = speed.convolutions
    record_key = compile_record.key(digest, acceleration.compiled_plan(plan, device), n, device)
    entry = compile_record.lookup(record_key)
    step_s = step_s or compile_record.eager_seconds(record_key)
    cold_s = compile_record.expected_cold_seconds(device)
    if step_s is None:
        cache = "warm" if entry else f"cold (a compile costs about {cold_s:.0f} s)"
        return f"step not timed yet (it is at the chunk's start, from {acceleration.MEASURE_MIN_STEPS} steps); inductor's " \
               f"cache {cache}", entry is not None
    decision = compile_record.decide(step_s * steps_left, entry, device.type, cold_s)
    return f"{decision.reason} ({steps_left} steps): {'compiled' if decision.compile else 'eager'}", entry is not None


def chunk_optimizer(specs: Sequence[LearnerSpec]):
    setup = specs[0].setup
    varied = frozenset().union(*(s.setup.varied_hyperparameters for s in specs))
    return setup.optimizer_twin(varied)


@dataclass
class ChunkStart:
    """Where a chunk starts: after ``step`` updates, from each learner's stored state (None, or no ``states``:
    its initial state), carrying the metric values of earlier logged ``steps`` (``records`` {name: (N,
    len(steps))}) and the states kept at earlier steps that only checkpoints hold (``kept`` {step: flat state
    (N, ...)}) into its checkpoints and its batch."""

    step: int = 0
    states: Sequence[FlatState | None] | None = None
    steps: tuple[int, ...] = ()
    records: Mapping[str, np.ndarray] = field(default_factory=dict)
    kept: Mapping[int, FlatState] = field(default_factory=dict)


@dataclass
class ChunkResult:
    """What a chunk's batch holds: metrics (N, len(steps)) at ``steps``, ``diverged_at`` (N,), and full states
    {step: flat state (N, ...)} at the kept steps and the last one."""

    steps: tuple[int, ...]
    metrics: dict[str, np.ndarray]
    diverged_at: np.ndarray
    states: dict[int, FlatState]


def _evaluation_chooser(step_fn: acceleration.PreparedStep, template, structure: tuple, stable: str, data: TrainingData,
                        schedule: Schedule, start_step: int, n: int, device: torch.device, speed: Speed,
                        cap: int | None, evaluations: int) -> Callable[[dict, torch.Tensor], tuple[Callable, int | None]]:
    """``(state, x) -> (logits_fn, learners_per_pass)`` for the Recorder: the evaluation's own plan
    (``acceleration.choose_evaluation``), chosen on the first evaluation of each set and reported in
    ``step_fn.report.evaluation``. Measuring one set may take ``MEASURE_SHARE`` of its evaluations and half the
    chunk's steps, estimated from the measured step time (a forward pass of an evaluation batch: ``FORWARD_SHARE``
    of a training step per example); ``evaluations``: how many logged steps of the chunk evaluate."""
    report = step_fn.report
    own = speed.convolutions == "auto" and speed.precision != "bf16" and step_fn.logits_of is not None
    candidates = (acceleration.evaluation_candidates(report.plan, device, bool(convolutions.convolutions_of(template)),
                                                     n if cap is None else min(n, cap))
                  if own else (report.plan,))

    def choose(state: dict, x: torch.Tensor) -> tuple[Callable, int | None]:
        step_s = report.eager_step_s
        batch_s = None if step_s is None else step_s * acceleration.evaluation_steps(
            1, min(len(x), data.eval_batch_size), data.batch_size)
        budget = None if batch_s is None else acceleration.MEASURE_SHARE * step_s * (
            (schedule.total_steps - start_step) / 2  # half the steps per set
            + acceleration.evaluation_steps(evaluations, len(x), data.batch_size))
        cache_key = plan_cache.entry_key("evaluate", plan_cache.digest(
            (stable, report.plan, tuple(x.shape), data.eval_batch_size, cap)), n, device)
        choice = acceleration.choose_evaluation(step_fn.logits_of or (lambda plan: step_fn.logits), candidates,
                                                state.params, state.buffers, x, data.eval_batch_size,
                                                (structure, report.plan, n, tuple(x.shape), cap), device,
                                                budget_s=budget, batch_s=batch_s, cap=cap, cache_key=cache_key)
        if not report.evaluation or choice.measured:
            report.evaluation = f"{choice.plan}, {choice.group or 'all'} learners per pass ({choice.reason})"
        return (step_fn.logits if choice.plan == report.plan else step_fn.logits_of(choice.plan)), choice.group

    return choose


def train_chunk(
    specs: Sequence[LearnerSpec],
    data: TrainingData,
    schedule: Schedule,
    loss_fn: LossFn,
    device: torch.device,
    on_step: Callable[[int, dict, torch.Tensor | None], None] = lambda step, state, loss: None,
    metrics: Mapping[str, MetricFn] | None = None,
    checkpoints: Checkpoints | None = None,
    evaluate: bool = True,
    start: ChunkStart | None = None,
    keep: Sequence[int] = (),
    controls: bool = False,
    reads_control: Collection[str] = (),
    speed: Speed | None = None,
    report: list[ChunkSpeed] | None = None,
    evaluation_learners: int | None = None,
    stop: int | None = None,
    builtins: Sequence[MetricSpec] | None = None,
    when: Mapping[str, When] | None = None,
) -> ChunkResult:
    """Train one chunk of learners of one structure from ``start`` (default: their initial states) to the end of
    ``schedule``, recording metrics (N, steps, *their dims) at its logged steps from ``start.step`` on and keeping
    full states at the ``keep`` steps (with those ``start.kept`` carries). With ``checkpoints``, save the chunk
    (with its kept states) when they are due, and when interrupted (Ctrl-C) before re-raising (see
    ``Checkpoints.interrupted``). ``controls``: record the metrics against each learner's control (NaN for
    learners whose control is not in ``specs``); ``reads_control``: the custom metrics that read
    ``learner.control``. ``builtins``: the built-in metrics recorded, with their schedules (default
    ``metrics.recorded(evaluate, controls)``); ``when``: the custom metrics' schedules (default every logged step):
    at a logged step only the metrics due there are computed (``recording.Recorder``). ``speed`` says how the step
    may be accelerated (default ``Speed()``); what was chosen, and what choosing and compiling cost, is appended to
    ``report``. ``evaluation_learners`` caps the learners of
    one evaluation pass (memory: ``planning.evaluation_learners``).
    ``stop`` (default the schedule's last step) ends the chunk after that many updates (a prefix that learners
    fork from there: its final state is kept there). ``on_step(step, state, loss)`` is called where
    the chunk starts (``loss`` None) and after each update (``step`` updates done, the step's loss (N,)):
    ``runner`` drives the progress bar and the callbacks from it.

    A lone learner is trained as two identical copies: with a learner axis of 1, torch turns batched
    matmuls into plain ones whose rounding differs, and a learner must give the same numbers whether it
    trains alone or in a batch."""
    n_learners = len(specs)
    start = start or ChunkStart()
    specs = list(specs) * 2 if n_learners == 1 else list(specs)
    setup = specs[0].setup
    template = setup.template
    began = time.perf_counter()
    hooks = chunk_hooks(specs)
    twin = chunk_optimizer(specs)
    state = initial_state(specs, hooks, device)
    initial_params = state.params  # for the distance to init
    if start.states is not None:
        state = restore(state, list(start.states) * (2 if n_learners == 1 else 1))
        state = pytrees.tree_map(lambda t: t.contiguous(), state)
    records = {m: [torch.from_numpy(np.concatenate([v, v]) if n_learners == 1 else v)[:, j].to(device)
                   for j in range(len(start.steps))] for m, v in start.records.items()}
    recorded = list(start.steps)

    data_keys = list(dict.fromkeys(s.data_stream for s in specs))
    shared = len(data_keys) == 1
    which_order = torch.tensor([data_keys.index(s.data_stream) for s in specs], device=device)  # (N,)
    speed = speed or Speed()
    autocast = partial(acceleration.autocast, speed.precision, device)

    def build(plan: str) -> tuple[Callable, Callable]:
        layers, per_learner = convolutions.plan_for(template, plan), convolutions.PLANS[plan].per_learner
        return (make_train_step(template, twin, loss_fn, hooks, shared_batch=shared, trainable=setup.trainable_names,
                                layers=layers, autocast=autocast, per_learner=per_learner),
                make_logits(template, layers, per_learner=per_learner))

    initial_s = time.perf_counter() - began
    first = batch_indices(_orders(data_keys[:1], 0, data, device), 0, data.batch_size)[0]
    xb, yb = data.x[first], data.y[first]
    if not shared:
        xb, yb = xb.expand(len(specs), *xb.shape), yb.expand(len(specs), *yb.shape)
    check_pure(build("vmap")[0], state, xb, yb, hooks)
    structure = _structure_key(specs, hooks, twin, shared, loss_fn, speed)
    stop = schedule.total_steps if stop is None else stop
    stable = _stable_key(specs, hooks, twin, shared, loss_fn, speed)
    steps_left = stop - start.step
    builtins = list(builtins) if builtins is not None else recorded_metrics(evaluate, controls)
    log_steps = {t for t in schedule.log_steps if t <= stop}
    evaluations = sum(1 for t in schedule.log_steps if t >= start.step and any(m.evaluates and m.when.due(t) for m in builtins))
    evaluated = len(data.x) + (0 if data.x_test is None else len(data.x_test))  # examples per whole-set evaluation
    evaluation_steps = acceleration.evaluation_steps(evaluations, evaluated, data.batch_size)
    with acceleration.keep_freed_memory(device), acceleration.precision(speed.precision, device):
        step_fn = acceleration.prepare_step(build, template, structure, (state, xb, yb, torch.tensor(start.step, device=device)),
                                            steps_left, len(specs), device, speed, stable_key=stable,
                                            evaluation_steps=evaluation_steps)
    if report is not None:
        report.append(step_fn.report)
    times = step_fn.report
    times.initial_state_s, times.prepare_s = initial_s, time.perf_counter() - began - initial_s
    evaluation = _evaluation_chooser(step_fn, template, structure, stable, data, schedule, start.step, len(specs),
                                     device, speed, evaluation_learners, evaluations)
    recorder = Recorder(specs, data, template, loss_fn, device, initial_params, evaluate=evaluate, controls=controls,
                        metrics=metrics, reads_control=reads_control, steps_per_epoch=schedule.steps_per_epoch,
                        records=records, logits_fn=step_fn.logits, evaluation=evaluation, builtins=builtins, when=when)

    def record(state: ChunkState, step: int) -> None:
        began = time.perf_counter()
        recorder(state, step)
        times.evaluate_s += time.perf_counter() - began

    def snapshot() -> tuple[list[int], dict[str, np.ndarray]]:
        """The logged steps recorded in full so far, and their metrics (N, steps)."""
        k = len(recorded)
        if not k:
            return [], {}
        return list(recorded), recorder.results(n_learners, state, k)

    kept: dict[int, FlatState] = dict(start.kept)  # every checkpoint holds the kept states passed so far
    if checkpoints is not None:
        checkpoints.follow(start.step, state, snapshot, kept)
    template.train()
    step_numbers = torch.arange(stop + 1, device=device)  # on the device: no copy per step
    with torch.no_grad(), acceleration.keep_freed_memory(device), acceleration.precision(speed.precision, device):
        if start.step in log_steps:
            record(state, start.step)
            recorded.append(start.step)
        if start.step in keep:
            kept[start.step] = flatten(state, n_learners)
        on_step(start.step, state, None)
        orders = None
        loop_began, evaluated = time.perf_counter(), times.evaluate_s
        for step in range(start.step, stop):
            epoch, position = divmod(step, schedule.steps_per_epoch)
            if position == 0 or orders is None:
                orders = _orders(data_keys, epoch, data, device)  # (K, n)
            idx = batch_indices(orders, position, data.batch_size)  # (K, B)
            if shared:
                xb, yb = data.x[idx[0]], data.y[idx[0]]  # (B, ...)
            else:
                idx = idx[which_order]  # (N, B)
                xb, yb = data.x[idx], data.y[idx]  # (N, B, ...)
            state, loss = step_fn(state, xb, yb, step_numbers[step])
            if checkpoints is not None:
                checkpoints.track(step + 1, state)  # what a Ctrl-C saves
            if step + 1 in log_steps:
                record(state, step + 1)
                recorded.append(step + 1)
            if step + 1 in keep:
                kept[step + 1] = flatten(state, n_learners)
            on_step(step + 1, state, loss)
            if checkpoints is not None and step + 1 < stop and checkpoints.due(step + 1):
                checkpoints.save(step + 1, state, *snapshot())
        times.steps_s = time.perf_counter() - loop_began - (times.evaluate_s - evaluated)
    steps, out = snapshot()
    kept[stop] = flatten(state, n_learners)
    diverged_at = state.diverged_at[:n_learners].cpu().numpy()  # (N,)
    control = recorder.control[:n_learners].cpu().numpy() % n_learners  # (N,) a lone learner trains as two copies
    out = nan_from_divergence(out, steps, diverged_at, control, recorder.against_control())
    return ChunkResult(tuple(steps), out, diverged_at, kept)
