"""Convolutions and max-pooling of many learners at once, each layer the fastest correct way.

Under ``vmap``, a convolution whose weights differ per learner becomes one grouped convolution, which
is slow on CPUs, and pooling copies its input to put the learner axis first. This module gives
``nn.Conv1d/2d/3d`` and ``nn.MaxPool2d`` layers their own batching rules (``torch.autograd.Function``
with a ``vmap`` staticmethod, forward and backward, so they compose with ``torch.func.grad``, ``vmap``
and ``torch.compile``), with a choice of strategy per layer:

- ``"vmap"``: torch.func's own rule (the reference every other strategy is tested against);
- ``"fold"``: for an input that all learners share (the first layer of learners with one data order), one
  convolution with the learners folded into its output channels: (B, C, ...) * (N*C_out, C, ...) ->
  (B, N*C_out, ...), the learner axis left where it lands (dimension 1, no copy);
- ``"grouped"``: one grouped convolution (groups = N), the learner axis in the channels as ``"fold"``
  leaves it, so that layers chain without copies;
- ``"channels_last"``: ``"fold"`` / ``"grouped"`` in channels-last memory format (2-d only), oneDNN's fast
  path on CPUs; pooling and the next convolution keep that layout;
- ``"loop"``: one convolution per learner, inside the batching rule.

Max-pooling folds the learners into its channels the same way, whatever the layout, and routes gradients
exactly as ``F.max_pool2d`` does (its own kernels run).

Numbers: every strategy computes each learner's convolution on its own data and weights; only the
kernel, hence the order of float additions, differs. In float64 they agree with ``"vmap"`` to about
1e-12 relative; in float32 one step agrees to float32 rounding (tests/test_speed.py). A plan (a ``ConvPlan`` of the
registry ``PLANS``: each layer's strategy, or ``"serial"``, one learner after another) is chosen per
model, device, learner count and input shape (``acceleration.choose_plan``): by a short measurement of
one or two steps with each candidate when training is long enough to repay it, else by a fixed rule; a
measured choice is cached in the process and on disk (``plan_cache``).

>>> import torch
>>> from serimats_func.models import Lenet5
>>> fast = accelerate(Lenet5(), {"conv1": "fold", "conv2": "grouped"})
>>> type(fast.conv1).__name__, fast.conv1.strategy, type(fast.pool).__name__
('VmapConv', 'fold', 'VmapMaxPool2d')
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STRATEGIES = ("vmap", "fold", "grouped", "channels_last", "gemm", "loop")
FOLDED = ("fold", "grouped", "channels_last", "gemm")  # the learner axis in the channels
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ConvConfig:
    """A convolution's static arguments and its strategy."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    strategy: str

    @property
    def dims(self) -> int:
        return len(self.stride)

    def conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int | None = None) -> torch.Tensor:
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return fn(x, w, b, self.stride, self.padding, self.dilation, self.groups if groups is None else groups)

    def backward(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: tuple[bool, bool, bool],
                 groups: int | None = None) -> tuple[torch.Tensor | None, ...]:
        """(grad_x, grad_w, grad_b), None where ``mask`` says not needed."""
        bias_sizes = [w.shape[0]] if mask[2] else None
        return torch.ops.aten.convolution_backward(g, x, w, bias_sizes, list(self.stride), list(self.padding),
                                                   list(self.dilation), False, [0] * self.dims,
                                                   self.groups if groups is None else groups, list(mask))


def _front(t: torch.Tensor | None, dim: int | None, n: int) -> torch.Tensor | None:
    """The learner axis first: (N, ...); an unbatched tensor expanded (a view)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(n, *t.shape)


def _second(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """A batched (..) tensor with its learner axis as dimension 1: (B, N, C, ...), a view."""
    return t.movedim(dim, 1)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


# ---------------------------------------------------------------------------------------------- strategies
# Each takes physical tensors with the learner axis where ``in_dims`` say and returns (result, out_dims).


def _fold_forward(c: ConvConfig, n: int, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, ...) shared, w (N, C_out, C, ...) -> (B, N, C_out, ...)."""
    w = w.reshape(n * w.shape[1], *w.shape[2:])  # (N*C_out, C, ...)
    if c.strategy == "channels_last":
        x, w = _channels_last(x), _channels_last(w)
    out = c.conv(x, w, None if b is None else b.reshape(-1))  # (B, N*C_out, ...)
    return out.view(out.shape[0], n, -1, *out.shape[2:])


