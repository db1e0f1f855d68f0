"""Speed benchmark: the same N learners trained three ways -- a serial PyTorch loop, naive torch.func, serimats_func.

For each workload and each N, the three ways train the same N learners for the same S steps on the same device:

- serial: one ``nn.Module`` and one ``torch.optim`` optimizer per learner, the learners one after another; batches
  are gathered by index from tensors already on the device (no DataLoader). Models and optimizers are built
  before the clock starts.
- naive: ``torch.func.stack_module_state`` + ``vmap(grad_and_value(loss of functional_call))`` with the batch
  shared (``in_dims=None``), and a hand-written in-place update of the same optimizer on the stacked parameters.
  Serial and naive start each learner from the same seed (``torch.manual_seed(i)``) and see the same batches.
- ours: ``serimats_func.Experiment(...).run()`` in a fresh temporary store, with
  ``InitWeights.make_variations(seed=range(N))`` and the whole-dataset evaluation switched off
  (``Experiment(evaluate=False)``). ``run()`` is timed whole (initial states, steps, store write, read-back); its
  parts are timed by a callback (``StepProbe``) and by timers on ``exp.store``; building the ``Experiment`` and a
  first warm-up ``run()`` (first-call costs) are timed apart.

Workloads:

- ``mlp``: MNIST-1D (4000 train / 1000 test), MLP 40-100-100-10 ReLU, Adam lr=1e-3, batch 100, float32.
- ``lenet``: LeNet-5 on the first 8,000 images of the MNIST test split read from ``../shared/data/mnist``
  (relative to the repository root; the remaining 2,000 are the evaluation's test set), SGD lr=0.01
  momentum=0.9, batch 64, float32. Without that folder: synthetic 1x28x28 data of the same size (said so).

Optimizer axis: ``--optimizers sgd,adam,rmsprop,muon`` trains each workload with each of these optimizers in
turn (``OPTIMIZERS`` below: torch.optim's classes; Muon with AdamW on the non-matrices, ``MuonWithAdamW`` in the
serial loop, as the library does), the optimizers of one N measured one after another so that they share the
machine's state; the naive way has hand-written updates for SGD and Adam only. A second table gives serial/ours per
optimizer side by side.

S is chosen per (workload, N) from 3 warm-up steps of each way, so that the slowest way takes about
``--seconds`` (at least ``--min-steps``). Above ``--max-serial`` learners the serial loop is not run: its time per
learner-step is extrapolated from the largest N measured (marked ``*``). Printed per cell: microseconds per
learner-step, learner-steps/s, serial/ours and naive/ours, achieved FLOP/s (one learner's forward+backward
FLOPs on one batch, counted by ``FlopCounterMode`` -- matmuls and convolutions only -- times learner-steps/s)
against the device's measured float32 matmul peak, ours' breakdown, the final training losses (last batch),
the CPU-seconds other processes used (``!`` = contended), then one whole-set evaluation (train and test loss and
accuracy) of the N learners, serial vs ours. A markdown table for ``benchmarks/README.md`` ends the output.

Usage::

    python benchmarks/speed.py                                      # CPU: N = 1 2 4 ... 128, both workloads
    python benchmarks/speed.py --workloads mlp --n 1,4 --seconds 0.3
    python benchmarks/speed.py --device cuda --json gpu.json         # N = 1 8 32 ... 4096; serial up to 128
    python benchmarks/speed.py --steps 200 --threads 1 --no-eval
    python benchmarks/speed.py --workloads mlp --optimizers sgd,adam,rmsprop,muon --n 16 --no-eval
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's package, installed or not

import serimats_func  # noqa: E402
from serimats_func import Experiment, datasets  # noqa: E402
from serimats_func.acceleration import convolutions as lib_convolutions  # noqa: E402
from serimats_func.acceleration import prepare as lib_acceleration  # noqa: E402
from serimats_func.acceleration.convolutions import convolutions_of  # noqa: E402
from serimats_func.callbacks import Callback  # noqa: E402
from serimats_func.core import evaluation as lib_evaluation  # noqa: E402
from serimats_func.interventions import InitWeights, Optimizer  # noqa: E402
from serimats_func.models import MLP, Lenet5  # noqa: E402
from serimats_func.optimizers import torch_optimizer  # noqa: E402
from serimats_func.run import training as lib_training  # noqa: E402

CPU_NS = (1, 2, 4, 8, 16, 32, 64, 128)
CUDA_NS = (1, 8, 32, 128, 512, 1024, 2048, 4096)
CUDA_MAX_SERIAL = 128
MAX_STEPS = 100_000
MNIST_ROOT = REPO / ".." / "shared" / "data" / "mnist"
LENET_TRAIN, LENET_TOTAL = 8000, 10000
WAYS = ("serial", "naive", "ours", "compiled")
COMPILED_NS = {"mlp": (32, 64, 128), "lenet": ()}  # where "compiled" runs by default on a CPU (--compiled-n)
OPTIMIZERS = {  # --optimizers: name -> (torch.optim class, hyperparameters)
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
    "nadam": (torch.optim.NAdam, {"lr": 2e-3}),
    "adafactor": (torch.optim.Adafactor, {"lr": 1e-2}),
    "muon": (torch.optim.Muon, {"lr": 0.02}),
}


# ---------------------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    description: str
    make_model: Callable[[], nn.Module]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    optimizer: type
    hparams: dict
    batch_size: int
    note: str = ""
    classes: int = 10
    optimizer_name: str = ""  # set by --optimizers

    @property
    def key(self) -> str:
        """The workload and, with --optimizers, its optimizer: ``mlp`` or ``mlp/rmsprop``."""
        return f"{self.name}/{self.optimizer_name}" if self.optimizer_name else self.name


def with_optimizer(workload: Workload, name: str) -> Workload:
    """The workload trained with ``OPTIMIZERS[name]`` in place of its own optimizer."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    cls, hparams = OPTIMIZERS[name]
    return dataclasses.replace(workload, optimizer=cls, hparams=dict(hparams), optimizer_name=name)


def mlp_workload() -> Workload:
    train, test = datasets.mnist1d()
    return Workload("mlp", "MNIST-1D 4000/1000, MLP 40-100-100-10 ReLU, Adam lr=1e-3, batch 100, float32",
                    lambda: MLP(widths=(100, 100), in_features=40), train.tensors, test.tensors,
                    torch.optim.Adam, {"lr": 1e-3}, 100)


def lenet_workload(root: Path) -> Workload:
    """MNIST test split: images 0-7999 train, 8000-9999 test; synthetic data of that size without the files."""
    try:
        x, y = datasets.mnist(root, train=False).tensors
        note = f"real MNIST test split from {root.resolve()}"
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(LENET_TOTAL, 1, 28, 28, generator=g), torch.randint(0, 10, (LENET_TOTAL,), generator=g)
        note = f"SYNTHETIC data (uniform pixels, random labels): no MNIST files in {root.resolve()}"
    x, y = x[:LENET_TOTAL], y[:LENET_TOTAL]
    return Workload("lenet", "LeNet-5, MNIST test split 8000 train / 2000 test, SGD lr=0.01 momentum=0.9, "
                    "batch 64, float32", Lenet5, (x[:LENET_TRAIN], y[:LENET_TRAIN]),
                    (x[LENET_TRAIN:], y[LENET_TRAIN:]), torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}, 64, note)


def load_workload(name: str, mnist_root: Path) -> Workload:
    if name == "mlp":
        return mlp_workload()
    if name == "lenet":
        return lenet_workload(mnist_root)
    raise ValueError(f"unknown workload {name!r}; choose from mlp, lenet")


def seeded_model(workload: Workload, seed: int, device: torch.device) -> nn.Module:
    """Learner ``seed``'s model for serial and naive: the same initial weights for both."""
    torch.manual_seed(seed)
    return workload.make_model().to(device)


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_cpu_seconds() -> tuple[float, float] | None:
    """(CPU-seconds used by the whole machine, by this process) so far, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


class Clock:
    """Times a block (device work included) and the CPU-seconds other processes used meanwhile."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.other_cpu_s = device, 0.0, None

    def __enter__(self) -> Clock:
        sync(self.device)
        self._cpu = busy_cpu_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start
        cpu = busy_cpu_seconds()
        if cpu and self._cpu:
            self.other_cpu_s = max(0.0, (cpu[0] - self._cpu[0]) - (cpu[1] - self._cpu[1]))


