"""The open core: every hook point sees its own learner's values, the optimizer's state is a hook point, and
the state is typed.

Each hook-point class below branches (in Python) on a string axis. Learners whose strings differ train in
separate groups, so every learner's hook sees its own string: each learner of a grid is bitwise the same
learner trained alone, and the two strings give different learners.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serimats_func.core.hook_points import POINTS
from serimats_func.core.learners import initial_model_state
from serimats_func.interventions import Intervention, Optimizer, ResetOptimizerState
from tests.reference import Twin, windows_hold
from tests.test_interventions import F64, assert_matches_twins


def _factor(self) -> float:
    return 0.5 if self.values["mode"] == "strong" else 0.9  # a Python branch on a string: the group shares it


class InitByString(Intervention):
    axes = {"mode": "same"}

    def on_init(self, state, n, ctx):
        return state._replace(params={k: v * _factor(self) for k, v in state.params.items()})


class BatchByString(Intervention):
    axes = {"mode": "same"}

    def on_batch(self, batch, n, ctx):
        x, y = batch
        return x * _factor(self), y


class BuffersByString(Intervention):
    axes = {"mode": "same"}

    def on_buffers(self, buffers, n, ctx):  # another dropout key per mode, from the first step on
        return {k: b + (1 if _factor(self) == 0.5 else 2) if k.endswith(".key") else b for k, b in buffers.items()}


class ActivationsByString(Intervention):
    axes = {"module": "1", "mode": "same"}

    def on_activations(self, output, n, ctx):
        return output * _factor(self)


class GradientsByString(Intervention):
    axes = {"mode": "same"}

    def on_gradients(self, grads, n, ctx):
        return {k: g * _factor(self) for k, g in grads.items()}


class HyperparametersByString(Intervention):
    axes = {"mode": "same"}

    def on_hyperparameters(self, h, n, ctx):
        return {**h, "lr": h["lr"] * _factor(self)}


class OptimizerStateByString(Intervention):
    axes = {"mode": "same"}

    def on_optimizer_state(self, state, n, ctx):
        return state._replace(momentum_buffer={k: b * _factor(self) for k, b in state.momentum_buffer.items()})


class ParamsByString(Intervention):
    axes = {"mode": "same"}

    def on_params(self, params, n, ctx):
        return {k: p * (1 - (1 - _factor(self)) / 100) for k, p in params.items()}


BY_STRING = [InitByString, BatchByString, BuffersByString, ActivationsByString, GradientsByString, HyperparametersByString,
             OptimizerStateByString, ParamsByString]


def test_every_hook_point_has_a_string_axis_test():
    assert sorted(next(m for m in vars(c) if m.startswith("on_")) for c in BY_STRING) == sorted(p.method for p in POINTS)


@pytest.mark.parametrize("cls", BY_STRING, ids=lambda c: c.__name__)
def test_a_string_axis_gives_each_learner_its_own_value_at_every_hook_point(experiment, cls):
    from serimats_func.models import MLP

    model = (lambda: MLP(widths=(32,), dropout=0.3)) if cls is BuffersByString else (lambda: None)  # buffers to change
    together = experiment([cls.make_variations(mode=("weak", "strong"))], model=model()).run()
    alone = {m: experiment([cls.make_variations(mode=m)], model=model()).run() for m in ("weak", "strong")}
    for mode, ds in alone.items():
        np.testing.assert_array_equal(together.train_loss.sel(mode=mode).values, ds.train_loss.values)
    assert not np.array_equal(together.train_loss.sel(mode="weak").values, together.train_loss.sel(mode="strong").values)


class FreezeLayer(Intervention):
    """The issue's reproduction: zero the gradient of the layer the axis names."""

    axes = {"layer": ""}

    def on_gradients(self, grads, n, ctx):
        layer = self.values["layer"]
        return {k: torch.zeros_like(g) if k == layer else g for k, g in grads.items()}


def test_freeze_layer_freezes_each_learners_own_layer(experiment):
    exp = experiment([FreezeLayer.make_variations(layer=("1.weight", "3.weight"))])
    exp.run()
    for spec in exp.grid.learners:
        frozen = spec.coords["layer"]
        start = initial_model_state(exp.template, spec.init_key, spec.dropout_key).params
        module, _ = exp.load_learner(layer=frozen)
        trained = dict(module.named_parameters())
        for name in ("1.weight", "3.weight"):
            unchanged = torch.equal(trained[name].detach(), start[name])
            assert unchanged == (name == frozen), (frozen, name)


class ScaleFromValues(Intervention):
    """Reads a numeric axis from self.values rather than n: it is the learner's own number there too."""

    axes = {"scale": 1.0}

    def on_gradients(self, grads, n, ctx):
        return {k: g * self.values["scale"] for k, g in grads.items()}