def _columns(c: ConvConfig, x: torch.Tensor, kernel: tuple[int, ...], bias: bool) -> torch.Tensor:
    """im2col of a shared 2-d input: (B*L, C*kh*kw), one row per output position (b, i, j), and a column of
    ones when there is a bias (which then rides in the matrix product)."""
    cols = F.unfold(x, kernel, c.dilation, c.padding, c.stride)  # (B, C*kh*kw, L)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return torch.cat([cols, cols.new_ones(len(cols), 1)], dim=1) if bias else cols


def _out_size(c: ConvConfig, x: torch.Tensor, kernel: tuple[int, ...]) -> tuple[int, ...]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, p, d, k, s in zip(x.shape[2:], c.padding, c.dilation, kernel, c.stride, strict=True))


def _weight_matrix(n: int, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(N*C_out, C*kh*kw), with the bias as a last column when there is one."""
    wm = w.reshape(n * w.shape[1], -1)
    return wm if b is None else torch.cat([wm, b.reshape(-1, 1)], dim=1)


def _gemm_forward(c: ConvConfig, n: int, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, H, W) shared, w (N, C_out, C, kh, kw) -> (B, N, C_out, H', W') in channels-last memory: one matrix
    product (B*H'*W', C*kh*kw [+1]) @ (C*kh*kw [+1], N*C_out)."""
    kernel = tuple(w.shape[3:])
    out = _columns(c, x, kernel, b is not None) @ _weight_matrix(n, w, b).t()  # (B*L, N*C_out)
    h, wd = _out_size(c, x, kernel)
    return out.view(x.shape[0], h, wd, n, w.shape[1]).permute(0, 3, 4, 1, 2)  # (B, N, C_out, H', W')


def _gemm_backward(c: ConvConfig, n: int, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                   want_b: bool) -> tuple[torch.Tensor, ...]:
    """Weight (N, C_out, C, kh, kw) and bias (N, C_out) gradients of ``_gemm_forward`` from g (B, N, C_out, H', W'):
    one matrix product (N*C_out, B*H'*W') @ (B*H'*W', C*kh*kw [+1])."""
    cols = _columns(c, x, tuple(w.shape[3:]), want_b)  # recomputed: cheaper than keeping it
    gm = g.permute(0, 3, 4, 1, 2).reshape(len(cols), -1)  # (B*L, N*C_out); a view when g is channels-last
    grad = gm.t() @ cols  # (N*C_out, C*kh*kw [+1])
    k = w[0].numel() // w.shape[1]
    gw = grad[:, :k].reshape(w.shape)
    return (gw, grad[:, k].reshape(n, -1)) if want_b else (gw,)


def _grouped_inputs(c: ConvConfig, n: int, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C, ...) -> (B, N*C, ...); w (N, C_out, C/g, ...) -> (N*C_out, C/g, ...)."""
    x = x.reshape(x.shape[0], n * x.shape[2], *x.shape[3:])
    w = w.reshape(n * w.shape[1], *w.shape[2:])
    if c.strategy in ("channels_last", "gemm"):
        x, w = _channels_last(x), _channels_last(w)
    return x, w


def _grouped_forward(c: ConvConfig, n: int, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (B, N, C, ...), w (N, C_out, C/g, ...) -> (B, N, C_out, ...)."""
    xg, wg = _grouped_inputs(c, n, x, w)
    out = c.conv(xg, wg, None if b is None else b.reshape(-1), groups=n * c.groups)  # (B, N*C_out, ...)
    return out.view(out.shape[0], n, -1, *out.shape[2:])


def _loop_forward(c: ConvConfig, n: int, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (N, B, C, ...), w (N, ...) -> (N, B, C_out, ...)."""
    return torch.stack([c.conv(x[i], w[i], None if b is None else b[i]) for i in range(n)])


class _Conv(torch.autograd.Function):
    """A convolution whose batching rule (forward) follows ``config.strategy``."""

    @staticmethod
    def forward(x, w, b, config: ConvConfig):
        return config.conv(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, config = inputs
        ctx.save_for_backward(x, w)
        ctx.config, ctx.has_bias = config, b is not None

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        if not any(mask):
            return None, None, None, None
        grads = _ConvBackward.apply(g, x, w, ctx.config, mask)
        out = iter(grads)
        return tuple(next(out) if m else None for m in mask) + (None,)

    @staticmethod
    def vmap(info, in_dims, x, w, b, config):
        n, (xd, wd, bd, _) = info.batch_size, in_dims
        w, b = _front(w, wd, n), _front(b, bd, n)
        strategy = config.strategy
        if xd is None and config.groups == 1 and strategy in FOLDED:
            if strategy == "gemm" and config.dims == 2:
                return _gemm_forward(config, n, x, w, b), 1
            return _fold_forward(config, n, x, w, b), 1
        if xd is not None and strategy in FOLDED:
            return _grouped_forward(config, n, _second(x, xd), w, b), 1
        return _loop_forward(config, n, _front(x, xd, n), w, b), 0


class _ConvBackward(torch.autograd.Function):
    """The gradients of ``_Conv`` that ``mask`` asks for, as a tuple; batched by the same strategy."""

    @staticmethod
    def forward(g, x, w, config: ConvConfig, mask: tuple[bool, bool, bool]):
        return tuple(t for t, m in zip(config.backward(g, x, w, mask), mask, strict=True) if m)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("serimats_func convolutions have no second derivative; use convolutions='vmap'.")

    @staticmethod
    def vmap(info, in_dims, g, x, w, config, mask):
        n, (gd, xd, wd, _, _) = info.batch_size, in_dims
        w = _front(w, wd, n)
        strategy, (want_x, want_w, want_b) = config.strategy, mask
        shared = xd is None
        if strategy in FOLDED and not (shared and want_x) and (not shared or config.groups == 1):
            gg = _second(g, gd)  # (B, N, C_out, ...)
            if shared and strategy == "gemm" and config.dims == 2 and want_w:
                grads = _gemm_backward(config, n, gg, x, w, want_b)
                return grads, (0,) * len(grads)
            gg = gg.reshape(gg.shape[0], -1, *gg.shape[3:])  # (B, N*C_out, ...)
            if shared:
                xx, ww, groups = x, w.reshape(n * w.shape[1], *w.shape[2:]), config.groups
            else:
                (xx, ww), groups = _grouped_inputs(config, n, _second(x, xd), w), n * config.groups
            if strategy in ("channels_last", "gemm"):
                gg, xx, ww = _channels_last(gg), _channels_last(xx), _channels_last(ww)
            gx, gw, gb = config.backward(gg, xx, ww, mask, groups=groups)
            out, dims = [], []
            if want_x:
                out.append(gx.view(gx.shape[0], n, -1, *gx.shape[2:]))
                dims.append(1)
            if want_w:
                out.append(gw.view(n, -1, *gw.shape[1:]))
                dims.append(0)
            if want_b:
                out.append(gb.view(n, -1))
                dims.append(0)
            return tuple(out), tuple(dims)
        g, x = _front(g, gd, n), _front(x, xd, n)
        per = [config.backward(g[i], x[i], w[i], mask) for i in range(n)]
        out = tuple(torch.stack([p[k] for p in per]) for k in range(3) if mask[k])
        return out, (0,) * len(out)


class _MaxPool(torch.autograd.Function):
    """``F.max_pool2d`` whose batching rule folds the learners into the channels (no copy)."""

    @staticmethod
    def forward(x, config: tuple):
        return torch.ops.aten.max_pool2d_with_indices(x, *config)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, config = inputs
        ctx.save_for_backward(x, output[1])
        ctx.config = config
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _g_indices):
        x, indices = ctx.saved_tensors
        return _MaxPoolBackward.apply(g, x, indices, ctx.config), None

    @staticmethod
    def vmap(info, in_dims, x, config):
        if in_dims[0] is None:  # pooling an input that every learner shares
            return torch.ops.aten.max_pool2d_with_indices(x, *config), (None, None)
        xf, unfold = _pool_fold(x, in_dims[0])
        out, indices = torch.ops.aten.max_pool2d_with_indices(xf, *config)
        return (unfold(out), unfold(indices)), (1, 1)


class _MaxPoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(g, x, indices, config: tuple):
        return torch.ops.aten.max_pool2d_with_indices_backward(g, x, *config, indices)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("serimats_func max-pooling has no second derivative; use convolutions='vmap'.")

    @staticmethod
    def vmap(info, in_dims, g, x, indices, config):
        n = info.batch_size
        (gf, unfold), (xf, _), (idx, _) = (_pool_fold(_front(t, d, n), 0) if d is None else _pool_fold(t, d)
                                           for t, d in zip((g, x, indices), in_dims[:3], strict=True))
        return unfold(torch.ops.aten.max_pool2d_with_indices_backward(gf, xf, *config, idx)), 1


def _pool_fold(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A batched input (..., with the learner axis at ``dim``) as (B, N*C, H, W), and the inverse for results.
    The learner axis goes next to the channels: a view when it is there already (as convolutions leave it)."""
    x = x.movedim(dim, 1)  # (B, N, C, H, W)
    b, n, c = x.shape[:3]
    folded = x.reshape(b, n * c, *x.shape[3:])
    return folded, lambda t: t.view(b, n, c, *t.shape[2:])


# ---------------------------------------------------------------------------------------------- the layers
# torch.compile cannot trace an autograd.Function's vmap rule on a tensor made inside the compiled region;
# it can when the call is an opaque node of the graph (allow_in_graph), which AOTAutograd then traces as eager.


@torch.compiler.allow_in_graph
def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, config: ConvConfig) -> torch.Tensor:
    return _Conv.apply(x, w, b, config)


@torch.compiler.allow_in_graph
def _max_pool(x: torch.Tensor, config: tuple) -> torch.Tensor:
    return _MaxPool.apply(x, config)[0]



def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class VmapConv(nn.Module):
    """A ``nn.Conv1d/2d/3d`` (same parameters, same numbers up to float rounding) with a chosen batching rule."""

    def __init__(self, conv: nn.Module, strategy: str):
        super().__init__()
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(conv)]
        if strategy in ("channels_last", "gemm") and dims != 2:
            strategy = "grouped"
        self.weight, self.bias = conv.weight, conv.bias
        self.strategy = strategy
        self.config = ConvConfig(_tuple(conv.stride, dims), _tuple(conv.padding, dims), _tuple(conv.dilation, dims),
                                 conv.groups, strategy)
        self.describe = repr(conv)

    def extra_repr(self) -> str:
        return f"{self.describe}, strategy={self.strategy}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv(x, self.weight, self.bias, self.config)


class VmapMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (same numbers, same gradients) whose batching rule folds the learners into channels."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.config = (_tuple(pool.kernel_size, 2), _tuple(pool.stride or pool.kernel_size, 2),
                       _tuple(pool.padding, 2), _tuple(pool.dilation, 2), bool(pool.ceil_mode))
        self.describe = repr(pool)

    def extra_repr(self) -> str:
        return self.describe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:  # (C, H, W) inputs: leave them to torch
            return F.max_pool2d(x, *self.config)
        return _max_pool(x, self.config)


def convolutions_of(model: nn.Module) -> list[str]:
    """Names of the convolutions that ``accelerate`` can replace: plain ``nn.Conv1d/2d/3d`` with zero
    padding given as numbers.

    >>> from serimats_func.models import Lenet5
    >>> convolutions_of(Lenet5())
    ['conv1', 'conv2']
    """
    return [name for name, m in model.named_modules() if type(m) in CONVOLUTIONS and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)]


def _poolings(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.MaxPool2d and not m.return_indices]


def accelerate(model: nn.Module, plan: Mapping[str, str], pooling: bool = True) -> nn.Module:
    """A copy of ``model`` in which each convolution named in ``plan`` runs its strategy (``"vmap"``: left as
    it is) and, when any does, each ``nn.MaxPool2d`` folds the learners into its channels. Parameter and
    buffer names are unchanged; the copy shares nothing with ``model``."""
    model = copy.deepcopy(model)
    active = {name: s for name, s in plan.items() if s != "vmap"}
    for name, strategy in active.items():
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown convolution strategy {strategy!r}; choose from {', '.join(STRATEGIES)}.")
        _replace(model, name, VmapConv(model.get_submodule(name), strategy))
    if active and pooling:
        for name in _poolings(model):
            _replace(model, name, VmapMaxPool2d(model.get_submodule(name)))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ---------------------------------------------------------------------------------------------- choosing


