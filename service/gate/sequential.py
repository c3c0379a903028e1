"""Sequential sampling for the noise check: stop as soon as no verdict can change.

The noise check is run with a fixed BUDGET of N noisy copies, drawn in batches. Every verdict
it feeds is monotone in the final number K of copies agreeing with the base top-1, so each
one is a CUT ``c``: the verdict holds at the full budget iff ``K >= c``:

- certified at radius >= r: ``certifies_at(K, N, sigma, alpha, r)`` rises with K;
- the detection score ``(N - K) / N`` at or below a threshold ``t`` (does not cross it).

After ``n`` copies with ``k`` agreements, ``K`` lies in ``[k, k + N - n]``. The verdict is
settled when both ends fall on the same side of the cut: ``k >= c`` (stays true even if every
remaining copy disagrees) or ``k + N - n < c`` (cannot become true even if every remaining
copy agrees). Stopping once every cut is settled therefore gives exactly the full-budget
verdicts, sample path by sample path (no statistical slack). At serving time the sample path
is the full budget's own: the batches are consecutive pieces of one stream of copies per
request (plan version 3, ``noise.offset``), not fresh draws.

Batch sizes grow geometrically (8, 16, 32, ... by default) and jump ahead to the fewest
copies that could settle every open cut, never past the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from service.gate.smoothing import certifies_at


def lowest_true(predicate: Callable[[int], bool], budget: int) -> int:
    """Smallest K in [0, budget] with ``predicate(K)`` true, or ``budget + 1`` if none.

    ``predicate`` must be monotone non-decreasing in K (false ... false, true ... true).
    """
    lo, hi = 0, budget + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@lru_cache(maxsize=1024)
def certification_cut(budget: int, sigma: float, alpha: float, target_radius: float) -> int:
    """Fewest agreements out of ``budget`` that certify radius >= ``target_radius``
    (``budget + 1`` when even unanimity does not). Cached: a policy asks the same few."""
    return lowest_true(lambda k: certifies_at(k, budget, sigma, alpha, target_radius), budget)


def disagreement_share(agreements: int, samples: int) -> float:
    """Noise detection score: share of noisy copies that lose the base top-1, in [0, 1].

    Computed as ``(samples - agreements) / samples`` (one rounding), the exact expression the
    cut below is built on.
    """
    if samples < 1:
        raise ValueError("disagreement_share needs at least one sample")
    return (samples - agreements) / samples


def detection_cut(budget: int, threshold: float) -> int:
    """Fewest agreements out of ``budget`` for which the detection score does NOT cross
    ``threshold`` (score > threshold crosses)."""
    return lowest_true(lambda k: not disagreement_share(k, budget) > threshold, budget)


def settled(agreements: int, samples: int, budget: int, cut: int) -> bool:
    """Is the full-budget verdict ``K >= cut`` already fixed by what was drawn?"""
    return agreements >= cut or agreements + (budget - samples) < cut


def all_settled(agreements: int, samples: int, budget: int, cuts: Sequence[int]) -> bool:
    """True when every cut is settled or the budget is spent."""
    return samples >= budget or all(settled(agreements, samples, budget, c) for c in cuts)


def samples_to_settle(agreements: int, samples: int, budget: int, cuts: Sequence[int]) -> int:
    """A lower bound on further copies before every cut can be settled.

    One cut needs ``c - k`` more agreements or ``k + m - c + 1`` more disagreements
    (``m = budget - samples``), so at least the smaller of the two copies; all cuts need at
    least the largest of those minima.
    """
    remaining = budget - samples
    need = 0
    for c in cuts:
        if settled(agreements, samples, budget, c):
            continue
        need = max(need, min(c - agreements, agreements + remaining - c + 1))
    return need


def next_batch_size(spent: int, budget: int, *, first: int = 8, growth: int = 2,
                    at_least: int = 0) -> int:
    """Size of the next noise batch after ``spent`` copies of ``budget``; 0 when spent.

    Geometric: with no jump the batches are ``first * growth**i`` (8, 16, 32, ...), since
    ``spent * (growth - 1) + first`` is exactly that. ``at_least`` (e.g. from
    :func:`samples_to_settle`) skips batches that could not settle anything. Batches never
    shrink below the geometric size, so there are never more batches than
    :func:`batch_schedule` lists.
    """
    if first < 1 or growth < 1:
        raise ValueError("first and growth must be >= 1")
    remaining = budget - spent
    if remaining <= 0:
        return 0
    return min(remaining, max(spent * (growth - 1) + first, at_least))


def settling_batch(agreements: int, samples: int, budget: int, cuts: Sequence[int], *,
                   first: int = 8, growth: int = 2) -> int:
    """Size of a run's next batch after ``agreements`` of ``samples`` copies: geometric, or
    the fewest copies that could settle every open cut where that is more
    (:func:`samples_to_settle`); 0 when the budget is spent."""
    return next_batch_size(samples, budget, first=first, growth=growth,
                           at_least=samples_to_settle(agreements, samples, budget, cuts))


def batch_schedule(budget: int, *, first: int = 8, growth: int = 2) -> tuple[int, ...]:
    """Geometric batch sizes covering ``budget`` (the most batches a run can take)."""
    sizes: list[int] = []
    spent = 0
    while (size := next_batch_size(spent, budget, first=first, growth=growth)) > 0:
        sizes.append(size)
        spent += size
    return tuple(sizes)


def batches_two_phase(budget: int, detect: int, *, first: int = 8, growth: int = 2) -> int:
    """The most batches a run of ``budget`` copies takes whose first ``detect`` are drawn on
    their own geometric schedule (toward ``detect``; it may end after any of its batches, as a
    sequential test settles) and the rest on the schedule toward ``budget`` from there: a
    certified run whose noise check is open (:class:`service.gate.cascade.GateRun`). With
    ``detect`` 0, ``len(batch_schedule(budget))``. Batches a run sizes up to settle sooner
    (``at_least``) only make fewer."""
    detect = min(detect, budget)
    worst, spent, taken = 0, 0, 0
    while True:
        rest, s = 0, spent  # the detection phase ends here: the rest toward the budget
        while (size := next_batch_size(s, budget, first=first, growth=growth)) > 0:
            s += size
            rest += 1
        worst = max(worst, taken + rest)
        if spent >= detect:
            return worst
        spent += next_batch_size(spent, detect, first=first, growth=growth)
        taken += 1


def budget_within(passes_left: int, max_samples: int, *, first: int = 8,
                  growth: int = 2, detect: int = 0) -> int:
    """Largest noise budget N <= ``max_samples`` whose copies plus one base row per batch fit
    in ``passes_left`` forward passes (0 when none fits); ``detect``: the first copies are
    drawn on a schedule of their own (:func:`batches_two_phase`)."""
    best = 0
    for n in range(min(max_samples, max(passes_left, 0)), 0, -1):
        if n + batches_two_phase(n, detect, first=first, growth=growth) <= passes_left:
            best = n
            break
    return best


@dataclass(frozen=True)
class SequentialOutcome:
    """Where a sequential run stopped: ``agreements`` of ``samples`` drawn, in ``batches``."""

    agreements: int
    samples: int
    budget: int
    batches: tuple[int, ...]


def run_sequential(draw: Callable[[int], int], budget: int, cuts: Sequence[int], *,
                   first: int = 8, growth: int = 2) -> SequentialOutcome:
    """Drive a sequential run: ``draw(size)`` returns how many of ``size`` fresh copies agree.

    Pure apart from ``draw``; the gateway drives the same loop through the handler with
    :class:`~service.gate.cascade.GateRun`, whose certificate's last batch also takes the rest
    of the budget where less than itself would be left after it (the bound counts copies not
    drawn as disagreeing). Stops when every cut is settled.
    """
    agreements = samples = 0
    batches: list[int] = []
    while not all_settled(agreements, samples, budget, cuts):
        size = settling_batch(agreements, samples, budget, cuts, first=first, growth=growth)
        got = draw(size)
        if not 0 <= got <= size:
            raise ValueError(f"draw({size}) returned {got}")
        agreements += got
        samples += size
        batches.append(size)
    return SequentialOutcome(agreements, samples, budget, tuple(batches))
