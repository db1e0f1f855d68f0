"""The intervention protocol: axes, variations, and pure functions at named points of a step.

An ``Intervention`` subclass declares its **axes** (names and default values) and implements one or
more **hooks**, pure functions that the library composes into the training step:

=====================  =====================================================  ===========================
hook                   called with                                            returns
=====================  =====================================================  ===========================
``on_init``            ``state`` = ``ModelState(params, buffers)`` of the     the new ``state``
                       new learner
``on_batch``           ``(x, y)`` of this step                                ``(x, y)``
``on_buffers``         ``buffers`` (name -> tensor) before the forward pass   the new ``buffers`` (kept)
``on_activations``     the output of the submodule named by axis ``module``   the new output
``on_gradients``       ``grads`` (name -> tensor) before the optimizer        the new ``grads``
``on_hyperparameters`` ``h`` (name -> float64 scalar) for this step           the new ``h``
``on_optimizer_state`` the optimizer's state before its update (a NamedTuple  the new state
                       named after torch.optim's keys: ``momentum_buffer``,
                       ``exp_avg``, ``exp_avg_sq``, ``step``...)
``on_params``          ``params`` after the optimizer's update                the new ``params``
=====================  =====================================================  ===========================

(The table lives in ``serimats_func.core.hook_points``.) Every hook also receives ``n``, the learner's own
numbers (its numeric axis values as tensors: ``n.scale``), and ``ctx``, with ``ctx.step`` (updates done
before this step, an int64 tensor), ``ctx.key`` (this class's random key for this learner) and
``ctx.normal(shape, dtype, stream)`` for noise; ``on_optimizer_state`` hooks also get ``ctx.params`` and
``ctx.new_optimizer_state()`` (what a new optimizer would hold). Hooks are written for one learner and
vmapped over all learners of a group: no Python branch on a tensor's value, no ``.item()``.

**Every hook sees its own learner's values.** Inside a hook, ``self`` is a view of the learner's own
variation: a numeric axis reads as the learner's tensor (``self.values["max_norm"]`` is ``n.max_norm``),
and every other axis (a string, a layer name, a class) is the same for all learners of the step, because
learners whose non-numeric values differ train in separate groups (as structural axes do). A class that turns
a non-numeric axis into numbers itself (``numbers()``) lists it in ``per_learner_axes`` so that it does not
split groups. A class that keeps its own per-learner state defines
``init_state(params, n) -> pytree``; its hooks then read ``ctx.state`` and return
``(value, new_state)``.

Every class with a step hook (all but ``on_init``) gets a ``when=`` axis: step windows
``(start, end)``, start inclusive, end exclusive, in which it acts; outside them the hook's result is
discarded with ``torch.where``, so the value is bitwise the one it would have without the class.
The default (``None``) is every step. A variation at all its defaults must change nothing: it names
no intervention and is left out of learner ids.

>>> import torch
>>> class ClipGradients(Intervention):
...     axes = {"max_norm": float("inf")}
...     def on_gradients(self, grads, n, ctx):
...         norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
...         scale = torch.clamp(n.max_norm / (norm + 1e-6), max=1.0)
...         return {k: g * scale for k, g in grads.items()}
>>> vs = ClipGradients.make_variations(max_norm=(1.0, 10.0), when=((0, 100), (500, 600)))
>>> len(vs), vs[1].values
(4, {'max_norm': 1.0, 'when': ((500, 600),)})
>>> vs[1].label("when")
'500-600'
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from ..core import labels
from ..core.hook_points import METHODS as HOOKS
from ..core.hook_points import STEP_METHODS as STEP_HOOKS
from ..core.hook_points import implemented

FOREVER = 2**62  # the end of an open window


class Numbers(dict):
    """A learner's numbers, with attribute access: ``n.epsilon`` is ``n["epsilon"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"this intervention has no number {name!r}; it has: {', '.join(self)}") from None


class LearnerValues(dict):
    """``self.values`` inside a hook: the learner's own numbers where it has them, shared values for the axes
    the step's group shares; other axes raise, since their Python value would be another learner's."""

    def __init__(self, owner: str, values: Mapping[str, Any], n: Mapping[str, Any], shared: set[str]):
        super().__init__({k: n[k] for k in values if k in n})
        self.update({k: values[k] for k in values if k in shared and k not in n})
        self._owner, self._axes = owner, tuple(values)

    def __missing__(self, key: str) -> Any:
        if key in self._axes:
            raise KeyError(f"{self._owner}: inside a hook, the axis {key!r} cannot be read from self.values: it "
                           f"differs between the learners of one step. Read the learner's own number from n "
                           f"(n.{key}), adding it in numbers() if needed.")
        raise KeyError(key)


