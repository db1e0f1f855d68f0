"""Data augmentation in the training step: random crops, translations, flips and noise, per learner and keyed.

A dataset's own random transform (torchvision's ``RandomCrop``) would be drawn once, when the data is read, and
is refused there. ``Augment`` draws afresh at every step, on the device, inside the vmapped step, from the
learner's ``Augment`` key and the step: each example of the batch gets its own draw, the same alone or in any
batch, and the settings are part of the learner's id. Evaluation sees the data as it is.

Each transform is an axis whose default changes nothing; they run in the order of ``TRANSFORMS``:

- ``crop=p`` (pixels): pad ``p`` zeros on each side and crop back to the size at a uniform offset, as
  ``torchvision.transforms.RandomCrop(size, padding=p)``;
- ``translate=f`` (a fraction of the size): shift by a uniform amount in ``[-f W, f W]`` and ``[-f H, f H]``,
  rounded to whole pixels, zeros shifted in, as ``RandomAffine(degrees=0, translate=(f, f))``;
- ``flip=True``: mirror left-right with probability 0.5, as ``RandomHorizontalFlip()``;
- ``noise=s``: add Gaussian noise of standard deviation ``s`` to every input value.

Images are the last two dimensions (H, W) of each example ((C, H, W) or (H, W)); ``noise`` takes any shape.
Adding a transform is one function here, registered with ``@transform(default, check)``.

>>> vs = Augment.make_variations(crop=(0, 4), flip=True)
>>> [v.values["crop"] for v in vs], vs[1].values["flip"], vs[0].is_default()
([0, 4], True, False)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .base import Intervention
from .weights import seed_value


class Draws(NamedTuple):
    """One transform's random numbers for one learner at this step: its own stream (the transform's name and
    the step) of the learner's ``Augment`` key, so each transform draws independently of the others."""

    ctx: Any  # the hook's StepContext
    stream: str

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """float32 numbers in [0, 1) (multiples of 2**-24)."""
        return self.ctx.uniform(shape, torch.float32, self.stream, self.ctx.step)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.ctx.normal(shape, dtype, self.stream, self.ctx.step)


@dataclass(frozen=True)
class Transform:
    """One transform of ``Augment``: the axis ``name`` with a ``default`` that changes nothing, its ``check`` of
    a value, and ``apply(x, amount, draws)`` on one learner's batch x (B, ...), ``amount`` its tensor."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    apply: Callable[[torch.Tensor, torch.Tensor, Draws], torch.Tensor]
    images: bool  # acts on the last two dimensions (H, W) of each example


TRANSFORMS: dict[str, Transform] = {}


def transform(default: Any, check: Callable[[Any], Any], images: bool = True) -> Callable:
    """Register ``fn(x, amount, draws) -> x`` as a transform named after the function (an axis of ``Augment``)."""
    def register(fn: Callable) -> Callable:
        TRANSFORMS[fn.__name__] = Transform(fn.__name__, default, check, fn, images)
        return fn

    return register


def _pixels(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"Augment crop= is the padding in pixels, an integer >= 0 (crop=4 as RandomCrop(32, "
                         f"padding=4)); got {value!r}.")
    return int(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"Augment translate= is the largest shift as a fraction of the image size, in [0, 1] "
                         f"(translate=0.1 as RandomAffine(degrees=0, translate=(0.1, 0.1))); got {value!r}.")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Augment flip= is True (mirror left-right with probability 0.5) or False; got {value!r}.")
    return value


def _std(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Augment noise= is a standard deviation, a finite number >= 0; got {value!r}.")
    return float(value)


def shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``out[b, ..., r, c] = x[b, ..., r + dy[b], c + dx[b]]``, zero where that falls outside: a gather along H,
    then along W, and a mask (no Python branch on the offsets).

    >>> x = torch.arange(9.0).reshape(1, 3, 3)
    >>> shift(x, torch.tensor([1]), torch.tensor([-1]))[0].tolist()
    [[0.0, 3.0, 4.0], [0.0, 6.0, 7.0], [0.0, 0.0, 0.0]]
    """
    b, (h, w) = x.shape[0], x.shape[-2:]
    lead = (1,) * (x.ndim - 3)  # the dimensions between the batch and (H, W): channels
    rows = torch.arange(h, device=x.device) + dy[:, None]  # (B, H)
    cols = torch.arange(w, device=x.device) + dx[:, None]  # (B, W)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
    rows = rows.clamp(0, h - 1).reshape(b, *lead, h, 1).expand(x.shape)  # (B, ..., H, W)
    cols = cols.clamp(0, w - 1).reshape(b, *lead, 1, w).expand(x.shape)
    out = torch.gather(torch.gather(x, -2, rows), -1, cols)
    return torch.where(inside.reshape(b, *lead, h, w), out, torch.zeros((), dtype=x.dtype, device=x.device))


