"""One learner's model, functionally: its template, its initial state and its forward pass.

A learner's state is a ``ModelState(params, buffers)`` of named tensors; the template
``nn.Module`` only supplies the code, through ``torch.func.functional_call``.

>>> import torch
>>> from serimats_func.models import MLP
>>> template = prepare_template(MLP(widths=(8,)), torch.zeros(2, 40))
>>> a = initial_model_state(template, init_key=1, dropout_key=0)
>>> b = initial_model_state(template, init_key=1, dropout_key=0)
>>> torch.equal(a.params["1.weight"], b.params["1.weight"])
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.lazy import LazyModuleMixin

from . import pytrees
from .dropout import KeyedDropout, swap_dropout
from .keys import derive_key, seeded_cpu_rng
from .state import ModelState


class ModelDataMismatch(ValueError):
    """The model cannot take the dataset's examples."""


def prepare_template(model: nn.Module, example_x: torch.Tensor, num_classes: int | None = None) -> nn.Module:
    """A CPU copy of ``model`` in ``example_x``'s dtype, ready for functional use: lazy layers
    materialized on ``example_x`` (a small batch), dropout swapped for ``KeyedDropout``, and the
    forward pass checked to give ``(batch, classes)`` logits. The global RNG is left untouched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the template of every learner); got {type(model).__name__}.")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"model is a TorchScript module ({type(model).__name__}), which torch.func cannot call with "
                        "each learner's weights; give the plain nn.Module (before torch.jit.script / torch.jit.trace).")
    _check_batchnorm_momentum(model)
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
    if not out.is_floating_point():
        raise ModelDataMismatch(
            f"{type(model).__name__} returned logits of dtype {out.dtype}; logits must be floating point (the loss "
            "differentiates them). Return the last layer's output as it is (no .round(), .long() or argmax in forward)."
        )
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
    _check_something_trains(template, type(model).__name__)
    _check_every_parameter_resets(template)
    _check_vmappable(template, example_x.cpu())
    _check_buffers_forward_keeps(template, example_x.cpu(), type(model).__name__)
    return template


def _check_batchnorm_momentum(model: nn.Module) -> None:
    """BatchNorm with ``momentum=None`` keeps a cumulative average, weighting each batch by 1 / (batches so far):
    torch computes that weight with ``float()`` of its counter, which one vmapped step of many learners cannot do."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None and m.track_running_stats:
            raise ValueError(
                f"{type(m).__name__} {name!r} has momentum=None (a cumulative moving average of the batch statistics, "
                "whose weight torch computes in Python from the batch count, which one vmapped step of many learners "
                "cannot do). Give it a momentum (e.g. momentum=0.1, torch's default), or track_running_stats=False "
                "to normalize with the batch's own statistics in evaluation too.")


def _running_statistics(template: nn.Module) -> set[str]:
    """The buffers that a forward pass in training mode may change: BatchNorm's running statistics and the
    call counters of the library's dropout."""
    names = set()
    for prefix, m in template.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            names |= {dot + b for b in ("running_mean", "running_var", "num_batches_tracked")}
        elif isinstance(m, KeyedDropout):
            names.add(dot + "calls")
    return names


def _check_buffers_forward_keeps(template: nn.Module, example_x: torch.Tensor, name: str) -> None:
    """Refuse a forward pass that changes a buffer other than BatchNorm's running statistics (a counter that
    ``forward`` increments): the library runs forward passes besides training (checks, the behaviour probe,
    evaluation), so such a buffer would count them too and start from another value than the model's."""
    allowed = _running_statistics(template)
    for mode in ("train", "eval"):
        probe = copy.deepcopy(template).train(mode == "train")
        before = {k: b.clone() for k, b in probe.named_buffers()}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            probe(example_x)
        changed = [k for k, b in probe.named_buffers()
                   if (mode == "eval" or k not in allowed) and not torch.equal(b, before[k])]
        if changed:
            raise ModelDataMismatch(
                f"{name}'s forward pass changes its buffer {changed[0]!r} in {mode} mode (e.g. a counter it increments). "
                "The library runs forward passes besides the training steps (checks, evaluation), so the buffer would "
                "count those too: learners would start from another value than the model's and record other numbers "
                "than a plain training loop. Keep the buffer constant in forward (running statistics belong in an "
                "nn.BatchNorm layer), or read the step from an intervention's ctx.step.")


