"""Real processes: runs SIGKILLed at random moments resume to the same numbers; two processes on overlapping
grids in one store neither lose, duplicate nor break each other's learners. tests/store_worker.py runs them
(one import, then a forked process per run); these tests read the stores back."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serimats_func import open_store
from serimats_func.store.zarr_store import Store
from tests import store_paths

pytestmark = pytest.mark.slow  # real processes, SIGKILLed

WORKER = Path(__file__).with_name("store_worker.py")
KILLS = 20
GRID_A, GRID_B = [0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One run of the worker: a reference, 20 kill-and-rerun attempts, and two rounds of two processes."""
    root = tmp_path_factory.mktemp("processes")
    plan = {
        "kills": {"seed": 2024, "seeds": [0, 1, 2, 3], "chunk": 2, "kills": KILLS,
                  "reference": str(root / "reference.zarr"), "store": str(root / "killed{}.zarr")},
        "concurrent": {"grids": [GRID_A, GRID_B], "chunk": 2, "reference": str(root / "union.zarr"),
                       "store": str(root / "shared{}.zarr"), "rounds": [{}, {"kill_first_at": 0.5}]},
    }
    (root / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, str(WORKER), str(root / "plan.json")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def metrics_by_learner(path) -> dict:
    ds = open_store(path)
    return {str(i): {m: ds[m].sel(learner=i).values for m in ("train_loss", "test_acc")} for i in ds.learner.values}


def assert_same_learners(path, reference: dict) -> None:
    got = metrics_by_learner(path)
    assert sorted(got) == sorted(reference)
    for learner, metrics in reference.items():
        for name, values in metrics.items():
            np.testing.assert_array_equal(got[learner][name], values, err_msg=f"{path} {learner} {name}")


def test_a_run_sigkilled_at_20_random_moments_resumes_to_the_uninterrupted_numbers_every_time(worker):
    result, stderr = worker
    kills = result["kills"]
    assert kills["reference"]["rc"] == 0, stderr[-3000:]
    reference = metrics_by_learner(Path(kills["attempts"][0]["store"]).with_name("reference.zarr"))
    assert len(reference) == 4
    attempts = kills["attempts"]
    assert len(attempts) == KILLS and all(a["killed"] for a in attempts)  # every one a real SIGKILL mid-run
    for attempt in attempts:
        assert attempt["rc"] == 0, (attempt, stderr[-3000:])
        assert_same_learners(attempt["store"], reference)  # the store opens and holds the same numbers
        assert store_paths.debris(Path(attempt["store"])) == []
        assert all(len(where) == 1 for where in Store(attempt["store"]).index().values())  # each learner stored once
    moments = sorted(a["moment"] / kills["reference"]["seconds"] for a in attempts)
    assert moments[0] < 0.15 and moments[-1] > 0.7  # spread from store creation to the last batch write
    phases = [a["phase"] for a in attempts]  # building, store creation, training, checkpoint/batch writes, renames...
    assert len(set(phases)) >= 4, phases


def test_two_processes_on_overlapping_grids_in_one_store_neither_lose_nor_duplicate_a_learner(worker):
    result, stderr = worker
    concurrent = result["concurrent"]
    assert concurrent["reference_rc"] == 0
    both = concurrent["rounds"][0]
    assert both["rcs"] == [0, 0], stderr[-3000:]  # neither crashed the other
    union = metrics_by_learner(Path(both["store"]).with_name("union.zarr"))
    assert len(union) == 9
    assert_same_learners(both["store"], union)
    assert all(len(where) == 1 for where in Store(both["store"]).index().values())  # none trained twice
    assert store_paths.debris(Path(both["store"])) == []


def test_when_one_of_two_processes_is_killed_the_other_trains_the_learners_it_had_claimed(worker):
    result, stderr = worker
    killed = result["concurrent"]["rounds"][1]
    assert killed["rcs"][1] == 0 and killed["rerun"] == 0, stderr[-3000:]  # the first was SIGKILLed midway
    union = metrics_by_learner(Path(killed["store"]).with_name("union.zarr"))
    assert_same_learners(killed["store"], union)
    assert all(len(where) == 1 for where in Store(killed["store"]).index().values())
    assert store_paths.debris(Path(killed["store"])) == []


def test_a_run_that_keeps_states_sigkilled_after_a_checkpoint_resumes_from_it_to_the_same_numbers(tmp_path):
    """keep_every=4 and a checkpoint every 6 steps (12 steps, two chunks of two): killed at step 7, the rerun goes on
    from the step-6 checkpoint (which holds the state kept at step 4); its metrics and kept states are the reference's."""
    from tests.test_kept_states_and_checkpoints import assert_same_states

    plan = {"resume": {"seeds": [0, 1, 2, 3], "chunk": 2, "keep_every": 4, "reference": str(tmp_path / "reference.zarr"),
                       "store": str(tmp_path / "killed.zarr")}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "plan.json")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])["resume"]
    assert result["reference"] == 0 and result["waited"] and result["rerun"] == 0, done.stderr[-3000:]
    assert len(result["checkpoints"]) == 1  # what the kill left: the step-6 checkpoint of the first chunk
    by_chunk = sorted([step for chunk, step in result["steps"] if chunk == c] for c in (0, 1))
    assert by_chunk == [list(range(1, 13)), list(range(7, 13))]  # one chunk resumed from the checkpoint (chunks run
    # by start step: the one from scratch may come first)
    assert_same_learners(tmp_path / "killed.zarr", metrics_by_learner(tmp_path / "reference.zarr"))
    assert_same_states(tmp_path / "killed.zarr", tmp_path / "reference.zarr")
    assert sorted(Store(tmp_path / "killed.zarr").sources()[0].state_steps) == [4, 8, 12]
    assert store_paths.debris(tmp_path / "killed.zarr") == []
