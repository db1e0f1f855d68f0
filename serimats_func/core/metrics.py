"""Metric functions over stacked learner state (N, ...): the registry of built-in metrics (``METRICS``), and the
machinery that vmaps a metric written for one model over every learner.

A metric is a ``MetricSpec``: its name, its function, the names of its own dimensions and what its values
depend on besides the learner (``depends_on``: the ``"loss"``, the ``"train"`` or ``"test"`` data, the
``"control"``, the user's ``"code"``). The built-in ones are registered here, in the result's order, and
everything else reads them from ``METRICS``: which metrics an experiment records (``recorded``), their keys in
the store (``MetricSpec.key_parts``: what decides reuse), the store's dimensions (``BUILTIN_DIMS``), the
result's order and the recording. A metric is recorded at every logged step unless its ``every`` / ``at`` say
fewer (``When``: NaN at the other logged steps); an ``optional`` one only when an experiment names it. Adding a
built-in metric is one function of a ``Snapshot`` plus its ``@builtin(...)`` line below (or
``register(MetricSpec(...))`` from anywhere).

Built-in metrics, over the parameters (not buffers) taken as one flat vector, in float64:

- ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``: on the whole train and test sets
  (``evaluation.evaluate_dataset``; recorded unless ``Experiment(evaluate=False)``).
- ``param_norm``: ``||w||``; ``init_distance``: ``||w - w0||`` and ``init_cosine``: cos(w, w0), where
  ``w0`` is the learner's own initial weights (after any perturbation at init).
- With controls: ``control_distance`` ``||w - wc||``, ``control_layer_distance`` (the same per parameter
  tensor: a ``layer`` dimension labelled by parameter name, ``fc1.weight``, ``fc1.bias``...),
  ``control_cosine`` cos(w, wc), ``control_agreement`` (fraction of test examples whose argmax prediction is
  the control's) and ``control_test_loss_diff`` (test loss minus the control's).
- Optional (recorded only when an experiment names them in ``metrics=``: each costs nine more evaluations of the
  test set per logged step), on the straight path ``(1 - alpha) * w + alpha * wc`` from the learner to its
  control, parameters and floating-point buffers alike (``interpolation``), at the 11 points ``BARRIER_ALPHAS``
  0, 0.1, ..., 1: ``control_barrier_curve``, the test error (1 - accuracy) at each point (an ``alpha``
  dimension); ``control_barrier``, its largest value minus the mean of its two ends (the error barrier of
  Frankle et al. 2020; 0 for the control itself); ``control_barrier_loss``, the same for the test loss.

>>> import torch
>>> a = {"w": torch.tensor([[3.0, 4.0], [3.0, 4.0]]), "b": torch.tensor([[0.0], [1.0]])}  # N = 2
>>> s = Snapshot(a, a, control=torch.tensor([0, 0]))  # learner 1's control is learner 0
>>> [METRICS[m].fn(s).tolist() for m in ("param_norm", "init_distance", "init_cosine")]
[[5.0, 5.0990195135927845], [0.0, 0.0], [1.0, 1.0]]
>>> METRICS["control_layer_distance"].fn(s).tolist()
[[0.0, 0.0], [0.0, 1.0]]
>>> names(evaluate=False, controls=True)
['param_norm', 'init_distance', 'init_cosine', 'control_distance', 'control_layer_distance', 'control_cosine']
>>> [When(every=5, at=(7,)).due(s) for s in (0, 5, 6, 7)]
[True, True, False, True]
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, vmap

from . import pytrees
from .interpolation import PathEvaluation, barrier

METRICS_VERSION = 1  # part of the built-in metrics' keys in the store: bump when their definition changes
DEPENDENCIES = ("loss", "train", "test", "control", "code")  # what a metric's values may depend on besides the learner


# -- helpers on weights ---------------------------------------------------------------------------------

def layer_norms(tree: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The norm of each tensor of N learners (N, ...), accumulated in float64: (N, L), L tensors in dict order."""
    return torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float64) for t in tree.values()], 1)


def _total(norms: torch.Tensor) -> torch.Tensor:
    """The norm of all tensors as one vector, from their norms (N, L): (N,)."""
    return norms.square().sum(1).sqrt()


