"""How a chunk's step runs fast: the convolution plan, ``torch.compile``, precision and CPU memory.

``Speed`` holds the choices an ``Experiment`` takes (``compile=``, ``convolutions=``, ``precision=``);
``prepare_step`` turns them into the step and evaluation functions of one chunk, measuring what it must,
and says what it chose and what that cost in a ``ChunkSpeed`` report.

- **Convolutions** (``convolutions.py``): ``"auto"`` takes the plan cached for this device, structure, N and
  torch version (``plan_cache``: on disk, so a second run measures nothing), else measures the candidate plans
  on the chunk's own learners (one or two timed steps each) when that costs at most ``MEASURE_SHARE`` of the
  chunk's training (estimated from its first step's time), else takes the device's default; a plan name forces
  it; ``"vmap"`` is torch.func's own batching rule. Evaluation chooses its own plan and learners per pass the
  same way (``choose_evaluation``), on its first batch.
- **Compilation**: the whole step (hooks, forward, backward, optimizer) under ``torch.compile(fullgraph=True)``,
  vmap inside, on CUDA with CUDA graphs (``mode="reduce-overhead"``). ``"auto"`` compiles when the measured
  eager step times the steps left is long enough to repay it, knowing from ``compile_record`` whether inductor's
  on-disk cache holds the step's kernels (a warm compile costs seconds, a cold one tens of seconds on a CPU:
  ``compile_record.decide``), and keeps the compiled step only if it is faster than the eager one; every compile
  is recorded there; ``True``/``False`` force it. A compiled step is built once per process
  for each structure and reused by every chunk of that structure.
- **Precision**: ``"float32"`` (default), ``"tf32"`` (TensorFloat-32 matmuls and convolutions on CUDA, oneDNN's
  reduced-precision float32 on CPUs that have it) or ``"bf16"`` (forward and backward under bfloat16
  autocast; parameters, optimizer state and metrics stay float32). Only when asked: both change results
  beyond float32 rounding, and a stored result is reused only by a run of the same precision.
- **CPU memory**: on Linux with glibc, training keeps freed memory in the process instead of returning
  large blocks to the system (``keep_freed_memory``): the stacked activations of many learners are tens
  of MiB, and mapping fresh pages for each took as long as the arithmetic.

>>> Speed(compile=False, convolutions="vmap").plain
True
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import compile_record, convolutions, plan_cache

COMPILE_BACKEND = "inductor"  # tests trace with "aot_eager": the same graphs without generating kernels
MEASURE_SHARE = 0.02  # what measuring (plans, eager step time) may cost, as a share of the chunk's estimated run
MEASURE_MIN_STEPS = 100  # timing one step (two calls: the first carries one-time costs) costs MEASURE_SHARE of this
PRECISIONS = ("float32", "tf32", "bf16")
PLANS = convolutions.PLANS  # the convolution plans, by name (a registry: convolutions.register_plan)
SERIAL_MAX_LEARNERS = {"cpu": 4}
RECOMPILE_LIMIT = 256  # the default plan of a convolutional model with at most this many learners


@dataclass(frozen=True)
class Speed:
    """What the library may do to train faster. ``Speed(compile=False, convolutions="vmap")`` is the plain
    path: torch.func's own vmap of the step, the reference for every other."""

    compile: bool | str = "auto"
    convolutions: str = "auto"
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile= takes True, False or 'auto'; got {self.compile!r}.")
        if self.convolutions != "auto" and self.convolutions not in convolutions.PLANS:
            raise ValueError(f"convolutions= takes 'auto' or one of {', '.join(convolutions.PLANS)}; "
                             f"got {self.convolutions!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision= takes one of {', '.join(PRECISIONS)}; got {self.precision!r}.")

    @property
    def plain(self) -> bool:
        return self.compile is False and self.convolutions == "vmap" and self.precision == "float32"

    def describe(self, dtype: torch.dtype = torch.float32) -> str:
        """In words, for ``Experiment.plan()``, with the learners' ``dtype``: ``"...; float64"``, or for float32
        learners their precision (``"float32"``, ``"tf32"``, ``"bf16"``)."""
        compile_words = {True: "compiled step", False: "eager step",
                         "auto": "eager step, compiled where it repays its cost (compile: below)"}
        conv = "convolutions measured per chunk" if self.convolutions == "auto" else f"convolutions '{self.convolutions}'"
        numbers = self.precision if dtype == torch.float32 else str(dtype).removeprefix("torch.") + (
            "" if self.precision == "float32" else f", precision={self.precision!r}")
        return f"{compile_words[self.compile]}; {conv}; {numbers}"


