"""Forks: learners that share a prefix train it once, and fork from its state.

A learner whose interventions start acting only at step s or later (``Intervention.first_active_step``) is, up
to step s, bitwise the same learner without them: its *prefix* at s (``LearnerSpec.prefixes``: content-addressed
like any learner, so the prefix of a learner beside its control is often that control). ``fork_tree`` picks, for
each learner to train, the longest prefix worth sharing: one in the grid, one the store holds, or one that at
least two learners share (and, for a prefix not in the grid, its own longest prefix shared beyond its own
learners: a tree). A prefix not in the grid trains up to its last fork step only. A learner then starts from its
prefix's state at the fork step, and takes its prefix's metrics at earlier logged steps (the same numbers).

Each learner is cut into segments at the fork steps of its family (its control, the control's learners and the
prefixes they fork from), so that a parent trains beside the learners that fork from it and a control beside
its learners. A segment is one chunk's worth of work: from one step to the next cut, or to the end.

>>> from types import SimpleNamespace as S
>>> tree = ForkTree(parent={"b": (5, S(id="a")), "c": (3, S(id="b"))})
>>> tree.lineage("c")
[('b', 3), ('a', 3)]
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from .grid import LearnerSpec
from .resume import Need, Start


@dataclass(frozen=True)
class Segment:
    """Train ``spec`` from ``start`` up to ``stop`` updates."""

    spec: LearnerSpec
    start: Start
    stop: int


@dataclass
class ForkTree:
    """Who forks from whom: ``parent[id] = (step, prefix)``; ``prefixes``: the chosen prefixes that are not grid
    learners, by id; ``cuts[family]``: the fork steps of each family (a control's id, or a learner's own);
    ``refreshed``: grid learners the store serves but without their states at the steps others fork from them
    (a control trained before its children were asked for): they train again up to their last fork step, once,
    and keep their states there, like a prefix."""

    parent: dict[str, tuple[int, LearnerSpec]] = field(default_factory=dict)
    prefixes: dict[str, LearnerSpec] = field(default_factory=dict)
    refreshed: set[str] = field(default_factory=set)
    cuts: dict[str, set[int]] = field(default_factory=dict)
    grid_ids: frozenset[str] = frozenset()

    def lineage(self, learner_id: str) -> list[tuple[str, int]]:
        """The learner's ancestors, nearest first, each with the last step up to which the learner equals it."""
        out, bound, seen = [], None, {learner_id}
        while learner_id in self.parent:
            step, prefix = self.parent[learner_id]
            bound = step if bound is None else min(bound, step)
            if prefix.id in seen:  # a learner whose later interventions change nothing is its own prefix
                break
            seen.add(prefix.id)
            out.append((prefix.id, bound))
            learner_id = prefix.id
        return out

    def fork_steps(self, learner_id: str) -> tuple[int, ...]:
        """The steps at which learners fork from this one."""
        return tuple(sorted({s for s, p in self.parent.values() if p.id == learner_id}))

    def family(self, spec: LearnerSpec) -> str:
        return spec.control_id if spec.control_id in self.grid_ids else spec.id

    def ancestors(self, ids: Collection[str]) -> list[LearnerSpec]:
        """The prefixes and grid learners that the learners ``ids`` fork from, transitively."""
        out: dict[str, LearnerSpec] = {}
        for learner_id in ids:
            while learner_id in self.parent and self.parent[learner_id][1].id not in out:
                _, prefix = self.parent[learner_id]
                out[prefix.id] = prefix
                learner_id = prefix.id
        return list(out.values())


