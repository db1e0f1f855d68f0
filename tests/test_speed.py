"""The fast paths give the plain path's numbers: convolution strategies, pooling, the serial plan, the optimizer on
stacked tensors, grouped evaluation, the compiled step; and memory planning for large grids.

Tolerances: float64 gradients agree to 1e-12 relative (only the order of float additions differs); float32 steps
agree to float32 rounding from a shared state; what is claimed bitwise is compared with torch.equal.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from serimats_func.acceleration import compile_record, convolutions, plan_cache
from serimats_func.acceleration import prepare as acceleration
from serimats_func.core import pytrees
from serimats_func.core.evaluation import evaluate_dataset, make_logits
from serimats_func.core.learners import initial_model_states, prepare_template
from serimats_func.core.step import stacked_update
from serimats_func.interventions import InitWeights, Intervention, PerturbGradients
from serimats_func.models import MLP, Lenet5
from serimats_func.optimizers import functional_twin
from serimats_func.run import planning


class SmallConvNet(nn.Module):
    """Every convolution case: shared input with bias, strided/dilated/grouped own input, no bias, a Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, dilation=1, groups=2)
        self.conv3 = nn.Conv2d(6, 6, 2, padding=1, dilation=2, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.conv1d = nn.Conv1d(6, 3, 2)
        self.fc = nn.LazyLinear(10)

    def forward(self, x):  # (B, 1, 12, 12)
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 4, 6, 6)
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))  # (B, 6, 2, 2)
        x = self.conv1d(x.flatten(2))  # (B, 3, 3)
        return self.fc(x.flatten(1))


def _setup(model, dtype, n=3, batch=5, shape=(1, 12, 12)):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=gen)
    template = prepare_template(model, x[:2].float()).to(dtype)
    params = {k: v.to(dtype) for k, v in initial_model_states(template, list(range(n)), [0] * n).params.items()}
    own_x = torch.rand(n, batch, *shape, generator=gen, dtype=dtype)
    return template, params, x, own_x, y


def _grads(model, params, x, y, shared):
    def loss(p, x):
        return F.cross_entropy(functional_call(model, (p, {}), (x,)), y)

    return vmap(grad(loss), in_dims=(0, None if shared else 0))(params, x)


def _relative(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize("plan", [p for p, plan in convolutions.PLANS.items() if p != "vmap" and not plan.per_learner])
def test_each_convolution_plan_gives_vmaps_gradients_in_float64(plan):
    template, params, x, own_x, y = _setup(SmallConvNet(), torch.float64)
    fast = convolutions.accelerate(template, convolutions.plan_for(template, plan))
    assert isinstance(fast.conv1, convolutions.VmapConv) and isinstance(fast.pool, convolutions.VmapMaxPool2d)
    for data, shared in ((x, True), (own_x, False)):
        assert _relative(_grads(fast, params, data, y, shared), _grads(template, params, data, y, shared)) < 1e-12


@pytest.mark.parametrize("plan", ["gemm", "channels_last", "loop"])
def test_lenet5_step_of_each_plan_agrees_with_vmap_to_float32_rounding(plan, mnist_digits):
    template, params, _, _, _ = _setup(Lenet5(), torch.float32, n=4, shape=(1, 28, 28))
    x, y = mnist_digits[0][:16], mnist_digits[1][:16]
    fast = convolutions.accelerate(template, convolutions.plan_for(template, plan))
    ours, reference = _grads(fast, params, x, y, True), _grads(template, params, x, y, True)
    assert _relative(ours, reference) < 1e-4
    np.testing.assert_allclose(make_logits(template, convolutions.plan_for(template, plan))(params, {}, x),
                               make_logits(template)(params, {}, x), rtol=1e-4, atol=1e-5)


def test_max_pooling_folded_into_channels_is_bitwise_torchs_values_and_gradients():
    x = torch.randn(3, 4, 2, 6, 6)  # (N, B, C, H, W), with ties: a plateau in every window of one corner
    x[..., :2, :2] = 0.5
    weights = torch.randn(4, 2, 3, 3)  # a different weight on every output, so that misrouted gradients show

    def values_and_gradients(pool):
        return vmap(pool)(x), vmap(grad(lambda t: (pool(t) * weights).sum()))(x)

    ours = values_and_gradients(convolutions.VmapMaxPool2d(nn.MaxPool2d(2)))
    torch.testing.assert_close(ours, values_and_gradients(nn.MaxPool2d(2)), rtol=0, atol=0)


def test_the_serial_plan_gives_the_vmapped_steps_numbers(experiment):
    from serimats_func.run import training

    exp = experiment([InitWeights.make_variations(seed=range(3)), PerturbGradients.make_variations(noise=(0.0, 0.1))],
                     model=SmallConvNet(), data=_image_data(), dtype=torch.float64)
    specs = exp.grid.learners
    hooks, twin = training.chunk_hooks(specs), training.chunk_optimizer(specs)
    state = training.initial_state(specs, hooks, torch.device("cpu"))
    x, y = exp.base.data.x[:8], exp.base.data.y[:8]
    steps = {per: training.make_train_step(specs[0].setup.template, twin, exp.loss, hooks, shared_batch=True,
                                           per_learner=per) for per in (False, True)}
    a = b = state
    with torch.no_grad():
        for t in range(3):
            (a, _), (b, _) = steps[False](a, x, y, torch.tensor(t)), steps[True](b, x, y, torch.tensor(t))
    assert _relative(b.params, a.params) < 1e-12
    template = specs[0].setup.template.eval()  # and its evaluation, one learner after another
    vmapped, looped = (training.make_logits(template, per_learner=per)(a.params, a.buffers, x) for per in (False, True))
    template.train()
    assert looped.shape == vmapped.shape == (len(specs), 8, 10)
    torch.testing.assert_close(looped, vmapped, rtol=1e-12, atol=1e-12)


def _image_data():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(48, 1, 12, 12, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    return (x, y), (x[:16], y[:16])


@pytest.mark.parametrize("torch_class,values", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
                                                (torch.optim.Adam, dict(lr=1e-3, amsgrad=True)),
                                                (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1))])