def _cosine(norm_a: torch.Tensor, norm_b: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """cos(a, b) from ||a||, ||b|| and ||a - b||, as 1 - (||a-b||^2 - (||a||-||b||)^2) / (2 ||a|| ||b||):
    exactly 1 for equal vectors, and accurate near 1, where a . b / (||a|| ||b||) loses its digits."""
    gap = (distance.square() - (norm_a - norm_b).square()) / (2 * norm_a * norm_b)
    return (1 - gap).clamp(-1.0, 1.0)


def gather(tree: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Learner ``index[i]``'s tensors in row i: (N, ...) -> (len(index), ...)."""
    return {k: v[index] for k, v in tree.items()}


def agreement(predictions: torch.Tensor, control_index: torch.Tensor) -> torch.Tensor:
    """Fraction of examples where a learner's prediction (N, n) is its control's: (N,) float64."""
    return (predictions == predictions[control_index]).double().mean(1)


# -- what a built-in metric reads ---------------------------------------------------------------------------

class Evaluation(NamedTuple):
    """N learners on a whole data set: ``loss``, ``acc`` (N,) (NaN without that set), ``predictions`` (N, n)
    argmax or None."""

    loss: torch.Tensor
    acc: torch.Tensor
    predictions: torch.Tensor | None = None


Evaluate = Callable[[str, bool], Evaluation]  # (split "train" | "test", with predictions) -> Evaluation
AlongPath = Callable[[str, torch.Tensor], PathEvaluation]  # (split, alphas (A,)) -> (N, A), each learner to its control
BARRIER_ALPHAS = tuple(i / 10 for i in range(11))  # the points of the path to the control: 0, 0.1, ..., 1


class Snapshot:
    """N learners at one logged step, as built-in metric functions read them; each part is computed once, when
    a metric first asks for it (the metrics of a step share their norms and their pass over the data).

    - ``params`` (N, ...) and ``initial`` (N, ...): the parameters now and at step 0;
    - ``control`` (N,): the row of each learner's control (its own row where it has none; the recorder
      makes such a learner's control metrics NaN);
    - ``norms``, ``initial_norms``, ``init_layers``, ``control_layers``: ``layer_norms`` (N, L) of the
      parameters, the initial ones, and the differences to the initial ones and to the control's;
    - ``evaluation("train" | "test")``: loss and accuracy on the whole set; ``predictions``: the test set's
      argmax predictions (N, n_test), None without a test set;
    - ``control_path``: the test loss and error (N, 11) at the points ``BARRIER_ALPHAS`` of the straight path
      from each learner (alpha = 0) to its control (alpha = 1): its ends are ``evaluation("test")``'s, the nine
      points between them are evaluated by ``along_path(split, alphas)`` (``interpolation.along_path``).

    ``evaluate(split, predictions)`` computes an ``Evaluation``; ``predict``: evaluate the test set with its
    predictions in the same pass (when a recorded metric reads them).
    """

    def __init__(self, params: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor],
                 control: torch.Tensor | None = None, evaluate: Evaluate | None = None,
                 initial_norms: torch.Tensor | None = None, predict: bool = False,
                 along_path: AlongPath | None = None):
        self.params, self.initial = params, initial
        self._along_path = along_path
        first = next(iter(params.values()))
        self.control = control if control is not None else torch.arange(len(first), device=first.device)
        self._evaluate, self._predict = evaluate, predict
        self._cache: dict[str, Any] = {} if initial_norms is None else {"initial_norms": initial_norms}

    def _once(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    @property
    def norms(self) -> torch.Tensor:
        return self._once("norms", lambda: layer_norms(self.params))

    @property
    def initial_norms(self) -> torch.Tensor:
        return self._once("initial_norms", lambda: layer_norms(self.initial))

    @property
    def init_layers(self) -> torch.Tensor:
        return self._once("init_layers", lambda: layer_norms({k: self.params[k] - self.initial[k] for k in self.params}))

    @property
    def control_layers(self) -> torch.Tensor:
        return self._once("control_layers",
                          lambda: layer_norms({k: v - v[self.control] for k, v in self.params.items()}))

    def evaluation(self, split: str) -> Evaluation:
        if self._evaluate is None:
            raise ValueError("this snapshot has no data to evaluate the learners on")
        return self._once(f"evaluation.{split}", lambda: self._evaluate(split, self._predict and split == "test"))

    @property
    def predictions(self) -> torch.Tensor | None:
        if self.evaluation("test").predictions is None and not self._predict:
            self._cache["evaluation.test"] = self._evaluate("test", True)
        return self.evaluation("test").predictions

    @property
    def control_path(self) -> PathEvaluation:
        return self._once("control_path", self._control_path)

    def _control_path(self) -> PathEvaluation:
        if self._along_path is None:
            raise ValueError("this snapshot cannot evaluate the path between learners and their controls")
        ends = self.evaluation("test")
        inner = self._along_path("test", torch.tensor(BARRIER_ALPHAS[1:-1], dtype=torch.float64))  # (N, 9)
        loss = torch.cat([ends.loss[:, None], inner.loss, ends.loss[self.control, None]], 1)  # (N, 11)
        error = 1 - ends.acc
        return PathEvaluation(loss, torch.cat([error[:, None], inner.error, error[self.control, None]], 1))


# -- when a metric is recorded ------------------------------------------------------------------------------

class When(NamedTuple):
    """At which logged steps a metric is recorded: those that are multiples of ``every`` (step 0 included), and
    the steps ``at`` (which the experiment logs); both given: either; neither (``When()``): every logged step.
    A decision on the step number alone, taken on the host when a step is logged."""

    every: int | None = None
    at: tuple[int, ...] | None = None

    @property
    def always(self) -> bool:
        """Recorded at every logged step (``every=1`` is that too)."""
        return self.every == 1 or (self.every is None and self.at is None)

    def due(self, step: int) -> bool:
        if self.always:
            return True
        return (self.every is not None and step % self.every == 0) or (self.at is not None and step in self.at)

    def key(self) -> dict:
        """What the metric's key in the store adds for this schedule (nothing is added for ``always``): values
        recorded at fewer steps are another observation than values at every logged step."""
        return {"every": self.every, "at": None if self.at is None else list(self.at)}

    def describe(self) -> str:
        parts = ([] if self.every is None else [f"every={self.every}"]) + (
            [] if self.at is None else [f"at={list(self.at)}"])
        return ", ".join(parts) or "every logged step"


# -- the registry --------------------------------------------------------------------------------------------

def builtin_key(spec: MetricSpec, ingredients: Mapping[str, Any]) -> list:
    """The common recipe of a metric's key: its name, version and each ingredient it depends on."""
    return ["builtin", spec.version, spec.name, *(ingredients[d] for d in spec.depends_on)]


def control_key(spec: MetricSpec, ingredients: Mapping[str, Any]) -> list:
    """The key of the first metrics against the control (before the registry): the control, loss and test set,
    whatever the metric reads."""
    return ["builtin", spec.version, spec.name, ingredients["control"], ingredients["loss"], ingredients["test"]]


def evaluation_key(split: str, what: str) -> Callable[[MetricSpec, Mapping[str, Any]], list]:
    """The key of ``<split>_<what>`` (before the registry): the loss, the split's data and ``what``."""
    return lambda spec, ingredients: [ingredients["loss"], ingredients[split], what]


def user_key(spec: MetricSpec, ingredients: Mapping[str, Any]) -> list:
    """The key of a ``Logger``'s metric: its code, the test set and, if it reads it, the control."""
    return [ingredients["code"], ingredients["test"]] + ([ingredients["control"]] if spec.against_control else [])


@dataclass(frozen=True)
class MetricSpec:
    """A metric. ``fn``: for a built-in metric, ``fn(snapshot) -> (N, *shape)`` over a ``Snapshot`` of N
    learners; for a ``Logger``'s, ``fn(learner)`` written for one learner. ``dims``: the names of its own
    dimensions (``()``: a scalar per learner and step). ``depends_on``: what its values depend on besides the
    learner, from ``DEPENDENCIES``; a metric on ``"train"`` or ``"test"`` data needs the evaluation (not
    recorded with ``evaluate=False``) and one on the ``"control"`` is recorded only when the experiment has
    controls (NaN for learners without one). ``key``: what its key in the store is a digest of (see
    ``key_parts``); ``version``: bump it when the definition changes, so that stored values are not reused.
    ``every``, ``at``: when it is recorded by default (``When``; both None: at every logged step; an experiment's
    ``metrics=`` may say otherwise). ``optional``: recorded only when an experiment names it in ``metrics=``
    (an expensive metric). ``labels``: the coordinate values of its own dimensions (dim -> labels; default their
    positions 0, 1, ...)."""

    name: str
    fn: Callable
    dims: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    key: Callable[[MetricSpec, Mapping[str, Any]], list] = builtin_key
    version: int = METRICS_VERSION
    every: int | None = None
    at: tuple[int, ...] | None = None
    optional: bool = False
    labels: Mapping[str, Sequence] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = [d for d in self.depends_on if d not in DEPENDENCIES]
        if unknown:
            raise ValueError(f"Metric {self.name!r}: depends_on={unknown[0]!r} is not one of {', '.join(DEPENDENCIES)}.")
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "depends_on", tuple(self.depends_on))
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"Metric {self.name!r}: every= takes a positive integer; got {self.every!r}.")
        if self.at is not None:
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.at):
                raise ValueError(f"Metric {self.name!r}: at= takes steps (integers >= 0); got {self.at!r}.")
            object.__setattr__(self, "at", tuple(sorted(set(self.at))))

    @property
    def when(self) -> When:
        """At which logged steps it is recorded."""
        return When(self.every, self.at)

    def scheduled(self, when: When) -> MetricSpec:
        """This metric recorded at ``when``'s steps."""
        return dataclasses.replace(self, every=when.every, at=when.at)

    @property
    def against_control(self) -> bool:
        return "control" in self.depends_on

    @property
    def evaluates(self) -> bool:
        return "train" in self.depends_on or "test" in self.depends_on

    def key_parts(self, ingredients: Mapping[str, Any]) -> list:
        """What this metric's key in the store is a digest of, given the ``ingredients`` (``"loss"``: the loss's
        key, ``"train"``, ``"test"``: the data's fingerprints, ``"control"``: the id of the control beside the
        learner or None, ``"code"``: a digest of a user metric's code), followed by its schedule where it is not
        recorded at every logged step (``When.key``: a new schedule is recorded anew, as a new metric is)."""
        parts = self.key(self, ingredients)
        return parts if self.when.always else [*parts, {"recorded": self.when.key()}]


