"""A stored result is reused only when its numbers would be the same: end to end, through an Experiment's
learner ids and the plan of a second Experiment on the same store.

Every case has two sides: a change that changes a learner's numbers gives new ids (nothing is reused), and
the same setup built again (another object, another file, another process) gives the same ids.
"""

import copy
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serimats_func.core.learners import initial_model_state
from serimats_func.interventions import InitWeights, Optimizer
from serimats_func.models import MLP
from tests.test_identity import ROOT, load

GRID = [InitWeights.make_variations(seed=range(2))]


@pytest.fixture
def ids(experiment):
    """``ids(model=..., loss=..., ...)``: the learner ids of the tests' experiment with these settings."""

    def ids(**settings):
        return [s.id for s in experiment(GRID, **settings).grid.learners]

    return ids


@pytest.fixture
def reused(experiment, tmp_path):
    """``reused(first, second)``: train an experiment with settings ``first`` (2 steps) into a store, then
    build one with settings ``second`` on that store: how many of its learners are already there."""

    def reused(first: dict, second: dict) -> int:
        store = tmp_path / f"shared{len(list(tmp_path.glob('shared*')))}.zarr"
        experiment(GRID, store=store, steps=2, **first).run()
        plan = experiment(GRID, store=store, steps=2, **second).plan()
        assert plan.in_store + plan.to_train == 2
        return plan.in_store

    return reused


# --- Buffers --------------------------------------------------------------------------------------------


class Normalized(nn.Module):
    """A constant input-normalisation buffer in front of an MLP."""

    def __init__(self, mean: float, persistent: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.full((40,), mean), persistent=persistent)
        self.body = MLP(widths=(16,))

    def forward(self, x):
        return self.body(x - self.mean)


def test_a_normalisation_buffer_differing_in_the_last_float32_bit_is_not_reused(reused):
    assert torch.tensor(0.1307).item() != torch.tensor(0.13070003).item()
    assert reused({"model": Normalized(0.1307)}, {"model": Normalized(0.13070003)}) == 0
    assert reused({"model": Normalized(0.1307)}, {"model": Normalized(0.1307)}) == 2


@pytest.mark.parametrize("persistent", [True, False])
def test_buffers_persistent_or_not_name_learners_by_value(ids, persistent):
    assert ids(model=Normalized(0.5, persistent)) != ids(model=Normalized(0.5000001, persistent))
    assert ids(model=Normalized(0.5, persistent)) == ids(model=Normalized(0.5, persistent))


class Scaled(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.1, dtype=dtype))
        self.body = MLP(widths=(16,))

    def forward(self, x):
        return self.body(x) * self.scale


def test_a_buffer_is_named_by_the_values_learners_see_in_the_experiments_dtype(ids):
    """Buffers are converted to the experiment's dtype (float32): 0.1 in float64 is float32's 0.1 then,
    0.1 in float16 is not."""
    assert ids(model=Scaled(torch.float64)) == ids(model=Scaled(torch.float32))
    assert ids(model=Scaled(torch.float16)) != ids(model=Scaled(torch.float32))


def weighted(first: float, **kw):
    return nn.CrossEntropyLoss(weight=torch.tensor([first] + [1.0] * 9), **kw)


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_cross_entropy_class_weights_differing_past_the_fourth_digit_are_not_reused(ids, reused, delta):
    assert ids(loss=weighted(1.00001)) != ids(loss=weighted(1.00001 + delta))
    assert ids(loss=weighted(1.00001)) == ids(loss=weighted(1.00001))
    if delta == 1e-5:
        assert reused({"loss": weighted(1.00001)}, {"loss": weighted(1.00002)}) == 0


