"""Each functional optimizer against its torch.optim twin, step for step, on a real model."""

import pytest
import torch
from torch.func import functional_call, grad

from serimats_func.models import MLP
from serimats_func.optimizers import functional_twin, resolve

STEPS = 200

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
]


def _trajectories(torch_class, values, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 40, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (256,), generator=gen)
    torch.manual_seed(0)
    model = MLP(widths=(32, 32), in_features=40).to(dtype)

    def loss_of(params, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb)

    theirs = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    reference = torch_class(list(theirs.values()), foreach=False, **values)
    twin = functional_twin(torch_class, **values)
    ours = {n: p.detach().clone() for n, p in model.named_parameters()}
    state, hparams = twin.init(ours), twin.hparams(**values)
    for step in range(STEPS):
        batch = torch.arange(step * 32, step * 32 + 32) % 256
        reference.zero_grad()
        loss_of(theirs, x[batch], y[batch]).backward()
        reference.step()
        ours, state = twin.update(grad(loss_of)(ours, x[batch], y[batch]), state, ours, hparams)
        yield step, ours, theirs


@pytest.mark.parametrize("torch_class,values", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_functional_optimizer_matches_torch_optim_every_step(torch_class, values, dtype, tolerance):
    worst = 0.0
    for _, ours, theirs in _trajectories(torch_class, values, dtype):
        for name, p in theirs.items():
            err = (ours[name] - p.detach()).norm() / p.detach().norm()
            worst = max(worst, err.item())
    assert worst < tolerance, f"relative difference {worst:.2e} over {STEPS} steps"


def test_the_optimizers_actually_train():
    """The comparison above is only meaningful if the parameters move: they do, a lot."""
    first = last = None
    for step, ours, _ in _trajectories(torch.optim.Adam, dict(lr=1e-3), torch.float64):
        if step == 0:
            first = {k: v.clone() for k, v in ours.items()}
        last = ours
    assert all((last[k] - first[k]).norm() > 0.1 * first[k].norm() for k in ["3.weight"])


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match="no hyperparameter 'learning_rate'.*lr, momentum"):
        resolve(torch.optim.SGD, {"learning_rate": 0.1})


def test_invalid_value_is_refused_with_torchs_own_message():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        resolve(torch.optim.Adam, {"lr": -1.0})


def test_unsupported_optimizer_is_refused():
    with pytest.raises(ValueError, match="No functional twin of 'RMSprop'"):
        functional_twin(torch.optim.RMSprop, lr=0.1)