METRICS: dict[str, MetricSpec] = {}  # the built-in metrics by name, in the result's order


def register(spec: MetricSpec) -> MetricSpec:
    """Add a built-in metric (after those registered before it); refused if its name is taken."""
    if spec.name in METRICS:
        raise ValueError(f"A built-in metric named {spec.name!r} is registered already.")
    METRICS[spec.name] = spec
    return spec


def unregister(name: str) -> MetricSpec:
    """Remove a built-in metric (a test's own, say); returns it."""
    return METRICS.pop(name)


def builtin(name: str | None = None, **fields: Any) -> Callable[[Callable], Callable]:
    """Register ``fn(snapshot) -> (N, ...)`` as a built-in metric named ``name`` (default: the function's
    name), with the other fields of its ``MetricSpec``."""
    def add(fn: Callable) -> Callable:
        register(MetricSpec(name or fn.__name__, fn, **fields))
        return fn

    return add


def recorded(evaluate: bool = True, controls: bool = True,
             chosen: Mapping[str, When | bool] | None = None) -> list[MetricSpec]:
    """The built-in metrics an experiment records, in the result's order: those its ``evaluate`` and ``controls``
    allow, optional ones only when ``chosen`` names them; ``chosen[name]``: a ``When`` (recorded then), True (at
    its own default steps) or False (not recorded)."""
    chosen = chosen or {}
    out = []
    for s in METRICS.values():
        choice = chosen.get(s.name)
        if choice is False or (s.optional and choice is None):
            continue
        if (evaluate or not s.evaluates) and (controls or not s.against_control):
            out.append(s.scheduled(choice) if isinstance(choice, When) else s)
    return out


