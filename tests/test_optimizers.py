"""Each functional optimizer against its torch.optim twin, on a real model, over one shared list of cases.

Two comparisons, each robust to the CPU it runs on:

- float64, whole trajectories of 200 steps, to 1e-10: float64 rounding is far too small to grow past that.
- float32, step by step from a shared state: before every step torch.optim's parameters and state are copied
  into the twin, both take one step with the same gradients, and the new parameters and state agree to a
  relative 1e-6 (about 8 float32 epsilons) in norm per tensor. A float32 trajectory of hundreds of steps is
  chaotic and its rounding depends on the CPU's kernels (AVX2 or AVX-512, fused multiply-adds), so it is
  never compared whole. The step-by-step comparison also holds when
  the twin's inputs are moved by one ulp (``torch.nextafter``), the size of another CPU's rounding noise.

Muon's reference is torch.optim.Muon for the matrices and torch.optim.AdamW(lr=3e-4) for the biases
(``MuonWithAdamW``, which runs both); Lion's is the library's ``Lion`` class and, below, its published rule.
"""

import inspect

import pytest
import torch
from torch.func import functional_call, grad

from serimats_func.models import MLP
from serimats_func.optimizers import Lion, MuonWithAdamW, functional_twin, resolve

TRAJECTORY_STEPS = 200
STEP_BY_STEP_STEPS = 40

