"""Curves where people look: ``serimats-func tensorboard`` (read back with TensorBoard's own reader), the W&B path
(offline mode), ``serimats-func ls --metrics``, and metrics recorded at the steps whose states are kept."""

import importlib.util
import sys
import types

import numpy as np
import pytest

from serimats_func import export, open_store
from serimats_func.cli import main
from serimats_func.interventions import PerturbWeights

GRID = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
        PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(1, 2))]


@pytest.fixture
def stored(experiment):
    exp = experiment(GRID, steps=8, log_every=4)
    return exp, exp.run()


def cells(ds):
    """(coordinates, learner id) of each cell that holds a learner."""
    dims = list(ds.learner.dims)
    for index in np.ndindex(*(ds.sizes[d] for d in dims)):
        where = dict(zip(dims, index, strict=True))
        learner = str(ds.learner.isel(where).item())
        if learner:
            yield {d: ds[d].values[i].item() for d, i in where.items()}, where, learner


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (pip install -e \".[tensorboard]\"); the export needs it")
def test_tensorboard_export_is_one_run_per_learner_whose_scalars_equal_the_stores(stored, tmp_path, capsys):
    from tensorboard.backend.event_processing import event_accumulator

    exp, ds = stored
    out = tmp_path / "tb"
    for _ in range(2):  # a second export replaces the first: one curve per metric, not two
        assert main(["tensorboard", str(exp.store.path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"5 runs in {out}: tensorboard --logdir {out}"
    runs = sorted(p.name for p in out.iterdir())
    assert runs == sorted(f"epsilon={c['epsilon']},seed={c['seed']}" for c, _, _ in cells(ds))
    for coords, where, _ in cells(ds):
        events = event_accumulator.EventAccumulator(str(out / f"epsilon={coords['epsilon']},seed={coords['seed']}"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train_loss", "test_acc", "control_distance", "control_layer_distance/1.weight"} <= tags
        for tag in ("train_loss", "test_acc", "param_norm", "control_distance", "control_layer_distance/1.weight"):
            metric, _, layer = tag.partition("/")
            stored_values = ds[metric].isel(where)
            if layer:
                stored_values = stored_values.sel(layer=layer)
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [0, 4, 8]
            np.testing.assert_array_equal([s.value for s in scalars], stored_values.values.astype(np.float32))


class FakeWandb(types.ModuleType):
    """A stand-in for the wandb module (not installed here: 30-odd packages and a service process), recording the
    calls ``export.to_wandb`` makes with wandb's own signatures: ``init(...) -> run``, ``run.log(d, step=)``,
    ``run.finish()``."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, *, project, name, mode, dir, config, group):
        run = types.SimpleNamespace(settings=dict(project=project, name=name, mode=mode, dir=dir, config=config,
                                                  group=group), logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, dict(data)))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_the_wandb_command_logs_each_learner_offline_with_the_stores_values(stored, monkeypatch, tmp_path, capsys):
    exp, ds = stored
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main(["wandb", str(exp.store.path), "--dir", str(tmp_path)]) == 0
    assert "5 runs logged to the project 'serimats-func', offline in" in capsys.readouterr().out
    assert len(fake.runs) == 5 and all(run.finished for run in fake.runs)
    for (coords, where, learner), run in zip(cells(ds), fake.runs, strict=True):
        assert run.settings["mode"] == "offline" and run.settings["dir"] == str(tmp_path)
        assert run.settings["name"] == f"epsilon={coords['epsilon']},seed={coords['seed']}"
        assert run.settings["config"] == {**coords, "learner": learner}
        assert [step for step, _ in run.logged] == [0, 4, 8]
        for step, data in run.logged:
            assert data["test_acc"] == ds.test_acc.isel(where).sel(step=step).item()
            assert data["control_layer_distance/1.weight"] == ds.control_layer_distance.isel(where).sel(
                step=step, layer="1.weight").item()


def test_the_wandb_command_without_wandb_says_how_to_install_it(stored, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert main(["wandb", str(stored[0].store.path)]) == 2
    assert "needs the wandb package: pip install wandb" in capsys.readouterr().err


def test_ls_shows_each_learners_last_value_of_the_chosen_metrics(stored, capsys):
    exp, ds = stored
    assert main(["ls", str(exp.store.path), "--metrics", "test_acc,train_loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split() == ["learner", "epsilon", "seed", "steps", "done", "logged", "test_acc", "train_loss",
                                "control"]
    for coords, where, learner in cells(ds):
        line = next(line for line in lines if line.startswith(learner))
        _, eps, seed, done, logged, acc, loss, *control = line.split()
        final = ds.isel(where).sel(step=8)
        assert (float(eps), int(seed), done, logged) == (coords["epsilon"], coords["seed"], "8", "3")
        assert (acc, loss) == (f"{final.test_acc.item():.4g}", f"{final.train_loss.item():.4g}")
    with pytest.raises(SystemExit, match="holds no metric 'accuracy'; it holds: train_loss"):
        main(["ls", str(exp.store.path), "--metrics", "accuracy"])
    with pytest.raises(SystemExit, match="control_layer_distance has a dimension of its own .layer."):
        main(["ls", str(exp.store.path), "--metrics", "control_layer_distance"])


def test_learner_runs_name_runs_by_coordinates_and_leave_out_missing_values(stored):
    _, ds = stored
    runs = list(export.learner_runs(ds))
    assert [r.name for r in runs] == [f"epsilon={c['epsilon']},seed={c['seed']}" for c, _, _ in cells(ds)]
    control = next(r for r in runs if r.coords == {"epsilon": 0.0, "seed": 0})
    assert [step for step, _ in control.scalars["control_distance"]] == [0, 4, 8]
    assert export.run_name({"layers": "../fc1"}) == "layers=.._fc1"  # one folder, never a path


def test_keep_states_steps_also_record_metrics(experiment):
    exp = experiment(GRID, steps=8, keep_states=[3], keep_every=5)
    ds = exp.run()
    assert ds.step.values.tolist() == [0, 3, 5, 8]  # no log_at needed for the kept steps
    assert ds.test_acc.sel(step=[3, 5]).notnull().sum() == 2 * 5
    stored = open_store(exp.store.path)
    assert stored.has_state.sel(step=[3, 5, 8]).all() and stored.test_acc.sel(step=3).notnull().all()


def test_the_tensorboard_command_without_tensorboard_says_how_to_install_it(stored, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    assert main(["tensorboard", str(stored[0].store.path), "--out", str(tmp_path / "tb")]) == 2
    assert 'needs the tensorboard package: pip install -e ".[tensorboard]"' in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()
