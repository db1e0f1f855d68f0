"""Command line (also ``python -m serimats_func``):

- ``serimats-func demo``: the user's first example on MNIST-1D (31 MLPs), with a table and plots.
- ``serimats-func check STORE``: verify every batch and checkpoint (manifests, digests, every chunk's checksum);
  print what is damaged, exit 1 if anything is.
- ``serimats-func ls STORE [--experiment NAME] [--metrics test_acc,train_loss]``: the learners of a store (of one
  experiment, in a store holding several), their coordinates, steps done, last values of chosen metrics.
- ``serimats-func plot STORE METRIC --by COORD [--sel k=v ...] [--out PNG]``: a metric against step, a line
  per value of COORD, mean and spread over seeds; other coordinates are panels or selected with ``--sel``;
  ``--stat median|geomean``, ``--band quantiles|none|0.1,0.9``, ``--seeds``, ``--yscale log`` for heavy tails.
- ``serimats-func tensorboard STORE --out DIR``: each learner's metrics as TensorBoard scalars, a run per learner.
- ``serimats-func wandb STORE``: each learner as a Weights & Biases run, offline by default.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import datasets, export
from .experiments import Experiment
from .interventions import Optimizer, PerturbWeights
from .models import MLP
from .plotter import Plotter, save_figure
from .run.results import store_results
from .store.zarr_store import Store, StoreError


def demo(epochs: int = 20, store: str = "runs/demo.zarr", progress: bool = True) -> Experiment:
    """The user's first example on MNIST-1D: a control plus 3 epsilons x 10 seeds of a relative
    weight perturbation at init, 31 MLPs trained together. Writes the store and two PNG plots (test
    accuracy; distance to the control on log-log axes), prints a table of the final test accuracy and
    distance to the control per epsilon."""
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
        log_at=[1, 2, 5, 10, 20, 40],  # early steps, where the distance to the control starts to grow
        store=store,
        name="demo",
        progress=progress,
    )
    plan = exp.plan()
    print(plan)
    ds = exp.run()
    plotter = Plotter(ds)
    base = Path(store).with_name(Path(store).stem)
    png = save_figure(plotter.curves("test_acc", hue="epsilon"), f"{base}_test_acc.png")
    scaling = save_figure(plotter.scaling("control_distance", hue="epsilon"), f"{base}_control_distance.png")
    final = ds.isel(step=-1)
    control = final.where(final.control, drop=True)
    print(f"\nMNIST-1D, MLP 40-100-100-10, SGD lr=0.1 momentum=0.9, {ds.attrs['steps']} steps "
          f"({epochs} epochs of batch 64)")
    print(f"{'epsilon':>8}  {'learners':>8}  {'test acc':>15}  {'|acc - control|':>15}  {'||w - wc||':>10}")
    for eps in ds.epsilon.values:
        acc = final.test_acc.sel(epsilon=eps).values
        acc = acc[~np.isnan(acc)]
        gap = abs(acc - float(control.test_acc.values.ravel()[0]))
        distance = np.nanmean(final.control_distance.sel(epsilon=eps).values)
        print(f"{eps:>8g}  {len(acc):>8}  {acc.mean():>8.4f} ± {acc.std():.4f}  {gap.mean():>15.4f}  {distance:>10.4f}")
    print(f"\ntrained {plan.to_train} learners, {plan.in_store} reused from {store}; "
          f"plots: {png}, {scaling}; {time.perf_counter() - started:.1f} s in all with {torch.get_num_threads()} "
          "torch thread(s) (OMP_NUM_THREADS or torch.set_num_threads sets them)")
    return exp


# -- reading a store: the one place that opens stores for the command line -------------------------------

def open_results(path: str | Path, experiment: str | None = None) -> xr.Dataset:
    """A store's learners laid out on their coordinates: those of the experiment named ``experiment`` on its grid;
    without a name, the store's one experiment (or, in a store that records none, every learner). A store holding
    several experiments asks for a name, listing them."""
    store = _existing(path)
    name = experiment if experiment is not None else _only_experiment(store)
    try:
        return store_results(store, name)
    except ValueError as error:
        raise SystemExit(f"{path}: {error}") from None


def _existing(path: str | Path) -> Store:
    store = Store(path)
    try:
        store.check()
    except StoreError as error:
        raise SystemExit(str(error)) from None
    if not store.path.exists():
        raise SystemExit(f"{path}: no such store.")
    return store


def _only_experiment(store: Store) -> str | None:
    """The name of the store's one experiment when it names every stored learner; None in a store recording no
    experiment; else the list of its experiments, as the reason to stop (``SystemExit``)."""
    records = store.experiments()
    stored = set(store.index())
    if not records:
        return None
    if len(records) == 1:
        name, record = next(iter(records.items()))
        if stored <= set(record["learner_ids"]):
            return name
    raise SeveralExperiments(experiments_overview(store, records, stored))


class SeveralExperiments(SystemExit):
    """A store holds several experiments, and the command needs one: the message lists them."""

    def __init__(self, overview: str):
        super().__init__(overview + "\nChoose one with --experiment NAME.")
        self.overview = overview


def experiments_overview(store: Store, records: dict | None = None, stored: set | None = None) -> str:
    """One line per experiment the store records: its name, learners in its grid and stored, its coordinates."""
    records = store.experiments() if records is None else records
    stored = set(store.index()) if stored is None else stored
    lines = [f"{store.path}: {len(stored)} learners of {len(records)} experiments:"]
    named: set[str] = set()
    for name, record in records.items():
        ids = set(record["learner_ids"])
        named |= ids
        coords = ", ".join(f"{d} ({len(v)})" for d, v in record["dims"].items()) or "none"
        lines.append(f"  {name}: {len(ids)} learners, {len(ids & stored)} stored; coordinates: {coords}")
    if stored - named:
        lines.append(f"  ({len(stored - named)} learners of no recorded experiment: stored by an earlier version)")
    return "\n".join(lines)


def list_store(path: str | Path, experiment: str | None = None, metrics: Sequence[str] = ()) -> str:
    """A table of the store's learners (those of ``experiment``; see ``open_results``): id, coordinates, steps done
    (the last stored step) and how many steps were logged, each learner's value of ``metrics`` at its last logged
    step, whether it is a control; then checkpoints of chunks in training. A store of several experiments, without
    ``experiment``, gives one line per experiment."""
    try:
        ds = open_results(path, experiment)
    except SeveralExperiments as several:
        if metrics:
            raise
        return several.overview
    coords = [str(d) for d in ds["learner"].dims]
    recorded = [m for m in ds.data_vars if "step" in ds[m].dims]
    for m in metrics:
        if m not in recorded:
            raise SystemExit(f"--metrics {m}: the store holds no metric {m!r}; it holds: {', '.join(recorded)}.")
        own = [d for d in ds[m].dims if d not in coords and d != "step"]
        if own:
            raise SystemExit(f"--metrics {m}: {m} has a dimension of its own ({', '.join(own)}), not one number per step; "
                             f"plot it instead: serimats-func plot {path} {m} --by {own[0]}.")
    named = f", experiment {ds.attrs['experiment']!r}" if "experiment" in ds.attrs else ""
    lines = [f"{path}{named}: {int((ds['learner'] != '').sum())} learners; coordinates: "
             + (", ".join(f"{d} ({ds.sizes[d]})" for d in coords) or "none")
             + ("; fixed: " + ", ".join(f"{k}={ds[k].item()}" for k in ds.coords if k not in ds.dims
                                        and ds[k].ndim == 0) if any(ds[k].ndim == 0 for k in ds.coords) else ""),
             f"metrics: {', '.join(recorded)}",
             ""]
    header = ["learner", *coords, "steps done", "logged", *metrics, "control"]
    rows = []
    metric = recorded[0]
    present = ds[metric].notnull().any([d for d in ds[metric].dims if d not in coords + ["step"]])  # (*coords, step)
    for cell in np.ndindex(*(ds.sizes[d] for d in coords)):
        where = dict(zip(coords, cell, strict=True))
        learner = str(ds["learner"].isel(where).item())
        if not learner:
            continue
        logged = ds["step"].values[present.isel(where).values]
        last = {m: float(ds[m].isel(where).sel(step=logged.max())) if len(logged) else np.nan for m in metrics}
        rows.append([learner, *(str(ds[d].values[i]) for d, i in where.items()),
                     str(int(logged.max())) if len(logged) else "-", str(len(logged)),
                     *(f"{last[m]:.4g}" for m in metrics),
                     "yes" if bool(ds["control"].isel(where)) else ""])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    checkpoints = Store(path).layout.names("checkpoint")
    lines.append(f"\n{len(checkpoints)} chunk checkpoint(s) of training in progress" if checkpoints else "")
    return "\n".join(lines).rstrip()


def check_store(path: str | Path) -> tuple[str, bool]:
    """A report of ``Store.verify`` in words, and whether the store holds damage."""
    store = Store(path)
    if not store.layout.mark.is_file():
        raise SystemExit(f"{path}: no such store.")
    store.check()
    report = store.verify()
    n = len(report.verified) + len(report.unsealed) + len(report.damaged)
    lines = [f"{path}: {n} batch(es) and checkpoint(s); {len(report.verified)} verified (manifest, digest and every "
             f"chunk's CRC-32C), {len(report.damaged)} damaged."]
    for folder, problem in report.damaged:
        lines.append(f"  DAMAGED {folder.relative_to(store.path)}: {problem}")
    if report.damaged:
        lines.append("The next run() or open_store sets the damaged ones aside into damaged/ (nothing is deleted) and "
                     "their learners count as missing: run the experiment again to train them.")
    if report.unsealed:
        lines.append(f"{len(report.unsealed)} were written without checksums (by an older version): they read, but "
                     "there is no checksum or manifest to verify them against.")
    if report.set_aside:
        lines.append(f"{len(report.set_aside)} damaged folder(s) already set aside in "
                     f"{store.layout.damaged} (kept, never deleted): "
                     + ", ".join(p.name for p in report.set_aside))
    return "\n".join(lines), bool(report.damaged)


def _selection(ds: xr.Dataset, pairs: list[str]) -> dict:
    """``k=v`` strings as a selection, each value matched to the coordinate's own values."""
    sel = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in ds.coords:
            raise SystemExit(f"--sel {pair!r}: give coordinate=value with a coordinate of the store: "
                             f"{', '.join(str(d) for d in ds.dims if d != 'step')}.")
        values = ds[name].values.tolist()
        match = [v for v in values if str(v) == text or (_number(text) is not None and _number(v) == _number(text))]
        if not match:
            raise SystemExit(f"--sel {pair!r}: {name} has no value {text!r}; its values: {values}.")
        sel[name] = match[0]
    return sel


