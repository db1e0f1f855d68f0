"""A learner's setup: what it trains with before any intervention touches its state.

The model template, the data, the batch size, the optimizer (class and hyperparameters), the loss and
the dtype. Interventions with ``on_setup`` change it (``Model``, ``Dataset``, ``BatchSize``,
``Optimizer``); learners whose setups share a structure train in one vmapped step. Preparing a
template (lazy layers, dropout, checks) is done once per (model, data) and cached by the context.

>>> import torch
>>> from serimats_func.models import MLP
>>> from serimats_func.interventions import Optimizer
>>> context = SetupContext(loss=torch.nn.functional.cross_entropy, dtype=torch.float32)
>>> data = context.data_source(None, (torch.randn(8, 40), torch.arange(8) % 10))
>>> setup = Setup(model=MLP((16,)), data=data, batch_size=4, default_optimizer=Optimizer(torch.optim.SGD, lr=0.1),
...               context=context)
>>> setup.param_names
['1.weight', '1.bias', '3.weight', '3.bias']
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import optimizers as twins
from ..core.data import as_tensors, fingerprint
from ..core.learners import PROBE_KEY, behaviour_fingerprint, class_fingerprint, prepare_template, reset
from ..optimizers import groups
from .identity import describe_callable, describe_module, runs_user_code

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DataSource:
    """Train and test tensors (on the CPU, copied: editing the user's tensors later changes nothing)."""

    label: str | None
    x: torch.Tensor  # (n, ...)
    y: torch.Tensor  # (n,)
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    fingerprint: str = ""
    test_fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        top = int(self.y.max()) if self.y_test is None else max(int(self.y.max()), int(self.y_test.max()))
        return top + 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.y, self.x_test, self.y_test) if t is not None)


@dataclass
class TemplateInfo:
    """A prepared template and what the library needs to know about it."""

    module: nn.Module
    param_names: list[str]
    trainable_names: list[str]
    example_x: torch.Tensor
    _activation_shapes: dict[str, list[tuple]] | None = None
    _digest: str | None = None
    _weight_scale: float | None = None


class SetupContext:
    """What every setup of one experiment shares: the loss, the dtype, and caches of prepared
    templates, data sources and descriptions."""

    def __init__(self, loss: LossFn, dtype: torch.dtype, default_test: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.loss, self.dtype = loss, dtype
        self.default_test = default_test
        self._templates: dict[tuple, TemplateInfo] = {}
        self._data: dict[str | None, DataSource] = {}
        self._loss_description: Any = None

    def data_source(self, label: str | None, dataset: Any) -> DataSource:
        """Tensors of a dataset, or of a (train, test) pair; cached by label."""
        if label in self._data:
            return self._data[label]
        test = None
        if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and not all(
                isinstance(t, torch.Tensor) for t in dataset) and not _is_array_pair(dataset):
            dataset, test = dataset
        name = "dataset" if label is None else f"dataset {label!r}"
        x, y = as_tensors(dataset, name)
        x = x.to(self.dtype).clone()
        y = y.clone()
        if test is not None:
            x_test, y_test = as_tensors(test, f"test set of {name}")
            x_test, y_test = x_test.to(self.dtype).clone(), y_test.clone()
        elif self.default_test is not None:
            x_test, y_test = self.default_test
        else:
            x_test = y_test = None
        if x_test is not None and x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"test_dataset inputs have shape {tuple(x_test.shape[1:])} but {name} inputs "
                             f"{tuple(x.shape[1:])}.")
        source = DataSource(label, x, y, x_test, y_test, fingerprint(x, y),
                            None if x_test is None else fingerprint(x_test, y_test))
        self._data[label] = source
        return source

    def template(self, model: nn.Module, data: DataSource) -> TemplateInfo:
        """The prepared template of ``model`` for ``data``'s examples (cached)."""
        key = (id(model), tuple(data.x.shape[1:]), data.num_classes)
        if key not in self._templates:
            module = prepare_template(model, data.x[:2], num_classes=data.num_classes)
            params = dict(module.named_parameters())
            info = TemplateInfo(module, list(params), [n for n, p in params.items() if p.requires_grad], data.x[:2])
            self._templates[key] = info
            info._keep_alive = model  # the key holds id(model): keep the object alive
        return self._templates[key]

    def forget_descriptions(self) -> None:
        """Describe the loss and the templates again when next asked (what they read may have changed)."""
        self._loss_description = None
        for info in self._templates.values():
            info._digest = None

    def loss_description(self) -> Any:
        if self._loss_description is None:
            self._loss_description = describe_callable(self.loss)
        return self._loss_description


