"""The grid: from interventions to learners, their ids, keys, coordinates and controls.

Variations of one intervention class are concatenated; classes multiply. A class the experiment does not
mention changes nothing: its random stream keeps seed 0, its setup is the experiment's. A learner's id is a
hash of what decides its numbers: the experiment seed, its setup (model, data, batch size, loss, dtype),
its optimizer's resolved hyperparameters, and the interventions that change something (a variation at
its defaults is left out, so adding a class never renames a stored learner).

Coordinates: one per axis that any ``make_variations`` call named. An axis with several values is a
dimension of the result, one with a single value a scalar coordinate. The name is the axis name
(``epsilon``, ``lr``, ``seed``), unless two classes of the experiment name the same axis: then both take
their class prefix (``init_seed``, ``perturb_seed``, ``data_seed``). An axis given as a function of the
learner's base value is labelled by the relative change it makes (``momentum_change``: 0.001, -0.001),
else by the difference (``momentum_delta``), else by the position of the value (``momentum_variant``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.data import DataStream
from ..core.keys import derive_key
from ..interventions.base import Derived, Intervention, Variations
from .identity import describe_class, digest
from .setup import Setup

FORMAT_VERSION = 2
DEFAULT_STREAMS = {"init": 0, "data": 0}
DERIVED = "<derived>"  # marks the coordinate of an axis given as a function, until it is labelled


@dataclass(frozen=True, eq=False)
class LearnerSpec:
    """Everything that makes one learner."""

    id: str
    coords: dict[str, Any]
    control: bool  # is it a control (every class with control variations takes one)
    config: dict[str, Any]  # JSON-able, written to the store
    setup: Setup
    interventions: tuple[Intervention, ...]  # resolved variations, one per class of the experiment
    seeds: dict[str, int]  # stream -> seed ("init", "data")
    keys: dict[str, int]  # stream -> key ("init", "data", "dropout"); class name -> the class's key
    structure: tuple  # learners with equal structures share one vmapped step
    control_id: str | None = None  # the id of its control, when the experiment has controls
    data_from: tuple[int, int] | None = None  # (base key, step): the base data order up to that step (DataOrder(at=))
    prefixes: tuple[tuple[int, LearnerSpec], ...] = ()  # (s, the learner without what acts from s on), s increasing
    prefix: bool = False  # a learner that only exists as the shared prefix of grid learners (not in the grid)

    @property
    def init_key(self) -> int:
        return self.keys["init"]

    @property
    def data_key(self) -> int:
        return self.keys["data"]

    @property
    def data_stream(self) -> DataStream:
        """Its data order: its own key, from the base key's order after ``data_from[1]`` updates if set."""
        if self.data_from is None:
            return DataStream(self.keys["data"])
        return DataStream(self.keys["data"], *self.data_from)

    @property
    def dropout_key(self) -> int:
        return self.keys["dropout"]


@dataclass
class Grid:
    dims: dict[str, list]  # dimension name -> labels, in order of first appearance
    scalars: dict[str, Any]  # named axes that take one value
    cells: list[tuple[tuple[int, ...], LearnerSpec]] = field(default_factory=list)

    @property
    def learners(self) -> list[LearnerSpec]:
        """Distinct learners, in grid order."""
        unique: dict[str, LearnerSpec] = {}
        for _, spec in self.cells:
            unique.setdefault(spec.id, spec)
        return list(unique.values())

    @property
    def has_controls(self) -> bool:
        return any(spec.control_id is not None for _, spec in self.cells)


@dataclass
class _ClassGroup:
    cls: type
    items: list[Intervention]
    given: tuple[str, ...]


def _flatten(interventions: Iterable) -> list[_ClassGroup]:
    """Group the given variations by class, in order of first appearance."""
    by_class: dict[type, _ClassGroup] = {}

    def add(cls: type, items: list, given: tuple) -> None:
        group = by_class.setdefault(cls, _ClassGroup(cls, [], ()))
        group.items.extend(items)
        group.given = tuple(dict.fromkeys(group.given + tuple(given)))

    for item in interventions:
        if isinstance(item, Variations):
            if not len(item):
                raise ValueError(f"{item.cls.__name__}.make_variations gave no variations.")
            add(item.cls, list(item), item.given)
        elif isinstance(item, Intervention):
            add(type(item), [item], item.given)
        elif isinstance(item, (list, tuple)):
            for sub in _flatten(item):
                add(sub.cls, sub.items, sub.given)
        elif isinstance(item, type) and issubclass(item, Intervention):
            raise TypeError(f"interventions= got the class {item.__name__}; give variations: "
                            f"{item.__name__}.make_variations(...) or {item.__name__}(...).")
        else:
            raise TypeError(f"interventions must be made by make_variations(...) or be Intervention instances; "
                            f"got {type(item).__name__}.")
    groups = list(by_class.values())
    _refuse_shared_streams(groups)
    _refuse_shared_names(groups)
    return groups