def _band(text: str) -> str | tuple[float, float] | None:
    """``--band``: std, quantiles, none, or two quantiles LOW,HIGH (``0.1,0.9``)."""
    if text in ("std", "quantiles"):
        return text
    if text == "none":
        return None
    try:
        low, high = (float(q) for q in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use std, quantiles (25-75%), none, or two quantiles such as "
                                         f"0.1,0.9") from None
    return low, high


def _number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def plot_store(path: str | Path, metric: str, by: str | None, sel: list[str], out: str | None, kind: str = "curves",
               col: str | None = None, row: str | None = None, y: str | None = None,
               experiment: str | None = None, stat: str = "mean", band: str | tuple[float, float] | None = "std",
               seeds: bool = False, yscale: str | None = None) -> Path:
    """Draw a stored metric into a PNG; returns its path (default ``<store>_<metric>.png`` beside the store, or
    ``<store>_<experiment>_<metric>.png`` when an experiment is named). ``stat``, ``band``, ``seeds`` and
    ``yscale`` (None: the plot's own, linear for curves, log for scaling) as in ``Plotter.curves``."""
    if kind == "heatmap" and (band != "std" or seeds or yscale is not None):
        raise SystemExit("serimats-func plot: --band, --seeds and --yscale draw lines: they go with --kind curves or "
                         "scaling (a heat map takes --stat).")
    ds = open_results(path, experiment)
    plotter = Plotter(ds)
    selection = _selection(ds, sel)
    lines = dict(stat=stat, band=band, seeds=seeds)
    try:
        if kind == "scaling":
            fig = plotter.scaling(metric, hue=by, col=col, row=row, sel=selection, yscale=yscale or "log", **lines)
        elif kind == "heatmap":
            fig = plotter.heatmap(metric, x=by, y=y, col=col, row=row, sel=selection, stat=stat)
        else:
            fig = plotter.curves(metric, hue=by, col=col, row=row, sel=selection, yscale=yscale or "linear", **lines)
    except ValueError as error:
        raise SystemExit(f"serimats-func plot: {error}") from None
    store = Path(path)
    stem = store.stem if experiment is None else f"{store.stem}_{experiment}"
    target = Path(out) if out else store.with_name(f"{stem}_{metric}{'' if kind == 'curves' else '_' + kind}.png")
    return save_figure(fig, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serimats-func", description="Vectorized training sweeps.")
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="train the weight-perturbation example on MNIST-1D")
    d.add_argument("--epochs", type=int, default=20)
    d.add_argument("--store", default="runs/demo.zarr", help="Zarr store to write (reused when it exists)")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ls = commands.add_parser("ls", help="list the learners of a store")
    ls.add_argument("store")
    ls.add_argument("--experiment", help=EXPERIMENT_HELP)
    ls.add_argument("--metrics", default="", help="each learner's value of these metrics at its last logged step, "
                    "e.g. --metrics test_acc,train_loss")
    c = commands.add_parser("check", help="verify a store's checksums and manifests; exit 1 if anything is damaged")
    c.add_argument("store")
    p = commands.add_parser("plot", help="plot a stored metric against step")
    p.add_argument("store")
    p.add_argument("--experiment", help=EXPERIMENT_HELP)
    p.add_argument("metric", help="e.g. test_acc, train_loss, control_distance")
    p.add_argument("--by", help="coordinate with one line per value (default: the first that is not a seed)")
    p.add_argument("--sel", nargs="*", default=[], metavar="COORD=VALUE", help="fix coordinates, e.g. --sel lr=0.01")
    p.add_argument("--col", help="coordinate with one column of panels per value")
    p.add_argument("--row", help="coordinate with one row of panels per value")
    p.add_argument("--kind", choices=("curves", "scaling", "heatmap"), default="curves",
                   help="curves (default); scaling: log-log axes, controls left out; heatmap: --by by --y at the last step")
    p.add_argument("--y", help="heatmap: the coordinate on the vertical axis")
    p.add_argument("--stat", choices=("mean", "median", "geomean"), default="mean",
                   help="over the seeds: mean (default), median, or geomean (exp of the mean of log; positive values)")
    p.add_argument("--band", type=_band, default="std", metavar="std|quantiles|none|LOW,HIGH",
                   help="the band around each line: std (default; ×/÷ the geometric std with geomean), quantiles "
                        "(25-75%%), none, or two quantiles such as 0.1,0.9")
    p.add_argument("--seeds", action="store_true", help="draw each learner as a thin line of its value's colour")
    p.add_argument("--yscale", choices=("linear", "log"),
                   help="the value axis (default: linear for curves, log for scaling); the step axis of curves stays linear")
    p.add_argument("--out", help="PNG file to write (default: <store>_<metric>.png beside the store)")
    t = commands.add_parser("tensorboard", help="write each learner's metrics as TensorBoard scalars, one run per learner")
    t.add_argument("store")
    t.add_argument("--out", required=True, help="folder of the runs (then: tensorboard --logdir DIR)")
    t.add_argument("--experiment", help=EXPERIMENT_HELP)
    w = commands.add_parser("wandb", help="log each learner as a Weights & Biases run (offline by default)")
    w.add_argument("store")
    w.add_argument("--project", default="serimats-func")
    w.add_argument("--mode", choices=("offline", "online"), default="offline",
                   help="offline (default): runs written under --dir, uploaded later with wandb sync")
    w.add_argument("--dir", default=None, help="where wandb writes its runs (default: ./wandb)")
    w.add_argument("--experiment", help=EXPERIMENT_HELP)
    add_submit_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.epochs, args.store, progress=not args.no_progress)
    elif args.command == "ls":
        print(list_store(args.store, args.experiment, [m for m in args.metrics.split(",") if m]))
    elif args.command == "check":
        text, damaged = check_store(args.store)
        print(text)
        return 1 if damaged else 0
    elif args.command == "plot":
        print(plot_store(args.store, args.metric, args.by, args.sel, args.out, args.kind, args.col, args.row, args.y,
                         args.experiment, args.stat, args.band, args.seeds, args.yscale))
    elif args.command == "tensorboard":
        return tensorboard(args.store, args.out, args.experiment)
    elif args.command == "wandb":
        return wandb(args.store, args.project, args.mode, args.dir, args.experiment)
    elif args.command == "submit":
        return submit(args)
    return 0