def _check_vmappable(template: nn.Module, example_x: torch.Tensor) -> None:
    """Run two learners through one vmapped train-mode step, as training will."""
    stacked = initial_model_states(template, init_keys=(0, 1), dropout_keys=(0, 1))
    params, buffers = stacked

    def loss(p, b, x):
        return forward(template, p, {k: v.clone() for k, v in b.items()}, x).sum()

    try:
        with torch.random.fork_rng(devices=[]):
            torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0, None))(params, buffers, example_x)
    except Exception as error:
        hint = ""
        if any(sign in str(error) for sign in ("item()", "data-dependent")):
            hint = (" The model reads a tensor's value in Python (`if out.max() > 1:`, .item(), float(tensor)), and "
                    "under vmap one forward pass serves every learner: it must not branch on a tensor's value; use "
                    "torch.where(condition, a, b) on tensors instead.")
        if "random" in str(error).lower():
            hint = (" The model draws random numbers from torch's global RNG (F.dropout, AlphaDropout, ...), "
                    "which would tie a learner to its batch-mates; use nn.Dropout / nn.Dropout1d/2d/3d modules, "
                    "which the library gives per-learner keys.")
        raise ModelDataMismatch(f"{type(template).__name__} cannot be trained under torch.func.vmap: "
                                f"{type(error).__name__}: {error}.{hint}") from error


def _check_something_trains(template: nn.Module, name: str) -> None:
    params = list(template.parameters())
    if not params:
        raise ModelDataMismatch(f"{name} has no parameters, so there is nothing to train. Give it layers with "
                                "weights (nn.Linear, nn.Conv2d...), registered as attributes of the module or in "
                                "nn.ModuleList / nn.Sequential (a plain Python list hides them from PyTorch).")
    if not any(p.requires_grad for p in params):
        raise ModelDataMismatch(f"Every parameter of {name} has requires_grad=False, so there is nothing to train. "
                                "Leave at least one parameter trainable (frozen ones stay at their initial values).")


def _check_every_parameter_resets(template: nn.Module) -> None:
    """Each learner draws its own weights by calling every module's ``reset_parameters()`` with its key. A
    parameter that no ``reset_parameters`` sets would keep the template's value, drawn from the global RNG
    when the model was built: the same for every learner, whatever its init seed. Refuse that: fill every
    parameter with NaN, reset, and look for what is left. Refuse too a ``reset_parameters`` that gives other
    values for the same key (it draws from NumPy's or Python's RNG, or the clock), since a learner's weights
    would then depend on the process, not on its key."""
    probe = copy.deepcopy(template)
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(float("nan"))
    reset(probe, 0)
    for name, p in probe.named_parameters():
        if torch.isnan(p).any():
            module_name, _, own = name.rpartition(".")
            module = probe.get_submodule(module_name)
            where = "" if hasattr(module, "reset_parameters") else ", which has no reset_parameters() method"
            raise ValueError(
                f"Parameter {name} belongs to {type(module).__name__}{where}, and no reset_parameters() sets "
                f"{'it' if torch.isnan(p).all() else 'all of it'}, so every learner would start from the same "
                f"values, drawn when the model was built. Give {type(module).__name__} a reset_parameters() that "
                f"draws {own} from torch's RNG (as nn.Linear does), e.g. nn.init.normal_(self.{own})."
            )
    again = reset(copy.deepcopy(template), 0)
    for (name, p), q in zip(probe.named_parameters(), again.parameters(), strict=True):
        if not torch.equal(p, q):
            module = probe.get_submodule(name.rpartition(".")[0])
            raise ValueError(
                f"reset_parameters() of {type(module).__name__} gives {name} other values each time for the same key: "
                "it draws from an RNG other than torch's (NumPy's, Python's random) or from the clock, so a learner's "
                "weights would not come from its key. Draw them with torch (nn.init.*, torch.randn), which the "
                "library seeds from each learner's key."
            )


def reset(module: nn.Module, key: int) -> nn.Module:
    """Call every submodule's ``reset_parameters()`` with torch's CPU RNG set from ``key``; returns ``module``,
    changed in place. The global RNG is left as it was."""
    with seeded_cpu_rng(key), torch.no_grad():
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return module


def initial_model_state(template: nn.Module, init_key: int, dropout_key: int) -> ModelState:
    """A learner's initial params and buffers: the template's own initialization
    (``reset_parameters`` of every module, PyTorch's defaults for built-in layers), drawn with
    the CPU RNG set from all 63 bits of ``init_key``; each dropout layer gets a key derived from
    ``dropout_key``. Buffers that no ``reset_parameters`` sets keep the template's values."""
    return pytrees.index(initial_model_states(template, [init_key], [dropout_key]), 0)


