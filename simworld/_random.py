"""Counter-based randomness: a value is a pure function of (seed, stream, keys...).

The world never keeps a generator's state: "how many plays did member 42 have on day 20412?" is
answered by hashing ``(seed, PLAYS_N, 42, 20412)``, the same in every process, on every platform,
and in any order of questions (no Python ``hash()``, whose strings are salted per process). The
mixer is splitmix64's finalizer, vectorized over numpy ``uint64`` arrays.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / float(1 << 53)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on ``uint64`` that scatters every input bit."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        out: np.ndarray = x ^ (x >> np.uint64(31))
        return out


def hash64(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """A 64-bit hash of ``(seed, stream, *keys)``, broadcast over the key arrays.

    Keys are integers (negative ones are taken modulo 2^64). Each key is folded in with an
    xor and a multiply by an odd constant (a bijection in that key, so nearby keys never
    collide), and one full mix at the end scatters the bits.
    """
    with np.errstate(over="ignore"):
        h = mix(np.asarray([(seed * 0x100000001B3 + stream) & 0xFFFFFFFFFFFFFFFF], np.uint64))
        for k in keys:
            kk = np.asarray(k).astype(np.int64).view(np.uint64)
            h = (h ^ kk) * _M1 + _GOLDEN
        return mix(h)


def uniform(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1), one per broadcast key."""
    return (hash64(seed, stream, *keys) >> np.uint64(11)).astype(np.float64) * _INV_2_53


def uniforms4(seed: int, stream: int, *keys: np.ndarray | int) -> tuple[np.ndarray, ...]:
    """Four uniforms in [0, 1) with 16-bit resolution from one hash (coarse draws: genre,
    popularity, watched share), a quarter of the hashing of four :func:`uniform` calls."""
    h = hash64(seed, stream, *keys)
    mask = np.uint64(0xFFFF)
    return tuple(((h >> np.uint64(16 * i)) & mask).astype(np.float64) / 65536.0 for i in range(4))


def choice(u: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Indices drawn by inverse CDF from uniforms ``u`` with the given (unnormalized) weights."""
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    out: np.ndarray = np.minimum(np.searchsorted(cdf, u, side="right"), len(weights) - 1)
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
