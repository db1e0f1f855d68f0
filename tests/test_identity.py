"""Descriptions decide learner ids: whatever can change a learner's numbers changes them, and
nothing else does (comments, line numbers, hash seeds, object ids, ``inplace`` flags)."""

import functools
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serimats_func.interventions import Intervention
from serimats_func.models import MLP
from serimats_func.run.identity import describe_callable, describe_class, describe_module, digest

ROOT = Path(__file__).resolve().parents[1]
_counter = itertools.count()


def load(tmp_path: Path, source: str, prefix: str = "idmod"):
    """Import ``source`` as a fresh module from a file in ``tmp_path`` (so inspect finds its source)."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def same(a, b) -> bool:
    """Whether two descriptions are equal, checking on the way that both are canonical JSON."""
    for d in (a, b):
        assert json.loads(json.dumps(d, sort_keys=True)) == d
    return digest(a) == digest(b)


# --- Edited code: two versions of a module, described by what they build ---------------------------

NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.helper(self.fc(x))

    def helper(self, x):
        return {helper}
"""

EDITS = {
    "helper method": (NET.format(helper="torch.relu(x)"), NET.format(helper="torch.tanh(x)")),
    "helper method constant": (NET.format(helper="x * 0.5"), NET.format(helper="x * 0.50001")),
    "module-level helper function": (
        NET.format(helper="squash(x)") + "\ndef squash(x):\n    return x.clamp(-1, 1)\n",
        NET.format(helper="squash(x)") + "\ndef squash(x):\n    return x.clamp(-2, 2)\n",
    ),
    "helper of a helper function": (
        NET.format(helper="outer(x)") + "\ndef outer(x):\n    return inner(x) + 1\n\ndef inner(x):\n    return x * 2\n",
        NET.format(helper="outer(x)") + "\ndef outer(x):\n    return inner(x) + 1\n\ndef inner(x):\n    return x * 3\n",
    ),
    "global number": (
        NET.format(helper="x * SCALE") + "\nSCALE = 2.0\n",
        NET.format(helper="x * SCALE") + "\nSCALE = 2.0000001\n",
    ),
    "global tensor": (
        NET.format(helper="x - MEAN") + "\nMEAN = torch.tensor([0.1307])\n",
        NET.format(helper="x - MEAN") + "\nMEAN = torch.tensor([0.13070003])\n",
    ),
    "global numpy array": (
        NET.format(helper="x * float(W.sum())") + "\nimport numpy as np\nW = np.array([1.0, 2.0])\n",
        NET.format(helper="x * float(W.sum())") + "\nimport numpy as np\nW = np.array([1.0, 2.0 + 1e-12])\n",
    ),
    "global torch function": (
        NET.format(helper="ACT(x)") + "\nACT = torch.relu\n",
        NET.format(helper="ACT(x)") + "\nACT = torch.sigmoid\n",
    ),
    "set literal": (
        NET.format(helper="x if 'a' in {'a', 'b'} else -x"),
        NET.format(helper="x if 'a' in {'c', 'b'} else -x"),
    ),
    "reset_parameters": (
        NET + "\n    def reset_parameters(self):\n        nn.init.zeros_(self.fc.weight)\n",
        NET + "\n    def reset_parameters(self):\n        nn.init.ones_(self.fc.weight)\n",
    ),
    "class attribute": (
        NET.format(helper="x * self.scale") + "\n    scale = 2\n",
        NET.format(helper="x * self.scale") + "\n    scale = 3\n",
    ),
    "class attribute tensor": (
        NET.format(helper="x * self.w") + "\n    w = torch.tensor([1.0, 2.0, 3.0])\n",
        NET.format(helper="x * self.w") + "\n    w = torch.tensor([1.0, 2.0, 3.0000002])\n",
    ),
    "property": (
        NET.format(helper="x * self.scale") + "\n    @property\n    def scale(self):\n        return 2\n",
        NET.format(helper="x * self.scale") + "\n    @property\n    def scale(self):\n        return 3\n",
    ),
    "staticmethod": (
        NET.format(helper="self.f(x)") + "\n    @staticmethod\n    def f(x):\n        return x + 1\n",
        NET.format(helper="self.f(x)") + "\n    @staticmethod\n    def f(x):\n        return x - 1\n",
    ),
    "default argument": (
        NET.format(helper="self.f(x)") + "\n    def f(self, x, k=2):\n        return x * k\n",
        NET.format(helper="self.f(x)") + "\n    def f(self, x, k=3):\n        return x * k\n",
    ),
    "keyword-only default": (
        NET.format(helper="self.f(x)") + "\n    def f(self, x, *, k=2):\n        return x * k\n",
        NET.format(helper="self.f(x)") + "\n    def f(self, x, *, k=3):\n        return x * k\n",
    ),
    "decorated helper": (
        NET.format(helper="self.f(x)") + "\n    @torch.no_grad()\n    def f(self, x):\n        return x + 1\n",
        NET.format(helper="self.f(x)") + "\n    @torch.no_grad()\n    def f(self, x):\n        return x + 2\n",
    ),
    "__init__": (NET.format(helper="x"), NET.format(helper="x").replace("nn.Linear(4, 3)", "nn.Linear(4, 3, bias=False)")),
    "user base class": (
        "from torch import nn\nclass Base(nn.Module):\n    def forward(self, x):\n        return x + 1\n"
        "class Net(Base):\n    pass\n",
        "from torch import nn\nclass Base(nn.Module):\n    def forward(self, x):\n        return x + 2\n"
        "class Net(Base):\n    pass\n",
    ),
}


