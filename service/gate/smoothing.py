"""Randomized smoothing certificates (Cohen, Rosenfeld, Kolter, ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)``, is
certified around ``x`` with L2 radius ``R = sigma * PhiInverse(pA_low)`` when a one-sided
Clopper-Pearson lower bound ``pA_low`` (level 1 - alpha) on the top class's probability is
above 1/2; otherwise it abstains.

Choice of the candidate class: Cohen et al. pick it from a separate selection sample (n0
noisy copies) so that the bound's sample is independent of the choice. Here the candidate is
the BASE image's top-1 (row 0 of the logits, no noise). It is fixed before any noisy copy is
drawn, so the Clopper-Pearson bound on ``P(f(x + eps) = candidate)`` stays valid and no extra
samples are spent; the price is an abstention where the base top-1 is not the smoothed
classifier's majority class (a lost certificate, never a wrong one).

Units: ``sigma`` and radii in [0, 1] pixel units (L2 over all pixels), as the handler adds
noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
# scipy.special's ufuncs, not scipy.stats' distributions: the same values (beta.ppf and
# norm.ppf call these), ~30x and ~500x less time per call, and 0.7 s less gateway start-up.
from scipy.special import betaincinv, ndtri


def _check_alpha_sigma(alpha: float, sigma: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not sigma > 0.0:
        raise ValueError(f"sigma must be > 0, got {sigma}")


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound at level ``1 - alpha`` on a binomial proportion.

    Equals ``Beta(alpha; k, n - k + 1)`` quantile, and 0 when ``k == 0``.
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}/{trials}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if successes == 0:
        return 0.0
    return float(betaincinv(successes, trials - successes + 1, alpha))


def certified_radius(p_lower: float, sigma: float) -> float | None:
    """``sigma * PhiInverse(p_lower)`` if ``p_lower > 1/2``, else ``None`` (abstain)."""
    if p_lower <= 0.5:
        return None
    return float(sigma * ndtri(p_lower))


def count_agreements(noise_logits: NDArray[np.floating], label: int) -> int:
    """How many noisy copies predict ``label``.

    noise_logits: float32 [N, C], one row per noisy copy. Ties resolve as ``np.argmax`` does
    (the lowest class index), the same rule the base top-1 uses.
    """
    if noise_logits.ndim != 2:
        raise ValueError(f"noise_logits must be [N, C], got shape {noise_logits.shape}")
    if noise_logits.shape[0] == 0:
        return 0
    return int(np.count_nonzero(np.argmax(noise_logits, axis=1) == label))


@dataclass(frozen=True)
class Certificate:
    """Outcome of certification for one image.

    label: the candidate class (base top-1). agreements: noisy copies predicting it, out of
    ``samples`` drawn. budget: samples the procedure was allowed (``samples <= budget``; equal
    unless sequential sampling stopped early). p_lower: Clopper-Pearson lower bound computed
    as if the ``budget - samples`` copies not drawn had all disagreed — at a full budget the
    usual bound, after an early stop a conservative one (never above the full-budget bound),
    so the certificate keeps its 1 - alpha guarantee. radius: certified L2 radius in pixel
    units, ``None`` = abstain.
    """

    label: int
    agreements: int
    samples: int
    budget: int
    sigma: float
    alpha: float
    p_lower: float
    radius: float | None

    @property
    def abstained(self) -> bool:
        """True when no radius is certified (``p_lower <= 1/2``)."""
        return self.radius is None

    def certifies(self, target_radius: float) -> bool:
        """True when the certified radius is at least ``target_radius`` (target 0: not
        abstained)."""
        return self.radius is not None and self.radius >= target_radius


def certify_counts(label: int, agreements: int, samples: int, budget: int, sigma: float,
                   alpha: float) -> Certificate:
    """Certificate from counts: ``agreements`` of ``samples`` drawn under a ``budget``."""
    _check_alpha_sigma(alpha, sigma)
    if not 0 <= agreements <= samples <= budget or budget < 1:
        raise ValueError(f"need 0 <= agreements <= samples <= budget, budget >= 1; got "
                         f"{agreements}, {samples}, {budget}")
    p_lower = clopper_pearson_lower(agreements, budget, alpha)
    return Certificate(label=label, agreements=agreements, samples=samples, budget=budget,
                       sigma=sigma, alpha=alpha, p_lower=p_lower,
                       radius=certified_radius(p_lower, sigma))


def certify(noise_logits: NDArray[np.floating], label: int, sigma: float,
            alpha: float) -> Certificate:
    """Certify ``label`` (the base image's top-1) from the logits of N noisy copies.

    noise_logits: float32 [N, C], N >= 1, copies ``x + N(0, sigma^2)``. sigma: the noise the
    copies were drawn with (pixel units). alpha: 1 - confidence of the bound.
    """
    n = int(noise_logits.shape[0])
    if n < 1:
        raise ValueError("certify needs at least one noisy copy")
    return certify_counts(label, count_agreements(noise_logits, label), n, n, sigma, alpha)


def certifies_at(agreements: int, budget: int, sigma: float, alpha: float,
                 target_radius: float) -> bool:
    """Would ``agreements`` of ``budget`` certify a radius >= ``target_radius``?

    The one predicate used both by sequential sampling and by the final certificate, so
    the two can never disagree through rounding.
    """
    radius = certified_radius(clopper_pearson_lower(agreements, budget, alpha), sigma)
    return radius is not None and radius >= target_radius
