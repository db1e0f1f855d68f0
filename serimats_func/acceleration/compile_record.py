"""Which training steps inductor compiled on this machine, and what compiling them cost: ``compile="auto"`` reads it to
know whether compiling a step would find its kernels in inductor's on-disk cache (seconds: "warm") or build them (tens
of seconds on a CPU: "cold").

One entry per step signature, keyed like a plan (``plan_cache.entry_key``): ``"compile"``, the device by name, the
torch version, the number of learners, the chunk structure's digest and the convolution plan that was compiled. It
holds the seconds of the first (cold) compile and of the latest warm one, the eager and compiled step's seconds then,
and inductor's cache folder: a record whose folder is gone (a reboot emptied ``/tmp``) is cold again. The file is
``compiled.json`` beside ``plans.json`` (``plan_cache.cache_dir()``), written atomically the same way; deleting it
makes every step cold again (a compile still finds inductor's own cache: it is then recorded as warm).

``decide`` is the whole policy, a function of numbers:

- warm record: compile when the eager estimate (step seconds x steps left) is at least ``WARM_COMPILE_SECONDS``, or
  when the time the recorded compiled step saves over the run repays the warm compile ``PAYBACK`` times (its recorded
  cost, or ``WARM_SHARE`` of the cold one when the step was compiled only once); not when the record says the
  compiled step was not faster;
- cold: compile when the expected cold compile (``expected_cold_seconds``: what this device's recorded cold compiles
  cost, else ``COLD_COMPILE_SECONDS``) is at most ``COLD_SHARE`` of the eager estimate.

>>> decide(90.0, {"warm_s": 8.0, "eager_s": 0.01, "compiled_s": 0.004}, "cpu", cold_s=40.0).compile
True
>>> decide(90.0, None, "cpu", cold_s=40.0).reason
'eager estimate 90 s; cold inductor cache: compiling costs about 40 s, compiled from 400 s'
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import plan_cache

FILE_NAME = "compiled.json"
WARM_COMPILE_SECONDS = 60.0  # a warm compile (tracing, cached kernels) costs seconds: compile from a minute of eager
COLD_SHARE = 0.1  # a cold compile may cost this share of the eager run (it may turn out no faster)
# The first compile of a step on this device when none is recorded: measured on a 2-core Xeon, torch 2.14, one thread,
# under load: MLP 40-100-100-10 with Adam, 64 learners, 31 s (warm: 8 s); LeNet-5 with SGD, 64 learners, 57 s.
COLD_COMPILE_SECONDS = {"cpu": 45.0, "cuda": 60.0}
NOT_FASTER = 0.95  # a compiled step above this share of the eager one is not kept
PAYBACK = 2.0  # warm, with the step times recorded: compile when the time saved is this many times the compile's
# A warm compile's share of the cold one, when only the cold compile is recorded (the step was compiled here once):
# tracing and loading cached kernels, without building them (2-core Xeon: MLP 31 s cold, 8 s warm; 2-core EPYC:
# LeNet-5 with 32 learners 17.7 s cold, 6.1 s warm)
WARM_SHARE = 0.3


@dataclass(frozen=True)
class Decision:
    """Whether to compile, whether inductor's cache is warm for the step, what compiling is expected to cost (s),
    and why, in words (``ChunkSpeed.reason``, ``plan()``)."""

    compile: bool
    warm: bool
    expected_s: float
    reason: str


def key(structure: str, plan: str, n: int, device: torch.device) -> str:
    """The record's key of a step: its structure's digest and convolution plan, ``n`` learners, the device."""
    return plan_cache.entry_key("compile", f"{structure}|{plan}", n, device)


def inductor_cache() -> str:
    """Inductor's on-disk cache folder (``TORCHINDUCTOR_CACHE_DIR``, default under ``/tmp``); "" if unknown."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return str(cache_dir())
    except Exception:  # a torch without it: every step counts as cold
        return ""


def lookup(record_key: str) -> dict | None:
    """The record of a step when inductor's cache should still hold its kernels (the folder it was compiled into
    exists), else None."""
    entry = plan_cache.read_entries(FILE_NAME).get(record_key)
    if not isinstance(entry, dict) or not entry.get("inductor"):
        return None
    return entry if entry["inductor"] == inductor_cache() and Path(entry["inductor"]).is_dir() else None


def lookup_any(prefix: str) -> dict | None:
    """A warm record of a step whose key starts with ``prefix`` (any plan), the most recent one."""
    found = [k for k in plan_cache.read_entries(FILE_NAME) if k.startswith(prefix)]
    entries = [e for e in (lookup(k) for k in found) if e is not None]
    return max(entries, key=lambda e: e.get("when", 0), default=None)


