"""Bad input fails before training, with an error that names the problem; nothing is written."""

import math

import pytest
import torch

from serimats_func.interventions import (
    BatchSize,
    InitWeights,
    Intervention,
    Model,
    Optimizer,
    PerturbActivations,
    PerturbGradients,
    PerturbHyperparameter,
    PerturbMomentum,
    PerturbWeights,
    ResetOptimizerState,
)
from serimats_func.loggers import Logger, register_metric
from serimats_func.models import MLP, Lenet5


@pytest.fixture
def build(experiment, store):
    """The tests' experiment with a plain MLP() unless a test gives a model, on ``store``."""

    def build(model=None, interventions=(), **kw):
        return experiment(interventions, model=model or MLP(), store=store, **kw)

    yield build
    assert not store.exists(), "a refused experiment must not write anything"


def test_an_empty_axis_is_refused():
    with pytest.raises(ValueError, match="axis 'seed' is empty"):
        PerturbWeights.make_variations(epsilon=0.1, seed=range(0))


def test_an_unknown_axis_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="PerturbWeights has no axis 'eps'; its axes are: epsilon, seed, mode"):
        PerturbWeights.make_variations(eps=0.1)


def test_an_unknown_hyperparameter_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="Optimizer has no axis 'learning_rate'.*lr"):
        Optimizer.make_variations(learning_rate=(0.1, 0.01))
    with pytest.raises(ValueError, match="torch.optim.Adam has no hyperparameter 'momentum'.*betas"):
        Optimizer.make_variations(optimizers=(torch.optim.SGD, torch.optim.Adam), momentum=0.9)


def test_a_hyperparameter_the_experiments_optimizer_lacks_is_refused(build):
    with pytest.raises(ValueError, match="torch.optim.SGD has no hyperparameter 'betas'"):
        build(interventions=[Optimizer.make_variations(betas=((0.9, 0.99), (0.8, 0.9)))])


def test_a_value_torch_optim_refuses_is_refused_with_its_message():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        Optimizer.make_variations(optimizer=torch.optim.SGD, lr=(0.1, -0.1))
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        Optimizer(torch.optim.SGD, lr=0.1, nesterov=True)


@pytest.mark.parametrize("epsilon", [math.inf, -math.inf, math.nan, -0.1, "0.1"])
def test_an_epsilon_that_is_not_a_finite_non_negative_number_is_refused(epsilon):
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        PerturbWeights.make_variations(epsilon=(0.01, epsilon))


def test_a_seed_that_is_not_a_non_negative_integer_is_refused():
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        InitWeights.make_variations(seed=(1, 2.5))


def test_a_model_that_cannot_take_the_datasets_shape_is_refused(build):
    with pytest.raises(ValueError, match=r"Lenet5 cannot take the dataset's examples of shape \(40,\)"):
        build(model=Lenet5())


def test_a_model_with_too_few_outputs_for_the_labels_is_refused(build):
    with pytest.raises(ValueError, match="gives 5 logits but the labels go up to 9"):
        build(model=MLP(num_classes=5))


def test_a_parameter_without_reset_parameters_is_refused(build):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = MLP(widths=(8,))
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.body(x) * self.scale

    with pytest.raises(ValueError, match="Parameter scale belongs to Scaled, which has no reset_parameters"):
        build(model=Scaled())


def test_a_variation_given_twice_is_one_learner_and_a_new_axis_becomes_a_dimension(experiment, small_mnist1d, store):
    train, _ = small_mnist1d
    exp = experiment([PerturbWeights.make_variations(epsilon=0.1, seed=1),
                      PerturbWeights.make_variations(epsilon=0.1, seed=1),
                      PerturbWeights.make_variations(epsilon=0.1, seed=1, mode="absolute")],
                     model=MLP(), data=(train, None), store=store)
    assert len(exp.grid.learners) == 2 and exp.grid.dims == {"mode": ["relative", "absolute"]}
    assert exp.grid.scalars == {"epsilon": 0.1, "seed": 1}


@pytest.mark.parametrize("kw,message", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"epochs": 1, "steps": 5}, "Give epochs= or steps=, not both"),
    ({"steps": -3}, "steps must be a positive integer"),
    ({"seed": 1.5}, "seed must be an integer"),
])
def test_bad_training_settings_are_refused(build, kw, message):
    with pytest.raises(ValueError, match=message):
        build(**kw)