class Derived:
    """An axis given as a function of the learner's base value, e.g. the seed's
    ``momentum=lambda m: (m * (1 + e) for e in (0.001, -0.001))``: one variation per value it yields."""

    def __init__(self, fn: Callable, axis: str, tuple_valued: bool = False):
        self.fn, self.axis, self.tuple_valued = fn, axis, tuple_valued

    def values(self, base: Any, owner: str) -> list:
        try:
            out = self.fn(base)
            single = isinstance(out, str) or not isinstance(out, Iterable) or (
                self.tuple_valued and isinstance(out, tuple) and not any(isinstance(v, (tuple, list)) for v in out))
            values = [_plain(v) for v in ([out] if single else out)]
        except Exception as error:
            raise ValueError(f"{owner}: the function given for {self.axis!r} failed on the base value {base!r}: "
                             f"{type(error).__name__}: {error}") from error
        if not values:
            raise ValueError(f"{owner}: the function given for {self.axis!r} yielded no value for base {base!r}.")
        return values

    def __repr__(self) -> str:
        return f"<function of the base {self.axis}>"


class Variations(list):
    """The variations made by one ``make_variations`` call (a list of interventions)."""

    def __init__(self, cls: type[Intervention], items: Iterable[Intervention], given: tuple[str, ...]):
        super().__init__(items)
        self.cls = cls
        self.given = given


