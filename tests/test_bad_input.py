"""Bad input fails before training, with an error that names the problem; nothing is written."""

import math

import pytest
import torch

from serimats_func import Experiment
from serimats_func.interventions import InitWeights, Optimizer, PerturbWeights
from serimats_func.models import MLP, Lenet5


@pytest.fixture
def build(small_mnist1d, store):
    train, test = small_mnist1d

    def build(model=None, interventions=(), **kw):
        return Experiment(model or MLP(), train, list(interventions), test_dataset=test, store=store, progress=False, **kw)

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


def test_a_variation_given_twice_is_one_learner_and_a_new_axis_becomes_a_dimension(small_mnist1d, store):
    train, _ = small_mnist1d
    exp = Experiment(MLP(), train, [PerturbWeights.make_variations(epsilon=0.1, seed=1),
                                    PerturbWeights.make_variations(epsilon=0.1, seed=1),
                                    PerturbWeights.make_variations(epsilon=0.1, seed=1, mode="absolute")], store=store)
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


def test_bad_datasets_are_refused(store):
    x = torch.randn(10, 40)
    with pytest.raises(ValueError, match="dataset has 10 inputs but 9 labels"):
        Experiment(MLP(), (x, torch.zeros(9, dtype=torch.long)), store=store)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        Experiment(MLP(), (x, torch.rand(10)), store=store)
    with pytest.raises(ValueError, match="dataset is empty"):
        Experiment(MLP(), (x[:0], torch.zeros(0, dtype=torch.long)), store=store)
    with pytest.raises(ValueError, match=r"test_dataset inputs have shape \(20,\) but dataset inputs \(40,\)"):
        Experiment(MLP(), (x, torch.zeros(10, dtype=torch.long)), test_dataset=(torch.randn(5, 20), torch.zeros(5).long()),
                   store=store)
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


def test_inputs_with_nan_are_refused(store):
    x = torch.randn(8, 40)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="dataset inputs contain NaN"):
        Experiment(MLP(), (x, torch.zeros(8, dtype=torch.long)), store=store)


def test_a_store_path_below_a_file_is_refused_before_training(small_mnist1d, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="file.txt is not a folder"):
        Experiment(MLP(), small_mnist1d[0], store=tmp_path / "file.txt" / "sub" / "s.zarr")


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
