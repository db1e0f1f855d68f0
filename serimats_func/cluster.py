"""Beyond one machine: shards of a grid as jobs on a cluster, through submitit.

``exp.run(executor=submitit.AutoExecutor("runs/jobs"), shards=8)`` splits the learners still to train
into 8 shards, submits them (a job array where the executor supports it: Slurm; local processes
elsewhere), waits with one progress bar over all shards, and returns the results. Each job plans its own
share for its own device and writes its learners into the one store; the store's per-learner claims make
concurrent shards safe. A failed or preempted shard is reported with its log; running again trains only
what is missing, from the shards' checkpoints. A job that times out requeues itself (submitit's
``checkpoint`` protocol) and resumes from its last checkpoint.

Which learners a shard trains is decided from the grid alone: families of learners (a control with the
learners compared with it) are sorted by id and dealt to the shard with the fewest learners so far.

>>> families = [["a1", "a2", "a3"], ["b1"], ["c1", "c2"], ["d1"]]
>>> split_families(families, 2)
[('a1', 'a2', 'a3', 'd1'), ('b1', 'c1', 'c2')]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import xarray as xr

    from .run.grid import LearnerSpec
    from .store.zarr_store import Store


class Shardable(Protocol):
    """What sharding needs of an experiment (``Experiment`` is one; this module does not import it, so that
    ``Experiment.run(executor=...)`` can import this one)."""

    name: str
    store: Store
    progress: bool
    device: Any
    requested_device: str | None

    def learners_to_train(self) -> list[LearnerSpec]: ...

    def train_only(self, ids: Sequence[str]) -> int: ...

    def results(self) -> xr.Dataset: ...


class Source(Protocol):
    """Something that makes the experiment again in a job (``experiments.ScriptSource``: runs its script)."""

    def load(self) -> Shardable: ...


class ShardError(RuntimeError):
    """One or more shards failed; the message lists each with its log and error."""


def families(specs: Sequence[LearnerSpec]) -> list[list[str]]:
    """Learners grouped with their control (a control and the learners compared with it stay together),
    each family sorted, families sorted by their first id."""
    by_root: dict[str, list[str]] = {}
    ids = {s.id for s in specs}
    for spec in specs:
        root = spec.control_id if spec.control_id in ids else spec.id
        by_root.setdefault(root, []).append(spec.id)
    return sorted((sorted(set(members)) for members in by_root.values()), key=lambda f: f[0])


def split_families(groups: Sequence[Sequence[str]], shards: int) -> list[tuple[str, ...]]:
    """Deal families (in order) to ``shards`` shards, each to the shard with the fewest learners so far
    (the lowest index on ties). Empty shards are dropped."""
    out: list[list[str]] = [[] for _ in range(shards)]
    for family in groups:
        smallest = min(range(shards), key=lambda i: (len(out[i]), i))
        out[smallest].extend(family)
    return [tuple(sorted(s)) for s in out if s]


class ShardJob:
    """One shard's work, as a submitit job: train the learners ``shards[index]`` that are still missing,
    on this node's device (one GPU per shard when a node has several). Requeued on timeout or
    preemption by submitit's checkpoint protocol; the store's checkpoints make it resume."""

    def __init__(self, source: Shardable | Source, shards: Sequence[tuple[str, ...]]):
        self.source, self.shards = source, list(shards)

    def __call__(self, index: int) -> int:
        load = getattr(self.source, "load", None)
        exp = load() if callable(load) else self.source
        exp.device = shard_device(exp.requested_device, index)
        exp.progress = False
        return exp.train_only(self.shards[index])

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this when the job times out or is preempted: resubmit the same shard."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def shard_device(requested: Any, index: int) -> Any:
    """The device a shard trains on: the experiment's request, else CUDA when the node has it, one GPU
    per shard (shard ``i`` on GPU ``i mod count``) when the node has several."""
    import torch

    if requested is not None:
        return torch.device(requested)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", index % torch.cuda.device_count())


def run_sharded(exp: Shardable, executor: Any, shards: int, source: Source | None = None,
                poll_seconds: float = 1.0) -> xr.Dataset:
    """Train ``exp``'s missing learners as ``shards`` jobs of ``executor``; wait; return the results."""
    from .jupyter import progress_bar

    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive integer; got {shards!r}.")
    todo = exp.learners_to_train()
    if not todo:
        return exp.results()
    parts = split_families(families(todo), shards)
    job = ShardJob(source or exp, parts)
    jobs = executor.map_array(job, list(range(len(parts))))
    with progress_bar(total=len(todo), desc=f"{exp.name}: {len(jobs)} shards", unit=" learners", disable=not exp.progress) as bar:
        _wait(jobs, lambda: _landed(exp, todo), bar, poll_seconds)
    failures = [(i, j) for i, j in enumerate(jobs) if _failed(j)]
    if failures:
        raise ShardError(_report(exp, failures, parts))
    return exp.results()


def _landed(exp: Shardable, todo: Sequence[LearnerSpec]) -> int:
    index = exp.store.index()
    return sum(1 for s in todo if s.id in index)


def _wait(jobs: Sequence[Any], landed: Callable[[], int], bar: Any, poll_seconds: float) -> None:
    while not all(j.done() for j in jobs):
        bar.update(landed() - bar.n)
        time.sleep(poll_seconds)
    bar.update(landed() - bar.n)


def _failed(job: Any) -> bool:
    try:
        return job.exception() is not None
    except Exception:  # submitit raises when a job left no result at all (killed, lost node)
        return True


def _error(job: Any) -> str:
    try:
        error = job.exception()
    except Exception as e:  # noqa: BLE001
        error = e
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[-1] if text else "unknown error"


def _report(exp: Shardable, failures: list[tuple[int, Any]], parts: list[tuple[str, ...]]) -> str:
    lines = [f"{len(failures)} of {len(parts)} shards failed; `run()` again trains only what is missing, from the "
             f"shards' checkpoints in {exp.store.path}:"]
    for index, job in failures:
        paths = job.paths
        lines.append(f"  shard {index} ({len(parts[index])} learners), job {job.job_id}: {_error(job)}\n"
                     f"    log: {Path(paths.stderr)} (and {Path(paths.stdout).name})")
    return "\n".join(lines)