# A plan says how a chunk's step batches its convolutions: the strategy of each layer, or one learner after another.
# Every plan is a ``ConvPlan`` in ``PLANS``, which everything else reads (``Experiment(convolutions=...)``, the
# plans ``acceleration`` measures, how ``training`` builds the step): adding one is its function of the model plus
# its ``register_plan`` line below.


def by_input(shared: str, own: str) -> Callable[[nn.Module], dict[str, str]]:
    """Layers for a plan: strategy ``shared`` for the first convolution (whose input is the batch, shared by the
    learners when they share a data order) and ``own`` for the others (whose input is the learners' own
    activations)."""
    def layers(model: nn.Module) -> dict[str, str]:
        return {name: shared if i == 0 else own for i, name in enumerate(convolutions_of(model))}

    return layers


def no_layers(model: nn.Module) -> dict[str, str]:
    """Layers for a plan that leaves every convolution to torch."""
    return {}


@dataclass(frozen=True)
class ConvPlan:
    """A convolution plan. ``layers(model)``: each convolution's strategy (``STRATEGIES``; those not named are
    left to torch). ``devices``: the device types on which ``convolutions="auto"`` measures it (None: every
    one). ``per_learner``: the step runs each learner's forward and backward in turn with ``torch.autograd``
    instead of under ``vmap`` (it does not compile: a compiled step takes a vmapped plan)."""

    name: str
    layers: Callable[[nn.Module], dict[str, str]]
    devices: tuple[str, ...] | None = None
    per_learner: bool = False

    def candidate_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices


