"""The store over a learner's life: longer training continues from stored states, kept states come back as
plain PyTorch, checkpoints outlive a change of chunking, debris of killed processes is cleaned, faults end
with a clear message, claims keep two runs on one store from training a learner twice, and anyone can read
the store."""

import errno
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from serimats_func import load_learner, open_store
from serimats_func.core.data import epoch_order, steps_per_epoch
from serimats_func.interventions import Optimizer, PerturbWeights
from serimats_func.store.locks import Claims, FileLock
from serimats_func.store.zarr_store import Store, StoreWriteError
from tests import store_paths
from tests.reference import assert_same_learner
from tests.watching import CountSteps

GRID = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
        PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(4))]
FOUR = [PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(2))]


def assert_same_metrics(ds: xr.Dataset, reference: xr.Dataset) -> None:
    assert set(ds.data_vars) == set(reference.data_vars)
    for name in reference.data_vars:
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)




# -- longer training -------------------------------------------------------------------------------------

def test_50_steps_then_100_continues_from_the_final_states_bitwise_equal_to_100_at_once(experiment, tmp_path):
    """The issue's 500 then 1000 steps, scaled down tenfold to keep the suite fast (the same code path)."""
    grid = [PerturbWeights.make_variations(epsilon=(0.0, 0.01), seed=0),
            PerturbWeights.make_variations(epsilon=0.1, seed=1)]
    store = tmp_path / "longer.zarr"
    short = experiment(grid, steps=50, store=store).run()
    longer = experiment(grid, steps=100, store=store)
    plan = longer.plan()
    assert (plan.in_store, plan.to_train, plan.continuing) == (0, 3, {"from step 50 (final state)": 3})
    assert "3 of them continue from stored states (0 from scratch): 3 from step 50 (final state)" in str(plan)
    continued = longer.run()
    at_once = experiment(grid, steps=100, store=tmp_path / "once.zarr").run()

    assert_same_metrics(continued, at_once)
    common = [0, 16, 32, 48]  # the short run also logged its last step, 50
    assert_same_metrics(continued.sel(step=common), short.sel(step=common))
    newest = Store(store).sources(checkpoints=False)[-1]
    assert min(newest.steps) == 64  # the continuation's batch holds only the new observations
    for seed in (0, 1):
        learner = str(at_once.learner.sel(epsilon=0.1 if seed else 0.01, seed=seed).values)
        a, _ = load_learner(store, longer.template, learner=learner)
        b, _ = load_learner(tmp_path / "once.zarr", longer.template, learner=learner)
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


def test_logging_more_often_continues_from_the_kept_state_before_the_first_missing_step(experiment, tmp_path):
    store = tmp_path / "s.zarr"
    experiment(FOUR, steps=32, keep_every=8, store=store).run()
    denser = experiment(FOUR, steps=32, log_every=12, store=store)  # needs step 12, which is not stored
    plan = denser.plan()
    assert (plan.to_train, plan.continuing) == (4, {"from step 8 (kept state)": 4})
    assert_same_metrics(denser.run(), experiment(FOUR, steps=32, log_every=12, store=tmp_path / "ref.zarr").run())


def test_a_checkpoint_survives_a_change_of_chunking(experiment, tmp_path):
    reference = experiment(FOUR, checkpoint_every=4, store=tmp_path / "ref.zarr").run()
    store = tmp_path / "s.zarr"
    steps = CountSteps(crash_before=11)
    with pytest.raises(RuntimeError, match="went down"):  # one chunk of 4: a checkpoint at step 8
        experiment(FOUR, checkpoint_every=4, store=store, callbacks=[steps]).run()
    assert len(store_paths.checkpoint_names(store)) == 1

    steps.calls.clear()
    rechunked = experiment(FOUR, checkpoint_every=4, max_learners_per_chunk=3, store=store, callbacks=[steps])
    plan = rechunked.plan()
    assert [len(c.learners) for c in plan.chunks] == [3, 1] and plan.continuing == {"from step 8 (checkpoint)": 4}
    ds = rechunked.run()
    assert steps.calls == 2 * list(range(9, 17))  # each new chunk went on from the old chunk's checkpoint
    assert_same_metrics(ds, reference)
    assert store_paths.checkpoint_names(store) == []