def names(evaluate: bool = True, controls: bool = True, chosen: Mapping[str, When | bool] | None = None) -> list[str]:
    """The names of ``recorded(evaluate, controls, chosen)``."""
    return [s.name for s in recorded(evaluate, controls, chosen)]


class _Names(Sequence):
    """The names of the registered metrics that ``keep`` selects, read from the registry when used."""

    def __init__(self, keep: Callable[[MetricSpec], bool]):
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, s in METRICS.items() if self._keep(s))

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __add__(self, other) -> tuple[str, ...]:
        return self._names() + tuple(other)

    def __eq__(self, other) -> bool:
        return self._names() == tuple(other) if isinstance(other, (Sequence, _Names)) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


class _Dims(Mapping):
    """The dimension names of the registered metrics that have their own (name -> dims), read when used."""

    def _dims(self) -> dict[str, tuple[str, ...]]:
        return {n: s.dims for n, s in METRICS.items() if s.dims}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._dims()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dims())

    def __len__(self) -> int:
        return len(self._dims())

    def __repr__(self) -> str:
        return repr(self._dims())


# views of the registry, by family (the last three: metrics recorded unless an experiment drops them)
BUILTIN_METRICS = _Names(lambda s: True)
OPTIONAL_METRICS = _Names(lambda s: s.optional)  # recorded only when an experiment names them in metrics=
DEFAULT_METRICS = _Names(lambda s: s.evaluates and not s.against_control and not s.optional)  # train/test loss, acc
WEIGHT_METRICS = _Names(lambda s: not s.evaluates and not s.against_control and not s.optional)
CONTROL_METRICS = _Names(lambda s: s.against_control and not s.optional)
BUILTIN_DIMS = _Dims()  # metrics with a dimension of their own