def _refuse_shared_streams(groups: list[_ClassGroup]) -> None:
    seeded: dict[str, type] = {}
    for g in groups:
        for stream in g.cls.streams:
            if stream in seeded:
                raise ValueError(f"{g.cls.__name__} and {seeded[stream].__name__} both seed the {stream!r} random stream, "
                                 "so one would silently override the other; use one of them.")
            seeded[stream] = g.cls


def _refuse_shared_names(groups: list[_ClassGroup]) -> None:
    named: dict[str, type] = {}
    for g in groups:
        if class_name(g.cls) in (*DEFAULT_STREAMS, "dropout"):
            raise ValueError(f"An intervention class must not be named {class_name(g.cls)!r}, the name of a random "
                             "stream of every learner; rename it.")
        other = named.setdefault(class_name(g.cls), g.cls)
        if other is not g.cls:
            raise ValueError(f"Two intervention classes of the experiment are named {class_name(g.cls)!r} (from "
                             f"{other.__module__} and {g.cls.__module__}); ids and random keys name a class by its name, "
                             "so rename one of them.")


def _coordinate_names(groups: list[_ClassGroup]) -> dict[tuple[type, str], str]:
    """An axis keeps its name unless another class names the same axis; an axis given as a function of a
    base value is named apart (it becomes ``momentum_change``, not ``momentum``)."""
    def derived(g: _ClassGroup, axis: str) -> bool:
        return any(isinstance(v.values.get(axis), Derived) for v in g.items)

    named = [(g, axis, derived(g, axis)) for g in groups for axis in g.given]
    counts: dict[tuple[str, bool], int] = {}
    for _, axis, d in named:
        counts[(axis, d)] = counts.get((axis, d), 0) + 1
    names = {}
    for g, axis, d in named:
        name = axis if counts[(axis, d)] == 1 else f"{g.cls.prefix or g.cls.__name__.lower()}_{axis}"
        names[(g.cls, axis)] = name + DERIVED if d else name
    return names


def class_name(cls: type) -> str:
    """How a class is named in ids, random keys and hook order: built-ins by name, user classes by qualified
    name without their module (``__main__`` when a script runs, ``sweep`` when it is imported), so that the
    same code gives the same ids and numbers however it is reached; the id holds the class's code too."""
    return cls.__name__ if cls.builtin else cls.__qualname__


def build_grid(interventions: Sequence, base: Setup, seed: int) -> Grid:
    """All learners of an experiment, with their place in the result's dimensions."""
    groups = _flatten(interventions)
    names = _coordinate_names(groups)
    codes = {g.cls: digest(describe_class(g.cls)) for g in groups if not g.cls.builtin}
    controls = [[i for i, v in enumerate(g.items) if v.control] for g in groups]

    built: dict[tuple, tuple[dict, LearnerSpec, dict]] = {}  # (item indices, expansion indices) -> ...
    for combo in itertools.product(*(range(len(g.items)) for g in groups)):
        variations = [g.items[i] for g, i in zip(groups, combo, strict=True)]
        setup = base.copy()
        for v in sorted(variations, key=lambda v: v.order):
            if hasattr(v, "on_setup"):
                v.on_setup(setup)
        seeds = dict(DEFAULT_STREAMS)
        for v in variations:
            seeds.update({stream: v.values[axis] for stream, axis in v.streams.items()})
        expansions = [v.resolve(setup) for v in variations]
        for expansion in itertools.product(*(list(enumerate(e)) for e in expansions)):
            resolved = tuple(v for _, v in expansion)
            spec, derived = _learner(groups, names, codes, resolved, setup, seeds, seed)
            object.__setattr__(spec, "prefixes", _prefixes(groups, names, codes, resolved, setup, seed, spec.id))
            built[(combo, tuple(i for i, _ in expansion))] = (spec.coords, spec, derived)
    _label_derived(built, groups, names)
    specs = _with_controls(built, groups, controls)
    for spec in specs:  # a prefix records the metrics its learner would: against the learner's control
        for _, twin in spec.prefixes:
            object.__setattr__(twin, "control_id", spec.control_id)
    return _place([(spec.coords, spec) for spec in specs])


