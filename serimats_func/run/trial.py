"""The trial step: one real training step of a few learners of each group, on the CPU, when an
``Experiment`` is built.

Some mistakes only show in training: a loss that calls ``.item()``, BatchNorm given a last batch of one
example, a hook that fails on real values. The trial runs the step that training will run (the same
interventions' hooks, optimizer, loss and vmap) for a few learners of each group, on the smallest batch the
schedule will give them, so that these fail before anything is trained or written, with a message that
says what to do. It changes nothing: the template, the global RNG and every learner are as they were.

>>> import torch
>>> smallest_batch(n=512, batch_size=73, total_steps=8)  # 7 full batches, then one example
1
>>> smallest_batch(n=512, batch_size=73, total_steps=5)  # the schedule never reaches the last batch
73
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core import pytrees
from ..core.data import steps_per_epoch
from ..core.learners import initial_model_states
from ..core.purity import check_pure, host_sync_error
from ..core.step import HookOutputError, InPlaceHookError, LossFn, checking_in_place, make_train_step, run_hooks
from .grid import LearnerSpec, class_name
from .planning import describe_group
from .training import chunk_hooks, chunk_optimizer, initial_state, intervention_data

CPU = torch.device("cpu")


class TrialStepError(ValueError):
    """A training step failed on a trial run, before anything was trained or written."""


def smallest_batch(n: int, batch_size: int, total_steps: int) -> int:
    """The fewest examples in any batch of a schedule of ``total_steps`` steps over ``n`` examples: the last
    batch of an epoch when the schedule reaches it, else a full batch."""
    last = n - (steps_per_epoch(n, batch_size) - 1) * batch_size
    return last if total_steps >= steps_per_epoch(n, batch_size) else min(batch_size, n)


def groups(specs: Sequence[LearnerSpec]) -> list[list[LearnerSpec]]:
    """Learners by structure (those that share one vmapped step), in grid order."""
    by_structure: dict[tuple, list[LearnerSpec]] = {}
    for spec in specs:
        by_structure.setdefault(spec.structure, []).append(spec)
    return list(by_structure.values())


def trial_learners(group: Sequence[LearnerSpec]) -> list[LearnerSpec]:
    """A few learners of one group that together run every hook the group runs: the first, then each that
    makes an intervention class act that none of the chosen does; at least two (vmap over a learner axis)."""
    chosen = [group[0]]
    acting = _acting(group[0])
    for spec in group[1:]:
        new = _acting(spec) - acting
        if new:
            chosen.append(spec)
            acting |= new
    if len(chosen) == 1:
        chosen.append(group[1] if len(group) > 1 else group[0])
    return chosen


def _acting(spec: LearnerSpec) -> set[str]:
    return {class_name(type(v)) for v in spec.interventions if not v.is_default()}


def trial_step(group: Sequence[LearnerSpec], loss_fn: LossFn, batch_size: int) -> None:
    """Run one training step of ``trial_learners(group)`` on the CPU on the group's first ``batch_size``
    examples; raise ``TrialStepError`` saying what failed and what to do."""
    specs = trial_learners(group)
    setup = specs[0].setup
    data = setup.data
    shared = len({s.data_key for s in group}) == 1
    xb, yb = data.x[:batch_size], data.y[:batch_size]  # (B, ...)
    if not shared:
        xb, yb = xb.expand(len(specs), *xb.shape), yb.expand(len(specs), *yb.shape)  # (N, B, ...)
    template = setup.template
    was_training = template.training
    hooks = chunk_hooks(specs)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            state = initial_state(specs, hooks, CPU)
            step = make_train_step(template, chunk_optimizer(specs), loss_fn, hooks, shared_batch=shared,
                                   trainable=setup.trainable_names)
            template.train()
            # first each hook on real tensors, outside vmap: in-place changes and outputs of the wrong kind are
            # named there, before vmap would fail on them with a dump of its batched tensors
            _check_in_place(specs, hooks, template, loss_fn, shared, xb, yb, setup.trainable_names)
            try:
                check_pure(step, state, xb, yb, hooks)  # an .item() on a value all learners share, too
            except ValueError as error:
                raise TrialStepError(str(error)) from error
            step(state, xb, yb, torch.zeros((), dtype=torch.int64))
    except (InPlaceHookError, HookOutputError) as error:
        raise TrialStepError(str(error)) from error
    except TrialStepError:
        raise
    except Exception as error:
        refusal = host_sync_error(error, hooks)
        if refusal is not None:
            raise TrialStepError(str(refusal)) from error
        raise TrialStepError(_message(error, specs, group, batch_size)) from error
    finally:
        template.train(was_training)


def _check_in_place(specs, hooks, template, loss_fn, shared, xb, yb, trainable) -> None:
    """Run every hook once on real tensors, one learner after another (outside vmap, where tensors' version
    counters count), refusing one that changes its input in place (``InPlaceHookError``) or returns another
    kind of value than it received: other keys, dtype or shape, no (value, state) pair (``HookOutputError``)."""
    if not hooks.points:
        return
    t = torch.zeros((), dtype=torch.int64)
    with checking_in_place():
        model = initial_model_states(template, [s.init_key for s in specs], [s.dropout_key for s in specs])
        inter = intervention_data(specs, hooks)
        run_hooks(hooks.at("on_init"), pytrees.index(model, 0), pytrees.index(inter, 0), t)
        looped = make_train_step(template, chunk_optimizer(specs), loss_fn, hooks, shared_batch=shared,
                                 trainable=trainable, per_learner=True)
        looped(initial_state(specs, hooks, CPU), xb, yb, t)


def _message(error: Exception, specs: Sequence[LearnerSpec], group: Sequence[LearnerSpec], batch_size: int) -> str:
    setup = specs[0].setup
    n, size = len(setup.data.x), setup.batch_size
    acting = sorted(set().union(*(_acting(s) for s in specs)))
    with_ = f" with {', '.join(acting)}" if acting else ""
    examples = "1 example" if batch_size == 1 else f"{batch_size} examples"
    reason = " ".join(str(error).split())
    reason = reason if len(reason) <= 400 else reason[:400] + " ..."
    text = (f"A trial training step ({len(specs)} learners{with_}, group {describe_group(group[0])}) failed on a "
            f"batch of {examples}: {type(error).__name__}: {reason}")
    if batch_size == 1 and size > 1:
        better = _batch_size_without_a_batch_of_one(n, size)
        return (f"{text}. The last batch of each epoch holds 1 example ({n} examples in batches of {size}), and the "
                f"model cannot train on one example (BatchNorm needs two or more). Pick a batch size that leaves no "
                f"batch of one (e.g. batch_size={better}), or drop the last example from the dataset "
                f"({n - 1} examples), or train fewer steps than an epoch.")
    return (f"{text}. Nothing was trained or written: fix the model, the loss or the intervention named above "
            "(the step runs every learner of a group at once under torch.func.vmap).")


def _batch_size_without_a_batch_of_one(n: int, batch_size: int) -> int:
    """The batch size nearest ``batch_size`` whose last batch is not one example."""
    for delta in range(1, batch_size):
        for candidate in (batch_size + delta, batch_size - delta):
            if 2 <= candidate and n % candidate != 1:
                return candidate
    return batch_size + 1
