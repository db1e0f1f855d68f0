"""A learner gives the same numbers whether it trains alone or with others."""

import numpy as np
import pytest
import torch
from torch import nn

from serimats_func.interventions import DataOrder, InitWeights, PerturbWeights
from serimats_func.models import MLP, Lenet5
from tests.builders import make_experiment

FIRST_EXAMPLE = [
    PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
    PerturbWeights.make_variations(epsilon=(0.001, 0.01, 0.1), seed=range(10)),
]
METRICS = ["train_loss", "train_acc", "test_loss", "test_acc"]


def run(model, data, interventions, tmp_path, name, **kw):
    kw = {"steps": 24, "log_every": 8, "batch_size": 32, **kw}
    return make_experiment(interventions, model=model, data=data, store=tmp_path / f"{name}.zarr", **kw).run()


def test_mlp_learner_in_batch_of_31_is_bitwise_the_same_alone(small_mnist1d, tmp_path):
    batch = run(MLP(), small_mnist1d, FIRST_EXAMPLE, tmp_path, "batch")
    alone = run(MLP(), small_mnist1d, [PerturbWeights(epsilon=0.01, seed=7)], tmp_path, "alone")
    assert batch.sizes["epsilon"] * batch.sizes["seed"] == 40 and int(batch.train_loss.count("step").astype(bool).sum()) == 31
    for metric in METRICS:
        np.testing.assert_array_equal(batch[metric].sel(epsilon=0.01, seed=7).values, alone[metric].values)
    # and the learners do differ from one another, so the equality above is not trivial
    assert batch.train_loss.sel(epsilon=0.01, seed=7, step=24) != batch.train_loss.sel(epsilon=0.01, seed=6, step=24)


def test_splitting_a_group_into_chunks_changes_no_number(small_mnist1d, tmp_path):
    whole = run(MLP(), small_mnist1d, FIRST_EXAMPLE, tmp_path, "whole")
    chunked = run(MLP(), small_mnist1d, FIRST_EXAMPLE, tmp_path, "chunked", max_learners_per_chunk=6)
    for metric in METRICS:
        np.testing.assert_array_equal(whole[metric].values, chunked[metric].values)