def test_the_optimizer_on_stacked_tensors_is_bitwise_the_vmapped_one(torch_class, values):
    twin = functional_twin(torch_class, **values)
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, 5, generator=gen), "b": torch.randn(4, 5, generator=gen)}
    state = vmap(twin.init)(params)
    hparams = pytrees.stack([twin.hparams(**{**values, "lr": lr}) for lr in (1e-3, 2e-3, 1e-2, 0.1)])
    ours, reference = (params, state), (params, state)
    for _ in range(3):
        grads = pytrees.tree_map(lambda t: torch.randn(t.shape, generator=gen), params)
        ours = stacked_update(twin, grads, ours[1], ours[0], hparams)
        reference = vmap(twin.update)(grads, reference[1], reference[0], hparams)
    for a, b in zip(pytrees.leaves(ours), pytrees.leaves(reference), strict=True):
        assert torch.equal(a, b)


def test_evaluating_learners_in_groups_gives_bitwise_the_same_metrics(small_mnist1d):
    x, y = small_mnist1d[0].tensors
    template = prepare_template(MLP(widths=(32,)), x[:2]).eval()
    state = initial_model_states(template, list(range(7)), [0] * 7)
    logits = make_logits(template)
    whole = evaluate_dataset(logits, F.cross_entropy, state.params, state.buffers, x, y, 100)
    for group in (2, 3, 4):  # 7 = 3 + 3 + 1: a lone last learner is evaluated with its neighbour
        torch.testing.assert_close(evaluate_dataset(logits, F.cross_entropy, state.params, state.buffers, x, y,
                                                    64, learners_per_pass=group), whole, rtol=0, atol=0)


def test_a_short_run_measures_nothing_and_compiles_nothing(experiment):
    exp = experiment([InitWeights.make_variations(seed=range(2))], model=Lenet5(), data=_image_data_28(), steps=4)
    exp.run()
    (report,) = exp.speed_report
    assert not report.compiled and not report.plan_measured and report.compile_s == 0
    assert report.plan == acceleration.default_plan(torch.device("cpu"), 2)
    assert report.layers == ({} if report.plan == "serial" else convolutions.plan_for(exp.template, report.plan))


def _image_data_28():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    return (x, y), (x[:32], y[:32])


