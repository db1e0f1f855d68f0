"""``interpolate``: two stored learners and the straight path between their weights, evaluated on a data set.

>>> import tempfile
>>> from serimats_func import Experiment, datasets, interpolate
>>> from serimats_func.interventions import DataOrder
>>> from serimats_func.models import MLP
>>> train, test = datasets.mnist1d()
>>> exp = Experiment(MLP((16,)), train, [DataOrder.make_variations(seed=(0, 1))], test_dataset=test, steps=20,
...                  store=tempfile.mkdtemp() + "/i.zarr", progress=False)
>>> ds = exp.run()
>>> a, b = (ds.learner.sel(seed=s) for s in (0, 1))
>>> path = interpolate(exp, a, b, [0, 0.5, 1], test)
>>> path.error.dims, path.alpha.values.tolist()
(('alpha',), [0.0, 0.5, 1.0])
>>> bool(path.acc[0] == ds.test_acc.sel(seed=0).isel(step=-1))  # the path starts at a
True
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from .core.data import as_tensors
from .core.interpolation import along_path
from .core.metrics import BARRIER_ALPHAS
from .core.state import ModelState
from .run.checkpoints import module_of, stored_state
from .store.zarr_store import FlatState, Store

Learner = str | Mapping[str, Any] | xr.DataArray  # an id, coordinates ({"seed": 1}) or a result's learner coordinate


def interpolate(store: Any, a: Learner, b: Learner, alphas: Sequence[float] | torch.Tensor = BARRIER_ALPHAS,
                data: object = None, step: int | None = None, *, model: nn.Module | None = None,
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, batch_size: int | None = None,
                device: str | torch.device = "cpu") -> xr.Dataset:
    """The loss, accuracy and error (1 - accuracy) on ``data`` of the points ``(1 - alpha) * a + alpha * b`` of
    the straight path between two stored learners' weights at their kept ``step`` (default: each one's latest,
    its final state), one per ``alphas`` (any values: below 0 or above 1 extrapolate): a Dataset with variables
    ``loss``, ``acc``, ``error`` over an ``alpha`` dimension (attrs: the two ids and the steps).

    ``store``: an ``Experiment`` (its store, model, loss and evaluation batch size are the defaults) or a store
    (a path or ``open_store``'s) with ``model=`` (the experiment's model). ``a``, ``b``: a learner's id, its
    coordinates (``{"epsilon": 0.01, "seed": 3}``) or one value of a result's ``learner`` coordinate
    (``ds.learner.sel(seed=3)``). ``data``: a torch Dataset or ``(x, y)`` tensors, as ``Experiment`` takes them.
    Buffers (BatchNorm running statistics) are interpolated as the parameters are; integer buffers are ``a``'s
    (``core.interpolation``). Evaluated in eval mode, in the stored dtype, on ``device``."""
    from .experiments import Experiment

    if isinstance(store, Experiment):
        model = store.template if model is None else model
        loss = store.loss if loss is None else loss
        batch_size = store.eval_batch_size if batch_size is None else batch_size
        store = store.store
    elif isinstance(store, (str, os.PathLike)):
        store = Store(store)
    elif not isinstance(store, Store):
        raise ValueError(f"interpolate takes an Experiment or a store (a path); got {type(store).__name__}.")
    if model is None:
        raise ValueError("interpolate needs the experiment's model to evaluate the learners: pass model=<the "
                         "experiment's template>, or pass the Experiment itself instead of its store.")
    if data is None:
        raise ValueError("interpolate needs data to evaluate the path on: a torch Dataset or (x, y) tensors, e.g. "
                         "the experiment's test set.")
    alphas = _alphas(alphas)
    x, y = as_tensors(data, "data")
    store.check()
    if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0):
        raise ValueError(f"step takes a kept step (an integer >= 0) or None (each learner's latest); got {step!r}.")
    (id_a, _, flat_a, step_a), (id_b, _, flat_b, step_b) = (
        store.retrying(lambda end=end: stored_state(store, step, _coords(end))) for end in (a, b))
    _same_architecture(flat_a, flat_b, _name(a), _name(b))
    module_a, module_b = module_of(model, flat_a), module_of(model, flat_b)
    dtype = next(module_a.parameters()).dtype
    device = torch.device(device)
    ends = [_stacked(m, device) for m in (module_a, module_b)]
    template = module_a.to(device)
    path = along_path(template, loss or nn.functional.cross_entropy, *ends, alphas.to(device),
                      x.to(device=device, dtype=dtype), y.to(device), batch_size=batch_size or 256)
    loss_values, error = path.loss[0].cpu().numpy(), path.error[0].cpu().numpy()
    return xr.Dataset({"loss": ("alpha", loss_values), "acc": ("alpha", 1 - error), "error": ("alpha", error)},
                      coords={"alpha": alphas.numpy()},
                      attrs={"a": id_a, "b": id_b, "step_a": step_a, "step_b": step_b})


def _alphas(alphas: Any) -> torch.Tensor:
    values = torch.as_tensor(np.asarray(alphas, dtype=np.float64))
    if values.ndim != 1 or len(values) == 0 or not torch.isfinite(values).all():
        raise ValueError(f"alphas takes a list of finite numbers, the points of the path (0: a, 1: b), e.g. "
                         f"[0, 0.25, 0.5, 0.75, 1]; got {alphas!r}.")
    return values


def _coords(learner: Learner) -> dict[str, Any]:
    """What ``select_learner`` takes for one end of the path."""
    if isinstance(learner, xr.DataArray):
        if learner.size != 1:
            raise ValueError(f"A learner of a result is one value of its learner coordinate (ds.learner.sel(seed=1)); "
                             f"got {learner.size} values over {', '.join(map(str, learner.dims))}: select one.")
        learner = str(learner.values.item())
    if isinstance(learner, str):
        return {"learner": learner}
    if isinstance(learner, Mapping):
        return dict(learner)
    raise ValueError(f"A learner is its id (a string), its coordinates (a dict, e.g. {{'seed': 1}}) or a result's "
                     f"learner coordinate (ds.learner.sel(seed=1)); got {learner!r}.")


def _name(learner: Learner) -> str:
    coords = _coords(learner)
    return repr(coords["learner"]) if list(coords) == ["learner"] else repr(coords)


def _same_architecture(a: FlatState, b: FlatState, name_a: str, name_b: str) -> None:
    """Refuse two learners whose parameters or buffers differ in name, shape or dtype."""
    def layout(flat: FlatState) -> dict[str, tuple]:
        return {p: (tuple(v.shape), str(d)) for p, (v, d) in flat.items() if p.startswith(("params/", "buffers/"))}

    la, lb = layout(a), layout(b)
    if la != lb:
        differ = sorted(p for p in set(la) | set(lb) if la.get(p) != lb.get(p))
        def show(entry: tuple | None) -> str:
            return "absent" if entry is None else f"{entry[0]} {entry[1]}"

        shown = "; ".join(f"{p}: {show(la.get(p))} against {show(lb.get(p))}" for p in differ[:3])
        raise ValueError(f"Learners {name_a} and {name_b} have different architectures ({shown}): a straight path "
                         "between two learners needs the same parameters and buffers, of the same shapes and dtype.")


def _stacked(module: nn.Module, device: torch.device) -> ModelState:
    """One learner's tensors with a learner axis of 1."""
    return ModelState({k: v.detach().to(device)[None] for k, v in module.named_parameters()},
                      {k: v.detach().to(device)[None] for k, v in module.named_buffers()})

