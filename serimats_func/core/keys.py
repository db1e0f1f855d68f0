"""Random keys: every random stream comes from a key, never from global RNG state.

A key is a 63-bit integer derived by hashing the experiment seed, the name of the stream and the
learner's own coordinates. The same inputs give the same key on every machine, so a learner's
randomness does not depend on which other learners share its batch.

Two kinds of randomness come from a key:

- torch's own samplers (``torch.randn``, ``reset_parameters``) through ``generator(key)`` or
  ``seeded_cpu_rng(key)``, whose streams depend on all 63 bits of the key (``manual_seed`` on a
  CPU generator would keep only the low 32 bits, so keys 2**32 apart would share a stream);
- counter-based numbers for vmapped training steps: ``fold_in``, ``uniform`` and ``normal`` are
  pure integer tensor functions of a key tensor, with a different key per learner under ``vmap``.

>>> derive_key(0, "init", 3) == derive_key(0, "init", 3)
True
>>> derive_key(0, "init", 3) != derive_key(0, "perturb", 3)
True
>>> a, b = derive_key(0, "init", 27779), derive_key(0, "init", 51519)
>>> a % 2**32 == b % 2**32  # equal low 32 bits, yet different streams:
True
>>> torch.equal(torch.rand(3, generator=generator(a)), torch.rand(3, generator=generator(b)))
False
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
from collections.abc import Iterator, Sequence

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


_PLAIN = frozenset({int, float, str, bool})


def _canonical(part: object) -> object:
    """Numpy scalars as Python numbers (numpy 2 writes ``np.int64(3)`` in repr), inside tuples and
    lists too; built-in ints, floats, strings and tuples of them are returned unchanged."""
    if type(part) in _PLAIN:
        return part
    if type(part) in (tuple, list):
        return type(part)(_canonical(p) for p in part)
    if isinstance(part, numbers.Integral) and not isinstance(part, bool):
        return int(part)
    if isinstance(part, numbers.Real) and not isinstance(part, numbers.Integral):
        return float(part)
    return part


def derive_key(*parts: object) -> int:
    """Hash ``parts`` (ints, floats, strings, tuples of them) into a 63-bit key.

    Stable across processes, ``PYTHONHASHSEED`` and Python versions: it hashes ``repr(parts)``
    with blake2b, numpy scalars counting as the Python number they hold.

    >>> derive_key(0, "init", 3)
    1055480349689613476
    >>> derive_key(0, "init", np.int64(3)) == derive_key(0, "init", 3)
    True
    """
    for part in parts:
        if type(part) not in _PLAIN:
            parts = _canonical(parts)
            break
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.compiler.assume_constant_result  # a pure function of a constant string: torch.compile calls it while tracing
def string_key(name: str) -> int:
    """A stable 63-bit integer for a string (e.g. a parameter name), to ``fold_in`` to a key.

    >>> string_key("fc1.weight") == string_key("fc1.weight") != string_key("fc1.bias")
    True
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, person=b"string_key").digest()
    return int.from_bytes(digest, "little") >> 1


# -- torch generators -------------------------------------------------------------------------

# torch's CPUGeneratorImplState (ATen/CPUGeneratorImpl.cpp), native byte order, unchanged from
# torch 1.x to 2.x: legacy_pod { uint64 the_initial_seed; int left; int seeded; uint64 next;
# uint64 state[624]; double normal_x, normal_y, normal_rho; int normal_is_valid; (4 bytes pad) }
# then float next_float_normal_sample; bool is_next_float_normal_sample_valid; (3 bytes pad).
_STATE_BYTES = 5056
_SEED, _LEFT, _SEEDED, _NEXT, _WORDS = slice(0, 8), slice(8, 12), slice(12, 16), slice(16, 24), slice(24, 5016)
_NORMAL_CACHE = slice(5016, 5048)  # normal_x, normal_y (the cached double sample), normal_rho, normal_is_valid
_FLOAT_CACHE = slice(5048, 5056)  # next_float_normal_sample and its valid flag
_MT_N = 624