def builtin_labels() -> dict[str, list]:
    """The coordinate values of the registered metrics' own dimensions that they name (dim -> labels).

    >>> builtin_labels()["alpha"][:3]
    [0.0, 0.1, 0.2]
    """
    return {d: list(v) for spec in METRICS.values() for d, v in spec.labels.items()}


# -- the built-in metrics, in the result's order ------------------------------------------------------------

for _split in ("train", "test"):
    builtin(f"{_split}_loss", depends_on=("loss", _split), key=evaluation_key(_split, "loss"))(
        lambda s, split=_split: s.evaluation(split).loss)
    builtin(f"{_split}_acc", depends_on=(_split,), key=evaluation_key(_split, "acc"))(
        lambda s, split=_split: s.evaluation(split).acc)


@builtin()
def param_norm(s: Snapshot) -> torch.Tensor:
    return _total(s.norms)


@builtin()
def init_distance(s: Snapshot) -> torch.Tensor:
    return _total(s.init_layers)


@builtin()
def init_cosine(s: Snapshot) -> torch.Tensor:
    return _cosine(_total(s.norms), _total(s.initial_norms), _total(s.init_layers))


@builtin(depends_on=("control",), key=control_key)
def control_distance(s: Snapshot) -> torch.Tensor:
    return _total(s.control_layers)


@builtin(dims=("layer",), depends_on=("control",), key=control_key)
def control_layer_distance(s: Snapshot) -> torch.Tensor:
    return s.control_layers


@builtin(depends_on=("control",), key=control_key)
def control_cosine(s: Snapshot) -> torch.Tensor:
    norm = _total(s.norms)
    return _cosine(norm, norm[s.control], _total(s.control_layers))


@builtin(depends_on=("control", "test"), key=control_key)
def control_agreement(s: Snapshot) -> torch.Tensor:
    acc = s.evaluation("test").acc
    finite = ~torch.isnan(acc) & ~torch.isnan(acc[s.control])  # non-finite logits: NaN
    predictions = s.predictions
    agree = torch.full_like(acc, torch.nan, dtype=torch.float64) if predictions is None else agreement(predictions, s.control)
    return torch.where(finite, agree, torch.nan)


@builtin(depends_on=("control", "loss", "test"), key=control_key)
def control_test_loss_diff(s: Snapshot) -> torch.Tensor:
    loss = s.evaluation("test").loss
    return loss - loss[s.control]


# the barrier on the straight path to the control: optional (11 evaluations of the test set per logged step)

@builtin(depends_on=("control", "test"), optional=True)
def control_barrier(s: Snapshot) -> torch.Tensor:
    return barrier(s.control_path.error)


@builtin(depends_on=("control", "loss", "test"), optional=True)
def control_barrier_loss(s: Snapshot) -> torch.Tensor:
    return barrier(s.control_path.loss)


@builtin(dims=("alpha",), depends_on=("control", "test"), optional=True, labels={"alpha": BARRIER_ALPHAS})
def control_barrier_curve(s: Snapshot) -> torch.Tensor:
    return s.control_path.error


# -- metrics written for one model ------------------------------------------------------------------------

class Data(NamedTuple):
    """Examples on the device: ``x`` (n, ...), ``y`` (n,). Unpacks as ``x, y = learner.test``."""

    x: torch.Tensor
    y: torch.Tensor


class Learner:
    """What a metric sees of one learner (a custom metric is written for one model, as in the seed).

    - ``model``: the template ``nn.Module`` holding this learner's parameters and buffers, in eval mode:
      ``learner.model.fc1.weight``, ``learner.model(x)`` (logits of a batch).
    - ``params``, ``buffers``: the same tensors, as dicts by name.
    - ``train``, ``test``: the whole training and test sets, ``Data(x, y)`` (``test`` is None without a
      test set).
    - ``batch``: the training batch this learner takes at the next update (before batch interventions),
      ``Data(x, y)``, for gradient-like metrics.
    - ``control``: its control, a ``Learner`` with ``model``, ``params``, ``buffers``. A metric that reads
      it is NaN for learners without a control.
    """

    def __init__(self, model: nn.Module, params: dict, buffers: dict, train: Data | None = None,
                 test: Data | None = None, batch: Data | None = None, control: Learner | None = None):
        self.model, self.params, self.buffers = model, params, buffers
        self.train, self.test, self.batch = train, test, batch
        self._control = control
        self.read_control = False

    @property
    def control(self) -> Learner:
        self.read_control = True
        if self._control is None:
            raise AttributeError("this learner has no control here")
        return self._control


