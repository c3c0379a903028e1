"""Default probe and an uncalibrated starting policy, as the probe measured them.

Squeeze (bit depths 2, 3, 4) plus six views (+-10 degree rotations, +-2 px shifts) plus
four jitter copies (sigma 0.03, read by the squeeze detector) is the 14-pass cheap gate; occlusion and structure are configured but off until calibration shows
they earn their share of the budget.

Why these bit depths (measured in process on fmnist-cnn, squeeze scored on logits, 5 % clean
flag rate, successful FGSM/PGD at eps 0.01 to 0.15): one bit depth alone goes blind where
the attack's step lands on its grid. Background pixels are 0, an L-inf attack moves them to
exactly eps, and at 4 bits (levels k/15) eps = 1/15 or 2/15 survives squeezing unchanged:
detection fell to 2-20 % there, against 83-95 % at eps 0.03 and 0.1. Three depths whose
grids (1/3, 1/7, 1/15) share no step below 1 kept every eps in the sweep at 24 % or more
(the low end only at eps 0.01, where the attacks barely succeed) and averaged 75 %. A 1-bit
squeezer and a 2x2 median, the paper's choice for MNIST, scored AUC 0.6-0.8 on
Fashion-MNIST, whose garments have texture that binarising destroys.
"""

from __future__ import annotations

from service.gate.checks import Check
from service.gate.plan import NoiseSpec, OcclusionSpec, ProbeSpec, ShuffleSpec, SqueezeSpec, ViewSpec
from service.gate.policy import CheckPolicy, Mode, NoiseSettings, Policy

DEFAULT_BIT_DEPTHS: tuple[int, ...] = (2, 3, 4)
DEFAULT_MEDIAN_SIZES: tuple[int, ...] = ()
DEFAULT_VIEWS: tuple[ViewSpec, ...] = (
    ViewSpec(rotate_deg=10.0), ViewSpec(rotate_deg=-10.0),
    ViewSpec(shift_x=2.0), ViewSpec(shift_x=-2.0),
    ViewSpec(shift_y=2.0), ViewSpec(shift_y=-2.0),
)
#: Jitter copies for the squeeze detector (its docstring): 4 copies at sigma 0.03.
DEFAULT_JITTER = NoiseSpec(sigma=0.03, count=4)
#: The plan version a policy's probe is written at (:func:`default_probe`).
PROBE_VERSION = 2


def default_probe(*, hflip: bool = False, seed: int = 0) -> ProbeSpec:
    """Every check's default variants (no noise: that comes from the policy's settings).

    hflip: add a mirrored view, only where the model card says flips keep the label.
    """
    views = DEFAULT_VIEWS + ((ViewSpec(hflip=True),) if hflip else ())
    # Version 2, the lowest that holds jitter: only noise batches need 3 (Policy.noise_plan),
    # so a policy written with this probe still serves with archives, and gateways, from
    # before version 3 (a rolled-back image keeps the policy it finds).
    return ProbeSpec(version=PROBE_VERSION, seed=seed,
                     squeeze=SqueezeSpec(DEFAULT_BIT_DEPTHS, DEFAULT_MEDIAN_SIZES),
                     views=views, occlusion=OcclusionSpec(grid=4, fill=0.5),
                     shuffle=ShuffleSpec(grid=2, count=4), return_features=True,
                     jitter=DEFAULT_JITTER)


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
