"""Metrics at chosen steps: ``@register_metric(every=..., at=...)`` and ``Experiment(metrics=...)`` record a metric
only where asked (bitwise the values of the same metric recorded at every logged step, NaN elsewhere), compute it
only there, key it by its schedule in the store, and keep it through forks and resumed checkpoints."""

import numpy as np
import pytest

from serimats_func.core import metrics
from serimats_func.core.metrics import When
from serimats_func.interventions import InitWeights, PerturbMomentum, PerturbWeights
from serimats_func.loggers import Logger, register_metric
from serimats_func.run import recording
from tests.watching import CountSteps

CONTROL_GRID = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
                PerturbWeights.make_variations(epsilon=0.01, seed=(0, 1))]


class Scheduled(Logger):
    """One weight norm and one per-unit norm, each at every logged step and at chosen steps."""

    @register_metric
    def norm(self, learner):
        return learner.model[1].weight.norm()

    @register_metric(every=4)
    def norm_every_4(self, learner):
        return learner.model[1].weight.norm()

    @register_metric(at=[3, 16])
    def norm_at(self, learner):
        return learner.model[1].weight.norm()

    @register_metric(dims=("unit",))
    def units(self, learner):
        return learner.model[1].weight.norm(dim=1)

    @register_metric(every=8, at=[3], dims=("unit",))
    def units_sparse(self, learner):
        return learner.model[1].weight.norm(dim=1)


def assert_at_chosen_steps(scheduled, reference, when: When) -> None:
    """``scheduled`` equals ``reference`` bitwise at the steps ``when`` chooses, and is NaN at the other steps."""
    steps = scheduled.step.values
    due = np.array([when.due(int(s)) for s in steps])
    assert due.any() and not due.all()
    np.testing.assert_array_equal(scheduled.isel(step=np.flatnonzero(due)).values,
                                  reference.isel(step=np.flatnonzero(due)).values)
    assert np.isnan(scheduled.isel(step=np.flatnonzero(~due)).values).all()
    assert np.isfinite(scheduled.isel(step=np.flatnonzero(due)).values).any()


def test_a_logger_metric_at_chosen_steps_is_bitwise_the_every_step_metric_there_and_nan_elsewhere(experiment):
    exp = experiment(CONTROL_GRID, logger=Scheduled(), log_every=2, compile=False)
    assert exp.schedule.log_steps == (0, 2, 3, 4, 6, 8, 10, 12, 14, 16)  # at=[3] is logged, for every metric
    ds = exp.run()
    assert ds.norm_at.dims == ds.norm.dims and ds.units_sparse.dims == ds.units.dims  # one step coordinate
    assert_at_chosen_steps(ds.norm_every_4, ds.norm, When(every=4))
    assert_at_chosen_steps(ds.norm_at, ds.norm, When(at=(3, 16)))
    assert_at_chosen_steps(ds.units_sparse, ds.units, When(every=8, at=(3,)))
    assert [s for s in ds.step.values if not np.isnan(ds.norm_at.sel(epsilon=0.01, seed=1, step=s))] == [3, 16]


def test_built_in_metrics_are_recorded_at_the_steps_metrics_chooses_or_dropped(experiment):
    chosen = {"test_acc": dict(every=8), "control_distance": dict(at=[0, 5]),
              "control_layer_distance": dict(every=4, at=[5]), "train_loss": False}
    exp = experiment(CONTROL_GRID, metrics=chosen, log_every=2, compile=False)
    reference = experiment(CONTROL_GRID, log_every=2, log_at=[5], compile=False).run()
    assert list(exp.schedule.log_steps) == reference.step.values.tolist()
    ds = exp.run()
    assert "train_loss" not in ds and "train_loss" not in exp.metric_names()
    assert_at_chosen_steps(ds.test_acc, reference.test_acc, When(every=8))
    assert_at_chosen_steps(ds.control_distance, reference.control_distance, When(at=(0, 5)))
    assert_at_chosen_steps(ds.control_layer_distance, reference.control_layer_distance, When(every=4, at=(5,)))
    for name in ("train_acc", "test_loss", "param_norm", "control_cosine", "control_agreement"):
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)


def counting(monkeypatch) -> dict:
    """Counts, per name, the real (not shape-only) vmapped computations of custom metrics in the recorder, and
    under "evaluations" the passes over a whole data set."""
    counts = {"evaluations": 0}
    make, evaluate = recording.vmapped_metrics, recording.evaluate_dataset

    def vmapped(template, fns, *args, **kwargs):
        run = make(template, fns, *args, **kwargs)

        def counted(params, buffers, *a, **k):
            if not next(iter(params.values())).is_meta:
                for name in fns:
                    counts[name] = counts.get(name, 0) + 1
            return run(params, buffers, *a, **k)

        return counted

    def evaluations(*args, **kwargs):
        counts["evaluations"] += 1
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(recording, "vmapped_metrics", vmapped)
    monkeypatch.setattr(recording, "evaluate_dataset", evaluations)
    return counts


