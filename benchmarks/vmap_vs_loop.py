"""Benchmark: serimats_func's vmapped training vs. a plain PyTorch loop that trains the same learners one by one.

Both sides train N MLPs 40-100-100-10 on MNIST-1D (batch 64, SGD lr=0.1 momentum=0.9, float32) for the same
number of steps on the same device, and both compute loss and accuracy on the whole train and test sets at the
same steps (the library's logged steps: step 0, every epoch end, the last step). Timed:

- ours: ``Experiment.run()`` with a fresh temporary store (training, evaluation, writing the Zarr batch,
  reading the grid back); building the ``Experiment`` is timed apart.
- loop: for each learner, build the ``nn.Module``, perturb it, make ``torch.optim.SGD``, and train it with a
  shuffled index loop over the data tensors already on the device (no DataLoader), evaluating at the same steps.

Both sides are warmed up first (a few steps each, timed apart and reported as warm-up). The evaluation's share
is timed on both sides too (for ours by wrapping ``serimats_func.training.evaluate_dataset`` for the run), so the
table also shows the speedup with evaluation subtracted. Usage::

    python benchmarks/vmap_vs_loop.py                            # 31 learners, 300 steps
    python benchmarks/vmap_vs_loop.py --learners 128 --steps 100
    python benchmarks/vmap_vs_loop.py --device cuda --json results.json
    python benchmarks/vmap_vs_loop.py --threads 1    # torch.set_num_threads for both sides
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, installed or not

from serimats_func import Experiment, datasets, training  # noqa: E402
from serimats_func.interventions import Optimizer, PerturbWeights  # noqa: E402
from serimats_func.models import MLP  # noqa: E402

WIDTHS = (100, 100)
IN_FEATURES = 40
LR, MOMENTUM = 0.1, 0.9
DEFAULT_LEARNERS = 31
EVAL_BATCH = 1000  # the library's default eval_batch_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timer(device: torch.device, into: dict, key: str):
    """Add the wall time of the block (device work included) to ``into[key]``."""
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


def busy_cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process) so far, or None off Linux: their difference over
    a run is what other processes took, which slows both sides here (torch's multithreaded CPU kernels badly)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def variations(n: int) -> list:
    """The grid of ``n`` learners: the README's 31 (a control plus epsilon 0.001/0.01/0.1 x 10 seeds), else
    epsilon=0.01 x seed=range(n)."""
    if n == DEFAULT_LEARNERS:
        return [
            PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
            PerturbWeights.make_variations(epsilon=(0.001, 0.01, 0.1), seed=range(10)),
        ]
    return [PerturbWeights.make_variations(epsilon=0.01, seed=range(n))]


def perturbations(n: int) -> list[tuple[float, int]]:
    """(epsilon, perturbation seed) of each learner, in the order of ``variations(n)``."""
    if n == DEFAULT_LEARNERS:
        return [(0.0, 0)] + [(eps, seed) for eps in (0.001, 0.01, 0.1) for seed in range(10)]
    return [(0.01, seed) for seed in range(n)]


def make_experiment(n: int, steps: int, device: torch.device, train, test, store: Path) -> Experiment:
    return Experiment(
        model=MLP(widths=WIDTHS, in_features=IN_FEATURES),
        dataset=train,
        test_dataset=test,
        interventions=variations(n),
        optimizer=Optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM),
        batch_size=64,
        steps=steps,
        log_every=None,
        device=device,
        store=store,
        progress=False,
    )


def run_ours(n: int, steps: int, device: torch.device, train, test) -> dict:
    """Time ``Experiment.run()`` (and, apart, the constructor), in a fresh temporary store."""
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="serimats-bench-") as tmp:
        with timer(device, times, "construct"):
            exp = make_experiment(n, steps, device, train, test, Path(tmp) / "bench.zarr")
        plan = exp.plan()
        if plan.to_train != n:
            raise RuntimeError(f"expected {n} learners to train, the plan has {plan.to_train}:\n{plan}")
        # Instrument the store (instance attributes only; the library is untouched) to split the run's time.
        exp.store.write = _timed(exp.store.write, device, times, "store_write")
        exp.store.read = _timed(exp.store.read, device, times, "store_read")
        # The evaluation's share, if training.py still calls step.evaluate_dataset by that name (None otherwise).
        evaluate_dataset = getattr(training, "evaluate_dataset", None)
        if evaluate_dataset is not None:
            training.evaluate_dataset = _timed(evaluate_dataset, device, times, "evaluate")
        try:
            with timer(device, times, "run"):
                ds = exp.run()
        finally:
            if evaluate_dataset is not None:
                training.evaluate_dataset = evaluate_dataset
    final = ds.test_acc.isel(step=-1).values
    return {
        "seconds": times["run"],
        "construct_s": times["construct"],
        "store_write_s": times.get("store_write", 0.0),
        "store_read_s": times.get("store_read", 0.0),
        "evaluate_s": times.get("evaluate") if evaluate_dataset is not None else None,
        "chunks": len(plan.chunks),
        "log_steps": [int(s) for s in ds.step.values],
        "final_test_acc": float(np.nanmean(final)),
        "final_test_acc_std": float(np.nanstd(final)),
    }


def _timed(fn: Callable, device: torch.device, times: dict, key: str) -> Callable:
    def wrapper(*args, **kwargs):
        with timer(device, times, key):
            return fn(*args, **kwargs)

    return wrapper


def perturb_(model: nn.Module, epsilon: float, generator: torch.Generator) -> None:
    """The library's relative perturbation: w += epsilon * ||w|| / ||d|| * d per tensor, d ~ N(0, 1)."""
    if epsilon == 0:
        return
    with torch.no_grad():
        for p in model.parameters():
            d = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            norm = d.norm()
            if norm > 0:
                p.add_(d, alpha=float(epsilon * p.norm() / norm))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy over all of (x, y), as 0-d tensors left on the device (no host sync)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), EVAL_BATCH):
        xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
        logits = model(xb)
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(dim=-1) == yb).sum()
    model.train()
    return loss_sum / len(x), correct.double() / len(x)


