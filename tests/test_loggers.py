"""Custom metrics written for one model, as in the seed, recorded for every learner."""

import numpy as np
import pytest
import torch

from serimats_func import Experiment
from serimats_func.interventions import InitWeights, PerturbWeights
from serimats_func.loggers import Logger, register_metric
from serimats_func.models import MLP
from serimats_func.training import chunk_hooks, initial_state


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(40, 40)
        self.fc2 = torch.nn.Linear(40, 40)
        self.out = torch.nn.Linear(40, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CustomLogger(Logger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    @register_metric
    def weight_norm(self, learner):
        return torch.norm(learner.model.fc1.weight)

    @register_metric
    def weight_space_distance(self, learner):
        return torch.dist(learner.model.fc1.weight, learner.model.fc2.weight)


def test_the_seeds_custom_logger_records_its_metrics_for_every_learner(small_mnist1d, tmp_path):
    train, test = small_mnist1d
    exp = Experiment(Net(), train, [InitWeights.make_variations(seed=range(3)), PerturbWeights.make_variations(epsilon=(0, 0.5))],
                     test_dataset=test, steps=6, log_every=3, logger=CustomLogger(), store=tmp_path / "s.zarr", progress=False)
    ds = exp.run()
    assert list(ds.data_vars) == ["train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "weight_space_distance",
                                 "diverged_at"]
    assert ds.weight_norm.dims == ("seed", "epsilon", "step")
    # at step 0 the value is the norm of the learner's own initial fc1 weight
    specs = exp.grid.learners
    params = initial_state(specs, chunk_hooks(specs), torch.device("cpu"))["params"]["fc1.weight"]
    for i, spec in enumerate(specs):
        seed, epsilon = spec.coords["seed"], spec.coords["epsilon"]
        assert ds.weight_norm.sel(seed=seed, epsilon=epsilon, step=0).item() == pytest.approx(params[i].norm().item(), rel=1e-6)
    # a relative perturbation of 0.5 scales the distance from the unperturbed weights, not the norm itself
    assert not np.allclose(ds.weight_norm.sel(epsilon=0.5, step=0), ds.weight_norm.sel(epsilon=0, step=0))
    assert (ds.weight_norm.sel(step=6) != ds.weight_norm.sel(step=0)).all()  # training moves it


def test_a_broken_metric_fails_before_training_with_its_name(small_mnist1d, tmp_path):
    class Broken(Logger):
        @register_metric
        def mismatch(self, learner):
            return torch.dist(learner.model[1].weight, learner.model[3].weight)  # (100, 40) vs (100, 100)

    with pytest.raises(ValueError, match="Metric 'mismatch' failed on a learner"):
        Experiment(MLP(), small_mnist1d[0], logger=Broken(), store=tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_a_metric_that_is_not_a_scalar_is_refused(small_mnist1d, tmp_path):
    class Vector(Logger):
        @register_metric
        def row_norms(self, learner):
            return learner.model[1].weight.norm(dim=1)

    with pytest.raises(ValueError, match="Metric 'row_norms' must return a scalar"):
        Experiment(MLP(), small_mnist1d[0], logger=Vector(), store=tmp_path / "s.zarr")


def test_a_metric_may_not_take_a_default_metrics_name():
    class Clash(Logger):
        @register_metric
        def test_acc(self, learner):
            return torch.zeros(())

    with pytest.raises(ValueError, match="'test_acc' is taken by a default metric"):
        Clash().metric_names()
