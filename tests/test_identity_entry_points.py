"""The same code gives the same ids and the same numbers however its script is reached: run as ``__main__``,
imported by name from an analysis script, or run by a cluster job (``runpy`` under another name).

Real processes: a user class's module is ``__main__`` in one and ``sweep`` in the other, and neither its id,
its random keys, its loss nor its metric may depend on that.
"""

import json
import os
import subprocess
import sys

import pytest

from serimats_func.interventions import Intervention, PerturbWeights
from tests.test_identity import ROOT

SCRIPT = '''
import json
import sys

import torch
import torch.nn.functional as F

from serimats_func.interventions import InitWeights, Intervention
from serimats_func.loggers import Logger, register_metric
from serimats_func.models import MLP
from tests.builders import make_experiment


class Jitter(Intervention):
    """Gaussian noise on the gradients of the weights or of the biases."""

    axes = {"noise": 0.0, "seed": 0, "part": "weight"}
    structural = frozenset({"part"})

    def on_gradients(self, grads, n, ctx):
        part = self.values["part"]
        return {k: g + n.noise * ctx.normal(g.shape, g.dtype, k, ctx.step) if k.endswith(part) else g
                for k, g in grads.items()}


class Probes(Logger):
    @register_metric
    def weight_norm(self, learner):
        return sum(p.norm() for p in learner.params.values())


def loss(logits, y):
    return F.cross_entropy(logits, y, label_smoothing=0.05)


def experiment(store):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 40, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    return make_experiment([InitWeights.make_variations(seed=range(2)),
                            Jitter.make_variations(noise=(0.0, 0.1), part=("weight", "bias"), seed=3)],
                           model=MLP((8,)), data=((x, y), None), loss=loss, logger=Probes(), steps=3, batch_size=16,
                           store=store)


def report(store):
    exp = experiment(store)
    to_train = exp.plan().to_train
    ds = exp.run()
    print(json.dumps({"ids": [s.id for s in exp.grid.learners], "to_train": to_train,
                      "numbers": {m: ds[m].values.tobytes().hex() for m in ("train_loss", "weight_norm")}}))


if __name__ == "__main__":
    report(sys.argv[1])
'''


@pytest.mark.slow
def test_a_script_run_as_main_and_imported_by_name_gives_the_same_ids_and_numbers(tmp_path):
    (tmp_path / "sweep.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    imported = "import sys; sys.path.insert(0, {here!r}); import sweep; sweep.report({store!r})"
    job = "import runpy; runpy.run_path('sweep.py', run_name='__serimats_func_job__')['report']({store!r})"
    here, first, second = str(tmp_path), str(tmp_path / "first.zarr"), str(tmp_path / "second.zarr")
    commands = {
        "main": [sys.executable, "sweep.py", first],
        "imported": [sys.executable, "-c", imported.format(here=here, store=second)],
        "imported again": [sys.executable, "-c", imported.format(here=here, store=first)],  # on the first store
        "job": [sys.executable, "-c", job.format(store=first)],
    }
    out = {}
    for name, command in commands.items():
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{name}: {done.stderr}"
        out[name] = json.loads(done.stdout.splitlines()[-1])
    assert len(set(out["main"]["ids"])) == 8
    assert all(o["ids"] == out["main"]["ids"] for o in out.values())
    assert out["imported"]["numbers"] == out["main"]["numbers"]  # bitwise: the same random keys, loss and metric
    assert out["main"]["to_train"] == out["imported"]["to_train"] == 8
    assert out["imported again"]["to_train"] == out["job"]["to_train"] == 0  # the stored learners are reused


def _named(name: str, module: str) -> type:
    cls = type(name, (Intervention,), {"axes": {"noise": 0.0}, "on_gradients": lambda self, grads, n, ctx: grads})
    cls.__module__ = module
    return cls


def test_two_user_classes_of_one_name_are_refused(experiment):
    first, second = _named("Noise", "sweep"), _named("Noise", "helpers")
    with pytest.raises(ValueError, match="Two intervention classes of the experiment are named 'Noise' \\(from sweep "
                                         "and helpers\\)"):
        experiment([first.make_variations(noise=(0.0, 0.1)), second.make_variations(noise=0.1)])
    with pytest.raises(ValueError, match="named 'PerturbWeights'"):
        experiment([PerturbWeights.make_variations(epsilon=0.1), _named("PerturbWeights", "sweep")(noise=0.1)])
    with pytest.raises(ValueError, match="must not be named 'dropout', the name of a random stream"):
        experiment([_named("dropout", "sweep").make_variations(noise=0.1)])