# -- kept states as plain PyTorch --------------------------------------------------------------------------

def go_on_with_torch(module, optimizer, spec, start: int, stop: int, scheduler=None) -> None:
    """Plain PyTorch training from ``start`` to ``stop`` on the learner's own batches (stepping ``scheduler``, if
    given, after each update)."""
    x, y, size = spec.setup.data.x, spec.setup.data.y, spec.setup.batch_size
    per_epoch = steps_per_epoch(len(x), size)
    module.train()
    for step in range(start, stop):
        epoch, position = divmod(step, per_epoch)
        idx = epoch_order(spec.data_key, epoch, len(x))[position * size : (position + 1) * size]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x[idx]), y[idx]).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("optimizer", [Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                       Optimizer(torch.optim.Adam, lr=0.01, amsgrad=True, weight_decay=1e-3)],
                         ids=["sgd-nesterov", "adam-amsgrad"])
def test_a_kept_state_loads_as_a_torch_module_and_optimizer_that_go_on_exactly_like_the_library(experiment, optimizer):
    exp = experiment(GRID, optimizer=optimizer, dtype=torch.float64, steps=20, keep_states=[8])
    exp.run()
    spec = next(s for s in exp.grid.learners if s.coords == {"epsilon": 0.1, "seed": 2})
    module, opt = exp.load_learner(step=8, epsilon=0.1, seed=2)
    assert type(opt) is optimizer.values["optimizer"] and len(opt.state) == 4
    go_on_with_torch(module, opt, spec, 8, 20)
    final, final_opt = exp.load_learner(epsilon=0.1, seed=2)  # the latest kept: the final state, step 20
    assert_same_learner(module, opt, final, final_opt)


def test_load_learner_says_which_learners_exist_when_the_coordinates_are_ambiguous_or_absent(experiment):
    exp = experiment(GRID, keep_states=[4])
    exp.run()
    with pytest.raises(ValueError, match=r"4 learners in .* have epsilon=0.1; give more of epsilon, seed .*seed"):
        load_learner(exp.store.path, exp.template, epsilon=0.1)
    with pytest.raises(ValueError, match=r"No learner in .* has epsilon=0.5\. Its learners have the coordinates epsilon, seed"):
        exp.load_learner(epsilon=0.5)
    with pytest.raises(ValueError, match=r"at steps \[4, 16\], not at step 8; .*keep_states"):
        exp.load_learner(step=8, epsilon=0.01, seed=3)


# -- a store anyone can read -------------------------------------------------------------------------------

def test_open_store_gives_every_learner_with_its_configuration_and_runs_no_code(experiment, tmp_path, monkeypatch):
    store = tmp_path / "shared.zarr"
    perturbed = experiment(GRID, store=store, keep_states=[8]).run()
    rates = experiment([Optimizer.make_variations(lr=(0.05, 0.1))], store=store).run()

    def refuse(*_, **__):
        raise AssertionError("opening a store must not unpickle anything")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ds = open_store(store)
    assert ds.sizes["learner"] == 11 and ds.step.values.tolist() == [0, 8, 16]
    one = str(perturbed.learner.sel(epsilon=0.1, seed=3).values)
    np.testing.assert_array_equal(ds.test_acc.sel(learner=one, step=[0, 8, 16]).values,  # 8: a kept state's step
                                  perturbed.test_acc.sel(epsilon=0.1, seed=3).values)
    assert ds.epsilon.sel(learner=one) == 0.1 and ds.seed.sel(learner=one) == 3 and ds.lr.sel(learner=one) == 0.01
    assert str(ds.optimizer.sel(learner=one).values) == "SGD" and ds.momentum.sel(learner=one) == 0.9
    assert str(ds.device.sel(learner=one).values) == "cpu" and str(ds.torch.sel(learner=one).values) == torch.__version__
    fast = str(rates.learner.sel(lr=0.1).values)
    assert np.isnan(ds.epsilon.sel(learner=fast)) and ds.lr.sel(learner=fast) == 0.1
    assert ds.has_state.sel(learner=one).values.tolist() == [False, True, True]
    assert ds.has_state.sel(learner=fast).values.tolist() == [False, False, True]

    batch = Store(store).sources(checkpoints=False)[0].path  # plain Zarr v3, read by xarray alone
    raw = xr.open_zarr(batch, consolidated=False)
    assert raw.train_loss.dims == ("learner", "step") and len(raw.attrs["learner_ids"]) == 9
    weights = xr.open_zarr(batch, group=store_paths.states_group(8), consolidated=False)
    assert weights["1.weight"].shape == (9, 32, 40)
    assert zarr.open_group(store, mode="r").attrs["format"] == "serimats-func/2"