class Intervention:
    """Base class of every intervention; see the module docstring for the protocol.

    Class attributes a subclass may set:
        axes: ``{axis: default}``; the defaults must change nothing.
        prefix: coordinate prefix when two classes share an axis name (``init_seed``).
        structural: axes whose values change the step's structure (their learners form groups).
        streams: ``{stream: axis}``: library random streams this class seeds ("init", "data").
        derived_axes: axes that may be a function of the learner's base value.
        order: hooks at one point run by (order, class name).
    """

    axes: ClassVar[dict[str, Any]] = {}
    prefix: ClassVar[str] = ""
    structural: ClassVar[frozenset[str]] = frozenset()
    tuple_axes: ClassVar[frozenset[str]] = frozenset()  # axes whose single value is a tuple
    aliases: ClassVar[dict[str, str]] = {}
    streams: ClassVar[dict[str, str]] = {}
    derived_axes: ClassVar[frozenset[str]] = frozenset()
    order: ClassVar[int] = 0
    per_learner_axes: ClassVar[frozenset[str]] = frozenset()  # non-numeric axes that numbers() turns into tensors
    windowed: ClassVar[bool] = False  # set for classes with step hooks: they take when=
    builtin: ClassVar[bool] = False  # library classes: named by class name in ids, not by code

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "defaults" in vars(cls) and "axes" not in vars(cls):
            cls.axes = dict(vars(cls)["defaults"])  # the older name
        cls.builtin = vars(cls).get("builtin", False)
        step_hooks = [h for h in implemented(cls) if h in STEP_HOOKS]
        if "windowed" not in vars(cls):
            cls.windowed = bool(step_hooks)
        if cls.windowed and "when" not in cls.axes:
            cls.axes = {**cls.axes, "when": None}
            cls.tuple_axes = cls.tuple_axes | {"when"}

    # -- making variations -------------------------------------------------------------------------------

    def __init__(self, control: bool = False, **values: Any):
        self._check_implements_something()
        values = {self.aliases.get(k, k): v for k, v in values.items()}
        unknown = [k for k in values if k not in self.axes]
        if unknown:
            raise ValueError(f"{type(self).__name__} has no axis {unknown[0]!r}; its axes are: {', '.join(self.axes)}.")
        self.given = tuple(values)
        self.control = bool(control)
        checked = {}
        for k, v in values.items():
            v = v if isinstance(v, Derived) else _plain(v)
            if isinstance(v, Derived) or (callable(v) and k in self.derived_axes and not isinstance(v, type)):
                checked[k] = v if isinstance(v, Derived) else Derived(v, k, k in self.tuple_axes)
            elif k == "when":
                checked[k] = _windows(v, type(self).__name__)
            else:
                checked[k] = _checked_value(type(self), k, v, self._check)
        self.values = {**self.axes, **checked}
        self.derived: dict[str, tuple[int, Any, Any]] = {}  # axis -> (index, base value, value) once resolved

    @classmethod
    def _check_implements_something(cls) -> None:
        if not any(callable(getattr(cls, h, None)) for h in HOOKS + ("on_setup",)) and not cls.streams:
            raise TypeError(
                f"{cls.__name__} implements no hook, so it would multiply the grid without changing any learner. "
                f"Define at least one of {', '.join(HOOKS)} (e.g. `def on_gradients(self, grads, n, ctx): ...`); "
                "see serimats_func.interventions.Intervention."
            )

    def _check(self, axis: str, value: Any) -> Any:
        """Validate one axis value (subclasses refuse bad values here, with a message)."""
        return value

    @classmethod
    def make_variations(cls, control: bool = False, **axes: Any) -> Variations:
        """The product of the given axes: one variation per combination of their values."""
        cls._check_implements_something()
        axes = {cls.aliases.get(k, k): v for k, v in axes.items()}
        names = tuple(axes)
        value_lists = [cls._values_of(name, value) for name, value in axes.items()]
        items = [cls(control=control, **dict(zip(names, combo, strict=True))) for combo in itertools.product(*value_lists)]
        return Variations(cls, items, names)

    @classmethod
    def _values_of(cls, name: str, value: Any) -> list:
        if name in cls.derived_axes and callable(value) and not isinstance(value, type):
            return [Derived(value, name, name in cls.tuple_axes)]
        if isinstance(value, (np.ndarray, torch.Tensor)):
            value = _plain(value) if value.ndim == 0 else list(value)
        if name == "when":
            if isinstance(value, (str, bytes)):
                raise ValueError(f"{cls.__name__} when= takes step windows (start, end) as tuples of integers, e.g. "
                                 f"when=(0, 10) or when=((0, 10), (50, None)); got the string {value!r}.")
            single = value is None or _looks_like_window(value)
        else:
            single = isinstance(value, (str, bytes, type, numbers.Number)) or value is None or (
                name in cls.tuple_axes and isinstance(value, tuple) and not any(isinstance(v, (tuple, list)) for v in value)
            ) or (  # a list of numbers for a tuple axis is one value: betas=[0.9, 0.99]
                name in cls.tuple_axes and isinstance(value, list) and value and all(isinstance(v, numbers.Number) for v in value)
            )
        values = [value] if single else list(value) if isinstance(value, Iterable) else [value]
        if not values:
            raise ValueError(f"{cls.__name__}.make_variations: axis {name!r} is empty; give it at least one value.")
        plain = [_plain(v) for v in values]
        seen = _repeated(plain)
        if seen:
            raise ValueError(f"{cls.__name__}.make_variations: axis {name!r} repeats the value {seen[0]!r}; "
                             "give each value once.")
        return values

    # -- resolving against the learner's setup -------------------------------------------------------------

    def base_value(self, axis: str, setup: Any) -> Any:
        """The learner's base value of a derived axis (e.g. its optimizer's momentum)."""
        raise NotImplementedError(f"{type(self).__name__} cannot derive {axis!r} from a base value.")

    def resolve(self, setup: Any) -> list[Intervention]:
        """Concrete variations for one learner: a derived axis becomes one variation per value."""
        derived = [a for a, v in self.values.items() if isinstance(v, Derived)]
        if not derived:
            return [self._checked_against(setup)]
        bases = {a: self.base_value(a, setup) for a in derived}
        options = [list(enumerate(self.values[a].values(bases[a], type(self).__name__))) for a in derived]
        out = []
        for combo in itertools.product(*options):
            v = copy.copy(self)
            v.values = dict(self.values)
            v.derived = {}
            for axis, (i, value) in zip(derived, combo, strict=True):
                v.values[axis] = v._check(axis, value)
                v.derived[axis] = (i, bases[axis], v.values[axis])
            out.append(v._checked_against(setup))
        return out

    def _checked_against(self, setup: Any) -> Intervention:
        self.check(setup)
        return self

    def check(self, setup: Any) -> None:
        """Refuse values that make no sense for this learner's setup (dtype, optimizer...)."""

    # -- what the step sees ----------------------------------------------------------------------------------

    def numbers(self, setup: Any) -> dict[str, Any]:
        """This learner's numbers for the hooks: numeric axes (and tuples of numbers); structural axes,
        seeds of streams and ``when`` are left out (the library passes windows itself)."""
        skip = self.structural | set(self.streams.values()) | {"when"}
        return {k: v for k, v in self.values.items() if k not in skip and _numeric(v)}

    def windows(self) -> tuple[tuple[int, int], ...]:
        """The step windows in which the step hooks act."""
        when = self.values.get("when")
        return ((0, FOREVER),) if when is None else tuple((s, FOREVER if e is None else e) for s, e in when)

    def beyond_run(self, total_steps: int) -> str | None:
        """What of this variation lies past a run of ``total_steps`` updates, so that it would never act (a step
        window that starts at or after the last step), said for a message; None when nothing does."""
        if self.is_default():
            return None
        late = [w for w in self.windows() if w[0] >= total_steps]
        if not late:
            return None
        start, end = late[0]
        return f"acts in the step window ({start}, {None if end >= FOREVER else end}), which starts at step {start}"

    def is_default(self) -> bool:
        """Whether this variation changes nothing: every axis at its default, not counting ``when``
        and structural axes (a window of no change is no change)."""
        skip = self.structural | {"when"}
        return all(_same(self.values[k], d) for k, d in self.axes.items() if k not in skip)

    def active_in_step(self) -> bool:
        """Whether the step hooks can change anything for this learner (else a chunk whose learners are
        all inactive leaves them out of its step)."""
        return not self.is_default()

    def first_active_step(self) -> int:
        """The number of updates before this variation first changes anything: the learner's states after 0..s
        updates (and the batches of its first s updates) are those of the same learner without it. Learners that
        share everything up to a step train that prefix once and fork from it (``Experiment(fork=True)``).
        Default 0 (it may act from the start, its ``on_init`` included): a class of yours stays correct unless it
        says more. A windowed class whose only hooks are step hooks may return ``self.window_start()``."""
        return 0

    def window_start(self) -> int:
        """The first step of its windows (``when=``; 0 when it acts every step)."""
        return min(start for start, _ in self.windows())

    def identity(self) -> dict[str, Any] | None:
        """The values that name this variation in a learner's id, or None when it changes nothing."""
        if self.is_default():
            return None
        return {k: _json(v) for k, v in self.values.items()}

    def structure(self) -> tuple:
        """What learners must share to train in one vmapped step: the structural axes and, for a class with
        hooks, every value a hook could read that is not one of the learner's numbers (see ``group_axes``)."""
        out = tuple((k, _json_key(self.values[k])) for k in sorted(self.structural | set(self.group_axes())))
        attributes = self._own_attributes()
        return out + ((("attributes", repr(sorted(attributes.items()))),) if attributes else ())

    def group_axes(self) -> tuple[str, ...]:
        """The axes that every learner of one step shares, for a class with hooks: those whose values are not
        numbers (strings, names, classes, None), apart from ``when``, seeds of streams and ``per_learner_axes``."""
        if not implemented(type(self)):
            return ()
        skip = set(self.streams.values()) | set(self.per_learner_axes) | {"when"}
        return tuple(k for k, v in self.values.items() if k not in skip and not _numeric(v))

    def _own_attributes(self) -> dict[str, Any]:
        """Attributes a subclass set on its instances (beyond the protocol's), which its hooks could read:
        learners that differ in them train apart."""
        if not implemented(type(self)):
            return {}
        return {k: v for k, v in vars(self).items() if k not in _PROTOCOL_ATTRIBUTES and not k.startswith("_")}

    def for_learner(self, n: Mapping[str, Any]) -> Intervention:
        """This variation as one learner's hooks see it: numeric axes read as the learner's own numbers ``n``
        (tensors under vmap); axes shared by the step's group keep their values; any other axis (a seed, a
        value ``numbers()`` turned into tensors) cannot be read from ``self`` (read it from ``n``)."""
        view = copy.copy(self)
        view.values = LearnerValues(type(self).__name__, {k: v for k, v in self.values.items()}, n,
                                    shared=set(self.group_axes()) | set(self.structural))
        return view

    def label(self, axis: str) -> Any:
        """The coordinate label of ``axis`` in results."""
        value = self.values[axis]
        if axis == "when":
            return "always" if value is None else "+".join(f"{s}-{'' if e is None else e}" for s, e in value)
        if axis in self.derived:
            return self.derived[axis][0]
        if isinstance(value, type):
            return value.__name__
        return labels.label(value) if isinstance(value, (tuple, list)) else value

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items() if not _same(v, self.axes.get(k)) or k in self.given)
        return f"{type(self).__name__}({args}{', control=True' if self.control else ''})"