def fork_tree(learners: Sequence[LearnerSpec], to_train: Collection[str], total_of: Callable[[LearnerSpec], int],
              in_store: Callable[[str], bool], compatible: Callable[[LearnerSpec, LearnerSpec], bool]) -> ForkTree:
    """The forks of the grid's ``learners`` of which ``to_train`` (ids) are not served by the store. A control
    does not fork (its learners train beside it from wherever they start); a learner forks from a prefix only
    when ``compatible`` (they record the same metrics, e.g. against the same control)."""
    grid_ids = frozenset(s.id for s in learners)
    controls = {s.control_id for s in learners if s.control_id}
    canonical: dict[str, LearnerSpec] = {}  # one object per prefix id (the first seen)
    chains: dict[str, list[tuple[int, LearnerSpec]]] = {}
    users: dict[str, set[str]] = {}
    for spec in learners:
        if spec.id not in to_train or spec.id in controls or spec.control:
            continue
        chain = []
        for s, prefix in spec.prefixes:
            prefix = canonical.setdefault(prefix.id, prefix)
            if s < total_of(spec) and prefix.id != spec.id and compatible(spec, prefix):
                chain.append((s, prefix))
                users.setdefault(prefix.id, set()).add(spec.id)
        chains[spec.id] = chain

    def useful(prefix: LearnerSpec, than: int) -> bool:
        return prefix.id in grid_ids or len(users.get(prefix.id, ())) > than or in_store(prefix.id)

    tree = ForkTree(grid_ids=grid_ids)
    todo: list[LearnerSpec] = []
    for learner_id, chain in chains.items():
        for s, prefix in reversed(chain):
            if useful(prefix, 1):
                tree.parent[learner_id] = (s, prefix)
                todo.append(prefix)
                break
    while todo:
        prefix = todo.pop()
        if prefix.id in grid_ids or prefix.id in tree.prefixes:
            continue
        tree.prefixes[prefix.id] = prefix
        shared_by = len(users.get(prefix.id, ()))
        for s, shorter in reversed(prefix.prefixes):
            shorter = canonical.setdefault(shorter.id, shorter)
            if shorter.id != prefix.id and compatible(prefix, shorter) and useful(shorter, shared_by):
                tree.parent[prefix.id] = (s, shorter)
                todo.append(shorter)
                break
    nodes = {**{s.id: s for s in learners}, **tree.prefixes}
    for child_id, (s, prefix) in tree.parent.items():
        tree.cuts.setdefault(tree.family(nodes[child_id]), set()).add(s)
        tree.cuts.setdefault(tree.family(prefix), set()).add(s)
    return tree


def segments(tree: ForkTree, learners: Sequence[LearnerSpec], total_of: Callable[[LearnerSpec], int],
             need_of: Callable[[LearnerSpec, int, tuple[int, ...]], Need],
             start_of: Callable[[LearnerSpec, Need, list[tuple[str, int]]], Start | None],
             only: Collection[str] | None = None) -> list[Segment]:
    """The segments left to train of ``learners`` (grid learners and prefixes of ``tree``; those of ``only``
    ids, default all), parents first. A prefix trains up to its last fork step and keeps its states at every
    fork step. A segment whose starting state an earlier segment of this run writes has a ``pending`` start."""
    nodes = list(learners)
    depth = {s.id: len(tree.lineage(s.id)) for s in nodes}
    planned: dict[str, tuple[int, int]] = {}  # id -> (first step, last step) it trains in this run
    out: list[Segment] = []
    for spec in sorted(nodes, key=lambda s: depth[s.id]):
        forks = tree.fork_steps(spec.id)
        like_prefix = spec.id in tree.prefixes or spec.id in tree.refreshed
        stop = max(forks) if like_prefix else total_of(spec)
        need = need_of(spec, stop, forks if like_prefix else ())
        start = start_of(spec, need, tree.lineage(spec.id))
        if start is None:
            continue
        if spec.id in tree.parent:
            s, prefix = tree.parent[spec.id]
            first, last = planned.get(prefix.id, (s, s))
            if start.step < s and first < s <= last:  # its prefix reaches s in this run: start there
                start = Start(s, first_unstored=start.first_unstored, metrics_from=prefix.id, pending=True)
        planned[spec.id] = (start.step, stop)
        if only is not None and spec.id not in only:
            continue
        cuts = sorted(t for t in tree.cuts.get(tree.family(spec), ()) if start.step < t < stop)
        for a, b in zip([start.step, *cuts], [*cuts, stop], strict=True):
            out.append(Segment(spec, start if a == start.step else Start(a, first_unstored=a, pending=True), b))
    return out


def describe_forks(tree: ForkTree, parts: Sequence[Segment], coords: dict[str, dict]) -> list[str]:
    """The fork tree in words, one line per fork step and kind of prefix: how many learners fork there, from how
    many prefixes, and whether those are trained in this run or stored ("12 learners fork at step 1000 from 2
    prefixes not in the grid (trained here)")."""
    trained = {p.spec.id for p in parts}
    lines: dict[tuple[int, bool, bool], tuple[set[str], set[str]]] = {}
    for child, (step, prefix) in tree.parent.items():
        if child in trained:
            children, parents = lines.setdefault((step, prefix.id in tree.prefixes, prefix.id in trained), (set(), set()))
            children.add(child)
            parents.add(prefix.id)
    out = []
    for (step, outside, here), (children, parents) in sorted(lines.items()):
        status = "trained here" if here else "stored"
        if here and parents <= tree.refreshed:
            status = f"stored; trained again up to step {step} for its state there"
        if not outside and len(parents) == 1:
            what = f"the grid learner {coords.get(next(iter(parents))) or '(no coordinates)'}"
        elif outside:
            what = f"{len(parents)} prefix{'es' if len(parents) > 1 else ''} not in the grid"
        else:
            what = f"{len(parents)} grid learners"
        out.append(f"fork: {len(children)} learner(s) fork at step {step} from {what} ({status})")
    return out