EXPERIMENT_HELP = "the experiment (its name=) whose learners to take, in a store holding several"


def tensorboard(path: str, out: str, experiment: str | None = None) -> int:
    """``serimats-func tensorboard STORE --out DIR``: one TensorBoard run per learner (``export.to_tensorboard``)."""
    ds = open_results(path, experiment)
    try:
        runs = export.to_tensorboard(ds, out)
    except ImportError as error:
        print(f"serimats-func tensorboard: {error}", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs in {out}: tensorboard --logdir {out}")
    return 0


def wandb(path: str, project: str, mode: str, folder: str | None, experiment: str | None = None) -> int:
    """``serimats-func wandb STORE``: one Weights & Biases run per learner, offline by default (``export.to_wandb``)."""
    ds = open_results(path, experiment)
    try:
        count = export.to_wandb(ds, project=project, mode=mode, folder=folder)
    except ImportError as error:
        print(f"serimats-func wandb: {error}", file=sys.stderr)
        return 2
    where = Path(folder or ".") / "wandb"
    print(f"{count} runs logged to the project {project!r}"
          + (f", offline in {where}: upload them with wandb sync {where}/offline-run-*" if mode == "offline" else ""))
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
    from .cluster import ShardError, run_sharded
    from .experiments import ScriptSource

    source = ScriptSource(str(Path(args.script).resolve()), args.experiment)
    exp = source.load()
    exp.progress = not args.no_progress
    folder = args.folder or str(exp.folder("jobs"))
    executor = submitit.AutoExecutor(folder, cluster=None if args.cluster == "auto" else args.cluster)
    options = {"timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_node, "cpus_per_task": args.cpus_per_task,
               "mem_gb": args.mem_gb, "slurm_partition": args.slurm_partition, "name": f"serimats-{exp.name}"}
    executor.update_parameters(**{k: v for k, v in options.items() if v is not None})
    exp.record()
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