def contended(other_cpu_s: float | None, seconds: float) -> bool:
    """Other processes took more than 5% of one core (and over 0.05 CPU-seconds) during a measurement."""
    return other_cpu_s is not None and other_cpu_s > max(0.05, 0.05 * seconds)


def min_step_seconds(step: Callable[[int], object], steps: int, device: torch.device) -> float:
    """Run ``step(0..steps-1)``, each timed alone; the fastest after the first (first-call costs)."""
    times = []
    for i in range(steps):
        with Clock(device) as clock:
            step(i)
        times.append(clock.seconds)
    return min(times[1:] or times)


def timed(fn: Callable, device: torch.device, into: dict, key: str) -> Callable:
    """``fn`` whose calls' wall time (synchronized) is added to ``into[key]``."""

    def wrapper(*args, **kwargs):
        with Clock(device) as clock:
            out = fn(*args, **kwargs)
        into[key] = into.get(key, 0.0) + clock.seconds
        return out

    return wrapper


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def guarded(fn: Callable, *args) -> tuple[object, str | None]:
    """``(fn(*args), None)``, or ``(None, "out of memory")`` when the device runs out of memory."""
    try:
        return fn(*args), None
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, "out of memory"


# ---------------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "serimats_func": getattr(serimats_func, "__version__", "?"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None,
    }


def matmul_peak(device: torch.device, reps: int = 5) -> dict:
    """Best of ``reps`` float32 square matmuls (4096 on a GPU, 1024 on a CPU), as FLOP/s."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # first call: kernel selection, allocation
    with Clock(device) as clock:
        best = min(min_step_seconds(lambda _: a @ b, 2, device) for _ in range(reps))
    return {"size": n, "seconds": best, "flop_per_s": 2 * n**3 / best, "other_cpu_s": clock.other_cpu_s,
            "contended": contended(clock.other_cpu_s, clock.seconds)}


def flops_per_learner_step(workload: Workload) -> int:
    """FLOPs (matmuls, convolutions) of one learner's forward+backward on one batch."""
    model = workload.make_model()
    x, y = workload.train[0][: workload.batch_size], workload.train[1][: workload.batch_size]
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------- serial and naive


class Batches:
    """The data order of serial and naive: one permutation per epoch, on the device before timing;
    ``batches(step)`` is a view of it."""

    def __init__(self, n_examples: int, batch_size: int, steps: int, device: torch.device, seed: int = 0):
        self.batch_size, self.per_epoch = batch_size, math.ceil(n_examples / batch_size)
        g = torch.Generator().manual_seed(seed)
        epochs = math.ceil(steps / self.per_epoch)
        self.orders = torch.stack([torch.randperm(n_examples, generator=g) for _ in range(epochs)]).to(device)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.per_epoch)
        return self.orders[epoch, position * self.batch_size : (position + 1) * self.batch_size]


