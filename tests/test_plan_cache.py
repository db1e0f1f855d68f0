"""Plans chosen by measurement and remembered on disk (acceleration.plan_cache): the training step's plan and the
evaluation's, measured once, then read back without measuring; every evaluation plan gives the reference's numbers
to float32 rounding. Each test has its own empty cache directory (the autouse fixture ``plan_cache_dir``).
"""

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serimats_func.acceleration import compile_record, convolutions, plan_cache
from serimats_func.acceleration import prepare as acceleration
from serimats_func.core.evaluation import evaluate_dataset, make_logits
from serimats_func.core.learners import initial_model_states, prepare_template
from serimats_func.interventions import InitWeights
from serimats_func.models import Lenet5


def _images(n=64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return (x, y), (x[:32], y[:32])


def _lenet(experiment, n=3, **settings):
    settings = {"model": Lenet5(), "data": _images(), "steps": 4, "batch_size": 16, "compile": False, **settings}
    return experiment([InitWeights.make_variations(seed=range(n))], **settings)


def _measure_every_chunk(monkeypatch):
    monkeypatch.setattr(acceleration, "MEASURE_MIN_STEPS", 1)
    monkeypatch.setattr(acceleration, "MEASURE_SHARE", 1e9)


def _new_process(monkeypatch):
    """Forget this process's choices, as a new process would (the disk cache stays)."""
    monkeypatch.setattr(acceleration, "_CHOSEN", {})
    monkeypatch.setattr(acceleration, "_EVALUATIONS", {})


def _entries(cache_dir, kind):
    plans = json.loads((cache_dir / plan_cache.FILE_NAME).read_text())["plans"]
    return {k: v for k, v in plans.items() if k.startswith(kind + "|")}


def test_a_measured_plan_is_written_to_disk_and_a_second_run_measures_nothing(experiment, monkeypatch, plan_cache_dir):
    _measure_every_chunk(monkeypatch)
    first = _lenet(experiment)
    first.run()
    (report,) = first.speed_report
    assert report.plan_measured and report.plan_reason.startswith("measured: ")
    assert "measured per learner" in report.evaluation
    (entry,) = _entries(plan_cache_dir, "train").values()
    assert entry["choice"] == report.plan and set(entry["timings"]) == set(convolutions.candidates(torch.device("cpu")))
    assert len(_entries(plan_cache_dir, "evaluate")) == 2  # the train set's and the test set's

    _new_process(monkeypatch)

    def no_measuring(fn, device):
        raise AssertionError("a cached plan was measured again")

    monkeypatch.setattr(acceleration, "_once", no_measuring)
    second = _lenet(experiment)
    second.run()
    (again,) = second.speed_report
    assert not again.plan_measured and again.plan_reason == "cached" and again.plan == report.plan
    assert again.eager_step_s == entry["step_s"]  # remembered: the compile decision times nothing either
    assert "(cached)" in again.evaluation


def test_a_cached_choice_is_used_without_measuring_and_changes_no_number_beyond_rounding(experiment, monkeypatch,
                                                                                         plan_cache_dir):
    _measure_every_chunk(monkeypatch)
    _lenet(experiment).run()
    path = plan_cache_dir / plan_cache.FILE_NAME
    content = json.loads(path.read_text())
    (key,) = _entries(plan_cache_dir, "train")
    content["plans"][key]["choice"] = "loop"  # a choice the measurement would not make by itself, most likely
    path.write_text(json.dumps(content))
    _new_process(monkeypatch)
    cached = _lenet(experiment)
    ds = cached.run()
    (report,) = cached.speed_report
    assert report.plan == "loop" and report.plan_reason == "cached" and not report.plan_measured
    reference = _lenet(experiment, convolutions="vmap").run()
    for name in ("train_loss", "test_loss"):
        np.testing.assert_allclose(ds[name].values, reference[name].values, rtol=1e-4)


def test_a_cache_entry_is_per_learner_count_and_a_short_run_without_one_takes_the_default(experiment, monkeypatch,
                                                                                          plan_cache_dir):
    _measure_every_chunk(monkeypatch)
    _lenet(experiment, n=3).run()
    monkeypatch.undo()  # back to the real thresholds (the fixture's environment goes too: set it again)
    monkeypatch.setenv(plan_cache.CACHE_ENV, str(plan_cache_dir))
    _new_process(monkeypatch)
    other = _lenet(experiment, n=5)
    other.run()
    (report,) = other.speed_report
    assert not report.plan_measured and report.plan_reason.startswith("default: 4 steps")
    assert "too short" in report.plan_reason
    assert report.plan == acceleration.default_plan(torch.device("cpu"), 5)
    assert len(_entries(plan_cache_dir, "train")) == 1  # a default is not remembered: a longer run may measure


def test_a_broken_or_unwritable_cache_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv(plan_cache.CACHE_ENV, str(tmp_path))
    (tmp_path / plan_cache.FILE_NAME).write_text("{not json")
    assert plan_cache.lookup("train|x") is None
    plan_cache.remember("train|x", {"choice": "gemm"})  # replaces the broken file, atomically
    assert plan_cache.lookup("train|x") == {"choice": "gemm"}
    assert [p.name for p in tmp_path.iterdir()] == [plan_cache.FILE_NAME]  # no temporary file left
    plan_cache.clear()
    assert plan_cache.lookup("train|x") is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv(plan_cache.CACHE_ENV, str(blocked / "below"))  # a directory that cannot be made
    plan_cache.remember("train|x", {"choice": "gemm"})
    assert plan_cache.lookup("train|x") is None


@pytest.mark.parametrize("train_plan", ["gemm", "serial"])
def test_every_evaluation_plan_gives_the_vmap_reference_to_float32_rounding(train_plan):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(70, 1, 28, 28, generator=gen), torch.randint(0, 10, (70,), generator=gen)
    template = prepare_template(Lenet5(), x[:2]).eval()
    state = initial_model_states(template, list(range(5)), [0] * 5)
    reference = evaluate_dataset(make_logits(template), F.cross_entropy, state.params, state.buffers, x, y, 32)
    candidates = acceleration.evaluation_candidates(train_plan, torch.device("cpu"), convolutional=True)
    assert set(candidates) == {train_plan, "gemm", "vmap", "serial"}
    for plan in candidates:
        logits = make_logits(template, convolutions.plan_for(template, plan), per_learner=convolutions.PLANS[plan].per_learner)
        for group in (None, 2):
            loss, accuracy = evaluate_dataset(logits, F.cross_entropy, state.params, state.buffers, x, y, 32,
                                              learners_per_pass=group)
            torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=0)
            torch.testing.assert_close(accuracy, reference[1], rtol=0, atol=1 / 70)  # an argmax may flip at a tie


