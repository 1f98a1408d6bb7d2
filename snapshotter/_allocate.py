"""How many members each stratum gets: proportional, equal and Neyman allocation, exactly.

The invariants (SPEC §2) hold for every allocation:

- the total is exactly ``n``, or the population size ``N`` when that is smaller;
- every non-empty stratum gets at least ``min_per_stratum`` members (at least 1), or all of its
  members when it has fewer;
- no stratum gets more than its size ``N_h``; what a cap cuts off goes to the other strata;
- ``n`` below the sum of the floors (with the default floor of 1: below the number of non-empty
  strata) is an error that says why, since some stratum would get no member and Σ weight per
  stratum = N_h could not hold.

The method: each stratum's target is ``clip(λ·w_h, floor_h, N_h)``, with the one ``λ`` that makes
the targets sum to the total (water-filling, so the excess of a capped stratum is spread over the
others in proportion to their own shares). Targets are then rounded by largest remainder (Hamilton),
ties going to the stratum that sorts first. Because floors and caps are integers, rounding never
leaves them. The shares ``w_h`` are ``N_h`` (proportional), ``1`` (equal) or ``N_h·S_h`` (Neyman,
``S_h`` the sample standard deviation with ddof=1, 0 for a single member). A Neyman stratum whose
``S_h`` is 0 gets its floor, plus a proportional share of anything the others cannot take; when
every ``S_h`` is 0 the allocation falls back to proportional, and the notes say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._errors import SelectionError

ALLOCATIONS = ("proportional", "equal", "neyman")
_FRACTION_DECIMALS = 9  # remainders equal to this precision are ties, broken by stratum order


@dataclass(frozen=True)
class Allocation:
    """The result of :func:`allocate`.

    Attributes:
        sample_sizes: ``n_h`` per stratum (int64), in the order of the input sizes.
        allocation: the allocation actually used (``proportional`` after a Neyman fallback).
        notes: human-readable notes on fallbacks and caps, recorded in the design.
    """

    sample_sizes: npt.NDArray[np.int64]
    allocation: str
    notes: tuple[str, ...]


def allocate(
    population_sizes: Sequence[int] | npt.NDArray[np.integer],
    n: int,
    *,
    allocation: str = "proportional",
    std: Sequence[float] | npt.NDArray[np.floating] | None = None,
    min_per_stratum: int = 1,
) -> Allocation:
    """Split ``n`` over strata of the given sizes, keeping the SPEC §2 invariants exactly.

    Args:
        population_sizes: ``N_h`` per stratum; every stratum must be non-empty.
        n: the total sample size wanted; the result sums to ``min(n, N)``.
        allocation: ``proportional``, ``equal`` or ``neyman``.
        std: per-stratum sample standard deviations (ddof=1), required for ``neyman``. NaN counts
            as 0.
        min_per_stratum: the floor per stratum (at least 1); a smaller stratum is taken whole.

    Returns:
        The per-stratum sample sizes, the allocation used, and notes.

    Raises:
        SelectionError: ``n`` < 1, an unknown allocation, a bad floor, a missing ``std`` for
            Neyman, or ``n`` below the sum of the floors (code ``too_few_samples``).
    """
    sizes = np.asarray(population_sizes, dtype=np.int64)
    if allocation not in ALLOCATIONS:
        raise SelectionError(
            f"unknown allocation {allocation!r}; expected one of {', '.join(ALLOCATIONS)}",
            field="allocation",
        )
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise SelectionError(f"n must be a positive integer, got {n!r}", field="n")
    if min_per_stratum < 1:
        raise SelectionError(
            "min_per_stratum must be at least 1: every non-empty stratum needs a member for its "
            "weights to sum to its size", field="min_per_stratum",
        )
    if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes < 1):
        raise SelectionError("every stratum must be non-empty", field="strata")
    n = int(n)
    total_population = int(sizes.sum())
    notes: list[str] = []
    if n >= total_population:
        if n > total_population:
            notes.append(
                f"n={n} is larger than the population (N={total_population}): everyone is selected"
            )
        used = allocation
        if allocation == "neyman":
            used = _neyman_weights(sizes, std, notes)[1]
        return Allocation(sizes.copy(), used, tuple(notes))
    floors = np.minimum(sizes, min_per_stratum)
    if int(floors.sum()) > n:
        if min_per_stratum == 1:
            msg = (
                f"n={n} is smaller than the number of non-empty strata ({sizes.size}): every "
                "non-empty stratum needs at least one member so that its weights sum to its size"
            )
        else:
            msg = (
                f"n={n} is smaller than the sum of the per-stratum floors ({int(floors.sum())} "
                f"with --min-per-stratum {min_per_stratum} over {sizes.size} strata)"
            )
        raise SelectionError(msg, field="n", code="too_few_samples")

    if allocation == "proportional":
        shares, used = sizes.astype(np.float64), "proportional"
    elif allocation == "equal":
        shares, used = np.ones(sizes.size), "equal"
    else:
        shares, used = _neyman_weights(sizes, std, notes)
    targets = _water_fill(shares, floors, sizes, n)
    if used == "neyman" and np.any(shares == 0):
        zero = shares == 0
        how = ("get only their floor" if targets[zero].sum() == floors[zero].sum()
               else "also take what the other strata cannot (they are capped)")
        notes.append(f"neyman: {int(zero.sum())} strata with standard deviation 0 {how}")
    sample = _largest_remainder(targets, floors, sizes, n)
    capped = int(np.count_nonzero((sample == sizes) & (sizes > floors)))
    if capped:
        notes.append(f"{capped} stratum/strata capped at their size; the excess went to the others")
    return Allocation(sample, used, tuple(notes))


def _neyman_weights(
    sizes: npt.NDArray[np.int64],
    std: Sequence[float] | npt.NDArray[np.floating] | None,
    notes: list[str],
) -> tuple[npt.NDArray[np.float64], str]:
    if std is None:
        raise SelectionError(
            "neyman allocation needs per-stratum standard deviations (--variability-col)",
            field="variability_col",
        )
    s = np.nan_to_num(np.asarray(std, dtype=np.float64), nan=0.0)
    if s.shape != sizes.shape or np.any(s < 0):
        raise SelectionError("std must be one non-negative value per stratum", field="std")
    if not np.any(s > 0):
        notes.append(
            "neyman: every stratum's standard deviation is 0; fell back to proportional allocation"
        )
        return sizes.astype(np.float64), "proportional"
    return sizes * s, "neyman"


def _water_fill(
    shares: npt.NDArray[np.float64],
    lo: npt.NDArray[np.int64],
    hi: npt.NDArray[np.int64],
    total: int,
) -> npt.NDArray[np.float64]:
    """Real targets ``clip(λ·shares, lo, hi)`` summing to ``total`` (Σlo ≤ total ≤ Σhi).

    Strata with a zero share stay at ``lo`` unless the others, all capped, cannot take the total;
    then those strata share what is left in proportion to their sizes.
    """
    x = lo.astype(np.float64)
    pos = (shares > 0) & (hi > lo)
    room = float(total - lo.sum())
    if room <= 0 or not np.any(pos):
        if room > 0:  # only zero-share strata have room: proportional among them
            return _water_fill(hi.astype(np.float64) * (hi > lo), lo, hi, total)
        return x
    if float((hi[pos] - lo[pos]).sum()) <= room:
        x[pos] = hi[pos]
        left = total - int(x.sum())
        if left > 0:  # zero-share strata absorb the rest (Neyman with some S_h = 0)
            rest = ~pos & (hi > lo)
            sub = _water_fill(hi[rest].astype(np.float64), lo[rest], hi[rest],
                              int(lo[rest].sum()) + left)
            x[rest] = sub
        return x
    w, a, b = shares[pos], lo[pos].astype(np.float64), hi[pos].astype(np.float64)
    fixed_rest = float(lo[~pos].sum())
    target = total - fixed_rest
    # Bisection on λ finds which strata sit at their floor or cap; λ is then solved exactly on
    # that set, so an unclipped proportional allocation is exactly n·N_h/N.
    lam_lo, lam_hi = 0.0, float(np.max(b / w))
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        if float(np.clip(mid * w, a, b).sum()) < target:
            lam_lo = mid
        else:
            lam_hi = mid
        if lam_hi - lam_lo <= 1e-15 * lam_hi:
            break
    lam = 0.5 * (lam_lo + lam_hi)
    at_lo, at_hi = lam * w <= a, lam * w >= b
    free = ~(at_lo | at_hi)
    if np.any(free):
        lam = (target - float(a[at_lo].sum()) - float(b[at_hi].sum())) / float(w[free].sum())
    x[pos] = np.clip(lam * w, a, b)
    return x


def _largest_remainder(
    targets: npt.NDArray[np.float64],
    lo: npt.NDArray[np.int64],
    hi: npt.NDArray[np.int64],
    total: int,
) -> npt.NDArray[np.int64]:
    """Round real targets to integers within ``[lo, hi]`` summing exactly to ``total``."""
    base = np.clip(np.floor(targets + 1e-9), lo, hi).astype(np.int64)
    frac = np.round(targets - base, _FRACTION_DECIMALS)
    order_idx = np.arange(targets.size)
    left = total - int(base.sum())
    if left > 0:
        eligible = np.flatnonzero(base < hi)
        # largest remainder first; ties to the stratum that sorts first (stable on index)
        ranked = eligible[np.lexsort((order_idx[eligible], -frac[eligible]))]
        while left > 0:
            step = ranked[base[ranked] < hi[ranked]][:left]
            if step.size == 0:  # unreachable while Σhi >= total; never loop forever
                raise SelectionError(f"cannot allocate {total} within the strata sizes")
            base[step] += 1
            left -= step.size
    elif left < 0:
        eligible = np.flatnonzero(base > lo)
        ranked = eligible[np.lexsort((-order_idx[eligible], frac[eligible]))]
        while left < 0:
            step = ranked[base[ranked] > lo[ranked]][:-left]
            if step.size == 0:  # unreachable while Σlo <= total
                raise SelectionError(f"cannot allocate {total} above the strata floors")
            base[step] -= 1
            left += step.size
    return base
