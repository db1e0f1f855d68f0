"""Every built-in intervention against a plain PyTorch loop that does the same thing by hand, for 200 steps in
float64; windows act exactly where they say; custom interventions work as first-class ones."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from serimats_func.interventions import (
    BatchSize,
    DataOrder,
    InitWeights,
    Intervention,
    Model,
    Optimizer,
    PerturbActivations,
    PerturbGradients,
    PerturbHyperparameter,
    PerturbMomentum,
    PerturbWeights,
)
from serimats_func.models import MLP
from serimats_func.run.grid import class_name
from tests.reference import Twin, noise, windows_hold

STEPS, LOG_EVERY = 200, 20
F64 = {"dtype": torch.float64, "steps": STEPS, "log_every": LOG_EVERY}


def assert_matches_twins(exp, twin_class, **twin_kw):
    """Every learner of ``exp`` against its hand-trained twin: train loss at every 20th step to 1e-10."""
    ds = exp.run()
    data = (exp.base.data.x, exp.base.data.y)
    assert len(exp.grid.learners) >= 1
    for cell, spec in exp.grid.cells:
        twin = twin_class(spec, (spec.setup.data.x, spec.setup.data.y) if spec.setup.data is not None else data, **twin_kw)
        expected = twin.run(STEPS, LOG_EVERY)
        ours = ds.train_loss.values[cell]
        steps = ds.step.values.tolist()
        for step, value in expected.items():
            assert ours[steps.index(step)] == pytest.approx(value, rel=1e-10, abs=0), (spec.coords, step)
    return ds


class HyperparameterTwin(Twin):
    """torch.optim with a changed param_groups value inside the windows."""

    def before_step(self, step):
        v = next(v for v in self.spec.interventions if isinstance(v, PerturbHyperparameter))
        group = self.optimizer.param_groups[0]
        for name in ("lr", "momentum", "dampening", "weight_decay", "betas", "eps"):
            if name in group:
                value = v.values.get(name)
                group[name] = value if value is not None and windows_hold(v.values["when"], step) else self.base[name]


def test_perturb_momentum_in_a_window_matches_torch_optim_with_changed_param_groups(experiment):
    exp = experiment([PerturbMomentum.make_variations(momentum=lambda m: (m * 1.05, m * 0.5), when=((30, 90), (150, 160)))],
                     optimizer=Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9), **F64)
    ds = assert_matches_twins(exp, HyperparameterTwin)
    assert ds.momentum_change.values.tolist() == [0.05, -0.5]


def test_perturb_hyperparameter_lr_weight_decay_and_betas_of_adam_match_torch_optim(experiment):
    exp = experiment([PerturbHyperparameter.make_variations(lr=(0.003,), when=(10, 80)),
                      PerturbHyperparameter.make_variations(betas=(0.5, 0.9), weight_decay=0.01, when=(40, 120))],
                     optimizer=Optimizer(torch.optim.Adam, lr=1e-3), **F64)
    assert_matches_twins(exp, HyperparameterTwin)


def test_checking_a_hyperparameter_perturbation_changes_nothing_and_the_setup_still_varies_it(experiment):
    exp = experiment([PerturbMomentum.make_variations(momentum=(0.5,), when=(2, 4))],
                     optimizer=Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9))
    spec = exp.grid.learners[0]
    assert spec.setup.varied_hyperparameters == {"momentum"}  # set where the setup is built
    plain = exp.base.copy()
    assert plain.varied_hyperparameters == set()
    next(v for v in spec.interventions if isinstance(v, PerturbMomentum)).check(plain)
    assert plain.varied_hyperparameters == set()  # check() is pure


def test_momentum_that_starts_at_zero_and_turns_on_in_a_window_matches_torch_optim(experiment):
    exp = experiment([PerturbMomentum.make_variations(momentum=(0.9,), when=(50, 100)),
                      Optimizer.make_variations(dampening=(0.0, 0.3))],
                     optimizer=Optimizer(torch.optim.SGD, lr=0.05), **F64)
    assert_matches_twins(exp, HyperparameterTwin)


class GradientTwin(Twin):
    """Noise added to ``.grad`` by hand in the window."""

    def on_grads(self, step):
        v = next(v for v in self.spec.interventions if isinstance(v, PerturbGradients))
        if v.is_default() or not windows_hold(v.values["when"], step):
            return
        key = self.spec.keys[class_name(PerturbGradients)]
        for name, p in self.module.named_parameters():
            if v.values["layers"] is None or name.startswith("3."):
                p.grad = p.grad * v.values["scale"] + v.values["noise"] * noise(key, p.shape, p.dtype, name, step)


def test_perturb_gradients_matches_noise_added_to_grad_by_hand(experiment):
    exp = experiment([PerturbGradients.make_variations(noise=(0.0, 0.02), scale=(1.0, 0.5), when=(20, 150)),
                      PerturbGradients.make_variations(noise=0.05, layers="3.*", seed=4)], **F64)
    assert_matches_twins(exp, GradientTwin)


class ActivationTwin(Twin):
    """A forward hook on the ReLU's output, in training steps inside the window."""

    def __init__(self, spec, data):
        super().__init__(spec, data)
        self.v = next(v for v in spec.interventions if isinstance(v, PerturbActivations))
        self.key = spec.keys[class_name(PerturbActivations)]
        self.module.get_submodule(self.v.values["module"]).register_forward_hook(self.hook)

    def hook(self, _module, _inputs, out):
        if not self.module.training or self.v.is_default() or not windows_hold(self.v.values["when"], self.step):
            return out
        keep = torch.ones(out.shape[1], dtype=out.dtype)
        keep[list(self.v.values["zero"])] = 0
        z = noise(self.key, out.shape, out.dtype, self.step, 0)
        return out * (self.v.values["scale"] * keep) + self.v.values["noise"] * z