def test_a_cpu_evaluates_a_few_convolutional_learners_in_turn_by_default_and_many_with_its_vmapped_plan():
    cpu = torch.device("cpu")
    assert acceleration.evaluation_candidates("vmap", cpu, True, n=8)[0] == "serial"
    assert acceleration.evaluation_candidates("vmap", cpu, True, n=9)[0] == acceleration.default_plan(cpu, 9)
    assert set(acceleration.evaluation_candidates("vmap", cpu, True, n=8)) == {"vmap", "gemm", "serial"}
    assert acceleration.evaluation_candidates("gemm", cpu, True)[0] == "gemm"  # no learner count: the training plan
    assert acceleration.evaluation_candidates("vmap", cpu, False, n=2) == ("vmap",)  # an MLP keeps vmap
    assert acceleration.evaluation_candidates("grouped", torch.device("cuda"), True, n=2)[0] == "grouped"


def test_choose_evaluation_measures_within_its_budget_and_remembers(monkeypatch, plan_cache_dir):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 28, 28, generator=gen)
    template = prepare_template(Lenet5(), x[:2]).eval()
    state = initial_model_states(template, list(range(4)), [0] * 4)
    candidates = acceleration.evaluation_candidates("gemm", torch.device("cpu"), convolutional=True)

    def logits_of(plan):
        return make_logits(template, convolutions.plan_for(template, plan), per_learner=convolutions.PLANS[plan].per_learner)

    def choose(budget_s, batch_s=None):
        return acceleration.choose_evaluation(logits_of, candidates, state.params, state.buffers, x, 16, ("k",),
                                              torch.device("cpu"), budget_s=budget_s, batch_s=batch_s, cache_key="evaluate|k")

    assert choose(None) == acceleration.EvaluationChoice("gemm", None, False, choose(None).reason)
    assert not choose(1.0, batch_s=1.0).measured  # 4 plans, 1 s a batch: over a 1 s budget
    measured = choose(1e9)
    assert measured.measured and measured.plan in candidates
    assert plan_cache.lookup("evaluate|k")["choice"] == measured.plan
    _new_process(monkeypatch)
    cached = choose(1e9)
    assert (cached.plan, cached.group, cached.measured, cached.reason) == (measured.plan, measured.group, False, "cached")


