"""Random keys: derived keys never share a random stream, and counter-based draws are pure
functions of their key, the same under vmap as one key at a time."""

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from serimats_func.core.dropout import KeyedDropout
from serimats_func.core.keys import (
    _check_layout,
    counter_uniform,
    derive_key,
    fold_in,
    generator,
    mt_state_words,
    normal,
    seeded_cpu_rng,
    string_key,
    uniform,
)

MASK32 = np.uint64(0xFFFFFFFF)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """Reference splitmix64 output function (Steele, Lea and Flood), on uint64 arrays."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def state_word(keys: np.ndarray, i: int) -> np.ndarray:
    """Word i >= 1 of the mt19937 state that ``generator`` installs: the (i-1)-th 32-bit half
    (low first) of the key's splitmix64 stream. (K,) uint64 -> (K,) uint64."""
    out = splitmix64(keys + np.array([(i - 1) // 2 + 1], dtype=np.uint64) * GOLDEN)  # arrays wrap silently
    return out & MASK32 if (i - 1) % 2 == 0 else out >> np.uint64(32)


def twisted(w_i: np.ndarray, w_next: np.ndarray, w_m: np.ndarray) -> np.ndarray:
    """One mt19937 state update: new word i from words i, i+1 and i+397."""
    y = (w_i & np.uint64(0x80000000)) | (w_next & np.uint64(0x7FFFFFFF))
    return w_m ^ (y >> np.uint64(1)) ^ np.where(w_next & np.uint64(1), np.uint64(0x9908B0DF), np.uint64(0))


def first_twisted_words(keys: np.ndarray) -> np.ndarray:
    """Words 0 and 1 after the first mt19937 twist, i.e. the first 64 random bits before the
    (bijective) tempering. (K,) uint64 -> (K, 2) uint64."""
    w0 = np.full_like(keys, 0x80000000)
    w1, w2 = state_word(keys, 1), state_word(keys, 2)
    return np.stack([twisted(w0, w1, state_word(keys, 397)), twisted(w1, w2, state_word(keys, 398))], axis=1)


def from_state(state: torch.Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(state)
    return g


def all_distinct(a: np.ndarray) -> bool:
    s = np.sort(a)  # faster than np.unique
    return bool((s[1:] != s[:-1]).all())


def state_words(g: torch.Generator) -> np.ndarray:
    """The 624 mt19937 words of a CPU generator's state (uint64, (624,))."""
    return g.get_state().numpy()[24:5016].view(np.uint64).copy()


def test_a_million_derived_keys_and_their_generator_streams_are_all_distinct():
    keys = [derive_key(0, "init", s) for s in range(10**6)]
    keys += [derive_key(0, name, s) for name in ("perturb", "data") for s in range(10**5)]
    keys += [derive_key(0, "dropout", s, d) for s in range(300) for d in range(300)]
    k = np.array(keys, dtype=np.uint64)  # (K,)
    assert len(k) == 1_290_000 and all_distinct(k) and k.max() < 2**63
    # mt19937 ignores the low 31 bits of word 0: words 1 and 2 carry the key's first 64 bits
    first_state_bits = state_word(k, 1) | (state_word(k, 2) << np.uint64(32))
    assert all_distinct(first_state_bits)
    first_random_bits = first_twisted_words(k)  # (K, 2)
    assert all_distinct(first_random_bits[:, 0] | (first_random_bits[:, 1] << np.uint64(32)))
    # the vectorized words are those of the real generators (a sample of 2000)
    sample = k[:: len(k) // 2000]
    np.testing.assert_array_equal(mt_state_words(sample)[:, [1, 2, 397, 398]],
                                  np.stack([state_word(sample, i) for i in (1, 2, 397, 398)], axis=1))
    for key, bits in zip(sample, first_twisted_words(sample), strict=True):
        g = generator(int(key))
        words = state_words(g)
        assert words[0] == 0x80000000 and all(words[i] == state_word(key[None], i)[0] for i in (1, 2, 300, 623))
        torch.rand(1, generator=g)  # the first draw twists the whole state
        np.testing.assert_array_equal(state_words(g)[:2], bits)


def test_keys_with_equal_low_32_bits_now_give_different_streams():
    a, b = derive_key(0, "init", 27779), derive_key(0, "init", 51519)
    assert a != b and a & 0xFFFFFFFF == b & 0xFFFFFFFF
    old_a, old_b = torch.Generator().manual_seed(a), torch.Generator().manual_seed(b)  # the old way
    assert torch.equal(torch.rand(100, generator=old_a), torch.rand(100, generator=old_b))
    assert not torch.equal(torch.rand(100, generator=generator(a)), torch.rand(100, generator=generator(b)))
    for high_bit in (32, 40, 62):  # keys that differ only above bit 32
        x, y = torch.rand(1000, generator=generator(5)), torch.rand(1000, generator=generator(5 + 2**high_bit))
        assert (x != y).all()
    assert torch.equal(torch.randn(100, generator=generator(a)), torch.randn(100, generator=generator(a)))
    assert generator(a).initial_seed() == a


def test_the_cpu_generator_state_layout_is_the_one_the_module_writes():
    g = torch.Generator().manual_seed(0x123456789ABC)
    raw = g.get_state().numpy()
    assert raw.size == 5056
    assert raw[0:8].view(np.uint64)[0] == 0x123456789ABC  # the_initial_seed keeps all 64 bits
    assert tuple(raw[8:16].view(np.int32)) == (1, 1)  # left, seeded
    _check_layout(raw, 0x123456789ABC)
    with pytest.raises(RuntimeError, match="layout"):
        _check_layout(raw[:5048], 0x123456789ABC)
    with pytest.raises(RuntimeError, match="layout"):
        _check_layout(np.roll(raw, 8), 0x123456789ABC)
    words = raw[24:5016].view(np.uint64)
    assert words[0] == 0x56789ABC and words[1] == (1812433253 * (0x56789ABC ^ (0x56789ABC >> 30)) + 1) & 0xFFFFFFFF

    def stream(change) -> torch.Tensor:
        state = g.get_state()
        change(state.numpy()[24:5016].view(np.uint64))
        return torch.rand(1000, generator=from_state(state))

    reference = stream(lambda w: None)
    assert torch.equal(stream(lambda w: w.__setitem__(0, w[0] ^ 0x7FFFFFFF)), reference)  # unread bits
    assert not torch.equal(stream(lambda w: w.__setitem__(0, w[0] ^ 0x80000000)), reference)
    assert not torch.equal(stream(lambda w: w.__setitem__(1, w[1] ^ 1)), reference)
    # a cached normal sample lives at normal_y (5024) with its flag (5040); the key's state clears it
    state = g.get_state()
    state.numpy()[5024:5032].view(np.float64)[0] = 42.0
    state.numpy()[5040:5044].view(np.int32)[0] = 1
    assert torch.randn(1, dtype=torch.float64, generator=from_state(state)).item() == 42.0
    state.numpy()[5048:5052].view(np.float32)[0] = 7.0  # next_float_normal_sample and its flag
    state.numpy()[5052] = 1
    assert torch.equal(from_state(state).get_state()[5016:], state[5016:])  # fields, not padding
    assert not generator(9).get_state()[5016:].any()
    torch.manual_seed(0)
    torch.randn(1, dtype=torch.float64)  # leaves a cached sample in the global generator
    with seeded_cpu_rng(9):
        inside = torch.randn(3, dtype=torch.float64)
    assert torch.equal(inside, torch.randn(3, dtype=torch.float64, generator=generator(9)))


def test_seeded_cpu_rng_draws_reset_parameters_from_the_key_and_restores_the_global_rng():
    a, b = derive_key(0, "init", 27779), derive_key(0, "init", 51519)  # equal low 32 bits
    layer = nn.Linear(20, 10)
    before = torch.get_rng_state()

    def init(key: int) -> torch.Tensor:
        with seeded_cpu_rng(key), torch.no_grad():
            layer.reset_parameters()
        return layer.weight.detach().clone()

    wa, wb = init(a), init(b)
    assert torch.equal(wa, init(a)) and not torch.isclose(wa, wb).any()
    assert wa.abs().max() <= 1 / 20**0.5
    assert torch.equal(torch.get_rng_state(), before)
    with seeded_cpu_rng(a):
        x = torch.rand(5)
    assert torch.equal(x, torch.rand(5, generator=generator(a)))
    assert torch.equal(torch.get_rng_state(), before)


def test_derive_key_and_string_key_are_stable():
    assert derive_key(0, "init", 3) == 1055480349689613476  # values from before this module's rewrite
    assert derive_key(1, "x", 2.5, ("a", 3)) == 5203508683953788406
    assert derive_key(1, "x", np.float64(2.5), ("a", np.int32(3))) == 5203508683953788406
    assert string_key("fc1.weight") == 2943271239078364892
    assert 0 <= string_key("") < 2**63 and string_key("a") != string_key("b")


def ks_distance(x: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``x`` and ``cdf``."""
    x = x.double().sort().values  # (n,)
    n = len(x)
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    erf = np.vectorize(math.erf)
    return torch.from_numpy(0.5 * (1 + erf(x.numpy() / math.sqrt(2))))


N = 100_000
KS_CRITICAL = 1.95 / math.sqrt(N)  # exceeded with probability 0.001 by a true sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_is_uniform_on_0_1(dtype):
    u = uniform(torch.tensor(derive_key(0, "test", 1)), (N,), dtype)
    assert u.dtype == dtype and u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.003 and abs(float(u.var()) - 1 / 12) < 0.002
    assert ks_distance(u, lambda x: x) < KS_CRITICAL
    assert len(u.unique()) > 0.99 * N


def test_uniform_float64_has_53_bits_and_float32_24_bits():
    key = torch.tensor(derive_key(0, "test", 2))
    u32, u64 = uniform(key, (1000,)), uniform(key, (1000,), torch.float64)
    assert torch.equal(u32 * 2**24, (u32 * 2**24).floor())
    assert not torch.equal(u64 * 2**24, (u64 * 2**24).floor())  # finer than float32's grid
    assert torch.equal(u64 * 2**53, (u64 * 2**53).floor())
    assert (u64 * 2**52 % 1 != 0).float().mean() > 0.4  # the 53rd bit is used
    for low in (torch.float16, torch.bfloat16):
        u = uniform(key, (10000,), low)
        assert u.dtype == low and u.min() >= 0 and u.max() < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_is_standard_normal(dtype):
    z = normal(torch.tensor(derive_key(0, "test", 3)), (N,), dtype).double()
    assert z.isfinite().all()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**3).mean())) < 0.03 and abs(float((z**4).mean()) - 3) < 0.06
    assert ks_distance(z, normal_cdf) < KS_CRITICAL


def test_draws_from_related_keys_are_uncorrelated():
    def corr(x, y):
        return float(torch.corrcoef(torch.stack([x.double().flatten(), y.double().flatten()]))[0, 1])

    k = torch.tensor(0)  # small raw keys, one bit apart: no help from a hash before
    limit = 4 / math.sqrt(N)
    assert abs(corr(uniform(k, N), uniform(k + 1, N))) < limit
    assert abs(corr(uniform(k, N), uniform(k + 2**32, N))) < limit
    assert abs(corr(uniform(k, N), normal(k, N))) < limit
    assert abs(corr(uniform(k, N)[:-1], uniform(k, N)[1:])) < limit  # neighbours
    assert abs(corr(uniform(fold_in(k, 1), N), uniform(fold_in(k, 2), N))) < limit
    assert (uniform(k, N) != uniform(k + 1, N)).float().mean() > 0.99


def test_vmapped_uniform_and_normal_equal_the_per_key_draws_bitwise():
    base = torch.tensor(derive_key(0, "init", 27779))
    keys = torch.stack([base, torch.tensor(derive_key(0, "init", 51519)), base + 2**40,
                        torch.tensor(-(2**62) - 3), torch.tensor(0)])  # (N,), three with equal low halves
    for draw in (uniform, normal):
        for dtype in (torch.float32, torch.float64):
            for shape in ((7,), (3, 5), ()):
                batched = torch.func.vmap(partial(draw, shape=shape, dtype=dtype))(keys)  # (N, *shape)
                single = torch.stack([draw(k, shape, dtype) for k in keys])  # (N, *shape)
                assert batched.shape == (len(keys), *shape) and torch.equal(batched, single)
    assert len({uniform(k, (4,)).sum().item() for k in keys}) == len(keys)
    assert torch.equal(uniform(int(keys[0]), 5), uniform(keys[0], 5))


def test_fold_in_gives_a_different_key_for_every_data_and_every_key():
    key = torch.tensor(derive_key(0, "dropout", 1))
    steps = torch.arange(100_000)  # (S,)
    assert len(fold_in(key, steps).unique()) == 100_000
    assert len(fold_in(key + steps * 2**32, 0).unique()) == 100_000  # keys differing above bit 32
    assert len(fold_in(key, steps * 2**32).unique()) == 100_000  # data differing above bit 32
    assert len(fold_in(steps, steps).unique()) == 100_000
    assert int(fold_in(key, 3)) != int(fold_in(key ^ 3, 0))  # key and data are not interchangeable
    assert int(fold_in(key, 5)) == int(fold_in(key, torch.tensor(5))) == int(fold_in(int(key), 5))
    assert int(fold_in(key, -1)) == int(fold_in(key, 2**64 - 1)) == int(fold_in(key, torch.tensor(-1)))
    assert int(fold_in(key, torch.tensor(7, dtype=torch.int32))) == int(fold_in(key, 7))
    assert fold_in(key, steps).dtype == torch.int64 and (fold_in(key, steps) < 0).any()
    with pytest.raises(TypeError):
        fold_in(key, torch.tensor(1.0))


def test_fold_in_under_vmap_with_batched_keys_and_data_equals_the_loop():
    keys = torch.tensor([derive_key(0, "dropout", i) for i in range(4)])  # (N,)
    steps = torch.tensor([0, 1, 10**12, -5])  # (N,)
    expected = torch.stack([fold_in(k, s) for k, s in zip(keys, steps, strict=True)])
    assert torch.equal(torch.func.vmap(fold_in)(keys, steps), expected)
    assert torch.equal(torch.func.vmap(lambda k: fold_in(k, 3))(keys), torch.stack([fold_in(k, 3) for k in keys]))
    draws = torch.func.vmap(lambda k, s: uniform(fold_in(fold_in(k, string_key("w")), s), (6,)))(keys, steps)
    assert torch.equal(draws[2], uniform(fold_in(fold_in(keys[2], string_key("w")), 10**12), (6,)))
    assert torch.equal(torch.func.vmap(lambda k, s: counter_uniform(k, s, (6,)))(keys, steps)[1],
                       uniform(fold_in(keys[1], steps[1]), (6,)))


def test_keyed_dropout_masks_depend_on_the_key_and_call_count_only():
    x = torch.ones(64, 32)
    a, b = derive_key(0, "dropout", 27779), derive_key(0, "dropout", 51519)

    def mask(key: int, calls: int) -> torch.Tensor:
        d = KeyedDropout(0.25, key=key)
        d.calls.fill_(calls)
        return d(x) != 0

    assert torch.equal(mask(a, 3), mask(a, 3))
    assert not torch.equal(mask(a, 3), mask(a, 4)) and not torch.equal(mask(a, 3), mask(a + 2**32, 3))
    assert abs(float(mask(a, 0).float().mean()) - 0.75) < 0.03
    d = KeyedDropout(0.25)
    keys, calls = torch.tensor([a, b]), torch.tensor([3, 7])

    def one(key, call):
        return torch.func.functional_call(d, {"key": key, "calls": call.clone()}, (x,)) != 0

    assert torch.equal(torch.func.vmap(one)(keys, calls), torch.stack([mask(a, 3), mask(b, 7)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draws_are_the_same_on_cuda(dtype):
    keys = torch.tensor([derive_key(0, "init", i) for i in range(3)])  # (N,)
    draw_uniform = torch.func.vmap(partial(uniform, shape=(1000,), dtype=dtype))
    assert torch.equal(draw_uniform(keys.cuda()).cpu(), draw_uniform(keys))
    draw_normal = torch.func.vmap(partial(normal, shape=(1000,), dtype=dtype))
    torch.testing.assert_close(draw_normal(keys.cuda()).cpu(), draw_normal(keys))
    assert torch.equal(fold_in(keys.cuda(), 5).cpu(), fold_in(keys, 5))
    g = generator(derive_key(0, "init", 1), "cuda")
    assert g.initial_seed() == derive_key(0, "init", 1)
