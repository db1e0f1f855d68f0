"""Pytrees with a learner axis.

N learners are one pytree whose leaves have a leading axis of size N. These helpers are thin
wrappers over `optree`, the pytree library this package uses throughout.

>>> import torch
>>> trees = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
>>> stack(trees)["w"].shape
torch.Size([2, 2])
>>> index(stack(trees), 1)["w"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

PyTree = Any

# torch.func.vmap flattens with torch's own pytree registry: keep to dicts, lists, tuples and
# namedtuples, which both libraries know, and treat None as an empty subtree like torch does.
NONE_IS_LEAF = False


def tree_map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:
    return optree.tree_map(fn, tree, *rest, none_is_leaf=NONE_IS_LEAF)


def leaves(tree: PyTree) -> list:
    return optree.tree_leaves(tree, none_is_leaf=NONE_IS_LEAF)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack N pytrees of the same structure into one with a leading learner axis of size N."""
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def index(tree: PyTree, i: int | torch.Tensor | slice) -> PyTree:
    """Learner ``i`` (or the learners ``i`` selects) of a stacked pytree."""
    return tree_map(lambda x: x[i], tree)


def concat(trees: Sequence[PyTree]) -> PyTree:
    """Concatenate stacked pytrees along their learner axis."""
    return tree_map(lambda *xs: torch.cat(xs), *trees)


def to(tree: PyTree, device: torch.device | str) -> PyTree:
    return tree_map(lambda x: x.to(device), tree)


def nbytes(tree: PyTree) -> int:
    """Bytes held by the tensors of ``tree``."""
    return sum(x.numel() * x.element_size() for x in leaves(tree) if isinstance(x, torch.Tensor))