class Expensive(Logger):
    @register_metric(at=[16])
    def at_last(self, learner):
        return learner.model(learner.test.x).logsumexp(-1).mean()

    @register_metric
    def every_step(self, learner):
        return learner.model(learner.test.x).logsumexp(-1).mean()


def test_a_metric_at_the_last_step_is_computed_once_and_the_evaluation_only_where_a_metric_needs_it(
        experiment, monkeypatch):
    counts = counting(monkeypatch)
    evaluated = ("train_loss", "train_acc", "test_loss", "test_acc")
    exp = experiment([InitWeights.make_variations(seed=(0, 1))], logger=Expensive(), log_every=1, compile=False,
                     metrics={name: dict(at=[16]) for name in evaluated})
    ds = exp.run()
    assert len(ds.step) == 17
    assert counts == {"at_last": 1, "every_step": 17, "evaluations": 2}  # the train and the test set, at step 16
    np.testing.assert_array_equal(ds.at_last.sel(step=16).values, ds.every_step.sel(step=16).values)
    assert np.isnan(ds.at_last.sel(step=slice(0, 15)).values).all()
    assert np.isfinite(ds.test_acc.sel(step=16).values).all()

    counts.update({"at_last": 0, "every_step": 0, "evaluations": 0})
    experiment([InitWeights.make_variations(seed=(0, 1))], logger=Expensive(), log_every=1, compile=False).run()
    assert counts == {"at_last": 1, "every_step": 17, "evaluations": 2 * 17}


@pytest.fixture
def optional_metric():
    """A test-only optional built-in metric (the squared weight norm, by default every 8 logged steps)."""
    spec = metrics.register(metrics.MetricSpec("test_only_square_norm", lambda s: s.norms.square().sum(1),
                                               every=8, optional=True))
    yield spec
    metrics.unregister(spec.name)


def test_an_optional_built_in_is_recorded_only_when_named(experiment, optional_metric):
    name = optional_metric.name
    plain = experiment([], log_every=2, compile=False)
    assert name not in plain.metric_names() and name not in plain.metric_keys(plain.grid.learners[0])
    assert name not in plain.run()

    named = experiment([], log_every=2, compile=False, metrics=[name])
    assert named.metric_names()[-1] == name
    ds = named.run()
    due = [s for s in ds.step.values if s % 8 == 0]
    np.testing.assert_allclose(ds[name].sel(step=due).values, ds.param_norm.sel(step=due).values ** 2, rtol=1e-12)
    assert np.isnan(ds[name].drop_sel(step=due).values).all()

    at_last = experiment([], log_every=2, compile=False, metrics={name: dict(at=[16])}, store=named.store.path)
    assert at_last.plan().to_train == 1  # another schedule: recorded anew
    assert_at_chosen_steps(at_last.run()[name], ds[name], When(at=(16,)))
    every_step = experiment([], log_every=2, compile=False, metrics={name: dict()})
    assert np.isfinite(every_step.run()[name].values).all()


def test_none_for_a_built_in_is_refused_and_false_drops_it(experiment):
    with pytest.raises(ValueError, match=r"could mean 'not recorded' or 'at every logged step': say False"):
        experiment([], metrics={"test_acc": None})
    exp = experiment([], metrics={"test_acc": False, "test_loss": False, "train_acc": False, "train_loss": False})
    assert exp.metric_names() == ["param_norm", "init_distance", "init_cosine"]


