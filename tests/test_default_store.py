"""One default store, ``runs/serimats.zarr``, for every experiment without ``store=``: learners are found by id, so
the seed's drop-InitWeights-and-add-it-back workflow reuses what it stored; an experiment's ``name`` selects its
learners in the store (``results()``, ``serimats-func ls/plot``, ``open_store``). Stores given with ``store=``, and
those earlier versions named after an experiment's classes, keep working."""

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from serimats_func import open_store
from serimats_func.cli import main
from serimats_func.interventions import InitWeights, PerturbWeights
from serimats_func.store.zarr_store import Store
from tests import store_paths

ROOT = Path(__file__).resolve().parents[1]

SEED_WORKFLOW = textwrap.dedent('''
    """The seed's third example with default arguments (no store=, no name=), on tiny data: argv[1] is "without"
    (InitWeights dropped: 54 learners) or "with" (InitWeights.make_variations(seed=range(10)) back: 540)."""
    import json, sys
    import torch
    from serimats_func.interventions import InitWeightsIntervention, OptimizerIntervention, PerturbMomentumIntervention
    from serimats_func.models import MLP
    from tests.builders import make_experiment

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    interventions = [
        OptimizerIntervention.make_variations(momentum=(0.9, 0.99, 0.999)),
        PerturbMomentumIntervention.make_variations(
            momentum=lambda m: (m * (1 + epsilon) for epsilon in (0.001, -0.001, 0.01, -0.01, 0.1, -0.1)),
            when=((0, 1), (1, 2), (2, 3)),
        ),
    ]
    if sys.argv[1] == "with":
        interventions.insert(0, InitWeightsIntervention.make_variations(seed=range(10)))
    exp = make_experiment(interventions, store=None, model=MLP(widths=(4,), num_classes=3), data=((x, y), None),
                          steps=3, batch_size=16)
    plan = exp.plan()
    ds = exp.run()
    print(json.dumps({"plan": [plan.learners, plan.in_store, plan.to_train], "store": str(exp.store.path),
                      "name": exp.name, "sizes": dict(ds.sizes), "train_loss": ds.train_loss.values.tolist()}))
''')


