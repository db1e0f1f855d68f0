"""DropoutMasks: dropout masks from another seed from update k on, against a loop that reseeds the dropout layers by
hand; bitwise its default twin before k, forks there, and a learner in a batch is itself alone."""

import numpy as np
import pytest
import torch

from serimats_func.core.dropout import KeyedDropout
from serimats_func.core.keys import fold_in
from serimats_func.core.learners import initial_model_state
from serimats_func.interventions import DataOrder, DropoutMasks, InitWeights
from serimats_func.models import MLP
from tests.reference import Twin
from tests.test_interventions import F64, assert_matches_twins

METRICS = ["train_loss", "train_acc", "test_loss", "test_acc"]


def dropout_mlp():
    return MLP(widths=(32,), dropout=0.3)


class DropoutTwin(Twin):
    """Plain training with the template's dropout layers, whose keys are set by hand: the learner's own at the
    start, then ``fold_in(key, K)`` (K the learner's DropoutMasks key) right before update ``at``."""

    def __init__(self, spec, data, **kw):
        super().__init__(spec, data, **kw)
        start = initial_model_state(spec.setup.template, spec.init_key, spec.dropout_key).buffers
        self.layers = {name: m for name, m in self.module.named_modules() if isinstance(m, KeyedDropout)}
        for name, m in self.layers.items():
            m.key.copy_(start[f"{name}.key"])
        self.masks = next(v for v in spec.interventions if isinstance(v, DropoutMasks))

    def before_step(self, step):
        if not self.masks.is_default() and step == self.masks.values["at"]:
            for m in self.layers.values():
                m.key.copy_(fold_in(m.key, self.spec.keys["DropoutMasks"]))


def test_dropout_masks_match_a_loop_that_reseeds_the_dropout_layers_by_hand(experiment):
    exp = experiment([DropoutMasks.make_variations(seed=(0, 1, 2), at=(0, 30))], model=dropout_mlp(), **F64)
    ds = assert_matches_twins(exp, DropoutTwin)
    final = ds.train_loss.sel(step=200)
    assert len(np.unique(final.sel(seed=[1, 2]).values)) == 4  # every seed and step its own masks
    assert (final.sel(seed=0) == final.sel(seed=0, at=0)).all()  # seed 0 is the default, at any step


def test_before_update_k_the_learner_is_bitwise_its_default_twin_and_after_it_its_masks_differ(experiment):
    ds = experiment([DropoutMasks.make_variations(seed=(0, 1), at=7)], model=dropout_mlp(), log_every=1).run()
    loss = ds.train_loss.values  # (seed, step): states after 0..16 updates
    np.testing.assert_array_equal(loss[0, :8], loss[1, :8])  # the first 7 updates draw the default masks
    assert np.all(loss[0, 8:] != loss[1, 8:])


def test_the_new_keys_are_the_default_keys_folded_with_the_class_key(experiment):
    from serimats_func.core.step import make_train_step
    from serimats_func.run import training

    exp = experiment([DropoutMasks.make_variations(seed=(0, 3), at=(0, 5))], model=dropout_mlp())
    specs = [spec for _, spec in exp.grid.cells]
    hooks = training.chunk_hooks(specs)
    assert [h.method for h in hooks.in_step] == ["on_buffers"] and len(hooks.at("on_init")) == 1
    state = training.initial_state(specs, hooks, torch.device("cpu"))
    step = make_train_step(specs[0].setup.template, training.chunk_optimizer(specs), torch.nn.functional.cross_entropy,
                           hooks, shared_batch=True)
    x, y = exp.base.data.x[:32], exp.base.data.y[:32]
    (name,) = [k for k in state.buffers if k.endswith(".key")]
    for i, spec in enumerate(specs):  # at=0: folded in the initial state
        default = initial_model_state(spec.setup.template, spec.init_key, spec.dropout_key).buffers[name]
        mask = spec.interventions[0]
        at_init = mask.values["seed"] != 0 and mask.values["at"] == 0
        assert torch.equal(state.buffers[name][i], fold_in(default, spec.keys["DropoutMasks"]) if at_init else default)
    for t in range(8):  # at=5: folded right before update 6 (step 5), once
        before = state.buffers[name].clone()
        state, _ = step(state, x, y, torch.tensor(t))
        assert torch.equal(state.buffers[name.replace(".key", ".calls")], torch.full((4,), t + 1))
        for i, spec in enumerate(specs):
            mask = spec.interventions[0]
            changes = mask.values["seed"] != 0 and mask.values["at"] == t and t > 0
            assert torch.equal(state.buffers[name][i] != before[i], torch.tensor(changes)), (spec.coords, t)
            if changes:
                assert torch.equal(state.buffers[name][i], fold_in(before[i], spec.keys["DropoutMasks"]))