_GOLDEN64 = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijection of uint64 (arrays only: numpy scalars warn on wrap)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mt_state_words(keys: np.ndarray) -> np.ndarray:
    """The mt19937 state (624 words < 2**32) that ``generator`` installs for each key.

    Word 0 is 0x80000000: mt19937 reads only its top bit (as in the reference ``init_by_array``,
    this keeps the state away from all zeros). Words 1 to 623 are the 32-bit halves (low, high)
    of the splitmix64 stream of the key, ``splitmix64(key + j * golden)`` for j = 1, 2, ...; so
    words 1 and 2 together are a bijection of the 64-bit key, and different keys give different
    states and hence different streams (the mt19937 transition is invertible).

    ``keys`` is a uint64 array of shape (K,); returns uint64 of shape (K, 624).

    >>> words = mt_state_words(np.array([5], dtype=np.uint64))
    >>> words.shape, hex(words[0, 0]), bool(words.max() < 2**32)
    ((1, 624), '0x80000000', True)
    """
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)  # (K,)
    j = np.arange(1, _MT_N // 2 + 1, dtype=np.uint64)  # (312,)
    out = _splitmix64(keys[:, None] + j * _GOLDEN64)  # (K, 312)
    halves = np.stack([out & np.uint64(_MASK32), out >> np.uint64(32)], axis=-1).reshape(len(keys), _MT_N)  # (K, 624)
    top = np.full((len(keys), 1), 0x80000000, dtype=np.uint64)
    return np.concatenate([top, halves[:, : _MT_N - 1]], axis=1)  # (K, 624)


def _as_uint64(key: int) -> int:
    if not -(2**63) <= key < 2**64:
        raise ValueError(f"a key must fit in 64 bits, got {key}")
    return key & _MASK64


def _check_layout(raw: np.ndarray, seed: int) -> None:
    """Check that a state just seeded with ``manual_seed(seed)`` has the layout this module writes."""
    problem = None
    if raw.size != _STATE_BYTES:
        problem = f"its size is {raw.size} bytes, not {_STATE_BYTES}"
    else:
        header = tuple(int(raw[where].view(dtype)[0]) for where, dtype in
                       ((_SEED, np.uint64), (_LEFT, np.int32), (_SEEDED, np.int32), (_NEXT, np.uint64)))
        w0, w1 = (int(w) for w in raw[_WORDS].view(np.uint64)[:2])
        expected_w1 = (1812433253 * (w0 ^ (w0 >> 30)) + 1) & _MASK32  # mt19937's init_genrand
        if header != (seed, 1, 1, 0):
            problem = "its header (initial seed, left, seeded, next) is not where expected"
        elif (w0, w1) != (seed & _MASK32, expected_w1):
            problem = "its mt19937 state words are not where expected"
    if problem:
        raise RuntimeError(
            f"torch {torch.__version__}: the CPU generator state does not have the layout that "
            f"serimats_func.core.keys expects ({problem}), so keyed generators cannot be built. "
            "Please report this with your torch version."
        )


def _cpu_state(key: int) -> torch.Tensor:
    """A CPU generator state (uint8, (5056,)) whose mt19937 words come from all 64 bits of ``key``."""
    seed = _as_uint64(key)
    g = torch.Generator()
    g.manual_seed(seed)  # keeps the full key as initial_seed(), but seeds mt19937 with its low 32 bits
    state = g.get_state()  # (5056,) uint8, a fresh copy
    raw = state.numpy()
    _check_layout(raw, seed)
    raw[_WORDS].view(np.uint64)[:] = mt_state_words(np.array([seed], dtype=np.uint64))[0]
    raw[_LEFT].view(np.int32)[0] = 1  # the next draw regenerates the state from these words
    raw[_NEXT].view(np.uint64)[0] = 0
    raw[_NORMAL_CACHE] = 0  # no cached normal samples
    raw[_FLOAT_CACHE] = 0
    return state


def generator(key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A private ``torch.Generator`` whose whole stream depends on all 64 bits of ``key``.

    On CPU the mt19937 state is built from the key (see ``mt_state_words``) and installed with
    ``set_state``; other devices (CUDA's Philox) are seeded with the whole key by ``manual_seed``.

    >>> torch.equal(torch.randn(4, generator=generator(7)), torch.randn(4, generator=generator(7)))
    True
    >>> torch.equal(torch.rand(4, generator=generator(7)), torch.rand(4, generator=generator(7 + 2**32)))
    False
    """
    device = torch.device(device)
    g = torch.Generator(device=device)
    if device.type == "cpu":
        g.set_state(_cpu_state(key))
    else:
        g.manual_seed(_as_uint64(key))
    return g


@contextlib.contextmanager
def seeded_cpu_rng(key: int) -> Iterator[None]:
    """Draw from ``key`` through torch's global CPU generator inside the block, so that code which
    uses the global RNG (modules' ``reset_parameters()``) draws from the key; the global state is
    restored exactly afterwards. CUDA generators are not touched.

    >>> before = torch.get_rng_state()
    >>> with seeded_cpu_rng(3):
    ...     a = torch.rand(2)
    >>> with seeded_cpu_rng(3):
    ...     b = torch.rand(2)
    >>> torch.equal(a, b), torch.equal(torch.get_rng_state(), before)
    (True, True)
    """
    state = _cpu_state(key)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.set_state(state)
        yield


# -- counter-based randomness -------------------------------------------------------------------
#
# Pure int64 tensor ops on values < 2**32, so they run under vmap and torch.compile and give the
# same bits on any device. No intermediate overflows int64: the multipliers below are < 2**31 in
# absolute value (0x846CA68B is used as 0x846CA68B - 2**32, equal modulo 2**32), so products of a
# value < 2**32 stay below 2**63, and the mask keeps the low 32 bits (two's complement for < 0).

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - 2**32
_FOLD_SALT, _UNIFORM_SALT, _NORMAL_SALT = 0x243F6A88, 0x85A308D3, 0x13198A2E  # digits of pi


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The ``lowbias32`` hash, a bijection of 32-bit values, on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def _as_key(key: torch.Tensor | int) -> torch.Tensor:
    if isinstance(key, int):
        u = _as_uint64(key)
        return torch.tensor(u - 2**64 if u >= 2**63 else u, dtype=torch.int64)
    if key.dtype != torch.int64:
        raise TypeError(f"a key tensor must be int64, got {key.dtype}")
    return key


def _halves(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) 32-bit halves of an int64 key, each as int64 values < 2**32."""
    return key & _MASK32, (key >> 32) & _MASK32


def _subkeys(key: torch.Tensor, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit words; (a, b) is a bijection of the 64-bit key for each salt."""
    lo, hi = _halves(key)
    a = _mix32(lo ^ salt)
    return a, _mix32(hi ^ a)


def fold_in(key: torch.Tensor | int, data: torch.Tensor | int) -> torch.Tensor:
    """A new int64 key from ``key`` and ``data`` (an int, or an integer tensor such as a step count),
    as ``jax.random.fold_in``. Shapes broadcast; works under ``vmap`` for key and data.

    For a fixed key, different data (modulo 2**64) give different keys, and for fixed data,
    different keys give different keys: all 64 bits of both are used. The new key may be negative.

    >>> k = torch.tensor(derive_key(0, "dropout", 1))
    >>> int(fold_in(k, 1)) != int(fold_in(k, 2)) != int(fold_in(k + 2**32, 2))
    True
    >>> torch.equal(fold_in(k, torch.arange(3)), torch.stack([fold_in(k, i) for i in range(3)]))
    True
    """
    key = _as_key(key)
    if isinstance(data, int):
        if not -(2**63) <= data < 2**64:
            raise ValueError(f"data must fit in 64 bits, got {data}")
        d_lo, d_hi = data & _MASK32, (data >> 32) & _MASK32
    else:
        if data.dtype.is_floating_point or data.dtype.is_complex:
            raise TypeError(f"data must be an integer tensor, got {data.dtype}")
        d_lo, d_hi = _halves(data.to(torch.int64))
    a, b = _subkeys(key, _FOLD_SALT)  # a bijection of the key
    a = _mix32(a ^ d_lo)  # each step is a bijection of the data given the previous words
    b = _mix32(b ^ d_hi ^ a)
    a = _mix32(a ^ b)
    hi_signed = b - ((b >> 31) << 32)  # in [-2**31, 2**31)
    return hi_signed * 2**32 + a  # (b << 32) | a as an int64, without overflow


def _words(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` pseudo-random 32-bit words (int64, (n,)) at positions 0..n-1 of the stream (a, b)."""
    if n > 2**32:
        raise ValueError(f"at most 2**32 random words per draw, asked for {n}; split the draw with fold_in")
    position = torch.arange(n, dtype=torch.int64, device=a.device)  # (n,)
    return _mix32(_mix32(position ^ a) ^ b)


def _unit(a: torch.Tensor, b: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` uniform numbers in [0, 1), multiples of 2**-bits with bits the precision of ``dtype``."""
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point type, got {dtype}")
    bits = round(-math.log2(torch.finfo(dtype).eps)) + 1  # significand bits: 24 for float32, 53 for float64
    if bits <= 24:
        w = _words(a, b, n)  # (n,)
        return ((w >> (32 - bits)).to(torch.float32) * 2.0**-bits).to(dtype)  # exact
    if bits <= 53:
        w = _words(a, b, 2 * n).reshape(n, 2)  # (n, 2)
        v = (w[:, 0] >> 5) * 2**26 + (w[:, 1] >> 6)  # 27 + 26 = 53 bits, < 2**53: exact in float64
        return (v.to(torch.float64) * 2.0**-53).to(dtype)
    raise TypeError(f"dtype {dtype} has more precision than this generator provides")


def _numel(shape: int | Sequence[int]) -> tuple[tuple[int, ...], int]:
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    return shape, math.prod(shape)


def uniform(key: torch.Tensor | int, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``shape``, a pure function of the key: the same bits on any
    device and for any batch of learners under ``vmap`` (one int64 key per learner).

    float32 values are multiples of 2**-24, float64 values multiples of 2**-53. Draws with
    different shapes from one key overlap (the first elements agree): fold in a name or a step
    to get independent draws.

    >>> k = torch.tensor(derive_key(0, "noise", 1))
    >>> u = uniform(k, (2, 3))
    >>> u.shape, u.dtype, bool((u >= 0).all() and (u < 1).all())
    (torch.Size([2, 3]), torch.float32, True)
    >>> keys = torch.stack([k, fold_in(k, 1)])  # (N,)
    >>> torch.equal(torch.func.vmap(lambda k: uniform(k, (2, 3)))(keys)[0], u)
    True
    """
    shape, n = _numel(shape)
    a, b = _subkeys(_as_key(key), _UNIFORM_SALT)
    return _unit(a, b, n, dtype).reshape(shape)


def normal(key: torch.Tensor | int, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal numbers of ``shape`` from the key (Box-Muller on two uniforms of ``dtype``'s
    precision, both the cosine and the sine branch used), independent of ``uniform(key, ...)``.
    Works under ``vmap``; the bits match across devices up to the rounding of log, cos and sin.
    In float32 the tails stop at about 5.8 standard deviations (the smallest uniform is 2**-24).

    >>> x = normal(torch.tensor(derive_key(0, "noise", 1)), (10000,), torch.float64)
    >>> abs(float(x.mean())) < 0.05, abs(float(x.std()) - 1) < 0.05
    (True, True)
    """
    shape, n = _numel(shape)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = _subkeys(_as_key(key), _NORMAL_SALT)
    m = (n + 1) // 2
    u = _unit(a, b, 2 * m, compute)  # (2m,)
    radius = torch.sqrt(-2.0 * torch.log(1.0 - u[:m]))  # 1 - u in (0, 1]: no log(0)  # (m,)
    angle = (2.0 * math.pi) * u[m:]  # (m,)
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]  # (n,)
    return z.reshape(shape).to(dtype)


def counter_uniform(key: torch.Tensor, counter: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``uniform(fold_in(key, counter), shape)``: float32 numbers in [0, 1) as a pure function of
    (key, counter, position), e.g. a dropout layer's key and its call count.

    >>> k, c = torch.tensor(5), torch.tensor(2)
    >>> torch.equal(counter_uniform(k, c, (3,)), uniform(fold_in(k, c), (3,)))
    True
    """
    return uniform(fold_in(key, counter), shape)
