"""Planning: which learners to train, in which groups and chunks, and how much memory each takes.

Learners of different structure (model, data, batch size, optimizer class, nesterov, amsgrad, SGD with
or without a momentum buffer, an activation hook's module) cannot share a vmapped step, so they form
separate groups that run one after another. A group larger than the memory budget is split into chunks.

A learner trains beside its control (metrics against the control are computed in the chunk): a control and
its learners go into one chunk, and when they do not fit, the control goes into each chunk of its learners.
A control that is already in the store, or written by an earlier chunk, is trained again beside them (the
same numbers, by construction) and not written twice: ``Chunk.again`` names such learners. A learner whose
control has another structure cannot share its step; its metrics against the control are NaN.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import pytrees
from .forks import Segment
from .grid import Grid, LearnerSpec
from .resume import Start


@dataclass
class Chunk:
    """Learners that train together in one vmapped run, from the same step (0, or a stored state's) up to
    ``stop`` (None: the end; else the next fork step, where they are written and go on in another chunk)."""

    structure: tuple
    learners: list[LearnerSpec]
    starts: list[Start] = field(default_factory=list)  # one per learner: where it starts
    again: frozenset[str] = frozenset()  # ids trained only as controls beside their learners: not written
    stop: int | None = None

    @property
    def pending(self) -> bool:
        """Whether a state it starts from is yet to be written by an earlier chunk."""
        return any(s.pending for s in self.starts)

    @property
    def start(self) -> int:
        return self.starts[0].step if self.starts else 0

    @property
    def to_write(self) -> list[LearnerSpec]:
        return [s for s in self.learners if s.id not in self.again]

    @property
    def description(self) -> str:
        return describe_group(self.learners[0])


@dataclass
class Plan:
    """What ``Experiment.run()`` would do. Printing it gives a short report."""

    grid_cells: int
    learners: int
    in_store: int
    chunks: list[Chunk] = field(default_factory=list)
    bytes_per_learner: dict[tuple, int] = field(default_factory=dict)
    evaluation_learners: dict[tuple, int | None] = field(default_factory=dict)  # learners per evaluation pass
    memory: dict[tuple, LearnerMemory] = field(default_factory=dict)
    memory_budget: int = 0
    device: str = "cpu"
    total_steps: int = 0
    store: str = ""
    speed: str = ""
    forks: list[str] = field(default_factory=list)  # the fork tree in words, one line per fork point
    refreshed: frozenset[str] = frozenset()  # stored learners trained again up to a fork step, to fork from there
    # compile="auto" in words, per group (made when printed: planning again during run() does not pay for it)
    compile_outlook: Callable[[], list[str]] | None = field(default=None, repr=False)

    @property
    def to_train(self) -> int:
        """Grid learners trained and written (not counting controls trained again beside their learners, nor
        prefixes that only exist to be forked from)."""
        return len({s.id for c in self.chunks for s in c.to_write if not s.prefix and s.id not in self.refreshed})

    @property
    def learner_steps(self) -> int:
        """The learner-steps it computes: every chunk's learners times its steps, each shared prefix once (and
        controls trained again beside their learners counted too)."""
        return sum(len(c.learners) * ((c.stop if c.stop is not None else self.total_steps) - c.start)
                   for c in self.chunks)

    @property
    def continuing(self) -> dict[str, int]:
        """How many learners continue from a stored state or fork from a prefix, by where they start ("from step
        500 (final state)", "forked at step 500"): each learner's first chunk."""
        out: dict[str, int] = {}
        seen: set[str] = set()
        for chunk in self.chunks:
            for spec, start in zip(chunk.learners, chunk.starts, strict=True):
                if spec.id in seen or spec.id in chunk.again or spec.prefix or spec.id in self.refreshed:
                    continue
                seen.add(spec.id)
                if start.step > 0:
                    out[start.description] = out.get(start.description, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [
            f"{self.learners} learners in the grid ({self.grid_cells} cells); {self.in_store} already in "
            f"{self.store}, {self.to_train} to train for {self.total_steps} steps on {self.device}: "
            f"{self.learner_steps} learner-steps.",
        ]
        continuing = self.continuing
        if continuing:
            n = sum(continuing.values())
            lines.append(f"  {n} of them continue from stored states ({self.to_train - n} from scratch): "
                         + ", ".join(f"{k} {where}" for where, k in continuing.items()))
        lines += [f"  {line}" for line in self.forks]
        groups: dict[tuple, list[Chunk]] = {}
        for chunk in self.chunks:
            groups.setdefault(chunk.structure, []).append(chunk)
        for structure, chunks in groups.items():
            n = len({s.id for c in chunks for s in c.to_write if s.id not in self.refreshed})
            again = sum(len(c.again) for c in chunks)
            mib = self.bytes_per_learner[structure] / 2**20
            evaluation = self.evaluation_learners.get(structure)
            lines.append(
                f"  group {chunks[0].description}: {n} learners in {len(chunks)} chunk(s) of up to "
                f"{max(len(c.learners) for c in chunks)}, about {mib:.1f} MiB per learner"
                + (f", evaluated {evaluation} at a time" if evaluation else "")
                + (f"; {again} control(s) trained again beside their learners (not written twice)" if again else "")
            )
        lines.append(f"  memory budget: {self.memory_budget / 2**30:.1f} GiB")
        if self.speed:
            lines.append(f"  speed: {self.speed}")
        if self.compile_outlook is not None and self.chunks:
            lines += [f"  {line}" for line in self.compile_outlook()]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython
        printer.text(str(self))


def describe_group(spec: LearnerSpec) -> str:
    """A group in words: its optimizer structure, and model, data and batch size where they vary."""
    setup = spec.setup
    words = setup.describe_optimizer()
    extra = []
    if setup.model_label is not None:
        extra.append(f"model {setup.model_label}")
    if setup.data.label is not None:
        extra.append(f"dataset {setup.data.label}")
    extra.append(f"batch {setup.batch_size}")
    extra += [f"{k}={v}" for s in spec.structure[1:] for k, v in s if k not in ("model", "dataset", "batch_size")]
    return f"{words} ({', '.join(extra)})"


def memory_budget(device: torch.device) -> int:
    """Bytes the training may use: 70% of the free GPU memory, or half the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes one example's forward pass leaves, measured on the template."""

    outputs: int  # every module's outputs: kept for the backward pass (inputs of the next module)
    saved: int  # what autograd keeps for the backward pass (outputs, max-pool indices, masks...)
    largest: int  # the largest single module output


def activation_bytes(template: nn.Module, example_x: torch.Tensor) -> ActivationBytes:
    """Per example, measured on a small batch in training mode, with autograd recording (nothing changes:
    a copy of the template is used, in float32 as given)."""
    outputs, largest, saved = 0, 0, {}

    def hook(_module, _inputs, output):
        nonlocal outputs, largest
        for t in pytrees.leaves(output):
            if isinstance(t, torch.Tensor):
                outputs += t.numel() * t.element_size()
                largest = max(largest, t.numel() * t.element_size())

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    probe = copy.deepcopy(template).train()  # measuring changes nothing in the template
    for m in probe.modules():
        m.register_forward_hook(hook)
    x = example_x.detach()
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probe(x).sum()
    for t in (x, *probe.parameters(), *probe.buffers()):  # the batch and the state are counted elsewhere
        saved.pop(t.untyped_storage().data_ptr(), None)
    n = len(x)
    return ActivationBytes(max(1, outputs // n), max(1, sum(saved.values()) // n), max(1, largest // n))


def activation_bytes_per_example(template: nn.Module, example_x: torch.Tensor) -> int:
    """Bytes of every module's outputs for one example (measured on a small batch)."""
    return activation_bytes(template, example_x).outputs


VMAP_ACTIVATIONS = 1.5  # vmapped activations take more than one learner's: layout copies (measured: LeNet-5, CPU)
# an evaluation batch holds a layer's input and output and a copy (im2col, channels-last): LeNet-5, 32 learners,
# 20,000 examples, batch 256 peaked 600 MiB above the process's size, 2 of them estimated 505 MiB, 3: 694 MiB
EVAL_LAYER_OUTPUTS = 3
# what a training chunk holds beyond the step's tensors: the heap that training keeps (acceleration.keep_freed_memory)
# fragments, and measuring plans runs other layouts at the chunk's start. LeNet-5, 21 learners in a chunk sized to a
# 206 MiB budget (4,000 images): 228 MiB resident above the process at the chunk's start, 204 MiB estimated without it
STEP_SLACK = 1.15


@dataclass(frozen=True)
class LearnerMemory:
    """Estimated bytes of one learner of a vmapped chunk.

    - ``state``: params, buffers and optimizer state, on the device for the whole chunk;
    - ``step``: what one training step adds at its peak: the new state and the gradients, the update's
      temporaries (two parameter-sized tensors), and the batch's activations (what autograd saves, plus two of
      the largest layer output for the gradients flowing back), times ``STEP_SLACK`` (the kept heap's fragments);
    - ``evaluation``: one evaluation pass: ``EVAL_LAYER_OUTPUTS`` of the largest layer output per example of an
      evaluation batch, and the logits of the largest set, twice (the whole-set loss needs them all, and its
      softmax a copy).

    Activations are counted ``VMAP_ACTIVATIONS`` times: vmapped layers copy them to move the learner axis.
    """

    state: int
    step: int
    evaluation: int

    @property
    def training(self) -> int:
        return self.state + self.step


def learner_memory(spec: LearnerSpec, batch_size: int, eval_batch_size: int) -> LearnerMemory:
    """``LearnerMemory`` of a learner of ``spec``'s setup (all learners of a group are alike)."""
    setup = spec.setup
    template, example_x = setup.template, setup.template_info.example_x
    params = dict(template.named_parameters())
    param_bytes = pytrees.nbytes(params)
    twin = setup.optimizer_twin()
    opt_bytes = pytrees.nbytes(twin.init({k: params[k] for k in setup.trainable_names}))
    buffer_bytes = pytrees.nbytes(dict(template.named_buffers()))
    acts = activation_bytes(template, example_x)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        classes = copy.deepcopy(template).eval()(example_x).shape[-1]
    largest_set = max(len(t) for t in (setup.data.x, setup.data.x_test) if t is not None)
    state = param_bytes + buffer_bytes + opt_bytes
    step = int(STEP_SLACK * (state + 3 * param_bytes + 2 * param_bytes  # new state, gradients and more, update temporaries
                             + VMAP_ACTIVATIONS * batch_size * (acts.saved + 2 * acts.largest)))
    logits = largest_set * classes * example_x.element_size()  # the batches' logits and their concatenation
    evaluation = int(VMAP_ACTIVATIONS * eval_batch_size * EVAL_LAYER_OUTPUTS * acts.largest) + 2 * logits
    return LearnerMemory(state, step, evaluation)


def bytes_per_learner(spec: LearnerSpec, batch_size: int, eval_batch_size: int) -> int:
    """Estimated peak bytes of one learner in a vmapped training step (the chunk size follows from it;
    evaluation passes are sized apart, ``evaluation_learners``)."""
    return learner_memory(spec, batch_size, eval_batch_size).training


def evaluation_learners(memory: LearnerMemory, learners: int, budget: int) -> int | None:
    """How many of a chunk's ``learners`` one evaluation pass may take within ``budget`` bytes, next to the
    chunk's state; None when all fit (at least 2: evaluation passes take learners in pairs or more)."""
    room = budget - learners * memory.state
    fit = max(2, room // max(1, memory.evaluation))
    return None if fit >= learners else fit


def make_plan(
    grid: Grid,
    segments: Sequence[Segment],
    eval_batch_size: int,
    device: torch.device,
    max_learners_per_chunk: int | None = None,
    data_bytes: int = 0,
    learners: int | None = None,
    in_store: int = 0,
    again_start: Callable[[LearnerSpec, int], Start | None] = lambda control, step: None,
    refreshed: frozenset[str] = frozenset(),
) -> Plan:
    """Split the ``segments`` left to train (``forks.segments``: each learner from where it starts to its next fork
    step or its end) into groups of one structure, start and stop, and those into chunks that fit in the memory
    left once the data (``data_bytes``) is on the device; chunks in order of their start. A control that the
    group's learners need beside them and that does not train there itself is trained again from its stored
    state at the group's start (``again_start``) when it has one."""
    groups: dict[tuple, list[Segment]] = {}
    for segment in segments:
        groups.setdefault((segment.spec.structure, segment.start.step, segment.stop), []).append(segment)
    plan = Plan(grid_cells=len(grid.cells), learners=len(grid.learners) if learners is None else learners,
                in_store=in_store, memory_budget=max(0, memory_budget(device) - data_bytes), device=str(device),
                refreshed=refreshed)
    largest: dict[tuple, int] = {}  # learners of the largest chunk of each structure
    for (structure, step, stop), members in sorted(groups.items(), key=lambda kv: kv[0][1:]):
        specs = [m.spec for m in members]
        starts = {m.spec.id: m.start for m in members}
        if structure not in plan.bytes_per_learner:
            memory = learner_memory(specs[0], specs[0].setup.batch_size, eval_batch_size)
            plan.bytes_per_learner[structure] = memory.training
            plan.memory[structure] = memory
        size = max(1, plan.memory_budget // plan.bytes_per_learner[structure])
        if max_learners_per_chunk:
            size = min(size, max_learners_per_chunk)

        def can_join(control: LearnerSpec, step: int = step, starts: dict = starts) -> bool:
            found = again_start(control, step)
            if found is not None:
                starts.setdefault(control.id, found)
            return found is not None

        packed = pack_with_controls(specs, grid, size, beside_only=step > 0, can_join=can_join)
        largest[structure] = max(largest.get(structure, 0), *(len(members) for members, _ in packed))
        plan.evaluation_learners[structure] = evaluation_learners(plan.memory[structure], largest[structure],
                                                                  plan.memory_budget)
        for chunk_members, again in packed:
            plan.chunks.append(Chunk(structure, chunk_members, [starts.get(m.id) or Start(0) for m in chunk_members],
                                     again, stop))
    return plan


def pack_with_controls(specs: list[LearnerSpec], grid: Grid, size: int, beside_only: bool = False,
                       can_join: Callable[[LearnerSpec], bool] = lambda control: False,
                       ) -> list[tuple[list[LearnerSpec], frozenset[str]]]:
    """Split learners of one structure into chunks of at most ``size`` (at least 2 where a learner needs its
    control), in grid order, so that each learner whose control has the same structure trains beside it.
    Returns (learners, ids trained again only as controls: in the store already, or written by an earlier
    chunk). With ``beside_only`` (learners that continue from a stored step), a control is added only if it is
    among ``specs`` (it continues from the same step) or ``can_join`` it (it has a stored state there); otherwise
    its learners' control metrics are NaN.

    >>> from types import SimpleNamespace as S
    >>> c, a, b = (S(id=i, control_id="c", structure=1) for i in "cab")
    >>> [([s.id for s in m], sorted(again)) for m, again in pack_with_controls([a, b], S(learners=[c, a, b]), 2)]
    [(['c', 'a'], ['c']), (['c', 'b'], ['c'])]
    >>> [([s.id for s in m], sorted(again)) for m, again in pack_with_controls([c, a, b], S(learners=[c, a, b]), 8)]
    [(['c', 'a', 'b'], [])]
    """
    by_id = {s.id: s for s in grid.learners}
    families: dict[str, list[LearnerSpec]] = {}  # control id -> its learners among specs (itself too if there)
    for spec in specs:
        control = by_id.get(spec.control_id) if spec.control_id else None
        beside = control is not None and control.id != spec.id and control.structure == spec.structure and (
            not beside_only or any(c.id == control.id for c in specs) or can_join(control))
        families.setdefault(control.id if beside else spec.id, []).append(spec)
    units: list[tuple[list[LearnerSpec], set[str]]] = []
    for key, members in families.items():
        others = [m for m in members if m.id != key]
        if not others:  # no control to add: a learner without one, or a control whose learners are stored
            units.append((members, set()))
            continue
        stored = len(others) == len(members)  # the control itself is not to train
        step = max(size, 2) - 1
        for i, start in enumerate(range(0, len(others), step)):
            units.append(([by_id[key]] + others[start : start + step], {key} if stored or i > 0 else set()))
    chunks: list[tuple[list[LearnerSpec], set[str]]] = []
    for learners, again in units:
        if chunks and len(chunks[-1][0]) + len(learners) <= size:
            chunks[-1][0].extend(learners)
            chunks[-1][1].update(again)
        else:
            chunks.append((list(learners), set(again)))
    return [(learners, frozenset(again)) for learners, again in chunks]
