"""The probe plan as a domain type: which variants the handler builds from one image.

:class:`ProbeSpec` mirrors ``robustgate.v1.ProbePlan`` (``proto/robustgate/v1/probe.proto``)
field for field; the protobuf conversion lives in the transport layer. ``to_dict`` /
``from_dict`` speak protobuf's JSON mapping with the ``.proto`` snake_case names (as
``json_format.MessageToDict(..., preserving_proto_field_name=True)`` writes them), so both
sides can be tested against the same example plans.

Rows of the logits matrix the handler returns, in plan order (see :meth:`ProbeSpec.layout`)::

    0                          base image
    noise.count                Gaussian copies
    len(squeeze.bit_depths)    bit-depth squeezers, in listed order
    len(squeeze.median_sizes)  median squeezers, in listed order
    len(views)                 view transforms, in listed order
    occlusion.grid ** 2        one window masked each, row-major
    shuffle.count              tile shuffles
    jitter.count               small Gaussian copies (the squeeze detector's, not the noise check's)
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.gate._fields import (
    as_bool, as_float, as_int, as_list, as_mapping, camel, pick, reject_unknown,
)
from service.gate.errors import PlanError

PLAN_VERSION = 3  # what plans are built at; 3 made noise a stream (noise.offset), 2 added jitter
PLAN_VERSIONS = (1, 2, 3)  # what a plan may say (policies written before jitter hold version 1)
# The handler's limits (handlers/probe.py, which may not be imported from here; the shared
# examples in proto/examples/invalid pin the two copies to one another).
MAX_SIGMA = 10.0  # noise and jitter, pixel units
MIN_SCALE, MAX_SCALE = 0.1, 10.0  # a view's scale, when not 0 (unchanged)
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


def _known(*names: str) -> set[str]:
    return {n for name in names for n in (name, camel(name))}


@dataclass(frozen=True)
class NoiseSpec:
    """Gaussian copies: ``count`` images ``x + N(0, sigma^2)``, sigma in [0, 1] pixel units
    (the noise and the jitter sections). ``offset`` (noise, plan version 3): the index of the
    first copy in the seed's stream of copies, so that plans for copies 0..7 and 8..15 draw
    what one plan for 0..15 would (``probe.proto``)."""

    sigma: float = 0.0
    count: int = 0
    offset: int = 0


@dataclass(frozen=True)
class SqueezeSpec:
    """Feature squeezers: bit depths (each 1..8) then median window sizes (each 2..5)."""

    bit_depths: tuple[int, ...] = ()
    median_sizes: tuple[int, ...] = ()

    def names(self) -> tuple[str, ...]:
        """One name per squeezer in row order, e.g. ``("bits1", "bits2", "median2")``."""
        return tuple(f"bits{b}" for b in self.bit_depths) + tuple(
            f"median{k}" for k in self.median_sizes)


@dataclass(frozen=True)
class ViewSpec:
    """One affine view change: flips (left-right, then top-bottom), then scale (0 means 1),
    then rotation (degrees, CCW), then shift (pixels, +x right, +y down)."""

    rotate_deg: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    scale: float = 0.0
    hflip: bool = False
    vflip: bool = False


@dataclass(frozen=True)
class OcclusionSpec:
    """One window of a ``grid`` x ``grid`` partition masked at a time with ``fill`` in [0, 1];
    grid 0 disables it."""

    grid: int = 0
    fill: float = 0.0


@dataclass(frozen=True)
class ShuffleSpec:
    """``count`` copies with ``grid`` x ``grid`` tiles permuted; grid 0 (with count 0) disables it."""

    grid: int = 0
    count: int = 0


@dataclass(frozen=True)
class PlanLayout:
    """Row slices of each section in the ``[rows, C]`` logits matrix; ``rows`` is the total."""

    base: slice
    noise: slice
    squeeze_bits: slice
    squeeze_median: slice
    views: slice
    occlusion: slice
    shuffle: slice
    jitter: slice
    rows: int

    @property
    def squeeze(self) -> slice:
        """All squeezer rows: bit depths then medians."""
        return slice(self.squeeze_bits.start, self.squeeze_median.stop)


@dataclass(frozen=True)
class ProbeSpec:
    """A probe plan (schema version 3; 2 without a noise offset, 1 also without jitter).
    Validated on construction;
    raises :class:`PlanError`."""

    version: int = PLAN_VERSION
    seed: int = 0
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    squeeze: SqueezeSpec = field(default_factory=SqueezeSpec)
    views: tuple[ViewSpec, ...] = ()
    occlusion: OcclusionSpec = field(default_factory=OcclusionSpec)
    shuffle: ShuffleSpec = field(default_factory=ShuffleSpec)
    return_features: bool = False
    jitter: NoiseSpec = field(default_factory=NoiseSpec)

    def __post_init__(self) -> None:
        _validate(self)

    def with_seed(self, seed: int) -> ProbeSpec:
        """This plan with another seed. Only the seed is checked: the rest was validated when
        this plan was built (the gateway derives every request's plan this way)."""
        if not 0 <= seed <= _UINT64_MAX:
            raise PlanError(f"plan.seed: must be a uint64, got {seed}")
        new = copy.copy(self)
        object.__setattr__(new, "seed", seed)
        return new

    @functools.cached_property
    def _layout(self) -> PlanLayout:  # once per plan: rows and slices are read on every request
        sizes = [1, self.noise.count, len(self.squeeze.bit_depths),
                 len(self.squeeze.median_sizes), len(self.views), self.occlusion.grid ** 2,
                 self.shuffle.count, self.jitter.count]
        bounds = [0, *itertools.accumulate(sizes)]  # plain ints, not NumPy's
        s = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        return PlanLayout(base=s[0], noise=s[1], squeeze_bits=s[2], squeeze_median=s[3],
                          views=s[4], occlusion=s[5], shuffle=s[6], jitter=s[7], rows=bounds[-1])

    def check_input(self, height: int, width: int) -> None:
        """Raise PlanError where this plan cannot probe a ``height`` x ``width`` image: the
        handler refuses such a plan on every call. The schema alone cannot say (the image size
        is the model's), so the gateway asks this of each policy's probe when it loads it."""
        for i, v in enumerate(self.views):
            if abs(v.shift_x) > width or abs(v.shift_y) > height:
                raise PlanError(f"plan.views[{i}]: shift ({v.shift_x}, {v.shift_y}) is larger than the "
                                f"{height}x{width} image")
        if self.occlusion.grid > min(height, width):
            raise PlanError(f"plan.occlusion.grid: {self.occlusion.grid} is larger than the "
                            f"{height}x{width} image")
        g = self.shuffle.grid
        if g and (height % g or width % g):
            raise PlanError(f"plan.shuffle.grid: {g} does not divide the {height}x{width} image")

    def layout(self) -> PlanLayout:
        """Row slices of every section, in plan order (module docstring)."""
        return self._layout

    @property
    def rows(self) -> int:
        """Rows of logits the handler returns for this plan: 1 (base) + variants."""
        return self.layout().rows

    def to_dict(self) -> dict[str, Any]:
        """Protobuf-JSON dict with every field written (jitter only when set), snake_case
        names, seed as an int."""
        return {
            "version": self.version,
            "seed": self.seed,
            # offset only when set, as jitter: a plan without it writes what it wrote before
            "noise": {"sigma": self.noise.sigma, "count": self.noise.count,
                      **({"offset": self.noise.offset} if self.noise.offset else {})},
            "squeeze": {"bit_depths": list(self.squeeze.bit_depths),
                        "median_sizes": list(self.squeeze.median_sizes)},
            "views": [{"rotate_deg": v.rotate_deg, "shift_x": v.shift_x, "shift_y": v.shift_y,
                       "scale": v.scale, "hflip": v.hflip, "vflip": v.vflip} for v in self.views],
            "occlusion": {"grid": self.occlusion.grid, "fill": self.occlusion.fill},
            "shuffle": {"grid": self.shuffle.grid, "count": self.shuffle.count},
            "return_features": self.return_features,
            # Only when set: a plan without it writes what it wrote before jitter existed.
            **({"jitter": {"sigma": self.jitter.sigma, "count": self.jitter.count}}
               if self.jitter != NoiseSpec() else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeSpec:
        """Parse protobuf JSON (snake_case or lowerCamelCase, absent fields = defaults, 64-bit
        ints as numbers or decimal strings). Raises :class:`PlanError` naming the bad field."""
        d = as_mapping(data, "plan", PlanError)
        reject_unknown(d, _known("version", "seed", "noise", "squeeze", "views", "occlusion",
                                 "shuffle", "return_features", "jitter"), "plan", PlanError)
        version = as_int(pick(d, "version", 0), "plan.version", PlanError, minimum=0)
        seed = as_int(pick(d, "seed", 0), "plan.seed", PlanError, minimum=0,
                      maximum=_UINT64_MAX)
        sq = as_mapping(pick(d, "squeeze", {}), "plan.squeeze", PlanError)
        reject_unknown(sq, _known("bit_depths", "median_sizes"), "plan.squeeze", PlanError)
        oc = as_mapping(pick(d, "occlusion", {}), "plan.occlusion", PlanError)
        reject_unknown(oc, _known("grid", "fill"), "plan.occlusion", PlanError)
        sh = as_mapping(pick(d, "shuffle", {}), "plan.shuffle", PlanError)
        reject_unknown(sh, _known("grid", "count"), "plan.shuffle", PlanError)
        return cls(
            version=version,
            seed=seed,
            noise=_gaussian(d, "noise"),
            squeeze=SqueezeSpec(
                bit_depths=tuple(_uint32(x, f"plan.squeeze.bit_depths[{i}]") for i, x in
                                 enumerate(as_list(pick(sq, "bit_depths", []),
                                                   "plan.squeeze.bit_depths", PlanError))),
                median_sizes=tuple(_uint32(x, f"plan.squeeze.median_sizes[{i}]") for i, x in
                                   enumerate(as_list(pick(sq, "median_sizes", []),
                                                     "plan.squeeze.median_sizes", PlanError)))),
            views=tuple(_view(v, f"plan.views[{i}]") for i, v in
                        enumerate(as_list(pick(d, "views", []), "plan.views", PlanError))),
            occlusion=OcclusionSpec(
                grid=_uint32(pick(oc, "grid"), "plan.occlusion.grid"),
                fill=as_float(pick(oc, "fill", 0.0), "plan.occlusion.fill", PlanError)),
            shuffle=ShuffleSpec(grid=_uint32(pick(sh, "grid"), "plan.shuffle.grid"),
                                count=_uint32(pick(sh, "count"), "plan.shuffle.count")),
            return_features=as_bool(pick(d, "return_features", False),
                                    "plan.return_features", PlanError),
            jitter=_gaussian(d, "jitter"),
        )


def derive_seed(seed: int, index: int) -> int:
    """A uint64 seed for sub-request ``index`` of a request seeded with ``seed``.

    A run's noise copies take one (index 1), apart from the cheap probe's: its sequential
    batches then share it, each at its own offset in the stream (plan version 3).
    """
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def _uint32(value: Any, path: str) -> int:
    return 0 if value is None else as_int(value, path, PlanError, minimum=0, maximum=_UINT32_MAX)


def _gaussian(plan: Mapping[str, Any], name: str) -> NoiseSpec:
    """The ``noise`` or ``jitter`` section of a protobuf-JSON plan."""
    path = f"plan.{name}"
    g = as_mapping(pick(plan, name, {}), path, PlanError)
    reject_unknown(g, _known("sigma", "count", "offset"), path, PlanError)
    return NoiseSpec(sigma=as_float(pick(g, "sigma", 0.0), f"{path}.sigma", PlanError),
                     count=_uint32(pick(g, "count"), f"{path}.count"),
                     offset=_uint32(pick(g, "offset"), f"{path}.offset"))


def _view(value: Any, path: str) -> ViewSpec:
    v = as_mapping(value, path, PlanError)
    reject_unknown(v, _known("rotate_deg", "shift_x", "shift_y", "scale", "hflip", "vflip"), path,
                   PlanError)

    def num(name: str) -> float:
        return as_float(pick(v, name, 0.0), f"{path}.{name}", PlanError)

    return ViewSpec(rotate_deg=num("rotate_deg"), shift_x=num("shift_x"),
                    shift_y=num("shift_y"), scale=num("scale"),
                    hflip=as_bool(pick(v, "hflip", False), f"{path}.hflip", PlanError),
                    vflip=as_bool(pick(v, "vflip", False), f"{path}.vflip", PlanError))


def _validate(p: ProbeSpec) -> None:
    """Raise PlanError where ``p`` breaks the rules written in probe.proto."""
    if p.version not in PLAN_VERSIONS:
        raise PlanError(f"plan.version: only versions {' and '.join(map(str, PLAN_VERSIONS))} are "
                        f"known, got {p.version}")
    if not 0 <= p.seed <= _UINT64_MAX:
        raise PlanError(f"plan.seed: must be a uint64, got {p.seed}")
    for name, g in (("noise", p.noise), ("jitter", p.jitter)):
        if g.count < 0 or not math.isfinite(g.sigma) or g.sigma < 0:
            raise PlanError(f"plan.{name}: count must be >= 0 and sigma finite and >= 0")
        if g.count > 0 and not 0 < g.sigma <= MAX_SIGMA:
            raise PlanError(f"plan.{name}.sigma: must be in (0, {MAX_SIGMA}] when {name}.count > 0, "
                            f"got {g.sigma}")
    if p.jitter.count > 0 and p.version < 2:
        raise PlanError(f"plan.jitter: needs plan version 2, got version {p.version}")
    if not 0 <= p.noise.offset <= _UINT32_MAX:
        raise PlanError(f"plan.noise.offset: must be a uint32, got {p.noise.offset}")
    if p.noise.offset and p.version < 3:
        raise PlanError(f"plan.noise.offset: needs plan version 3, got version {p.version}")
    if p.jitter.offset:
        raise PlanError("plan.jitter.offset: must be 0 (only the noise section is a stream)")
    if any(not 1 <= b <= 8 for b in p.squeeze.bit_depths):
        raise PlanError(f"plan.squeeze.bit_depths: each must be in 1..8, got "
                        f"{list(p.squeeze.bit_depths)}")
    if any(not 2 <= k <= 5 for k in p.squeeze.median_sizes):
        raise PlanError(f"plan.squeeze.median_sizes: each must be in 2..5, got "
                        f"{list(p.squeeze.median_sizes)}")
    for i, v in enumerate(p.views):
        values = (v.rotate_deg, v.shift_x, v.shift_y, v.scale)
        if not all(math.isfinite(x) for x in values) or v.scale < 0:
            raise PlanError(f"plan.views[{i}]: values must be finite and scale >= 0")
        if v.scale != 0.0 and not MIN_SCALE <= v.scale <= MAX_SCALE:
            raise PlanError(f"plan.views[{i}].scale: must be 0 (unchanged) or in [{MIN_SCALE}, "
                            f"{MAX_SCALE}], got {v.scale}")
    if p.occlusion.grid < 0:
        raise PlanError(f"plan.occlusion.grid: must be >= 0, got {p.occlusion.grid}")
    if not 0.0 <= p.occlusion.fill <= 1.0:
        raise PlanError(f"plan.occlusion.fill: must be in [0, 1], got {p.occlusion.fill}")
    if p.shuffle.grid < 0 or p.shuffle.grid == 1 or p.shuffle.count < 0:
        raise PlanError("plan.shuffle: grid must be 0 or >= 2, count >= 0")
    if (p.shuffle.grid == 0) != (p.shuffle.count == 0):
        raise PlanError("plan.shuffle: grid and count must both be 0 (off) or both > 0")