def test_perturb_activations_matches_a_forward_hook(experiment):
    exp = experiment([PerturbActivations.make_variations(module="2", zero=((), (3, 5)), scale=(1.0, 1.5), noise=(0.0, 0.01),
                                                         when=(10, 100))], **F64)
    assert len(exp.grid.learners) == 8
    assert_matches_twins(exp, ActivationTwin)


class WeightTwin(Twin):
    """A perturbation of the selected tensors, done after the update that makes ``at`` updates."""

    def __init__(self, spec, data):
        super().__init__(spec, data)
        self.v = next(v for v in spec.interventions if isinstance(v, PerturbWeights))
        if self.v.values["at"] == 0 and not self.v.is_default():
            self.perturb()

    def perturb(self):
        key = self.spec.keys[class_name(PerturbWeights)]
        eps, relative = self.v.values["epsilon"], self.v.values["mode"] == "relative"
        with torch.no_grad():
            for name, w in self.module.named_parameters():
                if self.v.values["layers"] is None or name.startswith("3."):
                    d = noise(key, w.shape, w.dtype, name)
                    w += (eps * w.norm() / d.norm() if relative else eps) * d

    def after_step(self, step):
        if not self.v.is_default() and step + 1 == self.v.values["at"]:
            self.perturb()


def test_perturb_weights_at_any_step_on_chosen_layers_matches_a_perturbation_by_hand(experiment):
    exp = experiment([PerturbWeights.make_variations(epsilon=(0.0, 0.05), at=(0, 30), mode="relative"),
                      PerturbWeights.make_variations(epsilon=0.01, at=77, mode="absolute", layers="3*")], **F64)
    assert len(exp.grid.learners) == 4  # epsilon 0 is one learner whatever its step
    assert_matches_twins(exp, WeightTwin)


