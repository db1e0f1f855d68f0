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
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.epochs, args.store, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