CASES = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (torch.optim.Adam, dict(lr=1e-3)),
    (torch.optim.Adam, dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    (torch.optim.Adam, dict(lr=1e-3, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=1e-3)),
    (torch.optim.AdamW, dict(lr=2e-3, weight_decay=0.1, amsgrad=True)),
    (torch.optim.RMSprop, dict(lr=1e-3)),
    (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2, momentum=0.9)),
    (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True)),
    (torch.optim.Adagrad, dict(lr=0.05)),
    (torch.optim.Adagrad, dict(lr=0.05, lr_decay=1e-2, weight_decay=1e-3, initial_accumulator_value=0.1, eps=1e-8)),
    (torch.optim.Adamax, dict(lr=2e-3)),
    (torch.optim.Adamax, dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    (torch.optim.NAdam, dict(lr=2e-3)),
    (torch.optim.NAdam, dict(lr=2e-3, betas=(0.8, 0.99), weight_decay=1e-2, momentum_decay=1e-2)),
    (torch.optim.NAdam, dict(lr=2e-3, weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.RAdam, dict(lr=1e-3)),
    (torch.optim.RAdam, dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    (torch.optim.RAdam, dict(lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.Adadelta, dict(lr=1.0)),
    (torch.optim.Adadelta, dict(lr=0.5, rho=0.95, eps=1e-5, weight_decay=1e-3)),
    (torch.optim.Adafactor, dict(lr=1e-2)),
    (torch.optim.Adafactor, dict(lr=1e-2, beta2_decay=-0.5, eps=(1e-30, 1e-3), d=2.0, weight_decay=1e-2)),
    (torch.optim.Muon, dict(lr=0.02)),
    (torch.optim.Muon, dict(lr=0.02, momentum=0.9, nesterov=False, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")),
    (Lion, dict(lr=1e-4)),
    (Lion, dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1)),
]
FIRST_OF_EACH = [c for i, c in enumerate(CASES) if all(c[0] is not d[0] for d in CASES[:i])]


def _ids(case) -> str:
    return getattr(case, "__name__", None) or "-".join(f"{k}={v}" for k, v in case.items()) or "defaults"


def _reference(torch_class, params, values):
    """torch.optim's optimizer (its single-tensor code) over the named parameters; Muon's matrices with
    torch.optim.Muon and the rest with torch.optim.AdamW."""
    if torch_class is torch.optim.Muon:
        return MuonWithAdamW([p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2], **values)
    kernels = {"foreach": False} if "foreach" in inspect.signature(torch_class).parameters else {}
    return torch_class(params, **kernels, **values)


def _lr_schedule(step: int, base: float) -> float:
    """A learning rate that an outside loop changes between steps through ``param_groups``."""
    return base if step < 50 else (base / 2 if step < 120 else base * 1.5)


def momentum_schedule(step: int, base: float) -> float:
    """Momentum that an outside loop changes between steps through ``param_groups``: off, on, off, on again."""
    return 0.0 if step < 5 or 20 <= step < 27 else (base if step < 20 else base / 2)


# SGD whose momentum changes between steps: the buffer starts at the first step with momentum, and a
# step with momentum 0 uses the plain gradient and leaves the buffer alone.
SCHEDULED = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True)),  # torch keeps the buffer while it is 0
]


def _problem(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 40, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (256,), generator=gen)
    torch.manual_seed(0)
    model = MLP(widths=(32, 32), in_features=40).to(dtype)

    def loss_of(params, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb)

    def batch(step):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        return x[idx], y[idx]

    return model, loss_of, batch


def momentum_on_first(step: int, base: float) -> float:
    """On at the first step (torch's RMSprop makes its buffer only then), then off, then on again."""
    return 0.0 if 20 <= step < 27 else (base if step < 20 else base / 2)


SCHEDULES = {"momentum": momentum_schedule, "lr": _lr_schedule}
MOMENTUM_SCHEDULES = {torch.optim.SGD: momentum_schedule, torch.optim.RMSprop: momentum_on_first}


def _scheduled(reference, hparams, values, schedule, step):
    """This step's value of the scheduled hyperparameter, set in torch's first param group and in the twin's."""
    if schedule is None:
        return hparams
    rule = MOMENTUM_SCHEDULES[type(reference)] if schedule == "momentum" else SCHEDULES[schedule]
    value = rule(step, values[schedule])
    reference.param_groups[0][schedule] = value
    return {**hparams, schedule: torch.tensor(value, dtype=torch.float64)}


def _trajectories(torch_class, values, dtype, steps=TRAJECTORY_STEPS, schedule=None):
    """Both optimizers from the same start, each on its own trajectory; yields after every step."""
    model, loss_of, batch = _problem(dtype)
    theirs = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    reference = _reference(torch_class, list(theirs.values()), values)
    twin = functional_twin(torch_class, frozenset({schedule} - {None}), **values)
    ours = {n: p.detach().clone() for n, p in model.named_parameters()}
    state, hparams = twin.init(ours), twin.hparams(**values)
    for step in range(steps):
        hparams = _scheduled(reference, hparams, resolve(torch_class, values), schedule, step)
        xb, yb = batch(step)
        reference.zero_grad()
        loss_of(theirs, xb, yb).backward()
        reference.step()
        ours, state = twin.update(grad(loss_of)(ours, xb, yb), state, ours, hparams)
        yield step, ours, theirs


def _worst_relative_difference(trajectory) -> float:
    worst = 0.0
    for _, ours, theirs in trajectory:
        for name, p in theirs.items():
            worst = max(worst, ((ours[name] - p.detach()).norm() / p.detach().norm()).item())
    return worst


@pytest.mark.parametrize("torch_class,values", CASES, ids=_ids)
def test_float64_trajectories_match_torch_optim_to_1e_10_over_200_steps(torch_class, values):
    worst = _worst_relative_difference(_trajectories(torch_class, values, torch.float64))
    assert worst < 1e-10, f"relative difference {worst:.2e} over {TRAJECTORY_STEPS} steps"


@pytest.mark.parametrize("torch_class,values", FIRST_OF_EACH, ids=_ids)
def test_a_learning_rate_changed_between_steps_follows_torch_optim_in_float64(torch_class, values):
    worst = _worst_relative_difference(_trajectories(torch_class, values, torch.float64, schedule="lr"))
    assert worst < 1e-10, f"relative difference {worst:.2e} over {TRAJECTORY_STEPS} steps"


@pytest.mark.parametrize("torch_class,values", SCHEDULED, ids=["SGD-dampening", "SGD-nesterov", "RMSprop"])
def test_momentum_changed_between_steps_follows_torch_optim_in_float64(torch_class, values):
    worst = _worst_relative_difference(_trajectories(torch_class, values, torch.float64, schedule="momentum"))
    assert worst < 1e-10, f"relative difference {worst:.2e} over {TRAJECTORY_STEPS} steps"


def _torch_state_as_ours(reference, params, names, twin_state):
    """torch.optim's state for ``params`` in the layout of the twin's typed state: each field named after a
    torch state key (missing entries: zeros); per-learner counters (step, NAdam's mu_product) from any parameter
    that holds them (else the twin's own); SGD's ``has_buffer`` from whether torch holds a buffer."""
    per_param = {n: reference.state.get(p, {}) for n, p in zip(names, params, strict=True)}
    out = {}
    for field in twin_state._fields:
        value = getattr(twin_state, field)
        if isinstance(value, dict):
            out[field] = {n: per_param[n][field].detach().clone() if field in per_param[n] else torch.zeros_like(v)
                          for n, v in value.items()}
        elif field == "has_buffer" and isinstance(value, torch.Tensor):
            out[field] = torch.tensor(any("momentum_buffer" in s for s in per_param.values()))
        elif isinstance(value, torch.Tensor):
            held = [s[field] for s in per_param.values() if field in s]
            out[field] = value.new_tensor(float(held[0])) if held else value
    return twin_state._replace(**out)


def _one_ulp_up(tree):
    if isinstance(tree, dict):
        return {k: _one_ulp_up(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return type(tree)(*(_one_ulp_up(v) for v in tree)) if hasattr(tree, "_fields") else tuple(map(_one_ulp_up, tree))
    if tree is None:
        return None
    if tree.is_floating_point() and tree.dtype != torch.float64:  # float64 counters (step) stay exact
        return torch.nextafter(tree, torch.full_like(tree, float("inf")))
    return tree


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm().clamp_min(torch.finfo(theirs.dtype).tiny)).item()


def _one_step_difference(twin, reference, names, theirs, grads, hparams, perturbed: bool) -> float:
    """One step of both from torch.optim's current parameters and state, with the same gradients; the worst
    relative difference (in norm, per tensor) of the new parameters and the new optimizer state."""
    shared = {n: p.detach().clone() for n, p in zip(names, theirs, strict=True)}
    state = _torch_state_as_ours(reference, theirs, names, twin.init(shared))
    inputs = (grads, state, shared)
    if perturbed:
        inputs = tuple(_one_ulp_up(t) for t in inputs)
    ours, new_state = twin.update(*inputs, hparams)
    for n, p in zip(names, theirs, strict=True):
        p.grad = grads[n].clone()
    reference.step()
    expected = _torch_state_as_ours(reference, theirs, names, new_state)
    worst = 0.0
    for i, n in enumerate(names):
        worst = max(worst, _relative(ours[n], theirs[i].detach()))
    for field in new_state._fields:
        if isinstance(getattr(new_state, field), dict):
            for n, value in getattr(new_state, field).items():
                if getattr(expected, field)[n].any():
                    worst = max(worst, _relative(value, getattr(expected, field)[n]))
    return worst


def _step_by_step_worst(torch_class, values, perturbed: bool, schedule=None, lr_error: float = 0.0):
    """Worst difference of one step from a shared float32 state, over STEP_BY_STEP_STEPS steps along torch's
    trajectory (``lr_error``: a relative error given to the twin's learning rate, to show it is seen)."""
    model, loss_of, batch = _problem(torch.float32)
    names = [n for n, _ in model.named_parameters()]
    theirs = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    reference = _reference(torch_class, theirs, values)
    twin = functional_twin(torch_class, frozenset({schedule} - {None}), **values)
    hparams = twin.hparams(**values)
    hparams["lr"] = hparams["lr"] * (1 + lr_error)
    worst = 0.0
    for step in range(STEP_BY_STEP_STEPS):
        hparams = _scheduled(reference, hparams, resolve(torch_class, values), schedule, step)
        grads = grad(loss_of)({n: p.detach() for n, p in zip(names, theirs, strict=True)}, *batch(step))
        worst = max(worst, _one_step_difference(twin, reference, names, theirs, grads, hparams, perturbed))
    return worst


# Measured over these cases with torch's DEFAULT, AVX2 and AVX-512 CPU kernels (ATEN_CPU_CAPABILITY): at most
# 8e-8 (under one float32 epsilon) from a shared state, 3.4e-7 with the twin's inputs one ulp off; a learning rate
# off by 1e-4 gives 1e-6 to 1e-5, off by 1e-3 over 1e-5. (The whole 200-step float32 trajectory that this replaces
# differed by 9.6e-5 with AVX2 kernels.)
STEP_TOLERANCE = 1e-6
NOT_CONTINUOUS = {  # updates that a one-ulp move of the inputs can change by far more than an ulp
    torch.optim.Muon: "Muon orthogonalizes in bfloat16: an input one float32 ulp off can round to another bfloat16",
    Lion: "Lion's step is a sign: a zero gradient (a dead ReLU unit) one ulp up has sign 1, not 0",
}


@pytest.mark.parametrize("perturbed", [False, True], ids=["shared", "inputs_one_ulp_off"])
@pytest.mark.parametrize("torch_class,values", CASES, ids=_ids)
def test_float32_step_from_a_shared_state_matches_torch_optim_to_1e_6(torch_class, values, perturbed):
    if perturbed and torch_class in NOT_CONTINUOUS:
        pytest.skip(NOT_CONTINUOUS[torch_class])
    worst = _step_by_step_worst(torch_class, values, perturbed)
    assert worst < STEP_TOLERANCE, f"relative difference {worst:.2e}"


@pytest.mark.parametrize("perturbed", [False, True], ids=["shared", "inputs_one_ulp_off"])
@pytest.mark.parametrize("torch_class,values", SCHEDULED, ids=["SGD-dampening", "SGD-nesterov", "RMSprop"])
def test_float32_momentum_changed_between_steps_matches_step_by_step(torch_class, values, perturbed):
    worst = _step_by_step_worst(torch_class, values, perturbed, schedule="momentum")
    assert worst < STEP_TOLERANCE, f"relative difference {worst:.2e}"


@pytest.mark.parametrize("torch_class,values", [CASES[1], CASES[5]], ids=["SGD", "Adam"])
def test_a_learning_rate_off_by_a_thousandth_is_far_outside_the_float32_tolerance(torch_class, values):
    assert _step_by_step_worst(torch_class, values, False, lr_error=1e-3) > 5 * STEP_TOLERANCE


def test_the_optimizers_actually_train():
    """The comparisons above are only meaningful if the parameters move: they do, a lot."""
    first = last = None
    for step, ours, _ in _trajectories(torch.optim.Adam, dict(lr=1e-3), torch.float64, steps=200):
        if step == 0:
            first = {k: v.clone() for k, v in ours.items()}
        last = ours
    assert all((last[k] - first[k]).norm() > 0.1 * first[k].norm() for k in ["3.weight"])


def test_the_momentum_schedule_changes_the_trajectory():
    """With momentum switched off and on, the buffer's semantics matter: the trajectory differs from both
    constant settings."""
    torch_class, values = SCHEDULED[0]
    scheduled = list(_trajectories(torch_class, values, torch.float64, steps=40, schedule="momentum"))[-1][1]
    constant = list(_trajectories(torch_class, values, torch.float64, steps=40))[-1][1]
    assert (scheduled["3.weight"] - constant["3.weight"]).norm() > 1e-3 * constant["3.weight"].norm()


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match="no hyperparameter 'learning_rate'.*lr, momentum"):
        resolve(torch.optim.SGD, {"learning_rate": 0.1})


def test_invalid_value_is_refused_with_torchs_own_message():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        resolve(torch.optim.Adam, {"lr": -1.0})


@pytest.mark.parametrize("name,value", [("lr", float("nan")), ("lr", float("inf")), ("momentum", float("nan")),
                                        ("weight_decay", float("inf")), ("dampening", float("-inf"))])
def test_a_non_finite_hyperparameter_is_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number; got {value}"):
        resolve(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, name: value})


