"""Coordinates carry what the user gave: ``layers="1.weight"`` is labelled and selected as ``"1.weight"``,
a tuple of layers as ``"1.weight+3.weight"`` or by the same tuple; labels never enter learner ids."""

import matplotlib.pyplot as plt
import pytest
import torch

import serimats_func
from serimats_func.core import labels
from serimats_func.interventions import Optimizer, PerturbGradients, PerturbWeights
from serimats_func.plotter import Plotter
from serimats_func.run.results import store_results
from serimats_func.store.zarr_store import Store

BOTH = ("1.weight", ("1.weight", "3.weight"))


@pytest.fixture
def layered(experiment):
    exp = experiment([PerturbGradients.make_variations(noise=0.1, seed=1, layers=BOTH)], steps=2)
    return exp, exp.run()


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same_params(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_layers_are_labelled_as_given_and_select_by_name(layered):
    exp, ds = layered
    assert ds["layers"].values.tolist() == ["1.weight", "1.weight+3.weight"]
    assert ds.train_loss.sel(layers="1.weight").dims == ("step",)
    assert ds.train_loss.sel(layers="1.weight+3.weight").dims == ("step",)
    stored = store_results(Store(exp.store.path))  # the store's own labels, read without the experiment
    assert sorted(stored["layers"].values.tolist()) == ["1.weight", "1.weight+3.weight"]
    assert stored.train_loss.sel(layers="1.weight").notnull().all()


def test_load_learner_takes_a_single_name_and_a_tuple(layered):
    exp, ds = layered
    one = str(ds.learner.sel(layers="1.weight").item())
    two = str(ds.learner.sel(layers="1.weight+3.weight").item())
    want_one = _params(serimats_func.load_learner(exp.store.path, exp.template, learner=one)[0])
    want_two = _params(serimats_func.load_learner(exp.store.path, exp.template, learner=two)[0])
    assert not _same_params(want_one, want_two)
    for given in ("1.weight", ("1.weight",), ["1.weight"]):
        assert _same_params(_params(exp.load_learner(layers=given)[0]), want_one)
        assert _same_params(_params(serimats_func.load_learner(exp.store.path, exp.template, layers=given)[0]), want_one)
    for given in (("1.weight", "3.weight"), ["1.weight", "3.weight"], "1.weight+3.weight"):
        assert _same_params(_params(exp.load_learner(layers=given)[0]), want_two)
        assert _same_params(_params(serimats_func.load_learner(exp.store.path, exp.template, layers=given)[0]), want_two)
    with pytest.raises(ValueError, match=r"No learner in the experiment .* has layers='3.weight'"):
        exp.load_learner(layers="3.weight")


def test_the_plotter_selects_by_the_given_value(layered):
    _, ds = layered
    for given in (("1.weight", "3.weight"), "1.weight"):
        plt.close(Plotter(ds).curves("train_loss", sel={"layers": given}))
    with pytest.raises(ValueError, match="sel: layers='3.weight' is not a value of layers"):
        Plotter(ds).curves("train_loss", sel={"layers": "3.weight"})


def test_labels_do_not_enter_ids(experiment, monkeypatch):
    grid = [PerturbWeights.make_variations(epsilon=0.01, layers=("3*", ("1.weight", "3.bias"))),
            Optimizer.make_variations(optimizer=torch.optim.Adam, betas=((0.9, 0.999), (0.8, 0.99)))]
    exp = experiment(grid)
    assert exp.grid.dims["layers"] == ["3*", "1.weight+3.bias"]
    assert exp.grid.dims["betas"] == ["(0.9, 0.999)", "(0.8, 0.99)"]  # tuples of numbers keep their repr
    ids = [s.id for s in exp.grid.learners]
    monkeypatch.setattr(labels, "label", str)  # the labels before they carried the given value
    old = experiment(grid)
    assert old.grid.dims["layers"] == ["('3*',)", "('1.weight', '3.bias')"]
    assert [s.id for s in old.grid.learners] == ids
    single = experiment([PerturbWeights.make_variations(epsilon=0.01, layers=["3*", ("1.weight", "3.bias")]),
                         Optimizer.make_variations(optimizer=torch.optim.Adam, betas=((0.9, 0.999), (0.8, 0.99)))])
    assert [s.id for s in single.grid.learners] == ids  # "3*" and ("3*",) are one value


def test_a_label_selects_its_old_spelling():
    assert labels.selects("('1.weight',)", "1.weight")
    assert labels.selects("('1.weight', '3.weight')", ("1.weight", "3.weight"))
    assert labels.selects("('1.weight', '3.weight')", ["1.weight", "3.weight"])
    assert not labels.selects("1.weight", "3.weight") and not labels.selects(0.1, 0.01)