_PROTOCOL_ATTRIBUTES = frozenset({"values", "given", "control", "derived"})


def _numeric(value: Any) -> bool:
    if isinstance(value, (bool, numbers.Real)):
        return True
    return isinstance(value, tuple) and len(value) > 0 and all(isinstance(v, (bool, numbers.Real)) for v in value)


def _same(a: Any, b: Any) -> bool:
    """Equal values (1 == 1.0, NaN == NaN), but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _repeated(values: list) -> list:
    """The values equal (as ``_same`` says) to an earlier one; linear in the number of values when they are
    numbers or strings (``seed=range(10_000)``), quadratic otherwise."""
    def key(v: Any) -> Any:
        if isinstance(v, bool):
            return ("bool", v)
        if isinstance(v, numbers.Real):
            return ("nan",) if math.isnan(v) else ("real", v)
        if isinstance(v, (str, bytes)):
            return (type(v).__name__, v)
        return None

    keys = [key(v) for v in values]
    if all(k is not None for k in keys):
        seen: set = set()
        repeated = []
        for v, k in zip(values, keys, strict=True):
            if k in seen:
                repeated.append(v)
            seen.add(k)
        return repeated
    return [v for i, v in enumerate(values) if any(_same(v, w) for w in values[:i])]


def _json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int)):
        return float(value)
    return value


def _json_key(value: Any) -> Any:
    v = _json(value)
    return tuple(_json_key(x) for x in v) if isinstance(v, list) else v


def _plain(value: Any) -> Any:
    """NumPy and 0-d torch numbers as Python numbers (float32 ones by their shortest repr, so that
    ``np.float32(0.001)`` labels as 0.001); lists as tuples."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.numpy()[()] if value.dtype != torch.bfloat16 else value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.floating):
        return float(np.format_float_positional(value, unique=True, trim="-"))
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _checked_value(cls: type, axis: str, value: Any, check: Callable[[str, Any], Any]) -> Any:
    """One axis value through the class's own ``_check``; for a class that checks nothing itself (a user's), a
    value of another kind than the axis's default (a string where the default is a number) is refused, and so is
    a NaN, which equals no other value of its axis and would make its learners' numbers NaN."""
    if cls._check is not Intervention._check:
        return check(axis, value)
    default = cls.axes.get(axis)
    if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{cls.__name__} {axis} takes True or False (its default is {default!r}); got {value!r}.")
    if isinstance(default, numbers.Real) and not isinstance(default, bool) and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ValueError(f"{cls.__name__} {axis} takes numbers (its default is {default!r}); got {value!r} "
                         f"({type(value).__name__}). Give numbers, e.g. {axis}=(0.5, 2.0).")
    value = check(axis, value)
    if _has_nan(value):
        raise ValueError(f"{cls.__name__} {axis}={value!r} holds NaN, which would make its learners' numbers NaN and "
                         "equals no value (not even itself) in results; give finite numbers.")
    return value


