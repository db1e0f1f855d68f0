"""Initial weights and weight perturbations.

``InitWeights`` seeds the library's "init" stream: a learner's initial weights are the template's own
initialization (each module's ``reset_parameters()``) drawn from its key. ``PerturbWeights`` moves the
weights by ``epsilon`` in a random direction, at init (``at=0``) or after any number of updates.

>>> PerturbWeights.make_variations(epsilon=(0.001, 0.01), seed=range(3))[4].values
{'epsilon': 0.01, 'seed': 1, 'mode': 'relative', 'at': 0, 'layers': None}
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from typing import Any

import torch

from .base import Intervention


def seed_value(axis: str, value: Any, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{owner} {axis} must be a non-negative integer; got {value!r}.")
    return int(value)


def layer_patterns(value: Any, owner: str) -> tuple[str, ...] | None:
    """``None`` (every parameter), a glob such as ``"fc*"`` or a tuple of globs and names."""
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (tuple, list)) else None
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{owner} layers= takes parameter names or globs such as 'fc*' or ('fc1.weight', 'conv*'); "
                         f"got {value!r}.")
    return patterns


def layer_mask(patterns: tuple[str, ...] | None, names: list[str], owner: str) -> dict[str, bool]:
    """Which parameters ``patterns`` select (a pattern matches a parameter's name or its module's)."""
    if patterns is None:
        return dict.fromkeys(names, True)
    mask = {n: any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n.rsplit(".", 1)[0], p) for p in patterns) for n in names}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n.rsplit(".", 1)[0], p)
                                                 for n in names)]
    if unmatched:
        raise ValueError(f"{owner} layers={unmatched[0]!r} matches no parameter; the parameters are: {', '.join(names)}.")
    return mask


class InitWeights(Intervention):
    """Draw the initial weights with another seed (the template's own initialization).

    >>> InitWeights.make_variations(seed=range(10))[3].values
    {'seed': 3}
    """

    axes = {"seed": 0}
    prefix = "init"
    streams = {"init": "seed"}
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        return seed_value(axis, value, "InitWeights")


def smallest_relative_epsilon(dtype: torch.dtype) -> float:
    """The smallest relative perturbation that ``dtype`` carries: 16 x its machine epsilon (1.9e-6 in float32,
    3.6e-15 in float64). Measured on MLP and LeNet-5 weights in float32, a relative move of 1e-6 lands 0.6-1%
    off its size, 1e-7 5-13% off, 1e-9 nowhere (no element moves); at 16 x epsilon it is within about 0.3%."""
    return 16 * torch.finfo(dtype).eps


class PerturbWeights(Intervention):
    """Move the weights by ``epsilon`` in a random direction drawn from ``seed``.

    ``mode="relative"`` (default) moves each parameter tensor w along a Gaussian direction d to
    ``||w' - w|| / ||w|| = epsilon``; ``mode="absolute"`` adds Gaussian noise of standard deviation
    ``epsilon`` to every weight. ``at`` is the number of updates after which it acts (0: the initial
    weights). ``layers`` picks parameters by name or glob (``"fc*"``, ``("conv1.weight",)``); default all.
    One seed gives the same direction for every epsilon and every ``at``.
    """

    axes = {"epsilon": 0.0, "seed": 0, "mode": "relative", "at": 0, "layers": None}
    prefix = "perturb"
    tuple_axes = frozenset({"layers"})
    per_learner_axes = frozenset({"mode", "layers"})  # numbers() turns them into tensors
    windowed = False
    order = 10
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        if axis == "epsilon":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"PerturbWeights epsilon must be a finite number >= 0; got {value!r}.")
            return float(value)
        if axis == "mode":
            if value not in ("relative", "absolute"):
                raise ValueError(f"PerturbWeights mode must be 'relative' or 'absolute'; got {value!r}.")
            return value
        if axis == "layers":
            return layer_patterns(value, "PerturbWeights")
        return seed_value(axis, value, "PerturbWeights")

    def is_default(self) -> bool:
        return self.values["epsilon"] == 0  # a perturbation of size 0 is none, whatever its seed, mode or step

    def active_in_step(self) -> bool:
        return not self.is_default() and self.values["at"] > 0

    def beyond_run(self, total_steps: int) -> str | None:
        at = self.values["at"]
        return None if self.is_default() or at <= total_steps else f"at={at} acts after {at} updates"

    def first_active_step(self) -> int:
        """``at=k > 0`` moves the weights at the end of update k (``ctx.step == k - 1``): the states after 0..k-1
        updates are the unperturbed ones."""
        return max(0, self.values["at"] - 1)

    def check(self, setup: Any) -> None:
        if self.is_default():
            return
        layer_mask(self.values["layers"], setup.param_names, "PerturbWeights")
        epsilon, dtype = self.values["epsilon"], setup.dtype
        if self.values["mode"] == "relative" and epsilon < smallest_relative_epsilon(dtype):
            raise ValueError(
                f"PerturbWeights epsilon={epsilon:g} is below what {dtype} can carry: a relative move smaller than "
                f"{smallest_relative_epsilon(dtype):.1e} (16 x the dtype's epsilon) is lost in rounding (at 1e-9 in "
                "float32 a tensor moves by a fifth of that, some not at all). Train in float64 "
                "(Experiment(..., dtype=torch.float64)) or use a larger epsilon."
            )
        if self.values["mode"] == "absolute":
            scale = setup.weight_scale()
            if epsilon < smallest_relative_epsilon(dtype) * scale:
                raise ValueError(
                    f"PerturbWeights epsilon={epsilon:g} (absolute) is below what {dtype} can carry on weights of typical "
                    f"size {scale:.2g}: noise smaller than {smallest_relative_epsilon(dtype) * scale:.1e} is lost in "
                    "rounding. Train in float64 (Experiment(..., dtype=torch.float64)) or use a larger epsilon."
                )

    def numbers(self, setup: Any) -> dict[str, Any]:
        return {
            "epsilon": self.values["epsilon"],
            "relative": self.values["mode"] == "relative",
            "at": self.values["at"],
            "layers": layer_mask(self.values["layers"], setup.param_names, "PerturbWeights"),
        }

    def on_init(self, state: Any, n: Any, ctx: Any) -> Any:
        moved = perturb_weights(state.params, directions(state.params, ctx), n.epsilon, n.relative, n.layers)
        at_init = n.at == 0
        return state._replace(params={k: torch.where(at_init, moved[k], w) for k, w in state.params.items()})

    def on_params(self, params: dict, n: Any, ctx: Any) -> dict:
        moved = perturb_weights(params, directions(params, ctx), n.epsilon, n.relative, n.layers)
        now = ctx.step + 1 == n.at  # after the update that makes `at` updates done
        return {k: torch.where(now, moved[k], w) for k, w in params.items()}


def directions(params: dict[str, torch.Tensor], ctx: Any) -> dict[str, torch.Tensor]:
    """A standard Gaussian direction per parameter tensor, from the learner's key and the tensor's name."""
    return {name: ctx.normal(w.shape, w.dtype, name) for name, w in params.items()}


def perturb_weights(
    params: dict[str, torch.Tensor],
    directions: dict[str, torch.Tensor],
    epsilon: torch.Tensor,
    relative: torch.Tensor,
    layers: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Pure: move each tensor w along its direction d by epsilon, relatively (``||w' - w|| = epsilon ||w||``)
    where ``relative`` is true, else by ``epsilon * d``; only the tensors ``layers`` selects.
    ``epsilon`` (float), ``relative`` and ``layers[name]`` (bool) are scalars, per learner under vmap."""
    out = {}
    for name, w in params.items():
        d = directions[name]
        scale = torch.where(relative, epsilon * w.norm() / d.norm(), epsilon).to(w.dtype)
        moved = w + scale * d
        out[name] = moved if layers is None else torch.where(layers[name], moved, w)
    return out
