"""Coordinate labels: how an axis value is labelled in results, and which values a user may give to select it.

A label carries what the user gave: a string, number or ``None`` is itself; a class (``torch.optim.SGD``) its
name, ``"SGD"``; a tuple of strings the strings joined by ``+`` (``layers="1.weight"``, stored as the tuple
``("1.weight",)``, is ``"1.weight"``); any other tuple its repr, ``"(0.9, 0.999)"``. ``load_learner`` and the
Plotter's ``sel=`` take a label or the value it came from: ``layers=("1.weight", "3.weight")`` selects
``"1.weight+3.weight"``.

>>> label(("1.weight",)), label(("1.weight", "3.weight")), label([0.9, 0.999])
('1.weight', '1.weight+3.weight', '(0.9, 0.999)')
>>> selects("1.weight+3.weight", ["1.weight", "3.weight"]), selects("(0.9, 0.999)", (0.9, 0.999))
(True, True)
>>> selects(0.01, 0.01), selects(0.01, "0.01"), selects("1.weight", "3.weight")
(True, True, False)
"""

from __future__ import annotations

import numbers
from typing import Any


def label(value: Any) -> Any:
    """The coordinate label of an axis value."""
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (tuple, list)):
        if value and all(isinstance(v, str) for v in value):
            return "+".join(value)
        return str(tuple(value))
    return value


def selects(stored: Any, given: Any) -> bool:
    """Whether ``given`` (a value a user passes to select learners) names the label ``stored``: the label
    itself, its text, or the value it labels. Labels of stores written before labels carried the given value
    (``"('1.weight',)"``) are selected by that value too."""
    if isinstance(stored, numbers.Real) and isinstance(given, numbers.Real) and not isinstance(given, bool):
        return float(stored) == float(given)
    if stored == given or str(stored) == str(given):
        return True
    if isinstance(given, (tuple, list, type)):
        return stored == label(given) or (isinstance(given, list) and stored == str(tuple(given)))
    return isinstance(given, str) and stored == str((given,))
