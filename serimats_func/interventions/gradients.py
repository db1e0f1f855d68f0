"""Gradient perturbations: noise and scaling before the optimizer, in step windows.

>>> PerturbGradients.make_variations(noise=(0.0, 0.01), when=(0, 50))[1].values
{'noise': 0.01, 'scale': 1.0, 'seed': 0, 'layers': None, 'when': ((0, 50),)}
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .base import Intervention
from .weights import layer_mask, layer_patterns, seed_value


class PerturbGradients(Intervention):
    """Before each optimizer update in the windows of ``when``: ``g' = scale * g + noise * z``, with z
    standard Gaussian noise drawn afresh each step from ``seed`` (the same for every learner with that
    seed), on every parameter or those ``layers`` names (globs such as ``"fc*"``)."""

    axes = {"noise": 0.0, "scale": 1.0, "seed": 0, "layers": None}
    prefix = "gradient"
    tuple_axes = frozenset({"layers"})
    per_learner_axes = frozenset({"layers"})  # numbers() turns them into a mask
    order = 0
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        if axis == "seed":
            return seed_value(axis, value, "PerturbGradients")
        if axis == "layers":
            return layer_patterns(value, "PerturbGradients")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"PerturbGradients {axis} must be a finite number; got {value!r}.")
        if axis == "noise" and value < 0:
            raise ValueError(f"PerturbGradients noise is a standard deviation, >= 0; got {value!r}.")
        return float(value)

    def is_default(self) -> bool:
        return self.values["noise"] == 0 and self.values["scale"] == 1

    def first_active_step(self) -> int:
        return self.window_start()  # its hooks act only in its windows

    def check(self, setup: Any) -> None:
        layer_mask(self.values["layers"], setup.trainable_names, "PerturbGradients")

    def numbers(self, setup: Any) -> dict[str, Any]:
        return {"noise": self.values["noise"], "scale": self.values["scale"],
                "layers": layer_mask(self.values["layers"], setup.trainable_names, "PerturbGradients")}

    def on_gradients(self, grads: dict, n: Any, ctx: Any) -> dict:
        out = {}
        for name, g in grads.items():
            noisy = g * n.scale.to(g.dtype) + n.noise.to(g.dtype) * ctx.normal(g.shape, g.dtype, name, ctx.step)
            out[name] = torch.where(n.layers[name], noisy, g)
        return out


class ClipGradients(Intervention):
    """Clip the gradients' total norm at ``max_norm`` before the optimizer, as ``torch.nn.utils.clip_grad_norm_``
    right before ``optimizer.step()``: the ``norm_type`` norm of every parameter's gradient norm (one vector of
    all trainable parameters), and every gradient times ``min(max_norm / (total_norm + 1e-6), 1)``. ``max_norm``
    is a per-learner number (``inf``, the default, clips nothing); ``norm_type`` (2.0; ``inf`` for the largest
    entry) is structural. It runs after the other gradient hooks (``order``), as a clip just before the update.

    >>> ClipGradients.make_variations(max_norm=(1.0, 0.1), when=(0, 100))[1].values
    {'max_norm': 0.1, 'norm_type': 2.0, 'when': ((0, 100),)}
    """

    axes = {"max_norm": math.inf, "norm_type": 2.0}
    prefix = "clip"
    structural = frozenset({"norm_type"})
    order = 10
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"ClipGradients {axis} must be a number; got {value!r}.")
        if axis == "max_norm" and value < 0:
            raise ValueError(f"ClipGradients max_norm must be >= 0 (inf clips nothing); got {value!r}.")
        if axis == "norm_type" and value <= 0:
            raise ValueError(f"ClipGradients norm_type must be > 0 (2.0, 1.0, inf...); got {value!r}.")
        return float(value)

    def is_default(self) -> bool:
        return self.values["max_norm"] == math.inf

    def first_active_step(self) -> int:
        return self.window_start()  # its hook acts only in its windows

    def on_gradients(self, grads: dict, n: Any, ctx: Any) -> dict:
        norm_type = self.values["norm_type"]  # structural: the same for every learner of the step
        norms = [torch.linalg.vector_norm(g, norm_type) for g in grads.values()]
        if not norms:
            return grads
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        coefficient = torch.clamp(torch.reciprocal(total + 1e-6) * n.max_norm.to(total.dtype), max=1.0)
        return {name: g * coefficient.to(g.dtype) for name, g in grads.items()}
