"""Results survive a kill and a resume; extending a grid trains only what is missing; nothing
in a store is overwritten."""

import hashlib
import os

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from serimats_func.interventions import InitWeights, Optimizer, PerturbWeights
from serimats_func.models import MLP
from serimats_func.store.zarr_store import Store, StoreError
from tests import store_paths
from tests.watching import CountSteps, KilledAfterChunks

GRID = [
    PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
    PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(4)),
]


def snapshot(path):
    """Every file of a store and a hash of its bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_killed_run_resumes_with_only_the_missing_chunks_and_the_same_numbers(experiment, tmp_path):
    reference = experiment(GRID, store=tmp_path / "ref.zarr", max_learners_per_chunk=3).run()

    killed = KilledAfterChunks(2)
    exp = experiment(GRID, store=tmp_path / "run.zarr", max_learners_per_chunk=3, callbacks=[killed])
    with pytest.raises(KeyboardInterrupt):
        exp.run()
    assert killed.sizes == [3, 3]
    # the store opens, and holds the 5 learners of the two finished chunks (each chunk trains the control
    # beside its learners: [control, a, b], [control again, c, d])
    assert len(Store(tmp_path / "run.zarr").index()) == 5
    zarr.open_group(tmp_path / "run.zarr", mode="r")

    resumed = experiment(GRID, store=tmp_path / "run.zarr", max_learners_per_chunk=3)
    plan = resumed.plan()
    assert (plan.in_store, plan.to_train) == (5, 4)
    ds = resumed.run()
    for metric in ds.data_vars:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values)


def test_extending_the_grid_trains_only_new_learners_and_overwrites_nothing(experiment, tmp_path):
    store = tmp_path / "grid.zarr"
    first = experiment(GRID, store=store).run()
    before = snapshot(store)

    bigger = GRID + [PerturbWeights.make_variations(epsilon=(0.001,), seed=range(4))]
    exp = experiment(bigger, store=store)
    assert (exp.plan().in_store, exp.plan().to_train) == (9, 4)
    ds = exp.run()

    after = snapshot(store)
    assert all(after[p] == h for p, h in before.items())  # every old file is still there, unchanged
    assert ds.epsilon.values.tolist() == [0.0, 0.01, 0.1, 0.001]
    np.testing.assert_array_equal(ds.test_acc.sel(epsilon=[0.0, 0.01, 0.1]).values, first.test_acc.values)
    assert experiment(bigger, store=store).plan().to_train == 0


def test_adding_init_weights_with_its_default_seed_names_the_same_learners(experiment, tmp_path):
    store = tmp_path / "s.zarr"
    experiment(GRID, store=store).run()
    with_init = GRID + [InitWeights.make_variations(seed=(0, 1))]
    plan = experiment(with_init, store=store).plan()
    assert (plan.in_store, plan.to_train) == (9, 9)  # seed 0 is the default: reused


def test_changing_the_setup_makes_new_learners(experiment, tmp_path):
    store = tmp_path / "s.zarr"
    experiment(GRID, store=store).run()
    longer = experiment(GRID, store=store, steps=20)
    assert longer.plan().to_train == 9
    other_lr = experiment(GRID, store=store, optimizer=Optimizer(torch.optim.SGD, lr=0.05))
    assert other_lr.plan().to_train == 9


def test_a_half_written_batch_is_ignored_and_the_store_still_opens(experiment, tmp_path):
    store = tmp_path / "s.zarr"
    ds = experiment(GRID, store=store).run()
    (store_paths.pending(store) / "crashed" / "train_loss").mkdir(parents=True)
    (store_paths.pending(store) / "crashed" / store_paths.METADATA).write_text("{truncated")
    again = experiment(GRID, store=store)
    assert again.plan().to_train == 0
    xr.testing.assert_identical(again.run(), ds)


def test_a_path_that_is_not_a_store_is_refused_before_anything_is_written(experiment, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a serimats-func store"):
        experiment(GRID, store=folder)
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w", zarr_format=3).attrs["owner"] = "someone else"
    with pytest.raises(StoreError, match="not a serimats-func store"):
        experiment(GRID, store=other)
    assert sorted(os.listdir(folder)) == ["todo.txt"]


def test_stored_batches_carry_each_learners_resolved_configuration(experiment, tmp_path):
    store = tmp_path / "s.zarr"
    ds = experiment(GRID, store=store).run()
    configs = Store(store).configs()
    learner = str(ds.learner.sel(epsilon=0.1, seed=2).values)
    assert configs[learner]["interventions"] == {"PerturbWeights": {"epsilon": 0.1, "seed": 2, "mode": "relative", "at": 0,
                                                                    "layers": None}}
    assert configs[learner]["coords"] == {"epsilon": 0.1, "seed": 2}
    assert configs[learner]["optimizer"] == {"optimizer": "SGD", "lr": 0.01, "momentum": 0.9, "dampening": 0.0,
                                             "weight_decay": 0.0, "nesterov": False}
    # the stored metrics read back through plain xarray
    batch = Store(store).batches()[0]
    raw = xr.open_zarr(store_paths.batch(store, batch), consolidated=False)
    assert raw.train_loss.dims == ("learner", "step") and raw.attrs["learner_ids"]


def test_a_group_too_large_for_memory_is_split_into_chunks_with_the_same_numbers(experiment, tmp_path, monkeypatch):
    whole = experiment(GRID, store=tmp_path / "whole.zarr")
    per_learner = next(iter(whole.plan().bytes_per_learner.values()))
    monkeypatch.setattr("serimats_func.run.planning.memory_budget", lambda device: 4 * per_learner + whole.data_bytes)
    small = experiment(GRID, store=tmp_path / "small.zarr")
    assert [len(c.learners) for c in small.plan().chunks] == [4, 4, 3]  # the control trains beside each chunk
    assert "3 chunk(s) of up to 4" in str(small.plan())
    xr.testing.assert_equal(small.run().drop_vars("learner"), whole.run().drop_vars("learner"))


def test_run_with_plot_saves_one_png_per_metric_beside_the_store(experiment, tmp_path):
    experiment(GRID, store=tmp_path / "p.zarr").run(plot=True)
    pngs = sorted(p.name for p in (tmp_path / "p_plots").iterdir())
    assert {"curves_test_acc.png", "curves_test_loss.png", "curves_train_acc.png", "curves_train_loss.png",
            "curves_control_distance.png", "scaling_control_distance.png"} <= set(pngs)


def test_a_run_that_crashes_mid_chunk_resumes_from_its_last_checkpoint_with_the_same_numbers(experiment, tmp_path):
    reference = experiment(GRID, store=tmp_path / "ref.zarr").run()
    steps = CountSteps(crash_before=11, error=RuntimeError("the machine went down"))
    store = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError, match="went down"):
        experiment(GRID, store=store, checkpoint_every=4, callbacks=[steps]).run()
    assert len(store_paths.checkpoint_names(store)) == 1  # saved after steps 4 and 8: the older one is gone
    assert Store(store).index() == {}

    steps.calls.clear()
    ds = experiment(GRID, store=store, checkpoint_every=4, callbacks=[steps]).run()
    assert steps.calls == list(range(9, 17))  # resumed from step 8
    for metric in ds.data_vars:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values)
    assert store_paths.checkpoint_names(store) == []  # removed once the results are stored


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_the_rerun_goes_on_from_there(experiment, tmp_path):
    reference = experiment(GRID, store=tmp_path / "ref.zarr").run()
    steps = CountSteps(crash_before=11, error=KeyboardInterrupt())
    store = tmp_path / "run.zarr"
    with pytest.raises(KeyboardInterrupt, match=r"Interrupted at step 10 of 16: the chunk is saved in .*checkpoints.* "
                                                r"Run the same experiment again \(exp.run\(\)\) to resume from step 10"):
        experiment(GRID, store=store, callbacks=[steps]).run()  # no checkpoint_every: only the interruption saves one
    assert len(store_paths.checkpoint_names(store)) == 1

    steps.calls.clear()
    ds = experiment(GRID, store=store, callbacks=[steps]).run()
    assert steps.calls == list(range(11, 17))
    for metric in ds.data_vars:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values)
    assert store_paths.checkpoint_names(store) == []


def test_a_different_dropout_rate_or_loss_setting_makes_new_learners(experiment, tmp_path):
    store = tmp_path / "s.zarr"

    def plan(model, loss=torch.nn.functional.cross_entropy):
        return experiment(GRID, model=model, store=store, steps=4, batch_size=64, loss=loss)

    plan(MLP(widths=(16,), dropout=0.2)).run()
    assert plan(MLP(widths=(16,), dropout=0.2)).plan().to_train == 0
    assert plan(MLP(widths=(16,), dropout=0.7)).plan().to_train == 9
    assert plan(MLP(widths=(16,), dropout=0.2), torch.nn.CrossEntropyLoss(label_smoothing=0.3)).plan().to_train == 9
    assert plan(MLP(widths=(16,), dropout=0.2), lambda logits, y: (logits - 1).pow(2).mean()).plan().to_train == 9
