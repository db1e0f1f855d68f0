"""Augmentation in the training step (``Augment``): torchvision's own operations on the same draws, a plain
PyTorch loop that augments by hand, the same learner alone and in a batch, and datasets with random transforms
refused when the Experiment is built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from serimats_func.core import keys
from serimats_func.core.step import StepContext
from serimats_func.interventions import Augment, InitWeights, Numbers
from serimats_func.models import MLP
from serimats_func.run.grid import class_name
from serimats_func.run.training import _tensor
from tests.reference import Twin, windows_hold

KEY = keys.derive_key(0, "Augment", 0)


def cifar_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped images (n, 3, 32, 32) in [0, 1]: a class template (a coloured blob at a class position) on
    noise, so that a small network learns them in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = 0.3 * torch.rand(n, 3, 32, 32, generator=gen)
    colours = torch.rand(10, 3, generator=gen)
    for i, label in enumerate(y.tolist()):
        r, c = 4 + 2 * label, 4 + (7 * label) % 20
        x[i, :, r : r + 8, c : c + 8] += colours[label][:, None, None]
    return x, y


@pytest.fixture(scope="module")
def cifar():
    return cifar_like(256, 0), cifar_like(64, 1)


def uniform(key: int, shape, *stream) -> torch.Tensor:
    """The library's uniform numbers for a class key and a stream, drawn outside any vmap."""
    k = torch.tensor(key, dtype=torch.int64)
    for part in stream:
        k = keys.fold_in(k, keys.string_key(part) if isinstance(part, str) else part)
    return keys.uniform(k, tuple(shape))


def augmented(v: Augment, x: torch.Tensor, key: int = KEY, step: int = 0) -> torch.Tensor:
    """The library's augmentation of one learner's batch x (B, ...) at ``step``, called as the step calls it."""
    ctx = StepContext(torch.tensor(step), torch.tensor(key, dtype=torch.int64))
    out, _ = v.on_batch((x, torch.zeros(len(x), dtype=torch.int64)), Numbers(_tensor(v.numbers(None))), ctx)
    return out


def by_hand(v: Augment, x: torch.Tensor, key: int, step: int) -> torch.Tensor:
    """The same augmentation with torchvision's functional operations, example by example, from the same draws:
    pad + crop (RandomCrop), an integer affine translation (RandomAffine), hflip (RandomHorizontalFlip)."""
    b, (h, w) = len(x), x.shape[-2:]
    p, f = v.values["crop"], v.values["translate"]
    crop_u, translate_u = uniform(key, (b, 2), "crop", step), uniform(key, (b, 2), "translate", step)
    flip_u = uniform(key, (b,), "flip", step)
    z = keys.normal(keys.fold_in(keys.fold_in(torch.tensor(key), keys.string_key("noise")), step), x.shape, x.dtype)
    out = []
    for e in range(b):
        img = x[e]
        if p:
            i, j = (min(int(torch.floor(u * (2 * p + 1))), 2 * p) for u in crop_u[e])
            img = TF.crop(TF.pad(img, [p]), i, j, h, w)
        if f:
            tx, ty = (int(torch.round((2 * u - 1) * f * size)) for u, size in zip(translate_u[e], (w, h), strict=True))
            img = TF.affine(img, angle=0.0, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0],
                            interpolation=InterpolationMode.NEAREST, fill=0.0)
        if v.values["flip"] and flip_u[e] < 0.5:
            img = TF.hflip(img)
        out.append(img)
    return torch.stack(out) + v.values["noise"] * z


# -- the transforms, against torchvision on the same draws ------------------------------------------------------


@pytest.mark.parametrize("settings", [{"crop": 4}, {"flip": True}, {"crop": 4, "flip": True}, {"translate": 0.125},
                                      {"crop": 2, "translate": 0.1, "flip": True, "noise": 0.05}])
def test_each_transform_is_torchvisions_operation_on_the_same_draws(settings):
    x = torch.rand(64, 3, 32, 32, dtype=torch.float64)
    v = Augment(**settings)
    for step in (0, 7):
        torch.testing.assert_close(augmented(v, x, step=step), by_hand(v, x, KEY, step), rtol=0, atol=0)


def test_each_example_gets_its_own_crop_and_flip_and_all_offsets_occur():
    b, p = 512, 4
    crop_u, flip_u = uniform(KEY, (b, 2), "crop", 3), uniform(KEY, (b,), "flip", 3)
    offsets = torch.minimum(torch.floor(crop_u * (2 * p + 1)), torch.tensor(2 * p))
    assert set(offsets.flatten().tolist()) == set(range(2 * p + 1))  # every offset 0..8, as RandomCrop draws them
    assert 0.4 < float((flip_u < 0.5).double().mean()) < 0.6
    x = torch.rand(b, 3, 32, 32)
    out = augmented(Augment(crop=p, flip=True), x, step=3)
    moved = [not torch.equal(out[e], x[e]) for e in range(b)]
    assert 0.9 < np.mean(moved) < 1.0  # a few examples draw offset (4, 4) and no flip: left as they are