def serial_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class Serial:
    """One nn.Module and one torch.optim optimizer per learner, trained one after another."""

    def __init__(self, workload: Workload, n: int, data: tuple, device: torch.device):
        self.workload, self.n, self.data, self.device = workload, n, data, device

    def _learner(self, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = seeded_model(self.workload, seed, self.device)  # Muon: torch's Muon and AdamW (MuonWithAdamW)
        return model, torch_optimizer(self.workload.optimizer, list(model.named_parameters()), **self.workload.hparams)

    def warmup(self, steps: int, batches: Batches) -> float:
        """Seconds of one learner-step, from a throwaway learner."""
        model, optimizer = self._learner(0)
        x, y = self.data
        return min_step_seconds(lambda i: serial_step(model, optimizer, x[batches(i)], y[batches(i)]), steps, self.device)

    def timed(self, steps: int, batches: Batches) -> dict:
        learners = [self._learner(seed) for seed in range(self.n)]  # built before the clock starts
        x, y = self.data
        losses = []
        with Clock(self.device) as clock:
            for model, optimizer in learners:
                for step in range(steps):
                    loss = serial_step(model, optimizer, x[batches(step)], y[batches(step)])
                losses.append(loss.detach())
        return {"seconds": clock.seconds, "other_cpu_s": clock.other_cpu_s, "losses": torch.stack(losses).cpu()}


class NaiveAdam:
    """torch.optim.Adam's single-tensor arithmetic, in place on stacked (N, ...) parameters."""

    def __init__(self, params: dict, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}

    @torch.no_grad()
    def __call__(self, grads: dict) -> None:
        self.t += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**self.t)
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.t)
        for k, p in self.params.items():
            g = grads[k]
            self.exp_avg[k].lerp_(g, 1 - beta1)
            self.exp_avg_sq[k].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (self.exp_avg_sq[k].sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(self.exp_avg[k], denom, value=-step_size)


class NaiveSGD:
    """torch.optim.SGD with momentum (no dampening, weight decay or nesterov), in place on stacked parameters."""

    def __init__(self, params: dict, lr: float, momentum: float = 0.0):
        self.params, self.lr, self.momentum, self.buffers = params, lr, momentum, {}

    @torch.no_grad()
    def __call__(self, grads: dict) -> None:
        for k, p in self.params.items():
            g = grads[k]
            if self.momentum:
                if k not in self.buffers:
                    self.buffers[k] = g.clone()
                else:
                    self.buffers[k].mul_(self.momentum).add_(g)
                g = self.buffers[k]
            p.add_(g, alpha=-self.lr)


def naive_optimizer(workload: Workload, params: dict) -> Callable[[dict], None]:
    if workload.optimizer is torch.optim.Adam:
        return NaiveAdam(params, **workload.hparams)
    if workload.optimizer is torch.optim.SGD:
        return NaiveSGD(params, **workload.hparams)
    raise ValueError(f"no hand-written update for {workload.optimizer.__name__}")


class Naive:
    """N learners stacked with stack_module_state; vmap(grad_and_value(...)) over a shared batch."""

    def __init__(self, workload: Workload, n: int, data: tuple, device: torch.device):
        self.workload, self.n, self.data, self.device = workload, n, data, device

    def _build(self) -> None:
        models = [seeded_model(self.workload, seed, self.device) for seed in range(self.n)]
        params, self.buffers = stack_module_state(models)
        self.params = {k: v.detach() for k, v in params.items()}
        base = copy.deepcopy(models[0]).to("meta")

        def loss_of(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

        self.grad_fn = vmap(grad_and_value(loss_of), in_dims=(0, 0, None, None))
        self.update = naive_optimizer(self.workload, self.params)

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        grads, losses = self.grad_fn(self.params, self.buffers, self.data[0][idx], self.data[1][idx])
        self.update(grads)
        return losses

    def warmup(self, steps: int, batches: Batches) -> float:
        """Seconds of one step of all N learners (the learners are rebuilt for the timed run)."""
        self._build()
        return min_step_seconds(lambda i: self.step(batches(i)), steps, self.device)

    def timed(self, steps: int, batches: Batches) -> dict:
        self._build()
        with Clock(self.device) as clock:
            for step in range(steps):
                losses = self.step(batches(step))
        del self.params, self.buffers, self.grad_fn, self.update
        return {"seconds": clock.seconds, "other_cpu_s": clock.other_cpu_s, "losses": losses.cpu()}


# ---------------------------------------------------------------------------------------------- ours
# Everything that reaches beyond serimats_func's user API is in this section (ADAPTERS), so that it is easy to
# update when it changes: the step probe (a callback, ``Experiment(callbacks=...)``), timers on the experiment's
# store object, the speed report and the whole-set evaluation. Nothing in the library is patched.


class StepProbe(Callback):
    """ADAPTER: a callback (``Experiment(callbacks=[probe])``, see ``serimats_func.callbacks``) that times the run's
    chunks. Into ``times``: ``train_chunk`` (each chunk's training, from its start to its last update, the store
    write left out), ``setup`` (the part before its first update: initial state, the check on meta tensors,
    choosing and compiling the step, the step-0 record) and ``steps``/``step_calls`` (its updates, each timed
    synchronized from the end of the one before: gathering the batch and the metric records at logged steps
    included). It keeps each chunk's last loss (for the final losses) and, with ``time_steps``, when each update
    ended."""

    def __init__(self, device: torch.device, times: dict, time_steps: bool = False):
        self.device, self.times, self.time_steps = device, times, time_steps
        self.last: list = []  # per chunk: the loss (N,) of its last update
        self.step_ends: list[float] = []
        self._began = self._mark = 0.0

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _add(self, key: str, value: float) -> None:
        self.times[key] = self.times.get(key, 0) + value

    def on_chunk_start(self, chunk) -> None:
        self.last.append(None)
        self._began = self._now()

    def on_step(self, chunk, step, state, loss) -> None:
        now = self._now()
        if loss is None:  # where the chunk starts: its setup is done
            self._add("setup", now - self._began)
        else:
            self.last[-1] = loss
            self._add("steps", now - self._mark)
            self._add("step_calls", 1)
            if self.time_steps:
                self.step_ends.append(now)
        self._mark = now

    def on_chunk_end(self, chunk, result) -> None:
        self._add("train_chunk", self._now() - self._began)

    def losses(self, n: int) -> torch.Tensor | None:
        """The last update's loss of the first ``n`` learners."""
        if not self.last or any(loss is None for loss in self.last):
            return None
        return torch.cat([loss.detach().cpu() for loss in self.last])[:n]


def evaluation_switch() -> str:
    return "Experiment(evaluate=False)"


def library_speed_report(exp: Experiment) -> list[dict]:
    """ADAPTER: what the library chose for each chunk of the last run() (plan, compiled or not) and what choosing
    and compiling cost (``Experiment.speed_report``); empty if the library has no such report."""
    return [dataclasses.asdict(r) for r in getattr(exp, "speed_report", [])]


def make_experiment(workload: Workload, n: int, steps: int, device: torch.device, store: Path,
                    compile: bool | str = "auto", callbacks: tuple = ()) -> Experiment:
    extra: dict = {"evaluate": False, "callbacks": list(callbacks)}
    if compile != "auto":
        extra["compile"] = compile
    return Experiment(
        model=workload.make_model(), dataset=workload.train, test_dataset=workload.test,
        interventions=[InitWeights.make_variations(seed=range(n))],
        optimizer=Optimizer(workload.optimizer, **workload.hparams),
        batch_size=workload.batch_size, steps=steps, device=device, store=store, progress=False, **extra,
    )


def run_experiment(workload: Workload, n: int, steps: int, device: torch.device, time_steps: bool = False,
                   compile: bool | str = "auto") -> dict:
    """Build an Experiment in a fresh temporary store and run it, watched by a ``StepProbe``; times and the final
    losses. With ``compile=True``, ``seconds`` leaves out what the library reports as compiling and measuring
    (``run_s`` has it all), and the time per step is the run's (the probe's step ends are not kept)."""
    times: dict[str, float] = {}
    probe = StepProbe(device, times, time_steps and compile is not True)
    with tempfile.TemporaryDirectory(prefix="serimats-speed-") as tmp:
        with Clock(device) as build:
            exp = make_experiment(workload, n, steps, device, Path(tmp) / "speed.zarr", compile, callbacks=(probe,))
        chunks = len(exp.plan().chunks)  # before run(): afterwards every learner is in the store
        exp.store.write = timed(exp.store.write, device, times, "store_write")  # this Store object only
        exp.store.read = timed(exp.store.read, device, times, "store_read")
        with Clock(device) as run:
            exp.run()
    report = library_speed_report(exp)
    compile_s = sum(r["compile_s"] for r in report) if report else None
    measure_s = sum(r["measure_s"] for r in report)
    seconds = run.seconds - (compile_s or 0.0) - measure_s if compile is True else run.seconds
    result = {"seconds": seconds, "run_s": run.seconds, "other_cpu_s": run.other_cpu_s, "build_s": build.seconds,
              "chunks": chunks, "breakdown": times, "compile_s": compile_s, "measure_s": measure_s, "speed": report,
              "losses": probe.losses(n)}
    if time_steps:
        result["step_s"] = (_step_seconds(probe.step_ends) * max(chunks, 1) if compile is not True
                            else seconds / steps)
    return result


def _step_seconds(step_ends: list[float]) -> float:
    gaps = [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]
    return min(gaps) if gaps else math.inf


class Ours:
    """serimats_func.Experiment(...).run() as a user gets it (``compile="auto"``: eager for runs this short): a
    warm-up run, then the timed run in a fresh store."""

    compile: bool | str = "auto"

    def __init__(self, workload: Workload, n: int, data: tuple, device: torch.device):
        self.workload, self.n, self.device = workload, n, device

    def warmup(self, steps: int, batches: Batches) -> float:
        """Seconds of one step of all N learners, from a warm-up run() of ``steps`` steps."""
        self.warm = run_experiment(self.workload, self.n, steps, self.device, time_steps=True, compile=self.compile)
        self.warm["steps"] = steps
        return self.warm["step_s"]

    def timed(self, steps: int, batches: Batches) -> dict:
        result = run_experiment(self.workload, self.n, steps, self.device, compile=self.compile)
        result["warmup_s"], result["warmup_steps"] = self.warm["seconds"], self.warm["steps"]
        result["warmup_compile_s"] = self.warm["compile_s"]
        return result


class Compiled(Ours):
    """``Experiment(compile=True)``: the whole step under torch.compile. The warm-up run pays the compilation (a
    cold inductor cache: minutes on a small CPU); the timed run, a new Experiment, traces again and finds the
    kernels in inductor's cache: both are reported apart and left out of its time."""

    compile = True
    extra_steps = 10

    def warmup(self, steps: int, batches: Batches) -> float:
        """Seconds of one compiled step of all N learners: the slope between a warm-up run of ``steps`` steps (which
        compiles) and one of ``steps + 10`` (fixed costs cancel)."""
        first = run_experiment(self.workload, self.n, steps, self.device, compile=True)
        longer = run_experiment(self.workload, self.n, steps + self.extra_steps, self.device, compile=True)
        self.warm = {**first, "steps": steps}
        return max(1e-9, (longer["seconds"] - first["seconds"]) / self.extra_steps)


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_module(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(loss sum, correct) over all of (x, y), left on the device."""
    total = torch.zeros(2, dtype=torch.float64, device=x.device)
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        total[0] += F.cross_entropy(logits, yb, reduction="sum").double()
        total[1] += (logits.argmax(-1) == yb).sum()
    return total


def serial_evaluation(workload: Workload, n: int, sets: list, batch_size: int, device: torch.device) -> Clock:
    """Time one whole-set evaluation (train and test) of N models, one after another."""
    models = [seeded_model(workload, seed, device).eval() for seed in range(n)]
    evaluate_module(models[0], sets[0][0][:batch_size], sets[0][1][:batch_size], batch_size)  # warm-up
    with Clock(device) as clock:
        results = [evaluate_module(m, x, y, batch_size) for m in models for x, y in sets]
        torch.stack(results).cpu()
    return clock


def library_evaluation(exp: Experiment, device: torch.device) -> Callable[[int | None], object]:
    """ADAPTER to the library's whole-set evaluation of stacked learners (``training.initial_state``,
    ``evaluation.make_logits`` and ``evaluation.evaluate_dataset`` today), chunk by chunk of the library's plan. Returns
    ``evaluate(limit)``: train and test loss and accuracy of every learner, on the first ``limit`` examples of
    each set (all if None)."""
    chunks = exp.plan().chunks
    states = [lib_training.initial_state(c.learners, lib_training.chunk_hooks(c.learners), device) for c in chunks]
    data = exp._runner().training_data(exp.base)  # the train and test tensors on the device
    layers, plan = {}, None
    if convolutions_of(exp.template):  # the default plan, as a short run() takes it
        plan = lib_acceleration.default_plan(device, max(2, len(chunks[0].learners)))
        layers = lib_convolutions.plan_for(exp.template, plan) if plan in lib_convolutions.PLANS else {}
    looped = plan == "serial" and "per_learner" in inspect.signature(lib_evaluation.make_logits).parameters
    per_learner = {"per_learner": True} if looped else {}
    logits_fn = lib_evaluation.make_logits(exp.template, layers, **per_learner)
    sets = [(data.x, data.y), (data.x_test, data.y_test)]

    def run(limit: int | None = None) -> list:
        exp.template.eval()
        try:
            with lib_acceleration.keep_freed_memory(device):  # as the library's training loop evaluates
                return evaluate(limit)
        finally:
            exp.template.train()

    def evaluate(limit: int | None) -> list:
        return [lib_evaluation.evaluate_dataset(logits_fn, exp.loss, state.params, state.buffers, x[:limit],
                                          y[:limit], exp.eval_batch_size) for state in states for x, y in sets]

    return run


def ours_evaluation(workload: Workload, n: int, device: torch.device) -> tuple[Clock, int]:
    """Time one whole-set evaluation of the N learners by the library; also returns its eval batch size."""
    with tempfile.TemporaryDirectory(prefix="serimats-speed-") as tmp:
        exp = make_experiment(workload, n, 1, device, Path(tmp) / "eval.zarr")
        evaluate = library_evaluation(exp, device)
        evaluate(exp.eval_batch_size)  # warm-up on one batch
        with Clock(device) as clock:
            results = evaluate()
            [t.cpu() for pair in results for t in pair]
    return clock, exp.eval_batch_size


# ---------------------------------------------------------------------------------------------- one cell


@dataclass
class Context:
    device: torch.device
    args: argparse.Namespace
    max_serial: float
    peak: float
    serial_reference: dict = field(default_factory=dict)  # workload -> (N, seconds per learner-step)
    serial_eval_reference: dict = field(default_factory=dict)  # workload -> (N, seconds per learner)


def choose_steps(n: int, estimates: dict, args: argparse.Namespace) -> int:
    """Steps so that the slowest way takes about ``--seconds`` and the fastest of the library's ways at least
    ``--ours-seconds`` (its fixed costs, the store write above all, amortized as in a real run), the slowest at most
    ``--max-seconds`` (``estimates``: seconds per step of all N)."""
    if args.steps:
        return args.steps
    finite = {k: t for k, t in estimates.items() if t and math.isfinite(t)}
    if not finite:
        return args.min_steps
    slowest = max(finite.values())
    steps = args.seconds / slowest
    library = [finite[k] for k in ("ours", "compiled") if k in finite]
    if library:
        steps = min(max(steps, args.ours_seconds / min(library)), args.max_seconds / slowest)
    return max(args.min_steps, min(MAX_STEPS, round(steps)))


def make_ways(workload: Workload, n: int, data: tuple, ctx: Context) -> dict:
    classes = {"serial": Serial, "naive": Naive, "ours": Ours, "compiled": Compiled}
    run = {"serial": n <= ctx.max_serial, "compiled": n in compiled_counts(workload.name, ctx.args),
           "naive": workload.optimizer in (torch.optim.SGD, torch.optim.Adam)}  # its hand-written updates
    return {name: cls(workload, n, data, ctx.device) for name, cls in classes.items() if run.get(name, True)}


def compiled_counts(workload: str, args: argparse.Namespace) -> tuple[int, ...]:
    if args.compiled_n is None:
        return COMPILED_NS.get(workload, ()) if args.device == "cpu" else (32, 128, 512, 1024)
    return tuple(int(v) for v in args.compiled_n.split(",") if v)


def warm_up(ways: dict, n: int, workload: Workload, data: tuple, ctx: Context) -> tuple[dict, dict]:
    """Warm-up steps of each way: estimates of one step of all N learners (seconds), and errors."""
    batches = Batches(len(data[0]), workload.batch_size, ctx.args.warmup_steps, ctx.device, seed=1)
    estimates, errors = {}, {}
    for name, way in ways.items():
        estimate, errors[name] = guarded(way.warmup, ctx.args.warmup_steps, batches)
        if estimate is not None:
            estimates[name] = estimate * (n if name == "serial" else 1)
    return estimates, errors


def per_learner_step(result: dict, n: int, steps: int) -> dict:
    seconds_per = result["seconds"] / (n * steps)
    out = {"us": seconds_per * 1e6, "per_s": 1 / seconds_per,
           "contended": contended(result.get("other_cpu_s"), result["seconds"])}
    b = result.get("breakdown", {})
    if b.get("step_calls"):  # the training steps alone: no initial states, store write or other fixed cost
        out["steps_us"] = b["steps"] / (n * b["step_calls"]) * 1e6
    return out


def extrapolated_serial(workload: Workload, n: int, ctx: Context) -> dict | None:
    reference = ctx.serial_reference.get(workload.key)
    if reference is None:
        return None
    ref_n, seconds_per = reference
    return {"us": seconds_per * 1e6, "per_s": 1 / seconds_per, "extrapolated_from_n": ref_n, "contended": False}


def measure_training(workload: Workload, n: int, data: tuple, ctx: Context) -> dict:
    """Warm up, choose S, time the three ways; per-way results with µs per learner-step."""
    ways = make_ways(workload, n, data, ctx)
    estimates, errors = warm_up(ways, n, workload, data, ctx)
    steps = choose_steps(n, estimates, ctx.args)
    batches = Batches(len(data[0]), workload.batch_size, steps, ctx.device)
    results = {}
    for name, way in ways.items():
        result, error = (None, errors[name]) if errors[name] else guarded(way.timed, steps, batches)
        results[name] = {"error": error} if result is None else {**result, **per_learner_step(result, n, steps)}
    if "serial" in ways and "us" in results["serial"]:
        ctx.serial_reference[workload.key] = (n, results["serial"]["us"] / 1e6)
    elif "serial" not in ways:
        results["serial"] = extrapolated_serial(workload, n, ctx) or {"error": "not run"}
    return {"steps": steps, "estimates_s": estimates,
            "ways": {name: results.get(name, {"error": "not run"}) for name in WAYS}}


def measure_evaluation(workload: Workload, n: int, sets: list, ctx: Context) -> dict:
    """One whole-set evaluation of N learners: serial (or extrapolated above --max-serial) vs ours."""
    ours, error = guarded(ours_evaluation, workload, n, ctx.device)
    if ours is None:
        return {"error": error}
    clock, batch_size = ours
    out = {"batch_size": batch_size, "ours_s": clock.seconds, "ours_other_cpu_s": clock.other_cpu_s}
    if n <= ctx.max_serial:
        serial = serial_evaluation(workload, n, sets, batch_size, ctx.device)
        out.update(serial_s=serial.seconds, serial_other_cpu_s=serial.other_cpu_s)
        ctx.serial_eval_reference[workload.key] = (n, serial.seconds / n)
    elif workload.key in ctx.serial_eval_reference:
        ref_n, per_learner = ctx.serial_eval_reference[workload.key]
        out.update(serial_s=per_learner * n, serial_extrapolated_from_n=ref_n)
    return out


def loss_summary(results: dict, classes: int) -> dict:
    """Mean final (last-batch) loss per way, plausibility, and serial vs naive agreement per learner."""
    losses = {name: r.get("losses") for name, r in results.items() if r.get("losses") is not None}
    means = {name: float(v.double().mean()) for name, v in losses.items()}
    plausible = all(bool(torch.isfinite(v).all()) and float(v.max()) < 2 * math.log(classes) for v in losses.values())
    out = {"mean": means, "plausible": plausible and len(losses) > 0}
    if "serial" in losses and "naive" in losses:
        out["serial_vs_naive_max_abs_diff"] = float((losses["serial"] - losses["naive"]).abs().max())
    return out


def measure_cell(workload: Workload, n: int, data: tuple, sets: list, ctx: Context) -> dict:
    cell = {"workload": workload.key, "optimizer": workload.optimizer.__name__, "n": n,
            **measure_training(workload, n, data, ctx)}
    cell["loss"] = loss_summary(cell["ways"], workload.classes)
    if not ctx.args.no_eval:
        cell["evaluation"] = ev = measure_evaluation(workload, n, sets, ctx)
        ours = cell["ways"]["ours"]
        if "ours_s" in ev and "us" in ours:  # metrics at every epoch end: one evaluation per epoch of training
            epoch_s = math.ceil(len(data[0]) / workload.batch_size) * n * ours["us"] / 1e6
            ev["share_of_epoch"] = ev["ours_s"] / epoch_s
    return cell


# ---------------------------------------------------------------------------------------------- output


def ratio(a: dict, b: dict) -> float | None:
    return a["us"] / b["us"] if "us" in a and "us" in b else None


def steps_ratio(serial: dict, ours: dict) -> float | None:
    """The serial loop's time per learner-step over the library's training steps alone (its run's fixed costs
    left out, as the serial loop's model building is)."""
    return serial["us"] / ours["steps_us"] if "us" in serial and "steps_us" in ours else None


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def way_line(name: str, r: dict, flops: int, ctx: Context) -> str:
    if "us" not in r:
        return f"  {name:<8} {r.get('error', 'n/a')}"
    mark = "*" if "extrapolated_from_n" in r else " "
    achieved = flops * r["per_s"]
    seconds = f"{r['seconds']:8.2f}" if "seconds" in r else f"{'-':>8}"
    other = r.get("other_cpu_s")
    flag = "!" if r["contended"] else " "
    return (f"  {name:<8} {r['us']:>11.1f}{mark} {r['per_s']:>13.0f} {achieved / 1e9:>9.2f} {100 * achieved / ctx.peak:>7.2f}%"
            f" {seconds} {fmt(other, '8.2f', '       -')}{flag}")


def ours_line(name: str, r: dict) -> str:
    if "seconds" not in r:
        return f"  {name}: -"
    b = r["breakdown"]
    parts = [f"train_chunk {b['train_chunk']:.3f} s (setup {b.get('setup', 0):.3f} s)"
             if "train_chunk" in b else None,
             f"store write {b['store_write']:.3f} s" if "store_write" in b else None,
             f"read-back {b['store_read']:.3f} s" if "store_read" in b else None]
    rest = r["run_s"] - sum(b.get(k, 0.0) for k in ("train_chunk", "store_write", "store_read"))
    if "steps" in b:
        parts[0] += f" [its {b['step_calls']} steps {b['steps']:.3f} s]"
    chosen = "; ".join(f"plan {c['plan']} {c['layers'] or ''}{' compiled' if c['compiled'] else ''}"
                       + (f" ({c['reason']})" if c["reason"] else "") for c in r["speed"])
    compiled = ""
    if r["compile_s"]:
        compiled = (f"; compile {r['compile_s']:.2f} s (warm-up run's: {r.get('warmup_compile_s') or 0:.2f} s) and "
                    f"measuring {r['measure_s']:.2f} s, left out of its time")
    return (f"  {name}: Experiment() {r['build_s']:.3f} s; warm-up run() {r['warmup_s']:.3f} s; timed run() "
            f"{r['run_s']:.3f} s = {' + '.join(p for p in parts if p)} + other {rest:.3f} s; "
            f"{r['chunks']} chunk(s); {chosen or 'no speed report'}{compiled}")


def loss_line(loss: dict) -> str:
    means = ", ".join(f"{k} {v:.4f}" for k, v in loss["mean"].items())
    agreement = loss.get("serial_vs_naive_max_abs_diff")
    tail = f"; serial vs naive, max |diff| per learner {agreement:.2e}" if agreement is not None else ""
    return f"  final training loss (last batch, mean over learners): {means} [{'ok' if loss['plausible'] else 'CHECK'}]{tail}"


def eval_line(ev: dict) -> str:
    if "ours_s" not in ev:
        return f"  evaluation: ours {ev.get('error')}"
    serial = ev.get("serial_s")
    mark = f"* (extrapolated from N={ev['serial_extrapolated_from_n']})" if "serial_extrapolated_from_n" in ev else ""
    speedup = f" (serial/ours {serial / ev['ours_s']:.2f}x)" if serial else ""
    flag = "!" if contended(ev.get("ours_other_cpu_s"), ev["ours_s"]) or contended(
        ev.get("serial_other_cpu_s"), ev.get("serial_s") or 0) else ""
    share = (f"; ours' evaluation = {100 * ev['share_of_epoch']:.0f}% of its epoch of training (the default logs "
             f"every epoch end)") if "share_of_epoch" in ev else ""
    return (f"  evaluation, train+test loss and accuracy (eval batch {ev['batch_size']}): serial "
            f"{fmt(serial, '.3f')} s{mark}, ours {ev['ours_s']:.3f} s{speedup}{flag}{share}")


def print_cell(cell: dict, flops: int, ctx: Context) -> None:
    print(f"\n{cell['workload']} N={cell['n']}: {cell['steps']} steps each"
          + ("  (ours trains a lone learner as 2 copies)" if cell["n"] == 1 else ""))
    print(f"  {'way':<8} {'µs/l-step':>12} {'l-steps/s':>13} {'GFLOP/s':>9} {'%peak':>8} {'seconds':>8} {'other CPU-s':>9}")
    ways = cell["ways"]
    for name in WAYS:
        print(way_line(name, ways.get(name, {"error": "n/a"}), flops, ctx))
    print(f"  serial/ours {fmt(ratio(ways['serial'], ways['ours']), '.2f')}x   "
          f"naive/ours {fmt(ratio(ways['naive'], ways['ours']), '.2f')}x   "
          f"serial/compiled {fmt(ratio(ways['serial'], ways['compiled']), '.2f')}x   steps only: "
          f"serial/ours {fmt(steps_ratio(ways['serial'], ways['ours']), '.2f')}x, "
          f"serial/compiled {fmt(steps_ratio(ways['serial'], ways['compiled']), '.2f')}x")
    print(ours_line("ours", ways["ours"]))
    if "seconds" in ways["compiled"]:
        print(ours_line("compiled", ways["compiled"]))
    print(loss_line(cell["loss"]))
    if "evaluation" in cell:
        print(eval_line(cell["evaluation"]))


def print_header(env: dict, peak: dict, ctx: Context) -> None:
    print(f"device: {env['device']} ({env['device_name']}); CPU {env['cpu']}, {env['cores']} cores "
          f"({env['cores_usable']} usable); torch {env['torch']}, Python {env['python']}, serimats_func "
          f"{env['serimats_func']}; {env['threads']} threads ({env['interop_threads']} inter-op); {env['date']}")
    print(f"float32 matmul peak: {peak['flop_per_s'] / 1e9:.1f} GFLOP/s ({peak['size']}x{peak['size']}, best of 5)"
          + (" ! (contended: the % of peak below is off)" if peak["contended"] else "")
          + (f"; TF32 matmul {'on' if env['tf32_matmul'] else 'off'}" if env["tf32_matmul"] is not None else ""))
    print(f"ours: evaluation off by {evaluation_switch()}")
    serial_note = "all N" if math.isinf(ctx.max_serial) else f"N <= {ctx.max_serial:g}, extrapolated above (*)"
    print(f"serial loop: {serial_note}; '!' = other processes used > 5% of a core during that measurement")


def markdown_table(cells: list[dict], ctx: Context) -> str:
    rows = ["| workload | N | serial µs | naive µs | ours µs | compiled µs | serial/ours | serial/compiled | naive/ours | "
            "steps only: serial/ours, serial/compiled | ours learner-steps/s | best % of matmul peak | "
            "evaluation: serial s / ours s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell in cells:
        w = cell["ways"]
        serial = fmt(w["serial"].get("us"), ".1f") + ("*" if "extrapolated_from_n" in w["serial"] else "")
        ours, compiled = w["ours"], w["compiled"]
        best = max((r["per_s"] for r in (ours, compiled) if "per_s" in r), default=None)
        peak = fmt(100 * cell["flops"] * best / ctx.peak if best else None, ".2f")
        flag = "!" if any(r.get("contended") for r in w.values()) else ""
        ev = cell.get("evaluation", {})
        evaluation = (f"{fmt(ev.get('serial_s'), '.2f')}{'*' if 'serial_extrapolated_from_n' in ev else ''} / "
                      f"{fmt(ev.get('ours_s'), '.2f')}" if ev else "-")
        rows.append(f"| {cell['workload']} | {cell['n']} | {serial} | {fmt(w['naive'].get('us'), '.1f')} | "
                    f"{fmt(ours.get('us'), '.1f')}{flag} | {fmt(compiled.get('us'), '.1f')} | "
                    f"{fmt(ratio(w['serial'], ours), '.2f')} | {fmt(ratio(w['serial'], compiled), '.2f')} | "
                    f"{fmt(ratio(w['naive'], ours), '.2f')} | {fmt(steps_ratio(w['serial'], ours), '.2f')}, "
                    f"{fmt(steps_ratio(w['serial'], compiled), '.2f')} | {fmt(ours.get('per_s'), '.0f')} | {peak} | "
                    f"{evaluation} |")
    return "\n".join(rows)


def optimizer_table(cells: list[dict]) -> str:
    """serial/ours (and its steps-only ratio) per optimizer, side by side: one row per workload and N."""
    names = list(dict.fromkeys(c["optimizer"] for c in cells))
    rows = ["| workload | N | " + " | ".join(f"{o}: serial µs / ours µs = serial/ours (steps only)" for o in names) + " |",
            "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    by_row: dict[tuple, dict] = {}
    for c in cells:
        by_row.setdefault((c["workload"].split("/")[0], c["n"]), {})[c["optimizer"]] = c["ways"]
    for (workload, n), ways in by_row.items():
        entries = []
        for o in names:
            w = ways.get(o)
            if w is None:
                entries.append("-")
                continue
            flag = "!" if any(r.get("contended") for r in w.values()) else ""
            entries.append(f"{fmt(w['serial'].get('us'), '.1f')} / {fmt(w['ours'].get('us'), '.1f')}{flag} = "
                           f"{fmt(ratio(w['serial'], w['ours']), '.2f')} ({fmt(steps_ratio(w['serial'], w['ours']), '.2f')})")
        rows.append(f"| {workload} | {n} | " + " | ".join(entries) + " |")
    return "\n".join(rows)


def jsonable(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workloads", default="mlp,lenet", help="comma-separated: mlp, lenet")
    p.add_argument("--n", help="comma-separated learner counts (default: 1..128 on a CPU, 1..4096 on CUDA)")
    p.add_argument("--steps", type=int, help="fixed steps per cell (default: chosen from --seconds)")
    p.add_argument("--seconds", type=float, default=2.0, help="target seconds of the slowest way per cell")
    p.add_argument("--ours-seconds", type=float, default=2.0,
                   help="at least this many seconds of steps of the library's fastest way per cell")
    p.add_argument("--max-seconds", type=float, default=40.0, help="at most this many seconds of the slowest way")
    p.add_argument("--min-steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--max-serial", type=int, help=f"largest N the serial loop runs (default: all on a CPU, "
                                                   f"{CUDA_MAX_SERIAL} on CUDA); extrapolated above")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--no-eval", action="store_true", help="skip the whole-set evaluation timing")
    p.add_argument("--compiled-n", help="learner counts at which Experiment(compile=True) is timed too (default on a CPU: "
                                        "mlp 32,64,128, lenet none; on CUDA 32,128,512,1024; empty for none)")
    p.add_argument("--optimizers", help=f"comma-separated, each workload trained with each in turn (default: the "
                                        f"workload's own): {', '.join(OPTIMIZERS)}")
    p.add_argument("--mnist-root", type=Path, default=MNIST_ROOT)
    p.add_argument("--json", type=Path, help="also write everything to this JSON file")
    p.add_argument("--forks", type=int, metavar="STEPS", help="only the fork workloads (learner-steps and wall time "
                                                                "with forks and fork=False), over STEPS steps")
    p.add_argument("--end-to-end", action="store_true", help="what a user waits for: Experiment(...).run() with the "
                   "defaults (evaluation on) vs a serial loop evaluating the whole sets at the log steps, fixed costs "
                   "and peak RSS apart, each in its own process")
    p.add_argument("--e2e-seconds", default="10,120", help="the serial loop's training seconds of the short and the "
                   "long --end-to-end runs (its evaluations come on top)")
    p.add_argument("--e2e-long", default=E2E_LONG, help="the --end-to-end long runs, workload:N comma-separated "
                   "(empty: none)")
    p.add_argument("--no-e2e-warm-compile", dest="e2e_warm_compile", action="store_false",
                   help="do not compile each long run's step once before it (default: compile it, so that the long run "
                        "finds inductor's cache and the library's record warm)")
    p.add_argument("--quick", action="store_true", help="--end-to-end at N = 2 and 32, 3-second runs, no long runs: "
                   "a check of the mechanism in a couple of minutes")
    args = p.parse_args(argv)
    if min(args.steps or 1, args.min_steps, args.warmup_steps) < 1 or args.seconds <= 0:
        p.error("--steps, --min-steps, --warmup-steps and --seconds must be positive")
    return args


def fork_workloads(steps: int) -> dict[str, list]:
    """Grids whose learners share prefixes: the seed's third example scaled to a CPU (2 init seeds x 2 momenta x 6
    momentum changes x windows at 0, 1/6 and 5/6 of the run, each steps/60 long: 72 learners) and spawning (a
    control and 32 DataOrder children from 5/6 of the run)."""
    from serimats_func.interventions import DataOrder, PerturbMomentum

    w = max(1, steps // 60)
    windows = tuple((start, start + w) for start in (0, steps // 6, 5 * steps // 6))
    return {
        "momentum windows (seed example 3)": [
            InitWeights.make_variations(seed=range(2)), Optimizer.make_variations(momentum=(0.9, 0.99)),
            PerturbMomentum.make_variations(momentum=lambda m: (m * (1 + e) for e in (1e-3, -1e-3, 1e-2, -1e-2, 0.1, -0.1)),
                                            when=windows)],
        "spawning (32 DataOrder children)": [DataOrder.make_variations(seed=0, control=True),
                                             DataOrder.make_variations(seed=range(1, 33), at=5 * steps // 6)],
    }


def fork_benchmark(device: torch.device, steps: int) -> str:
    """Learner-steps computed and wall time of each fork workload with forks and with ``fork=False``, in one run
    (MLP 40-256-256-10 on MNIST-1D, SGD lr=0.01 momentum=0.9, batch 100); results checked equal."""
    train, test = datasets.mnist1d()
    rows = ["| workload | learners | steps | learner-steps, forks | fork=False | wall s, forks | fork=False | speed-up |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, grid in fork_workloads(steps).items():
        out = {}
        for fork in (True, False):
            with tempfile.TemporaryDirectory() as folder:
                exp = Experiment(MLP(widths=(256, 256), in_features=40), train, grid, test_dataset=test, steps=steps,
                                 batch_size=100, device=device, store=Path(folder) / "forks.zarr", progress=False,
                                 fork=fork, log_every=steps // 6)
                plan = exp.plan()
                start = time.perf_counter()
                ds = exp.run()
                out[fork] = (len(exp.grid.learners), plan.learner_steps, time.perf_counter() - start, ds)
        (n, forked, t_fork, a), (_, plain, t_plain, b) = out[True], out[False]
        same = all(np.array_equal(a[m].values, b[m].values, equal_nan=True) for m in ("train_loss", "test_acc"))
        rows.append(f"| {name}{'' if same else ' (RESULTS DIFFER)'} | {n} | {steps} | {forked} | {plain} | "
                    f"{t_fork:.1f} | {t_plain:.1f} | {t_plain / t_fork:.2f}x |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- end to end


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CHILD_MARK = "E2E-RESULT "  # the line a --e2e-child process prints its result on


def in_child(task: str, args: argparse.Namespace, device: torch.device, workload: str, **kwargs: object) -> dict:
    """``task`` (a function of ``E2E_TASKS``, given the loaded ``workload``, ``device`` and ``kwargs``) in a new
    Python process (``speed.py --e2e-child``), so that its peak resident memory (``ru_maxrss``) is its own and
    nothing it allocates or caches is left to the next cell. Not a fork: libgomp's threads do not survive a
    fork after the parent ran parallel work (the matmul peak), and a forked child hung in its first matmul."""
    import subprocess

    spec = {"task": task, "workload": workload, "device": str(device), "mnist_root": str(args.mnist_root),
            "threads": args.threads, "kwargs": kwargs}
    proc = subprocess.run([sys.executable, "-u", str(Path(__file__).resolve()), "--e2e-child", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"the {task} process exited with {proc.returncode}: {tail}"}


def child_main(spec_json: str) -> None:
    """``--e2e-child SPEC``: run one task of ``in_child`` and print its result (JSON) on a ``CHILD_MARK`` line."""
    spec = json.loads(spec_json)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    workload = load_workload(spec["workload"], Path(spec["mnist_root"]))
    start = peak_rss_mib()  # the process with its data loaded, before the task
    try:
        out = E2E_TASKS[spec["task"]](workload, device=torch.device(spec["device"]), **spec["kwargs"])
    except BaseException as error:  # report, do not leave the parent without an answer
        out = {"error": f"{type(error).__name__}: {error}"}
    print(CHILD_MARK + json.dumps(jsonable({**out, "rss_at_start_mib": start, "peak_rss_mib": peak_rss_mib()})),
          flush=True)


def serial_end_to_end(workload: Workload, n: int, steps: int, device: torch.device, eval_batch: int) -> dict:
    """What a user of a plain PyTorch loop waits for: N models built, evaluated on the whole train and test sets
    at the library's log steps (start, epoch ends, last), trained one after another on one data order."""
    times: dict[str, float] = {}
    with Clock(device) as total:
        with Clock(device) as build:
            models = [seeded_model(workload, seed, device) for seed in range(n)]
            optimizers = [workload.optimizer(m.parameters(), **workload.hparams) for m in models]
            data = tuple(t.to(device) for t in workload.train)
            sets = [data, tuple(t.to(device) for t in workload.test)]
            batches = Batches(len(data[0]), workload.batch_size, steps, device)
        times["construction"] = build.seconds
        log_steps = {0, steps} | set(range(batches.per_epoch, steps, batches.per_epoch))
        evaluation, train = 0.0, 0.0
        for model, optimizer in zip(models, optimizers, strict=True):
            for step in range(steps + 1):
                if step in log_steps:
                    with Clock(device) as clock:
                        model.eval()
                        torch.stack([evaluate_module(model, x, y, eval_batch) for x, y in sets]).cpu()
                        model.train()
                    evaluation += clock.seconds
                if step < steps:
                    with Clock(device) as clock:
                        idx = batches(step)
                        serial_step(model, optimizer, data[0][idx], data[1][idx])
                    train += clock.seconds
        times.update(evaluation=evaluation, training=train)
    return {"seconds": total.seconds, "other_cpu_s": total.other_cpu_s, "breakdown": times}


E2E_NS = (1, 2, 8, 32, 64, 128)  # --end-to-end: the short runs' learner counts on a CPU
E2E_LONG = "mlp:64,lenet:32"  # --end-to-end: the long runs' cells (the issue's targets)
PROBE_STEPS = 300  # --end-to-end: the serial steps timed to size the runs (not a moment: this 2-core VM's speed drifts)
E2E_PARTS = ("construction", "initial_states", "prepare", "training", "evaluation", "store_write", "store_read")


def library_end_to_end(workload: Workload, n: int, steps: int, device: torch.device, compile: bool | str = "auto") -> dict:
    """``Experiment(...).run()`` with the library's defaults (evaluation on, compile and plans "auto") on a fresh
    store, construction included; its parts apart: construction (``Experiment(...)``, the trial step included), and
    per chunk (``speed_report``, which the library fills in) the initial states, the step's preparation (the purity
    check, choosing plans, compiling: ``measure_s`` and ``compile_s`` are parts of it), the training steps, the metrics
    at logged steps (whole-set evaluations); the store's writes and reads (timers on ``exp.store``; the reads are the
    read-back of the result, and any read while planning); the peak memory beside the plan's budget."""
    times: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="serimats-e2e-") as tmp:
        with Clock(device) as total:
            with Clock(device) as build:
                exp = Experiment(model=workload.make_model(), dataset=workload.train, test_dataset=workload.test,
                                 interventions=[InitWeights.make_variations(seed=range(n))],
                                 optimizer=Optimizer(workload.optimizer, **workload.hparams),
                                 batch_size=workload.batch_size, steps=steps, device=device,
                                 store=Path(tmp) / "e2e.zarr", progress=False, compile=compile)
            exp.store.write = timed(exp.store.write, device, times, "store_write")
            exp.store.read = timed(exp.store.read, device, times, "store_read")
            with Clock(device) as run:
                ds = exp.run()
                ds.load()  # the read-back of the result, as a user's first look at it does
        plan = exp.plan()  # after the run: nothing to train, but the same budget and data
    report = library_speed_report(exp)
    part = lambda key: sum(r.get(key) or 0.0 for r in report)  # noqa: E731
    times.update(construction=build.seconds, run=run.seconds, initial_states=part("initial_state_s"),
                 prepare=part("prepare_s"), training=part("steps_s"), evaluation=part("evaluate_s"),
                 measure_plans=part("measure_s"), compile=part("compile_s"))
    memory = {"budget_mib": (plan.memory_budget + exp.data_bytes) / 2**20, "data_mib": exp.data_bytes / 2**20}
    if device.type == "cuda":
        memory["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return {"seconds": total.seconds, "other_cpu_s": total.other_cpu_s, "breakdown": times, "speed": report,
            "memory": memory, "compiled": any(r.get("compiled") for r in report),
            "compile_reason": "; ".join(r.get("reason") or "" for r in report)}


def warm_compile(workload: Workload, n: int, device: torch.device) -> dict:
    """A run with ``compile=True`` of the cell's structure (100 steps: the eager and compiled steps are timed too), so
    that inductor's cache and the library's record of compiled steps (``compile_record``) hold its step: what a user
    who has compiled this step once on this machine gets. Its seconds are printed, not counted in the cell."""
    with Clock(device) as clock:
        out = library_end_to_end(workload, n, 100, device, compile=True)
    return {"seconds": clock.seconds, "compile": out.get("breakdown", {}).get("compile"),
            "cold": [r.get("compile_cold") for r in out.get("speed", [])], **({"error": out["error"]} if "error" in out else {})}


E2E_TASKS: dict[str, Callable[..., dict]] = {"serial": serial_end_to_end, "library": library_end_to_end,
                                              "warm_compile": warm_compile}  # what an --e2e-child process runs


def e2e_cells(args: argparse.Namespace, device: torch.device) -> list[tuple[str, int, float, bool]]:
    """(workload, N, serial target seconds, long) of each --end-to-end cell: the short runs at every N of ``--n``
    (default ``E2E_NS``), the long runs at the cells of ``--e2e-long``; ``--quick``: a few short cells."""
    short, long = (float(v) for v in args.e2e_seconds.split(","))
    names = [w.strip() for w in args.workloads.split(",")]
    if args.quick:
        return [(w, n, 3.0, False) for w in names for n in (2, 32)]
    ns = sorted({int(v) for v in args.n.split(",")}) if args.n else list(CUDA_NS if device.type == "cuda" else E2E_NS)
    cells = [(w, n, short, False) for w in names for n in ns]
    for item in filter(None, (v.strip() for v in args.e2e_long.split(","))):
        w, n = item.split(":")
        if w in names:
            cells.append((w, int(n), long, True))
    return cells


def end_to_end(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """``--end-to-end``: per cell (``e2e_cells``), the library's ``run()`` with defaults against the serial loop, each
    in its own process (peak RSS its own), the run length chosen so that the serial loop trains about the cell's
    seconds (its evaluations come on top)."""
    cells = []
    eval_batch = 1024 if device.type == "cuda" else 256  # the library's default evaluation batch
    workloads: dict[str, Workload] = {}
    per_step: dict[str, float] = {}
    for name, n, seconds, long in e2e_cells(args, device):
        if name not in workloads:
            workloads[name] = load_workload(name, args.mnist_root)
            probe = in_child("serial", args, device, name, n=1, steps=PROBE_STEPS, eval_batch=eval_batch)
            per_step[name] = probe["breakdown"]["training"] / PROBE_STEPS  # one serial learner-step, to size the runs
        workload = workloads[name]
        steps = args.steps or max(args.min_steps, min(MAX_STEPS, round(seconds / max(1e-9, n * per_step[name]))))
        warm = in_child("warm_compile", args, device, name, n=n) if long and args.e2e_warm_compile else None
        if warm is not None:
            print(f"  (warm-up for the long run: compile=True of {workload.name} N={n}, {warm.get('seconds', 0):.1f} s, "
                  f"compile {fmt(warm.get('compile'), '.1f')} s, cold {warm.get('cold')})", flush=True)
        serial = in_child("serial", args, device, name, n=n, steps=steps, eval_batch=eval_batch)
        ours = in_child("library", args, device, name, n=n, steps=steps)
        cell = {"workload": workload.name, "n": n, "steps": steps, "length": "long" if long else "short",
                "serial": serial, "ours": ours, "warm_up": warm,
                "ratio": serial["seconds"] / ours["seconds"] if "seconds" in serial and "seconds" in ours else None}
        cells.append(cell)
        print(e2e_line(cell), flush=True)
    return cells


def peak_words(side: dict) -> str:
    memory = side.get("memory", {})
    peak = memory.get("peak_allocated_mib", side.get("peak_rss_mib"))
    return f"{fmt(peak, '.0f')} / {fmt(memory.get('budget_mib'), '.0f')}" if memory else fmt(peak, ".0f")


def e2e_line(cell: dict) -> str:
    serial, ours = cell["serial"], cell["ours"]
    b, sb = ours.get("breakdown", {}), serial.get("breakdown", {})
    parts = ", ".join(f"{k} {b[k]:.2f}" for k in E2E_PARTS if k in b)
    over = " OVER BUDGET" if memory_over(ours) else ""
    return (f"{cell['workload']} N={cell['n']} {cell['length']} ({cell['steps']} steps): serial "
            f"{fmt(serial.get('seconds'), '.2f')} s (training {fmt(sb.get('training'), '.2f')}, evaluation "
            f"{fmt(sb.get('evaluation'), '.2f')}), library {fmt(ours.get('seconds'), '.2f')} s, serial/library "
            f"{fmt(cell['ratio'], '.2f')}x{' (compiled)' if ours.get('compiled') else ''}\n    library s: {parts}; "
            f"plans {b.get('measure_plans', 0):.2f}, compile {b.get('compile', 0):.2f}\n    peak memory MiB: serial "
            f"{fmt(serial.get('peak_rss_mib'), '.0f')}, library {peak_words(ours)} (peak / the plan's budget with the "
            f"data){over}; compile: {ours.get('compile_reason', '')[:160]}"
            + (f"\n    errors: {serial.get('error')} {ours.get('error')}" if "error" in serial or "error" in ours else ""))


def memory_over(side: dict) -> bool:
    """Whether the library's peak (CPU: resident, less what the process held before; CUDA: allocated) went above the
    budget its plan printed (plus the data, which the plan leaves out of its budget)."""
    memory = side.get("memory", {})
    if "budget_mib" not in memory:
        return False
    peak = memory.get("peak_allocated_mib")
    if peak is None:
        peak = side.get("peak_rss_mib", 0.0) - side.get("rss_at_start_mib", 0.0)
    return peak > memory["budget_mib"]


def end_to_end_table(cells: list[dict]) -> str:
    lines = ["| workload | N | run | steps | serial s | library s | serial / library | construction s | initial states s "
             "| prepare s (plans, compile) | training s | evaluation s | store write s | read-back s "
             "| peak MiB serial / library / budget |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in cells:
        b = c["ours"].get("breakdown", {})
        memory = c["ours"].get("memory", {})
        peak = memory.get("peak_allocated_mib", c["ours"].get("peak_rss_mib"))
        lines.append(f"| {c['workload']} | {c['n']} | {c['length']} | {c['steps']} | {fmt(c['serial'].get('seconds'), '.2f')} | "
                     f"{fmt(c['ours'].get('seconds'), '.2f')} | {fmt(c['ratio'], '.2f')}x"
                     f"{' (compiled)' if c['ours'].get('compiled') else ''} | "
                     f"{fmt(b.get('construction'), '.2f')} | {fmt(b.get('initial_states'), '.3f')} | "
                     f"{fmt(b.get('prepare'), '.2f')} ({fmt(b.get('measure_plans'), '.2f')}, {fmt(b.get('compile'), '.2f')}) | "
                     f"{fmt(b.get('training'), '.2f')} | {fmt(b.get('evaluation'), '.2f')} | "
                     f"{fmt(b.get('store_write'), '.2f')} | {fmt(b.get('store_read'), '.2f')} | "
                     f"{fmt(c['serial'].get('peak_rss_mib'), '.0f')} / {fmt(peak, '.0f')} / "
                     f"{fmt(memory.get('budget_mib'), '.0f')}{' OVER' if memory_over(c['ours']) else ''} |")
    return "\n".join(lines)


def learner_counts(args: argparse.Namespace, device: torch.device) -> list[int]:
    if args.n:
        return sorted({int(v) for v in args.n.split(",")})
    return list(CUDA_NS if device.type == "cuda" else CPU_NS)


def run_workload(name: str, ns: list[int], ctx: Context) -> list[dict]:
    workload = load_workload(name, ctx.args.mnist_root)
    variants = ([with_optimizer(workload, o.strip()) for o in ctx.args.optimizers.split(",") if o.strip()]
                if ctx.args.optimizers else [workload])
    flops = flops_per_learner_step(workload)
    print(f"\n== {workload.name}: {workload.description}; one learner-step = {flops / 1e6:.2f} MFLOP "
          f"(forward+backward, matmuls and convolutions)" + (f"\n   data: {workload.note}" if workload.note else ""))
    data = tuple(t.to(ctx.device) for t in workload.train)
    sets = [data, tuple(t.to(ctx.device) for t in workload.test)]
    if len(variants) > 1 or variants[0] is not workload:
        print("   in place of its optimizer, one after another at each N: " + "; ".join(
            f"{v.optimizer.__name__} {', '.join(f'{k}={x:g}' for k, x in v.hparams.items())}" for v in variants))
    cells = []
    for n in ns:
        for variant in variants:
            cell = {**measure_cell(variant, n, data, sets, ctx), "flops": flops}
            print_cell(cell, flops, ctx)
            cells.append(cell)
    return cells


def main(argv: list[str] | None = None) -> dict:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--e2e-child":
        child_main(sys.argv[2])
        return {}
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    default_max = CUDA_MAX_SERIAL if device.type == "cuda" else math.inf
    max_serial = args.max_serial if args.max_serial is not None else default_max
    if args.forks:
        table = fork_benchmark(device, args.forks)
        print("\n" + table)
        return {"environment": environment(device), "markdown": table}
    env, peak = environment(device), matmul_peak(device)
    ctx = Context(device, args, max_serial, peak["flop_per_s"])
    print_header(env, peak, ctx)
    if args.end_to_end or args.quick:
        cells = end_to_end(args, device)
        table = end_to_end_table(cells)
        print("\n" + table)
        result = {"environment": env, "mode": "end-to-end", "cells": cells, "markdown": table,
                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        if args.json:
            args.json.write_text(json.dumps(jsonable(result), indent=2) + "\n")
        return result
    cells = [c for name in args.workloads.split(",") for c in run_workload(name.strip(), learner_counts(args, device), ctx)]
    table = markdown_table(cells, ctx)
    if args.optimizers:
        table += "\n\n" + optimizer_table(cells)
    print("\n" + table)
    result = {"environment": env, "matmul_peak": peak, "evaluation_off_by": evaluation_switch(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "cells": cells,
              "markdown": table}
    if args.json:
        args.json.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