def initial_model_states(template: nn.Module, init_keys: Sequence[int], dropout_keys: Sequence[int]) -> ModelState:
    """``initial_model_state`` of N learners, stacked (N, ...): one working copy of the template is reset
    with each learner's key in turn and written into the stacked tensors (no copy of the module per learner).

    >>> from serimats_func.models import MLP
    >>> template = prepare_template(MLP(widths=(8,)), torch.zeros(2, 40))
    >>> stacked = initial_model_states(template, [1, 2], [0, 0])
    >>> torch.equal(stacked.params["1.weight"][1], initial_model_state(template, 2, 0).params["1.weight"])
    True
    """
    n = len(init_keys)
    module = copy.deepcopy(template)  # the template itself is never changed
    params = {name: torch.empty((n, *p.shape), dtype=p.dtype) for name, p in module.named_parameters()}
    buffers = {name: b.detach().clone().expand(n, *b.shape).clone() for name, b in module.named_buffers()}
    for i, key in enumerate(init_keys):
        reset(module, key)
        with torch.no_grad():
            for name, p in module.named_parameters():
                params[name][i] = p
            for name, b in module.named_buffers():
                buffers[name][i] = b
    for name, m in module.named_modules():
        if isinstance(m, KeyedDropout):
            buffers[f"{name}.key"] = torch.tensor([derive_key(k, name) for k in dropout_keys], dtype=torch.int64)
            buffers[f"{name}.calls"] = torch.zeros(n, dtype=torch.int64)
    return ModelState(params, buffers)


PROBE_KEY = derive_key("serimats-func behaviour probe")
PROBE_EXAMPLES = 8
PROBE_DIGITS = 9


def behaviour_fingerprint(template: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> list | None:
    """What the template and the loss compute, in numbers that any machine reproduces: a float64 copy is
    initialized from a fixed key, run in train mode on the first examples (loss, the norm of each
    parameter's gradient and of each buffer after the step) and in eval mode (the norm of the logits),
    each rounded to 9 significant digits. Catches what reading code cannot (a global, a C extension...).
    None when the model cannot run in float64."""
    return _fingerprint(template, loss_fn, x[:PROBE_EXAMPLES], y[:PROBE_EXAMPLES])


def probe_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples that show every class and the corners of the data: the first example of each label value (in
    the order of the labels), then three extreme inputs (all zeros, and each feature at its largest and at its
    smallest value over the dataset) labelled with the last, the first and the middle class.

    >>> x, y = probe_batch(torch.arange(12.0).reshape(6, 2), torch.tensor([2, 0, 2, 1, 0, 1]))
    >>> y.tolist(), x[:3, 0].tolist(), x[3:].tolist()
    ([0, 1, 2, 2, 0, 1], [2.0, 6.0, 0.0], [[0.0, 0.0], [10.0, 11.0], [0.0, 1.0]])
    """
    classes = torch.unique(y)  # sorted
    first = torch.stack([torch.nonzero(y == c)[0, 0] for c in classes])
    extremes = torch.stack([torch.zeros_like(x[0]), x.amax(dim=0), x.amin(dim=0)])
    labels = classes[[len(classes) - 1, 0, len(classes) // 2]]
    return torch.cat([x[first], extremes]), torch.cat([y[first], labels])


def class_fingerprint(template: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> list | None:
    """``behaviour_fingerprint`` on ``probe_batch``: every class of the labels and the corners of the data, so that
    a loss or model that treats one class apart (a class weight read through ``getattr``) shows."""
    return _fingerprint(template, loss_fn, *probe_batch(x, y))


def _fingerprint(template: nn.Module, loss_fn: Callable, xb: torch.Tensor, yb: torch.Tensor) -> list | None:
    try:
        model = reset(copy.deepcopy(template).double(), PROBE_KEY)
        xb = xb.double()
        with torch.random.fork_rng(devices=[]):
            model.train()
            loss = loss_fn(model(xb), yb)
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
            model.eval()
            with torch.no_grad():
                logits = model(xb)
    except Exception:
        return None
    numbers = [float(loss.detach()), float(logits.norm())]
    numbers += [0.0 if g is None else float(g.norm()) for g in grads]
    numbers += [float(b.double().norm()) for b in model.buffers() if b.is_floating_point()]
    return [float(f"{v:.{PROBE_DIGITS}g}") for v in numbers]


def forward(template: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits of one learner for a batch ``x``; in train mode ``buffers`` are updated in place."""
    return functional_call(template, (params, buffers), (x,), strict=True)
