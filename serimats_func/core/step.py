"""The vmapped training step and evaluation: pure functions over stacked learner state.

One step, for every learner of a chunk at once: the interventions' hooks at each point of the table in
``hook_points`` (batch, buffers, activations in the forward pass, gradients after ``torch.func.grad``, this step's
hyperparameters, the optimizer's state), the optimizer's update, then the parameter hooks. The step number
enters as a tensor and windows are ``torch.where`` masks, so one function serves every learner and nothing
waits for the host. Learners that share a data order get the batch unbatched (``in_dims=None``), which is much
cheaper than one copy per learner. The state of N learners is a ``state.ChunkState``.

>>> import torch
>>> from serimats_func.models import MLP
>>> from serimats_func.core.learners import prepare_template, initial_model_state
>>> from serimats_func.optimizers import functional_twin
>>> from serimats_func.core.state import ChunkState
>>> from serimats_func.core import pytrees
>>> template = prepare_template(MLP(widths=(8,)), torch.zeros(4, 40))
>>> model = pytrees.stack([initial_model_state(template, k, 0) for k in range(3)])  # N = 3
>>> twin = functional_twin(torch.optim.SGD, lr=0.1)
>>> opt = pytrees.stack([twin.init(pytrees.index(model.params, i)) for i in range(3)])
>>> state = ChunkState(model.params, model.buffers, opt, pytrees.stack([twin.hparams(lr=0.1)] * 3),
...                    torch.full((3,), -1), {})
>>> step = make_train_step(template, twin, torch.nn.functional.cross_entropy, Hooks(), shared_batch=True)
>>> state, loss = step(state, torch.randn(4, 40), torch.arange(4), torch.tensor(0))
>>> loss.shape
torch.Size([3])
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from torch import nn
from torch.func import grad_and_value, vmap

from ..acceleration import convolutions
from ..interventions.base import Intervention, Numbers
from ..optimizers import FunctionalOptimizer
from ..optimizers.base import stacked_update
from . import keys, pytrees
from .hook_points import METHODS, POINT, STEP_METHODS
from .learners import forward
from .state import ChunkState, InterventionData, ModelState

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GRADIENT_POINTS = tuple(m for m in STEP_METHODS if m != "on_params")  # the points of the gradient pass, before the update


@dataclass(frozen=True)
class Hook:
    """One intervention class's function at one point of the step."""

    name: str  # the class's key in the chunk state's interventions
    owner: Intervention  # a variation of the class; each learner's hook sees its own view (``for_learner``)
    method: str  # the point, e.g. "on_gradients"
    windowed: bool
    stateful: bool
    module: str | None = None  # the submodule, for activation hooks

    def __call__(self, value: Any, n: Mapping[str, Any], ctx: StepContext) -> Any:
        if not _CHECK_IN_PLACE.get():
            return getattr(self.owner.for_learner(n), self.method)(value, Numbers(n), ctx)
        watched = [t for t in pytrees.leaves((value, n, ctx.state)) if isinstance(t, torch.Tensor)]
        before = [t._version for t in watched]
        out = getattr(self.owner.for_learner(n), self.method)(value, Numbers(n), ctx)
        self._check_output(value, out, ctx)
        if any(t._version != v for t, v in zip(watched, before, strict=True)):
            raise InPlaceHookError(
                f"{type(self.owner).__name__}.{self.method} changes what it receives in place (an in-place operation "
                "such as g.add_(x), w.mul_(s) or x[...] = v on its value, its numbers or its state). Outside its windows, "
                "and for learners at its defaults, the library keeps the value it received, which an in-place change has "
                "already changed: the hook would act at every step. Return new tensors instead (g + x, w * s, "
                "torch.where(mask, v, x)).")
        return out


    def _check_output(self, value: Any, out: Any, ctx: StepContext) -> None:
        """Refuse an output that is not the kind of value the hook received: the same structure (keys, fields),
        each tensor of the same dtype and shape, and for a class with ``init_state`` a pair (value, new state)."""
        where = f"{type(self.owner).__name__}.{self.method}"
        if self.stateful:
            if not (isinstance(out, tuple) and len(out) == 2 and not hasattr(out, "_fields")):
                raise HookOutputError(f"{where} must return a pair (new value, new state), since "
                                      f"{type(self.owner).__name__} defines init_state; got {_kind(out)}. Return "
                                      "(value, ctx.state) to keep the state as it is.")
            out, new_state = out
            _same_kind(f"{where}'s new state", ctx.state, new_state, "the state it received (ctx.state)")
        if isinstance(value, ModelState) and isinstance(out, Mapping) and not isinstance(out, ModelState):
            out = ModelState(**out) if set(out) == set(ModelState._fields) else out
        _same_kind(where, value, out, "its input")


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {', '.join(map(repr, list(value)[:6]))}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return repr(value) if value is None else f"a {type(value).__name__}"