def train_one(epsilon: float, perturb_seed: int, steps: int, log_steps: set[int], data: tuple, times: dict | None = None,
              batch_size: int = 64) -> dict:
    """One learner, the ordinary way. ``data`` = (x, y, x_test, y_test) on the device; the evaluation's time is
    added to ``times["evaluate"]``. As in the library's grid (no InitWeights or DataOrder axis), every learner
    starts from the same initial weights and sees the same data order; only the perturbation differs."""
    x, y, x_test, y_test = data
    device = x.device
    times = {} if times is None else times

    def record() -> None:
        with timer(device, times, "evaluate"):
            records.append((*evaluate(model, x, y), *evaluate(model, x_test, y_test)))

    torch.manual_seed(0)  # the shared initialization
    model = MLP(widths=WIDTHS, in_features=IN_FEATURES)  # built on the CPU, then moved (as the library does)
    perturb_(model, epsilon, torch.Generator().manual_seed(10_000 + perturb_seed))
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    order_rng = torch.Generator().manual_seed(1)  # the shared data order
    n = len(x)
    per_epoch = -(-n // batch_size)
    records: list[tuple[torch.Tensor, ...]] = []
    if 0 in log_steps:
        record()
    order = None
    for step in range(steps):
        position = step % per_epoch
        if position == 0:
            order = torch.randperm(n, generator=order_rng).to(device)
        idx = order[position * batch_size : (position + 1) * batch_size]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step + 1 in log_steps:
            record()
    metrics = torch.stack([torch.stack(r) for r in records]).cpu()  # (n_log, 4): train loss/acc, test loss/acc
    return {"final_test_acc": float(metrics[-1, 3])}


def run_loop(n: int, steps: int, log_steps: list[int], data: tuple) -> dict:
    device = data[0].device
    times: dict[str, float] = {}
    with timer(device, times, "run"):
        results = [train_one(eps, seed, steps, set(log_steps), data, times) for eps, seed in perturbations(n)]
    acc = np.array([r["final_test_acc"] for r in results])
    return {"seconds": times["run"], "evaluate_s": times["evaluate"],
            "final_test_acc": float(acc.mean()), "final_test_acc_std": float(acc.std())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--learners", type=int, default=DEFAULT_LEARNERS,
                        help="31: the README's grid (control + 3 epsilons x 10 seeds); other N: epsilon=0.01 x N seeds")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both sides (default: torch's own)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.learners < 1 or args.steps < 1 or args.warmup_steps < 1:
        parser.error("--learners, --steps and --warmup-steps must be positive")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_before = busy_cpu_seconds()

    train, test = datasets.mnist1d()  # generated once and cached; not timed
    data = tuple(t.to(device) for t in (*train.tensors, *test.tensors))

    # Warm-up, timed apart: first calls of each kernel, allocator growth, vmap/functional_call set-up, zarr imports.
    warmup: dict[str, float] = {}
    with timer(device, warmup, "ours"):
        run_ours(args.learners, args.warmup_steps, device, train, test)
    with timer(device, warmup, "loop"):
        train_one(0.01, 0, args.warmup_steps, {0, args.warmup_steps}, data)

    ours = run_ours(args.learners, args.steps, device, train, test)
    loop = run_loop(args.learners, args.steps, ours["log_steps"], data)

    learner_steps = args.learners * args.steps
    result = {
        "learners": args.learners,
        "steps": args.steps,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "other_processes_cpu_s": None,
        "warmup_steps": args.warmup_steps,
        "warmup_s": warmup,
        "ours": ours,
        "loop": loop,
        "speedup": loop["seconds"] / ours["seconds"],
    }

    print(f"MNIST-1D, MLP 40-100-100-10, batch 64, SGD lr={LR} momentum={MOMENTUM}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; metrics on train+test at steps {ours['log_steps']}")
    print(f"{'':<22} {'learners':>8} {'steps':>6} {'device':>8} {'ours s':>8} {'loop s':>8} {'loop/ours':>9} "
          f"{'ours l-steps/s':>14} {'loop l-steps/s':>14}")
    rows = [("total", ours["seconds"], loop["seconds"])]
    if ours["evaluate_s"] is not None:
        rows.append(("minus evaluation", ours["seconds"] - ours["evaluate_s"], loop["seconds"] - loop["evaluate_s"]))
        rows.append(("evaluation only", ours["evaluate_s"], loop["evaluate_s"]))
    for label, a, b in rows:
        rates = f"{learner_steps / a:>14.0f} {learner_steps / b:>14.0f}" if label != "evaluation only" else f"{'-':>14} {'-':>14}"
        print(f"{label:<22} {args.learners:>8} {args.steps:>6} {str(device):>8} {a:>8.2f} {b:>8.2f} {b / a:>8.2f}x {rates}")
    print(f"warm-up (untimed above): ours {warmup['ours']:.2f} s ({args.learners} learners x {args.warmup_steps} steps), "
          f"loop {warmup['loop']:.2f} s (1 learner x {args.warmup_steps} steps)")
    print(f"ours: run() includes the store write {ours['store_write_s']:.2f} s and read-back {ours['store_read_s']:.2f} s; "
          f"{ours['chunks']} chunk(s); Experiment() took {ours['construct_s']:.2f} s apart")
    print(f"final test acc (mean ± std over learners): ours {ours['final_test_acc']:.4f} ± {ours['final_test_acc_std']:.4f}, "
          f"loop {loop['final_test_acc']:.4f} ± {loop['final_test_acc_std']:.4f}")
    cpu_after = busy_cpu_seconds()
    if cpu_before and cpu_after:
        other = (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])
        result["other_processes_cpu_s"] = round(max(other, 0.0), 2)
        print(f"other processes used {max(other, 0.0):.1f} CPU-seconds during this benchmark (keep it near 0: "
              "contention slows torch's multithreaded CPU kernels a lot)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