@pytest.mark.slow
def test_the_compiled_step_agrees_with_the_plain_step_step_by_step(experiment):
    """A convolutional model with the gemm plan and a gradient intervention under torch.compile(fullgraph=True),
    three steps from a shared state, float32. Traced by dynamo and AOTAutograd as in training, but with the
    aot_eager backend: inductor's kernels would take minutes to build on a cold cache (benchmarks/ run them)."""
    from serimats_func.run import training

    exp = experiment([InitWeights.make_variations(seed=range(2)), PerturbGradients.make_variations(noise=(0.0, 0.1))],
                     model=SmallConvNet(), data=_image_data())
    specs = exp.grid.learners
    hooks, twin = training.chunk_hooks(specs), training.chunk_optimizer(specs)
    template = specs[0].setup.template
    state = training.initial_state(specs, hooks, torch.device("cpu"))
    x, y = exp.base.data.x[:8], exp.base.data.y[:8]
    plain = training.make_train_step(template, twin, exp.loss, hooks, shared_batch=True)
    fast = torch.compile(training.make_train_step(template, twin, exp.loss, hooks, shared_batch=True,
                                                  layers=convolutions.plan_for(template, "gemm")),
                         fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for t in range(3):
            ours, loss = fast(state, x, y, torch.tensor(t))
            reference, reference_loss = plain(state, x, y, torch.tensor(t))
            torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.params, reference.params, rtol=1e-5, atol=1e-6)
            state = reference


@pytest.mark.slow
def test_an_experiment_with_compile_reports_the_compile_time_apart_and_matches_eager(experiment, monkeypatch):
    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "aot_eager")
    grid = [InitWeights.make_variations(seed=range(3))]
    compiled = experiment(grid, compile=True, steps=6)
    ds = compiled.run()
    (report,) = compiled.speed_report
    assert report.compiled and report.compile_s > 0
    (entry,) = plan_cache.read_entries(compile_record.FILE_NAME).values()  # recorded: the next run knows it
    assert entry["cold_s"] == report.compile_s and entry["inductor"] == compile_record.inductor_cache()
    eager = experiment(grid, compile=False, steps=6).run()
    np.testing.assert_allclose(ds.train_loss.values, eager.train_loss.values, rtol=1e-5)


class GraphBreakingNoise(Intervention):
    """Gradient noise whose hook breaks torch.compile's graph (as a print or a numpy call in a user's hook would)."""

    axes = {"scale": 0.0}

    def on_gradients(self, grads, n, ctx):
        torch._dynamo.graph_break()
        return {k: g + n.scale * ctx.normal(g.shape, g.dtype, k) for k, g in grads.items()}


@pytest.mark.slow
def test_a_step_that_cannot_compile_trains_eagerly_under_auto_and_fails_clearly_when_forced(experiment, monkeypatch):
    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(acceleration, "MEASURE_MIN_STEPS", 1)  # measure and compile even a short chunk
    monkeypatch.setattr(compile_record, "WARM_COMPILE_SECONDS", 0.0)  # compile whatever the estimate
    monkeypatch.setattr(compile_record, "COLD_COMPILE_SECONDS", {"cpu": 0.0, "cuda": 0.0})
    grid = [GraphBreakingNoise.make_variations(scale=(0.0, 0.01))]
    auto = experiment(grid, steps=6)
    with pytest.warns(UserWarning, match="torch.compile of the training step failed .*eager step"):
        ds = auto.run()
    (report,) = auto.speed_report
    assert not report.compiled and "compiling failed" in report.reason
    eager = experiment(grid, steps=6, compile=False).run()
    np.testing.assert_array_equal(ds.train_loss.values, eager.train_loss.values)
    with pytest.raises(RuntimeError, match="compile=True: torch.compile of the training step failed.*compile=False"):
        experiment(grid, steps=6, compile=True).run()


def test_speed_options_are_checked_with_the_valid_values_named(experiment):
    with pytest.raises(ValueError, match="compile= takes True, False or 'auto'"):
        experiment(compile="yes")
    with pytest.raises(ValueError, match="convolutions= takes 'auto' or one of vmap, grouped"):
        experiment(convolutions="fast")
    with pytest.raises(ValueError, match="precision= takes one of float32, tf32, bf16"):
        experiment(precision="fp16")


