"""Full learner states in the store: checkpoints of chunks in training, states kept on request, and
``load_learner``, which gives one back as a plain ``nn.Module`` and ``torch.optim`` optimizer.

A state is the chunk's state pytree (params, buffers, optimizer state, hyperparameters, interventions'
numbers and state, ``diverged_at``), learner axis first, stored as one Zarr array per leaf under its path
(``params/1.weight``, ``opt/momentum_buffer/1.weight``...). Resuming from one gives bitwise the same numbers as
not stopping: the state is saved exactly, and batches and dropout masks come from keys and step counts.

>>> import torch
>>> flat = flatten({"params": {"w": torch.ones(2, 3)}, "opt": {"step": torch.zeros(2)}})
>>> sorted(flat), flat["params/w"][0].shape, flat["params/w"][1]
(['opt/step', 'params/w'], (2, 3), 'float32')
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optree
import torch
from torch import nn

from .. import schedules
from ..core import pytrees
from ..core.labels import selects
from ..optimizers import family_of, groups
from ..store.zarr_store import FlatState, Store

DERIVED_PARTS = ("n", "key", "active", "windows")  # interventions' data rebuilt from each learner's spec


def _names(accessor: Any) -> tuple[str, ...]:
    """A leaf's path as names: a NamedTuple's field by its name (``opt/exp_avg/1.weight``), a dict's by its key."""
    return tuple(str(getattr(entry, "field", None) or entry.entry) for entry in accessor)


def _paths(state: Any) -> tuple[list[tuple[str, ...]], list, Any]:
    accessors, leaves, treedef = optree.tree_flatten_with_accessor(state, none_is_leaf=pytrees.NONE_IS_LEAF)
    return [_names(a) for a in accessors], leaves, treedef


def _path(keys: Sequence[Any]) -> str:
    return "/".join(str(k) for k in keys)


def flatten(state: Any, learners: int | None = None) -> FlatState:
    """A state pytree as {path: (numpy array, torch dtype name)}, the first ``learners`` along the learner axis."""
    paths, leaves, _ = _paths(state)
    out = {}
    for keys, leaf in zip(paths, leaves, strict=True):
        t = leaf.detach()[:learners] if learners is not None else leaf.detach()
        dtype = str(t.dtype).removeprefix("torch.")
        if t.dtype == torch.bfloat16:
            t = t.float()  # exact; numpy has no bfloat16
        out[_path(keys)] = (t.cpu().numpy(), dtype)
    return out


def _tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.array(values)).to(getattr(torch, dtype))


def restore(fresh: Any, stored: Sequence[FlatState | None]) -> Any:
    """The chunk state ``fresh`` (leaves (N, ...), as built for a start from scratch) with each learner's
    stored state laid over it: every leaf that the store holds, except interventions' numbers, keys and windows
    (rebuilt from the learner's spec, their shape depends on the chunk). Learner i is ``stored[i]``, None to
    keep its fresh state."""
    paths, leaves, treedef = _paths(fresh)
    out = []
    for keys, leaf in zip(paths, leaves, strict=True):
        path = _path(keys)
        derived = keys[0] == "interventions" and len(keys) > 2 and keys[2] in DERIVED_PARTS
        rows = []
        for i, learner in enumerate(stored):
            if derived or learner is None or path not in learner:
                if learner is not None and not derived and keys[0] != "interventions":
                    raise ValueError(f"The stored state lacks {path}; it cannot continue this learner.")
                rows.append(leaf[i])
                continue
            values, dtype = learner[path]
            if tuple(values.shape) != tuple(leaf.shape[1:]):
                raise ValueError(f"The stored state's {path} has shape {tuple(values.shape)}, not {tuple(leaf.shape[1:])}.")
            rows.append(_tensor(values, dtype).to(device=leaf.device, dtype=leaf.dtype))
        out.append(torch.stack(rows))
    return optree.tree_unflatten(treedef, out)