def test_batchnorm_statistics_that_every_learner_resets_do_not_rename_it(ids):
    """BatchNorm's reset_parameters resets its running statistics, so each learner starts from zeros and
    ones whatever the template holds: a template that saw data first names the same learners."""

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(40, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    fresh, used = model(), model()
    used.train()
    used(torch.randn(64, 40) * 5 + 3)  # running statistics move
    assert not torch.equal(fresh[1].running_mean, used[1].running_mean)
    assert ids(model=fresh) == ids(model=used)


# --- Module attributes ------------------------------------------------------------------------------------


class WithActivation(nn.Module):
    def __init__(self, act, gain=None):
        super().__init__()
        self.fc = nn.Linear(40, 10)
        self.act = act
        self.gain = gain if gain is not None else torch.ones(10)  # a tensor attribute, not a buffer

    def forward(self, x):
        return self.act(self.fc(x)) * self.gain


@pytest.mark.parametrize("a, b", [
    (F.relu, torch.tanh),
    (torch.sigmoid, torch.tanh),
    (functools.partial(F.leaky_relu, negative_slope=0.1), functools.partial(F.leaky_relu, negative_slope=0.2)),
    (nn.ReLU(), nn.GELU()),
    (nn.GELU(), nn.GELU(approximate="tanh")),
], ids=["function", "torch builtin", "partial", "module", "module setting"])
def test_a_function_held_by_a_module_names_its_learners(ids, a, b):
    assert ids(model=WithActivation(a)) != ids(model=WithActivation(b))
    assert ids(model=WithActivation(a)) == ids(model=WithActivation(a))


def test_a_tensor_attribute_differing_in_one_element_names_other_learners(ids):
    gain = torch.ones(10)
    other = gain.clone()
    other[3] = torch.nextafter(other[3], torch.tensor(2.0))
    assert ids(model=WithActivation(F.relu, gain)) != ids(model=WithActivation(F.relu, other))
    assert ids(model=WithActivation(F.relu, gain)) == ids(model=WithActivation(F.relu, gain.clone()))


def test_a_lambda_attribute_names_learners_by_its_code(ids):
    a, b = (lambda t: t.clamp(-1, 1)), (lambda t: t.clamp(-2, 2))
    assert ids(model=WithActivation(a)) != ids(model=WithActivation(b))


# --- Code: helper methods, globals, reset_parameters, losses ------------------------------------------------

NET = """
import torch
from torch import nn
{imports}

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        return self.helper(self.fc(x))

    def helper(self, x):
        return {helper}
{extra}
"""


def net(tmp_path, helper="x", extra="", imports=""):
    return load(tmp_path, NET.format(helper=helper, extra=extra, imports=imports))


RESET = """
    def reset_parameters(self):
        nn.init.normal_(self.fc.weight, std={std})
        nn.init.zeros_(self.fc.bias)
"""

CODE_EDITS = {
    "helper method": (dict(helper="torch.relu(x)"), dict(helper="torch.tanh(x)")),
    "constant in a helper method": (dict(helper="x * 0.5"), dict(helper="x * 0.50001")),
    "module-level helper": (dict(helper="squash(x)", extra="def squash(x):\n    return x.clamp(-1, 1)\n"),
                            dict(helper="squash(x)", extra="def squash(x):\n    return x.clamp(-2, 2)\n")),
    "helper of a helper": (
        dict(helper="outer(x)", extra="def outer(x):\n    return inner(x) + 1\n\ndef inner(x):\n    return x * 2\n"),
        dict(helper="outer(x)", extra="def outer(x):\n    return inner(x) + 1\n\ndef inner(x):\n    return x * 3\n")),
    "global number": (dict(helper="x * SCALE", extra="SCALE = 2.0\n"), dict(helper="x * SCALE", extra="SCALE = 2.0000001\n")),
    "global tensor": (dict(helper="x - MEAN", extra="MEAN = torch.tensor([0.1307])\n"),
                      dict(helper="x - MEAN", extra="MEAN = torch.tensor([0.13070003])\n")),
    "global dict": (dict(helper="x * CONFIG['scale']", extra="CONFIG = {'scale': 2.0}\n"),
                    dict(helper="x * CONFIG['scale']", extra="CONFIG = {'scale': 3.0}\n")),
    "edited reset_parameters": (dict(extra=RESET.format(std=0.01)), dict(extra=RESET.format(std=0.02))),
    "class attribute": (dict(helper="x * self.k", extra="    k = 2\n"), dict(helper="x * self.k", extra="    k = 3\n")),
}


@pytest.mark.parametrize("kind", list(CODE_EDITS))
def test_editing_code_the_model_runs_names_new_learners(ids, tmp_path, kind):
    before, after = CODE_EDITS[kind]
    first, second, again = net(tmp_path, **before), net(tmp_path, **after), net(tmp_path, **before)
    assert ids(model=first.Net()) != ids(model=second.Net())
    assert ids(model=first.Net()) == ids(model=again.Net())  # the same code in another file


def test_an_edited_reset_parameters_is_not_reused(reused, tmp_path):
    before, after = CODE_EDITS["edited reset_parameters"]
    assert reused({"model": net(tmp_path, **before).Net()}, {"model": net(tmp_path, **after).Net()}) == 0


def test_a_global_changed_at_run_time_names_new_learners(ids, tmp_path, monkeypatch):
    module = net(tmp_path, helper="x * SCALE", extra="SCALE = 2.0\n")
    before = ids(model=module.Net())
    monkeypatch.setattr(module, "SCALE", 4.0)
    assert ids(model=module.Net()) != before
    monkeypatch.setattr(module, "SCALE", 2.0)
    assert ids(model=module.Net()) == before


def test_a_global_in_another_module_read_by_forward_names_new_learners(ids, tmp_path, monkeypatch):
    config = load(tmp_path, "SCALE = 2.0\nUNUSED = 1\n", prefix="config")
    module = net(tmp_path, helper=f"x * {config.__name__}.SCALE", imports=f"import {config.__name__}")
    before = ids(model=module.Net())
    monkeypatch.setattr(config, "UNUSED", 5)  # not read by the model
    assert ids(model=module.Net()) == before
    monkeypatch.setattr(config, "SCALE", 2.0000001)
    assert ids(model=module.Net()) != before


LOSSES = """
import torch
import torch.nn.functional as F
{imports}

SMOOTHING = {smoothing}

def loss(logits, y):
    return F.cross_entropy(logits, y, label_smoothing=SMOOTHING) * {factor}

class Loss:
    def __init__(self, power=1.0):
        self.power = power

    def __call__(self, logits, y):
        return F.cross_entropy(logits, y) ** {power}
"""


def losses(tmp_path, smoothing="0.1", factor="1.0", power="self.power", imports=""):
    return load(tmp_path, LOSSES.format(smoothing=smoothing, factor=factor, power=power, imports=imports))


def test_a_global_read_by_the_loss_names_new_learners(ids, tmp_path):
    a, b = losses(tmp_path, smoothing="0.1"), losses(tmp_path, smoothing="0.10001")
    assert ids(loss=a.loss) != ids(loss=b.loss)
    assert ids(loss=a.loss) == ids(loss=losses(tmp_path, smoothing="0.1").loss)


def test_a_global_in_another_module_read_by_the_loss_names_new_learners(ids, tmp_path, monkeypatch):
    config = load(tmp_path, "FACTOR = 1.0\n", prefix="config")
    module = losses(tmp_path, factor=f"{config.__name__}.FACTOR", imports=f"import {config.__name__}")
    before = ids(loss=module.loss)
    monkeypatch.setattr(config, "FACTOR", 1.001)
    assert ids(loss=module.loss) != before


def test_the_call_method_of_a_loss_object_names_its_learners(ids, reused, tmp_path):
    plain, squared = losses(tmp_path, power="self.power"), losses(tmp_path, power="(self.power * 2)")
    assert ids(loss=plain.Loss()) != ids(loss=squared.Loss())  # edited __call__
    assert ids(loss=plain.Loss(1.0)) != ids(loss=plain.Loss(1.5))  # its attributes
    assert ids(loss=plain.Loss()) == ids(loss=losses(tmp_path).Loss())
    assert reused({"loss": plain.Loss()}, {"loss": squared.Loss()}) == 0


class ModuleLoss(nn.Module):
    def __init__(self, temperature):
        super().__init__()
        self.temperature = temperature

    def forward(self, logits, y):
        return F.cross_entropy(logits / self.temperature, y)


def test_a_loss_written_as_a_module_names_learners_by_its_settings(ids):
    assert ids(loss=ModuleLoss(1.0)) != ids(loss=ModuleLoss(1.01))
    assert ids(loss=ModuleLoss(1.0)) == ids(loss=ModuleLoss(1.0))


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_tensors_in_a_partial_loss_differing_past_their_printed_digits_are_not_reused(ids, reused, delta):
    def partial(first, **kw):
        return functools.partial(F.cross_entropy, weight=torch.tensor([first] + [1.0] * 9), **kw)

    assert repr(torch.tensor(1.00001)) == repr(torch.tensor(1.00001 + delta))  # what a repr-based id would see
    assert ids(loss=partial(1.00001)) != ids(loss=partial(1.00001 + delta))
    assert ids(loss=partial(1.00001)) == ids(loss=partial(1.00001))
    assert ids(loss=partial(1.0, label_smoothing=0.1)) != ids(loss=partial(1.0, label_smoothing=0.2))
    if delta == 1e-5:
        assert reused({"loss": partial(1.00001)}, {"loss": partial(1.00002)}) == 0


# --- Parameters every learner must draw from its key ---------------------------------------------------------


class ExtraParameter(nn.Linear):
    """nn.Linear's reset_parameters resets weight and bias, not this."""

    def __init__(self):
        super().__init__(40, 10)
        self.temperature = nn.Parameter(torch.rand(()))

    def forward(self, x):
        return super().forward(x) / (1 + self.temperature)


class HalfReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(40, 10)
        self.scale = nn.Parameter(torch.rand(10))

    def reset_parameters(self):
        with torch.no_grad():
            self.scale[:5] = 1.0  # the other half keeps the global RNG's draw

    def forward(self, x):
        return self.fc(x) * self.scale


class NumpyInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(40, 10)
        self.offset = nn.Parameter(torch.zeros(10))

    def reset_parameters(self):
        with torch.no_grad():
            self.offset.copy_(torch.from_numpy(np.random.randn(10)))

    def forward(self, x):
        return self.fc(x) + self.offset


@pytest.mark.parametrize("model, message", [
    (ExtraParameter, "Parameter temperature belongs to ExtraParameter, and no reset_parameters.. sets it.*"
                     r"nn.init.normal_\(self.temperature\)"),
    (HalfReset, "Parameter scale belongs to HalfReset, and no reset_parameters.. sets all of it"),
    (NumpyInit, "reset_parameters.. of NumpyInit gives offset other values each time for the same key.*NumPy"),
], ids=["subclass of a torch layer", "partly reset", "numpy RNG"])
def test_a_parameter_not_drawn_from_the_learners_key_is_refused(experiment, store, model, message):
    with pytest.raises(ValueError, match=message):
        experiment(GRID, model=model(), store=store)
    assert not store.exists()


# --- Data ----------------------------------------------------------------------------------------------------


def test_data_edited_in_place_after_the_experiment_is_built_changes_nothing(experiment, small_mnist1d, tmp_path):
    train, test = small_mnist1d
    x, y = (t.clone() for t in train.tensors)
    original_ids = [s.id for s in experiment(GRID, data=((x.clone(), y.clone()), test)).grid.learners]
    reference = experiment(GRID, data=((x.clone(), y.clone()), test), steps=4).run()

    exp = experiment(GRID, data=((x, y), test), steps=4)
    x.mul_(2.0)  # the user's tensors change after the Experiment is built...
    y.fill_(3)
    assert [s.id for s in exp.grid.learners] == original_ids
    ds = exp.run()  # ...and it trains on the data as it was
    for metric in ("train_loss", "train_acc", "test_loss"):
        np.testing.assert_array_equal(ds[metric].values, reference[metric].values)
    assert [s.id for s in experiment(GRID, data=((x, y), test)).grid.learners] != original_ids


def test_a_dataset_of_other_values_is_not_reused_but_the_same_values_are(reused, small_mnist1d):
    train, test = small_mnist1d
    x, y = train.tensors
    nudged = x.clone()
    nudged[7, 3] = torch.nextafter(nudged[7, 3], torch.tensor(100.0))
    assert reused({"data": ((x, y), test)}, {"data": ((nudged, y), test)}) == 0
    assert reused({"data": ((x, y), test)}, {"data": ((x.clone(), y.clone().int()), test)}) == 2


# --- Whole-set metrics whatever the evaluation batch size -------------------------------------------------


@pytest.mark.parametrize("loss", [weighted(3.0), weighted(3.0, reduction="sum"), weighted(2.0, label_smoothing=0.2)],
                         ids=["weighted mean", "weighted sum", "weighted and smoothed"])
def test_whole_set_losses_are_exact_whatever_the_evaluation_batch_size(experiment, small_mnist1d, loss):
    """With batches of 7, a mean of batch means would be off (1.19567 against 1.20467 in the issue's case)."""
    train, test = small_mnist1d
    by_seven = experiment(GRID, loss=loss, eval_batch_size=7, steps=3)
    by_seven_ds, whole = by_seven.run(), experiment(GRID, loss=loss, eval_batch_size=1000, steps=3).run()
    for name in ("train_loss", "test_loss"):
        np.testing.assert_allclose(by_seven_ds[name].values, whole[name].values, rtol=1e-6)
    # at step 0, the loss of each learner's initial weights on the whole set, computed here by hand
    template = copy.deepcopy(by_seven.template).eval()
    for spec in by_seven.grid.learners:
        state = initial_model_state(template, spec.init_key, spec.dropout_key)
        with torch.no_grad():
            for name, (x, y) in {"train": train.tensors, "test": test.tensors}.items():
                logits = torch.func.functional_call(template, (state.params, state.buffers), (x,))
                expected = float(loss(logits, y))
                recorded = float(by_seven_ds[f"{name}_loss"].sel(seed=spec.coords["seed"], step=0))
                assert recorded == pytest.approx(expected, rel=1e-6)
                if loss.reduction == "sum":
                    assert recorded > len(y)  # a sum over the whole set (about 2.3 per example), not over one batch


def test_the_evaluation_batch_size_is_not_part_of_a_learners_identity(reused):
    assert reused({"eval_batch_size": 100}, {"eval_batch_size": 256}) == 2


# --- plan() changes nothing --------------------------------------------------------------------------------


class Counting(nn.Module):
    """Counts its training-mode calls in a Python attribute, as a custom module might, and keeps BatchNorm's running
    statistics in buffers (a buffer that forward itself changes is refused: tests/test_bad_input.py)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(40, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
        self.seen = 0

    def forward(self, x):
        if self.training:
            self.seen += 1
        return self.body(x)


def test_building_and_planning_have_no_side_effect_on_the_model_the_template_or_the_global_rng(experiment):
    model = Counting()
    user_state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    exp = experiment(GRID, model=model)  # prepares the template, probes it, runs a trial step
    assert torch.equal(torch.get_rng_state(), rng)
    template_state = {k: v.clone() for k, v in exp.template.state_dict().items()}
    template_seen = exp.template.seen
    ids = [s.id for s in exp.grid.learners]
    first = exp.plan()
    second = exp.plan()
    assert torch.equal(torch.get_rng_state(), rng)
    for before, now in ((user_state, model.state_dict()), (template_state, exp.template.state_dict())):
        assert before.keys() == now.keys() and all(torch.equal(before[k], now[k]) for k in before)
    assert model.seen == 0 and exp.template.seen == template_seen and exp.template.training == model.training
    assert (first.in_store, first.to_train) == (second.in_store, second.to_train) == (0, 2)
    assert [s.id for s in experiment(GRID, model=model).grid.learners] == ids


def test_building_and_running_an_experiment_leaves_the_users_model_and_the_global_rng_as_they_were(experiment):
    model = Counting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    exp = experiment(GRID, model=model, steps=3)
    ids = [s.id for s in exp.grid.learners]
    exp.run()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.seen == 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert exp.plan().in_store == 2 and [s.id for s in exp.grid.learners] == ids  # its template's counter moved


# --- What changes no number changes no id ----------------------------------------------------------------------


def test_in_place_activations_name_the_same_learners(ids, reused):
    def model(inplace):
        return nn.Sequential(nn.Linear(40, 16), nn.ReLU(inplace=inplace), nn.Dropout(0.1, inplace=inplace),
                             nn.Linear(16, 16), nn.LeakyReLU(0.1, inplace=inplace), nn.Linear(16, 10))

    assert ids(model=model(True)) == ids(model=model(False))
    assert reused({"model": model(False)}, {"model": model(True)}) == 2


def test_dampening_with_momentum_zero_and_defaults_spelled_out_name_the_same_learners(ids):
    plain = Optimizer(torch.optim.SGD, lr=0.1)
    assert ids(optimizer=Optimizer(torch.optim.SGD, lr=0.1, dampening=0.5)) == ids(optimizer=plain)
    assert ids(optimizer=Optimizer(torch.optim.SGD, lr=0.1, weight_decay=0, nesterov=False)) == ids(optimizer=plain)
    # dampening counts once momentum is on
    assert ids(optimizer=Optimizer(torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.5)) != \
        ids(optimizer=Optimizer(torch.optim.SGD, lr=0.1, momentum=0.9))


def test_the_templates_weights_mode_and_the_global_seed_name_the_same_learners(ids):
    def model():
        return nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))

    torch.manual_seed(1)
    a = model()
    torch.manual_seed(2)
    b = model().eval()
    assert not torch.equal(a[0].weight, b[0].weight)
    assert ids(model=a) == ids(model=b)


def test_comments_docstrings_and_line_numbers_name_the_same_learners(ids, tmp_path):
    plain = net(tmp_path, helper="torch.relu(x) * SCALE", extra="SCALE = 2.0\n")
    source = NET.format(helper="torch.relu(x) * SCALE  # a comment", extra="SCALE = 2.0\n", imports="")
    documented = load(tmp_path, '"""A docstring."""\n\n\n# moved down\n' + source.replace(
        "    def forward(self, x):\n", '    def forward(self, x: torch.Tensor) -> torch.Tensor:\n        """Docs."""\n'))
    assert ids(model=plain.Net()) == ids(model=documented.Net())


# --- Every process, any PYTHONHASHSEED -----------------------------------------------------------------------

SCRIPT = '''
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

from serimats_func.interventions import InitWeights, Optimizer, PerturbWeights
from tests.builders import make_experiment

KINDS = {"relu", "tanh", "gelu", "silu", "elu", "selu"}


class Net(nn.Module):
    names = frozenset({"alpha", "beta", "gamma", "delta"})

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(40, 10)
        self.tags = {"weight", "bias", "scale", "shift"}

    def forward(self, x):
        scale = 2.0 if "relu" in {"relu", "tanh", "gelu"} else 1.0
        return self.fc(x) * scale * len(KINDS & {"relu", "gelu"})


def loss(logits, y):
    smoothing = 0.1 if "mean" in {"mean", "sum", "none"} else 0.0
    return F.cross_entropy(logits, y, label_smoothing=smoothing)


def experiment(store):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 40, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    return make_experiment([InitWeights.make_variations(seed=range(2)),
                            PerturbWeights.make_variations(epsilon=(0.0, 0.01), seed=1),
                            Optimizer.make_variations(lr=(0.1, 0.01))],
                           model=Net(), data=((x, y), None), loss=loss, steps=2, batch_size=16, store=store)


if __name__ == "__main__":
    print(list({"alpha", "beta", "gamma", "delta", "epsilon", "zeta"}))  # shows what the hash seed does to sets
    print(json.dumps([s.id for s in experiment(sys.argv[1]).grid.learners]))
'''


def test_ids_are_the_same_in_every_process_and_under_any_hash_seed(tmp_path):
    name = f"idscript_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(SCRIPT)
    seeds = ("0", "1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.Popen([sys.executable, str(tmp_path / f"{name}.py"), str(tmp_path / "s.zarr")], cwd=tmp_path,
                             env={**env, "PYTHONHASHSEED": seed}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for seed in seeds]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        outputs.append(out.splitlines())
    assert len({lines[0] for lines in outputs}) > 1  # the hash seeds do reorder sets
    ids = [json.loads(lines[1]) for lines in outputs]
    assert len(set(ids[0])) == 8
    assert ids[0] == ids[1]
    here = load(tmp_path, SCRIPT, prefix="idscript")  # and in this process, imported under another name
    assert [s.id for s in here.experiment(tmp_path / "here.zarr").grid.learners] == ids[0]