def test_bad_datasets_are_refused(build, store):
    x = torch.randn(10, 40)
    with pytest.raises(ValueError, match="dataset has 10 inputs but 9 labels"):
        build(data=((x, torch.zeros(9, dtype=torch.long)), None))
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        build(data=((x, torch.rand(10)), None))
    with pytest.raises(ValueError, match="dataset is empty"):
        build(data=((x[:0], torch.zeros(0, dtype=torch.long)), None))
    with pytest.raises(ValueError, match=r"test_dataset inputs have shape \(20,\) but dataset inputs \(40,\)"):
        build(data=((x, torch.zeros(10, dtype=torch.long)), (torch.randn(5, 20), torch.zeros(5).long())))
    assert not store.exists()


def test_an_optimizer_given_as_a_string_is_refused_with_the_form_to_use(build):
    with pytest.raises(ValueError, match=r"optimizer= takes a torch.optim class or Optimizer\("):
        build(optimizer="SGD")


def test_a_model_that_is_not_a_module_or_returns_a_tuple_is_refused(build):
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(40, 10)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        build(model=lambda x: x)
    with pytest.raises(ValueError, match="Pair returned a tuple; the template must return one tensor"):
        build(model=Pair())


def test_randomness_outside_nn_dropout_is_refused_before_training(build):
    class FunctionalDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(40, 10)

        def forward(self, x):
            return torch.nn.functional.dropout(self.fc(x), 0.5)

    with pytest.raises(ValueError, match="global RNG.*use nn.Dropout"):
        build(model=FunctionalDropout())


def test_an_intervention_class_that_implements_nothing_is_refused():
    from serimats_func.interventions import Intervention

    class Custom(Intervention):
        defaults = {"scale": 1.0}

    with pytest.raises(TypeError, match="Custom implements no hook, so it would multiply the grid"):
        Custom.make_variations(scale=(0.0, 0.5))


def test_cuda_without_a_gpu_is_refused_at_once(build):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA device"):
        build(device="cuda")


def test_inputs_with_nan_are_refused(build):
    x = torch.randn(8, 40)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="dataset inputs contain NaN"):
        build(data=((x, torch.zeros(8, dtype=torch.long)), None))


def test_a_store_path_below_a_file_is_refused_before_training(experiment, small_mnist1d, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="file.txt is not a folder"):
        experiment(model=MLP(), data=(small_mnist1d[0], None), store=tmp_path / "file.txt" / "sub" / "s.zarr")


def test_numpy_and_tensor_numbers_are_plain_labels():
    import numpy as np

    vs = PerturbWeights.make_variations(epsilon=np.array([0.001, 0.01], dtype=np.float32), seed=torch.tensor(3))
    assert [v.values["epsilon"] for v in vs] == [0.001, 0.01] and vs[0].values["seed"] == 3
    assert Optimizer(torch.optim.SGD, lr=torch.tensor(0.5)).values["lr"] == 0.5
    assert [v.values["lr"] for v in Optimizer.make_variations(lr=torch.tensor([0.1, 0.01]))] == [0.1, 0.01]


def test_a_loss_that_fails_or_does_not_return_a_scalar_is_refused(build):
    with pytest.raises(ValueError, match=r"loss\(logits, y\) failed on a batch"):
        build(loss=lambda logits: logits.sum())
    with pytest.raises(ValueError, match="must return a scalar float tensor"):
        build(loss=torch.nn.CrossEntropyLoss(reduction="none"))


# --- Every mistake in one table: refused before anything is trained or written, with the problem and the fix --


class NoParameters(torch.nn.Module):
    def forward(self, x):
        return x[:, :10]


class Frozen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(40, 10).requires_grad_(False)

    def forward(self, x):
        return self.fc(x)