# -- debris, faults, claims ---------------------------------------------------------------------------------

def test_the_next_run_removes_what_killed_processes_left_and_leaves_live_writers_alone(experiment, tmp_path):
    store = tmp_path / "s.zarr"
    exp = experiment(GRID, store=store, checkpoint_every=4)
    store_paths.making(store, "dead0001").mkdir()  # a store half-made by a killed process, its lock file free
    store_paths.making(store, "dead0001.lock").touch()
    store_paths.making(store, "live0002").mkdir()  # one a live process is making
    live_store = FileLock(store_paths.making(store, "live0002.lock"))
    assert live_store.acquire()
    ds = exp.run()
    pending = store_paths.pending(store)
    (pending / "20990101T000000-dead").mkdir()  # a batch half-written by a killed process
    (pending / "20990101T000000-dead" / store_paths.METADATA).write_text("{trunc")
    (pending / "20990101T000000-dead.lock").touch()
    (pending / "orphan.lock").touch()  # killed between a rename and the lock's removal
    (pending / "20990101T000000-live").mkdir()  # a batch a live process is writing
    live_batch = FileLock(pending / "20990101T000000-live.lock")
    assert live_batch.acquire()

    assert experiment(GRID, store=store).plan().to_train == 0
    xr.testing.assert_identical(experiment(GRID, store=store).run(), ds)
    assert sorted(p.name for p in pending.iterdir()) == ["20990101T000000-live", "20990101T000000-live.lock",
                                                      store_paths.METADATA]
    assert [p.name for p in store_paths.being_made(store)] == [".s.zarr.live0002", ".s.zarr.live0002.lock"]
    live_batch.release()
    live_store.release()