class Checkpoints:
    """Saves a chunk in training into the store every ``every_steps`` steps (else every ``every_seconds``):
    its metrics so far, its full state and the states kept at the steps it has passed (``keep_states``,
    ``keep_every``), as a checkpoint named by its learner set: a run stopped at any moment goes on from its
    newest checkpoint, whatever states it keeps."""

    def __init__(self, store: Store, ids: Sequence[str], configs: Sequence[Mapping],
                 metric_keys: Mapping[str, str] | Sequence[Mapping[str, str]], attrs: Mapping[str, Any],
                 every_steps: int | None = None, every_seconds: float = 600.0,
                 dims: Mapping[str, Sequence[str]] | None = None, labels: Mapping[str, Sequence] | None = None):
        self.store, self.ids, self.configs = store, list(ids), list(configs)
        self.metric_keys = dict(metric_keys) if isinstance(metric_keys, Mapping) else [dict(k) for k in metric_keys]
        self.attrs, self.dims, self.labels = dict(attrs), dims, labels
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self._last = time.monotonic()
        self.saved: str | None = None
        self.current: tuple[int, Any] | None = None  # (updates done, the chunk's state then)
        self._snapshot: Callable[[], tuple[Sequence[int], Mapping[str, np.ndarray]]] | None = None
        self._kept: Mapping[int, FlatState] = {}  # {step: flat state (N, ...)} kept so far

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` updates: every ``every_steps`` if set, else on time."""
        if self.every_steps is not None:
            return step % self.every_steps == 0
        return time.monotonic() - self._last >= self.every_seconds

    def save(self, step: int, state: Any, steps: Sequence[int], metrics: Mapping[str, np.ndarray]) -> str:
        """Write the chunk's ``state`` (a pytree (N, ...), or already flat) after ``step`` updates and ``metrics``
        {name: (N, len(steps), *its own dims)}."""
        flat = state if isinstance(state, dict) and all(isinstance(v, tuple) for v in state.values()) else \
            flatten(state, len(self.ids))
        kept = {t: s for t, s in self._kept.items() if t < step}
        self.saved = self.store.write_checkpoint(step, self.ids, self.configs, steps, metrics,
                                                 {"diverged_at": flat["diverged_at"][0]}, self.metric_keys, self.attrs, flat,
                                                 self.dims, self.labels, kept=kept)
        self._last = time.monotonic()
        return self.saved

    @property
    def path(self) -> str:
        return str(self.store.layout.checkpoint(self.saved or ""))

    def follow(self, step: int, state: Any, snapshot: Callable[[], tuple[Sequence[int], Mapping[str, np.ndarray]]],
               kept: Mapping[int, FlatState] | None = None) -> None:
        """Follow a chunk from ``step``: ``snapshot()`` gives its logged steps recorded in full so far and their
        metrics, ``kept`` (filled as it goes) its kept states; ``track`` gives its state as it goes."""
        self._start, self._snapshot = step, snapshot
        self._kept = kept if kept is not None else {}
        self.track(step, state)

    def track(self, step: int, state: Any) -> None:
        self.current = (step, state)  # one assignment: a Ctrl-C never sees a step without its state

    def interrupted(self, total: int) -> KeyboardInterrupt:
        """After a Ctrl-C: save the chunk where it got (if it got anywhere), and say how to resume."""
        start = getattr(self, "_start", 0)
        done, state = self.current or (start, None)
        if state is None or self._snapshot is None or done <= start:
            return KeyboardInterrupt(f"Interrupted at step {done} of {total}, with nothing new to save: run the "
                                     f"experiment again (exp.run()) to resume from step {start}.")
        steps, metrics = self._snapshot()
        keep = [i for i, s in enumerate(steps) if s <= done]
        try:
            self.save(done, state, [steps[i] for i in keep], {m: v[:, keep] for m, v in metrics.items()})
        except Exception as error:  # a full disk, say: the last checkpoint is still there
            return KeyboardInterrupt(f"Interrupted at step {done} of {total}; the checkpoint could not be saved "
                                     f"({error}). Run the experiment again (exp.run()) to resume from the last one.")
        return KeyboardInterrupt(f"Interrupted at step {done} of {total}: the chunk is saved in {self.path}. Run the "
                                 f"same experiment again (exp.run()) to resume from step {done}.")


# -- one learner back as plain PyTorch ---------------------------------------------------------------------

def select_learner(configs: Mapping[str, dict], coords: Mapping[str, Any], where: str) -> tuple[str, dict]:
    """The one learner of ``configs`` (id -> configuration) whose coordinates match ``coords`` (``learner=``
    takes an id); ``where`` names them in errors."""
    if not configs:
        raise ValueError(f"{where} holds no learners yet.")
    wanted = dict(coords)
    by_id = wanted.pop("learner", None)
    matches = [(i, c) for i, c in configs.items() if (by_id is None or i == by_id)
               and all(k in c.get("coords", {}) and _same(c["coords"][k], v) for k, v in wanted.items())]
    if len(matches) == 1:
        return matches[0]
    names = sorted({k for c in configs.values() for k in c.get("coords", {})})
    shown = "; ".join(_describe(i, c) for i, c in (matches or list(configs.items()))[:8])
    if not matches:
        raise ValueError(f"No learner in {where} has {_format(coords)}. Its learners have the coordinates "
                         f"{', '.join(names) or '(none)'}; for example: {shown}.")
    raise ValueError(f"{len(matches)} learners in {where} have {_format(coords) or 'no given coordinates'}; "
                     f"give more of {', '.join(names)} (or learner=<id>) to choose one: {shown}"
                     f"{' ...' if len(matches) > 8 else ''}.")


def _same(stored: Any, given: Any) -> bool:
    return selects(stored, given)  # a label, its text or the value it labels: layers=("1.weight", "3.weight")


def _format(coords: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in coords.items())


def _describe(learner_id: str, config: dict) -> str:
    return f"learner={learner_id!r} ({_format(config.get('coords', {})) or 'no coordinates'})"


def load_learner(store: str | os.PathLike | Store, model: nn.Module, step: int | None = None, *,
                 with_scheduler: bool = False, **coords: Any) -> tuple[nn.Module, torch.optim.Optimizer] | tuple[
                     nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """One learner's kept state as plain PyTorch: a copy of ``model`` (the experiment's template) holding its
    parameters and buffers, and a ``torch.optim`` optimizer of its class and hyperparameters with its state
    loaded (SGD's momentum buffers, Adam's moments and step), ready to go on training. ``coords`` select the
    learner by its coordinates in the grid (``epsilon=0.01, seed=3``; ``learner=<id>`` also works); ``step``
    chooses among its kept states (default: the latest, its final state). Interventions that act later in
    training (a momentum window ahead, say) are not part of the optimizer: apply them yourself.

    ``with_scheduler=True`` returns a third item: the learner's ``LRSchedule`` as the torch scheduler on that
    optimizer, stepped once per update done (``last_epoch`` = the step), the optimizer's lr (and OneCycleLR's
    momentum or betas) set for the next update; ``None`` for a learner without a schedule. Go on with
    ``optimizer.step(); scheduler.step()`` at each update.

    >>> import tempfile, torch
    >>> from serimats_func import Experiment, datasets
    >>> from serimats_func.models import MLP
    >>> train, _ = datasets.mnist1d()
    >>> exp = Experiment(MLP((16,)), train, steps=3, store=tempfile.mkdtemp() + "/k.zarr", progress=False)
    >>> _ = exp.run()
    >>> module, optimizer = load_learner(exp.store.path, MLP((16,)))
    >>> type(optimizer).__name__, len(optimizer.state)
    ('SGD', 4)
    """
    store = store if isinstance(store, Store) else Store(store)
    store.check()
    return store.retrying(lambda: _load_learner(store, model, step, coords, with_scheduler))


def _load_learner(store: Store, model: nn.Module, step: int | None, coords: Mapping[str, Any],
                  with_scheduler: bool = False) -> tuple:
    _, config, flat, step = stored_state(store, step, coords)
    module = module_of(model, flat)
    optimizer = _optimizer(config, flat, module)
    if not with_scheduler:
        return module, optimizer
    return module, optimizer, _scheduler(config, optimizer, step)


def stored_state(store: Store, step: int | None, coords: Mapping[str, Any]) -> tuple[str, dict, FlatState, int]:
    """The kept state of the learner that ``coords`` select (``learner=<id>`` or its coordinates) at ``step``
    (None: the latest): its id, configuration, flat stored state and the step; ``module_of(model, flat)`` puts it
    in a copy of the model."""
    learner_id, config = select_learner(store.configs(), coords, f"the store {store.path}")
    held = [(s, p, int(t)) for s, p in store.holders(learner_id, checkpoints=False) for t in s.state_steps]
    steps = sorted({t for _, _, t in held})
    if not steps:
        raise ValueError(f"The store holds no state of learner {learner_id}: it was trained by a version that kept "
                         "none. Train it again (in a new store) to keep its states.")
    if step is None:
        step = steps[-1]
    at = [(s, p, t) for s, p, t in held if t == step]
    if not at:
        raise ValueError(f"The store holds learner {learner_id}'s state at steps {steps}, not at step {step}; "
                         "ask for one of those, or keep more with Experiment(keep_states=[...]) or keep_every=.")
    return learner_id, config, store.read_states([at[0]])[0], step


def _scheduler(config: Mapping, optimizer: torch.optim.Optimizer, step: int) -> Any:
    """The learner's torch scheduler on ``optimizer``, stepped ``step`` times (None without a schedule)."""
    schedule = config["interventions"].get("LRSchedule")
    if schedule is None:
        return None
    schedule = dict(schedule)
    name, warmup = schedule.pop("scheduler"), schedule.pop("warmup")
    family = None if name is None else schedules.family_of(name)
    resolved = {k: tuple(v) if isinstance(v, list) else v for k, v in schedule.items()}
    scheduler = schedules.build_torch(optimizer, family, resolved, warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": these updates are done
        for _ in range(step):
            scheduler.step()
    return scheduler


def _part(flat: FlatState, prefix: str) -> dict[str, torch.Tensor]:
    return {path[len(prefix) + 1:]: _tensor(v, d) for path, (v, d) in flat.items() if path.startswith(prefix + "/")}


def module_of(model: nn.Module, flat: FlatState) -> nn.Module:
    """A CPU copy of ``model`` in the stored dtype, holding the stored parameters and buffers (the library's own
    buffers, such as dropout keys, are left out)."""
    params, buffers = _part(flat, "params"), _part(flat, "buffers")
    module = copy.deepcopy(model).cpu()
    if params:
        module = module.to(next(iter(params.values())).dtype)
    names = dict(module.named_parameters())
    if set(names) != set(params):
        raise ValueError(f"The model's parameters ({', '.join(names)}) are not the stored learner's "
                         f"({', '.join(params)}); give the experiment's model.")
    wrong = [n for n, p in names.items() if not isinstance(p, nn.parameter.UninitializedParameter)
             and p.shape != params[n].shape]
    if wrong:
        raise ValueError(f"The model's parameter {wrong[0]} has shape {tuple(names[wrong[0]].shape)}, the stored "
                         f"learner's {tuple(params[wrong[0]].shape)}: these are not the stored learner's parameters; "
                         "give the experiment's model.")
    with torch.no_grad():
        for name, p in names.items():
            if isinstance(p, nn.parameter.UninitializedParameter):
                p.materialize(params[name].shape)
            p.copy_(params[name])
        for name, b in module.named_buffers():
            if name not in buffers:
                raise ValueError(f"The stored learner has no buffer {name}; give the experiment's model.")
            b.copy_(buffers[name])
    return module


def _optimizer(config: Mapping, flat: FlatState, module: nn.Module) -> torch.optim.Optimizer:
    """The learner's ``torch.optim`` optimizer over ``module``'s trainable parameters, with its stored state. With
    parameter groups: one torch.optim optimizer per class, each group a param group of it (the main's first), and
    a ``CombinedOptimizer`` of them when the groups use other classes than the main one."""
    settings = dict(config["optimizer"])
    param_groups = settings.pop("param_groups", None)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if param_groups is None:  # no groups: the state lies at opt/<field>/<name>
        parts = [(_settings(settings), trainable, "opt")]
    else:  # part i at opt/parts/<i>/<field>/<name>; part 0 holds the parameters no group matched
        grouped = {n for g in param_groups for n in g["params"]}
        parts = [(_settings(settings), [(n, p) for n, p in trainable if n not in grouped], "opt/parts/0")]
        named = dict(trainable)
        parts += [(_settings({k: v for k, v in g.items() if k != "params"}), [(n, named[n]) for n in g["params"]],
                   f"opt/parts/{i}") for i, g in enumerate(param_groups, start=1)]
    optimizer = groups.torch_optimizer([(group, named) for group, named, _ in parts])  # Muon: MuonWithAdamW
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state: dict[int, dict[str, Any]] = {}
    for group, named, prefix in parts:
        opt = _part(flat, prefix)
        for name, param in named:
            per_parameter = {field: v for k, v in opt.items() for field, _, of in [k.partition("/")] if of == name}
            torch_state = group.family.torch_state(opt, per_parameter)
            if torch_state is not None:
                state[index[id(param)]] = torch_state
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, held in state.items():  # scalars keep torch's own dtype (NAdam's float32 mu_product), which loading casts
        optimizer.state[params[i]].update({k: v for k, v in held.items() if v.ndim == 0})
    return optimizer


def _settings(identity: Mapping[str, Any]) -> groups.ParamGroup:
    """An optimizer's identity (``{"optimizer": "SGD", "lr": 0.1, ...}``) as a ParamGroup of torch.optim values."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in identity.items() if k != "optimizer"}
    return groups.ParamGroup("", family_of(identity["optimizer"]).name, values)
