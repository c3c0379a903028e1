"""Default probe and an uncalibrated starting policy, as the probe measured them.

Squeeze (bit depths 1, 2, 4 and a 2x2 median) plus six views (+-10 degree rotations, +-2 px
shifts) is the 11-pass gate that beat the five-check one; occlusion and structure are
configured but off until calibration shows they earn their share of the budget.
"""

from __future__ import annotations

from service.gate.checks import Check
from service.gate.plan import OcclusionSpec, ProbeSpec, ShuffleSpec, SqueezeSpec, ViewSpec
from service.gate.policy import CheckPolicy, Mode, NoiseSettings, Policy

DEFAULT_BIT_DEPTHS: tuple[int, ...] = (1, 2, 4)
DEFAULT_MEDIAN_SIZES: tuple[int, ...] = (2,)
DEFAULT_VIEWS: tuple[ViewSpec, ...] = (
    ViewSpec(rotate_deg=10.0), ViewSpec(rotate_deg=-10.0),
    ViewSpec(shift_x=2.0), ViewSpec(shift_x=-2.0),
    ViewSpec(shift_y=2.0), ViewSpec(shift_y=-2.0),
)


def default_probe(*, hflip: bool = False, seed: int = 0) -> ProbeSpec:
    """Every check's default variants (no noise: that comes from the policy's settings).

    hflip: add a mirrored view, only where the model card says flips keep the label.
    """
    views = DEFAULT_VIEWS + ((ViewSpec(hflip=True),) if hflip else ())
    return ProbeSpec(seed=seed,
                     squeeze=SqueezeSpec(DEFAULT_BIT_DEPTHS, DEFAULT_MEDIAN_SIZES),
                     views=views, occlusion=OcclusionSpec(grid=4, fill=0.5),
                     shuffle=ShuffleSpec(grid=2, count=4), return_features=True)


def draft_policy(model_name: str, model_sha256: str, data_sha256: str, sigma: float, *,
                 hflip: bool = False, version: str = "0-uncalibrated") -> Policy:
    """A starting policy before calibration: monitor mode, only viewpoint on (the one check
    that needs no fitted references), no thresholds. Calibration fills references and
    thresholds and switches the chosen checks on."""
    return Policy(model_name=model_name, model_sha256=model_sha256, data_sha256=data_sha256,
                  version=version, mode=Mode.MONITOR, probe=default_probe(hflip=hflip),
                  noise=NoiseSettings(sigma=sigma),
                  checks={Check.VIEWPOINT: CheckPolicy(enabled=True)},
                  max_forward_passes=64)
