"""Descriptions of code and values that name an experiment's setup.

Learner ids hash these descriptions, so whatever can change a learner's numbers must change its
description, and the same code and values must describe the same in every process (whatever
``PYTHONHASHSEED``) and on Python 3.10 to 3.13.

- Values by exact value: numbers, strings, containers (sets sorted), tensors and NumPy arrays by
  a hash of dtype, shape and raw bytes (never their rounded repr).
- Code by a canonical walk of its syntax tree: no line numbers, comments, docstrings or
  annotations. Where no source exists (``exec``, a REPL) by a hash of the byte code, marked with
  the Python version that made it.
- A user function by its code, defaults, closure values and the globals its code loads
  (functions recursively, numbers and tensors by value, ``config.SCALE`` of a user module).
- A user class (any class outside torch, torchvision, NumPy and the standard library) by the code
  of its methods and its class attributes, with its user base classes.
- A module by its class, its attributes, its parameters' names, shapes, dtypes and
  ``requires_grad`` (not their values: learners redraw them), its buffers by value, its children
  and its hooks. ``training``, ``inplace`` of torch's modules and torch's private attributes are
  left out.
- torch's own functions and classes by their qualified names.

>>> import torch
>>> from torch import nn
>>> describe_callable(nn.CrossEntropyLoss()) == describe_callable(nn.CrossEntropyLoss(label_smoothing=0.3))
False
>>> describe_module(nn.ReLU(inplace=True)) == describe_module(nn.ReLU())
True
>>> describe_module(nn.Linear(2, 3)) == describe_module(nn.Linear(2, 3))  # weights are redrawn anyway
True
>>> describe_callable(torch.tanh), describe_callable(torch.nn.functional.relu)
('torch.tanh', 'torch.nn.functional.relu')
>>> len(digest(describe_module(nn.Linear(2, 3))))
16
"""

from __future__ import annotations

import ast
import dataclasses
import dis
import enum
import functools
import hashlib
import inspect
import json
import linecache
import os
import random
import re
import sys
import sysconfig
import textwrap
import types
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["describe_callable", "describe_class", "describe_module", "digest"]

_LIBRARIES = frozenset({"torch", "torchvision", "torchaudio", "functorch", "numpy", "builtins"}) | frozenset(
    sys.stdlib_module_names
)
_STDLIB = os.path.join(os.path.abspath(sysconfig.get_paths()["stdlib"]), "")
_LIBRARY_ROOTS = tuple(os.path.join(os.path.dirname(os.path.abspath(m.__file__)), "") for m in (torch, np))
_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # training, _parameters, hook dictionaries, ...
_HOOKS = {"forward_pre": "_forward_pre_hooks", "forward": "_forward_hooks",
          "backward_pre": "_backward_pre_hooks", "backward": "_backward_hooks"}