def test_different_steps_and_keys_give_different_draws_and_the_same_step_the_same():
    x = torch.rand(32, 3, 32, 32)
    v = Augment(crop=4, flip=True, noise=0.01)
    first = augmented(v, x, step=5)
    assert torch.equal(first, augmented(v, x, step=5))
    assert not torch.equal(first, augmented(v, x, step=6))
    assert not torch.equal(first, augmented(v, x, key=keys.derive_key(0, "Augment", 1), step=5))


def test_under_vmap_each_learner_gets_its_own_draws_the_same_as_alone():
    x = torch.rand(16, 3, 32, 32)  # a shared batch: unbatched under vmap, as the step gives it
    learners = torch.tensor([keys.derive_key(0, "Augment", s) for s in range(5)])  # (N,)
    v = Augment(crop=4, translate=0.1, flip=True, noise=0.1)
    n = Numbers(_tensor(v.numbers(None)))

    def one(key):
        return v.on_batch((x, torch.zeros(16, dtype=torch.int64)), n, StepContext(torch.tensor(2), key))[0]

    batched = torch.func.vmap(one)(learners)  # (N, B, 3, 32, 32)
    for i, key in enumerate(learners.tolist()):
        assert torch.equal(batched[i], augmented(v, x, key=key, step=2))
    assert not torch.equal(batched[0], batched[1])


def test_at_its_defaults_augment_changes_nothing_bitwise():
    x = torch.randn(8, 3, 5, 5)
    assert Augment().is_default() and Augment(seed=3).is_default()
    assert torch.equal(augmented(Augment(crop=0, translate=0.0, flip=False, noise=0.0), x), x)


# -- in the training step -----------------------------------------------------------------------------------------


class AugmentTwin(Twin):
    """Augmentation by hand: a forward pre-hook that applies torchvision's operations (``by_hand``) to the batch in
    training steps inside the windows; evaluation (the module in eval mode) sees the data as it is."""

    def __init__(self, spec, data):
        super().__init__(spec, data)
        self.v = next(v for v in spec.interventions if isinstance(v, Augment))
        self.key = spec.keys[class_name(Augment)]
        self.module.register_forward_pre_hook(self.hook)

    def hook(self, _module, inputs):
        if not self.module.training or self.v.is_default() or not windows_hold(self.v.values["when"], self.step):
            return None
        return (by_hand(self.v, inputs[0], self.key, self.step),)


def test_training_with_augment_matches_a_plain_pytorch_loop_that_augments_by_hand(experiment, cifar):
    (x, y), test = cifar
    exp = experiment([Augment.make_variations(crop=(0, 4), flip=(False, True)),
                      Augment.make_variations(translate=0.1, noise=0.02, seed=1, when=(20, 45))],
                     model=MLP(widths=(16,)), data=((x[:128], y[:128]), test), dtype=torch.float64, steps=60, log_every=20,
                     batch_size=16)
    assert len(exp.grid.learners) == 5
    ds = exp.run()
    data = (exp.base.data.x, exp.base.data.y)
    for cell, spec in exp.grid.cells:
        expected = AugmentTwin(spec, data).run(60, 20)
        for step, value in expected.items():
            assert ds.train_loss.values[cell][ds.step.values.tolist().index(step)] == pytest.approx(value, rel=1e-10, abs=0)
    final = ds.train_loss.isel(step=-1).values
    assert len(set(final[~np.isnan(final)].tolist())) == 5  # every augmentation changed its learner


def test_cifar_shaped_data_trains_with_random_crop_and_flip_and_a_learner_is_bitwise_the_same_alone(experiment, cifar):
    train, test = cifar
    grid = [Augment.make_variations(crop=(0, 4), flip=(False, True)), InitWeights.make_variations(seed=range(3))]
    batch = experiment(grid, model=MLP(widths=(32,)), data=(train, test), steps=24, log_every=8).run()
    alone = experiment([Augment(crop=4, flip=True), InitWeights(seed=1)], model=MLP(widths=(32,)), data=(train, test),
                       steps=24, log_every=8).run()
    assert dict(batch.sizes) == {"crop": 2, "flip": 2, "seed": 3, "step": 4}
    for metric in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_array_equal(batch[metric].sel(crop=4, flip=True, seed=1).values, alone[metric].values)
    loss = batch.train_loss
    assert float(loss.isel(step=-1).max()) < float(loss.isel(step=0).min())  # every learner learns
    assert float(batch.train_acc.sel(crop=4, flip=True).isel(step=-1).mean()) > 0.3  # chance is 0.1
    assert loss.sel(crop=4, flip=True, seed=1, step=24) != loss.sel(crop=0, flip=False, seed=1, step=24)


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                                 nn.Linear(8 * 8 * 8, 10))

    def forward(self, x):
        return self.net(x)