def test_a_numeric_axis_read_from_self_values_is_the_learners_own(experiment):
    exp = experiment([ScaleFromValues.make_variations(scale=(0.5, 2.0, 3.0))])
    assert len({s.structure for s in exp.grid.learners}) == 1  # numbers do not split the group
    together = exp.run()
    for scale in (0.5, 3.0):
        alone = experiment([ScaleFromValues.make_variations(scale=scale)]).run()
        np.testing.assert_array_equal(together.train_loss.sel(scale=scale).values, alone.train_loss.values)


class ReadsItsSeed(Intervention):
    axes = {"seed": 0}

    def numbers(self, setup):
        return {}

    def on_gradients(self, grads, n, ctx):
        return {k: g * (1 + self.values["seed"]) for k, g in grads.items()}


def test_a_hook_reading_a_value_it_does_not_have_per_learner_is_refused_with_the_fix(experiment):
    with pytest.raises(ValueError, match=r"cannot be read from self.values.*n.seed"):
        experiment([ReadsItsSeed.make_variations(seed=(1, 2))])


class ResetTwin(Twin):
    """torch.optim whose state is cleared right before the update of every step in the windows."""

    def on_grads(self, step):
        v = next(v for v in self.spec.interventions if isinstance(v, ResetOptimizerState))
        if not v.is_default() and windows_hold(v.windows(), step):
            self.optimizer.state.clear()


@pytest.mark.parametrize("optimizer", [Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.1),
                                       Optimizer(torch.optim.Adam, lr=1e-3, betas=(0.8, 0.99))], ids=["SGD", "Adam"])
def test_reset_optimizer_state_matches_torch_state_clear_in_float64(experiment, optimizer):
    exp = experiment([ResetOptimizerState.make_variations(at=(0, 37, 150)),
                      ResetOptimizerState.make_variations(when=(((60, 64), (120, 121)),))], optimizer=optimizer, **F64)
    ds = assert_matches_twins(exp, ResetTwin)
    assert len(exp.grid.learners) == 4
    final = ds.train_loss.isel(step=-1).values
    assert np.unique(final[~np.isnan(final)]).size == 4  # every reset changes the trajectory


class ScaleMomentum(Intervention):
    """A custom hook on the optimizer state: scale SGD's momentum buffer in the windows."""

    axes = {"factor": 1.0}

    def on_optimizer_state(self, state, n, ctx):
        return state._replace(momentum_buffer={k: b * n.factor.to(b.dtype) for k, b in state.momentum_buffer.items()})


class ScaleMomentumTwin(Twin):
    def on_grads(self, step):
        v = next(v for v in self.spec.interventions if isinstance(v, ScaleMomentum))
        if v.is_default() or not windows_hold(v.values["when"], step):
            return
        for p in self.module.parameters():
            buffer = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                buffer.mul_(v.values["factor"])


def test_a_custom_optimizer_state_hook_changes_the_trajectory_as_the_same_change_in_torch(experiment):
    exp = experiment([ScaleMomentum.make_variations(factor=(1.0, 0.0, 1.5), when=((30, 60), (100, 200)))],
                     optimizer=Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9), **F64)
    ds = assert_matches_twins(exp, ScaleMomentumTwin)
    final = ds.train_loss.isel(step=-1).values
    assert np.unique(final[~np.isnan(final)]).size == 5


def test_the_chunk_state_is_typed():
    from serimats_func.core.state import ChunkState, InterventionData
    from serimats_func.optimizers import AdamState, SGDState, functional_twin

    assert ChunkState._fields == ("params", "buffers", "opt", "hparams", "diverged_at", "interventions")
    assert InterventionData._fields == ("n", "key", "active", "windows", "state")
    params = {"w": torch.zeros(2)}
    assert isinstance(functional_twin(torch.optim.SGD, lr=0.1, momentum=0.9).init(params), SGDState)
    assert isinstance(functional_twin(torch.optim.AdamW, lr=0.1).init(params), AdamState)


class ShiftInPlace(Intervention):
    """The in-place hook that leaked outside its window: ``g.add_`` changes ``old`` before torch.where sees it."""

    axes = {"shift": 0.0}

    def on_gradients(self, grads, n, ctx):
        for g in grads.values():
            g.add_(n.shift.to(g.dtype))
        return grads


class ScaleParamsInPlace(Intervention):
    axes = {"scale": 1.0}

    def on_params(self, params, n, ctx):
        return {k: p.mul_(n.scale.to(p.dtype)) for k, p in params.items()}


class PerturbInitInPlace(Intervention):
    axes = {"eps": 0.0}

    def on_init(self, state, n, ctx):
        for p in state.params.values():
            p.add_(n.eps.to(p.dtype))
        return state


@pytest.mark.parametrize("cls", [ShiftInPlace, ScaleParamsInPlace, PerturbInitInPlace], ids=lambda c: c.__name__)
def test_a_hook_that_changes_its_input_in_place_is_refused_when_the_experiment_is_built(experiment, cls, store):
    axis = next(iter(cls.axes))
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.on_\w+ changes what it receives in place.*Return new tensors"):
        experiment([cls.make_variations(**{axis: (0.0, 0.5)}, **({"when": (8, 16)} if cls.windowed else {}))],
                   store=store)
    assert not store.exists()  # refused before anything was written
