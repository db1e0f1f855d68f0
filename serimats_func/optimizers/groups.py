"""Parameter groups: other hyperparameters, or another optimizer, for the parameters a glob of names matches.

As ``optax.multi_transform``: the parameters are split into parts by name, each part trains with its own
functional optimizer on its own typed state, and one update runs them all. Part 0 holds the parameters that no
glob matches (the main optimizer's); part ``i`` those that glob ``i`` matches first (globs are tried in the
order given, ``fnmatch`` on the parameter name: the first that matches wins). The per-learner hyperparameters of
part ``i > 0`` are named ``{name}@{i}`` (``lr@1``) in the step's hyperparameters, the main ones as they are, so one
vmapped update serves learners that differ in any of them.

>>> import torch
>>> sgd = REGISTRY["SGD"]
>>> main = ParamGroup("", sgd.torch_class, sgd.resolve({"lr": 0.1}))
>>> twin = grouped_twin(main, [ParamGroup("b", sgd.torch_class, sgd.resolve({"lr": 0.5}))], ["w", "b"])
>>> params = {"w": torch.ones(2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
>>> h = twin.hparams_for([main.values, {"lr": 0.5}])
>>> sorted(h)
['dampening', 'dampening@1', 'lr', 'lr@1', 'momentum', 'momentum@1', 'weight_decay', 'weight_decay@1']
>>> new, state = twin.update(params, twin.init(params), params, h)  # gradients of ones
>>> new["w"].tolist(), new["b"].tolist(), len(state.parts)
([0.9, 0.9], [0.5, 0.5], 2)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .base import REGISTRY, FunctionalOptimizer, HParams, OptState, Params, family_of, stacked_update

__all__ = ["REGISTRY", "CombinedOptimizer", "GroupedOptimizer", "GroupedState", "ParamGroup", "assign", "describe",
           "grouped_twin", "hparam_name", "identity", "structure", "torch_optimizer"]


@dataclass(frozen=True)
class ParamGroup:
    """The optimizer of the parameters whose names ``pattern`` matches: a registered class and its resolved
    hyperparameters (defaults filled in). The main optimizer is a ParamGroup too, whose pattern is unused."""

    pattern: str
    optimizer: type | str
    values: Mapping[str, Any]

    @property
    def family(self):
        return family_of(self.optimizer)


class GroupedState(NamedTuple):
    """The state of a grouped optimizer: one state per part, each its family's NamedTuple over the part's
    parameters (part 0: the parameters no glob matched; then one per glob, in order)."""

    parts: tuple[OptState, ...]


def hparam_name(name: str, part: int) -> str:
    """The step's name of part ``part``'s hyperparameter ``name``: ``lr`` for the main part, ``lr@1`` for the first
    group's."""
    return name if part == 0 else f"{name}@{part}"