@dataclass
class ChunkSpeed:
    """What ``prepare_step`` chose for one chunk, and what choosing and compiling cost (seconds)."""

    learners: int
    plan: str = "vmap"
    layers: dict[str, str] = field(default_factory=dict)
    plan_measured: bool = False
    plan_reason: str = ""  # "cached", "measured: ..." or why the default was taken
    evaluation: str = ""  # the evaluation's plan and learners per pass, and why (once the chunk evaluated)
    compiled: bool = False
    compile_s: float = 0.0
    compile_cold: bool | None = None  # whether the compile built kernels (inductor's cache did not hold them)
    measure_s: float = 0.0
    eager_step_s: float | None = None
    reason: str = ""
    # where the chunk's time went (seconds, host clock: on CUDA the device may still run queued work when a part ends)
    initial_state_s: float = 0.0  # building the initial states (and restoring stored ones)
    prepare_s: float = 0.0  # the purity check, choosing the plan, compiling (measure_s and compile_s are parts of it)
    evaluate_s: float = 0.0  # the metrics at logged steps: whole-set evaluations and the rest
    steps_s: float = 0.0  # the training loop less the metrics: batches and steps


@dataclass
class PreparedStep:
    step: Callable  # step(state, x, y, t) -> (state, loss)
    logits: Callable  # logits(params, buffers, x) -> (N, B, classes), template in eval mode
    report: ChunkSpeed
    cuda_graphs: bool = False
    logits_of: Callable[[str], Callable] | None = None  # logits of another plan (evaluation chooses its own)

    def __call__(self, state: dict, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[dict, torch.Tensor]:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        return self.step(state, x, y, t)


_COMPILED: dict[tuple, Callable] = {}
_COMPILE_FAILED: dict[tuple, Exception] = {}  # structures whose step failed to compile in this process: not retried


def prepare_step(build: Callable[[str], tuple[Callable, Callable]], template: torch.nn.Module, key: tuple,
                 run_args: tuple, steps_left: int, n: int, device: torch.device, speed: Speed,
                 stable_key: str | None = None, evaluation_steps: float = 0.0) -> PreparedStep:
    """The step of a chunk of ``n`` learners. ``build(plan)`` makes its eager step and logits functions for a
    plan of ``convolutions.PLANS``; ``run_args`` (state, x, y, t) are what one step takes, for measuring (the step is pure:
    nothing is changed); ``key`` names the chunk's structure (for the caches of plans and compiled steps) in this
    process, ``stable_key`` across processes (the disk cache of plans, ``plan_cache``; None: not used).
    ``evaluation_steps``: the chunk's whole-set evaluations, counted in training steps (a forward pass of an example
    costs about ``FORWARD_SHARE`` of a training step's): measuring plans may take ``MEASURE_SHARE`` of the whole run,
    evaluations included."""
    report = ChunkSpeed(learners=n)
    built_steps: dict[str, tuple[Callable, Callable]] = {}

    def built(plan: str) -> tuple[Callable, Callable]:
        if plan not in built_steps:
            built_steps[plan] = build(plan)
        return built_steps[plan]

    def run(plan: str) -> None:
        with torch.no_grad():
            built(plan)[0](*run_args)

    start = time.perf_counter()
    has_convolutions = bool(convolutions.convolutions_of(template))
    if speed.precision == "bf16" or (speed.convolutions == "auto" and not has_convolutions):
        report.plan = "vmap"  # bf16: autocast casts inside torch's own kernels, which the custom layers bypass
    elif speed.convolutions == "auto":
        plan_key = (key, n, str(device), tuple(run_args[1].shape))
        cache_key = None if stable_key is None else plan_cache.entry_key(
            "train", plan_cache.digest((stable_key, tuple(run_args[1].shape))), n, device)
        choice = choose_plan(run, plan_key, device, n, steps_left, cache_key=cache_key,
                             run_steps=steps_left + evaluation_steps)
        report.plan, report.plan_measured, report.plan_reason = choice.plan, choice.measured, choice.reason
        report.eager_step_s = choice.step_s
    else:
        report.plan = speed.convolutions
    report.layers = convolutions.plan_for(template, report.plan)
    step, logits = built(report.plan)

    compile_now = speed.compile is True
    timed = steps_left >= MEASURE_MIN_STEPS  # one step timed twice costs at most MEASURE_SHARE of the run
    if report.eager_step_s is None and timed:
        report.eager_step_s = _seconds(lambda: run(report.plan), device, repeats=1)
    eager_plan, eager_layers = report.plan, report.layers
    compile_plan = compiled_plan(report.plan, device)
    record_key = None if stable_key is None else compile_record.key(
        plan_cache.digest((stable_key, tuple(run_args[1].shape))), compile_plan, n, device)
    entry = compile_record.lookup(record_key) if record_key else None
    if speed.compile == "auto" and report.eager_step_s is not None:
        decision = compile_record.decide(report.eager_step_s * steps_left, entry, device.type,
                                         compile_record.expected_cold_seconds(device))
        compile_now, report.reason = decision.compile, f"{decision.reason} ({steps_left} steps)"
    elif speed.compile == "auto":
        report.reason = f"{steps_left} steps: too short to measure, eager"
    report.measure_s = time.perf_counter() - start

    prepared = PreparedStep(step, logits, report, logits_of=lambda plan: built(plan)[1])
    if not compile_now:
        if record_key is not None and entry is None and report.eager_step_s is not None and timed:
            compile_record.remember_eager(record_key, report.eager_step_s)  # for the next plan()'s estimate
        return prepared
    eager = prepared
    if compile_plan != report.plan:  # torch.autograd one learner at a time does not trace: compile a vmapped plan
        report.plan = compile_plan
        report.layers = convolutions.plan_for(template, report.plan)
        report.reason += f"; the {eager_plan} plan does not compile: a vmapped plan is compiled"
        step, logits = built(report.plan)
    compiled_key = (key, report.plan, str(device))
    misses = _kernel_builds()
    start = time.perf_counter()
    try:
        if compiled_key in _COMPILE_FAILED:
            raise _COMPILE_FAILED[compiled_key]
        if compiled_key not in _COMPILED:
            mode = "reduce-overhead" if device.type == "cuda" else None
            _COMPILED[compiled_key] = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND,
                                                    mode=mode if COMPILE_BACKEND == "inductor" else None)
            # Each experiment's step is a new closure of the same code, which dynamo compiles anew; past its default
            # limit of 8 per code object it would silently run the step eagerly.
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        compiled = PreparedStep(_COMPILED[compiled_key], logits, report, cuda_graphs=device.type == "cuda",
                                logits_of=prepared.logits_of)
        with torch.no_grad():
            compiled(*run_args)  # compiles now (or finds it in the caches), apart from the training time
        _synchronize(device)
    except Exception as error:  # no C++ compiler, an operation dynamo cannot trace in a user's hook or model...
        _COMPILED.pop(compiled_key, None)
        _COMPILE_FAILED[compiled_key] = error
        summary = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if speed.compile is True:
            raise RuntimeError(f"compile=True: torch.compile of the training step failed ({summary}). Pass "
                               f"compile=False, or compile='auto', which trains with the eager step when compiling "
                               f"fails.") from error
        report.compile_s = time.perf_counter() - start
        report.reason += f"; compiling failed ({summary}): eager step"
        warnings.warn(f"torch.compile of the training step failed ({summary}); training with the eager step "
                      f"(same numbers to float32 rounding). compile=False skips the attempt.", stacklevel=2)
        if eager.step is not step:
            report.plan, report.layers = eager_plan, eager_layers
        return eager
    report.compile_s = time.perf_counter() - start
    cold = _kernel_builds() > misses if misses is not None and COMPILE_BACKEND == "inductor" else entry is None
    report.compile_cold = cold
    compiled_s = None
    if speed.compile == "auto" or report.eager_step_s is not None:  # timed for the record; "auto" keeps it if faster
        def run_compiled() -> None:
            with torch.no_grad():
                compiled(*run_args)

        compiled_s = _seconds(run_compiled, device, repeats=2)
    if record_key is not None:
        compile_record.remember(record_key, report.compile_s, cold, report.eager_step_s, compiled_s)
    if speed.compile == "auto":
        if compiled_s >= compile_record.NOT_FASTER * report.eager_step_s:
            report.reason += f"; compiled step {compiled_s:.3g} s not faster than eager {report.eager_step_s:.3g} s"
            if eager.step is not step:
                report.plan, report.layers = eager_plan, eager_layers
            return eager
        report.reason += f"; compiled step {compiled_s:.3g} s vs eager {report.eager_step_s:.3g} s"
    report.compiled = True
    return compiled