def _same_kind(where: str, value: Any, out: Any, what: str) -> None:
    """Raise ``HookOutputError`` unless ``out`` has ``value``'s structure, dtypes and shapes."""
    try:
        paths, leaves, spec = optree.tree_flatten_with_path(value, none_is_leaf=pytrees.NONE_IS_LEAF)
        out_leaves = spec.flatten_up_to(out)
    except (ValueError, TypeError):
        raise HookOutputError(
            f"{where} returned {_kind(out)}, but received {_kind(value)}: a hook returns a value of the kind it "
            f"receives (the same keys or fields), e.g. {{k: g * n.scale for k, g in grads.items()}} for "
            "on_gradients.") from None
    for path, old, new in zip(paths, leaves, out_leaves, strict=True):
        if not isinstance(old, torch.Tensor):
            continue
        name = "".join(f"[{p!r}]" for p in path)
        if not isinstance(new, torch.Tensor):
            raise HookOutputError(f"{where} returned {_kind(new)} at {name or 'its value'}, where {what} is "
                                  f"{_kind(old)}: return a tensor of that dtype and shape.")
        if new.dtype != old.dtype or new.shape != old.shape:
            raise HookOutputError(
                f"{where} returned {_kind(new)} at {name or 'its value'}, where {what} is {_kind(old)}: a hook must "
                "keep each tensor's dtype and shape (the library stores and batches them as they came; another dtype "
                "would be cast, an int64 one truncated to whole numbers). Compute in the input's dtype (x * s rather "
                "than x.double() * s, .to(x.dtype) at the end), and keep the shape (no .sum() or .mean() of the value).")


class InPlaceHookError(ValueError):
    """A hook changed its input in place (found by the trial step, which runs hooks outside vmap)."""


class HookOutputError(ValueError):
    """A hook returned another kind of value than it received (found by the trial step, outside vmap)."""


_CHECK_IN_PLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("check_in_place", default=False)


@contextlib.contextmanager
def checking_in_place() -> Iterator[None]:
    """Within: every hook called on real tensors (outside vmap, where version counters count) is checked for
    changing its input in place (``InPlaceHookError``)."""
    token = _CHECK_IN_PLACE.set(True)
    try:
        yield
    finally:
        _CHECK_IN_PLACE.reset(token)


