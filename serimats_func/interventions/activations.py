"""Activation perturbations: on the output of a named submodule, in step windows.

>>> PerturbActivations.make_variations(module="fc1", zero=((), (3, 7)))[1].values["zero"]
(3, 7)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .base import Intervention
from .weights import seed_value


class PerturbActivations(Intervention):
    """On the output of the submodule ``module`` (a name from ``model.named_modules()``, e.g. ``"fc1"`` or
    ``"net.2"``), during training steps in the windows of ``when``: ``a' = scale * a * keep + noise * z``,
    where ``keep`` zeroes the units (features or channels: dimension 1 of the output) listed in ``zero``
    and z is Gaussian noise drawn afresh each step from ``seed``. Evaluation sees the unperturbed model."""

    axes = {"module": None, "noise": 0.0, "scale": 1.0, "zero": (), "seed": 0}
    prefix = "activation"
    structural = frozenset({"module"})
    tuple_axes = frozenset({"zero"})
    per_learner_axes = frozenset({"zero"})  # numbers() turns them into a mask
    order = 0
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        name = "PerturbActivations"
        if axis == "module":
            if not isinstance(value, str):
                raise ValueError(f"{name} module= takes the name of a submodule (as in model.named_modules()); "
                                 f"got {value!r}.")
            return value
        if axis == "seed":
            return seed_value(axis, value, name)
        if axis == "zero":
            units = (value,) if isinstance(value, numbers.Integral) else tuple(value)
            if not all(isinstance(u, numbers.Integral) and not isinstance(u, bool) and u >= 0 for u in units):
                raise ValueError(f"{name} zero= takes unit indices (integers >= 0); got {value!r}.")
            return tuple(sorted(set(int(u) for u in units)))
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} {axis} must be a finite number; got {value!r}.")
        if axis == "noise" and value < 0:
            raise ValueError(f"{name} noise is a standard deviation, >= 0; got {value!r}.")
        return float(value)

    def is_default(self) -> bool:
        return self.values["noise"] == 0 and self.values["scale"] == 1 and not self.values["zero"]

    def first_active_step(self) -> int:
        return self.window_start()  # its hooks act only in its windows

    def check(self, setup: Any) -> None:
        if self.values["module"] is None:
            raise ValueError("PerturbActivations needs module=, the name of the submodule whose output it changes.")
        self.units(setup)

    def units(self, setup: Any) -> int:
        """The size of dimension 1 (features or channels) of the module's output."""
        module = self.values["module"]
        shapes = setup.activation_shapes(module)  # one per call of the module in a forward pass
        sizes = {s[1] if len(s) > 1 else None for s in shapes}
        zero = self.values["zero"]
        if zero and (len(sizes) != 1 or None in sizes):
            raise ValueError(f"PerturbActivations zero= needs one output shape with a unit dimension; {module!r} gives "
                             f"{', '.join(str(tuple(s)) for s in shapes)}.")
        units = next(iter(sizes)) or 1
        if zero and max(zero) >= units:
            raise ValueError(f"PerturbActivations zero={zero}: {module!r} has {units} units (dimension 1 of its output).")
        return units

    def numbers(self, setup: Any) -> dict[str, Any]:
        keep = [0.0 if u in self.values["zero"] else 1.0 for u in range(self.units(setup))]
        return {"noise": self.values["noise"], "scale": self.values["scale"], "keep": tuple(keep)}

    def on_activations(self, output: torch.Tensor, n: Any, ctx: Any) -> torch.Tensor:
        # output (B, units, ...): keep (units,) broadcast over the batch and any spatial dims
        keep = n.keep.to(output.dtype).reshape((-1,) + (1,) * (output.ndim - 2)) if output.ndim > 1 else n.keep[0]
        noise = ctx.normal(output.shape, output.dtype, ctx.step, ctx.call)
        return output * (n.scale.to(output.dtype) * keep) + n.noise.to(output.dtype) * noise
