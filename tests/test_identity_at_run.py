"""Ids are taken again at ``run()``: what the code reads may change between ``Experiment(...)`` and ``run()`` (a
global, a tensor held by a closure, edited in place), and numbers must never be stored under the id of what was
there before. And the behaviour probe sees every class of the labels, so that a change to one class shows."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from serimats_func.core.learners import PROBE_EXAMPLES, probe_batch
from serimats_func.interventions import InitWeights
from serimats_func.models import MLP
from tests.builders import small_mnist1d
from tests.test_identity import load

GRID = [InitWeights.make_variations(seed=range(2))]

SMOOTHED = """
import torch.nn.functional as F

SMOOTH = 0.1

def loss(logits, y):
    return F.cross_entropy(logits, y, label_smoothing=SMOOTH)
"""

CLASS_WEIGHT = """
import torch
import torch.nn.functional as F

class cfg:
    W9 = 1.0

def loss(logits, y):
    weights = torch.ones(10)
    weights[9] = getattr(cfg, "W" + "9")  # an attribute named by a computed string: no reading of code sees it
    return F.cross_entropy(logits, y, weight=weights)
"""


def _trained_then_changed(experiment, store, change, loss):
    """Build an experiment, ``change()`` what its loss reads, run it: its ids then, and the ids of an experiment
    built after the change."""
    exp = experiment(GRID, loss=loss, store=store, steps=2)
    built = {s.id for s in exp.grid.learners}
    change()
    with pytest.warns(UserWarning, match=r"the loss.*changed since this Experiment was built.*2 of 2 learners now "
                                         r"have new ids"):
        ds = exp.run()
    after = {s.id for s in experiment(GRID, loss=loss, store=store, steps=2).grid.learners}
    return built, set(ds.learner.values.ravel()), after


def test_a_global_the_loss_reads_changed_between_build_and_run_names_new_learners(experiment, tmp_path, store):
    module = load(tmp_path, SMOOTHED)
    built, ran, after = _trained_then_changed(experiment, store, lambda: setattr(module, "SMOOTH", 0.3), module.loss)
    assert ran == after and not ran & built  # stored under the ids of the code as it ran
    fresh = experiment(GRID, loss=module.loss, store=store, steps=2)
    assert fresh.plan().in_store == 2  # and an experiment built now reuses them


def test_a_closure_tensor_edited_in_place_between_build_and_run_names_new_learners(experiment, store):
    weight = torch.ones(10)

    def loss(logits, y):
        return F.cross_entropy(logits, y, weight=weight)

    built, ran, after = _trained_then_changed(experiment, store, lambda: weight[3:].mul_(2.0), loss)
    assert ran == after and not ran & built


def test_nothing_changed_gives_the_built_ids_and_no_warning(experiment, tmp_path):
    module = load(tmp_path, SMOOTHED)
    exp = experiment(GRID, loss=module.loss, steps=2)
    built = [s.id for s in exp.grid.learners]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = exp.run()
        assert exp.plan().in_store == 2
    assert sorted(ds.learner.values.ravel()) == sorted(built)


def test_a_metric_edited_between_build_and_run_is_recorded_under_its_new_key(experiment, tmp_path):
    module = load(tmp_path, """
        from serimats_func.loggers import Logger, register_metric

        SCALE = 1.0

        class Scaled(Logger):
            @register_metric
            def scaled_norm(self, learner):
                return learner.model[1].weight.norm() * SCALE
        """)
    exp = experiment(GRID, logger=module.Scaled(), steps=2)
    before = exp.metric_keys(exp.grid.learners[0])["scaled_norm"]
    module.SCALE = 2.0
    with pytest.warns(UserWarning, match="the code of metric 'scaled_norm' changed"):
        exp.run()
    assert exp.metric_keys(exp.grid.learners[0])["scaled_norm"] != before
    assert [s.id for s in exp.grid.learners] == [s.id for s in experiment(GRID, steps=2).grid.learners]


def test_the_probe_shows_every_class_and_the_corners_of_the_data():
    train, _ = small_mnist1d()
    x, y = train.tensors
    assert set(y[:PROBE_EXAMPLES].tolist()) != set(range(10))  # the first examples miss classes
    xb, yb = probe_batch(x, y)
    assert sorted(set(yb.tolist())) == list(range(10)) and len(xb) == 13
    torch.testing.assert_close(xb[10:], torch.stack([torch.zeros(40), x.amax(0), x.amin(0)]), rtol=0, atol=0)


def test_a_class_weight_of_one_class_read_through_getattr_names_new_learners(experiment, tmp_path):
    a, b = load(tmp_path, CLASS_WEIGHT), load(tmp_path, CLASS_WEIGHT)
    b.cfg.W9 = 2.0
    ids = [[s.id for s in experiment(GRID, loss=m.loss, steps=2).grid.learners] for m in (a, b, load(tmp_path, CLASS_WEIGHT))]
    assert ids[0] != ids[1] and ids[0] == ids[2]


def test_between_build_and_run_too(experiment, tmp_path, store):
    module = load(tmp_path, CLASS_WEIGHT)
    built, ran, after = _trained_then_changed(experiment, store, lambda: setattr(module.cfg, "W9", 3.0), module.loss)
    assert ran == after and not ran & built


def test_setups_of_library_parts_keep_their_ids(experiment):
    """Built-in models with torch's losses are described whole by their code and values: the wider probe is not
    part of their ids, which stay those they had before it (pinned: tests/test_registries.py)."""
    exp = experiment(GRID, model=MLP(widths=(32,)), loss=F.cross_entropy)
    setup = exp.grid.learners[0].setup
    from serimats_func.run.identity import runs_user_code

    assert not runs_user_code(setup.template, F.cross_entropy)
    assert runs_user_code(setup.template, lambda logits, y: F.cross_entropy(logits, y))
