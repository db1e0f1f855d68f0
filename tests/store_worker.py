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


def experiment(store: str, seeds: list[int], chunk: int, callbacks=(), **settings):
    import torch

    from serimats_func.interventions import InitWeights
    from serimats_func.models import MLP
    from tests.builders import make_experiment  # main() put this checkout on sys.path

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 40, generator=g), torch.randint(0, 10, (256,), generator=g)
    return make_experiment([InitWeights.make_variations(seed=seeds)], model=MLP(widths=(16,), in_features=40),
                           data=((x, y), (x[:64], y[:64])), steps=12, batch_size=32, log_every=4, checkpoint_every=6,
                           max_learners_per_chunk=chunk, store=store, callbacks=callbacks, **settings)


PHASES = ["building the experiment"]  # the phase a child is in, innermost last


def slow_store_writes(pause: float, events: str) -> None:
    """Pause around every rename and file write of the store: wider windows for a kill to land in. Note in
    ``events`` when each phase begins (store creation, checkpoint, batch, removal, rename; training otherwise)."""
    import zarr.storage._local as local

    from serimats_func.store import locks
    from serimats_func.store.zarr_store import Store

    log = open(events, "a", buffering=1)
    real_rename, real_put = os.rename, local._put

    stack = PHASES

    def note(phase: str) -> None:
        log.write(f"{time.time():.6f} {phase}\n")

    def phase(name: str, method):
        def wrapped(self, *args, **kw):
            if name == "store creation" and self.path.exists():
                return method(self, *args, **kw)
            stack.append(name)
            note(name)
            try:
                return method(self, *args, **kw)
            finally:
                stack.pop()
                note(stack[-1])
        return wrapped

    def rename(*args, **kw):
        note(f"rename ({stack[-1]})")
        time.sleep(pause)
        real_rename(*args, **kw)
        time.sleep(pause)
        note(stack[-1])

    def put(*args, **kw):
        time.sleep(pause / 4)
        return real_put(*args, **kw)

    os.rename, local._put = rename, put
    locks.os.rename = rename
    Store.create = phase("store creation", Store.create)
    Store.write = phase("batch write", Store.write)
    Store.write_checkpoint = phase("checkpoint write", Store.write_checkpoint)
    Store.remove_checkpoint = phase("checkpoint removal", Store.remove_checkpoint)
    note(stack[-1])


def child(run: dict) -> None:
    """In a forked process: train the grid, exit 0 (or 1 with the traceback on stderr)."""
    try:
        slow_store_writes(run.get("pause", 0.002), run["store"] + ".events")
        from serimats_func.callbacks import Callback

        class Training(Callback):
            def on_chunk_start(self, chunk) -> None:
                PHASES[0] = "training"
                with open(run["store"] + ".events", "a") as log:
                    log.write(f"{time.time():.6f} training\n")

        experiment(run["store"], run["seeds"], run["chunk"], callbacks=[Training()]).run()
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


def kill_at(run: dict, moment: float) -> str | None:
    """Start ``run`` and SIGKILL it ``moment`` seconds later; the phase it was in then, None if it had ended."""
    events = run["store"] + ".events"
    if os.path.exists(events):
        os.remove(events)
    pid = start(run)
    time.sleep(moment)
    done, _ = os.waitpid(pid, os.WNOHANG)
    if done:
        return None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    os.waitpid(pid, 0)
    phases = [line.split(" ", 1) for line in open(events).read().splitlines()] if os.path.exists(events) else []
    before = [p for t, p in phases if float(t) <= killed_at]
    return before[-1] if before else "building the experiment"


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
        phase = kill_at({**run, "store": store}, moment)
        while phase is None and moment > 0.01:  # it finished first: kill an earlier moment
            moment /= 2
            phase = kill_at({**run, "store": store}, moment)
        rerun_rc, rerun_seconds = timed_run({**run, "store": store})
        out["attempts"].append({"store": store, "moment": moment, "killed": phase is not None, "phase": phase,
                                "rc": rerun_rc, "rerun_seconds": rerun_seconds})
    return out