def test_lenet5_learner_in_batch_matches_alone_to_float32_rounding(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    data = ((x, y), (x[:32], y[:32]))
    grid = [InitWeights.make_variations(seed=range(6))]
    batch = run(Lenet5(), data, grid, tmp_path, "batch", steps=6, log_every=2)
    alone = run(Lenet5(), data, [InitWeights(seed=4)], tmp_path, "alone", steps=6, log_every=2)
    for metric in ["train_loss", "test_loss"]:
        np.testing.assert_allclose(batch[metric].sel(seed=4).values, alone[metric].values, rtol=1e-5)
    assert not np.allclose(batch.train_loss.sel(seed=4).values, batch.train_loss.sel(seed=3).values)


class BatchNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


def test_batchnorm_statistics_and_dropout_masks_are_per_learner(small_mnist1d, tmp_path):
    grid = [InitWeights.make_variations(seed=range(4)), DataOrder.make_variations(seed=range(2))]
    batch = run(BatchNormMLP(), small_mnist1d, grid, tmp_path, "batch")
    alone = run(BatchNormMLP(), small_mnist1d, [InitWeights(seed=2), DataOrder(seed=1)], tmp_path, "alone")
    assert dict(batch.sizes) == {"init_seed": 4, "data_seed": 2, "step": 4}
    for metric in METRICS:
        np.testing.assert_array_equal(batch[metric].sel(init_seed=2, data_seed=1).values, alone[metric].values)


def test_dropout_masks_depend_on_the_learners_key_not_on_global_rng(small_mnist1d, tmp_path):
    model = MLP(widths=(64,), dropout=0.5)
    first = run(model, small_mnist1d, [InitWeights(seed=1)], tmp_path, "first")
    torch.manual_seed(999)  # the global RNG plays no part
    second = run(model, small_mnist1d, [InitWeights(seed=1)], tmp_path, "second")
    np.testing.assert_array_equal(first.train_loss.values, second.train_loss.values)
    without = run(MLP(widths=(64,)), small_mnist1d, [InitWeights(seed=1)], tmp_path, "without")
    assert not np.array_equal(first.train_loss.values, without.train_loss.values)  # dropout did act


@pytest.mark.parametrize("dtype", [torch.float64])
def test_float64_training_runs_end_to_end(small_mnist1d, tmp_path, dtype):
    ds = run(MLP(widths=(16,)), small_mnist1d, [InitWeights.make_variations(seed=range(2))], tmp_path, "f64", dtype=dtype)
    assert ds.train_loss.isel(step=-1).max() < ds.train_loss.isel(step=0).min()


def test_widths_by_batch_sizes_by_init_seeds_is_one_result_and_each_learner_is_itself_alone(experiment):
    from serimats_func.interventions import BatchSize, Model

    grid = [Model.make_variations(factory=lambda width: MLP(widths=(width,)), width=(8, 16, 32)),
            BatchSize.make_variations(batch_size=(16, 32)), InitWeights.make_variations(seed=range(5))]
    together = experiment(grid, steps=12, log_every=4)
    assert len(together.plan().chunks) == 6  # one group per width and batch size
    ds = together.run()
    assert dict(ds.sizes) == {"width": 3, "batch_size": 2, "seed": 5, "step": 4}
    alone = experiment(grid, steps=12, log_every=4, max_learners_per_chunk=1).run()
    for metric in METRICS:
        np.testing.assert_array_equal(ds[metric].values, alone[metric].values)
    single = experiment([Model(factory=lambda width: MLP(widths=(width,)), width=16), BatchSize(batch_size=16),
                         InitWeights(seed=3)], steps=12, log_every=4).run()
    np.testing.assert_array_equal(ds.train_loss.sel(width=16, batch_size=16, seed=3).values, single.train_loss.values)
    assert len(np.unique(ds.train_loss.isel(step=-1))) == 30


@pytest.mark.slow
def test_a_grid_mixing_every_intervention_gives_each_learner_bitwise_what_it_gets_alone(experiment):
    from serimats_func.interventions import PerturbActivations, PerturbGradients, PerturbMomentum

    grid = [
        InitWeights.make_variations(seed=(0, 1)),
        DataOrder.make_variations(seed=(0, 1)),
        PerturbWeights.make_variations(epsilon=(0.0, 0.01), at=4),
        PerturbGradients.make_variations(noise=(0.0, 0.01), when=(2, 6)),
        PerturbMomentum.make_variations(momentum=(None, 0.5), when=(3, 7)),
        PerturbActivations.make_variations(module="2", zero=((), (1, 2)), when=(1, 5)),
    ]
    together = experiment(grid, steps=10, log_every=1, fork=False)
    assert len(together.grid.learners) == 64 and len(together.plan().chunks) == 1
    ds = together.run()
    alone = experiment(grid, steps=10, log_every=1, max_learners_per_chunk=1, fork=False).run()
    forked = experiment(grid, steps=10, log_every=1).run()  # prefixes trained once, learners forked from them
    for metric in METRICS:
        np.testing.assert_array_equal(ds[metric].values, alone[metric].values)
        np.testing.assert_array_equal(forked[metric].values, alone[metric].values)
    assert len(np.unique(ds.train_loss.isel(step=-1))) == 64


def test_the_training_step_has_no_branch_on_values_and_no_host_sync(experiment):
    """The whole step of a chunk mixing every built-in runs on meta tensors, which have shapes but no values:
    any .item(), float(tensor), `if tensor:`, .cpu() or .numpy() inside it would fail there."""
    from serimats_func.core.step import make_train_step
    from serimats_func.interventions import PerturbActivations, PerturbGradients, PerturbMomentum
    from serimats_func.run.training import chunk_hooks, chunk_optimizer, initial_state

    exp = experiment([PerturbWeights.make_variations(epsilon=(0.0, 0.01), at=(0, 4)),
                      PerturbGradients.make_variations(noise=(0.0, 0.01), when=(2, 6)),
                      PerturbMomentum.make_variations(momentum=(None, 0.5), when=(3, 7)),
                      PerturbActivations.make_variations(module="2", zero=((), (1, 2))),
                      DataOrder.make_variations(seed=(0, 1))], model=MLP(widths=(32,), dropout=0.2))
    specs = exp.grid.learners
    hooks = chunk_hooks(specs)
    assert all(len(hooks.at(point)) == 1 for point in ("on_gradients", "on_hyperparameters", "on_activations", "on_params"))
    step = make_train_step(specs[0].setup.template, chunk_optimizer(specs), torch.nn.functional.cross_entropy, hooks,
                           shared_batch=False)
    meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    from serimats_func.core import pytrees

    state = pytrees.tree_map(meta, initial_state(specs, hooks, torch.device("cpu")))
    x, y = torch.empty(len(specs), 32, 40, device="meta"), torch.empty(len(specs), 32, dtype=torch.long, device="meta")
    new_state, loss = step(state, x, y, torch.zeros((), dtype=torch.int64, device="meta"))
    assert loss.shape == (len(specs),) and loss.device.type == "meta"
    assert new_state.params["1.weight"].shape == (len(specs), 32, 40)