def run_script(script: Path, cwd: Path, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two real processes, each importing torch: about 12 s on a 2-core CPU
def test_the_seeds_workflow_with_default_arguments_trains_54_then_reuses_them_and_trains_486(tmp_path, capsys):
    script = tmp_path / "third_example.py"
    script.write_text(SEED_WORKFLOW)
    work = tmp_path / "work"
    work.mkdir()

    validated = run_script(script, work, "without")
    assert validated["plan"] == [54, 0, 54] and validated["store"] == "runs/serimats.zarr"
    assert validated["sizes"] == {"momentum": 3, "momentum_change": 6, "when": 3, "step": 3}
    full = run_script(script, work, "with")
    assert full["plan"] == [540, 54, 486] and full["store"] == "runs/serimats.zarr"  # 54 reused, 486 trained
    assert full["sizes"] == {"seed": 10, "momentum": 3, "momentum_change": 6, "when": 3, "step": 3}
    np.testing.assert_array_equal(np.array(full["train_loss"])[0], np.array(validated["train_loss"]))  # seed 0
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["serimats.zarr"]  # one store, nothing else

    store = work / "runs" / "serimats.zarr"
    assert main(["ls", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"{validated['name']}: 54 learners, 54 stored; coordinates: momentum (3), momentum_change (6), when (3)" in out
    assert f"{full['name']}: 540 learners, 540 stored; coordinates: seed (10), momentum (3)" in out
    assert main(["ls", str(store), "--experiment", validated["name"]]) == 0
    assert "54 learners; coordinates: momentum (3), momentum_change (6), when (3)" in capsys.readouterr().out


GRID = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
        PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(1, 2))]
SEEDS = [InitWeights.make_variations(seed=(0, 1, 2))]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_experiments_without_store_share_one_default_store_and_each_name_selects_its_own(experiment, in_tmp, capsys):
    perturb = experiment(GRID, store=None, name="perturb")
    seeds = experiment(SEEDS, store=None)
    assert perturb.store.path == seeds.store.path == Path("runs/serimats.zarr")
    assert seeds.name == "init-weights"  # the default name: made from the classes, as before
    perturbed = perturb.run()
    assert seeds.plan().in_store == 1  # init seed 0 is the unperturbed learner perturb stored
    seeded = seeds.run()
    assert (perturbed.learner.sel(epsilon=0, seed=0) == seeded.learner.sel(seed=0)).item()

    assert dict(perturbed.test_acc.sizes) == {"epsilon": 3, "seed": 3, "step": 2}
    assert dict(seeded.test_acc.sizes) == {"seed": 3, "step": 2}
    assert len(open_store("runs/serimats.zarr").learner) == 7
    assert sorted(open_store("runs/serimats.zarr", experiment="init-weights").learner.values) == sorted(
        seeded.learner.values)
    with pytest.raises(ValueError, match="no experiment named 'other'; it holds: 'perturb', 'init-weights'"):
        open_store("runs/serimats.zarr", experiment="other")

    assert main(["ls", "runs/serimats.zarr"]) == 0  # several experiments: one line each
    assert capsys.readouterr().out.splitlines() == [
        "runs/serimats.zarr: 7 learners of 2 experiments:",
        "  perturb: 5 learners, 5 stored; coordinates: epsilon (3), seed (3)",
        "  init-weights: 3 learners, 3 stored; coordinates: seed (3)"]
    assert main(["ls", "runs/serimats.zarr", "--experiment", "init-weights"]) == 0
    out = capsys.readouterr().out
    assert "experiment 'init-weights': 3 learners; coordinates: seed (3)" in out
    assert {line.split()[0] for line in out.splitlines()[4:]} == set(seeded.learner.values.tolist())
    with pytest.raises(SystemExit, match="Choose one with --experiment NAME"):
        main(["plot", "runs/serimats.zarr", "test_acc"])
    assert main(["plot", "runs/serimats.zarr", "test_acc", "--experiment", "perturb", "--by", "epsilon"]) == 0
    assert capsys.readouterr().out.strip() == "runs/serimats_perturb_test_acc.png"
    assert perturb.plots_folder == Path("runs/perturb_plots") and seeds.plots_folder == Path("runs/init-weights_plots")


def test_an_experiment_is_recorded_once_per_grid_and_its_name_is_in_no_learner_id(experiment, in_tmp):
    first = experiment(GRID, store=None, name="first")
    first.run()
    first.run()
    records = Store("runs/serimats.zarr").experiments()
    assert list(records) == ["first"] and len(store_paths.entries(Path("runs/serimats.zarr/experiments"))) == 1
    renamed = experiment(GRID, store=None, name="renamed")
    elsewhere = experiment(GRID, store=in_tmp / "elsewhere.zarr", name="first")
    assert [s.id for s in renamed.grid.learners] == [s.id for s in first.grid.learners] == [
        s.id for s in elsewhere.grid.learners]  # neither the name nor the store is part of an id
    assert renamed.plan().to_train == 0
    renamed.run()  # trains nothing, records the name
    assert list(Store("runs/serimats.zarr").experiments()) == ["first", "renamed"]
    grown = experiment([*GRID, PerturbWeights.make_variations(epsilon=0.1, seed=3)], store=None, name="first")
    assert grown.plan().to_train == 1
    grown.run()
    record = Store("runs/serimats.zarr").experiments()["first"]  # the newest record of a name is its grid
    assert len(record["learner_ids"]) == 6 and record["dims"] == {"epsilon": [0, 0.01, 0.1], "seed": [0, 1, 2, 3]}


@pytest.mark.parametrize("name", ["../escape", "runs/../../escape", "sub/name", "..", ".hidden", "a\\b", ""])
def test_a_name_that_is_a_path_is_refused_before_anything_is_written(experiment, in_tmp, name):
    with pytest.raises(ValueError, match="must be a plain name, not a path"):
        experiment(GRID, store=None, name=name)
    assert list(in_tmp.iterdir()) == []


def test_stores_given_with_store_and_those_earlier_versions_named_after_the_classes_keep_working(experiment, in_tmp,
                                                                                                 capsys):
    old = Path("runs/perturb-weights.zarr")  # the name earlier versions gave this grid's store by default
    before = experiment(GRID, store=old).run()
    for record in (old / "experiments").iterdir():  # as an earlier version wrote it: no record of experiments
        if record.is_dir():
            shutil.rmtree(record)
    assert Store(old).experiments() == {}
    assert main(["ls", str(old)]) == 0  # every learner of a store recording no experiment, as before
    assert "5 learners; coordinates: epsilon (3), seed (3)" in capsys.readouterr().out

    with pytest.warns(UserWarning, match=r"runs/perturb-weights\.zarr is the store that earlier versions made .* "
                                         r"pass store='runs/perturb-weights\.zarr'"):
        default = experiment(GRID, store=None)
    assert default.plan().in_store == 0  # the default store is another store
    again = experiment(GRID, store=old)
    assert again.plan().in_store == 5
    np.testing.assert_array_equal(again.run().test_acc.values, before.test_acc.values)
    assert list(Store(old).experiments()) == ["perturb-weights"]
    default.run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experiment(GRID, store=None)  # once this experiment has run on the default store, no warning


def test_plan_shows_the_dtype_of_the_learners(experiment, in_tmp):
    def speed_line(plan) -> str:
        return next(line for line in str(plan).splitlines() if line.strip().startswith("speed:"))

    assert speed_line(experiment(GRID, dtype=torch.float64).plan()).endswith("; float64")
    assert speed_line(experiment(GRID).plan()).endswith("; float32")
    assert speed_line(experiment(GRID, precision="bf16").plan()).endswith("; bf16")
