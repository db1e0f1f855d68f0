"""Custom metrics written for one model, as in the seed, recorded for every learner: scalars or small tensors,
reading the model, the data, a batch and the control."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from serimats_func.core.data import epoch_order
from serimats_func.interventions import InitWeights, PerturbWeights
from serimats_func.loggers import Logger, register_metric
from serimats_func.models import MLP, Lenet5
from serimats_func.run.training import chunk_hooks, initial_state


class CustomLogger(Logger):  # the seed's example, as written
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    @register_metric
    def weight_norm(self, learner):
        return torch.norm(learner.model.fc1.weight)

    @register_metric
    def weight_space_distance(self, learner):
        return torch.dist(learner.model.fc1.weight, learner.model.fc2.weight)


def test_the_seeds_custom_logger_is_refused_with_the_metric_and_both_shapes_when_built(experiment, mnist_digits, tmp_path):
    x, y = mnist_digits
    with pytest.raises(ValueError, match=r"Metric 'weight_space_distance' failed on a learner: torch\.dist got tensors of "
                                         r"shapes \(120, 400\) and \(84, 120\)"):
        experiment(model=Lenet5(), data=((x[:64], y[:64]), None), logger=CustomLogger(), store=tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_the_seeds_weight_norm_is_recorded_for_every_learner_of_lenet5(experiment, mnist_digits, tmp_path):
    class WeightNorm(Logger):
        @register_metric
        def weight_norm(self, learner):
            return torch.norm(learner.model.fc1.weight)

    x, y = mnist_digits
    exp = experiment([InitWeights.make_variations(seed=range(3))], model=Lenet5(),
                     data=((x[:64], y[:64]), (x[64:96], y[64:96])), logger=WeightNorm(), batch_size=32, steps=2,
                     store=tmp_path / "s.zarr")
    ds = exp.run()
    assert "weight_norm" in ds and ds.weight_norm.dims == ("seed", "step")
    specs = exp.grid.learners
    fc1 = initial_state(specs, chunk_hooks(specs), torch.device("cpu")).params["fc1.weight"]  # (3, 120, 400)
    np.testing.assert_allclose(ds.weight_norm.sel(step=0).values, fc1.flatten(1).norm(dim=1).numpy(), rtol=1e-6)
    assert (ds.weight_norm.sel(step=2) != ds.weight_norm.sel(step=0)).all()  # training moves it


class Rich(Logger):
    @register_metric(dims=("unit",))
    def unit_norms(self, learner):
        return learner.model[1].weight.norm(dim=1)  # (32,)

    @register_metric
    def predicted_classes(self, learner):  # how many test examples the learner puts in each class
        return F.one_hot(learner.model(learner.test.x).argmax(1), 10).sum(0).double()  # (10,)

    @register_metric
    def test_acc_again(self, learner):
        x, y = learner.test
        return (learner.model(x).argmax(1) == y).double().mean()

    @register_metric
    def batch_loss(self, learner):
        return F.cross_entropy(learner.model(learner.batch.x), learner.batch.y)

    @register_metric
    def train_size(self, learner):
        return torch.tensor(float(len(learner.train.y)))

    @register_metric
    def first_layer_from_control(self, learner):
        return torch.dist(learner.model[1].weight, learner.control.model[1].weight)


def test_custom_metrics_read_the_model_data_batch_and_control_and_return_small_tensors(experiment):
    grid = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
            PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(1, 2))]
    exp = experiment(grid, steps=8, log_every=4, logger=Rich())
    ds = exp.run()
    assert ds.unit_norms.dims == ("epsilon", "seed", "step", "unit") and ds.sizes["unit"] == 32
    assert ds.predicted_classes.dims[-1] == "predicted_classes_dim0" and ds.sizes["predicted_classes_dim0"] == 10
    filled = ds.learner != ""
    # what a metric computes from the test set is what the library computes
    np.testing.assert_allclose(ds.test_acc_again.where(filled).values, ds.test_acc.where(filled).values)
    counts = ds.predicted_classes.sum("predicted_classes_dim0").where(filled)
    assert (counts.fillna(256) == 256).all() and int(counts.count()) == 5 * 3  # 5 learners, 3 logged steps
    assert (ds.train_size.where(filled).fillna(512) == 512).all()
    # against the control: the same as the built-in per-layer distance
    np.testing.assert_allclose(ds.first_layer_from_control.values,
                               ds.control_layer_distance.sel(layer="1.weight").values, rtol=1e-6, atol=1e-7)
    # the unit norms at step 0 are the rows of each learner's initial first layer
    specs = exp.grid.learners
    state = initial_state(specs, chunk_hooks(specs), torch.device("cpu"))
    for i, spec in enumerate(specs):
        where = dict(epsilon=spec.coords["epsilon"], seed=spec.coords["seed"], step=0)
        expected = state.params["1.weight"][i].norm(dim=1).double().numpy()
        np.testing.assert_allclose(ds.unit_norms.sel(where).values, expected, rtol=1e-6)
        # learner.batch is the batch the learner trains on next: at step 0, the first batch of its order
        x, y = exp.base.data.x, exp.base.data.y
        idx = epoch_order(spec.data_key, 0, len(x))[:32]
        params = {k: v[i] for k, v in state.params.items()}
        loss = F.cross_entropy(torch.func.functional_call(spec.setup.template, params, (x[idx],)), y[idx])
        assert ds.batch_loss.sel(where).item() == pytest.approx(loss.item(), rel=1e-6)


def test_a_metric_reading_the_control_is_nan_for_learners_without_one(experiment):
    class FromControl(Logger):
        @register_metric
        def gap(self, learner):
            return torch.dist(learner.model[1].weight, learner.control.model[1].weight)

    ds = experiment([InitWeights.make_variations(seed=range(2))], logger=FromControl()).run()
    assert ds.gap.isnull().all() and ds.test_acc.notnull().all()


def test_a_metric_that_fails_only_under_vmap_is_refused_with_a_hint(experiment, small_mnist1d, tmp_path):
    class Sync(Logger):
        @register_metric
        def host(self, learner):
            return torch.tensor(learner.model[1].weight.sum().item())

    with pytest.raises(ValueError, match="Metric 'host' works on one learner but not under torch.func.vmap.*item"):
        experiment(model=MLP(), data=(small_mnist1d[0], None), logger=Sync(), store=tmp_path / "s.zarr")


def test_metric_dimensions_must_be_named_once_per_axis_and_not_clash(experiment, small_mnist1d, tmp_path):
    class WrongCount(Logger):
        @register_metric(dims=("unit", "extra"))
        def norms(self, learner):
            return learner.model[1].weight.norm(dim=1)

    class Clash(Logger):
        @register_metric(dims=("unit",))
        def a(self, learner):
            return learner.model[1].weight.norm(dim=1)  # 100 units

        @register_metric(dims=("unit",))
        def b(self, learner):
            return learner.model[5].weight.norm(dim=1)  # 10 units

    class Coordinate(Logger):
        @register_metric(dims=("seed",))
        def a(self, learner):
            return learner.model[1].weight.norm(dim=1)

    def build(logger):
        return experiment([InitWeights.make_variations(seed=(0, 1))], model=MLP(), data=(small_mnist1d[0], None),
                          logger=logger, store=tmp_path / "s.zarr")

    with pytest.raises(ValueError, match=r"'norms' declares dims=\('unit', 'extra'\) but returns a tensor of shape \(100,\)"):
        build(WrongCount())
    with pytest.raises(ValueError, match="Metrics 'a' and 'b' both name the dimension 'unit' but have sizes 100 and 10"):
        build(Clash())
    with pytest.raises(ValueError, match="Metric 'a' names a dimension 'seed', which the result already has"):
        build(Coordinate())


def test_a_metric_that_returns_too_much_is_refused(experiment, small_mnist1d, tmp_path):
    class Everything(Logger):
        @register_metric
        def weights(self, learner):
            return torch.cat([learner.model[1].weight.flatten(), learner.model[3].weight.flatten()])  # 4000 + 10000

    with pytest.raises(ValueError, match=r"Metric 'weights' returns 14000 numbers.*at most 10000"):
        experiment(model=MLP(), data=(small_mnist1d[0], None), logger=Everything(), store=tmp_path / "s.zarr")


def test_a_metric_may_not_take_a_built_in_metrics_name():
    class Clash(Logger):
        @register_metric
        def control_distance(self, learner):
            return torch.zeros(())

    with pytest.raises(ValueError, match="'control_distance' is taken by a built-in metric"):
        Clash().metric_names()