def remember(record_key: str, compile_s: float, cold: bool, eager_s: float | None, compiled_s: float | None) -> None:
    """Record a compile of the step ``record_key`` that took ``compile_s``, ``cold`` when it built kernels."""
    entry = dict(plan_cache.read_entries(FILE_NAME).get(record_key) or {})
    if cold:
        entry.pop("warm_s", None)
    entry.update({"cold_s" if cold else "warm_s": compile_s, "eager_s": eager_s, "compiled_s": compiled_s,
                  "inductor": inductor_cache(), "when": time.time()})
    plan_cache.remember(record_key, entry, FILE_NAME)


def remember_eager(record_key: str, eager_s: float) -> None:
    """Note the eager step time of a step not compiled here yet, so that ``plan()`` can estimate its next run (an
    entry without inductor's folder is never warm)."""
    if record_key not in plan_cache.read_entries(FILE_NAME):
        plan_cache.remember(record_key, {"eager_s": eager_s, "when": time.time()}, FILE_NAME)


def eager_seconds(record_key: str) -> float | None:
    """The eager step time recorded for a step (compiled or not), or None."""
    entry = plan_cache.read_entries(FILE_NAME).get(record_key)
    value = entry.get("eager_s") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def expected_cold_seconds(device: torch.device) -> float:
    """What a cold compile is expected to cost here: the largest cold compile recorded for this device and torch
    version, else ``COLD_COMPILE_SECONDS``."""
    prefix = plan_cache.entry_key("compile", "", 0, device).rsplit("|N=", 1)[0] + "|"
    recorded = [e["cold_s"] for k, e in plan_cache.read_entries(FILE_NAME).items()
                if k.startswith(prefix) and isinstance(e, dict) and isinstance(e.get("cold_s"), (int, float))]
    return max(recorded) if recorded else COLD_COMPILE_SECONDS.get(device.type, COLD_COMPILE_SECONDS["cuda"])


def decide(estimate_s: float, entry: dict | None, device_type: str, cold_s: float) -> Decision:
    """Compile or not, for a chunk whose eager run is estimated at ``estimate_s``, given the step's warm record
    (``lookup``; None: cold) and the expected cost of a cold compile ``cold_s``."""
    head = f"eager estimate {estimate_s:.0f} s"
    if entry is not None:
        estimated = not entry.get("warm_s")  # compiled once (cold): a warm compile is a share of that
        warm_s = float(entry.get("warm_s") or WARM_SHARE * float(entry.get("cold_s") or 0.0))
        eager_s, compiled_s = entry.get("eager_s"), entry.get("compiled_s")
        if eager_s and compiled_s and compiled_s >= NOT_FASTER * eager_s:
            return Decision(False, True, warm_s, f"{head}; compiled here before, not faster "
                                                 f"({compiled_s * 1e3:.3g} ms vs eager {eager_s * 1e3:.3g} ms): eager")
        saving = estimate_s * (1 - compiled_s / eager_s) if eager_s and compiled_s else 0.0
        go = estimate_s >= WARM_COMPILE_SECONDS or saving >= PAYBACK * warm_s
        words = f", saving about {saving:.0f} s" if saving else ""
        cost = (f"a warm compile about {warm_s:.0f} s, {WARM_SHARE:.0%} of the first one" if estimated
                else f"compiled here before in {warm_s:.0f} s")
        return Decision(go, True, warm_s, f"{head}; warm inductor cache ({cost}{words}), "
                                          f"compiled from {WARM_COMPILE_SECONDS:.0f} s or when the saving repays the "
                                          f"compile {PAYBACK:.0f} times")
    threshold = max(WARM_COMPILE_SECONDS, cold_s / COLD_SHARE)
    return Decision(estimate_s >= threshold, False, cold_s,
                    f"{head}; cold inductor cache: compiling costs about {cold_s:.0f} s, compiled from {threshold:.0f} s")


def describe_policy(device: torch.device, warm: int, groups: int) -> str:
    """``compile="auto"`` in words for ``plan()``: the thresholds, how many of the plan's ``groups`` steps have a
    warm record, and the expected cost of the first cold compile."""
    cold_s = expected_cold_seconds(device)
    threshold = max(WARM_COMPILE_SECONDS, cold_s / COLD_SHARE)
    return (f"compiled when a chunk's eager estimate is at least {WARM_COMPILE_SECONDS:.0f} s with inductor's cache warm "
            f"for its step ({warm} of {groups} group(s) compiled here before), else at least {threshold:.0f} s: a "
            f"first (cold) compile costs about {cold_s:.0f} s on this {device.type}")