def test_init_data_order_optimizer_batch_size_and_model_match_plain_training(experiment):
    exp = experiment([InitWeights.make_variations(seed=(0, 3)), DataOrder.make_variations(seed=(0, 2)),
                      Optimizer.make_variations(optimizer=(torch.optim.SGD, torch.optim.AdamW), lr=0.01),
                      BatchSize.make_variations(batch_size=(32, 24)),
                      Model.make_variations(factory=lambda width: MLP(widths=(width,)), width=(8, 16))],
                     dtype=torch.float64, steps=60, log_every=LOG_EVERY)
    assert len(exp.grid.learners) == 32
    ds = exp.run()
    for cell, spec in exp.grid.cells:
        expected = Twin(spec, (spec.setup.data.x, spec.setup.data.y)).run(60, LOG_EVERY)
        for step, value in expected.items():
            assert ds.train_loss.values[cell][ds.step.values.tolist().index(step)] == pytest.approx(value, rel=1e-10)


# -- windows act exactly where they say -------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 5, 11])
def test_a_window_starting_at_step_s_is_bitwise_its_twin_up_to_s_and_differs_from_s_plus_1(experiment, start):
    exp = experiment([PerturbHyperparameter.make_variations(lr=(None, 0.05), when=(start, start + 3))], steps=16, log_every=1)
    ds = exp.run()
    unperturbed = [spec for _, spec in exp.grid.cells if spec.interventions[0].is_default()]
    assert len(unperturbed) == 1
    loss = ds.train_loss.values  # (2 momentum values, 17 steps)
    np.testing.assert_array_equal(loss[0, : start + 1], loss[1, : start + 1])
    assert np.all(loss[0, start + 1 :] != loss[1, start + 1 :])


def test_a_weight_perturbation_at_step_s_changes_nothing_before_and_everything_after(experiment):
    ds = experiment([PerturbWeights.make_variations(epsilon=(0.0, 0.01), at=7)], log_every=1).run()
    loss = ds.train_loss.values
    np.testing.assert_array_equal(loss[0, :7], loss[1, :7])
    assert np.all(loss[0, 7:] != loss[1, 7:])


# -- custom interventions ----------------------------------------------------------------------------------


class ClipGradients(Intervention):
    """The README's custom intervention: clip the global gradient norm at a per-learner threshold."""

    axes = {"max_norm": math.inf}

    def on_gradients(self, grads, n, ctx):
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        scale = torch.clamp(n.max_norm / (norm + 1e-6), max=1.0)
        return {k: g * scale for k, g in grads.items()}


class ClipTwin(Twin):
    def on_grads(self, step):
        v = self.spec.interventions[0]
        if windows_hold(v.values["when"], step) and not v.is_default():
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), v.values["max_norm"])


def test_a_custom_gradient_clipping_intervention_matches_clip_grad_norm(experiment):
    exp = experiment([ClipGradients.make_variations(max_norm=(math.inf, 0.5, 0.05), when=(10, 120))], **F64)
    ds = assert_matches_twins(exp, ClipTwin)
    assert ds.when.item() == "10-120" and ds.max_norm.values.tolist() == [math.inf, 0.5, 0.05]
    assert len(set(ds.train_loss.isel(step=-1).values.tolist())) == 3


class CountClips(Intervention):
    """A stateful custom intervention: scale gradients down more each time their norm exceeds a threshold."""

    axes = {"threshold": math.inf}

    def init_state(self, params, n):
        return {"clips": torch.zeros((), dtype=torch.float64)}

    def on_gradients(self, grads, n, ctx):
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        clips = ctx.state["clips"] + (norm > n.threshold).to(torch.float64)
        return {k: g / (1 + clips).to(g.dtype) for k, g in grads.items()}, {"clips": clips}


class CountTwin(Twin):
    clips = 0

    def on_grads(self, step):
        v = self.spec.interventions[0]
        if v.is_default():
            return
        norm = torch.sqrt(sum((p.grad * p.grad).sum() for p in self.module.parameters()))
        self.clips += int(norm > v.values["threshold"])
        for p in self.module.parameters():
            p.grad = p.grad / (1 + self.clips)


def test_a_stateful_custom_intervention_keeps_its_own_per_learner_state(experiment):
    exp = experiment([CountClips.make_variations(threshold=(math.inf, 0.3, 1.0))], **F64)
    assert_matches_twins(exp, CountTwin)