def test_a_learner_in_a_batch_is_bitwise_itself_alone(experiment):
    grid = [InitWeights.make_variations(seed=(0, 1)), DropoutMasks.make_variations(seed=range(4), at=(0, 5))]
    batch = experiment(grid, model=dropout_mlp(), log_every=2, fork=False).run()
    for seed, at in ((2, 5), (3, 0)):
        alone = experiment([InitWeights(seed=1), DropoutMasks(seed=seed, at=at)], model=dropout_mlp(), log_every=2,
                           fork=False).run()
        for metric in METRICS:
            np.testing.assert_array_equal(batch[metric].sel(init_seed=1, dropout_seed=seed, at=at).values,
                                          alone[metric].values)


def test_children_fork_from_their_control_at_k_and_equal_themselves_trained_alone(experiment):
    grid = [DropoutMasks.make_variations(seed=0, control=True), DropoutMasks.make_variations(seed=range(1, 5), at=10)]
    forked = experiment(grid, model=dropout_mlp(), log_every=2)
    assert forked.plan().learner_steps == 10 + 5 * 6  # the prefix once, then the control and 4 children
    plain = experiment(grid, model=dropout_mlp(), log_every=2, fork=False)
    assert plain.plan().learner_steps == 5 * 16
    a, b = forked.run(), plain.run()
    for metric in [*METRICS, "control_distance"]:
        np.testing.assert_array_equal(a[metric].values, b[metric].values)
    final = a.train_loss.sel(step=16).values
    assert len(np.unique(final[~np.isnan(final)])) == 5


def test_spawning_with_both_sources_of_sgd_noise_forks_once_at_k(experiment):
    grid = [DataOrder.make_variations(seed=(1, 2), at=8), DropoutMasks.make_variations(seed=(1, 2), at=8)]
    forked = experiment(grid, model=dropout_mlp(), log_every=4)
    plan = forked.plan()
    assert plan.learner_steps == 8 + 4 * 8  # the learner with neither, up to 8, then each of the 4
    a = forked.run()
    b = experiment(grid, model=dropout_mlp(), log_every=4, fork=False).run()
    for metric in METRICS:
        np.testing.assert_array_equal(a[metric].values, b[metric].values)
    assert dict(a.sizes) == {"data_seed": 2, "dropout_seed": 2, "step": 5}


def test_dropout_masks_say_when_they_act_and_refuse_what_would_change_nothing(experiment):
    assert DropoutMasks(seed=1, at=12).first_active_step() == 12
    assert DropoutMasks(seed=1).first_active_step() == 0
    assert DropoutMasks(seed=0, at=12).is_default() and DropoutMasks(seed=0, at=12).identity() is None
    with pytest.raises(ValueError, match="model has no dropout layer"):
        experiment([DropoutMasks(seed=1)])
    with pytest.raises(ValueError, match="DropoutMasks at= takes a step"):
        DropoutMasks(seed=1, at=-1)
    with pytest.raises(ValueError, match="DropoutMasks at=16 acts before update 17"):
        experiment([DropoutMasks(seed=1, at=16)], model=dropout_mlp())
    experiment([DropoutMasks(seed=1, at=15)], model=dropout_mlp())  # the last update: fine
