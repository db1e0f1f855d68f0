"""Random keys: every random stream comes from a key, never from global RNG state.

A key is a non-negative 63-bit integer derived by hashing the experiment seed, the name of the
stream and the learner's own coordinates. The same inputs give the same key on every machine,
so a learner's randomness does not depend on which other learners share its batch.

>>> derive_key(0, "init", 3) == derive_key(0, "init", 3)
True
>>> derive_key(0, "init", 3) != derive_key(0, "perturb", 3)
True
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF


def derive_key(*parts: object) -> int:
    """Hash ``parts`` (numbers, strings, tuples of them) into a 63-bit key."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``key``: a private stream that touches no global state."""
    g = torch.Generator(device=device)
    g.manual_seed(key)
    return g


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the `lowbias32` finalizer) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(key: torch.Tensor, counter: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Uniform numbers in [0, 1) as a pure function of (key, counter, position).

    Made of plain integer tensor ops, so it works under ``torch.func.vmap`` with a different key
    per learner, and gives the same numbers on any device and for any batch of learners.
    ``key`` and ``counter`` are int64 scalars (per learner under vmap); returns float32 of ``shape``.
    """
    n = 1
    for s in shape:
        n *= s
    index = torch.arange(n, dtype=torch.int64, device=key.device)  # (numel,)
    k_lo, k_hi = key & _MASK32, (key >> 32) & _MASK32
    c = counter & _MASK32
    x = _mix32(index ^ k_lo)
    x = _mix32(x ^ _mix32(c ^ k_hi))
    x = _mix32(x + 0x9E3779B9 & _MASK32)
    return ((x >> 8).to(torch.float32) * (1.0 / (1 << 24))).reshape(shape)
