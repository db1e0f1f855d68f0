"""Command line: ``serimats-func demo`` (also ``python -m serimats_func demo``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import datasets
from .experiments import Experiment
from .interventions import Optimizer, PerturbWeights
from .models import MLP
from .plotter import Plotter


def demo(epochs: int = 20, store: str = "runs/demo.zarr", progress: bool = True) -> Experiment:
    """The user's first example on MNIST-1D: a control plus 3 epsilons x 10 seeds of a relative
    weight perturbation at init, 31 MLPs trained together. Writes the store and a PNG plot,
    prints a table of the final test accuracy per epsilon."""
    started = time.perf_counter()
    train, test = datasets.mnist1d()
    exp = Experiment(
        model=MLP(widths=(100, 100)),
        dataset=train,
        test_dataset=test,
        interventions=[
            PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
            PerturbWeights.make_variations(epsilon=(0.001, 0.01, 0.1), seed=range(10)),
        ],
        optimizer=Optimizer(torch.optim.SGD, lr=0.1, momentum=0.9),
        batch_size=64,
        epochs=epochs,
        store=store,
        name="demo",
        progress=progress,
    )
    plan = exp.plan()
    print(plan)
    ds = exp.run()
    fig = Plotter(ds).curves("test_acc", hue="epsilon")
    fig.axes[0].set_title("MNIST-1D: 31 MLPs, relative weight perturbation at init\n(mean and std over 10 seeds)")
    png = Path(store).with_name(Path(store).stem + "_test_acc.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    final = ds.isel(step=-1)
    control = final.where(final.control, drop=True)
    print(f"\nMNIST-1D, MLP 40-100-100-10, SGD lr=0.1 momentum=0.9, {ds.attrs['steps']} steps "
          f"({epochs} epochs of batch 64)")
    print(f"{'epsilon':>8}  {'learners':>8}  {'test acc':>15}  {'|acc - control|':>15}")
    for eps in ds.epsilon.values:
        acc = final.test_acc.sel(epsilon=eps).values
        acc = acc[~np.isnan(acc)]
        gap = abs(acc - float(control.test_acc.values.ravel()[0]))
        print(f"{eps:>8g}  {len(acc):>8}  {acc.mean():>8.4f} ± {acc.std():.4f}  {gap.mean():>15.4f}")
    print(f"\ntrained {plan.to_train} learners, {plan.in_store} reused from {store}; "
          f"plot: {png}; {time.perf_counter() - started:.1f} s in all")
    return exp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serimats-func", description="Vectorized training sweeps.")
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="train the weight-perturbation example on MNIST-1D")
    d.add_argument("--epochs", type=int, default=20)
    d.add_argument("--store", default="runs/demo.zarr", help="Zarr store to write (reused when it exists)")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_submit_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.epochs, args.store, progress=not args.no_progress)
    if args.command == "submit":
        return submit(args)
    return 0


def add_submit_parser(commands: argparse._SubParsersAction) -> None:
    s = commands.add_parser("submit", help="train a script's experiment as shards of cluster jobs (submitit)",
                            description="Runs SCRIPT (not as __main__), takes the Experiment it defines, and trains "
                            "the learners missing from its store as --shards jobs: on Slurm when submitit finds "
                            "it, as local processes otherwise (--cluster local forces them).")
    s.add_argument("script", help="a Python file that defines one Experiment at module level")
    s.add_argument("--experiment", help="the variable name of the Experiment, if the script defines several")
    s.add_argument("--shards", type=int, default=1)
    s.add_argument("--folder", default=None, help="submitit's folder for job files and logs (default: runs/<name>_jobs)")
    s.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto")
    s.add_argument("--slurm-partition")
    s.add_argument("--gpus-per-node", type=int)
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--mem-gb", type=float)
    s.add_argument("--timeout-min", type=int, default=60)
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def submit(args: argparse.Namespace) -> int:
    """``serimats-func submit``: the script's experiment, trained as shards of submitit jobs."""
    try:
        import submitit
    except ImportError:
        print("serimats-func submit needs submitit: pip install -e \".[cluster]\" (or pip install submitit)",
              file=sys.stderr)
        return 2
    from .cluster import ScriptSource, ShardError, run_sharded

    source = ScriptSource(str(Path(args.script).resolve()), args.experiment)
    exp = source.load()
    exp.progress = not args.no_progress
    folder = args.folder or str(exp.store.path.with_name(exp.store.path.stem + "_jobs"))
    executor = submitit.AutoExecutor(folder, cluster=None if args.cluster == "auto" else args.cluster)
    options = {"timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_node, "cpus_per_task": args.cpus_per_task,
               "mem_gb": args.mem_gb, "slurm_partition": args.slurm_partition, "name": f"serimats-{exp.name}"}
    executor.update_parameters(**{k: v for k, v in options.items() if v is not None})
    plan = exp.plan()
    print(f"{plan.to_train} learners to train as {args.shards} shard(s) on {executor.cluster}; {plan.in_store} already "
          f"in {exp.store.path}; job files and logs in {folder}")
    try:
        ds = run_sharded(exp, executor, args.shards, source=source)
    except ShardError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"done: {sum(1 for _, s in exp.grid.cells if s.id)} cells of {exp.name} in {exp.store.path} "
          f"({', '.join(f'{k}={v}' for k, v in ds.sizes.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