# -- the record of compiled steps (acceleration.compile_record) -------------------------------------------------------


def _inductor_folder(monkeypatch, tmp_path):
    folder = tmp_path / "inductor"
    folder.mkdir()
    monkeypatch.setattr(compile_record, "inductor_cache", lambda: str(folder))
    return folder


def test_a_compile_is_recorded_beside_the_plans_and_read_back_while_inductor_s_cache_is_there(monkeypatch, tmp_path,
                                                                                              plan_cache_dir):
    folder = _inductor_folder(monkeypatch, tmp_path)
    key = compile_record.key("abc", "gemm", 8, torch.device("cpu"))
    assert key.startswith("compile|cpu:") and "|N=8|abc|gemm" in key
    assert compile_record.lookup(key) is None
    compile_record.remember(key, 41.5, cold=True, eager_s=0.02, compiled_s=0.01)
    assert sorted(p.name for p in plan_cache_dir.iterdir()) == [compile_record.FILE_NAME]  # atomic: no temporary left
    entry = compile_record.lookup(key)
    assert entry["cold_s"] == 41.5 and entry["eager_s"] == 0.02 and entry["compiled_s"] == 0.01
    compile_record.remember(key, 6.0, cold=False, eager_s=0.02, compiled_s=0.009)  # a second, warm compile
    entry = compile_record.lookup(key)
    assert (entry["cold_s"], entry["warm_s"], entry["compiled_s"]) == (41.5, 6.0, 0.009)
    assert compile_record.expected_cold_seconds(torch.device("cpu")) == 41.5  # this device's own cold compile
    assert plan_cache.lookup(key) is None and plan_cache.read_entries() == {}  # the plans' file is another file
    folder.rmdir()  # a reboot emptied /tmp: inductor's kernels are gone, the record is cold again
    assert compile_record.lookup(key) is None


def test_the_compile_decision_given_warm_and_cold_records():
    cold_s = 40.0
    warm = {"cold_s": 40.0, "warm_s": 7.0, "eager_s": 0.010, "compiled_s": 0.004}
    assert compile_record.decide(61.0, warm, "cpu", cold_s).compile  # a minute of eager steps, kernels cached
    assert not compile_record.decide(59.0, {**warm, "compiled_s": 0.009}, "cpu", cold_s).compile
    # the saving repays the recorded compile: 30 s x (1 - 0.4) = 18 s >= 2 x 7 s, though under a minute
    assert compile_record.decide(30.0, warm, "cpu", cold_s).compile
    assert not compile_record.decide(20.0, warm, "cpu", cold_s).compile  # 12 s < 14 s
    decision = compile_record.decide(61.0, warm, "cpu", cold_s)
    assert decision.warm and decision.expected_s == 7.0 and "warm inductor cache" in decision.reason
    slower = {**warm, "compiled_s": 0.0099}  # compiled here before, and it was not faster
    assert not compile_record.decide(10_000.0, slower, "cpu", cold_s).compile
    # cold: compiling may cost at most COLD_SHARE of the eager run
    threshold = cold_s / compile_record.COLD_SHARE
    assert not compile_record.decide(threshold - 1, None, "cpu", cold_s).compile
    decision = compile_record.decide(threshold + 1, None, "cpu", cold_s)
    assert decision.compile and not decision.warm and decision.expected_s == cold_s
    assert not compile_record.decide(59.0, None, "cpu", cold_s=1.0).compile  # never below the warm threshold
    assert compile_record.decide(61.0, {"cold_s": 30.0}, "cpu", cold_s).compile  # recorded without timings
    # compiled once (cold, 21 s): a warm compile costs a share of that, and a 52 s run saving 29 s repays it
    once = {"cold_s": 21.0, "eager_s": 0.0156, "compiled_s": 0.0069}
    decision = compile_record.decide(52.0, once, "cpu", cold_s)
    assert decision.compile and decision.warm and decision.expected_s == compile_record.WARM_SHARE * 21.0
    assert "of the first one" in decision.reason
    assert not compile_record.decide(8.0, once, "cpu", cold_s).compile  # saves 4.5 s < 2 x 6.3 s


