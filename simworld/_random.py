"""Counter-based randomness: a value is a pure function of (seed, stream, keys...).

The world never keeps a generator's state: "how many plays did member 42 have on day 20412?" is
answered by hashing ``(seed, PLAYS_N, 42, 20412)``, the same in every process, on every platform,
and in any order of questions (no Python ``hash()``, whose strings are salted per process). The
mixer is splitmix64's finalizer, vectorized over numpy ``uint64`` arrays.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV_2_53 = 1.0 / float(1 << 53)
_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on ``uint64`` that scatters every input bit."""
    return _mix_inplace(np.array(x, dtype=np.uint64, ndmin=1))


def _mix_inplace(x: np.ndarray) -> np.ndarray:
    """:func:`mix` of a ``uint64`` array of at least one dimension, in place. Array arithmetic
    wraps modulo 2^64 without a warning (only numpy scalars warn), so no ``errstate``: its
    enter and exit cost more than the mixing of a small array."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


@lru_cache(maxsize=1024)
def _stream_start(seed: int, stream: int) -> int:
    """The mixed (seed, stream) a hash starts from: the same for every call of a stream, so
    it is computed once (a one-element mix costs as much as mixing a whole batch)."""
    start = np.array([(seed * 0x100000001B3 + stream) & _MASK64], np.uint64)
    return int(_mix_inplace(start)[0])


def hash64(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """A 64-bit hash of ``(seed, stream, *keys)``, broadcast over the key arrays.

    Keys are integers (negative ones are taken modulo 2^64). Each key is folded in with an
    xor and a multiply by an odd constant (a bijection in that key, so nearby keys never
    collide), and one full mix at the end scatters the bits.
    """
    h = np.array([_stream_start(seed, stream)], np.uint64)
    for k in keys:
        kk = np.asarray(k).astype(np.int64).view(np.uint64)
        h = h ^ kk  # broadcasts: a new array, at least one-dimensional
        h *= _M1
        h += _GOLDEN
    return _mix_inplace(h)


def uniform(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1), one per broadcast key."""
    h = hash64(seed, stream, *keys)
    h >>= _S11
    out: np.ndarray = h.astype(np.float64)
    out *= _INV_2_53
    return out


def uniform_streams(seed: int, streams: tuple[int, ...], *keys: np.ndarray | int) -> np.ndarray:
    """``uniform(seed, stream, *keys)`` for each stream at once: row ``i`` is stream
    ``streams[i]`` (the same values, with the fixed cost of one call instead of one a stream)."""
    h = np.array([[_stream_start(seed, st)] for st in streams], np.uint64)
    for k in keys:
        kk = np.asarray(k).astype(np.int64).view(np.uint64)
        h = h ^ kk
        h *= _M1
        h += _GOLDEN
    h = _mix_inplace(h)
    h >>= _S11
    out: np.ndarray = h.astype(np.float64)
    out *= _INV_2_53
    return out


def uniforms4(seed: int, stream: int, *keys: np.ndarray | int) -> tuple[np.ndarray, ...]:
    """Four uniforms in [0, 1) with 16-bit resolution from one hash (coarse draws: genre,
    popularity, watched share), a quarter of the hashing of four :func:`uniform` calls."""
    h = hash64(seed, stream, *keys)
    mask = np.uint64(0xFFFF)
    return tuple(((h >> np.uint64(16 * i)) & mask).astype(np.float64) / 65536.0 for i in range(4))


def cdf(weights: np.ndarray) -> np.ndarray:
    """The normalized cumulative weights :func:`pick` draws from."""
    out: np.ndarray = np.cumsum(weights, dtype=np.float64)
    out /= out[-1]
    return out


def pick(u: np.ndarray, cdf_: np.ndarray) -> np.ndarray:
    """Indices drawn by inverse CDF from uniforms ``u`` (``cdf_`` from :func:`cdf`)."""
    out: np.ndarray = np.minimum(np.searchsorted(cdf_, u, side="right"), len(cdf_) - 1)
    return out


def poisson(u: np.ndarray, lam: np.ndarray, *, k_max: int = 30) -> np.ndarray:
    """Poisson counts by inverse CDF from uniforms ``u`` (vectorized; capped at ``k_max``)."""
    lam = np.broadcast_to(np.asarray(lam, np.float64), u.shape)
    p = np.exp(-lam)
    cdf = p.copy()
    n = np.zeros(u.shape, np.int64)
    for k in range(1, k_max + 1):
        more = u > cdf
        if not more.any():
            break
        n += more
        p = p * lam / k
        cdf = cdf + p
    return n
