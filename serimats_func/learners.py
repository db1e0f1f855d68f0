"""One learner's model, functionally: its template, its initial state and its forward pass.

A learner's state is a pytree ``{"params", "buffers"}`` of named tensors; the template
``nn.Module`` only supplies the code, through ``torch.func.functional_call``.

>>> import torch
>>> from serimats_func.models import MLP
>>> template = prepare_template(MLP(widths=(8,)), torch.zeros(2, 40))
>>> a = initial_model_state(template, init_key=1, dropout_key=0)
>>> b = initial_model_state(template, init_key=1, dropout_key=0)
>>> torch.equal(a["params"]["1.weight"], b["params"]["1.weight"])
True
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.lazy import LazyModuleMixin

from . import pytrees
from .dropout import KeyedDropout, swap_dropout
from .keys import derive_key

ModelState = dict[str, dict[str, torch.Tensor]]


class ModelDataMismatch(ValueError):
    """The model cannot take the dataset's examples."""


def prepare_template(model: nn.Module, example_x: torch.Tensor, num_classes: int | None = None) -> nn.Module:
    """A CPU copy of ``model`` in ``example_x``'s dtype, ready for functional use: lazy layers
    materialized on ``example_x`` (a small batch), dropout swapped for ``KeyedDropout``, and the
    forward pass checked to give ``(batch, classes)`` logits. The global RNG is left untouched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the template of every learner); got {type(model).__name__}.")
    template = swap_dropout(copy.deepcopy(model).cpu().to(example_x.dtype))
    template.eval()  # in eval mode the check changes no buffer (BatchNorm statistics)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = template(example_x.cpu())
    except Exception as error:
        raise ModelDataMismatch(
            f"{type(model).__name__} cannot take the dataset's examples of shape "
            f"{tuple(example_x.shape[1:])} (a batch of them: {tuple(example_x.shape)}): "
            f"{type(error).__name__}: {error}. Use a model made for this input shape, or "
            "reshape the dataset (e.g. MLP() takes any shape; Lenet5() takes 1x28x28 images)."
        ) from error
    if not isinstance(out, torch.Tensor):
        raise ModelDataMismatch(f"{type(model).__name__} returned a {type(out).__name__}; the template must "
                                "return one tensor of logits of shape (batch, classes).")
    if out.ndim != 2 or out.shape[0] != example_x.shape[0]:
        raise ModelDataMismatch(
            f"{type(model).__name__} returned shape {tuple(out.shape)} for a batch of "
            f"{example_x.shape[0]} examples; expected logits of shape (batch, classes)."
        )
    if num_classes is not None and out.shape[1] < num_classes:
        raise ModelDataMismatch(
            f"{type(model).__name__} gives {out.shape[1]} logits but the labels go up to "
            f"{num_classes - 1}; give the model at least {num_classes} outputs."
        )
    if any(isinstance(m, LazyModuleMixin) for m in template.modules()):
        raise ModelDataMismatch(f"{type(model).__name__} still has lazy layers after a forward pass.")
    template.train()
    _check_every_parameter_resets(template)
    _check_vmappable(template, example_x.cpu())
    return template


def _check_vmappable(template: nn.Module, example_x: torch.Tensor) -> None:
    """Run two learners through one vmapped train-mode step, as training will."""
    stacked = pytrees.stack([initial_model_state(template, init_key=k, dropout_key=k) for k in (0, 1)])
    params, buffers = stacked["params"], stacked["buffers"]

    def loss(p, b, x):
        return forward(template, p, {k: v.clone() for k, v in b.items()}, x).sum()

    try:
        with torch.random.fork_rng(devices=[]):
            torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0, None))(params, buffers, example_x)
    except Exception as error:
        hint = ""
        if "random" in str(error).lower():
            hint = (" The model draws random numbers from torch's global RNG (F.dropout, AlphaDropout, ...), "
                    "which would tie a learner to its batch-mates; use nn.Dropout / nn.Dropout1d/2d/3d modules, "
                    "which the library gives per-learner keys.")
        raise ModelDataMismatch(f"{type(template).__name__} cannot be trained under torch.func.vmap: "
                                f"{type(error).__name__}: {error}.{hint}") from error


def _check_every_parameter_resets(template: nn.Module) -> None:
    """Each learner draws its own weights by calling ``reset_parameters()``; a parameter whose
    module has none would be shared by all learners, silently. Refuse that."""
    for module_name, module in template.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own and not hasattr(module, "reset_parameters"):
            where = f"{module_name}." if module_name else ""
            raise ValueError(
                f"Parameter {where}{own[0]} belongs to {type(module).__name__}, which has no "
                "reset_parameters() method, so every learner would start from the same values. "
                "Add a reset_parameters() that draws them from torch's RNG (as nn.Linear does)."
            )


def initial_model_state(template: nn.Module, init_key: int, dropout_key: int) -> ModelState:
    """A learner's initial params and buffers: the template's own initialization
    (``reset_parameters`` of every module, PyTorch's defaults for built-in layers), drawn with
    the RNG seeded by ``init_key``; each dropout layer gets a key derived from ``dropout_key``."""
    module = template  # reset in place: every parameter is redrawn, so no copy is needed
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(init_key)  # the CPU generator only: CUDA's is not touched
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    for name, m in module.named_modules():
        if isinstance(m, KeyedDropout):
            buffers[f"{name}.key"] = torch.tensor(derive_key(dropout_key, name), dtype=torch.int64)
            buffers[f"{name}.calls"] = torch.tensor(0, dtype=torch.int64)
    return {"params": params, "buffers": buffers}


def forward(template: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits of one learner for a batch ``x``; in train mode ``buffers`` are updated in place."""
    return functional_call(template, (params, buffers), (x,), strict=True)
