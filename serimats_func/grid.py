"""The grid: from interventions to learners, their ids, keys and coordinates.

Variations of one intervention class are concatenated; classes multiply. A class the experiment
does not mention contributes its default (no perturbation, init seed 0, the experiment's
optimizer, data order 0), so removing ``InitWeights`` and re-adding it with ``seed=0`` names the
same learner. A learner's id is a hash of its fully resolved configuration and of the setup
(model, data, training length...), so equal ids mean equal trajectories.

Coordinates: one per axis that any ``make_variations`` call named. An axis with several values
is a dimension of the result, one with a single value a scalar coordinate. The name is the axis
name (``epsilon``, ``lr``, ``seed``), unless two classes of the experiment name the same axis: then
both take their class prefix (``init_seed``, ``perturb_seed``, ``data_seed``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import optimizers as optim_twins
from .interventions import DataOrder, InitWeights, Intervention, Optimizer, PerturbWeights, Variations
from .keys import derive_key

DEFAULT_CLASSES = (InitWeights, PerturbWeights, DataOrder, Optimizer)


@dataclass(frozen=True)
class LearnerSpec:
    """Everything that makes one learner: id, coordinates, random keys and optimizer."""

    id: str
    coords: dict[str, Any]
    control: bool
    config: dict[str, Any]  # JSON-able, written to the store
    optimizer_class: type
    optimizer_values: dict[str, Any]
    init_key: int
    perturb_key: int
    data_key: int
    dropout_key: int
    epsilon: float
    relative: bool

    @property
    def structure(self) -> tuple:
        """Learners with the same structure can share one vmapped step."""
        return optim_twins.structure_key(self.optimizer_class, self.optimizer_values)


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


def _flatten(interventions: Iterable) -> list[tuple[type, list[Intervention], tuple[str, ...]]]:
    """Group the given variations by class: [(class, variations, named axes)]."""
    by_class: dict[type, tuple[list, list]] = {}
    for item in interventions:
        if isinstance(item, Variations):
            items, cls, given = list(item), item.cls, item.given
        elif isinstance(item, Intervention):
            items, cls, given = [item], type(item), item.given
        elif isinstance(item, (list, tuple)):
            for sub in _flatten(item):
                by_class.setdefault(sub[0], ([], []))
                by_class[sub[0]][0].extend(sub[1])
                by_class[sub[0]][1].extend(sub[2])
            continue
        else:
            raise TypeError(f"interventions must be made by make_variations(...) or be Intervention "
                            f"instances; got {type(item).__name__}.")
        if not items:
            raise ValueError(f"{cls.__name__}.make_variations gave no variations.")
        by_class.setdefault(cls, ([], []))
        by_class[cls][0].extend(items)
        by_class[cls][1].extend(given)
    return [(cls, items, tuple(dict.fromkeys(given))) for cls, (items, given) in by_class.items()]


def _coordinate_names(named: list[tuple[type, tuple[str, ...]]]) -> dict[tuple[type, str], str]:
    counts: dict[str, int] = {}
    for _, axes in named:
        for axis in axes:
            counts[axis] = counts.get(axis, 0) + 1
    return {(cls, axis): axis if counts[axis] == 1 else f"{cls.prefix}_{axis}" for cls, axes in named for axis in axes}


def _json_number(value: Any) -> Any:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return list(value) if isinstance(value, tuple) else value


def build_grid(
    interventions: Sequence,
    default_optimizer: Optimizer,
    seed: int,
    setup: dict[str, Any],
) -> Grid:
    """All learners of an experiment, with their place in the result's dimensions."""
    groups = _flatten(interventions)
    for cls, _, _ in groups:
        if not issubclass(cls, DEFAULT_CLASSES):
            known = ", ".join(c.__name__ for c in DEFAULT_CLASSES)
            raise ValueError(f"{cls.__name__} is not an intervention serimats_func knows how to apply; it would "
                             f"multiply the grid without changing any learner. Known: {known}.")
    present = {cls for cls, _, _ in groups}
    for cls in DEFAULT_CLASSES:
        if cls not in present and not any(issubclass(p, cls) for p in present):
            groups.append((cls, [cls()], ()))
    names = _coordinate_names([(cls, given) for cls, _, given in groups])
    setup_hash = hashlib.blake2b(json.dumps(setup, sort_keys=True).encode(), digest_size=8).hexdigest()

    labelled: list[tuple[dict[str, Any], LearnerSpec]] = []
    for combo in itertools.product(*(items for _, items, _ in groups)):
        by_class = {type(v): v for v in combo}
        init, perturb = _find(by_class, InitWeights), _find(by_class, PerturbWeights)
        data, opt = _find(by_class, DataOrder), _find(by_class, Optimizer)
        opt_class, opt_values = opt.resolve(default_optimizer)
        opt_identity = {"optimizer": opt_class.__name__, **{k: _json_number(v) for k, v in opt_values.items()}}
        identity = {
            "init": init.identity(),
            "perturb": perturb.identity(),
            "data": data.identity(),
            "optimizer": opt_identity,
            "seed": seed,
            "setup": setup_hash,
        }
        learner_id = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=8).hexdigest()
        coords = {}
        for cls, _, given in groups:
            v = _find(by_class, cls)
            for axis in given:
                coords[names[(cls, axis)]] = _optimizer_label(v, axis, opt_class, opt_values) if v is opt else v.label(axis)
        spec = LearnerSpec(
            id=learner_id,
            coords=coords,
            control=any(v.control for v in combo),
            config={**identity, "setup": setup, "control": any(v.control for v in combo)},
            optimizer_class=opt_class,
            optimizer_values=opt_values,
            init_key=derive_key(seed, "init", init.values["seed"]),
            perturb_key=derive_key(seed, "perturb", perturb.values["seed"]),
            data_key=derive_key(seed, "data", data.values["seed"]),
            dropout_key=derive_key(seed, "dropout", init.values["seed"], data.values["seed"]),
            epsilon=perturb.values["epsilon"],
            relative=perturb.values["mode"] == "relative",
        )
        labelled.append((coords, spec))
    return _place(labelled)


def _find(by_class: dict[type, Intervention], cls: type) -> Intervention:
    for c, v in by_class.items():
        if issubclass(c, cls):
            return v
    raise KeyError(cls)


def _optimizer_label(v: Optimizer, axis: str, opt_class: type, resolved: dict[str, Any]) -> Any:
    if axis == "optimizer":
        return opt_class.__name__
    if axis not in resolved:
        return None  # e.g. momentum for Adam learners, when SGD learners vary it: NaN in results
    value = resolved[axis]
    return str(tuple(value)) if isinstance(value, (tuple, list)) else value


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
                where = ", ".join(f"{n}={coords[n]!r}" for n in dims)
                raise ValueError(f"Two different learners land on the same coordinates ({where}); give "
                                 "them an axis that tells them apart.")
            continue
        seen[cell] = spec
        grid.cells.append((cell, spec))
    return grid