@pytest.mark.parametrize("kind", list(EDITS))
def test_editing_code_that_a_module_runs_changes_its_description(tmp_path, kind):
    before, after = (load(tmp_path, source).Net() for source in EDITS[kind])
    assert not same(describe_module(before), describe_module(after))


@pytest.mark.parametrize("kind", list(EDITS))
def test_the_same_code_in_two_files_describes_the_same(tmp_path, kind):
    first, second = (load(tmp_path, EDITS[kind][0]).Net() for _ in range(2))
    assert same(describe_module(first), describe_module(second))


NOOP = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.fc(x)) * SCALE
SCALE = 2.0
"""

NOOP_EDITED = '''
# a comment, and blank lines that move every line number


import torch
from torch import nn

class Net(nn.Module):
    """A docstring that was not there before."""

    def __init__(self) -> None:  # annotations and comments
        super().__init__()

        self.fc = nn.Linear(4,
                            3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Docstring."""
        # a comment
        return torch.relu(self.fc(x)) * SCALE  # another comment



SCALE = 2.0
'''


def test_comments_docstrings_annotations_and_line_numbers_do_not_change_the_description(tmp_path):
    before, after = load(tmp_path, NOOP).Net(), load(tmp_path, NOOP_EDITED).Net()
    assert same(describe_module(before), describe_module(after))


def test_a_function_with_a_new_comment_and_docstring_describes_the_same(tmp_path):
    a = load(tmp_path, "def loss(a, b):\n    return (a - b).pow(2).mean()\n").loss
    documented = '\n\ndef loss(a, b):\n    """Mean squared error."""\n    # squared\n    return (a - b).pow(2).mean()\n'
    b = load(tmp_path, documented).loss
    c = load(tmp_path, "def loss(a, b):\n    return (a - b).abs().mean()\n").loss
    assert same(describe_callable(a), describe_callable(b))
    assert not same(describe_callable(a), describe_callable(c))


# --- Values ---------------------------------------------------------------------------------------


class Normalized(nn.Module):
    def __init__(self, mean: float, persistent: bool = True):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("mean", torch.full((3,), mean), persistent=persistent)

    def forward(self, x):
        return self.fc(x - self.mean)


@pytest.mark.parametrize("persistent", [True, False])
def test_buffer_values_change_the_description_at_full_precision(persistent):
    a, b = Normalized(0.1307, persistent), Normalized(0.13070003, persistent)
    assert a.mean[0].item() != b.mean[0].item()  # float32 neighbours that repr(tensor) would print alike
    assert not same(describe_module(a), describe_module(b))
    assert same(describe_module(a), describe_module(Normalized(0.1307, persistent)))


def test_a_buffer_of_another_dtype_changes_the_description():
    a, b = Normalized(0.5), Normalized(0.5)
    b.mean = b.mean.double()
    assert not same(describe_module(a), describe_module(b))


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_cross_entropy_weights_differing_in_the_fifth_digit_describe_differently(delta):
    a = nn.CrossEntropyLoss(weight=torch.tensor([1.00001, 1.0, 1.0]))
    b = nn.CrossEntropyLoss(weight=torch.tensor([1.00001 + delta, 1.0, 1.0]))
    assert not same(describe_callable(a), describe_callable(b))
    assert same(describe_callable(a), describe_callable(nn.CrossEntropyLoss(weight=torch.tensor([1.00001, 1.0, 1.0]))))


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_partials_with_tensors_differing_in_the_fifth_digit_describe_differently(delta):
    a = functools.partial(F.cross_entropy, weight=torch.tensor([1.00001, 1.0]))
    b = functools.partial(F.cross_entropy, weight=torch.tensor([1.00001 + delta, 1.0]))
    c = functools.partial(F.cross_entropy, torch.tensor([1.00001 + delta, 1.0]))  # positional
    assert not same(describe_callable(a), describe_callable(b))
    assert not same(describe_callable(b), describe_callable(c))
    assert same(describe_callable(a), describe_callable(functools.partial(F.cross_entropy, weight=torch.tensor([1.00001, 1.0]))))


def test_partials_of_different_functions_or_keywords_describe_differently():
    descriptions = [
        describe_callable(functools.partial(F.cross_entropy, label_smoothing=0.1)),
        describe_callable(functools.partial(F.cross_entropy, label_smoothing=0.2)),
        describe_callable(functools.partial(F.nll_loss, label_smoothing=0.1)),
        describe_callable(functools.partial(F.cross_entropy, reduction="sum")),
        describe_callable(F.cross_entropy),
    ]
    assert len({digest(d) for d in descriptions}) == len(descriptions)


class WithAttribute(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x


ATTRIBUTES = [
    ("function", F.relu, torch.tanh),
    ("torch builtin", torch.sigmoid, torch.tanh),
    ("function vs module", F.relu, nn.ReLU()),
    ("number", 0.1, 0.1000000001),
    ("int vs float", 1, 1.0),
    ("bool vs int", True, 1),
    ("string", "mean", "sum"),
    ("tuple", (1, 2), (2, 1)),
    ("tuple vs list", (1, 2), [1, 2]),
    ("dict", {"a": 1, "b": 2}, {"a": 1, "b": 3}),
    ("dict with int keys", {1: "a"}, {2: "a"}),
    ("set", {1, 2}, {1, 3}),
    ("nan vs inf", float("nan"), float("inf")),
    ("tensor", torch.tensor([0.1, 0.2]), torch.tensor([0.1, 0.2000001])),
    ("tensor dtype", torch.tensor([1, 2]), torch.tensor([1.0, 2.0])),
    ("tensor shape", torch.zeros(2, 3), torch.zeros(3, 2)),
    ("bfloat16 tensor", torch.tensor([0.1], dtype=torch.bfloat16), torch.tensor([0.11], dtype=torch.bfloat16)),
    ("numpy array", np.array([0.1, 0.2]), np.array([0.1, 0.2 + 1e-15])),
    ("numpy dtype", np.array([1, 2], dtype=np.int32), np.array([1, 2], dtype=np.int64)),
    ("numpy scalar", np.float32(0.1), np.float32(0.2)),
    ("dtype", torch.float32, torch.float64),
    ("unregistered module in a list", [nn.Linear(2, 3)], [nn.Linear(2, 4)]),
    ("partial", functools.partial(F.leaky_relu, negative_slope=0.1), functools.partial(F.leaky_relu, negative_slope=0.2)),
    ("torch generator state", torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)),
    ("numpy generator state", np.random.default_rng(0), np.random.default_rng(1)),
    ("None vs 0", None, 0),
]


@pytest.mark.parametrize("kind, a, b", ATTRIBUTES, ids=[k for k, _, _ in ATTRIBUTES])
def test_module_attributes_of_any_kind_change_the_description(kind, a, b):
    assert not same(describe_module(WithAttribute(a)), describe_module(WithAttribute(b)))
    assert same(describe_module(WithAttribute(a)), describe_module(WithAttribute(a)))


def test_private_attributes_of_user_modules_count_and_torch_internals_do_not():
    a, b = WithAttribute(1), WithAttribute(1)
    a._scale, b._scale = 2.0, 3.0
    assert not same(describe_module(a), describe_module(b))
    c, d = nn.LSTM(3, 4), nn.LSTM(3, 4)  # _flat_weights hold parameter values: left out with them
    assert same(describe_module(c), describe_module(d))


def test_sets_describe_the_same_whatever_their_insertion_order():
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    a, b = WithAttribute(set(words)), WithAttribute(set(reversed(words)))
    assert same(describe_module(a), describe_module(b))
    assert same(describe_callable(frozenset(words)), describe_callable(frozenset(reversed(words))))


def test_a_big_tensor_is_hashed_not_embedded():
    description = describe_module(WithAttribute(torch.randn(1000, 1000)))
    assert len(json.dumps(description)) < 500


# --- Flags and state that change no number -----------------------------------------------------------


def test_inplace_flags_of_torch_activations_do_not_change_the_description():
    for make in (nn.ReLU, nn.ReLU6, nn.ELU, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.Dropout):
        assert same(describe_module(make(inplace=True)), describe_module(make()))
    a = nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=True))
    b = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert same(describe_module(a), describe_module(b))


def test_training_mode_and_parameter_values_do_not_change_the_description():
    a, b = MLP(widths=(8,), in_features=4), MLP(widths=(8,), in_features=4)
    with torch.no_grad():
        b[1].weight.add_(1.0)
    b.eval()
    assert same(describe_module(a), describe_module(b))


def test_requires_grad_changes_the_description():
    a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    b.bias.requires_grad_(False)
    assert not same(describe_module(a), describe_module(b))


def test_parameter_shapes_and_dtypes_change_the_description():
    assert not same(describe_module(nn.Linear(2, 3)), describe_module(nn.Linear(3, 2)))
    assert not same(describe_module(nn.Linear(2, 3)), describe_module(nn.Linear(2, 3).double()))


def test_hooks_count_by_what_they_do_not_by_their_ids():
    def shift(module, inputs):
        return (inputs[0] + 1,)

    def scale(module, inputs):
        return (inputs[0] * 2,)

    plain = describe_module(nn.Linear(2, 3))
    m = nn.Linear(2, 3)
    m.register_forward_pre_hook(shift).remove()
    m.register_forward_pre_hook(shift)  # a new hook id
    other = nn.Linear(2, 3)
    other.register_forward_pre_hook(shift)
    third = nn.Linear(2, 3)
    third.register_forward_pre_hook(scale)
    assert not same(plain, describe_module(m))
    assert same(describe_module(m), describe_module(other))
    assert not same(describe_module(m), describe_module(third))


def test_tied_weights_describe_differently_from_separate_ones():
    a, b = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    b[1].weight = b[0].weight
    assert not same(describe_module(a), describe_module(b))


# --- Functions, closures, methods, callable objects -----------------------------------------------------


def make_loss(power):
    def loss(logits, y):
        return (logits - y).abs().pow(power).mean()

    return loss


def test_closure_values_change_the_description():
    assert not same(describe_callable(make_loss(2)), describe_callable(make_loss(3)))
    assert not same(describe_callable(make_loss(2.0)), describe_callable(make_loss(2.0000001)))
    assert not same(describe_callable(make_loss(torch.tensor(2.0))), describe_callable(make_loss(torch.tensor(2.0000002))))
    assert same(describe_callable(make_loss(2)), describe_callable(make_loss(2)))


def test_lambdas_on_one_line_describe_by_their_own_code():
    a, b, c = (lambda x, y: x + y), (lambda x, y: x * y), (lambda x, y: x + y)
    assert not same(describe_callable(a), describe_callable(b))
    assert same(describe_callable(a), describe_callable(c))


def test_a_lambda_inside_a_call_spanning_lines_is_found_in_its_source():
    loss = functools.partial(
        lambda logits, y, k: (logits - y).pow(k).mean(),
        k=2,
    )
    assert "ast" in describe_callable(loss)["partial"]["code"]


def test_torch_functions_and_classes_are_described_by_name():
    assert describe_callable(F.cross_entropy) == "torch.nn.functional.cross_entropy"
    assert describe_callable(torch.tanh) == "torch.tanh"
    assert describe_callable(torch.relu) == "torch.relu"
    assert describe_callable(torch.Tensor.relu).endswith("TensorBase.relu")
    assert describe_callable(nn.Linear) == "torch.nn.modules.linear.Linear"
    assert describe_class(nn.Linear) == "torch.nn.modules.linear.Linear"
    assert describe_callable(np.mean) == "numpy.mean"
    assert describe_module(nn.ReLU()) == {"module": "torch.nn.modules.activation.ReLU"}


LOSS_CLASS = """
import torch.nn.functional as F

class Loss:
    def __init__(self, smoothing=0.0):
        self.smoothing = smoothing

    def __call__(self, logits, y):
        return F.cross_entropy(logits, y, label_smoothing={})

    def helper(self):
        return self.smoothing
"""


def test_a_callable_loss_class_describes_by_its_call_code_and_attributes(tmp_path):
    a = load(tmp_path, LOSS_CLASS.format("self.smoothing")).Loss
    b = load(tmp_path, LOSS_CLASS.format("self.smoothing * 2")).Loss
    a2 = load(tmp_path, LOSS_CLASS.format("self.smoothing")).Loss
    assert not same(describe_callable(a()), describe_callable(b()))
    assert not same(describe_callable(a(0.1)), describe_callable(a(0.2)))
    assert same(describe_callable(a(0.1)), describe_callable(a2(0.1)))
    assert not same(describe_callable(a(0.1).helper), describe_callable(a(0.2).helper))  # bound methods: self too
    assert not same(describe_class(a), describe_class(b))


@dataclass
class DataclassLoss:
    scale: float = 1.0

    def __call__(self, logits, y):
        return F.cross_entropy(logits * self.scale, y)


def test_a_dataclass_loss_describes_by_fields_and_values_without_generated_bytecode():
    assert not same(describe_callable(DataclassLoss(1.0)), describe_callable(DataclassLoss(2.0)))
    assert same(describe_callable(DataclassLoss(1.0)), describe_callable(DataclassLoss(1.0)))
    assert "bytecode" not in json.dumps(describe_class(DataclassLoss))  # __init__ and __eq__ have no source


def test_a_module_attribute_read_through_a_config_module_changes_the_description(tmp_path, monkeypatch):
    config = load(tmp_path, "SCALE = 2.0\nOTHER = 1\n", prefix="config")
    model = load(tmp_path, NET.format(helper=f"x * {config.__name__}.SCALE").replace(
        "import torch\n", f"import torch\nimport {config.__name__}\n", 1))
    before = describe_module(model.Net())
    monkeypatch.setattr(config, "OTHER", 5)  # not read by the code
    assert same(before, describe_module(model.Net()))
    monkeypatch.setattr(config, "SCALE", 2.0000001)
    assert not same(before, describe_module(model.Net()))


def test_a_global_number_changed_at_run_time_changes_the_description(tmp_path, monkeypatch):
    module = load(tmp_path, EDITS["global number"][0])
    before = describe_module(module.Net())
    monkeypatch.setattr(module, "SCALE", 4.0)
    assert not same(before, describe_module(module.Net()))


def test_a_class_attribute_changed_at_run_time_changes_the_description(monkeypatch):
    before = describe_module(WithAttribute(1))
    monkeypatch.setattr(WithAttribute, "scale", 2.0, raising=False)
    assert not same(before, describe_module(WithAttribute(1)))


def test_recursive_functions_are_described_without_looping(tmp_path):
    module = load(tmp_path, "def f(n):\n    return 1 if n == 0 else n * g(n - 1)\n\ndef g(n):\n    return f(n)\n")
    assert same(describe_callable(module.f), describe_callable(module.f))


def test_code_without_source_falls_back_to_marked_bytecode():
    def made(body):
        scope: dict = {}
        exec(f"def f(x):\n{textwrap.indent(body, '    ')}", scope)
        return describe_callable(scope["f"])

    f, g, h = made("'doc'\nreturn x * 2\n"), made("'other doc'\nreturn x * 2\n"), made("return x * 3\n")
    assert f["code"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "bytecode" in f["code"]
    assert same(f, g)  # docstrings left out
    assert not same(f, h)


def test_a_custom_intervention_subclass_describes_by_its_code(tmp_path):
    source = """
    from serimats_func.interventions import Intervention

    class Noise(Intervention):
        prefix = "noise"
        defaults = {{"sigma": {default}}}

        def _check(self, axis, value):
            return {check}
    """
    a = load(tmp_path, source.format(default=0.1, check="float(value)")).Noise
    b = load(tmp_path, source.format(default=0.1, check="abs(float(value))")).Noise
    c = load(tmp_path, source.format(default=0.2, check="float(value)")).Noise
    a2 = load(tmp_path, source.format(default=0.1, check="float(value)")).Noise
    assert not same(describe_class(a), describe_class(b))
    assert not same(describe_class(a), describe_class(c))
    assert same(describe_class(a), describe_class(a2))
    assert describe_class(a)["bases"][0] == "serimats_func:Intervention"  # the protocol by name, not its code
    assert same(describe_class(Intervention), describe_class(Intervention))


# --- Processes, Python versions, speed -------------------------------------------------------------------

HASH_SEED_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tmp!r})
import importlib
from serimats_func.run.identity import describe_module, describe_callable, digest
m = importlib.import_module({name!r})
scope = {{}}
exec("def f(x):\\n    return x in {{'alpha', 'beta', 'gamma', 'delta', 'epsilon'}}\\n", scope)  # no source: bytecode
print(list({{'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta'}}))
print(digest(describe_module(m.Net())), digest(describe_callable(scope["f"])))
"""

SET_NET = """
import torch
from torch import nn

class Net(nn.Module):
    kinds = frozenset({"relu", "tanh", "gelu", "silu", "elu"})

    def __init__(self):
        super().__init__()
        self.names = {"weight", "bias", "scale", "shift", "gain"}
        self.table = {frozenset({"a", "b", "c"}): 1, frozenset({"d", "e"}): 2}

    def forward(self, x):
        if "relu" in {"relu", "tanh", "gelu", "silu"}:
            return torch.relu(x)
        return x
"""


@pytest.mark.slow
def test_sets_in_code_and_attributes_describe_the_same_under_any_hash_seed(tmp_path):
    name = f"setnet_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(SET_NET)
    script = HASH_SEED_SCRIPT.format(root=str(ROOT), tmp=str(tmp_path), name=name)
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.splitlines())
    assert outputs[0][0] != outputs[1][0]  # the seeds do reorder sets
    assert outputs[0][1] == outputs[1][1]


def test_python_version_dependent_tree_fields_are_left_out():
    import ast

    from serimats_func.run.identity import _canonical

    tree = _canonical(ast.parse("def f(x):\n    'doc'\n    return x\n").body[0])
    text = json.dumps(tree)
    assert "type_params" not in text and "decorator_list" not in text and "lineno" not in text and "doc" not in text


def test_no_absolute_path_gets_into_a_description(tmp_path):
    module = load(tmp_path, EDITS["module-level helper function"][0])
    text = json.dumps([describe_module(module.Net()), describe_callable(make_loss(2)), describe_module(MLP(widths=(4,)))])
    assert str(tmp_path) not in text and str(ROOT) not in text


def test_an_attribute_name_that_matches_a_global_does_not_describe_the_global(tmp_path, monkeypatch):
    module = load(tmp_path, NET.format(helper="x") + "\nfc = torch.zeros(3)\n")  # forward reads self.fc, not fc
    before = describe_module(module.Net())
    monkeypatch.setattr(module, "fc", torch.ones(3))
    assert same(before, describe_module(module.Net()))


def test_a_config_module_imported_inside_a_function_counts(tmp_path, monkeypatch):
    config = load(tmp_path, "SCALE = 2.0\n", prefix="config")
    module = load(tmp_path, f"def loss(a, b):\n    import {config.__name__} as c\n    return (a - b).mean() * c.SCALE\n")
    before = describe_callable(module.loss)
    monkeypatch.setattr(config, "SCALE", 3.0)
    assert not same(before, describe_callable(module.loss))


def test_a_module_describes_the_same_as_a_callable_and_as_a_module():
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))
    assert describe_callable(loss) == describe_module(loss)
