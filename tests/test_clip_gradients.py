"""ClipGradients against torch.nn.utils.clip_grad_norm_: a trajectory in float64 (with a window and per-learner
max_norm), the inf norm, one float32 step from shared gradients, and bad values."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from serimats_func.interventions import ClipGradients, Numbers, PerturbGradients
from serimats_func.run.training import _tensor
from tests.reference import Twin, windows_hold
from tests.test_interventions import F64, assert_matches_twins


class ClipTwin(Twin):
    """clip_grad_norm_ right before optimizer.step(), in the window (after noise added to .grad, if any)."""

    def on_grads(self, step):
        v = next(v for v in self.spec.interventions if isinstance(v, ClipGradients))
        if windows_hold(v.values["when"], step) and not v.is_default():
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), v.values["max_norm"], v.values["norm_type"])


@pytest.mark.parametrize(("norm_type", "max_norms"), [(2.0, (math.inf, 0.5, 0.05)), (math.inf, (math.inf, 0.05, 0.005))])
def test_clip_gradients_matches_clip_grad_norm_over_200_steps_in_float64(experiment, norm_type, max_norms):
    exp = experiment([ClipGradients.make_variations(max_norm=max_norms, norm_type=norm_type, when=(10, 150))], **F64)
    ds = assert_matches_twins(exp, ClipTwin)
    assert ds.max_norm.values.tolist() == list(max_norms)
    assert len(set(ds.train_loss.isel(step=-1).values.tolist())) == 3  # the clips do act


def test_clipping_runs_after_the_other_gradient_hooks_as_a_clip_right_before_the_step(experiment):
    class NoisyClipTwin(ClipTwin):
        def on_grads(self, step):
            for p in self.module.parameters():  # PerturbGradients' scale first, then the clip
                p.grad = p.grad * 2.0
            super().on_grads(step)

    exp = experiment([ClipGradients(max_norm=0.1), PerturbGradients(scale=2.0)], **F64)
    assert_matches_twins(exp, NoisyClipTwin)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_one_float32_step_of_clipping_matches_clip_grad_norm_from_the_same_gradients(norm_type):
    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in module.named_parameters()}
    clip = ClipGradients(max_norm=0.3, norm_type=norm_type)
    ours = clip.on_gradients(grads, Numbers(_tensor(clip.numbers(None))), SimpleNamespace(step=torch.tensor(0)))
    for n, p in module.named_parameters():
        p.grad = grads[n].clone()
    total = torch.nn.utils.clip_grad_norm_(module.parameters(), 0.3, norm_type)
    assert total > 0.3  # it clips
    for n, p in module.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-6, atol=1e-8, msg=n)
        assert ours[n].dtype == torch.float32


def test_a_learner_that_clips_nothing_is_bitwise_the_learner_without_the_class(experiment):
    with_class = experiment([ClipGradients.make_variations(max_norm=(math.inf, 1e6))], log_every=4).run()
    without = experiment([], log_every=4).run()
    np.testing.assert_array_equal(with_class.train_loss.sel(max_norm=math.inf).values, without.train_loss.values)
    np.testing.assert_array_equal(with_class.train_loss.sel(max_norm=1e6).values, without.train_loss.values)


@pytest.mark.parametrize(("values", "message"), [({"max_norm": -1.0}, "max_norm must be >= 0"),
                                                 ({"max_norm": math.nan}, "must be a number"),
                                                 ({"norm_type": 0}, "norm_type must be > 0")])
def test_bad_clip_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        ClipGradients(**values)
