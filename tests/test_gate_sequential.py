"""Sequential sampling: stopping never changes a verdict against the full budget."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.gate.sequential import (
    all_settled, batch_schedule, batches_two_phase, budget_within, certification_cut, detection_cut,
    disagreement_share, lowest_true, next_batch_size, run_sequential, samples_to_settle,
    settled,
)
from service.gate.smoothing import certifies_at, certify_counts


def _stream(p: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


def _drawer(stream: np.ndarray):  # type: ignore[no-untyped-def]
    pos = [0]

    def draw(size: int) -> int:
        got = int(stream[pos[0]:pos[0] + size].sum())
        pos[0] += size
        return got

    return draw


@settings(max_examples=300, deadline=None)
@given(p=st.floats(0.0, 1.0), budget=st.integers(1, 500), seed=st.integers(0, 2**32 - 1),
       sigma=st.sampled_from([0.12, 0.25, 0.5, 1.0]), alpha=st.sampled_from([0.001, 0.01, 0.05]),
       target=st.floats(0.0, 1.5), flag=st.floats(0.0, 1.0), reject=st.floats(0.0, 1.0),
       first=st.integers(1, 16), growth=st.integers(1, 3))
def test_sequential_verdicts_equal_full_budget(p: float, budget: int, seed: int, sigma: float,
                                               alpha: float, target: float, flag: float,
                                               reject: float, first: int, growth: int) -> None:
    stream = _stream(p, budget, seed)
    cuts = [certification_cut(budget, sigma, alpha, target), detection_cut(budget, flag),
            detection_cut(budget, reject)]
    out = run_sequential(_drawer(stream), budget, cuts, first=first, growth=growth)
    full_k = int(stream.sum())
    assert out.samples <= budget and out.agreements == int(stream[:out.samples].sum())
    assert len(out.batches) <= len(batch_schedule(budget, first=first, growth=growth))
    early = certify_counts(0, out.agreements, out.samples, budget, sigma, alpha)
    full = certify_counts(0, full_k, budget, budget, sigma, alpha)
    assert early.certifies(target) == full.certifies(target)
    if full.radius is None:
        assert early.radius is None
    elif early.radius is not None:
        assert early.radius <= full.radius
    if out.samples:
        share = disagreement_share(out.agreements, out.samples)
        full_share = disagreement_share(full_k, budget)
        assert (share > flag) == (full_share > flag)
        assert (share > reject) == (full_share > reject)


def test_cuts_are_the_smallest_passing_counts() -> None:
    c = certification_cut(400, 0.25, 0.001, 0.25)
    assert certifies_at(c, 400, 0.25, 0.001, 0.25)
    assert not certifies_at(c - 1, 400, 0.25, 0.001, 0.25)
    assert certification_cut(10, 0.25, 0.001, 0.5) == 11  # 10 copies can never reach 0.5
    d = detection_cut(100, 0.2)
    assert disagreement_share(d, 100) <= 0.2 < disagreement_share(d - 1, 100)
    assert lowest_true(lambda k: k >= 3, 10) == 3
    assert lowest_true(lambda k: False, 10) == 11


def test_geometric_batches() -> None:
    assert batch_schedule(100) == (8, 16, 32, 44)
    assert batch_schedule(8) == (8,)
    assert batch_schedule(20, first=4, growth=3) == (4, 12, 4)
    assert next_batch_size(24, 400) == 32
    assert next_batch_size(24, 400, at_least=100) == 100
    assert next_batch_size(390, 400, at_least=100) == 10
    assert next_batch_size(400, 400) == 0


def test_budget_within_pays_one_base_row_per_batch() -> None:
    n = budget_within(50, 400)
    assert n + len(batch_schedule(n)) <= 50
    assert n + 1 + len(batch_schedule(n + 1)) > 50
    assert budget_within(1000, 400) == 400
    assert budget_within(1, 400) == 0


def test_hopeless_certification_stops_after_one_batch() -> None:
    budget = 400
    cut = certification_cut(budget, 0.25, 0.001, 0.25)
    jump = samples_to_settle(0, 0, budget, [cut])
    assert jump == budget - cut + 1
    out = run_sequential(_drawer(np.zeros(budget, bool)), budget, [cut])
    assert out.batches == (jump,) and out.samples < budget // 4


def test_clear_detection_pass_stops_at_the_cut() -> None:
    cut = detection_cut(400, 0.5)
    out = run_sequential(_drawer(np.ones(400, bool)), 400, [cut])
    assert out.samples == cut == 200
    assert all_settled(out.agreements, out.samples, 400, [cut])


def test_no_cuts_draw_nothing() -> None:
    out = run_sequential(_drawer(np.ones(10, bool)), 10, [])
    assert out.samples == 0 and out.batches == ()


def test_bad_draw_is_refused() -> None:
    with pytest.raises(ValueError):
        run_sequential(lambda size: size + 1, 10, [5])


def test_settled_boundaries() -> None:
    # budget 10, cut 5: the verdict is "final K >= 5"
    assert not settled(0, 5, 10, 5)  # five more agreements would still reach 5
    assert settled(0, 6, 10, 5)  # at most 4 now
    assert settled(5, 5, 10, 5)  # already 5
    assert not settled(4, 5, 10, 5)
    assert settled(3, 3, 10, 11) and settled(0, 0, 10, 0)  # impossible / certain cuts


def test_batches_two_phase_counts_a_scored_phase_ending_after_any_of_its_batches() -> None:
    """A certified run whose noise check is open draws its scored copies first on their own
    schedule: 47 copies sized for 3 batches (8, 16, 23) took 4 (10, 18, 4, 15 in a review)."""
    for n in range(1, 200):
        assert batches_two_phase(n, 0) == len(batch_schedule(n))  # no scored phase: the plain schedule
    assert len(batch_schedule(47)) == 3 and batches_two_phase(47, 32) == 4
    assert batches_two_phase(47, 32) >= max(len(batch_schedule(47)), len(batch_schedule(32)))
    # the budget leaves room for it: 47 + 4 passes do not fit in 50 left, 46 + its batches do
    assert budget_within(50, 400) == 47 and budget_within(50, 400, detect=32) < 47
    n = budget_within(50, 400, detect=32)
    assert n + batches_two_phase(n, 32) <= 50