def _removed(v: Intervention) -> Intervention:
    """``v`` at its defaults: the same class, changing nothing (its hooks, if in a step, act nowhere)."""
    out = copy.copy(v)
    out.values = dict(type(v).axes)
    out.derived = {}
    return out


def _prefixes(groups, names, codes, resolved, setup: Setup, seed: int,
              own_id: str) -> tuple[tuple[int, LearnerSpec], ...]:
    """For each step s > 0 at which one of the learner's interventions starts acting: the learner without the
    interventions that act from s on (same setup), which it equals up to s; each with its own shorter prefixes."""
    steps = sorted({v.first_active_step() for v in resolved if not v.is_default()} - {0})
    out: list[tuple[int, LearnerSpec]] = []
    for s in steps:
        kept = tuple(_removed(v) if not v.is_default() and v.first_active_step() >= s else v for v in resolved)
        seeds = dict(DEFAULT_STREAMS)
        for v in kept:
            seeds.update({stream: v.values[axis] for stream, axis in v.streams.items()})
        twin, _ = _learner(groups, names, codes, kept, setup, seeds, seed)
        if twin.id == own_id:  # what acts from s on changes nothing (a value equal to the optimizer's own)
            continue
        object.__setattr__(twin, "prefixes", tuple(out))
        object.__setattr__(twin, "prefix", True)
        twin.config["coords"] = {}
        twin.config["prefix"] = True
        out.append((s, twin))
    return tuple(out)


def _learner(groups, names, codes, resolved, setup: Setup, seeds: dict, seed: int) -> tuple[LearnerSpec, dict]:
    interventions = {}
    for v in resolved:
        identity = v.identity()
        if identity is not None:
            cls = type(v)
            interventions[class_name(cls)] = identity if cls.builtin else {"values": identity, "code": codes[cls]}
    identity = {
        "format": FORMAT_VERSION,
        "seed": seed,
        "setup": setup.digest(),
        "optimizer": setup.optimizer_identity(),
        "interventions": interventions,
    }
    learner_id = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=8).hexdigest()
    coords, derived = {}, {}
    for g, v in zip(groups, resolved, strict=True):
        for axis in g.given:
            name = names[(g.cls, axis)]
            coords[name] = v.label(axis)
            if axis in v.derived:
                derived[name] = v.derived[axis]
            elif name.endswith(DERIVED):  # a value given as it is, on an axis that other variations derive
                derived[name] = (None, _base_value(v, axis, setup), v.values[axis])
    keys = {stream: derive_key(seed, stream, value) for stream, value in seeds.items()}
    data_at = max((v.first_active_step() for v in resolved if "data" in v.streams and not v.is_default()), default=0)
    data_from = (derive_key(seed, "data", DEFAULT_STREAMS["data"]), data_at) if data_at > 0 else None
    dropout_data = seeds["data"] if data_from is None else DEFAULT_STREAMS["data"]  # a late order keeps the masks
    keys["dropout"] = derive_key(seed, "dropout", seeds["init"], dropout_data)
    for v in resolved:
        keys[class_name(type(v))] = derive_key(seed, class_name(type(v)), v.values.get("seed", 0))
    structure = (setup.group_key(),) + tuple(s for v in resolved if (s := v.structure()))
    spec = LearnerSpec(
        id=learner_id,
        coords=coords,
        control=False,
        config={**identity, "coords": {k: _json_label(v) for k, v in coords.items()},
                "model": setup.model_label, "dataset": setup.data.label, "batch_size": setup.batch_size},
        setup=setup,
        interventions=resolved,
        seeds=seeds,
        keys=keys,
        structure=structure,
        data_from=data_from,
    )
    return spec, derived