@transform(default=0, check=_pixels)
def crop(x: torch.Tensor, p: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Pad ``p`` zeros on each side and crop back at offset (i, j) of the padded image, each uniform in
    0..2p: ``(i, j) = min(floor(u * (2p + 1)), 2p)`` for u = ``draws.uniform((B, 2))``."""
    u = draws.uniform((x.shape[0], 2))  # (B, 2): rows, columns
    p = p.to(torch.int64)
    offset = torch.minimum(torch.floor(u * (2 * p + 1)).to(torch.int64), 2 * p) - p  # (B, 2) in [-p, p]
    return shift(x, offset[:, 0], offset[:, 1])


@transform(default=0.0, check=_fraction)
def translate(x: torch.Tensor, f: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Shift right by ``tx = round((2u - 1) f W)`` and down by ``ty = round((2v - 1) f H)`` pixels (half to even),
    for (u, v) = ``draws.uniform((B, 2))``, as torchvision's ``RandomAffine`` draws them."""
    u = draws.uniform((x.shape[0], 2))  # (B, 2): horizontal, vertical
    f = f.to(torch.float32)
    tx = torch.round((2 * u[:, 0] - 1) * f * x.shape[-1]).to(torch.int64)  # (B,)
    ty = torch.round((2 * u[:, 1] - 1) * f * x.shape[-2]).to(torch.int64)  # (B,)
    return shift(x, -ty, -tx)


@transform(default=False, check=_flag)
def flip(x: torch.Tensor, on: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Mirror left-right the examples whose ``draws.uniform((B,))`` is below 0.5."""
    mirrored = (draws.uniform((x.shape[0],)) < 0.5) & on  # (B,)
    return torch.where(mirrored.reshape((-1,) + (1,) * (x.ndim - 1)), x.flip(-1), x)


@transform(default=0.0, check=_std, images=False)
def noise(x: torch.Tensor, std: torch.Tensor, draws: Draws) -> torch.Tensor:
    """``x + std * z``, z standard Gaussian of x's shape (``draws.normal``)."""
    return torch.where(std > 0, x + std.to(x.dtype) * draws.normal(x.shape, x.dtype), x)


class Augment(Intervention):
    """Augment each training batch in the step: ``crop`` (padding in pixels), ``translate`` (a fraction of the
    size), ``flip`` (left-right, p = 0.5), ``noise`` (a standard deviation), each example drawn on its own from
    the learner's key (experiment seed, ``seed``) and the step. Evaluation is not augmented. ``when=(k, None)``
augments from update k on (a draw depends on the key and the step only, so the first k updates are the
unaugmented learner's, bitwise, and it forks from it there).

    >>> Augment(crop=4, flip=True).values
    {'crop': 4, 'translate': 0.0, 'flip': True, 'noise': 0.0, 'seed': 0, 'when': None}
    """

    axes = {**{t.name: t.default for t in TRANSFORMS.values()}, "seed": 0}
    prefix = "augment"
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        if axis == "seed":
            return seed_value(axis, value, "Augment")
        return TRANSFORMS[axis].check(value)

    def is_default(self) -> bool:
        return all(self.values[t.name] == t.default for t in TRANSFORMS.values())

    def first_active_step(self) -> int:
        return self.window_start()  # its hook acts only in its windows (when=(k, None): from update k on)

    def check(self, setup: Any) -> None:
        shape = tuple(setup.data.x.shape[1:])
        images = [t.name for t in TRANSFORMS.values() if t.images and self.values[t.name] != t.default]
        if images and len(shape) < 2:
            raise ValueError(f"Augment {images[0]}= acts on images, the last two dimensions (H, W) of each example, "
                             f"but the dataset's examples have shape {shape}; use noise= alone, or image data.")

    def numbers(self, setup: Any) -> dict[str, Any]:
        return {t.name: self.values[t.name] for t in TRANSFORMS.values()}

    def on_batch(self, batch: tuple[torch.Tensor, torch.Tensor], n: Any, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch  # x (B, ...): this learner's batch
        for t in TRANSFORMS.values():
            if t.images and x.ndim < 3:
                continue  # examples without (H, W): refused by check() unless this transform is off
            x = t.apply(x, n[t.name], Draws(ctx, t.name))
        return x, y