def test_results_of_another_precision_are_not_reused_for_float32(experiment, tmp_path):
    store = tmp_path / "shared.zarr"
    experiment([InitWeights(seed=1)], store=store, precision="tf32", steps=4).run()
    again = experiment([InitWeights(seed=1)], store=store, steps=4)
    assert again.plan().to_train == 1
    assert experiment([InitWeights(seed=1)], store=store, precision="tf32", steps=4).plan().to_train == 0


def test_ten_thousand_lenet5_learners_are_chunked_to_fit_the_memory_budget(experiment, monkeypatch, mnist_digits):
    x, y = mnist_digits[0][:256], mnist_digits[1][:256]
    budget = 20 * 2**30  # a mocked device with 20 GiB free for training
    monkeypatch.setattr(planning, "memory_budget", lambda device: budget)
    exp = experiment([InitWeights.make_variations(seed=range(10_000))], model=Lenet5(), data=((x, y), (x, y)),
                     steps=1, batch_size=64, eval_batch_size=1024)
    plan = exp.plan()
    (structure,) = plan.bytes_per_learner
    memory = planning.learner_memory(exp.grid.learners[0], 64, 1024)
    sizes = [len(c.learners) for c in plan.chunks]
    assert sum(sizes) == 10_000 and len(plan.chunks) > 1
    assert max(sizes) * memory.training <= plan.memory_budget < (max(sizes) + 1) * memory.training
    cap = plan.evaluation_learners[structure]  # one evaluation pass fits next to the chunk's state
    assert cap is not None and max(sizes) * memory.state + cap * memory.evaluation <= plan.memory_budget


def test_the_evaluation_working_set_is_counted_in_the_plan_and_grows_with_the_evaluation_batch(experiment, monkeypatch):
    (x, y), test = _image_data_28()
    monkeypatch.setattr(planning, "memory_budget", lambda device: 400 * 2**20)
    exps = {b: experiment([InitWeights.make_variations(seed=range(64))], model=Lenet5(), data=((x, y), test), steps=1,
                          batch_size=16, eval_batch_size=b) for b in (64, 512)}
    spec = exps[64].grid.learners[0]
    acts = planning.activation_bytes(spec.setup.template, spec.setup.template_info.example_x)
    logits = 64 * 10 * 4  # the largest set's logits (64 examples, 10 classes, float32)
    caps = {}
    for b, exp in exps.items():
        memory = planning.learner_memory(spec, 16, b)
        assert memory.evaluation == int(planning.VMAP_ACTIVATIONS * b * planning.EVAL_LAYER_OUTPUTS * acts.largest) + 2 * logits
        plan = exp.plan()
        (structure,) = plan.evaluation_learners
        cap, chunk = plan.evaluation_learners[structure], max(len(c.learners) for c in plan.chunks)
        passes = chunk if cap is None else cap
        assert chunk * memory.state + passes * memory.evaluation <= plan.memory_budget
        caps[b] = cap
    small, large = caps[64], caps[512]
    assert large is not None and (small is None or large < small)  # a larger evaluation batch: fewer learners a pass


def test_evaluation_writes_each_batch_into_one_logits_tensor_with_the_concatenation_s_numbers(small_mnist1d):
    x, y = small_mnist1d[0].tensors
    x, y = x[:300], y[:300]  # 300 = 2 * 128 + 44: an uneven last batch
    template = prepare_template(MLP(widths=(32,)), x[:2]).eval()
    state = initial_model_states(template, list(range(3)), [0] * 3)
    logits = make_logits(template)
    whole = torch.cat([logits(state.params, state.buffers, x[s : s + 128]) for s in range(0, 300, 128)], dim=1)
    loss, accuracy, predicted = evaluate_dataset(logits, F.cross_entropy, state.params, state.buffers, x, y, 128,
                                                 predictions=True)
    assert torch.equal(loss, vmap(F.cross_entropy, in_dims=(0, None))(whole, y).double())
    assert torch.equal(predicted, whole.argmax(-1))


def test_the_memory_estimate_counts_what_autograd_keeps_not_the_parameters():
    template = prepare_template(Lenet5(), torch.rand(2, 1, 28, 28))
    acts = planning.activation_bytes(template, torch.rand(4, 1, 28, 28))
    conv1_out = 6 * 28 * 28 * 4  # bytes per example of the largest layer output
    assert acts.largest == conv1_out
    assert 2 * conv1_out < acts.saved < 4 * conv1_out  # conv1 and its ReLU output, pooling indices, ...: no weights
