"""The points of a training step where interventions act: one table, read by everything that needs it
(the protocol's checks, the step builder, the purity check, the assembly of the interventions' data).

Each point is a method name of ``Intervention``, what the hook receives (and returns, changed), and whether it
runs in the training step (and so takes ``when=`` windows) or once, on the initial state.

>>> [p.method for p in POINTS if p.in_step][:3]
['on_batch', 'on_buffers', 'on_activations']
>>> POINT["on_optimizer_state"].receives
"the optimizer's state before its update (a NamedTuple: momentum_buffer, exp_avg, exp_avg_sq, step...)"
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HookPoint:
    """One point of the step: ``method`` is the hook's name on an ``Intervention``."""

    method: str
    receives: str  # what the hook is called with, and returns changed
    in_step: bool  # runs in every training step (windows apply); False: once, on the initial state


POINTS: tuple[HookPoint, ...] = (
    HookPoint("on_init", "the new learner's ModelState(params, buffers)", in_step=False),
    HookPoint("on_batch", "(x, y) of this step", in_step=True),
    HookPoint("on_buffers", "the model's buffers (name -> tensor: BatchNorm statistics, dropout keys and call counts) "
              "before the forward pass; what it returns is what the forward pass starts from and keeps", in_step=True),
    HookPoint("on_activations", "the output of the submodule named by the class's module axis", in_step=True),
    HookPoint("on_gradients", "grads (parameter name -> gradient) before the optimizer", in_step=True),
    HookPoint("on_hyperparameters", "h (name -> float64 scalar) for this step", in_step=True),
    HookPoint("on_optimizer_state",
              "the optimizer's state before its update (a NamedTuple: momentum_buffer, exp_avg, exp_avg_sq, step...)",
              in_step=True),
    HookPoint("on_params", "params after the optimizer's update", in_step=True),
)
POINT = {p.method: p for p in POINTS}
METHODS = tuple(p.method for p in POINTS)
STEP_METHODS = tuple(p.method for p in POINTS if p.in_step)


def implemented(cls: type) -> tuple[str, ...]:
    """The hook points a class implements."""
    return tuple(m for m in METHODS if callable(getattr(cls, m, None)))