@dataclass
class Setup:
    """One learner's setup. ``Setup.digest()`` names what its learners share with their group."""

    model: nn.Module
    data: DataSource
    batch_size: int
    default_optimizer: Any  # interventions.Optimizer: the experiment's optimizer=
    context: SetupContext
    model_label: Any = None
    optimizer_class: type | None = None
    optimizer_values: dict[str, Any] = field(default_factory=dict)
    optimizer_groups: tuple[groups.ParamGroup, ...] = ()  # parameter groups, in order (first matching glob wins)
    varied_hyperparameters: set[str] = field(default_factory=set)
    scheduled_hyperparameters: frozenset[str] = frozenset()  # those an LRSchedule sets at each step ("lr", ...)

    def __post_init__(self) -> None:
        if self.optimizer_class is None:
            self.optimizer_class, self.optimizer_values = self.default_optimizer.resolve_with(self.default_optimizer)
            self.optimizer_groups = self.default_optimizer.groups_with(self.default_optimizer)

    def copy(self) -> Setup:
        return dataclasses.replace(self, optimizer_values=dict(self.optimizer_values),
                                   varied_hyperparameters=set(self.varied_hyperparameters))

    @property
    def dtype(self) -> torch.dtype:
        return self.context.dtype

    @property
    def loss(self) -> LossFn:
        return self.context.loss

    @property
    def template_info(self) -> TemplateInfo:
        return self.context.template(self.model, self.data)

    @property
    def template(self) -> nn.Module:
        return self.template_info.module

    @property
    def param_names(self) -> list[str]:
        return self.template_info.param_names

    @property
    def trainable_names(self) -> list[str]:
        return self.template_info.trainable_names

    def activation_shapes(self, module_name: str) -> list[tuple]:
        """Shapes of ``module_name``'s output, one per call in a forward pass of two examples."""
        info = self.template_info
        if info._activation_shapes is None:
            info._activation_shapes = _activation_shapes(info.module, info.example_x)
        if module_name not in info._activation_shapes:
            names = [n for n, _ in info.module.named_modules() if n]
            raise ValueError(f"The model has no submodule {module_name!r} that runs in its forward pass; its submodules: "
                             f"{', '.join(names)}.")
        return info._activation_shapes[module_name]

    def weight_scale(self) -> float:
        """Root mean square of the template's initial weights (a typical weight size)."""
        info = self.template_info
        if info._weight_scale is None:
            flat = torch.cat([p.detach().double().flatten() for p in info.module.parameters()])
            info._weight_scale = float(flat.pow(2).mean().sqrt())
        return info._weight_scale

    def optimizer_structure(self) -> tuple:
        main = twins.structure_key(self.optimizer_class, self.optimizer_values, frozenset(self.varied_hyperparameters))
        return groups.structure(main, self.optimizer_groups, self.trainable_names, frozenset(self.varied_hyperparameters))

    def optimizer_identity(self) -> dict[str, Any]:
        main = twins.canonical(self.optimizer_class, self.optimizer_values, frozenset(self.varied_hyperparameters))
        return groups.identity(main, self.optimizer_groups, self.trainable_names, frozenset(self.varied_hyperparameters))

    def describe_optimizer(self) -> str:
        family = twins.family_of(self.optimizer_class)
        main = family.describe(family.structure(self.optimizer_values, frozenset(self.varied_hyperparameters)))
        return groups.describe(main, self.optimizer_groups, self.trainable_names, frozenset(self.varied_hyperparameters))

    @property
    def optimizer_parts(self) -> tuple[groups.ParamGroup, ...]:
        """The main optimizer (as a ParamGroup) and the parameter groups: one functional optimizer each."""
        return (groups.ParamGroup("", self.optimizer_class, self.optimizer_values), *self.optimizer_groups)

    def optimizer_twin(self, varied: frozenset[str] | None = None) -> twins.FunctionalOptimizer:
        """The functional optimizer of this setup (``varied``: the hyperparameters interventions change, default
        this setup's)."""
        varied = frozenset(self.varied_hyperparameters) if varied is None else varied
        return groups.grouped_twin(self.optimizer_parts[0], self.optimizer_groups, self.trainable_names, varied)

    def optimizer_hparams(self, twin: twins.FunctionalOptimizer) -> dict[str, torch.Tensor]:
        """One learner's hyperparameters as ``twin`` (this setup's structure) reads them."""
        if isinstance(twin, groups.GroupedOptimizer):
            return twin.hparams_for([p.values for p in self.optimizer_parts])
        return twin.hparams(**self.optimizer_values)

    def group_key(self) -> tuple:
        """Learners with equal keys share a template, data and optimizer structure."""
        return (id(self.model), self.model_label, self.data.label, self.batch_size, self.optimizer_structure())

    def digest(self) -> str:
        """A stable name of what decides the numbers, beyond the optimizer's values and the interventions:
        the model (its description and its behaviour on a probe batch), which parameters train, the
        training data, the batch size, the loss and the dtype."""
        info = self.template_info
        if info._digest is None:
            info._digest = self.template_digest()
        return _hash({"template": info._digest, "data": self.data.fingerprint, "batch_size": self.batch_size})

    def template_digest(self, loss_description: Any = None) -> str:
        """The digest of the model, the loss and the dtype as they are now (``digest`` keeps the first one).
        Where the model or the loss runs user code, the behaviour probe also covers every class of the labels
        and the corners of the data (``class_fingerprint``); setups of library parts alone, fully described
        by their code and values, keep the ids they had before that probe."""
        info = self.template_info
        loss_description = self.context.loss_description() if loss_description is None else loss_description
        description = {  # buffers as each learner starts with them: BatchNorm statistics are reset
            "model": describe_module(reset(copy.deepcopy(info.module), PROBE_KEY)),
            "parameters": {n: [list(p.shape), p.requires_grad] for n, p in info.module.named_parameters()},
            "behaviour": behaviour_fingerprint(info.module, self.loss, self.data.x, self.data.y),
            "loss": loss_description,
            "dtype": str(self.dtype),
        }
        if runs_user_code(info.module, self.loss):
            description["every_class"] = class_fingerprint(info.module, self.loss, self.data.x, self.data.y)
        return _hash(description)


def _hash(description: Any) -> str:
    return hashlib.blake2b(json.dumps(description, sort_keys=True).encode(), digest_size=8).hexdigest()


def _is_array_pair(value: Any) -> bool:
    import numpy as np

    return all(isinstance(t, (torch.Tensor, np.ndarray)) for t in value)


def _activation_shapes(module: nn.Module, example_x: torch.Tensor) -> dict[str, list[tuple]]:
    shapes: dict[str, list[tuple]] = {}
    probe = copy.deepcopy(module).eval()  # no side effect on the template (BatchNorm statistics, dropout counters)
    handles = []
    for name, m in probe.named_modules():
        if name:
            handles.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: shapes.setdefault(name, []).append(tuple(out.shape))
                if isinstance(out, torch.Tensor) else None))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        probe(example_x)
    for h in handles:
        h.remove()
    return shapes