def test_unsupported_optimizer_is_refused():
    with pytest.raises(ValueError, match="No functional twin of 'ASGD'.*optimizers.Lion.*optim.Muon.*optim.RMSprop"):
        functional_twin(torch.optim.ASGD, lr=0.1)


@pytest.mark.parametrize("values", [dict(lr=1e-4), dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1)], ids=_ids)
def test_lion_follows_its_published_update_rule_in_float64_over_200_steps(values):
    """Chen et al. 2023, Algorithm 2: c = beta1 m + (1 - beta1) g; theta -= lr (sign(c) + wd theta);
    m = beta2 m + (1 - beta2) g; written out here with plain tensors."""
    lr, (beta1, beta2), wd = values["lr"], values.get("betas", (0.9, 0.99)), values.get("weight_decay", 0.0)
    model, loss_of, batch = _problem(torch.float64)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in theta.items()}
    worst = 0.0
    for step, ours, _ in _trajectories(Lion, values, torch.float64):
        g = grad(loss_of)(theta, *batch(step))
        for n in theta:
            c = beta1 * m[n] + (1 - beta1) * g[n]
            theta[n] = theta[n] - lr * (torch.sign(c) + wd * theta[n])
            m[n] = beta2 * m[n] + (1 - beta2) * g[n]
            worst = max(worst, _relative(ours[n], theta[n]))
    assert worst < 1e-10, f"relative difference {worst:.2e}"
    assert (theta["3.weight"] - model.state_dict()["3.weight"]).norm() > 1e-3 * theta["3.weight"].norm()


def test_muon_trains_matrices_with_muon_and_the_rest_with_adamw():
    twin = functional_twin(torch.optim.Muon, lr=0.02)
    state = twin.init({"w": torch.zeros(3, 4), "b": torch.zeros(3)})
    assert (sorted(state.momentum_buffer), sorted(state.exp_avg)) == (["w"], ["b"])
    opt = MuonWithAdamW([torch.nn.Parameter(torch.zeros(3, 4))], [torch.nn.Parameter(torch.zeros(3))], lr=0.02)
    assert [type(o).__name__ for o in (opt.muon, opt.adamw)] == ["Muon", "AdamW"] and opt.param_groups[1]["lr"] == 3e-4


def test_adafactor_eps1_none_is_the_dtype_epsilon_and_enters_ids_as_none():
    from serimats_func.optimizers import canonical
    resolved = resolve(torch.optim.Adafactor, {"lr": 0.01})
    assert resolved["eps"] == (None, 1e-3) and canonical(torch.optim.Adafactor, resolved)["eps"] == [None, 1e-3]
    assert torch.isnan(functional_twin(torch.optim.Adafactor, lr=0.01).hparams(lr=0.01)["eps1"])
