"""Real processes on one store, for tests/test_kill_and_concurrency.py: ``python tests/store_worker.py PLAN.json``.

This driver imports the library once (with one CPU thread, so every process computes the same numbers), then
forks a child process per training run: forking skips the seconds an import costs, and each child is a real
process that a real SIGKILL ends. A child trains a small MLP grid (two chunks, a checkpoint every 2 steps),
with a few milliseconds' pause around each rename and file write of the store, so that random kill moments
also land in store creation, checkpoint and batch writes and renames, not only in training. The driver writes
what happened as JSON; the test reads the stores back and compares.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback


def experiment(store: str, seeds: list[int], chunk: int):
    import torch

    from serimats_func import Experiment
    from serimats_func.interventions import InitWeights
    from serimats_func.models import MLP

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 40, generator=g), torch.randint(0, 10, (256,), generator=g)
    return Experiment(MLP(widths=(16,), in_features=40), (x, y), [InitWeights.make_variations(seed=seeds)],
                      test_dataset=(x[:64], y[:64]), steps=12, batch_size=32, log_every=4, checkpoint_every=6,
                      max_learners_per_chunk=chunk, store=store, progress=False)


def slow_store_writes(pause: float) -> None:
    """Pause around every rename and file write of the store: wider windows for a kill to land in."""
    import zarr.storage._local as local

    from serimats_func import locks

    real_rename, real_put = os.rename, local._put

    def rename(*args, **kw):
        time.sleep(pause)
        real_rename(*args, **kw)
        time.sleep(pause)

    def put(*args, **kw):
        time.sleep(pause / 4)
        return real_put(*args, **kw)

    os.rename, local._put = rename, put
    locks.os.rename = rename


def child(run: dict) -> None:
    """In a forked process: train the grid, exit 0 (or 1 with the traceback on stderr)."""
    try:
        slow_store_writes(run.get("pause", 0.002))
        experiment(run["store"], run["seeds"], run["chunk"]).run()
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def start(run: dict) -> int:
    pid = os.fork()
    if pid == 0:
        child(run)
    return pid


def wait(pid: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -999  # hung


def timed_run(run: dict) -> tuple[int, float]:
    began = time.monotonic()
    rc = wait(start(run))
    return rc, time.monotonic() - began


def kill_at(run: dict, moment: float) -> bool:
    """Start ``run`` and SIGKILL it ``moment`` seconds later; whether it was still running then."""
    pid = start(run)
    time.sleep(moment)
    done, _ = os.waitpid(pid, os.WNOHANG)
    if done:
        return False
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return True


def kills(plan: dict) -> dict:
    """Reference run, then ``kills`` attempts: kill a fresh run at a random moment, rerun it to completion."""
    rng = random.Random(plan["seed"])
    run = {"seeds": plan["seeds"], "chunk": plan["chunk"]}
    rc, seconds = timed_run({**run, "store": plan["reference"]})
    out = {"reference": {"rc": rc, "seconds": seconds}, "attempts": []}
    n = plan["kills"]
    for i in range(n):
        store = plan["store"].format(i)
        moment = seconds * (i + rng.random()) / n  # spread evenly over the whole run
        killed = kill_at({**run, "store": store}, moment)
        while not killed and moment > 0.01:  # it finished first: kill an earlier moment
            moment /= 2
            killed = kill_at({**run, "store": store}, moment)
        rerun_rc, rerun_seconds = timed_run({**run, "store": store})
        out["attempts"].append({"store": store, "moment": moment, "killed": killed, "rc": rerun_rc,
                                "rerun_seconds": rerun_seconds})
    return out


def concurrent(plan: dict) -> dict:
    """Two processes on overlapping grids in one store, started together; in round ``kill_first``, the first is
    SIGKILLed midway and the second must finish its whole grid, then the first is rerun."""
    out = {"rounds": []}
    for r, spec in enumerate(plan["rounds"]):
        store = plan["store"].format(r)
        runs = [{"store": store, "seeds": seeds, "chunk": plan["chunk"]} for seeds in plan["grids"]]
        began = time.monotonic()
        pids = [start(run) for run in runs]
        killed = False
        if spec.get("kill_first_after"):
            time.sleep(spec["kill_first_after"])
            done, status = os.waitpid(pids[0], os.WNOHANG)
            if not done:
                os.kill(pids[0], signal.SIGKILL)
                os.waitpid(pids[0], 0)
                killed = True
            rcs = [0 if killed else os.waitstatus_to_exitcode(status), wait(pids[1])]
            rerun = wait(start(runs[0]))
        else:
            rcs = [wait(pid) for pid in pids]
            rerun = None
        out["rounds"].append({"store": store, "rcs": rcs, "killed": killed, "rerun": rerun,
                              "seconds": time.monotonic() - began})
    rc, _ = timed_run({"store": plan["reference"], "seeds": sorted(set(sum(plan["grids"], []))), "chunk": plan["chunk"]})
    out["reference_rc"] = rc
    return out


def main(path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's library
    import torch

    torch.set_num_threads(1)
    import serimats_func  # noqa: F401  (imported once, before the forks)

    plan = json.loads(open(path).read())
    result = {"kills": kills(plan["kills"]) if "kills" in plan else None,
              "concurrent": concurrent(plan["concurrent"]) if "concurrent" in plan else None}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