_CLASS_SKIP = frozenset({"_abc_impl", "__annotate__", "__annotate_func__"})
_GENERATED = ("__dataclass_fields__", "_fields")  # dataclasses and named tuples generate methods
_AST_SKIP = frozenset({"annotation", "returns", "type_comment", "type_params"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DEPTH = 60


def digest(description: Any) -> str:
    """A short hash of a description's canonical JSON.

    >>> digest({"b": 1, "a": [2.5, None]}) == digest({"a": [2.5, None], "b": 1})
    True
    """
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def describe_module(module: nn.Module) -> dict:
    """Class, attributes, parameters (names, shapes, dtypes, ``requires_grad``), buffers (by
    value), children and hooks of ``module``, recursively.

    >>> m = nn.BatchNorm1d(3)
    >>> before = describe_module(m)
    >>> _ = m.running_mean.fill_(1e-7)
    >>> describe_module(m) == before
    False
    """
    return _Describer().module(module, "")


def describe_callable(fn: Any) -> Any:
    """A loss, metric or any other callable: torch's by name, the rest by code and values.

    >>> describe_callable(lambda a, b: a + b) == describe_callable(lambda a, b: a * b)
    False
    >>> import functools
    >>> ce = torch.nn.functional.cross_entropy
    >>> smooth = functools.partial(ce, label_smoothing=0.1)
    >>> describe_callable(smooth) == describe_callable(functools.partial(ce, label_smoothing=0.2))
    False
    """
    return _Describer().value(fn)


def runs_user_code(*objects: Any) -> bool:
    """Whether describing ``objects`` meets code of the user's (a function or class outside torch, NumPy, the
    standard library and this library), whose description may miss what it reads at run time (an attribute
    named by a computed string): only then does a setup's id take the wider behaviour probe, so that setups
    made of library parts alone keep their ids.

    >>> runs_user_code(nn.Linear(2, 3), torch.nn.functional.cross_entropy)
    False
    >>> def loss(logits, y):
    ...     return torch.nn.functional.cross_entropy(logits, y)
    >>> loss.__module__ = "sweep"  # as if written in the user's sweep.py
    >>> runs_user_code(nn.Linear(2, 3), loss)
    True
    """
    describer = _Describer()
    describer.user_code = False
    for obj in objects:
        describer.value(obj)
    return describer.user_code


def _own_library(obj: Any) -> bool:
    return (getattr(obj, "__module__", None) or "").partition(".")[0] == "serimats_func"


def describe_class(cls: type) -> Any:
    """The code of a user-defined class's methods and its class attributes, with those of its
    user-defined base classes; a library class by its qualified name.

    >>> describe_class(nn.Linear)
    'torch.nn.modules.linear.Linear'
    >>> class Scale:
    ...     factor = 2.0
    >>> describe_class(Scale)["members"]
    {'factor': 2.0}
    """
    if _is_library(cls):
        return _name(cls)
    return _Describer().klass(cls)


# ---------------------------------------------------------------------------------------------
# Names


def _library_module(name: str | None) -> bool:
    return (name or "").partition(".")[0] in _LIBRARIES


def _is_library(obj: Any) -> bool:
    """torch, NumPy and standard-library objects are named, not hashed: an upgrade must not
    rename every learner."""
    return _library_module(getattr(obj, "__module__", None))


_PROTOCOL_PACKAGES = ("serimats_func.interventions", "serimats_func.loggers")


def _is_protocol(cls: type) -> bool:
    """The library's classes that users subclass (``Intervention`` and the built-ins, ``Logger``): named, not
    hashed, like torch's, so that a user class's id or metric key does not change with the library's internals
    (where they live, how the base class is written); its own code is hashed as always."""
    return (getattr(cls, "__module__", None) or "").startswith(_PROTOCOL_PACKAGES)


def _name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _type_name(cls: type) -> str:
    """A library class with its module; a user class by its qualified name alone: its module is ``__main__``
    when its script runs and the script's name when it is imported, and the same code must describe the same."""
    return _name(cls) if _is_library(cls) else cls.__qualname__


def _builtin_name(fn: Any) -> str:
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type):
        return f"{_type_name(owner)}.{fn.__name__}"
    objclass = getattr(fn, "__objclass__", None)  # method descriptors: torch.Tensor.add
    if objclass is not None:
        return f"{_type_name(objclass)}.{fn.__name__}"
    module = getattr(fn, "__module__", None) or getattr(owner, "__name__", None) or "builtins"
    return f"{module}.{fn.__name__}"


def _stateless(owner: Any) -> bool:
    return owner is None or isinstance(owner, (types.ModuleType, type))


# ---------------------------------------------------------------------------------------------
# Code


def _canonical(node: Any) -> Any:
    """A syntax tree as nested lists: node types and fields, without positions, annotations,
    docstrings, or the None and empty fields that differ between Python versions."""
    if isinstance(node, ast.Constant):
        return ["Constant", type(node.value).__name__, repr(node.value)]
    if isinstance(node, ast.AST):
        out: list = [type(node).__name__]
        for field, value in ast.iter_fields(node):
            if field in _AST_SKIP:
                continue
            if isinstance(value, list):
                value = [v for v in value if not _is_docstring(v)]
            if value is None or (isinstance(value, list) and not value):
                continue
            out += [field, _canonical(value)]
        return out
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return node  # identifiers, ImportFrom.level, AnnAssign.simple


def _is_docstring(node: Any) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


class _SourceFile:
    """A parsed source file: its functions and lambdas by (first line, name); none if it does
    not parse (a notebook cell with magics)."""

    def __init__(self, text: str):
        self.text = text
        self.nodes: dict[tuple[int, str], list[ast.AST]] = {}
        self.digests: dict[int, str] = {}
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            return
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = {node.lineno, min((d.lineno for d in node.decorator_list), default=node.lineno)}
                for line in lines:
                    self.nodes.setdefault((line, node.name), []).append(node)
            elif isinstance(node, ast.Lambda):
                self.nodes.setdefault((node.lineno, "<lambda>"), []).append(node)

    def digest(self, node: ast.AST) -> str:
        if id(node) not in self.digests:
            self.digests[id(node)] = digest(_canonical(node))
        return self.digests[id(node)]


_FILES: dict[str, _SourceFile] = {}


def _source_file(code: types.CodeType, module_globals: dict | None) -> _SourceFile | None:
    filename = code.co_filename
    linecache.checkcache(filename)
    text = "".join(linecache.getlines(filename, module_globals))
    if not text:
        return None
    cached = _FILES.get(filename)
    if cached is None or cached.text != text:
        cached = _FILES[filename] = _SourceFile(text)
    return cached


def _arg_names(node: ast.Lambda | ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    a = node.args
    return tuple(x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs])


def _code_arg_names(code: types.CodeType) -> tuple[str, ...]:
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def _same_lambdas(code: types.CodeType, nodes: list) -> list:
    """Of the lambdas on one line, those with ``code``'s arguments, and if several, those that
    compile alone to ``code``'s byte code (a lambda with free variables compiles differently
    alone: then all of them)."""
    nodes = [n for n in nodes if _arg_names(n) == _code_arg_names(code)] or nodes
    if len(nodes) > 1 and not code.co_freevars:
        same = []
        for node in nodes:
            alone = compile(ast.Expression(body=node), "<lambda>", "eval")
            inner = [c for c in alone.co_consts if isinstance(c, types.CodeType)]
            if inner and inner[0].co_code == code.co_code and inner[0].co_consts == code.co_consts:
                same.append(node)
        nodes = same or nodes
    return nodes


def _code_digests(code: types.CodeType, module_globals: dict | None) -> list[str] | None:
    """Digests of the canonical syntax trees that define ``code``: its ``def``, or its lambda
    (all the lambdas on its line that could be it); None where there is no source."""
    source = _source_file(code, module_globals)
    if source is not None:
        nodes = source.nodes.get((code.co_firstlineno, code.co_name))
        if nodes:
            return sorted({source.digest(n) for n in _same_lambdas(code, nodes)})
    try:  # the block alone (a def in a notebook cell that also holds magics)
        tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    kind = ast.Lambda if code.co_name == "<lambda>" else (ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(tree) if isinstance(n, kind) and getattr(n, "name", "<lambda>") == code.co_name]
    nodes = _same_lambdas(code, nodes) if kind is ast.Lambda else nodes[:1]
    return sorted({digest(_canonical(n)) for n in nodes}) or None


def _describe_code(code: types.CodeType, module_globals: dict | None, doc: str | None = None) -> dict:
    """``{"ast": digest}`` (a list of digests for lambdas that share a line and arguments), or
    ``{"bytecode": digest, "python": "3.11"}`` where there is no source."""
    digests = _code_digests(code, module_globals)
    if not digests:
        return {"bytecode": digest(_bytecode(code, doc)), "python": _PYTHON}
    return {"ast": digests[0] if len(digests) == 1 else digests}


def _bytecode(code: types.CodeType, doc: str | None = None) -> list:
    """What a code object computes, without positions or file names; frozenset constants sorted."""
    consts = list(code.co_consts)
    if doc is not None and consts and consts[0] == doc:
        consts = consts[1:]
    return [code.co_code.hex(), list(code.co_names), list(code.co_varnames), list(code.co_freevars),
            code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, [_constant(c) for c in consts]]


def _constant(c: Any) -> Any:
    if isinstance(c, types.CodeType):
        return _bytecode(c)
    if isinstance(c, frozenset):
        return ["frozenset", sorted((_constant(x) for x in c), key=json.dumps)]
    if isinstance(c, tuple):
        return ["tuple", [_constant(x) for x in c]]
    return [type(c).__name__, repr(c)]


_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _names(code: types.CodeType) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The global names that ``code`` (with its nested code) loads, the modules it imports, and
    every name it uses (``co_names``: attribute names too). Attribute names are not globals:
    ``self.model`` must not describe a notebook's global ``model``."""
    if code not in _NAMES:
        loaded, imported, every = set(), set(), set(code.co_names)
        for instruction in dis.get_instructions(code):
            if "GLOBAL" in instruction.opname or instruction.opname in ("LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"):
                loaded.add(instruction.argval)
            elif instruction.opname == "IMPORT_NAME":
                imported.add(instruction.argval)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                inner = _names(c)
                loaded, imported, every = loaded | inner[0], imported | inner[1], every | inner[2]
        _NAMES[code] = (frozenset(loaded), frozenset(imported), frozenset(every))
    return _NAMES[code]


# ---------------------------------------------------------------------------------------------
# Values


def _hash_bytes(data: Any) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _tensor(t: torch.Tensor) -> dict:
    desc: dict[str, Any] = {"tensor": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if t.is_meta:
        return {**desc, "meta": True}
    data = t.detach()
    if data.is_quantized:
        data = data.dequantize()
    if data.layout != torch.strided:
        data = data.to_dense()
    data = data.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return {**desc, "bytes": _hash_bytes(data.view(torch.uint8).numpy())}


def _array(a: np.ndarray) -> dict:
    dtype = a.dtype.str if a.dtype.fields is None else repr(a.dtype.descr)
    return {"ndarray": dtype, "shape": list(a.shape), "bytes": _hash_bytes(np.ascontiguousarray(a).tobytes())}


def _sorted(descriptions: Any) -> list:
    return sorted(descriptions, key=lambda d: json.dumps(d, sort_keys=True))


class _Describer:
    """One description: functions and classes described once, cycles and shared modules named."""

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}  # id -> description of a function or class
        self.active: set[int] = set()  # containers and objects being described: a reference back is a cycle
        self.defining: set[int] = set()  # functions and classes being described
        self.modules: dict[int, str] = {}  # module or parameter id -> where it was first described
        self.alive: list = []  # keeps every object whose id is a key above alive
        self.depth = 0
        self.user_code = False  # set on meeting a user function or class (``runs_user_code``)

    def value(self, v: Any) -> Any:
        t = type(v)
        if v is None or t in (bool, int, str):
            return v
        if t is float:
            return v if v == v and abs(v) != float("inf") else {"float": repr(v)}
        if isinstance(v, nn.parameter.UninitializedTensorMixin):
            return {"uninitialized": type(v).__name__}
        if isinstance(v, torch.Tensor):
            return _tensor(v)
        if isinstance(v, np.ndarray):
            return _array(v) if not v.dtype.hasobject else {"ndarray": "object", "shape": list(v.shape),
                                                            "items": [self.value(x) for x in v.ravel()]}
        if isinstance(v, np.generic):
            return {"numpy": v.dtype.str, "bytes": v.tobytes().hex()}
        if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return {t.__name__: str(v)}
        if isinstance(v, enum.Enum):
            return {"enum": self.class_ref(t), "name": v.name, "value": self.value(v.value)}
        if isinstance(v, nn.Module):  # the first one is the root, as in describe_module
            return self.module(v, f"#{len(self.modules)}" if self.modules else "")
        if isinstance(v, type):
            return self.class_ref(v)
        if isinstance(v, types.ModuleType):
            return {"module": v.__name__}
        if id(v) in self.active:
            return {"cycle": _type_name(t)}
        if self.depth > _MAX_DEPTH:
            return {"too_deep": _type_name(t)}
        self.active.add(id(v))
        self.depth += 1
        try:
            return self._compound(v)
        finally:
            self.active.discard(id(v))
            self.depth -= 1

    def _compound(self, v: Any) -> Any:
        t = type(v)
        if t in (complex, range, slice) or v is ... or v is NotImplemented:
            return {t.__name__: repr(v)}
        if t in (bytes, bytearray):
            return {t.__name__: _hash_bytes(v)}
        if isinstance(v, (int, float, complex, str, bytes)):  # a subclass of a number or a string
            return {"type": self.class_ref(t), "value": repr(v), **self.attributes(v)}
        if isinstance(v, (list, tuple, set, frozenset, dict)):
            return self.container(v)
        if isinstance(v, types.FunctionType):
            return self.function(v)
        if isinstance(v, functools.partial):
            return {"partial": self.value(v.func), "args": [self.value(a) for a in v.args],
                    "keywords": {k: self.value(x) for k, x in v.keywords.items()}}
        if isinstance(v, types.MethodType):
            return {"method": self.value(v.__func__), "self": self.value(v.__self__)}
        if isinstance(v, (staticmethod, classmethod)):
            return {t.__name__: self.value(v.__func__)}
        if isinstance(v, property):
            return {"property": [self.value(f) for f in (v.fget, v.fset, v.fdel)]}
        if isinstance(v, functools.cached_property):
            return {"cached_property": self.value(v.func)}
        if isinstance(v, (types.BuiltinFunctionType, types.MethodWrapperType, types.MethodDescriptorType,
                          types.WrapperDescriptorType, types.ClassMethodDescriptorType)):
            owner = getattr(v, "__self__", None)
            return _builtin_name(v) if _stateless(owner) else {"builtin": _builtin_name(v), "self": self.value(owner)}
        if isinstance(v, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return {"op": str(v)}
        if _is_library(t) and _is_library(v) and isinstance(getattr(v, "__qualname__", None), str):
            return _name(v)  # numpy's dispatchers (np.mean) and other library function objects
        wrapped = getattr(v, "__wrapped__", None) if callable(v) else None
        if wrapped is not None:  # functools.lru_cache and other wrapper objects
            return {"wrapper": self.class_ref(t), "wraps": self.value(wrapped)}
        return self.special(v) or self.object(v)

    def container(self, v: Any) -> Any:
        if isinstance(v, dict):
            if all(type(k) is str for k in v):
                desc: Any = {"dict": {k: self.value(x) for k, x in v.items()}}
            else:
                desc = {"dict_items": _sorted([self.value(k), self.value(x)] for k, x in v.items())}
        elif isinstance(v, (set, frozenset)):
            desc = {"set" if isinstance(v, set) else "frozenset": _sorted(self.value(x) for x in v)}
        else:
            items = [self.value(x) for x in v]
            desc = items if isinstance(v, list) else {"tuple": items}
        if type(v) not in (list, tuple, set, frozenset, dict, torch.Size):  # named tuples, OrderedDict, ...
            desc = {"type": self.class_ref(type(v)), "items": desc, **self.attributes(v)}
        return desc

    def special(self, v: Any) -> Any:
        """Random states, handles and references: what they hold, never their ids."""
        if isinstance(v, torch.Generator):
            return {"generator": str(v.device), "state": _tensor(v.get_state())}
        if isinstance(v, np.random.Generator):
            return {"numpy_generator": self.value(v.bit_generator.state)}
        if isinstance(v, np.random.RandomState):
            return {"random_state": self.value(v.get_state())}
        if isinstance(v, random.Random):
            return {"random": digest(self.value(v.getstate()))}
        if isinstance(v, torch.utils.hooks.RemovableHandle):
            return {"object": _name(type(v))}
        if isinstance(v, (weakref.ref, weakref.ProxyType, weakref.CallableProxyType)):
            return {"weakref": _name(type(v))}
        return None

    def object(self, v: Any) -> Any:
        """Any other object: its class (a user class by its code) and its attributes."""
        cls = type(v)
        attributes = self.attributes(v)
        if attributes or hasattr(v, "__dict__") or not _is_library(cls):
            return {"object": self.class_ref(cls), **attributes}
        return {"object": _name(cls), "repr": _ADDRESS.sub("", repr(v))}

    def attributes(self, v: Any) -> dict:
        """Instance attributes (from ``__dict__`` and ``__slots__``): all but dunders for user
        classes, the public ones for library classes."""
        library = _is_library(type(v))
        values = dict(getattr(v, "__dict__", {}))
        for cls in type(v).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if hasattr(v, slot):
                    values.setdefault(slot, getattr(v, slot))
        out = {k: self.value(x) for k, x in values.items()
               if not k.startswith("__") and not (library and k.startswith("_"))}
        return {"attributes": out} if out else {}

    # Functions and classes ------------------------------------------------------------------

    def function(self, fn: types.FunctionType) -> Any:
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:  # a decorator's wrapper (its __module__ is the wrapped one's)
            code = fn.__code__
            own = f"{os.path.basename(code.co_filename)}:{code.co_name}" if _library_code(code) \
                else _describe_code(code, fn.__globals__)
            return {"wrapper": own, "closure": self.closure(fn, skip=wrapped), "wraps": self.value(wrapped)}
        if _is_library(fn):
            return _name(fn)
        self.user_code = self.user_code or not _own_library(fn)
        return self._memo(fn, lambda: self._function(fn), {"function": fn.__qualname__, "cycle": True})

    def _function(self, fn: types.FunctionType) -> dict:
        desc: dict[str, Any] = {"function": fn.__qualname__,
                                "code": _describe_code(fn.__code__, fn.__globals__, fn.__doc__)}
        if fn.__defaults__:
            desc["defaults"] = [self.value(d) for d in fn.__defaults__]
        if fn.__kwdefaults__:
            desc["kwdefaults"] = {k: self.value(d) for k, d in fn.__kwdefaults__.items()}
        closure = self.closure(fn)
        if closure:
            desc["closure"] = closure
        names = self.globals(fn)
        if names:
            desc["globals"] = names
        return desc

    def closure(self, fn: types.FunctionType, skip: Any = None) -> dict:
        out = {}
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            if name == "__class__":  # the class of a method that calls super(): described with it
                continue
            try:
                contents = cell.cell_contents
            except ValueError:
                out[name] = {"empty_cell": True}
                continue
            if contents is not skip:
                out[name] = self.value(contents)
        return out

    def globals(self, fn: types.FunctionType) -> dict:
        """The globals that ``fn``'s code (with its nested code) loads, and for a user module
        among them or imported in the code, its attributes that the code names (``config.SCALE``)."""
        loaded, imported, every = _names(fn.__code__)
        names = sorted(n for n in every if not n.startswith("__"))
        scope, out = fn.__globals__, {}
        for name in sorted(n for n in loaded if n in scope and not n.startswith("__")):
            value = scope[name]
            out[name] = self.value(value)
            if isinstance(value, types.ModuleType):
                out.update(self.module_attributes(value, name, names, depth=2))
        for name in sorted(imported):  # ``import config`` inside the function
            if isinstance(sys.modules.get(name), types.ModuleType):
                out.update(self.module_attributes(sys.modules[name], f"import {name}", names, depth=2))
        return out

    def module_attributes(self, module: types.ModuleType, prefix: str, names: list[str], depth: int) -> dict:
        if _library_module(module.__name__) or depth == 0:
            return {}
        out = {}
        for name in names:
            if name not in vars(module) or name.startswith("__"):
                continue
            value = vars(module)[name]
            if isinstance(value, types.ModuleType):
                out.update(self.module_attributes(value, f"{prefix}.{name}", names, depth - 1))
            else:
                out[f"{prefix}.{name}"] = self.value(value)
        return out

    def class_ref(self, cls: type) -> Any:
        """A library class by name; a user class by a digest of its description."""
        if _is_library(cls):
            return _name(cls)
        if _is_protocol(cls):
            return f"serimats_func:{cls.__qualname__}"
        self.user_code = self.user_code or not _own_library(cls)
        return self._memo(cls, lambda: {"class": cls.__qualname__, "code": digest(self.klass(cls))},
                          {"class": cls.__qualname__, "cycle": True})

    def klass(self, cls: type) -> dict:
        desc: dict[str, Any] = {"class": cls.__qualname__,
                                "bases": [self.class_ref(b) for b in cls.__bases__ if b is not object]}
        generated = any(g in vars(cls) for g in _GENERATED)
        is_enum = isinstance(cls, enum.EnumMeta)
        members = {}
        for name, value in vars(cls).items():
            routine = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            dunder = name.startswith("__") and name.endswith("__")
            if name in _CLASS_SKIP or (dunder and not _user_routine(routine, generated)):
                continue
            sunder = name.startswith("_") and name.endswith("_") and not dunder
            if is_enum and (sunder or not isinstance(routine, (types.FunctionType, property))):
                continue  # enum machinery, which differs between Python versions; members below
            members[name] = self.value(value)
        desc["members"] = members
        if is_enum:
            desc["enum_members"] = {name: self.value(m.value) for name, m in cls.__members__.items()}
        fields = vars(cls).get("__dataclass_fields__")
        if fields:
            desc["fields"] = {name: [self.value(f.default) if f.default is not dataclasses.MISSING else "MISSING",
                                     self.value(f.default_factory) if f.default_factory is not dataclasses.MISSING else "MISSING",
                                     f.init] for name, f in fields.items()}
        return desc

    def _memo(self, obj: Any, describe: Any, cycle: Any) -> Any:
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        if key in self.defining:
            return cycle
        self.defining.add(key)
        self.alive.append(obj)
        try:
            self.memo[key] = describe()
        finally:
            self.defining.discard(key)
        return self.memo[key]

    # Modules ---------------------------------------------------------------------------------

    def module(self, m: nn.Module, path: str) -> dict:
        if id(m) in self.modules:
            return {"same_as": self.modules[id(m)]}
        self.modules[id(m)] = path
        self.alive.append(m)
        cls = type(m)
        torch_class = _is_library(cls)
        desc: dict[str, Any] = {"module": self.class_ref(cls)}
        attributes = {k: self.value(v) for k, v in vars(m).items()
                      if k not in _MODULE_INTERNALS and not k.startswith("__")
                      and not (torch_class and (k.startswith("_") or k == "inplace"))}
        if attributes:
            desc["attributes"] = attributes
        prefix = f"{path}." if path else ""
        if m._parameters:
            desc["parameters"] = [[n, self.parameter(p, prefix + n)] for n, p in m._parameters.items()]
        if m._buffers:
            desc["buffers"] = [[n, self.value(b)] for n, b in m._buffers.items()]
        if m._modules:
            desc["children"] = [[n, None if c is None else self.module(c, prefix + n)] for n, c in m._modules.items()]
        hooks = {kind: [self.value(h) for h in getattr(m, attr).values()]
                 for kind, attr in _HOOKS.items() if getattr(m, attr, None)}
        if hooks:
            desc["hooks"] = hooks
        return desc

    def parameter(self, p: torch.Tensor | None, path: str) -> Any:
        if p is None:
            return None
        if isinstance(p, nn.parameter.UninitializedTensorMixin):  # a lazy layer before its first call
            return {"uninitialized": True, "requires_grad": p.requires_grad}
        if id(p) in self.modules:  # tied weights
            return {"same_as": self.modules[id(p)]}
        self.modules[id(p)] = path
        self.alive.append(p)
        return {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "requires_grad": p.requires_grad}


def _library_code(code: types.CodeType) -> bool:
    """Code that lives in torch, NumPy or the standard library (a decorator's wrapper)."""
    path = os.path.abspath(code.co_filename)
    in_stdlib = path.startswith(_STDLIB) and "-packages" not in path
    return in_stdlib or any(path.startswith(root) for root in _LIBRARY_ROOTS)


def _user_routine(routine: Any, generated: bool) -> bool:
    """Whether a dunder class member is code to describe: a user function, unless generated by
    ``dataclass`` or ``namedtuple`` from the fields described next to it."""
    if not isinstance(routine, (types.FunctionType, property, functools.cached_property)):
        return False
    if isinstance(routine, types.FunctionType):
        if _is_library(routine):
            return False
        inner = inspect.unwrap(routine)  # dataclass's __repr__ is wrapped by reprlib's guard
        if generated and (not isinstance(inner, types.FunctionType)
                          or _code_digests(inner.__code__, inner.__globals__) is None):
            return False
    return True