def _has_nan(value: Any) -> bool:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return math.isnan(value)
    return isinstance(value, tuple) and any(_has_nan(v) for v in value)


def _looks_like_window(value: Any) -> bool:
    """A pair of numbers (or None): one window, even if it is a bad one, refused whole with its message."""
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(
        v is None or (isinstance(v, numbers.Number) and not isinstance(v, (tuple, list))) for v in value)


def _is_window(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], numbers.Integral) and (
        value[1] is None or isinstance(value[1], numbers.Integral))


def _windows(value: Any, owner: str) -> tuple[tuple[int, int | None], ...] | None:
    """``None``, one window ``(start, end)`` or several ``((s1, e1), (s2, e2))`` as a sorted tuple of windows."""
    if value is None:
        return None
    def flat(v: Any) -> list:
        if _is_window(v) or _looks_like_window(v) or not isinstance(v, (tuple, list)):
            return [v]
        return [w for item in v for w in flat(item)]

    windows = flat(value)
    out = []
    for w in windows:
        w = _plain(w)
        if not _is_window(w) or isinstance(w[0], bool) or isinstance(w[1], bool) or w[0] < 0 or (
                w[1] is not None and w[1] <= w[0]):
            raise ValueError(f"{owner} when= takes step windows (start, end) with 0 <= start < end (integers; end "
                             f"exclusive, None for open), or a tuple of them; got {value!r}"
                             f"{'' if w == value else f', whose window {w!r} is not one'}.")
        out.append((int(w[0]), None if w[1] is None else int(w[1])))
    return tuple(sorted(out, key=lambda w: (w[0], FOREVER if w[1] is None else w[1])))