@dataclass(frozen=True)
class Hooks:
    """The hooks of a chunk's step: for each point of ``hook_points.POINTS``, in the order they run."""

    points: Mapping[str, tuple[Hook, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.points) - set(METHODS)
        if unknown:
            raise ValueError(f"no hook point {sorted(unknown)[0]!r}; the points are {', '.join(METHODS)}")

    def at(self, method: str) -> tuple[Hook, ...]:
        return tuple(self.points.get(method, ()))

    @property
    def in_step(self) -> tuple[Hook, ...]:
        """Every hook that runs in the training step."""
        return tuple(h for m, hs in self.points.items() if POINT[m].in_step for h in hs)

    @property
    def names(self) -> list[str]:
        """The classes with a hook anywhere, sorted."""
        return sorted({h.name for hs in self.points.values() for h in hs})


@dataclass
class StepContext:
    """What a hook sees besides its value and numbers: ``step`` (updates done before this step, int64),
    its class's ``key`` for this learner, its own ``state``, for activation hooks the ``call`` of the module
    within this forward pass, and for optimizer-state hooks the learner's ``params`` and
    ``new_optimizer_state()``, what a new optimizer would hold (as after ``optimizer.state.clear()``)."""

    step: torch.Tensor
    key: torch.Tensor
    state: Any = None
    call: int = 0
    params: Mapping[str, torch.Tensor] | None = None
    optimizer_init: Callable[[Mapping[str, torch.Tensor]], Any] | None = None

    def _key(self, stream: Sequence) -> torch.Tensor:
        k = self.key
        for part in stream:
            if not (isinstance(part, (str, int)) or (isinstance(part, torch.Tensor) and part.ndim == 0
                                                     and not part.is_floating_point() and not part.is_complex())):
                raise TypeError(f"ctx.normal / ctx.uniform name their random stream by strings, integers or integer "
                                f"tensors (such as ctx.step); got {part!r} ({type(part).__name__}). The arguments are "
                                "(shape, dtype, *stream): e.g. ctx.normal(g.shape, g.dtype, 'noise', ctx.step).")
            k = keys.fold_in(k, keys.string_key(part) if isinstance(part, str) else part)
        return k

    def normal(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, *stream: Any) -> torch.Tensor:
        """Standard Gaussian noise, a pure function of this learner's key and ``stream`` (strings, ints or
        int tensors such as ``ctx.step``): the same numbers alone or in any batch of learners."""
        return keys.normal(self._key(stream), tuple(shape), dtype)

    def uniform(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, *stream: Any) -> torch.Tensor:
        """Uniform numbers in [0, 1), as ``normal``."""
        return keys.uniform(self._key(stream), tuple(shape), dtype)

    def new_optimizer_state(self) -> Any:
        """The state a new optimizer holds for this learner's parameters (only in ``on_optimizer_state``)."""
        if self.optimizer_init is None or self.params is None:
            raise ValueError("ctx.new_optimizer_state() is only available in on_optimizer_state hooks.")
        return self.optimizer_init(self.params)


def in_windows(step: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Whether ``step`` lies in any window (start inclusive, end exclusive) of ``windows`` (K, 2)."""
    return ((windows[:, 0] <= step) & (step < windows[:, 1])).any()


def apply_hook(hook: Hook, value: Any, data: InterventionData, step: torch.Tensor, call: int = 0,
               **context: Any) -> tuple[Any, Any]:
    """Run one hook for one learner; where it does not act (an inactive learner, a step outside its
    windows) the result is discarded, so the value is bitwise what it was. Returns (value, its state)."""
    ctx = StepContext(step, data.key, data.state, call, **context)
    out = hook(value, data.n, ctx)
    new_state = data.state
    if hook.stateful:
        out, new_state = out
    if isinstance(value, ModelState) and isinstance(out, Mapping):
        out = ModelState(**out)
    on = data.active
    if hook.windowed:
        on = on & in_windows(step, data.windows)
    out = pytrees.tree_map(lambda new, old: torch.where(on, new, old), out, value)
    if hook.stateful:
        new_state = pytrees.tree_map(lambda new, old: torch.where(on, new, old), new_state, data.state)
    return out, new_state


def _with_state(inter: Mapping[str, InterventionData], name: str, new_state: Any) -> dict[str, InterventionData]:
    return {**inter, name: inter[name]._replace(state=new_state)}


def run_hooks(hooks: Sequence[Hook], value: Any, inter: Mapping[str, InterventionData], step: torch.Tensor,
              **context: Any) -> tuple[Any, dict[str, InterventionData]]:
    """The hooks of one point, one after another, for one learner; returns the value and the interventions' data
    with their new states."""
    inter = dict(inter)
    for hook in hooks:
        value, new_state = apply_hook(hook, value, inter[hook.name], step, **context)
        if hook.stateful:
            inter = _with_state(inter, hook.name, new_state)
    return value, inter


class ActivationPoints:
    """A copy of the template with forward hooks on the submodules that activation hooks name. Inside a
    step, ``current`` holds the learner's intervention data; outside (evaluation) the hooks do nothing."""

    def __init__(self, template: nn.Module, hooks: Sequence[Hook]):
        self.module = copy.deepcopy(template) if hooks else template
        self.current: tuple[dict, torch.Tensor] | None = None
        self.calls: dict[str, int] = {}
        self.updates: dict[str, Any] = {}
        for hook in hooks:
            self.module.get_submodule(hook.module).register_forward_hook(self._make(hook))

    def _make(self, hook: Hook) -> Callable:
        def on_output(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if self.current is None:
                return output
            inter, step = self.current
            call = self.calls[hook.name] = self.calls.get(hook.name, -1) + 1
            data = inter[hook.name]
            if hook.name in self.updates:
                data = data._replace(state=self.updates[hook.name])
            out, new_state = apply_hook(hook, output, data, step, call)
            if hook.stateful:
                self.updates[hook.name] = new_state
            return out

        return on_output

    def begin(self, inter: dict, step: torch.Tensor) -> None:
        self.current, self.calls, self.updates = (inter, step), {}, {}

    def end(self, inter: dict) -> dict:
        for name, new_state in self.updates.items():
            inter = _with_state(inter, name, new_state)
        self.current, self.updates = None, {}
        return inter


def make_train_step(template: nn.Module, twin: FunctionalOptimizer, loss_fn: LossFn, hooks: Hooks,
                    shared_batch: bool, trainable: Sequence[str] | None = None, layers: Mapping[str, str] | None = None,
                    autocast: Callable[[], AbstractContextManager] = nullcontext, per_learner: bool = False) -> Callable:
    """``step(state, x, y, t) -> (state, loss)`` over N learners: state leaves (N, ...); x (B, ...) if
    ``shared_batch`` else (N, B, ...); ``t`` the number of updates done (an int64 tensor); loss (N,).
    Only the ``trainable`` parameters (default: all) are differentiated and updated. ``layers`` names a
    batching strategy for convolutions (``convolutions.accelerate``); ``autocast()`` wraps the forward pass.
    With ``per_learner``, the forward and backward passes run for one learner after another instead of under
    vmap, on a CPU with images and 4-d weights in channels-last memory (faster for a few learners of a
    convolutional model on a CPU; plain matrix products instead of batched ones, so float32 numbers agree with
    the vmapped step to rounding, not bitwise).

    The forward and backward passes and the hooks run under ``vmap``; the optimizer's update, which is
    elementwise per learner, runs on the stacked tensors directly (``stacked_update``): the same arithmetic
    as vmapping it, without vmap's cost per operation."""
    points = ActivationPoints(convolutions.accelerate(template, layers) if layers else template,
                              hooks.at("on_activations"))
    model = points.module
    if model is not template:
        model.train()  # a copy for this step: always in training mode
    names = list(dict(template.named_parameters())) if trainable is None else list(trainable)
    optimizer_hooks = hooks.at("on_optimizer_state")
    # What the gradient pass reads and returns, known from the hooks: only that goes through vmap (each leaf in or
    # out costs vmap a wrapper and pytree work per step; with no hook there, hyperparameters, interventions and the
    # optimizer's state pass it by).
    gradient_hooks = [h for m in GRADIENT_POINTS for h in hooks.at(m)]
    reads_inter = bool(gradient_hooks)
    changes_inter = any(h.stateful for h in gradient_hooks)
    changes_hparams = bool(hooks.at("on_hyperparameters"))

    def inputs(state: ChunkState) -> ChunkState:  # the parts of the state the gradient pass reads
        return state._replace(opt=state.opt if optimizer_hooks else (), hparams=state.hparams if changes_hparams else (),
                              interventions=state.interventions if reads_inter else {}, diverged_at=())

    def gradients(state: ChunkState, x, y, t, differentiate=grad_and_value):  # one learner (``inputs`` of its state)
        inter = state.interventions
        (x, y), inter = run_hooks(hooks.at("on_batch"), (x, y), inter, t)
        start, inter = run_hooks(hooks.at("on_buffers"), state.buffers, inter, t)
        params = state.params
        train, frozen = {k: params[k] for k in names}, {k: v for k, v in params.items() if k not in names}

        def loss_of(p):
            b = {k: v.clone() for k, v in start.items()}  # updated in place by BatchNorm, dropout
            points.begin(inter, t)
            try:
                with autocast():
                    logits = forward(model, {**p, **frozen}, b, x)
            finally:
                hooked = points.end(inter)
            return loss_fn(logits.float() if logits.dtype == torch.bfloat16 else logits, y), (b, hooked)

        grads, (loss, (buffers, inter)) = differentiate(loss_of, has_aux=True)(train)
        grads, inter = run_hooks(hooks.at("on_gradients"), grads, inter, t)
        hparams, inter = run_hooks(hooks.at("on_hyperparameters"), state.hparams, inter, t)
        opt = ()  # unchanged: the stacked state is used as it is (no leaf: vmap returns no None)
        if optimizer_hooks:
            opt, inter = run_hooks(optimizer_hooks, state.opt, inter, t, params=train, optimizer_init=twin.init)
        return grads, loss, buffers, inter if changes_inter else {}, hparams, opt

    def after_update(params, inter, t):  # one learner
        return run_hooks(hooks.at("on_params"), params, inter, t)

    data_dim = None if shared_batch else 0
    vmapped_gradients = vmap(gradients, in_dims=(0, data_dim, data_dim, None))

    def looped_gradients(state: ChunkState, x, y, t):  # the learners one after another, with torch.autograd
        n = len(pytrees.leaves(state.params)[0])
        layout = _channels_last if x.device.type == "cpu" and x.ndim == (4 if shared_batch else 5) else _same
        x = layout(x) if shared_batch else x
        outs = []
        for i in range(n):
            one = pytrees.index(state, i)
            one = one._replace(params={k: layout(v) for k, v in one.params.items()})
            outs.append(gradients(one, x if shared_batch else layout(x[i]), y if shared_batch else y[i], t,
                                  differentiate=autograd_grad_and_value))
        return pytrees.stack(outs)

    vmapped_after_update = vmap(after_update, in_dims=(0, 0, None))

    def looped_after_update(params, inter, t):  # the learners one after another
        n = len(next(iter(params.values())))
        return pytrees.stack([after_update(pytrees.index(params, i), pytrees.index(inter, i), t) for i in range(n)])

    if per_learner:
        vmapped_gradients = looped_gradients  # noqa: F811
        vmapped_after_update = looped_after_update  # noqa: F811

    def step(state: ChunkState, x, y, t) -> tuple[ChunkState, torch.Tensor]:
        grads, loss, buffers, inter, hparams, opt = vmapped_gradients(inputs(state), x, y, t)  # (N, ...)
        inter = inter if changes_inter else state.interventions
        hparams = hparams if changes_hparams else state.hparams
        params = state.params
        train, opt = stacked_update(twin, grads, opt if optimizer_hooks else state.opt, {k: params[k] for k in names}, hparams)
        params = {k: train[k] if k in train else v for k, v in params.items()}
        if hooks.at("on_params"):
            params, inter = vmapped_after_update(params, inter, t)
        d = state.diverged_at  # (N,)
        diverged_at = torch.where((d < 0) & ~torch.isfinite(loss), t, d)
        new_state = state._replace(params=params, buffers=buffers, opt=opt, interventions=inter, diverged_at=diverged_at)
        return new_state, loss

    return step


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-d tensor in channels-last memory (oneDNN's fast layout for 2-d convolutions and pooling on CPUs, about
    15% faster for LeNet-5 per learner than NCHW); other tensors as they are. The same values."""
    return t.to(memory_format=torch.channels_last) if t.ndim == 4 else t  # restrides size-1 channels too


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def autograd_grad_and_value(fn: Callable, has_aux: bool = True) -> Callable:
    """``torch.func.grad_and_value(fn, has_aux=True)`` computed with ``torch.autograd.grad`` outside any torch.func
    transform: the same backward formulas, without functorch's wrapper around every tensor (cheaper for one
    learner at a time). Parameters that do not reach the loss get zero gradients, as with torch.func."""
    def run(params: dict) -> tuple[dict, tuple]:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            loss, aux = fn(leaves)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads, strict=True)}
        return grads, (loss.detach(), pytrees.tree_map(lambda t: t.detach(), aux))

    return run


def initial_hooks(hooks: Hooks, model: ModelState, inter: Mapping[str, InterventionData]
                  ) -> tuple[ModelState, dict[str, InterventionData]]:
    """Run the ``on_init`` hooks on stacked initial model states (N, ...); returns the new model states and the
    interventions' data (with their new states)."""
    if not hooks.at("on_init"):
        return model, dict(inter)

    def one_learner(model, inter):
        return run_hooks(hooks.at("on_init"), model, inter, torch.zeros((), dtype=torch.int64))

    return vmap(one_learner)(model, dict(inter))