MetricFn = Callable[[Learner], torch.Tensor]


class _Probe(nn.Module):
    """Runs a metric inside ``functional_call`` so that ``model``'s (and ``control``'s) attributes are the
    learner's (and its control's)."""

    def __init__(self, model: nn.Module, control: nn.Module, metric: MetricFn, train: Data | None, test: Data | None):
        super().__init__()
        self.model, self.control = model, control
        self.metric, self.train_data, self.test_data = metric, train, test

    def forward(self, params: dict, buffers: dict, control_params: dict, control_buffers: dict,
                batch: Data | None) -> torch.Tensor:
        control = Learner(self.control, control_params, control_buffers, self.train_data, self.test_data, batch)
        learner = Learner(self.model, params, buffers, self.train_data, self.test_data, batch, control)
        return self.metric(learner)


def _state(params: dict, buffers: dict, control_params: dict, control_buffers: dict) -> dict:
    own = {f"model.{k}": v for k, v in {**params, **buffers}.items()}
    return {**own, **{f"control.{k}": v for k, v in {**control_params, **control_buffers}.items()}}


def control_copy(template: nn.Module) -> nn.Module:
    """A second module for the control's tensors (one module cannot hold two learners' tensors at once)."""
    return copy.deepcopy(template).eval()


def metric_on_one(template: nn.Module, fn: MetricFn, params: dict, buffers: dict, train: Data | None = None,
                  test: Data | None = None, batch: Data | None = None) -> tuple[torch.Tensor, bool]:
    """Run ``fn`` on one learner's unstacked state, its own control being itself: (value, whether it read
    ``learner.control``)."""
    learners: list[Learner] = []

    def recording(learner: Learner) -> torch.Tensor:
        learners.append(learner)
        return fn(learner)

    probe = _Probe(template, control_copy(template), recording, train, test)
    value = functional_call(probe, _state(params, buffers, params, buffers), (params, buffers, params, buffers, batch))
    return value, learners[0].read_control


def vmapped_metrics(template: nn.Module, metrics: Mapping[str, MetricFn], train: Data | None = None,
                    test: Data | None = None, shared_batch: bool = True) -> Callable:
    """``f(params, buffers, control=None, batch=None) -> {name: (N, *shape)}`` for stacked learner state
    (N, ...); ``control`` is the (params, buffers) of each learner's control, stacked the same way (default:
    the learner itself); ``batch`` is a ``Data`` of (B, ...) if ``shared_batch`` else (N, B, ...). Call with
    ``template`` in eval mode.

    >>> from serimats_func.models import MLP
    >>> from serimats_func.core.learners import prepare_template, initial_model_state
    >>> from serimats_func.core import pytrees
    >>> template = prepare_template(MLP(widths=(8,)), torch.zeros(2, 40)).eval()
    >>> state = pytrees.stack([initial_model_state(template, k, 0) for k in range(3)])
    >>> f = vmapped_metrics(template, {"norm": lambda learner: learner.model[1].weight.norm()})
    >>> f(state.params, state.buffers)["norm"].shape
    torch.Size([3])
    """
    control_module = control_copy(template)
    probes = {name: _Probe(template, control_module, fn, train, test) for name, fn in metrics.items()}

    def one_learner(params, buffers, control_params, control_buffers, batch):
        state = _state(params, buffers, control_params, control_buffers)
        args = (params, buffers, control_params, control_buffers, batch)
        return {name: functional_call(probe, state, args) for name, probe in probes.items()}

    def run(params: dict, buffers: dict, control: tuple[dict, dict] | None = None, batch: Data | None = None) -> dict:
        # metrics get copies: one that edits a tensor in place changes only its copy, never a learner
        control_params, control_buffers = pytrees.tree_map(torch.clone, control if control is not None else (params, buffers))
        params, buffers = pytrees.tree_map(torch.clone, (params, buffers))
        batch_dim = None if (batch is None or shared_batch) else 0
        return vmap(one_learner, in_dims=(0, 0, 0, 0, batch_dim))(params, buffers, control_params, control_buffers, batch)

    return run