PLANS: dict[str, ConvPlan] = {}  # by name, in the order they are measured


def register_plan(plan: ConvPlan) -> ConvPlan:
    """Add a plan; refused if its name is taken (or is ``"auto"``, which means: measure the candidates)."""
    if plan.name in PLANS or plan.name == "auto":
        raise ValueError(f"A convolution plan named {plan.name!r} exists already.")
    PLANS[plan.name] = plan
    return plan


def unregister_plan(name: str) -> ConvPlan:
    """Remove a plan (a test's own, say); returns it."""
    return PLANS.pop(name)


def candidates(device: torch.device) -> tuple[str, ...]:
    """The plans ``convolutions="auto"`` measures on ``device``."""
    return tuple(name for name, plan in PLANS.items() if plan.candidate_on(device.type))


register_plan(ConvPlan("vmap", by_input("vmap", "vmap")))  # torch.func's own rule: the reference
register_plan(ConvPlan("grouped", by_input("fold", "grouped")))
register_plan(ConvPlan("channels_last", by_input("channels_last", "channels_last")))
register_plan(ConvPlan("gemm", by_input("gemm", "channels_last")))
register_plan(ConvPlan("loop", by_input("fold", "loop")))
register_plan(ConvPlan("serial", no_layers, per_learner=True))  # each learner in turn, in channels-last memory


def plan_for(model: nn.Module, candidate: str) -> dict[str, str]:
    """Each convolution's strategy under a plan of ``PLANS``: the first layer's input is the batch (shared by the
    learners when they share a data order), the others' are the learners' own activations.

    >>> from serimats_func.models import Lenet5
    >>> plan_for(Lenet5(), "gemm")
    {'conv1': 'gemm', 'conv2': 'channels_last'}
    """
    return PLANS[candidate].layers(model)
