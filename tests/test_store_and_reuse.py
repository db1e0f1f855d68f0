"""Results survive a kill and a resume; extending a grid trains only what is missing; nothing
in a store is overwritten."""

import hashlib
import os

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from serimats_func import Experiment
from serimats_func.interventions import InitWeights, Optimizer, PerturbWeights
from serimats_func.models import MLP
from serimats_func.store.zarr_store import Store, StoreError
from tests.watching import CountSteps, KilledAfterChunks

GRID = [
    PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
    PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(4)),
]


def experiment(data, store, interventions=GRID, **kw):
    train, test = data
    return Experiment(MLP(widths=(32,)), train, interventions, test_dataset=test, steps=16, batch_size=32,
                      store=store, progress=False, **kw)


def snapshot(path):
    """Every file of a store and a hash of its bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_killed_run_resumes_with_only_the_missing_chunks_and_the_same_numbers(small_mnist1d, tmp_path):
    reference = experiment(small_mnist1d, tmp_path / "ref.zarr", max_learners_per_chunk=3).run()

    killed = KilledAfterChunks(2)
    exp = experiment(small_mnist1d, tmp_path / "run.zarr", max_learners_per_chunk=3, callbacks=[killed])
    with pytest.raises(KeyboardInterrupt):
        exp.run()
    assert killed.sizes == [3, 3]
    # the store opens, and holds the 5 learners of the two finished chunks (each chunk trains the control
    # beside its learners: [control, a, b], [control again, c, d])
    assert len(Store(tmp_path / "run.zarr").index()) == 5
    zarr.open_group(tmp_path / "run.zarr", mode="r")

    resumed = experiment(small_mnist1d, tmp_path / "run.zarr", max_learners_per_chunk=3)
    plan = resumed.plan()
    assert (plan.in_store, plan.to_train) == (5, 4)
    ds = resumed.run()
    for metric in ds.data_vars:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values)


def test_extending_the_grid_trains_only_new_learners_and_overwrites_nothing(small_mnist1d, tmp_path):
    store = tmp_path / "grid.zarr"
    first = experiment(small_mnist1d, store).run()
    before = snapshot(store)

    bigger = GRID + [PerturbWeights.make_variations(epsilon=(0.001,), seed=range(4))]
    exp = experiment(small_mnist1d, store, bigger)
    assert (exp.plan().in_store, exp.plan().to_train) == (9, 4)
    ds = exp.run()

    after = snapshot(store)
    assert all(after[p] == h for p, h in before.items())  # every old file is still there, unchanged
    assert ds.epsilon.values.tolist() == [0.0, 0.01, 0.1, 0.001]
    np.testing.assert_array_equal(ds.test_acc.sel(epsilon=[0.0, 0.01, 0.1]).values, first.test_acc.values)
    assert experiment(small_mnist1d, store, bigger).plan().to_train == 0


def test_adding_init_weights_with_its_default_seed_names_the_same_learners(small_mnist1d, tmp_path):
    store = tmp_path / "s.zarr"
    experiment(small_mnist1d, store).run()
    with_init = GRID + [InitWeights.make_variations(seed=(0, 1))]
    plan = experiment(small_mnist1d, store, with_init).plan()
    assert (plan.in_store, plan.to_train) == (9, 9)  # seed 0 is the default: reused


def test_changing_the_setup_makes_new_learners(small_mnist1d, tmp_path):
    store = tmp_path / "s.zarr"
    experiment(small_mnist1d, store).run()
    train, test = small_mnist1d
    longer = Experiment(MLP(widths=(32,)), train, GRID, test_dataset=test, steps=20, batch_size=32, store=store, progress=False)
    assert longer.plan().to_train == 9
    other_lr = experiment(small_mnist1d, store, optimizer=Optimizer(torch.optim.SGD, lr=0.05))
    assert other_lr.plan().to_train == 9


def test_a_half_written_batch_is_ignored_and_the_store_still_opens(small_mnist1d, tmp_path):
    store = tmp_path / "s.zarr"
    ds = experiment(small_mnist1d, store).run()
    (store / ".pending" / "crashed" / "train_loss").mkdir(parents=True)
    (store / ".pending" / "crashed" / "zarr.json").write_text("{truncated")
    again = experiment(small_mnist1d, store)
    assert again.plan().to_train == 0
    xr.testing.assert_identical(again.run(), ds)


def test_a_path_that_is_not_a_store_is_refused_before_anything_is_written(small_mnist1d, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a serimats-func store"):
        experiment(small_mnist1d, folder)
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w", zarr_format=3).attrs["owner"] = "someone else"
    with pytest.raises(StoreError, match="not a serimats-func store"):
        experiment(small_mnist1d, other)
    assert sorted(os.listdir(folder)) == ["todo.txt"]


def test_stored_batches_carry_each_learners_resolved_configuration(small_mnist1d, tmp_path):
    store = tmp_path / "s.zarr"
    ds = experiment(small_mnist1d, store).run()
    configs = Store(store).configs()
    learner = str(ds.learner.sel(epsilon=0.1, seed=2).values)
    assert configs[learner]["interventions"] == {"PerturbWeights": {"epsilon": 0.1, "seed": 2, "mode": "relative", "at": 0,
                                                                    "layers": None}}
    assert configs[learner]["coords"] == {"epsilon": 0.1, "seed": 2}
    assert configs[learner]["optimizer"] == {"optimizer": "SGD", "lr": 0.01, "momentum": 0.9, "dampening": 0.0,
                                             "weight_decay": 0.0, "nesterov": False}
    # the stored metrics read back through plain xarray
    batch = Store(store).batches()[0]
    raw = xr.open_zarr(store / "batches" / batch, consolidated=False)
    assert raw.train_loss.dims == ("learner", "step") and raw.attrs["learner_ids"]


def test_a_group_too_large_for_memory_is_split_into_chunks_with_the_same_numbers(small_mnist1d, tmp_path, monkeypatch):
    whole = experiment(small_mnist1d, tmp_path / "whole.zarr")
    per_learner = next(iter(whole.plan().bytes_per_learner.values()))
    monkeypatch.setattr("serimats_func.run.planning.memory_budget", lambda device: 4 * per_learner + whole.data_bytes)
    small = experiment(small_mnist1d, tmp_path / "small.zarr")
    assert [len(c.learners) for c in small.plan().chunks] == [4, 4, 3]  # the control trains beside each chunk
    assert "3 chunk(s) of up to 4" in str(small.plan())
    xr.testing.assert_equal(small.run().drop_vars("learner"), whole.run().drop_vars("learner"))


def test_run_with_plot_saves_one_png_per_metric_beside_the_store(small_mnist1d, tmp_path):
    experiment(small_mnist1d, tmp_path / "p.zarr").run(plot=True)
    pngs = sorted(p.name for p in (tmp_path / "p_plots").iterdir())
    assert {"curves_test_acc.png", "curves_test_loss.png", "curves_train_acc.png", "curves_train_loss.png",
            "curves_control_distance.png", "scaling_control_distance.png"} <= set(pngs)


def checkpoints_in(store) -> list[str]:
    return sorted(p.name for p in (store / "checkpoints").iterdir() if p.name != "zarr.json")


def test_a_run_that_crashes_mid_chunk_resumes_from_its_last_checkpoint_with_the_same_numbers(small_mnist1d, tmp_path):
    reference = experiment(small_mnist1d, tmp_path / "ref.zarr").run()
    steps = CountSteps(crash_before=11, error=RuntimeError("the machine went down"))
    store = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError, match="went down"):
        experiment(small_mnist1d, store, checkpoint_every=4, callbacks=[steps]).run()
    assert len(checkpoints_in(store)) == 1  # saved after steps 4 and 8: the older one is gone
    assert Store(store).index() == {}

    steps.calls.clear()
    ds = experiment(small_mnist1d, store, checkpoint_every=4, callbacks=[steps]).run()
    assert steps.calls == list(range(9, 17))  # resumed from step 8
    for metric in ds.data_vars:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values)
    assert checkpoints_in(store) == []  # removed once the results are stored


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_the_rerun_goes_on_from_there(small_mnist1d, tmp_path):
    reference = experiment(small_mnist1d, tmp_path / "ref.zarr").run()
    steps = CountSteps(crash_before=11, error=KeyboardInterrupt())
    store = tmp_path / "run.zarr"
    with pytest.raises(KeyboardInterrupt, match=r"Interrupted at step 10 of 16: the chunk is saved in .*checkpoints.* "
                                                r"Run the same experiment again \(exp.run\(\)\) to resume from step 10"):
        experiment(small_mnist1d, store, callbacks=[steps]).run()  # no checkpoint_every: only the interruption saves one
    assert len(checkpoints_in(store)) == 1

    steps.calls.clear()
    ds = experiment(small_mnist1d, store, callbacks=[steps]).run()
    assert steps.calls == list(range(11, 17))
    for metric in ds.data_vars:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values)
    assert checkpoints_in(store) == []


def test_a_different_dropout_rate_or_loss_setting_makes_new_learners(small_mnist1d, tmp_path):
    train, test = small_mnist1d
    store = tmp_path / "s.zarr"

    def plan(model, loss=torch.nn.functional.cross_entropy):
        return Experiment(model, train, GRID, test_dataset=test, steps=4, store=store, loss=loss, progress=False)

    plan(MLP(widths=(16,), dropout=0.2)).run()
    assert plan(MLP(widths=(16,), dropout=0.2)).plan().to_train == 0
    assert plan(MLP(widths=(16,), dropout=0.7)).plan().to_train == 9
    assert plan(MLP(widths=(16,), dropout=0.2), torch.nn.CrossEntropyLoss(label_smoothing=0.3)).plan().to_train == 9
    assert plan(MLP(widths=(16,), dropout=0.2), lambda logits, y: (logits - 1).pow(2).mean()).plan().to_train == 9