def _json_label(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _base_value(v: Intervention, axis: str, setup: Setup) -> Any:
    """The learner's base value of ``axis`` for labelling a value given as it is (None where it has none)."""
    if v.values[axis] is None:
        return None
    try:
        return v.base_value(axis, setup)
    except (NotImplementedError, ValueError, KeyError):
        return None


def _label_derived(built: dict, groups: list[_ClassGroup], names: dict) -> None:
    """Relabel axes given as functions of a base value: by relative change, else difference, else position. A value
    given as it is on such an axis (another ``make_variations`` of the class gave a number) is labelled by the same
    measure against the learner's base value (``lr=0.05`` beside ``lr=lambda v: v * 2`` on a base of 0.1: change
    -0.5), or by the value itself when the labels are positions; a variation without the axis is labelled None."""
    axes = {name for _, _, derived in built.values() for name in derived}
    for name in axes:
        entries = [(coords, derived[name]) for coords, _, derived in built.values() if name in derived]
        kind, labels = _derived_labels([value for _, value in entries if value[0] is not None])
        new_name = f"{name.removesuffix(DERIVED)}_{kind}"
        for coords, (i, base, value) in entries:
            _rename(coords, name, new_name, labels[i] if i is not None else _given_label(kind, base, value))
        for _, spec, _ in built.values():
            if name in spec.config["coords"]:
                _rename(spec.config["coords"], name, new_name, _json_label(spec.coords[new_name]))


def _given_label(kind: str, base: Any, value: Any) -> Any:
    """The label of a value given as it is on a derived axis labelled by ``kind``."""
    if value is None:
        return None
    fn = {"change": _relative, "delta": _difference}.get(kind)
    try:
        return value if fn is None or base is None else _round(fn(base, value))
    except (TypeError, ValueError, ZeroDivisionError):
        return value


def _derived_labels(values: list[tuple[int, Any, Any]]) -> tuple[str, dict[int, Any]]:
    """For (index, base, value) triples: the first labelling that gives each index one label, distinct across
    indices: the relative change, the difference, else the index itself."""
    if not values:  # no variation derives it here (every learner's came as a number)
        return "change", {}
    for kind, fn in (("change", _relative), ("delta", _difference)):
        labels: dict[int, Any] = {}
        try:
            consistent = all(labels.setdefault(i, _round(fn(base, v))) == _round(fn(base, v)) for i, base, v in values)
        except (TypeError, ZeroDivisionError):
            continue
        if consistent and len(set(labels.values())) == len(labels):
            return kind, labels
    return "variant", {i: i for i, _, _ in values}


def _difference(base: Any, value: Any) -> Any:
    if isinstance(base, tuple):
        return tuple(v - b for b, v in zip(base, value, strict=True))
    return value - base


def _rename(coords: dict, old: str, new: str, value: Any) -> None:
    """Replace key ``old`` by ``new`` (with ``value``) in place, keeping the order of keys."""
    items = [(new, value) if k == old else (k, v) for k, v in coords.items()]
    coords.clear()
    coords.update(items)


def _relative(base: Any, value: Any) -> Any:
    if isinstance(base, tuple):
        return tuple(_relative(b, v) for b, v in zip(base, value, strict=True))
    return value / base - 1


def _round(value: Any) -> Any:
    if isinstance(value, tuple):
        return str(tuple(_round(v) for v in value))
    return float(f"{value:.10g}")


def _with_controls(built: dict, groups: list[_ClassGroup], controls: list[list[int]]) -> list[LearnerSpec]:
    """Each learner's control: its own variations, except that every class with control variations takes
    the one closest to the learner's own (most axis values in common)."""
    specs = []
    has_controls = any(controls)
    for (combo, expansion), (_, spec, _) in built.items():
        if not has_controls:
            specs.append(spec)
            continue
        target = list(combo)
        for k, candidates in enumerate(controls):
            if candidates and combo[k] not in candidates:
                own = groups[k].items[combo[k]]
                target[k] = max(candidates, key=lambda i: (_shared(own, groups[k].items[i]), -i))
        control_expansion = tuple(e if target[k] == combo[k] else 0 for k, e in enumerate(expansion))
        control = built.get((tuple(target), control_expansion)) or built.get((tuple(target), expansion))
        is_control = tuple(target) == combo
        object.__setattr__(spec, "control", is_control)
        object.__setattr__(spec, "control_id", control[1].id if control else None)
        spec.config["control"] = is_control
        specs.append(spec)
    return specs


def _shared(a: Intervention, b: Intervention) -> int:
    return sum(1 for k in a.given if k in b.values and a.values[k] == b.values[k])


def _place(labelled: list[tuple[dict[str, Any], LearnerSpec]]) -> Grid:
    labels: dict[str, list] = {}
    for coords, _ in labelled:
        for name, label in coords.items():
            if label not in labels.setdefault(name, []):
                labels[name].append(label)
    dims = {n: values for n, values in labels.items() if len(values) > 1}
    scalars = {n: values[0] for n, values in labels.items() if len(values) == 1}
    grid = Grid(dims=dims, scalars=scalars)
    seen: dict[tuple[int, ...], LearnerSpec] = {}
    for coords, spec in labelled:
        cell = tuple(dims[n].index(coords[n]) for n in dims)
        if cell in seen:
            if seen[cell].id != spec.id:
                where = ", ".join(f"{n}={coords[n]!r}" for n in dims) or "no varied axis"
                raise ValueError(f"Two different learners land on the same coordinates ({where}); give "
                                 "them an axis that tells them apart.")
            continue
        seen[cell] = spec
        grid.cells.append((cell, spec))
    return grid