def test_a_subclass_that_implements_nothing_is_refused_with_what_to_define():
    class Scale(Intervention):
        axes = {"scale": 1.0}

    with pytest.raises(TypeError, match="Scale implements no hook.*on_gradients"):
        Scale.make_variations(scale=(1.0, 0.5))


def test_a_hook_that_branches_on_a_tensor_or_syncs_with_the_host_is_refused(experiment):
    class Branchy(Intervention):
        axes = {"k": 1.0}

        def on_gradients(self, grads, n, ctx):
            return grads if ctx.step > 3 else {k: g * n.k for k, g in grads.items()}

    class Syncs(Intervention):
        axes = {"k": 1.0}

        def on_gradients(self, grads, n, ctx):
            return {k: g * float(n.k) for k, g in grads.items()}

    for cls in (Branchy, Syncs):
        with pytest.raises(ValueError, match="must not branch on a tensor's value.*torch.where"):
            experiment([cls.make_variations(k=(1.0, 0.5))])  # refused by the trial step, before run()


def test_custom_classes_name_learners_by_their_code(experiment):
    a = experiment([ClipGradients.make_variations(max_norm=(1.0,))]).grid.learners[0].id

    class ClipGradients2(ClipGradients):
        def on_gradients(self, grads, n, ctx):
            return {k: g * 0.5 for k, g in super().on_gradients(grads, n, ctx).items()}

    ClipGradients2.__name__ = ClipGradients2.__qualname__ = "ClipGradients"
    b = experiment([ClipGradients2.make_variations(max_norm=(1.0,))]).grid.learners[0].id
    assert a != b


class FrozenFirstLayer(nn.Module):
    def __init__(self, frozen: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(40, 16), nn.Linear(16, 10)
        self.fc1.weight.requires_grad_(not frozen)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_frozen_parameters_stay_frozen_and_which_parameters_train_is_part_of_the_id(experiment):
    from serimats_func.loggers import Logger, register_metric

    class Norms(Logger):
        @register_metric
        def fc1_weight_norm(self, learner):
            return learner.model.fc1.weight.norm()

        @register_metric
        def fc1_bias_norm(self, learner):
            return learner.model.fc1.bias.norm()

    grid = [InitWeights.make_variations(seed=(0, 1)), Optimizer.make_variations(weight_decay=(0.0, 0.1))]
    frozen = experiment(grid, model=FrozenFirstLayer(), logger=Norms(), log_every=4)
    ds = frozen.run()
    assert (ds.fc1_weight_norm == ds.fc1_weight_norm.isel(step=0)).all()  # weight decay and momentum leave it too
    assert (ds.fc1_bias_norm.isel(step=-1) != ds.fc1_bias_norm.isel(step=0)).all()
    trained = experiment(grid, model=FrozenFirstLayer(frozen=False))
    assert {s.id for s in frozen.grid.learners}.isdisjoint({s.id for s in trained.grid.learners})


def test_a_dataset_intervention_trains_each_learner_on_its_own_data(experiment, small_mnist1d):
    from serimats_func.interventions import Dataset

    train, test = small_mnist1d
    x, y = train.tensors
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), y)
    exp = experiment([Dataset.make_variations(dataset={"clean": train, "noisy": noisy}),
                      InitWeights.make_variations(seed=(0, 1))])
    ds = exp.run()
    assert ds.dataset.values.tolist() == ["clean", "noisy"]
    assert len(exp.plan().chunks) == 0 and len({s.structure for s in exp.grid.learners}) == 2
    clean_alone = experiment([InitWeights(seed=1)], data=(train, test)).run()
    np.testing.assert_array_equal(ds.train_loss.sel(dataset="clean", seed=1).values, clean_alone.train_loss.values)
    assert (ds.train_loss.sel(dataset="noisy") != ds.train_loss.sel(dataset="clean")).all()
    assert ds.test_loss.sel(dataset="noisy").notnull().all()  # the experiment's test set, for every dataset