def test_a_checkpoint_left_after_its_batch_was_stored_is_removed_by_the_next_run(experiment, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    with monkeypatch.context() as m:  # killed between the batch's rename and the checkpoint's removal
        m.setattr(Store, "prune_checkpoints", lambda self, claims=None: [])
        ds = experiment(GRID, store=store, checkpoint_every=4).run()
    assert len(store_paths.checkpoint_names(store)) == 1
    assert experiment(GRID, store=store).plan().to_train == 0
    xr.testing.assert_identical(experiment(GRID, store=store).run(), ds)
    assert store_paths.checkpoint_names(store) == []


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")], ids=["full-disk", "permission"])
def test_a_fault_while_writing_ends_with_a_clear_message_and_a_store_that_holds_all_written_before(
        experiment, tmp_path, monkeypatch, fault):
    import zarr.storage._local as local

    reference = experiment(FOUR, max_learners_per_chunk=2, steps=8, store=tmp_path / "ref.zarr").run()
    store = tmp_path / "s.zarr"
    real_put, real_write = local._put, Store.write
    written = []

    def put(path, value, exclusive=False):
        if written:  # after the first batch: every write fails
            raise type(fault)(fault.errno, fault.strerror, str(path))
        return real_put(path, value, exclusive)

    def write(self, *args, **kw):
        name = real_write(self, *args, **kw)
        written.append(name)
        return name

    monkeypatch.setattr(local, "_put", put)
    monkeypatch.setattr(Store, "write", write)
    with pytest.raises(StoreWriteError) as raised:
        experiment(FOUR, max_learners_per_chunk=2, steps=8, store=store).run()
    message = str(raised.value)
    assert fault.strerror in message and str(store) in message and "still holds everything written before" in message
    assert raised.value.errno == fault.errno
    monkeypatch.undo()

    assert open_store(store).sizes["learner"] == 2  # the first batch, nothing half-written
    assert sorted(p.name for p in store_paths.pending(store).iterdir()) == [store_paths.METADATA]
    assert_same_metrics(experiment(FOUR, max_learners_per_chunk=2, steps=8, store=store).run(), reference)


@pytest.mark.parametrize("release", ["lock file", "claims"])
def test_a_permission_lost_mid_run_ends_with_the_store_write_error_not_one_from_releasing_claims(
        experiment, tmp_path, monkeypatch, release):
    import zarr.storage._local as local

    store = tmp_path / "s.zarr"
    real_put, real_unlink, real_release = local._put, Path.unlink, Claims.release
    lost = []

    def put(path, value, exclusive=False):
        if lost:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_put(path, value, exclusive)

    def unlink(self, *args, **kw):  # the claims' lock files cannot be removed either
        if lost and self.name.endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_unlink(self, *args, **kw)

    def claims_release(self, ids=None):
        if lost:
            raise PermissionError(errno.EACCES, "Permission denied", str(self.folder))
        return real_release(self, ids)

    steps = CountSteps()
    monkeypatch.setattr(local, "_put", put)
    monkeypatch.setattr(Path, "unlink", unlink)
    if release == "claims":
        monkeypatch.setattr(Claims, "release", claims_release)
    exp = experiment(FOUR, store=store, steps=8, callbacks=[steps])
    exp.store.create()
    steps.on_chunk_end = lambda chunk, result: lost.append(True)  # lost after training, before the batch is written
    with pytest.raises(StoreWriteError, match=r"Could not write the batch .*Permission denied.*restore write permission"):
        exp.run()
    monkeypatch.undo()
    assert experiment(FOUR, store=store, steps=8).plan().to_train == 4  # nothing half-written; runs again


def test_learners_another_live_process_claimed_are_waited_for_and_trained_here_if_it_dies(experiment, tmp_path):
    reference = experiment(GRID, max_learners_per_chunk=3, store=tmp_path / "ref.zarr").run()
    exp = experiment(GRID, max_learners_per_chunk=3, store=tmp_path / "s.zarr")
    exp.poll_seconds = 0.05
    exp.store.create()
    theirs = [s.id for s in exp.grid.learners][3:6]
    other = Claims(store_paths.claims(exp.store.path))  # another process: its own open lock files
    assert other.claim(theirs) == theirs
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("ds", exp.run()))
    runner.start()
    deadline = time.monotonic() + 60
    while len(exp.store.index()) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert runner.is_alive() and set(exp.store.index()).isdisjoint(theirs)  # skipped, and waited for
    other.release()  # the other process dies: its claims go with it
    runner.join(60)
    assert_same_metrics(result["ds"], reference)
    assert all(len(where) == 1 for where in exp.store.index().values())


@pytest.mark.parametrize("settings, message", [({"keep_states": "10"}, "keep_states must be a list of steps"),
                                               ({"keep_states": [5, -1]}, "keep_states must be a list of steps"),
                                               ({"keep_states": [2.5]}, "keep_states must be a list of steps"),
                                               ({"keep_every": 0}, "keep_every must be a positive integer")])
def test_bad_kept_state_settings_are_refused_before_anything_is_written(experiment, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        experiment(GRID, store=tmp_path / "never.zarr", **settings)
    assert not (tmp_path / "never.zarr").exists()


def test_learners_that_record_no_metric_are_trained_once_and_then_served(experiment):
    exp = experiment(FOUR, evaluate=False)
    assert exp.plan().to_train == 4
    exp.run()
    again = experiment(FOUR, evaluate=False, store=exp.store.path)
    assert again.plan().to_train == 0
    assert open_store(exp.store.path).has_state.sel(step=16).values.all()