def concurrent(plan: dict) -> dict:
    """Two processes on overlapping grids in one store, started together. In a round with ``kill_first_at``
    (a fraction of the first round's time), the first is SIGKILLed then, midway: the second must finish its
    whole grid, the learners the first had claimed included; then the first is rerun."""
    out = {"rounds": []}
    for r, spec in enumerate(plan["rounds"]):
        moment = spec["kill_first_at"] * out["rounds"][0]["seconds"] if "kill_first_at" in spec else None
        for attempt in range(6):
            store = plan["store"].format(f"{r}-{attempt}")
            runs = [{"store": store, "seeds": seeds, "chunk": plan["chunk"]} for seeds in plan["grids"]]
            began = time.monotonic()
            pids = [start(run) for run in runs]
            if moment is None:
                out["rounds"].append({"store": store, "rcs": [wait(pid) for pid in pids],
                                      "seconds": time.monotonic() - began})
                break
            time.sleep(moment)
            done, status = os.waitpid(pids[0], os.WNOHANG)
            if not done:
                os.kill(pids[0], signal.SIGKILL)
                os.waitpid(pids[0], 0)
            second = wait(pids[1])
            if done:  # the first had finished: try again, killing it sooner
                moment /= 2
                continue
            out["rounds"].append({"store": store, "killed_at": moment, "rcs": [None, second],
                                  "rerun": wait(start(runs[0])), "seconds": time.monotonic() - began})
            break
    rc, _ = timed_run({"store": plan["reference"], "seeds": sorted(set(sum(plan["grids"], []))), "chunk": plan["chunk"]})
    out["reference_rc"] = rc
    return out


def resume(plan: dict) -> dict:
    """Kept states and checkpoints: a run with ``keep_every`` is SIGKILLed once its first chunk has passed a
    checkpoint (it waits there, past the checkpoint, until killed), then run again; the rerun notes each update
    it does (chunk, step) in ``PLAN["store"].steps``."""
    from serimats_func.callbacks import Callback

    settings = {"keep_every": plan["keep_every"]}  # a checkpoint every 6 steps, as every run here
    run = {"seeds": plan["seeds"], "chunk": plan["chunk"]}
    marker, noted = plan["store"] + ".waiting", plan["store"] + ".steps"

    class WaitPastCheckpoint(Callback):
        def on_step(self, chunk, step, state, loss) -> None:
            if step == 7:  # the step-6 checkpoint is in place
                open(marker, "w").close()
                time.sleep(600)

    class NoteSteps(Callback):
        def on_step(self, chunk, step, state, loss) -> None:
            if loss is not None:
                with open(noted, "a") as f:
                    f.write(f"{chunk.index} {step}\n")

    def go(store: str, callbacks) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                experiment(store, run["seeds"], run["chunk"], callbacks=callbacks, **settings).run()
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
        return pid

    out = {"reference": wait(go(plan["reference"], []))}
    pid = go(plan["store"], [WaitPastCheckpoint()])
    deadline = time.monotonic() + 120
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    out["waited"] = os.path.exists(marker)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    store = plan["store"]
    out["checkpoints"] = sorted(p for p in os.listdir(os.path.join(store, "checkpoints")) if p != "zarr.json")
    out["rerun"] = wait(go(store, [NoteSteps()]))
    out["steps"] = [tuple(map(int, line.split())) for line in open(noted).read().splitlines()]
    return out


def main(path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's library
    import torch

    torch.set_num_threads(1)
    import serimats_func  # noqa: F401  (imported once, before the forks)
    import tests.builders  # noqa: F401

    plan = json.loads(open(path).read())
    result = {"kills": kills(plan["kills"]) if "kills" in plan else None,
              "concurrent": concurrent(plan["concurrent"]) if "concurrent" in plan else None,
              "resume": resume(plan["resume"]) if "resume" in plan else None}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