def assign(names: Sequence[str], patterns: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The parameter names of each part: those no glob matches, then for each glob the names it matches first.
    A glob that matches no name (or only names an earlier glob took) is refused, naming the parameters.

    >>> assign(["0.weight", "0.bias", "2.weight", "2.bias"], ["*.bias", "2.*"])
    (('0.weight',), ('0.bias', '2.bias'), ('2.weight',))
    """
    parts: list[list[str]] = [[] for _ in range(len(patterns) + 1)]
    for name in names:
        first = next((i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p)), None)
        parts[0 if first is None else first + 1].append(name)
    for i, pattern in enumerate(patterns):
        if not parts[i + 1]:
            taken = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            why = (f"the parameters it matches ({', '.join(taken)}) are taken by an earlier glob (the first glob that "
                   "matches wins)") if taken else "it matches no parameter"
            raise ValueError(f"param_groups glob {pattern!r}: {why}. The trained parameters are: {', '.join(names)}.")
    return tuple(tuple(p) for p in parts)


@dataclass(frozen=True)
class GroupedOptimizer(FunctionalOptimizer):
    """A functional optimizer made of one per part, each over its parameters (``names[i]``)."""

    names: tuple[tuple[str, ...], ...] = ()
    twins: tuple[FunctionalOptimizer, ...] = ()

    def hparams_for(self, values: Sequence[Mapping[str, Any]]) -> HParams:
        """One learner's hyperparameters from each part's values (the main's first), defaults filled in."""
        out: HParams = {}
        for i, (twin, v) in enumerate(zip(self.twins, values, strict=True)):
            out.update({hparam_name(k, i): t for k, t in twin.hparams(**v).items()})
        return out


def _part_hparams(h: HParams, twin: FunctionalOptimizer, part: int) -> HParams:
    return {k: h[hparam_name(k, part)] for k in twin.numeric}


def grouped_twin(main: ParamGroup, groups: Sequence[ParamGroup], names: Sequence[str],
                 varied: frozenset[str] = frozenset()) -> FunctionalOptimizer:
    """The functional optimizer of ``main`` with ``groups`` over the parameters ``names`` (``varied``: the main
    optimizer's hyperparameters that interventions change during training, in every group: ``PerturbHyperparameter``
    changes each group's too). Without groups, the main twin."""
    first = main.family.build(main.family.resolve(main.values), frozenset(varied))
    if not groups:
        return first
    parts = assign(names, [g.pattern for g in groups])
    twins = (first, *(g.family.build(g.family.resolve(g.values), frozenset(varied)) for g in groups))

    def init(params: Params) -> GroupedState:
        return GroupedState(tuple(t.init({k: params[k] for k in part}) for t, part in zip(twins, parts, strict=True)))

    def run(update, grads: Params, state: GroupedState, params: Params, h: HParams) -> tuple[Params, GroupedState]:
        new_params, new_states = {}, []
        for i, (t, part) in enumerate(zip(twins, parts, strict=True)):
            if not part:  # every parameter is in a group: the main part has nothing to update
                new_states.append(state.parts[i])
                continue
            p, s = update(t, {k: grads[k] for k in part}, state.parts[i], {k: params[k] for k in part},
                          _part_hparams(h, t, i))
            new_params.update(p)
            new_states.append(s)
        return {k: new_params[k] for k in params}, GroupedState(tuple(new_states))

    def update(grads, state, params, h):  # one learner
        return run(lambda t, *args: t.update(*args), grads, state, params, h)

    def stacked(grads, state, params, h):  # N learners, leaves (N, *shape)
        return run(stacked_update, grads, state, params, h)

    numeric = tuple(hparam_name(k, i) for i, t in enumerate(twins) for k in t.numeric)
    return GroupedOptimizer(first.name, init, update, numeric, first.family, stacked, names=parts, twins=twins)


def structure(main_structure: tuple, groups: Sequence[ParamGroup], names: Sequence[str],
              varied: frozenset[str] = frozenset()) -> tuple:
    """What learners must share to train in one update: the main structure, and each group's parameters and
    structure. Without groups, the main structure as it is."""
    if not groups:
        return main_structure
    parts = assign(names, [g.pattern for g in groups])
    return (main_structure, tuple((part, g.family.structure(g.values, frozenset(varied)))
                                  for part, g in zip(parts[1:], groups, strict=True)))


def identity(main_identity: dict[str, Any], groups: Sequence[ParamGroup], names: Sequence[str],
             varied: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The main optimizer's identity with, when there are groups, ``param_groups``: each group's parameters and
    hyperparameters (defaults filled in), in order. The globs themselves are not part of it: only what they
    matched. Without groups, the main identity as it is (ids of learners without groups are unchanged)."""
    if not groups:
        return main_identity
    parts = assign(names, [g.pattern for g in groups])
    return {**main_identity, "param_groups": [{"params": list(part), **g.family.canonical(g.values, frozenset(varied))}
                                              for part, g in zip(parts[1:], groups, strict=True)]}


def describe(main_words: str, groups: Sequence[ParamGroup], names: Sequence[str],
             varied: frozenset[str] = frozenset()) -> str:
    """A grouped optimizer in words: the main's, then each group's parameters and optimizer."""
    if not groups:
        return main_words
    parts = assign(names, [g.pattern for g in groups])
    return main_words + "".join(f"; {', '.join(part)}: {g.family.describe(g.family.structure(g.values, frozenset(varied)))}"
                                for part, g in zip(parts[1:], groups, strict=True))


class CombinedOptimizer(torch.optim.Optimizer):
    """Several torch.optim optimizers as one: ``step`` runs each in turn, ``param_groups`` are theirs in order and
    ``state`` is shared. What ``load_learner`` gives back for a learner whose groups use other optimizers
    (``.optimizers`` lists them); plain PyTorch then trains it with ``zero_grad()`` and ``step()`` as usual.

    >>> layer = torch.nn.Linear(3, 2)
    >>> opt = CombinedOptimizer([torch.optim.SGD([layer.weight], lr=0.1), torch.optim.Adam([layer.bias], lr=1e-3)])
    >>> [type(o).__name__ for o in opt.optimizers], [g["lr"] for g in opt.param_groups]
    (['SGD', 'Adam'], [0.1, 0.001])
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})
        self._link()

    def _link(self) -> None:
        start = 0
        for o in self.optimizers:
            k = len(o.param_groups)
            o.param_groups, o.state = self.param_groups[start:start + k], self.state
            start += k

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss


def torch_optimizer(parts: Sequence[tuple[ParamGroup, Sequence[tuple[str, torch.Tensor]]]]) -> torch.optim.Optimizer:
    """The torch.optim optimizer of each part's parameters (the main's first, with their hyperparameters): the
    parts of one optimizer class are param groups of one torch.optim optimizer (in the parts' order); several
    classes make a ``CombinedOptimizer`` of them, the main's class first. Empty parts are left out."""
    by_family: dict[str, list[tuple[Sequence[tuple[str, torch.Tensor]], Mapping[str, Any]]]] = {}
    for group, named in parts:
        if named:
            by_family.setdefault(group.family.name, []).append((named, group.values))
    made = [REGISTRY[name].torch_optimizer_groups(groups) for name, groups in by_family.items()]
    if len(made) == 1:
        return made[0]
    return CombinedOptimizer(o for m in made for o in (m.optimizers if isinstance(m, CombinedOptimizer) else [m]))
