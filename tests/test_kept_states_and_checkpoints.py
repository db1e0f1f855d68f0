"""Kept states (``keep_states``, ``keep_every``) and checkpoints together: a checkpoint holds the states kept at
the steps its chunk has passed, so a run stopped at any moment goes on from its newest checkpoint, and its
results and kept states are those of a run that never stopped. (A real SIGKILL: tests/test_kill_and_concurrency.py.)"""

import numpy as np
import pytest

from serimats_func.interventions import InitWeights
from serimats_func.store.zarr_store import Store
from tests import store_paths
from tests.watching import CountSteps

FOUR = [InitWeights.make_variations(seed=range(4))]


def kept_states(path) -> dict:
    """learner id -> {step: {path: array}}: every state a store's batches hold."""
    store = Store(path)
    out: dict = {}
    for learner_id, where in store.index().items():
        sources = {s.name: s for s in store.sources(checkpoints=False)}
        locations = [(sources[name], position, int(t)) for name, position in where for t in sources[name].state_steps]
        for (_, _, step), flat in zip(locations, store.read_states(locations), strict=True):
            out.setdefault(learner_id, {}).setdefault(step, {k: v for k, (v, _) in flat.items()})
    return out


def assert_same_states(path, reference) -> None:
    got, want = kept_states(path), kept_states(reference)
    assert sorted(got) == sorted(want)
    for learner_id, steps in want.items():
        assert sorted(got[learner_id]) == sorted(steps), learner_id
        for step, arrays in steps.items():
            assert sorted(got[learner_id][step]) == sorted(arrays)
            for name, values in arrays.items():
                np.testing.assert_array_equal(got[learner_id][step][name], values, err_msg=f"{learner_id} {step} {name}")


@pytest.mark.parametrize("keep, crash_before, resumed_from, held", [
    (dict(keep_states=[4]), 11, 6, [4, 6]),  # killed after the step-6 checkpoint: it holds the state kept at 4
    (dict(keep_every=4), 15, 12, [4, 8, 12]),  # after the step-12 checkpoint, which holds those kept at 4 and 8
    (dict(keep_states=[2, 7], keep_every=5), 14, 12, [2, 5, 7, 10, 12]),
], ids=["keep_states", "keep_every", "both"])
def test_a_run_that_keeps_states_and_crashes_resumes_from_its_newest_checkpoint_to_the_same_numbers(
        experiment, tmp_path, keep, crash_before, resumed_from, held):
    settings = dict(checkpoint_every=6, max_learners_per_chunk=2, **keep)
    reference = experiment(FOUR, store=tmp_path / "ref.zarr", **settings).run()
    store = tmp_path / "run.zarr"
    steps = CountSteps(crash_before=crash_before)
    with pytest.raises(RuntimeError, match="went down"):
        experiment(FOUR, store=store, callbacks=[steps], **settings).run()
    (checkpoint,) = store_paths.checkpoint_names(store)
    assert Store(store).sources()[-1].state_steps == held

    steps.calls.clear()
    plan = experiment(FOUR, store=store, **settings).plan()
    assert plan.continuing == {f"from step {resumed_from} (checkpoint)": 2}
    ds = experiment(FOUR, store=store, callbacks=[steps], **settings).run()
    resumed, fresh = list(range(resumed_from + 1, 17)), list(range(1, 17))  # the first chunk from its checkpoint;
    assert steps.calls in (resumed + fresh, fresh + resumed)  # the second had not started (chunks run by start step)
    for metric in reference.data_vars:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values, err_msg=metric)
    assert_same_states(store, tmp_path / "ref.zarr")
    assert store_paths.checkpoint_names(store) == []  # the batch holds all the checkpoint held
    assert experiment(FOUR, store=store, **settings).plan().to_train == 0


def test_ctrl_c_saves_the_kept_states_with_the_checkpoint_and_the_rerun_goes_on_from_there(experiment, tmp_path):
    settings = dict(keep_states=[3, 9], max_learners_per_chunk=4)
    reference = experiment(FOUR, store=tmp_path / "ref.zarr", **settings).run()
    store = tmp_path / "run.zarr"
    steps = CountSteps(crash_before=11, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt, match="resume from step 10"):
        experiment(FOUR, store=store, callbacks=[steps], **settings).run()
    assert Store(store).sources()[-1].state_steps == [3, 9, 10]
    steps.calls.clear()
    ds = experiment(FOUR, store=store, callbacks=[steps], **settings).run()
    assert steps.calls == list(range(11, 17))
    for metric in reference.data_vars:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values, err_msg=metric)
    assert_same_states(store, tmp_path / "ref.zarr")


def test_asking_for_more_steps_with_kept_states_reuses_the_batch_and_adds_only_the_new_ones(experiment, tmp_path):
    store = tmp_path / "run.zarr"
    experiment(FOUR, store=store, keep_states=[4], steps=8).run()
    longer = experiment(FOUR, store=store, keep_states=[4, 12], steps=16)
    assert longer.plan().continuing == {"from step 8 (final state)": 4}
    longer.run()
    reference = experiment(FOUR, store=tmp_path / "ref.zarr", keep_states=[4, 8, 12], steps=16)
    reference.run()
    assert_same_states(store, tmp_path / "ref.zarr")