def test_the_schedule_is_part_of_a_metrics_key_so_fewer_steps_never_serve_more(experiment, tmp_path):
    store = tmp_path / "reuse.zarr"
    sparse = dict(log_every=4, compile=False, store=store, metrics={"test_acc": dict(at=[16])})
    first = experiment([], **sparse)
    spec = first.grid.learners[0]
    first.run()
    assert experiment([], **sparse).plan().to_train == 0  # the same schedule: served

    dense = experiment([], log_every=4, compile=False, store=store)
    assert dense.grid.learners[0].id == spec.id  # ids do not depend on what is recorded
    keys, dense_keys = first.metric_keys(spec), dense.metric_keys(spec)
    assert {m for m in keys if keys[m] != dense_keys[m]} == {"test_acc"}
    assert dense.plan().to_train == 1  # recorded at one step: it does not serve every logged step
    full = dense.run()
    assert np.isfinite(full.test_acc.values).all()
    assert experiment([], log_every=4, compile=False, store=store, metrics={"test_acc": dict(every=8)}).plan().to_train == 1
    again = experiment([], **sparse).run()  # read under its own key: NaN where it was not due
    assert_at_chosen_steps(again.test_acc, full.test_acc, When(at=(16,)))
    fewer = experiment([], log_every=4, compile=False, store=store, metrics={"test_acc": False})
    assert fewer.plan().to_train == 0 and "test_acc" not in fewer.run()  # fewer metrics: served

    logged = experiment([], logger=Scheduled(), log_every=2, compile=False, store=tmp_path / "user.zarr")
    logged.run()
    assert experiment([], logger=Scheduled(), log_every=2, compile=False, store=tmp_path / "user.zarr").plan().to_train == 0


class Late(Logger):
    @register_metric(at=[14])
    def late(self, learner):
        return learner.model[1].weight.norm()

    @register_metric(every=3, dims=("unit",))
    def units(self, learner):
        return learner.model[1].weight.norm(dim=1)


def test_forked_learners_take_their_prefixs_scheduled_metrics_bitwise(experiment):
    grid = [InitWeights.make_variations(seed=(0, 1)),
            PerturbMomentum.make_variations(momentum=lambda m: (m * 1.05, m * 0.95), when=((0, 3), (6, 9), (10, 12)))]
    settings = dict(steps=14, log_every=1, logger=Late(), metrics={"test_acc": dict(at=[2, 14])}, compile=False)
    forked = experiment(grid, **settings)
    assert "from 2 prefixes not in the grid (trained here)" in str(forked.plan())  # trained to step 10: no `late`
    a = forked.run()
    b = experiment(grid, fork=False, **settings).run()
    for name in ("late", "units", "test_acc", "test_loss", "train_loss"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert np.isfinite(a.late.sel(step=14).values).all() and np.isnan(a.late.sel(step=slice(0, 13)).values).all()
    assert experiment(grid, store=forked.store.path, **settings).plan().to_train == 0


@pytest.fixture
def meta_shy_metric():
    """A test-only optional built-in with a dimension of its own that does not run on the "meta" device (so
    that its shape, where it is needed before the metric is due, comes from computing it once)."""
    def layer_norms(s):
        if next(iter(s.params.values())).is_meta:
            raise NotImplementedError("no meta kernel here")
        return s.norms

    spec = metrics.register(metrics.MetricSpec("test_only_layer_norms", layer_norms, dims=("layer",), optional=True))
    yield spec
    metrics.unregister(spec.name)


def test_a_run_resumed_from_a_checkpoint_before_a_metric_is_due_gives_the_same_numbers(experiment, tmp_path,
                                                                                        meta_shy_metric):
    grid = [InitWeights.make_variations(seed=range(4))]
    settings = dict(checkpoint_every=6, max_learners_per_chunk=2, logger=Late(), log_every=2, compile=False,
                    metrics={meta_shy_metric.name: dict(at=[16]), "test_acc": dict(every=8)})
    reference = experiment(grid, store=tmp_path / "ref.zarr", **settings).run()
    store = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError, match="went down"):
        experiment(grid, store=store, callbacks=[CountSteps(crash_before=10)], **settings).run()
    assert experiment(grid, store=store, **settings).plan().continuing == {"from step 6 (checkpoint)": 2}
    ds = experiment(grid, store=store, **settings).run()
    for name in reference.data_vars:
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)
    layer = ds[meta_shy_metric.name]
    assert layer.dims[-1] == "layer" and np.isfinite(layer.sel(step=16).values).all()
    assert np.isnan(layer.sel(step=slice(0, 14)).values).all()
    np.testing.assert_allclose(np.sqrt((layer.sel(step=16) ** 2).sum("layer")), ds.param_norm.sel(step=16), rtol=1e-12)


def test_register_metric_refuses_bad_steps_when_the_class_is_written():
    for kw, message in ((dict(every=0), r"register_metric\(every=...\) takes a positive integer"),
                        (dict(every=True), "takes a positive integer"),
                        (dict(at=[-1]), r"takes steps .*got -1"),
                        (dict(at=16), r"register_metric\(at=...\) takes a list of steps"),
                        (dict(at=[]), "names no step")):
        with pytest.raises(ValueError, match=message):
            register_metric(**kw)
    assert register_metric(every=4, at=(8, 2, 8))(lambda self, learner: 0).metric_when == When(4, (2, 8))