def compiled_plan(plan: str, device: torch.device) -> str:
    """The plan a chunk of ``plan`` compiles: itself, or the device's vmapped default for a plan that runs the
    learners one after another with torch.autograd (which dynamo does not trace)."""
    if convolutions.PLANS[plan].per_learner:
        return default_plan(device, n=SERIAL_MAX_LEARNERS.get(device.type, 0) + 1)
    return plan


def _kernel_builds() -> int | None:
    """How many graphs inductor has compiled in this process so far, not found in its cache (None: unknown)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["fxgraph_cache_miss"])
    except Exception:
        return None


_CHOSEN: dict[tuple, PlanChoice] = {}  # this process's choices (the disk cache: plan_cache)


@dataclass(frozen=True)
class PlanChoice:
    """A chunk's convolution plan, whether it was measured now, why it was taken, and its step's seconds
    (measured now or remembered; None when nothing was timed)."""

    plan: str
    measured: bool
    reason: str
    step_s: float | None = None


def default_plan(device: torch.device, n: int) -> str:
    """The plan of a convolutional model when there is no measurement: on a CPU, the learners one after another
    up to ``SERIAL_MAX_LEARNERS``, else one matrix product for the first layer and channels-last grouped
    convolutions; on CUDA, grouped convolutions (cuDNN's)."""
    if device.type == "cpu":
        return "serial" if n <= SERIAL_MAX_LEARNERS["cpu"] else "gemm"
    return "grouped"


def choose_plan(run: Callable[[str], None], key: tuple, device: torch.device, n: int, steps_left: int,
                cache_key: str | None = None, candidates: tuple[str, ...] | None = None,
                run_steps: float | None = None) -> PlanChoice:
    """The plan of a convolutional model's step, among ``candidates`` (default: those of ``device``,
    ``convolutions.candidates``): the choice cached in this process under ``key`` or on disk under ``cache_key``
    (``plan_cache``); else, when the chunk's run is at least ``MEASURE_MIN_STEPS`` long (``run_steps``: its
    ``steps_left`` training steps and its evaluations, counted in training steps), the default plan's step is timed
    twice (``run(plan)``: the first call carries one-time costs) and, if timing every candidate that way would cost
    at most ``MEASURE_SHARE`` of the run, each candidate runs once timed (twice when it is within
    reach of the best) and the fastest wins, cached in the process and on disk; otherwise ``default_plan``."""
    run_steps = steps_left if run_steps is None else run_steps
    candidates = convolutions.candidates(device) if candidates is None else candidates
    if key in _CHOSEN:
        return dataclasses.replace(_CHOSEN[key], measured=False, reason="cached")
    entry = plan_cache.lookup(cache_key) if cache_key else None
    if entry is not None and entry["choice"] in candidates:
        _CHOSEN[key] = PlanChoice(entry["choice"], False, "cached", entry.get("step_s"))
        return _CHOSEN[key]
    default = default_plan(device, n)
    length = f"{steps_left} steps" + (f" and evaluations worth {run_steps - steps_left:.0f}" if run_steps > steps_left else "")
    if run_steps < MEASURE_MIN_STEPS:
        return PlanChoice(default, False, f"default: {length} are too short to time one step within "
                                          f"{MEASURE_SHARE:.0%} of the run")
    first = _once(lambda: run(default), device)  # allocation, kernel selection
    timings = {default: _once(lambda: run(default), device)}
    budget = MEASURE_SHARE * run_steps * timings[default]
    estimate = first + timings[default] + (len(candidates) - 1) * 1.5 * timings[default]  # one or two calls each
    if estimate > budget:
        return PlanChoice(default, False, f"default: timing {len(candidates)} plans (about {estimate:.2g} s) would "
                                          f"take over {MEASURE_SHARE:.0%} of {length}", timings[default])
    overhead = max(0.0, first - timings[default])  # what a plan's first call adds
    for plan in candidates:
        if plan == default:
            continue
        seconds = _once(lambda plan=plan: run(plan), device)
        if seconds < 1.5 * min(timings.values()) + overhead:  # within reach: time it warm
            seconds = min(seconds, _once(lambda plan=plan: run(plan), device))
        timings[plan] = seconds
    best = min(timings, key=timings.get)
    words = ", ".join(f"{plan} {seconds * 1e3:.3g} ms" for plan, seconds in timings.items())
    _CHOSEN[key] = PlanChoice(best, False, "cached", timings[best])
    if cache_key:
        plan_cache.remember(cache_key, {"choice": best, "step_s": timings[best], "timings": timings})
    return PlanChoice(best, True, f"measured: {words}", timings[best])


@dataclass(frozen=True)
class EvaluationChoice:
    """How a chunk evaluates: the plan of its logits (``convolutions.PLANS``), learners per pass (None: all),
    whether that was measured now, and why it was taken."""

    plan: str
    group: int | None
    measured: bool
    reason: str


_EVALUATIONS: dict[tuple, EvaluationChoice] = {}
EVAL_GROUP_CANDIDATES = (None, 32, 8)  # learners per evaluation pass (None: all)
FORWARD_SHARE = 1 / 3  # a forward pass's share of a training step (forward and backward), to estimate a batch's cost


def evaluation_steps(evaluations: int, examples: int, batch_size: int) -> float:
    """``evaluations`` whole passes over ``examples``, counted in training steps of ``batch_size`` examples (a forward
    pass of an example costs about ``FORWARD_SHARE`` of a training step's).

    >>> evaluation_steps(3, 6400, 64)
    100.0
    """
    return evaluations * examples * FORWARD_SHARE / batch_size


EVAL_SERIAL_MAX_LEARNERS = {"cpu": 8}  # up to this many learners, a CPU evaluates a convolutional model's learners in turn


def evaluation_candidates(train_plan: str, device: torch.device, convolutional: bool,
                          n: int | None = None) -> tuple[str, ...]:
    """The logits plans evaluation measures, the first its default (taken when the run is too short to measure):
    the training plan; for a convolutional model also the device's vmapped default, torch.func's own vmap and the
    learners one after another in channels-last memory (``"serial"``). Given the chunk's ``n`` learners, a CPU's
    default is ``"serial"`` up to ``EVAL_SERIAL_MAX_LEARNERS``, else its vmapped default: a forward pass without
    backward costs little per operation, and per learner (2-core EPYC, LeNet-5, batches of 256) serial took 3.6 ms
    at N=2 and 2.6 ms at N=8, gemm 9.5 and 2.7 ms, vmap 6.2 and 5.4 ms; at N=32 gemm 2.9, serial 5.2, vmap 6.8.
    A model without convolutions keeps its training plan (vmap): a learner's metrics then do not depend on how
    many learners share its chunk."""
    if not convolutional:
        return (train_plan,)
    vmapped = default_plan(device, SERIAL_MAX_LEARNERS.get(device.type, 0) + 1)
    first = train_plan
    if n is not None and device.type in EVAL_SERIAL_MAX_LEARNERS:
        first = "serial" if n <= EVAL_SERIAL_MAX_LEARNERS[device.type] else vmapped
    return tuple(dict.fromkeys((first, train_plan, vmapped, "vmap", "serial")))


def choose_evaluation(logits_of: Callable[[str], Callable], candidates: tuple[str, ...], params: dict, buffers: dict,
                      x: torch.Tensor, batch_size: int, key: tuple, device: torch.device, budget_s: float | None,
                      batch_s: float | None = None, cap: int | None = None, cache_key: str | None = None) -> EvaluationChoice:
    """The evaluation of a chunk's learners on ``x`` (batches of ``batch_size``): which logits plan of
    ``candidates`` (``logits_of(plan)``, the first is the default) and how many learners per pass, at most
    ``cap`` (what memory allows, ``planning.evaluation_learners``). Cached in the process under ``key`` and on
    disk under ``cache_key``; else each (plan, group) runs once, timed, on the first evaluation batch (twice
    when within reach of the best), the fastest per learner wins, when that costs at most ``budget_s`` (the
    share of the run measuring may take: None, nothing is measured), estimated from ``batch_s`` (the seconds of
    one evaluation batch of all learners, when known). Every choice gives the same numbers to
    float32 rounding (groups: bitwise)."""
    if key in _EVALUATIONS:
        return dataclasses.replace(_EVALUATIONS[key], measured=False, reason="cached")
    n = len(next(iter(params.values())))
    groups = [k for k in EVAL_GROUP_CANDIDATES if (k is None and cap is None) or (k is not None and 2 <= k < n)]
    if cap is not None:
        groups = sorted({min(k, cap) for k in groups} | {cap}, reverse=True)
    options = [(plan, None if convolutions.PLANS[plan].per_learner else group)
               for plan in candidates for group in groups]
    options = list(dict.fromkeys(options))
    default = EvaluationChoice(candidates[0], cap, False, "default")
    entry = plan_cache.lookup(cache_key) if cache_key else None
    if entry is not None and (entry["choice"], entry.get("group")) in options:
        _EVALUATIONS[key] = EvaluationChoice(entry["choice"], entry.get("group"), False, "cached")
        return _EVALUATIONS[key]
    if len(options) <= 1:
        return dataclasses.replace(default, reason="default: nothing to choose")
    if budget_s is None or (batch_s is not None and 2 * len(options) * batch_s > budget_s):
        return dataclasses.replace(default, reason=f"default: the run is too short to time its evaluation within "
                                                   f"{MEASURE_SHARE:.0%}")
    batch = x[:batch_size]
    per_learner: dict[tuple, float] = {}
    spent = 0.0
    for plan, group in options:
        size = n if group is None else group
        fn = logits_of(plan)

        def run(fn: Callable = fn, size: int = size) -> None:
            with torch.no_grad():
                fn({name: p[:size] for name, p in params.items()}, {name: b[:size] for name, b in buffers.items()}, batch)

        seconds = _once(run, device)
        spent += seconds
        if per_learner and spent > budget_s:  # over budget: keep what was timed
            per_learner[(plan, group)] = seconds / size
            break
        if not per_learner or seconds / size < 1.5 * min(per_learner.values()):
            again = _once(run, device)
            spent += again
            seconds = min(seconds, again)
        per_learner[(plan, group)] = seconds / size
    plan, group = min(per_learner, key=per_learner.get)
    words = ", ".join(f"{p}/{g or 'all'} {s * 1e6:.3g} us" for (p, g), s in per_learner.items())
    _EVALUATIONS[key] = EvaluationChoice(plan, group, False, "cached")
    if cache_key:
        plan_cache.remember(cache_key, {"choice": plan, "group": group, "per_learner_s": {
            f"{p}/{g}": s for (p, g), s in per_learner.items()}})
    return EvaluationChoice(plan, group, True, f"measured per learner: {words}")


def _once(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (synchronized on CUDA)."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # first call: allocation, kernel selection
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def precision(mode: str, device: torch.device) -> Iterator[None]:
    """Float32 matmuls and convolutions at ``mode`` inside the block (``"tf32"``: TensorFloat-32 on CUDA,
    ``torch.set_float32_matmul_precision("high")`` elsewhere); ``"float32"`` and ``"bf16"`` change nothing here
    (bf16 is autocast inside the step, ``autocast``)."""
    if mode != "tf32":
        yield
        return
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1], before[2]


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for the forward pass when ``mode`` is ``"bf16"``, else nothing."""
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextlib.contextmanager
def keep_freed_memory(device: torch.device) -> Iterator[None]:
    """While training on the CPU with glibc: serve every allocation from the heap and keep freed memory
    (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``), so that a step's large tensors
    reuse pages instead of mapping fresh ones; glibc's defaults come back afterwards. Elsewhere: nothing."""
    libc = _libc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
