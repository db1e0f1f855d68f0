"""Descriptions of code (modules, losses, metric functions) that name an experiment's setup.

Learner ids hash these descriptions, so two setups that compute different things must describe
differently, and the same code must describe the same in every process. A module is described by
its classes, their simple attributes (``p`` of a dropout, ``label_smoothing`` of a loss) and the
byte code of user-defined ``forward`` methods; a function by its name, byte code, constants,
defaults and closure values; torch's own functions and classes by their names. Line numbers and
memory addresses are left out.

>>> import torch
>>> describe_callable(torch.nn.CrossEntropyLoss()) == describe_callable(torch.nn.CrossEntropyLoss(label_smoothing=0.3))
False
>>> describe_callable(lambda a, b: a + b) == describe_callable(lambda a, b: a * b)
False
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import types
from typing import Any

from torch import nn

_SIMPLE = (bool, int, float, str, type(None))


def _simple(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _from_torch(fn: Any) -> bool:
    """torch's own functions are named, not hashed: a torch upgrade must not rename every learner."""
    return (getattr(fn, "__module__", None) or "").split(".")[0] == "torch"


def _code_hash(code: types.CodeType) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        h.update(_code_hash(const).encode() if isinstance(const, types.CodeType) else repr(const).encode())
    return h.hexdigest()


def _attributes(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and k != "training" and _simple(v)}


def describe_module(module: nn.Module) -> list:
    """Every submodule: name, class, simple attributes and, for classes outside torch, the byte
    code of ``forward``."""
    out = []
    for name, m in module.named_modules():
        entry = [name, _qualname(type(m)), _attributes(m)]
        forward = type(m).forward
        if not _from_torch(forward):
            entry.append(_code_hash(forward.__code__))
        out.append(entry)
    return out


def describe_callable(fn: Any) -> Any:
    """A JSON-able description of a loss or metric function."""
    if isinstance(fn, nn.Module):
        return describe_module(fn)
    if isinstance(fn, functools.partial):
        return {"partial": describe_callable(fn.func), "args": repr(fn.args), "keywords": repr(sorted(fn.keywords.items()))}
    if isinstance(fn, types.MethodType):
        return {"method": describe_callable(fn.__func__), "of": _qualname(type(fn.__self__)),
                "attributes": repr(_attributes(fn.__self__))}
    if isinstance(fn, types.FunctionType) and _from_torch(fn):
        return {"function": _qualname(fn), "defaults": repr(fn.__defaults__)}
    if isinstance(fn, types.FunctionType):
        closure = [c.cell_contents for c in fn.__closure__ or ()]
        return {
            "function": _qualname(fn),
            "code": _code_hash(fn.__code__),
            "defaults": repr(fn.__defaults__),
            "closure": [describe_callable(c) if callable(c) else repr(c) for c in closure],
        }
    if inspect.isbuiltin(fn) or isinstance(fn, type):
        return _qualname(fn)
    return {"callable": _qualname(type(fn)), "attributes": repr(_attributes(fn))}
