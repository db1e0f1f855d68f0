"""Where a learner's training starts: served by the store, continued from a stored state, or from scratch.

A learner needs metric values at its logged steps (each metric named by a digest of what decides it) and,
if asked, full states at some steps. When the store's batches hold all of it, the learner is served. Else it
continues from the latest state the store holds (a state kept in a batch, a batch's final state, or a
checkpoint) at or before the first step it lacks, and from scratch when there is none: asking for more steps
continues each learner from its final state, with the same numbers as one longer run.

>>> need = Need(steps=(0, 4, 8), metric_keys={"loss": "k"}, states=(), total=8)
>>> need.first_missing({"loss": {0, 4}}, set())
8
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..store.zarr_store import Source, Store


@dataclass(frozen=True)
class Need:
    """What a request needs of one learner."""

    steps: tuple[int, ...]  # logged steps
    metric_keys: Mapping[str, str]  # metric -> digest of what decides it
    states: tuple[int, ...]  # steps whose full state is to be kept
    total: int  # steps to train

    def first_missing(self, metrics: Mapping[str, set[int]], states: set[int]) -> int | None:
        """The first step with a metric value or a state that ``metrics`` {name: steps} and ``states`` lack. A
        learner that records no metric needs its final state (else nothing would say it was trained)."""
        gaps = [s for s in self.steps if any(s not in metrics.get(m, ()) for m in self.metric_keys)]
        wanted = self.states if self.metric_keys else (*self.states, self.total)
        gaps += [s for s in wanted if s not in states]
        return min(gaps, default=None)


@dataclass(frozen=True)
class Start:
    """Where a learner not served by the store starts: ``step`` 0 from scratch, else the state at ``step`` in
    ``source`` (at ``position``): its own, or (a fork) that of ``metrics_from``, a learner it equals up to there,
    whose metrics at earlier logged steps it takes too. ``pending``: that state is written by an earlier chunk
    of the same run (a prefix, or the learner's own previous segment)."""

    step: int
    source: Source | None = None
    position: int = 0
    first_unstored: int = 0  # the first logged step whose metrics no batch holds
    metrics_from: str | None = None  # a fork: the learner whose state and earlier metrics it takes
    pending: bool = False

    @property
    def description(self) -> str:
        if self.metrics_from is not None:
            return f"forked at step {self.step}"
        if self.source is None:
            return "from scratch" if self.step == 0 else f"from step {self.step}"
        if self.source.kind == "checkpoint":
            return f"from step {self.step} (checkpoint)"
        final = self.step == max(self.source.steps, default=-1)
        return f"from step {self.step} ({'final' if final else 'kept'} state)"


def held(store: Store, learner_id: str, need: Need, checkpoints: bool) -> tuple[dict[str, set[int]], set[int]]:
    """The steps at which the store holds each needed metric of the learner, and the steps of its states."""
    metrics: dict[str, set[int]] = {m: set() for m in need.metric_keys}
    states: set[int] = set()
    for source, position in store.holders(learner_id, checkpoints):
        for m, key in need.metric_keys.items():
            if source.key(m, position) == key:
                metrics[m].update(int(s) for s in source.steps)
        states.update(int(s) for s in source.state_steps)
    return metrics, states


def start_of(store: Store, learner_id: str, need: Need, lineage: Sequence[tuple[str, int]] = ()) -> Start | None:
    """None when the store's batches serve the learner, else where its training starts: the latest state the
    store holds at or before the first step it lacks, its own or (a fork) one of ``lineage``'s: learners
    (ids) it equals up to a step, whose states up to that step serve it, when they hold its metrics (same
    metric keys) up to there and the learner needs no kept state before."""
    stored_metrics, stored_states = held(store, learner_id, need, checkpoints=False)
    if need.first_missing(stored_metrics, stored_states) is None:
        return None
    unstored = min((s for s in need.steps if any(s not in steps for steps in stored_metrics.values())), default=need.total)
    metrics_anywhere, stored_states = held(store, learner_id, need, checkpoints=True)
    missing = need.first_missing(metrics_anywhere, stored_states)
    limit = need.total if missing is None else min(missing, need.total)
    best = Start(0, first_unstored=unstored)
    for source, position in store.holders(learner_id, checkpoints=True):  # batches first, oldest first
        for step in source.state_steps:
            if best.step < int(step) <= limit:
                best = Start(int(step), source, position, first_unstored=unstored)
    own_states = min((s for s in need.states if s not in stored_states), default=need.total)  # its own to keep
    for ancestor, bound in lineage:
        reach = need.first_missing(*held(store, ancestor, Need(need.steps, need.metric_keys, (), need.total), True))
        top = min(bound, need.total, own_states, need.total if reach is None else reach)
        for source, position in store.holders(ancestor, checkpoints=True):
            for step in source.state_steps:
                if best.step < int(step) <= top:
                    best = Start(int(step), source, position, first_unstored=unstored, metrics_from=ancestor)
    return best


def state_at(store: Store, ids: Sequence[str], step: int) -> Start | None:
    """A stored state at exactly ``step`` of the first of ``ids`` that has one (a control trained again beside
    learners that continue from there)."""
    for learner_id in ids:
        for source, position in store.holders(learner_id, checkpoints=True):
            if step in (int(s) for s in source.state_steps):
                return Start(step, source, position, first_unstored=step,
                             metrics_from=None if learner_id == ids[0] else learner_id)
    return None
