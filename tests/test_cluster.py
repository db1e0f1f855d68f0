"""Shards of a grid as submitit jobs (the local executor stands in for Slurm): the same numbers as one process,
failed shards reported, reruns that train only what is missing."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

submitit = pytest.importorskip("submitit")

from serimats_func.cluster import ShardError, ShardJob, families, shard_device, split_families  # noqa: E402
from serimats_func.interventions import InitWeights, PerturbWeights  # noqa: E402
from tests import store_paths  # noqa: E402

GRID = [PerturbWeights.make_variations(epsilon=0, control=True),
        PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(3)),
        InitWeights.make_variations(seed=range(2))]
METRICS = ["train_loss", "train_acc", "test_loss", "test_acc"]


def local_executor(folder):
    executor = submitit.LocalExecutor(folder)
    executor.update_parameters(timeout_min=10)
    return executor


def test_shards_are_decided_by_the_grid_alone_and_keep_controls_with_their_learners(experiment):
    specs = experiment(GRID).grid.learners
    groups = families(specs)
    assert len(groups) == 2 and all(len(g) == 7 for g in groups)  # per init seed: the control and its 6 learners
    for group in groups:
        controls = {s.control_id for s in specs if s.id in group}
        assert len(controls) == 1 and controls <= set(group)
    shards = split_families(groups, 3)
    assert len(shards) == 2  # two families cannot fill three shards
    assert split_families(groups, 3) == split_families(list(groups), 3)
    loose = split_families([[f"{i:02d}"] for i in range(10)], 3)
    assert [len(s) for s in loose] == [4, 3, 3] and sorted(sum(loose, ())) == [f"{i:02d}" for i in range(10)]


@pytest.mark.slow
def test_a_grid_run_as_three_shards_gives_the_numbers_of_one_process(experiment, tmp_path):
    grid = [PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(3)), InitWeights.make_variations(seed=range(2))]
    one = experiment(grid).run()
    sharded = experiment(grid).run(executor=local_executor(tmp_path / "jobs"), shards=3)
    for metric in METRICS:
        np.testing.assert_array_equal(sharded[metric].values, one[metric].values)
    logs = list((tmp_path / "jobs").glob("*_log.out"))
    assert len(logs) == 3  # one job per shard


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


class KillsOneShard:
    """A local executor whose shard 1 is killed with SIGKILL once training has written a checkpoint."""

    def __init__(self, folder, store):
        self.inner = local_executor(folder)
        self.store = store
        self.killed: list[int] = []

    def map_array(self, fn, indices):
        jobs = self.inner.map_array(fn, indices)
        threading.Thread(target=self._kill, args=(jobs[1],), daemon=True).start()
        return jobs

    def _checkpointed(self) -> bool:
        """Whether a checkpoint is written (the folder's own zarr.json is there from the store's making on)."""
        return store_paths.checkpoints(self.store).is_dir() and bool(store_paths.checkpoint_names(self.store))

    def _kill(self, job):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self._checkpointed():
            time.sleep(0.05)
        for child in _children(job._process.pid):
            os.kill(child, signal.SIGKILL)
            self.killed.append(child)


@pytest.mark.slow
def test_a_killed_shard_is_reported_with_its_log_and_a_rerun_trains_only_what_is_missing(experiment, tmp_path):
    store = tmp_path / "runs" / "sharded.zarr"
    executor = KillsOneShard(tmp_path / "jobs", store)
    with pytest.raises(ShardError) as error:
        experiment(GRID, store=store, steps=300, checkpoint_every=20).run(executor=executor, shards=2)
    assert executor.killed
    message = str(error.value)
    assert "1 of 2 shards failed" in message and "shard 1 (7 learners)" in message and "_log.err" in message
    assert "trains only what is missing" in message
    again = experiment(GRID, store=store, steps=300, checkpoint_every=20)
    plan = again.plan()
    assert (plan.in_store, plan.to_train) == (7, 7)
    ds = again.run()
    reference = experiment(GRID, steps=300).run()
    for metric in METRICS:
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values)


def test_a_job_that_times_out_resubmits_its_own_shard():
    job = ShardJob(source=None, shards=[("a",), ("b",)])
    delayed = job.checkpoint(1)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == (1,)


def test_each_shard_on_a_node_with_several_gpus_takes_its_own():
    import torch

    assert shard_device("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert shard_device(None, 5) == torch.device("cpu")
    else:
        assert shard_device(None, 5) == torch.device("cuda", 5 % torch.cuda.device_count())


@pytest.mark.slow
def test_the_command_line_submits_a_script_as_shards(tmp_path, small_mnist1d):
    import torch

    train, test = small_mnist1d
    torch.save((train.tensors, test.tensors), tmp_path / "data.pt")
    script = tmp_path / "sweep.py"
    script.write_text(f"""
import torch
from serimats_func import Experiment
from serimats_func.interventions import InitWeights
from serimats_func.models import MLP

train, test = torch.load({str(tmp_path / "data.pt")!r})
exp = Experiment(MLP(widths=(16,)), train, [InitWeights.make_variations(seed=range(4))], test_dataset=test,
                 steps=8, store={str(tmp_path / "sweep.zarr")!r})

if __name__ == "__main__":
    raise SystemExit("the job must not run the script as __main__")
""")
    command = [sys.executable, "-m", "serimats_func", "submit", str(script), "--shards", "2", "--cluster", "local",
               "--timeout-min", "5", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's package
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "4 learners to train as 2 shard(s) on local" in result.stdout and "done:" in result.stdout
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert "0 learners to train" in again.stdout