class HiddenInAList(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [torch.nn.Linear(40, 10)]  # a plain list: PyTorch does not see the layer

    def forward(self, x):
        return self.layers[0](x)


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.out = torch.nn.Linear(40, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.out(self.bn(self.fc(x)))


class BranchesOnValues(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(40, 10)

    def forward(self, x):
        out = self.fc(x)
        return out if out.abs().max() < 100 else out / 100  # a Python branch on a tensor's value


def item_loss(logits, y):
    loss = torch.nn.functional.cross_entropy(logits, y)
    return loss if loss.item() < 100 else loss * 0


def host_loss(logits, y):
    weights = torch.ones(10)
    weights[int(y.max().cpu())] = 2.0  # reads a label on the host: fine alone, not in a vmapped step
    return torch.nn.functional.cross_entropy(logits, y, weight=weights)


class ItemInHook(Intervention):
    axes = {"scale": 1.0}

    def on_gradients(self, grads, n, ctx):
        return {k: g * float(n.scale) for k, g in grads.items()}


class WrongKeysHook(Intervention):
    axes = {"scale": 1.0}

    def on_gradients(self, grads, n, ctx):
        return {k + "_renamed": g * n.scale for k, g in grads.items()}


class MyInit(InitWeights):
    pass


class BrokenMetric(Logger):
    @register_metric
    def broken(self, learner):
        return learner.model.no_such_layer.weight.norm()


def metric_named(name: str) -> Logger:
    """A logger with one metric called ``name``."""
    def metric(self, learner):
        return learner.model[1].weight.norm()

    metric.__name__ = metric.__qualname__ = name
    return type(f"Logs_{name}", (Logger,), {name: register_metric(metric)})()


def scheduled_metric(**when) -> Logger:
    """A logger with one metric recorded at ``register_metric(**when)``'s steps (refused there, or when built)."""
    def norm(self, learner):
        return learner.model[1].weight.norm()

    return type("Scheduled", (Logger,), {"norm": register_metric(**when)(norm)})()


class UnitMetrics(Logger):
    @register_metric(dims=("unit",))
    def unit_norms(self, learner):
        return learner.model[1].weight.norm(dim=1)

    @register_metric
    def unit(self, learner):
        return learner.model[1].weight.norm()


def bad_factory(width):
    raise RuntimeError("out of widths")


class Scale(Intervention):
    axes = {"scale": 1.0}

    def on_gradients(self, grads, n, ctx):
        return {k: g * n.scale for k, g in grads.items()}


def _hook(point, body):
    """An intervention class whose ``point`` hook returns ``body(value, n, ctx)`` (named after ``body``)."""
    return type(body.__name__, (Intervention,), {"axes": {"scale": 1.0}, point: lambda self, v, n, ctx: body(v, n, ctx)})


def _varied(point, body):
    """What the table calls for the interventions: two variations of ``_hook(point, body)``."""
    return lambda: [_hook(point, body).make_variations(scale=(1.0, 2.0))]


def Int64Params(params, n, ctx):  # noqa: N802 (a class name, as in the messages)
    return {k: (w * n.scale).long() for k, w in params.items()}


def Float64Grads(grads, n, ctx):  # noqa: N802
    return {k: (g * n.scale).double() for k, g in grads.items()}


def ScalarGrads(grads, n, ctx):  # noqa: N802
    return {k: (g * n.scale).sum() for k, g in grads.items()}


def NoneGrads(grads, n, ctx):  # noqa: N802
    return None


def ListGrads(grads, n, ctx):  # noqa: N802
    return [g * n.scale for g in grads.values()]


def FloatStream(grads, n, ctx):  # noqa: N802
    return {k: g + n.scale * ctx.normal(g.shape, g.dtype, 0.5) for k, g in grads.items()}


class NoPair(Intervention):
    axes = {"scale": 1.0}

    def init_state(self, params, n):
        return torch.zeros(())

    def on_gradients(self, grads, n, ctx):
        return {k: g * n.scale for k, g in grads.items()}


class CountsCalls(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(40, 10)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return self.fc(x)


class IntLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(40, 10)

    def forward(self, x):
        return self.fc(x).round().long()


class CumulativeBatchNorm(BatchNormNet):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(16, momentum=None)


def _scripted(model):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, not gone
        return torch.jit.script(model)


def _train_set():
    from tests.builders import small_mnist1d

    return small_mnist1d()[0]


NAN, INF = float("nan"), float("inf")

# (what goes wrong, how the experiment is built, what the message must say: the problem, then the fix)
MISTAKES = [
    ("lr=nan in Optimizer", dict(interventions=lambda: [Optimizer.make_variations(lr=(0.1, NAN))]),
     "Optimizer lr must be a finite number; got nan"),
    ("lr=inf in the experiment's optimizer=", dict(optimizer=lambda: Optimizer(torch.optim.SGD, lr=INF)),
     "Optimizer lr must be a finite number; got inf"),
    ("momentum=inf", dict(interventions=lambda: [Optimizer.make_variations(momentum=INF)]),
     "Optimizer momentum must be a finite number"),
    ("weight_decay=nan for Adam", dict(optimizer=lambda: Optimizer(torch.optim.Adam, lr=1e-3, weight_decay=NAN)),
     "weight_decay must be a finite number"),
    ("lr=inf in PerturbHyperparameter", dict(interventions=lambda: [PerturbHyperparameter.make_variations(lr=INF)]),
     "PerturbHyperparameter lr must be a finite number; got inf"),
    ("momentum=nan in PerturbMomentum", dict(interventions=lambda: [PerturbMomentum.make_variations(momentum=NAN)]),
     "PerturbMomentum momentum must be a finite number"),
    ("a derived lr that is not finite",
     dict(interventions=lambda: [PerturbHyperparameter.make_variations(lr=lambda lr: lr * INF)]),
     "PerturbHyperparameter lr must be a finite number; got inf"),
    ("betas with nan", dict(optimizer=lambda: Optimizer(torch.optim.Adam, lr=1e-3, betas=(0.9, NAN))),
     r"betas must be a pair of finite numbers \(beta1, beta2\), e.g. betas=\(0.9, 0.999\)"),
    ("one number for betas", dict(optimizer=lambda: Optimizer(torch.optim.Adam, lr=1e-3, betas=0.9)),
     r"betas must be a pair of finite numbers \(beta1, beta2\), e.g. betas=\(0.9, 0.999\); got 0.9"),
    ("a string for nesterov", dict(optimizer=lambda: Optimizer(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov="yes")),
     "nesterov must be True or False; got 'yes'"),
    ("nesterov without momentum", dict(optimizer=lambda: Optimizer(torch.optim.SGD, lr=0.1, nesterov=True)),
     "Nesterov momentum requires a momentum"),
    ("a string for the optimizer", dict(optimizer=lambda: "SGD"),
     r"optimizer= takes a torch.optim class or Optimizer\(torch.optim.Adam, lr=1e-3\)"),
    ("an optimizer without a twin", dict(optimizer=lambda: torch.optim.ASGD),
     "No functional twin of 'ASGD'; supported optimizers: .*torch.optim.RMSprop, torch.optim.SGD"),
    ("a string dtype", dict(dtype=lambda: "float64"),
     "dtype must be a floating point torch.dtype such as torch.float32 or torch.float64; got 'float64'"),
    ("an integer dtype", dict(dtype=lambda: torch.int64), "dtype must be a floating point torch.dtype"),
    ("logger=Logger, the class", dict(logger=lambda: Logger), r"got the class Logger: use logger=Logger\(\)"),
    ("a logger that is not a Logger", dict(logger=lambda: print), "logger= takes a Logger instance"),
    ("a metric that fails", dict(logger=lambda: BrokenMetric()), "Metric 'broken' failed on a learner"),
    ("a metric named lr", dict(logger=lambda: metric_named("lr")),
     r"Metric 'lr' is named like an optimizer hyperparameter.*Rename the method \(e.g. 'lr_metric'\)"),
    ("a metric named betas under SGD", dict(logger=lambda: metric_named("betas")),
     "Metric 'betas' is named like an optimizer hyperparameter.*Rename the method"),
    ("a metric named device", dict(logger=lambda: metric_named("device")),
     r"Metric 'device' is named like a coordinate of open_store \(where a batch was trained\).*Rename the method"),
    ("a metric named like a grid axis", dict(logger=lambda: metric_named("epsilon"),
                                             interventions=lambda: [PerturbWeights.make_variations(epsilon=(0.0, 0.1))]),
     "Metric 'epsilon' is named like a coordinate of the grid.*Rename the method"),
    ("a metric named like a one-valued axis", dict(logger=lambda: metric_named("seed"),
                                                   interventions=lambda: [InitWeights.make_variations(seed=3)]),
     "Metric 'seed' is named like a coordinate of the grid.*Rename the method"),
    ("a metric named step", dict(logger=lambda: metric_named("step")),
     "Metric 'step' is named like a dimension or variable of every result.*Rename the method"),
    ("a metric named learner", dict(logger=lambda: metric_named("learner")),
     "Metric 'learner' is named like a dimension or variable of every result"),
    ("a metric named diverged_at", dict(logger=lambda: metric_named("diverged_at")),
     "Metric 'diverged_at' is named like a dimension or variable of every result"),
    ("a metric named model", dict(logger=lambda: metric_named("model")),
     r"Metric 'model' is named like a coordinate of open_store \(each learner's configuration\)"),
    ("a metric named layer", dict(logger=lambda: metric_named("layer")),
     "Metric 'layer' is named like the dimension of control_layer_distance"),
    ("a metric named like another metric's dimension", dict(logger=lambda: UnitMetrics()),
     "Metric 'unit' is named like a dimension of metric 'unit_norms'.*Rename the method or the dimension"),
    ("a model with no parameters", dict(model=lambda: NoParameters()),
     r"NoParameters has no parameters, so there is nothing to train. Give it layers with weights"),
    ("a model whose layers are in a plain list", dict(model=lambda: HiddenInAList()),
     r"HiddenInAList has no parameters.*a plain Python list hides them"),
    ("a model with every parameter frozen", dict(model=lambda: Frozen()),
     "Every parameter of Frozen has requires_grad=False.*Leave at least one parameter trainable"),
    (".item() in the loss", dict(loss=lambda: item_loss),
     r"reads a tensor's value in Python.*call .item\(\).*use torch.where"),
    ("the loss copies a label to the host", dict(loss=lambda: host_loss),
     r"reads a tensor's value in Python or copies it to the host.*\.cpu\(\)"),
    ("a model that branches on a tensor's value", dict(model=lambda: BranchesOnValues()),
     r"BranchesOnValues cannot be trained under torch.func.vmap.*must not branch on a tensor's value; use torch.where"),
    ("float() of a number in a hook", dict(interventions=lambda: [ItemInHook.make_variations(scale=(1.0, 2.0))]),
     r"reads a tensor's value in Python.*interventions in this step: .*ItemInHook"),
    ("a hook that returns other keys", dict(interventions=lambda: [WrongKeysHook.make_variations(scale=(1.0, 2.0))]),
     r"WrongKeysHook.on_gradients returned a dict with keys '1.weight_renamed'.*but received a dict with keys "
     r"'1.weight'.*a hook returns a value of the kind it receives"),
    ("BatchNorm with a last batch of one example", dict(model=lambda: BatchNormNet(), batch_size=lambda: 73, epochs=lambda: 1),
     r"holds 1 example \(512 examples in batches of 73\).*Pick a batch size that leaves no batch of one "
     r"\(e.g. batch_size=74\), or drop the last example"),
    ("BatchNorm with a BatchSize variation that leaves one example",
     dict(model=lambda: BatchNormNet(), epochs=lambda: 1, interventions=lambda: [BatchSize.make_variations(batch_size=(32, 73))]),
     r"failed on a batch of 1 example.*batch_size=74"),
    ("the same epsilon twice", dict(interventions=lambda: [PerturbWeights.make_variations(epsilon=(0.01, 0.01))]),
     "axis 'epsilon' repeats the value 0.01; give each value once"),
    ("the same seed twice", dict(interventions=lambda: [InitWeights.make_variations(seed=(0, 0, 1))]),
     "axis 'seed' repeats the value 0; give each value once"),
    ("a subclass of InitWeights next to InitWeights",
     dict(interventions=lambda: [InitWeights.make_variations(seed=(0, 1)), MyInit.make_variations(seed=(2, 3))]),
     "MyInit and InitWeights both seed the 'init' random stream, so one would silently override the other; use one"),
    ("an intervention class instead of variations", dict(interventions=lambda: [PerturbWeights]),
     r"got the class PerturbWeights; give variations: PerturbWeights.make_variations\(...\)"),
    ("a string among the interventions", dict(interventions=lambda: ["epsilon"]),
     r"interventions must be made by make_variations\(...\)"),
    ("an unknown axis", dict(interventions=lambda: [PerturbWeights.make_variations(eps=0.1)]),
     "PerturbWeights has no axis 'eps'; its axes are: epsilon, seed"),
    ("an empty axis", dict(interventions=lambda: [InitWeights.make_variations(seed=[])]),
     "axis 'seed' is empty; give it at least one value"),
    ("a negative epsilon", dict(interventions=lambda: [PerturbWeights.make_variations(epsilon=-0.1)]),
     "epsilon must be a finite number >= 0"),
    ("layers that match nothing", dict(interventions=lambda: [PerturbWeights.make_variations(epsilon=0.1, layers="conv*")]),
     "layers='conv\\*' matches no parameter; the parameters are: 1.weight"),
    ("a window that ends before it starts",
     dict(interventions=lambda: [PerturbGradients.make_variations(noise=0.1, when=(10, 5))]),
     r"when= takes step windows \(start, end\) with 0 <= start < end"),
    ("a submodule that does not exist", dict(interventions=lambda: [PerturbActivations.make_variations(module="fc9", noise=0.1)]),
     "The model has no submodule 'fc9'.*its submodules: 0, 1, 2, 3"),
    ("momentum perturbed under Adam", dict(optimizer=lambda: torch.optim.Adam,
                                           interventions=lambda: [PerturbMomentum.make_variations(momentum=0.5)]),
     "PerturbMomentum changes momentum, which torch.optim.Adam does not have; it has: lr"),
    ("a model factory that fails", dict(interventions=lambda: [Model.make_variations(factory=bad_factory, width=(8, 16))]),
     r"Model factory 'bad_factory' failed with \{'width': 8\}: RuntimeError: out of widths"),
    ("batch_size=2.5", dict(batch_size=lambda: 2.5), "batch_size must be a positive integer; got 2.5"),
    ("log_every=0", dict(log_every=lambda: 0), "log_every must be a positive integer; got 0"),
    ("eval_batch_size=-1", dict(eval_batch_size=lambda: -1), "eval_batch_size must be a positive integer"),
    ("max_learners_per_chunk=0", dict(max_learners_per_chunk=lambda: 0), "max_learners_per_chunk must be a positive integer"),
    ("checkpoint_every=True", dict(checkpoint_every=lambda: True), "checkpoint_every must be a positive integer; got True"),
    ("epochs=0", dict(epochs=lambda: 0), "epochs must be a positive integer; got 0"),
    ("a loss that takes one argument", dict(loss=lambda: (lambda logits: logits.mean())), r"loss\(logits, y\) failed on a batch"),
    ("a loss per example", dict(loss=lambda: torch.nn.CrossEntropyLoss(reduction="none")),
     r"must return a scalar float tensor \(the batch mean\)"),
    # steps and windows beyond the run (16 steps): they would change nothing, silently
    ("PerturbWeights at= past the last step", dict(interventions=lambda: [PerturbWeights.make_variations(epsilon=0.1, at=1000)]),
     r"PerturbWeights at=1000 acts after 1000 updates, but learners with .* train 16 steps, so it would never act.*"
     r"Give steps within the run, or train longer"),
    ("a window that starts after the last step",
     dict(interventions=lambda: [PerturbGradients.make_variations(noise=0.1, when=(100, 200))]),
     r"PerturbGradients acts in the step window \(100, 200\).*train 16 steps, so it would never act"),
    ("one of several windows after the last step",
     dict(interventions=lambda: [PerturbGradients.make_variations(noise=0.1, when=((0, 4), (16, None)))]),
     r"acts in the step window \(16, None\), which starts at step 16"),
    ("ResetOptimizerState at= past the last step",
     dict(interventions=lambda: [ResetOptimizerState.make_variations(at=(4, 40))]),
     r"ResetOptimizerState acts in the step window \(40, 41\)"),
    ("keep_states past the last step", dict(keep_states=lambda: [8, 1000]),
     r"keep_states asks for step 1000, past the last step \(16\).*Give steps from 0 to 16"),
    # metrics at chosen steps (16 steps, logged at 0 and 16)
    ("a metric every=0", dict(logger=lambda: scheduled_metric(every=0)),
     r"register_metric\(every=...\) takes a positive integer k .*got 0"),
    ("a metric every=2.5", dict(logger=lambda: scheduled_metric(every=2.5)), "takes a positive integer k"),
    ("a metric at a negative step", dict(logger=lambda: scheduled_metric(at=[4, -1])),
     r"register_metric\(at=...\) takes steps .*got -1 in at=\[4, -1\]"),
    ("a metric at a step given as a string", dict(logger=lambda: scheduled_metric(at="16")),
     r"register_metric\(at=...\) takes a list of steps, e.g. at=\[0, 500\]"),
    ("a metric at a step past the run", dict(logger=lambda: scheduled_metric(at=[8, 1000])),
     r"Metric 'norm' asks for step 1000 \(at=\[8, 1000\]\), past the last step \(16\).*give steps from 0 to 16"),
    ("a metric every k that no logged step but 0 is a multiple of", dict(logger=lambda: scheduled_metric(every=5)),
     r"Metric 'norm' every=5 .* none is but step 0 \(logged steps: 0, 16\); log those steps \(log_every=5\)"),
    ("metrics= with an unknown name", dict(metrics=lambda: {"test_accuracy": dict(every=4)}),
     r"metrics= names 'test_accuracy', which is no built-in metric; they are: train_loss, train_acc, test_loss"),
    ("metrics= naming a logger's metric", dict(metrics=lambda: ["norm"], logger=lambda: scheduled_metric()),
     r"'norm', which is no built-in metric.*takes its steps from @register_metric\(every=..., at=...\)"),
    ("metrics= as one string", dict(metrics=lambda: "test_acc"), "metrics= takes a list of built-in metric names"),
    ("metrics= with None for a metric", dict(metrics=lambda: {"test_acc": None}), r"say False \(not recorded\)"),
    ("metrics= with an unknown key", dict(metrics=lambda: {"test_acc": dict(evry=4)}),
     r"takes dict\(every=..., at=...\); got the key 'evry'"),
    ("metrics= at a step past the run", dict(metrics=lambda: {"test_acc": dict(at=[17])}),
     r"Metric 'test_acc' asks for step 17 .*past the last step \(16\)"),
    ("metrics= asking for the evaluation with evaluate=False",
     dict(metrics=lambda: {"test_acc": dict(every=4)}, evaluate=lambda: False),
     "metrics= asks for 'test_acc', which is computed on the train or test set, but evaluate=False"),
    ("metrics= asking for a control metric without controls", dict(metrics=lambda: {"control_distance": dict(at=[0])}),
     "compares each learner with its control, but no variation of this grid is a control; mark one with control=True"),
    # flags, names and paths
    ("evaluate='no'", dict(evaluate=lambda: "no"),
     r"evaluate must be True or False; got 'no' \(a str, which would be taken as True\)"),
    ("evaluate=1", dict(evaluate=lambda: 1), "evaluate must be True or False; got 1"),
    ("progress='false'", dict(progress=lambda: "false"), "progress must be True or False"),
    ("a name that climbs out of runs/", dict(name=lambda: "../escape"),
     r"name='../escape' cannot name an experiment: .* not a path.*store="),
    ("a name with a path separator", dict(name=lambda: "a/b"), "name='a/b' cannot name an experiment"),
    ("an absolute name", dict(name=lambda: "/tmp/x"), "name='/tmp/x' cannot name an experiment"),
    ("device='meta'", dict(device=lambda: "meta"), r"device='meta' holds shapes without values.*device='cpu'"),
    ("an unknown device", dict(device=lambda: "gpu0"), "device= takes a torch device such as 'cpu' or 'cuda'"),
    # data and models
    ("a dict as dataset", dict(data=lambda: ({"x": _train_set().tensors[0], "y": _train_set().tensors[1]}, None)),
     r"dataset is a dict \(keys 'x', 'y'\); give a tuple \(x, y\) of tensors"),
    ("a TorchScript model", dict(model=lambda: _scripted(MLP(widths=(8,), in_features=40))),
     r"model is a TorchScript module.*give the plain nn.Module"),
    ("integer logits", dict(model=lambda: IntLogits()),
     r"IntLogits returned logits of dtype torch.int64; logits must be floating point"),
    ("a buffer that forward increments", dict(model=lambda: CountsCalls()),
     r"CountsCalls's forward pass changes its buffer 'count' in train mode.*Keep the buffer constant in forward"),
    ("BatchNorm with momentum=None", dict(model=lambda: CumulativeBatchNorm()),
     r"BatchNorm1d 'bn' has momentum=None \(a cumulative moving average.*Give it a momentum \(e.g. momentum=0.1"),
    # when= and axis values
    ("when=(0, True)", dict(interventions=lambda: [PerturbGradients.make_variations(noise=0.1, when=(0, True))]),
     r"when= takes step windows \(start, end\) with 0 <= start < end \(integers.*got \(0, True\)"),
    ("when='0-10'", dict(interventions=lambda: [PerturbGradients.make_variations(noise=0.1, when="0-10")]),
     r"when= takes step windows \(start, end\) as tuples of integers, e.g. when=\(0, 10\).*got the string '0-10'"),
    ("when=(0, 10.5)", dict(interventions=lambda: [PerturbGradients.make_variations(noise=0.1, when=(0, 10.5))]),
     r"when= takes step windows .*got \(0, 10.5\)\.$"),
    ("NaN on a custom axis", dict(interventions=lambda: [Scale.make_variations(scale=(1.0, NAN))]),
     r"Scale scale=nan holds NaN.*give finite numbers"),
    ("a string on a numeric custom axis", dict(interventions=lambda: [Scale.make_variations(scale=(1.0, "2"))]),
     r"Scale scale takes numbers \(its default is 1.0\); got '2' \(str\)"),
    ("a bool on a numeric custom axis", dict(interventions=lambda: [Scale.make_variations(scale=(1.0, True))]),
     r"Scale scale takes numbers"),
    # hook outputs, checked in the trial step
    ("on_params returning int64", dict(interventions=_varied("on_params", Int64Params)),
     r"Int64Params.on_params returned a torch.int64 tensor .* where its input is a torch.float32 tensor.*keep each "
     r"tensor's dtype and shape"),
    ("a hook returning float64", dict(interventions=_varied("on_gradients", Float64Grads)),
     r"Float64Grads.on_gradients returned a torch.float64 tensor of shape \(32,\).*torch.float32 tensor of shape \(32,\)"),
    ("a hook returning a scalar", dict(interventions=_varied("on_gradients", ScalarGrads)),
     r"ScalarGrads.on_gradients returned a torch.float32 tensor of shape \(\) .*no .sum\(\) or .mean\(\)"),
    ("a hook returning None", dict(interventions=_varied("on_gradients", NoneGrads)),
     r"NoneGrads.on_gradients returned None, but received a dict with keys '1.weight'"),
    ("a hook returning a list", dict(interventions=_varied("on_gradients", ListGrads)),
     r"ListGrads.on_gradients returned a list of 4, but received a dict"),
    ("an init_state class whose hook returns no pair", dict(interventions=lambda: [NoPair.make_variations(scale=(1.0, 2.0))]),
     r"NoPair.on_gradients must return a pair \(new value, new state\), since NoPair defines init_state"),
    ("ctx.normal with a float stream", dict(interventions=_varied("on_gradients", FloatStream)),
     r"ctx.normal / ctx.uniform name their random stream by strings, integers or integer tensors.*got 0.5 \(float\)"),
]


@pytest.mark.parametrize("settings, message", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_refused_before_anything_is_written_with_the_problem_and_the_fix(experiment, tmp_path,
                                                                                         settings, message):
    store = tmp_path / "runs" / "mistake.zarr"
    with pytest.raises((ValueError, TypeError), match=message):
        built = {k: make() for k, make in settings.items()}  # make_variations refuses some mistakes itself
        experiment(built.pop("interventions", []), store=store, **built)  # epochs= replaces the default steps
    assert not store.exists() and not (tmp_path / "runs").exists()


def test_the_table_holds_at_least_30_distinct_mistakes():
    assert len({m[0] for m in MISTAKES}) == len(MISTAKES) >= 30


def test_a_list_for_betas_is_the_pair_a_user_means(experiment):
    exp = experiment([Optimizer.make_variations(optimizer=torch.optim.Adam, lr=1e-3, betas=[0.9, 0.99])])
    assert exp.grid.learners[0].setup.optimizer_values["betas"] == (0.9, 0.99)
    pairs = Optimizer.make_variations(optimizer=torch.optim.Adam, betas=[[0.9, 0.99], (0.8, 0.9)])
    assert [v.values["betas"] for v in pairs] == [(0.9, 0.99), (0.8, 0.9)]
    same = experiment([], optimizer=Optimizer(torch.optim.Adam, lr=1e-3, betas=[0.9, 0.99]))
    assert same.grid.learners[0].id == exp.grid.learners[0].id


def test_batchnorm_with_a_last_batch_of_one_is_fine_when_the_schedule_never_reaches_it(experiment):
    exp = experiment(model=BatchNormNet(), batch_size=73, steps=6)  # 7 batches of 73 per epoch, then 1
    assert exp.plan().to_train == 1


@pytest.mark.parametrize("store", [123, 1.5, ["runs/a.zarr"]])
def test_a_store_that_is_not_a_path_is_refused(experiment, store):
    with pytest.raises(ValueError, match=r"store= takes the path of the Zarr store \(a str or pathlib.Path"):
        experiment(store=store)


def test_a_buffer_forward_leaves_alone_and_batchnorm_statistics_are_fine(experiment):
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = BatchNormNet()
            self.register_buffer("scale", torch.full((40,), 0.5))

        def forward(self, x):
            return self.body(x * self.scale)

    assert experiment(model=Constant(), steps=2).plan().to_train == 1


def test_hooks_that_keep_their_inputs_kind_pass_the_trial_step(experiment):
    """The output check refuses only what is wrong: the same keys, dtypes and shapes pass, whatever the order."""
    def reordered(grads, n, ctx):
        return {k: grads[k] * n.scale for k in reversed(list(grads))}

    assert len(experiment([_hook("on_gradients", reordered).make_variations(scale=(1.0, 2.0))], steps=2).grid.learners) == 2
