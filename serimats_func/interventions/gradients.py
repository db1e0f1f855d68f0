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