def test_a_conv_net_learner_with_augment_is_the_same_alone_to_float32_rounding(experiment, cifar):
    train, test = cifar
    grid = [Augment.make_variations(crop=(2, 4), flip=True), InitWeights.make_variations(seed=range(3))]
    batch = experiment(grid, model=SmallConvNet(), data=(train, test), steps=8, log_every=4).run()
    alone = experiment([Augment(crop=4, flip=True), InitWeights(seed=2)], model=SmallConvNet(), data=(train, test),
                       steps=8, log_every=4).run()
    for metric in ("train_loss", "test_loss"):
        np.testing.assert_allclose(batch[metric].sel(crop=4, seed=2).values, alone[metric].values, rtol=1e-5)
    assert batch.train_loss.sel(crop=4, seed=2, step=8) != batch.train_loss.sel(crop=2, seed=2, step=8)


def test_augment_at_its_defaults_names_no_intervention_and_the_settings_are_part_of_the_id(experiment, cifar):
    exp = experiment([Augment.make_variations(crop=(0, 4), flip=(False, True))], model=MLP(widths=(8,)), data=cifar)
    plain = experiment([], model=MLP(widths=(8,)), data=cifar)
    ids = {(s.coords["crop"], s.coords["flip"]): s.id for s in exp.grid.learners}
    assert ids[(0, False)] == plain.grid.learners[0].id  # a learner without augmentation keeps its id
    assert len(set(ids.values())) == 4
    again = experiment([Augment.make_variations(crop=(0, 4), flip=(False, True))], model=MLP(widths=(8,)), data=cifar)
    assert {s.id for s in again.grid.learners} == set(ids.values())  # the same on every build: reused


def test_augment_refuses_bad_values_and_image_transforms_on_data_without_height_and_width(experiment):
    for settings, message in [({"crop": -1}, "crop= is the padding in pixels"), ({"crop": 2.5}, "integer >= 0"),
                              ({"flip": 0.5}, "flip= is True"), ({"translate": 2}, r"in \[0, 1\]"),
                              ({"noise": -0.1}, "standard deviation")]:
        with pytest.raises(ValueError, match=message):
            Augment(**settings)
    with pytest.raises(ValueError, match=r"crop= acts on images.*examples have shape \(40,\)"):
        experiment([Augment(crop=4)])  # MNIST-1D: 40 numbers per example
    experiment([Augment(noise=0.1)])  # noise takes any shape


# -- random dataset transforms are refused --------------------------------------------------------------------


class InMemory(torch.utils.data.Dataset):
    """A torchvision-style dataset: tensors in memory and a ``transform`` applied on each read."""

    def __init__(self, x, y, transform=None):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i] if self.transform is None else self.transform(self.x[i])), int(self.y[i])


def test_a_dataset_with_a_random_torchvision_transform_is_refused_with_augment_as_the_fix(experiment, cifar):
    (x, y), test = cifar
    rotating = InMemory(x[:32], y[:32], T.Compose([T.Normalize((0.5,) * 3, (0.25,) * 3), T.RandomRotation(30)]))
    model = MLP(widths=(8,))  # building a module draws from the global RNG
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"(?s)two reads of item 0.*RandomRotation\(degrees=\[-30\.0, 30\.0\].*"
                                         r"interventions\.Augment.*Augment\(crop=4, flip=True\)"):
        experiment([], model=model, data=(rotating, test))
    assert torch.equal(torch.get_rng_state(), before)  # the transform's draws did not move the global RNG
    flipping = torch.utils.data.Subset(InMemory(x[:32], y[:32], T.RandomHorizontalFlip()), range(16))
    with pytest.raises(ValueError, match=r"test_dataset gives different values .*RandomHorizontalFlip\(p=0\.5\)"):
        experiment([], model=MLP(widths=(8,)), data=((x, y), flipping))


def test_a_deterministic_transform_is_accepted_and_its_values_are_the_data(experiment, cifar):
    (x, y), test = cifar
    normalize = T.Normalize((0.5,) * 3, (0.25,) * 3)
    exp = experiment([Augment(crop=4)], model=MLP(widths=(8,)), data=(InMemory(x[:32], y[:32], normalize), test))
    assert torch.equal(exp.base.data.x, normalize(x[:32]))


@pytest.mark.slow
def test_the_step_with_augment_compiles_as_one_graph_and_matches_eager(experiment, cifar, monkeypatch):
    from serimats_func.acceleration import prepare as acceleration

    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "aot_eager")
    grid = [Augment.make_variations(crop=(0, 4), translate=0.1, flip=True, noise=0.01)]
    compiled = experiment(grid, model=MLP(widths=(16,)), data=cifar, compile=True, steps=6)
    ds = compiled.run()
    (report,) = compiled.speed_report
    assert report.compiled
    eager = experiment(grid, model=MLP(widths=(16,)), data=cifar, compile=False, steps=6).run()
    np.testing.assert_allclose(ds.train_loss.values, eager.train_loss.values, rtol=1e-5)