def test_without_records_a_cold_compile_is_expected_to_cost_the_device_s_measured_default(plan_cache_dir):
    assert compile_record.expected_cold_seconds(torch.device("cpu")) == compile_record.COLD_COMPILE_SECONDS["cpu"]


def test_auto_records_each_compile_and_plan_names_warm_steps_and_the_cold_cost(experiment, monkeypatch, tmp_path,
                                                                              plan_cache_dir):
    """The whole path with a stand-in for torch.compile (the eager step itself: no kernels are built), compiling
    whatever the estimate: the compile is recorded, and the next plan() knows the step, and whether compiling it paid."""
    _inductor_folder(monkeypatch, tmp_path)
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    monkeypatch.setattr(acceleration, "MEASURE_MIN_STEPS", 1)
    monkeypatch.setattr(compile_record, "WARM_COMPILE_SECONDS", 0.0)
    monkeypatch.setattr(compile_record, "COLD_COMPILE_SECONDS", {"cpu": 0.0, "cuda": 0.0})
    monkeypatch.setattr(acceleration, "_COMPILED", {})
    grid = [InitWeights.make_variations(seed=range(3))]
    first = experiment(grid, steps=6)
    text = str(first.plan())
    assert "compile: compiled when a chunk's eager estimate is at least 0 s" in text
    assert "(0 of 1 group(s) compiled here before)" in text and "cold (a compile costs about 0 s)" in text
    first.run()
    (report,) = first.speed_report
    assert report.compile_s > 0 and report.compile_cold is False  # no kernel was built
    (entry,) = plan_cache.read_entries(compile_record.FILE_NAME).values()
    assert entry["warm_s"] == report.compile_s and entry["eager_s"] == report.eager_step_s
    (key,) = plan_cache.read_entries(compile_record.FILE_NAME)
    for compiled_s, outcome in ((entry["eager_s"], ": eager"), (entry["eager_s"] / 2, ": compiled")):
        compile_record.remember(key, 5.0, cold=False, eager_s=entry["eager_s"], compiled_s=compiled_s)
        text = str(experiment(grid, steps=6, store=tmp_path / "again.zarr").plan())
        assert "(1 of 1 group(s) compiled here before)" in text and text.endswith(outcome)
        assert ("not faster" in text) == (outcome == ": eager")


def test_an_eager_run_leaves_its_step_time_so_that_the_next_plan_estimates_the_run(experiment, monkeypatch, tmp_path,
                                                                                  plan_cache_dir):
    monkeypatch.setattr(acceleration, "MEASURE_MIN_STEPS", 1)
    grid = [InitWeights.make_variations(seed=range(3))]
    first = experiment(grid, steps=6)
    assert "step not timed yet" in str(first.plan())
    first.run()
    (report,) = first.speed_report
    assert not report.compiled and report.eager_step_s is not None
    (entry,) = plan_cache.read_entries(compile_record.FILE_NAME).values()
    assert entry["eager_s"] == report.eager_step_s and "inductor" not in entry  # timed, never compiled: not warm
    text = str(experiment(grid, steps=6, store=tmp_path / "again.zarr").plan())
    assert "(0 of 1 group(s) compiled here before)" in text
    assert "eager estimate 0 s; cold inductor cache" in text and text.endswith("(6 steps): eager")


def test_a_run_s_evaluations_count_toward_what_measuring_plans_may_cost():
    """60 training steps alone are too short to time the plans within MEASURE_SHARE; with the run's whole-set
    evaluations (counted in training steps) the same chunk measures them and takes the fastest."""
    cpu = torch.device("cpu")
    seconds = {plan: 0.004 for plan in convolutions.candidates(cpu)} | {"serial": 0.002}

    def run(plan: str) -> None:
        time.sleep(seconds[plan])

    short = acceleration.choose_plan(run, ("evaluations-count", 1), cpu, 8, 60, run_steps=60)
    assert not short.measured and short.plan == acceleration.default_plan(cpu, 8) and "too short" in short.reason
    longer = acceleration.choose_plan(run, ("evaluations-count", 2), cpu, 8, 60, run_steps=60 + 2000)
    assert longer.measured and longer.plan == "serial"
    assert longer.reason.startswith("measured: ") and "serial 2" in longer.reason
