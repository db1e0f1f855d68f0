"""Callbacks watch a run: each chunk's start, every step, its end, in order; they change no number; a bad one
is refused when the Experiment is built."""

import numpy as np
import pytest
import torch

from serimats_func.callbacks import Callback
from serimats_func.interventions import PerturbWeights

GRID = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
        PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(1, 2))]


class Log(Callback):
    def __init__(self):
        self.events = []

    def on_chunk_start(self, chunk):
        self.events.append(("start", chunk.index, chunk.ids, chunk.start))

    def on_step(self, chunk, step, state, loss):
        self.events.append(("step", chunk.index, step, None if loss is None else tuple(loss.shape)))

    def on_chunk_end(self, chunk, result):
        self.events.append(("end", chunk.index, result.steps))


def test_callbacks_see_each_chunk_start_every_step_and_its_end_and_change_no_number(experiment, tmp_path):
    log, only_steps = Log(), []

    class Steps:  # any object with one of the methods will do
        def on_step(self, chunk, step, state, loss):
            only_steps.append(step)

    exp = experiment(GRID, steps=6, max_learners_per_chunk=3, callbacks=[log, Steps()])
    ds = exp.run()
    plan_ids = [tuple(e[2]) for e in log.events if e[0] == "start"]
    assert len(plan_ids) == 2 and all(len(ids) == 3 for ids in plan_ids)  # the control trains beside each chunk
    for index, ids in enumerate(plan_ids):
        events = [e for e in log.events if e[1] == index]
        assert events[0] == ("start", index, ids, 0)
        assert events[1:-1] == [("step", index, 0, None)] + [("step", index, s, (3,)) for s in range(1, 7)]
        assert events[-1] == ("end", index, (0, 6))
    assert only_steps == 2 * list(range(7))
    plain = experiment(GRID, steps=6, max_learners_per_chunk=3).run()
    for name in ds.data_vars:
        np.testing.assert_array_equal(ds[name].values, plain[name].values, err_msg=name)


def test_a_lone_learner_s_loss_is_its_own(experiment):
    losses = []

    class Loss(Callback):
        def on_step(self, chunk, step, state, loss):
            if loss is not None:
                losses.append(loss)

    experiment([PerturbWeights.make_variations(epsilon=0.01, seed=0)], steps=2, callbacks=[Loss()]).run()
    assert [tuple(loss.shape) for loss in losses] == [(1,), (1,)] and all(torch.isfinite(loss).all() for loss in losses)


@pytest.mark.parametrize("callbacks, message", [([Log], "takes instances; got the class Log"),
                                                ([object()], "defines at least one of on_chunk_start")])
def test_a_bad_callback_is_refused_before_anything_is_written(experiment, tmp_path, callbacks, message):
    with pytest.raises(ValueError, match=message):
        experiment(GRID, store=tmp_path / "never.zarr", callbacks=callbacks)
    assert not (tmp_path / "never.zarr").exists()
