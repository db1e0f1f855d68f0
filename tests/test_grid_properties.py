"""Properties of grid construction over random mixes of classes, axes and values (hypothesis): how many
learners a grid has, that every learner has its own labelled coordinates, that ids do not depend on the order
in which variations were written, and that a value given twice on an axis is refused."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from serimats_func.interventions import (
    DataOrder,
    InitWeights,
    Intervention,
    Optimizer,
    PerturbGradients,
    PerturbWeights,
)
from serimats_func.run.grid import build_grid
from serimats_func.run.setup import Setup, SetupContext


class Scale(Intervention):
    """A user's class, with an axis name (``seed``) that built-ins use too."""

    axes = {"k": 1.0, "seed": 0}

    def on_gradients(self, grads, n, ctx):
        return {name: g * n.k for name, g in grads.items()}


# Per class: the values each axis may take (none at its default, so that no variation merges with another);
# the first axis is split between the class's make_variations calls, so that no two calls make one variation.
POOLS = {
    PerturbWeights: {"epsilon": [0.001, 0.002, 0.01, 0.02, 0.1, 0.2], "seed": [0, 1, 2, 3]},
    InitWeights: {"seed": [0, 1, 2, 3, 4, 5]},
    DataOrder: {"seed": [1, 2, 3, 4, 5, 6]},
    PerturbGradients: {"noise": [0.01, 0.02, 0.05, 0.1], "scale": [0.5, 2.0, 3.0]},
    Optimizer: {"lr": [0.2, 0.05, 0.01, 0.3], "momentum": [0.0, 0.5, 0.9]},
    Scale: {"k": [0.5, 1.5, 2.5, 3.5], "seed": [0, 1, 2]},
}
MAX_LEARNERS = 120


def _base() -> Setup:
    context = SetupContext(nn.functional.cross_entropy, torch.float32)
    gen = torch.Generator().manual_seed(0)
    data = context.data_source(None, (torch.randn(16, 8, generator=gen), torch.arange(16) % 4))
    return Setup(model=nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), data=data, batch_size=4,
                 default_optimizer=Optimizer(torch.optim.SGD, lr=0.1, momentum=0.9), context=context)


BASE = _base()
PROPERTIES = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def class_calls(draw, cls):
    """One class's make_variations calls: a list of {axis: values}."""
    pool = POOLS[cls]
    primary, *others = pool
    n_calls = draw(st.integers(1, 2))
    shuffled = draw(st.permutations(pool[primary]))
    split = [shuffled[i::n_calls] for i in range(n_calls)]  # disjoint values of the first axis
    calls = []
    for share in split:
        call = {primary: draw(st.lists(st.sampled_from(share), min_size=1, max_size=2, unique=True))}
        for axis in others:
            if draw(st.booleans()):
                call[axis] = draw(st.lists(st.sampled_from(pool[axis]), min_size=1, max_size=2, unique=True))
        calls.append(call)
    return calls


@st.composite
def grids(draw):
    """{class: [calls]} for 1 to 3 classes, with at most MAX_LEARNERS learners."""
    classes = draw(st.lists(st.sampled_from(list(POOLS)), min_size=1, max_size=3, unique=True))
    grid = {cls: draw(class_calls(cls)) for cls in classes}
    assume(expected_learners(grid) <= MAX_LEARNERS)
    return grid


def expected_learners(grid: dict) -> int:
    """Classes multiply; the calls of one class add up; a call is the product of its axes."""
    return math.prod(sum(math.prod(len(v) for v in call.values()) for call in calls) for calls in grid.values())


def variations(grid: dict, reverse_values: bool = False) -> list:
    out = []
    for cls, calls in grid.items():
        for call in calls:
            out.append(cls.make_variations(**{axis: (list(reversed(v)) if reverse_values else v) for axis, v in call.items()}))
    return out


def by_coordinates(grid) -> dict:
    return {frozenset((k, repr(v)) for k, v in spec.coords.items()): spec.id for _, spec in grid.cells}


@PROPERTIES
@given(grids())
def test_a_grid_has_the_product_over_classes_of_the_sum_over_calls_of_the_product_of_axes(grid):
    built = build_grid(variations(grid), BASE, seed=0)
    assert len(built.cells) == len(built.learners) == expected_learners(grid)
    assert len({spec.id for _, spec in built.cells}) == len(built.cells)


@PROPERTIES
@given(grids())
def test_every_learner_has_its_own_labelled_coordinates(grid):
    built = build_grid(variations(grid), BASE, seed=0)
    cells = [cell for cell, _ in built.cells]
    assert len(set(cells)) == len(cells)  # one learner per cell of the result
    assert len(by_coordinates(built)) == len(built.cells)  # and per set of coordinate labels
    names = set(built.dims) | set(built.scalars)
    given_axes = {axis for calls in grid.values() for call in calls for axis in call}
    for cell, spec in built.cells:
        assert set(spec.coords) == names  # every learner is labelled on every axis
        assert [built.dims[d][i] for d, i in zip(built.dims, cell, strict=True)] == [spec.coords[d] for d in built.dims]
    for labels in built.dims.values():
        assert len(labels) > 1 and len({repr(v) for v in labels}) == len(labels)
    for name in names:  # an axis keeps its name, or takes its class's prefix when two classes share it
        assert name in given_axes or name.split("_", 1)[1] in given_axes


@PROPERTIES
@given(grids(), st.data())
def test_ids_and_coordinates_do_not_depend_on_the_order_of_calls_or_of_values(grid, data):
    reference = by_coordinates(build_grid(variations(grid), BASE, seed=0))
    classes = data.draw(st.permutations(list(grid)))
    shuffled = {cls: data.draw(st.permutations(grid[cls])) for cls in classes}
    assert by_coordinates(build_grid(variations(shuffled), BASE, seed=0)) == reference
    assert by_coordinates(build_grid(variations(grid, reverse_values=True), BASE, seed=0)) == reference
    flat = variations(grid)
    assert by_coordinates(build_grid(data.draw(st.permutations(flat)), BASE, seed=0)) == reference


@PROPERTIES
@given(grids())
def test_another_experiment_seed_renames_every_learner(grid):
    a = by_coordinates(build_grid(variations(grid), BASE, seed=0))
    b = by_coordinates(build_grid(variations(grid), BASE, seed=1))
    assert a.keys() == b.keys() and set(a.values()).isdisjoint(b.values())


@PROPERTIES
@given(st.sampled_from(list(POOLS)), st.data())
def test_a_value_repeated_on_an_axis_is_refused(cls, data):
    axis = data.draw(st.sampled_from(list(POOLS[cls])))
    values = data.draw(st.lists(st.sampled_from(POOLS[cls][axis]), min_size=1, max_size=3, unique=True))
    repeated = data.draw(st.sampled_from(values))
    position = data.draw(st.integers(0, len(values)))
    with pytest.raises(ValueError, match=f"axis '{axis}' repeats the value {repeated!r}; give each value once"):
        cls.make_variations(**{axis: values[:position] + [repeated] + values[position:]})
