"""Probe plans: validation and expansion of one base image into every variant, on its device.

The row order, the maths of each probe and the seeding are the contract written in
``proto/robustgate/v1/probe.proto``; this module is its one implementation. Everything
here is plain torch on whatever device the base image is on: no I/O, no TorchServe.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustgate.v1 import probe_pb2

PLAN_VERSION = 3  # the current contract; 2 (noise in one draw) and 1 (and no jitter) are still served
PLAN_VERSIONS = (1, 2, 3)
NOISE_BLOCK = 8  # copies per draw of a version-3 noise stream
MAX_SIGMA = 10.0
MAX_SCALE = 10.0
MIN_SCALE = 0.1
MEDIAN_SIZES = range(2, 6)
BIT_DEPTHS = range(1, 9)


class PlanError(ValueError):
    """The plan is malformed or over a limit (a client error)."""


@dataclass(frozen=True)
class Shape:
    """Input image shape ``[C, H, W]``."""

    c: int
    h: int
    w: int


def _finite(v: float, what: str) -> float:
    if not math.isfinite(v):
        raise PlanError(f"{what} must be finite, got {v}")
    return v


def max_plan_bytes(max_variants: int) -> int:
    """More bytes than any serialized plan of at most ``max_variants`` variants takes: as a
    protobuf serializer writes one, a view is at most 26 bytes (each variant of another kind
    less) and the plan's other fields under 200. A plan is refused over this before it is
    parsed, since parsing is what costs: TorchServe lets 8 MiB through, and 8 MiB of empty
    views parse to four million messages (~190 MB) before :func:`validate` counts them."""
    return 1024 + 64 * max_variants


def count_rows(plan: probe_pb2.ProbePlan | None) -> int:
    """Rows of a plan's answer: 1 (base) + every variant, in plan order."""
    if plan is None:
        return 1
    shuffle = plan.shuffle.count if plan.shuffle.grid else 0
    return (
        1
        + plan.noise.count
        + len(plan.squeeze.bit_depths)
        + len(plan.squeeze.median_sizes)
        + len(plan.views)
        + plan.occlusion.grid**2
        + shuffle
        + plan.jitter.count
    )


def validate(plan: probe_pb2.ProbePlan, shape: Shape, max_variants: int) -> int:
    """Check ``plan`` against the schema and the limits; return its row count.

    Raises :class:`PlanError` with a message that names the offending field."""
    if plan.version not in PLAN_VERSIONS:
        raise PlanError(f"plan version {plan.version} is not supported (this handler speaks "
                        f"{' and '.join(map(str, PLAN_VERSIONS))})")
    # The size first, from the lists' lengths: the loops below visit every entry, and 8 MiB
    # of empty views is four million of them.
    rows = count_rows(plan)
    if rows - 1 > max_variants:
        raise PlanError(f"plan asks for {rows - 1} variants; this model allows at most {max_variants}")
    for name in ("noise", "jitter"):
        section = getattr(plan, name)
        if section.count:
            sigma = _finite(section.sigma, f"{name}.sigma")
            if not 0.0 < sigma <= MAX_SIGMA:
                raise PlanError(f"{name}.sigma must be in (0, {MAX_SIGMA}] when {name}.count > 0, got {sigma}")
    if plan.jitter.count and plan.version < 2:
        raise PlanError(f"jitter needs plan version 2, got version {plan.version}")
    if plan.noise.offset and plan.version < 3:
        raise PlanError(f"noise.offset needs plan version 3, got version {plan.version}")
    if plan.jitter.offset:
        raise PlanError("jitter.offset must be 0 (only the noise section is a stream)")
    for b in plan.squeeze.bit_depths:
        if b not in BIT_DEPTHS:
            raise PlanError(f"squeeze.bit_depths: {b} is not in 1..8")
    for k in plan.squeeze.median_sizes:
        if k not in MEDIAN_SIZES:
            raise PlanError(f"squeeze.median_sizes: {k} is not in 2..5")
    for i, v in enumerate(plan.views):
        for name in ("rotate_deg", "shift_x", "shift_y", "scale"):
            _finite(getattr(v, name), f"views[{i}].{name}")
        if v.scale != 0.0 and not MIN_SCALE <= v.scale <= MAX_SCALE:
            raise PlanError(f"views[{i}].scale must be 0 (unchanged) or in [{MIN_SCALE}, {MAX_SCALE}], got {v.scale}")
        if abs(v.shift_x) > shape.w or abs(v.shift_y) > shape.h:
            raise PlanError(f"views[{i}]: shift ({v.shift_x}, {v.shift_y}) is larger than the image")
    g = plan.occlusion.grid
    if g:
        if g > min(shape.h, shape.w):
            raise PlanError(f"occlusion.grid {g} is larger than the image ({shape.h}x{shape.w})")
        fill = _finite(plan.occlusion.fill, "occlusion.fill")
        if not 0.0 <= fill <= 1.0:
            raise PlanError(f"occlusion.fill must be in [0, 1], got {fill}")
    s = plan.shuffle
    if s.grid:
        if s.grid < 2 or shape.h % s.grid or shape.w % s.grid:
            raise PlanError(f"shuffle.grid {s.grid} must be >= 2 and divide the image size {shape.h}x{shape.w}")
    elif s.count:
        raise PlanError("shuffle.count > 0 needs shuffle.grid >= 2")
    return rows


# ---------------------------------------------------------------------------- maths

# Per-device tensors that depend only on a plan's settings (view grids, occlusion masks,
# depth levels) are built once and kept, a few of each.
GRID_CACHE_ENTRIES = 8  # a policy sends one list of views; calibration and benchmarks a few more
GRID_CACHE_MAX_CELLS = 1 << 19  # views x H x W of a cached grid: at most 4 MiB each


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reduce to ``bits`` bits per value: round(x * (2^b - 1)) / (2^b - 1)."""
    m = float(2**bits - 1)
    return torch.round(x * m) / m


@functools.lru_cache(maxsize=GRID_CACHE_ENTRIES)
def _levels(bits: tuple[int, ...], device: str) -> torch.Tensor:
    """float32 ``[len(bits), 1, 1, 1]``: 2^b - 1 for each depth, on ``device``."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor([float(2**b - 1) for b in bits]).view(-1, 1, 1, 1).to(device)


def bit_depths(x: torch.Tensor, bits: tuple[int, ...]) -> torch.Tensor:
    """:func:`bit_depth` of ``x`` ``[C, H, W]`` at each depth in ``bits``, stacked
    ``[len(bits), C, H, W]``: three kernels for every depth at once (the same float32
    products and quotients as one depth at a time)."""
    m = _levels(bits, str(x.device)).to(x.dtype)
    return torch.round(x.unsqueeze(0) * m) / m


def _symmetric_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    # Indices of range(-before, n + after) mirrored about the edges, edge included
    # (scipy's "reflect": d c b a | a b c d | d c b a).
    i = torch.arange(-before, n + after, device=device)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= n, 2 * n - i - 1, i)


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """``k x k`` median of ``x`` ``[..., H, W]``, equal to
    ``scipy.ndimage.median_filter(x, size=(1, ..., k, k), mode="reflect")``."""
    h, w = x.shape[-2:]
    lo, hi = k // 2, (k - 1) // 2
    xp = x.index_select(-2, _symmetric_index(h, lo, hi, x.device))
    xp = xp.index_select(-1, _symmetric_index(w, lo, hi, x.device))
    patches = xp.unfold(-2, k, 1).unfold(-2, k, 1)  # [..., H, W, k, k]
    flat = patches.reshape(*patches.shape[:-2], k * k)
    return flat.kthvalue(k * k // 2 + 1, dim=-1).values


def sampling_grid(
    n: int, h: int, w: int, rotate_deg: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor,
    scale: torch.Tensor
) -> torch.Tensor:
    """``F.grid_sample``'s grid ``[n, h, w, 2]`` that scales, rotates (degrees,
    counter-clockwise on screen) and shifts (pixels, +x right, +y down) each of ``n``
    images about its centre. Parameters: float32 ``[n]``, on the grid's device. Same maths
    as the training augmentation (``model_store/augment.py``), so the viewpoint check sees
    what training saw."""
    dev = rotate_deg.device
    theta = rotate_deg * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # affine_grid maps output coords to input coords (normalised to [-1, 1]); the inverse
    # of "scale then rotate CCW (on screen, y down) then shift".
    mat = torch.zeros(n, 2, 3, device=dev)
    mat[:, 0, 0] = cos / scale
    mat[:, 0, 1] = -sin / scale
    mat[:, 1, 0] = sin / scale
    mat[:, 1, 1] = cos / scale
    ox, oy = -2.0 * shift_x / w, -2.0 * shift_y / h
    mat[:, 0, 2] = mat[:, 0, 0] * ox + mat[:, 0, 1] * oy
    mat[:, 1, 2] = mat[:, 1, 0] * ox + mat[:, 1, 1] * oy
    return F.affine_grid(mat, [n, 1, h, w], align_corners=False)


ViewKey = tuple[tuple[bool, bool, float, float, float, float], ...]


@functools.lru_cache(maxsize=GRID_CACHE_ENTRIES)
def _view_setup(key: ViewKey, h: int, w: int, device: str) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(hflip mask or None, vflip mask or None, sampling grid) of one list of transforms.

    Every request of a policy sends the same views, and building the grid cost 8x the
    sampling itself (0.15 ms of a 10-row probe on CPU), so it is built once per list, image
    size and device (:func:`views` caches only grids up to ``GRID_CACHE_MAX_CELLS``, so the
    cache holds at most 32 MiB). Built outside inference mode: a normal tensor is usable in
    and out of it."""
    dev = torch.device(device)
    with torch.inference_mode(False), torch.no_grad():
        def mask(i: int) -> torch.Tensor | None:
            flags = [t[i] for t in key]
            return torch.tensor(flags, device=dev).view(-1, 1, 1, 1) if any(flags) else None

        def col(i: int) -> torch.Tensor:
            return torch.tensor([t[i] for t in key], dtype=torch.float32, device=dev)

        return mask(0), mask(1), sampling_grid(len(key), h, w, col(2), col(3), col(4), col(5))


def views(base: torch.Tensor, transforms: list[probe_pb2.ViewTransform]) -> torch.Tensor:
    """One variant per transform: hflip, vflip, then the transform of :func:`sampling_grid`
    (bilinear, zero fill). ``base`` ``[C, H, W]``."""
    key = tuple((t.hflip, t.vflip, t.rotate_deg, t.shift_x, t.shift_y, t.scale or 1.0) for t in transforms)
    h, w = base.shape[-2], base.shape[-1]
    setup = _view_setup if len(key) * h * w <= GRID_CACHE_MAX_CELLS else _view_setup.__wrapped__
    hflip, vflip, grid = setup(key, h, w, str(base.device))
    x = base.unsqueeze(0).expand(len(transforms), *base.shape)
    if hflip is not None:
        x = torch.where(hflip, x.flip(-1), x)
    if vflip is not None:
        x = torch.where(vflip, x.flip(-2), x)
    return F.grid_sample(x.contiguous(), grid.to(x.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def window_bounds(n: int, grid: int) -> list[tuple[int, int]]:
    """Rows (or columns) ``[start, stop)`` of each of ``grid`` windows over ``n`` pixels."""
    return [((r * n) // grid, ((r + 1) * n) // grid) for r in range(grid)]


@functools.lru_cache(maxsize=GRID_CACHE_ENTRIES)
def _occlusion_masks(grid: int, h: int, w: int, device: str) -> torch.Tensor:
    """bool ``[grid^2, 1, H, W]``: mask k covers window (k // grid, k % grid). Built once per
    grid, image size and device (as :func:`_view_setup`): on a GPU its dozen small writes
    were a dozen kernel launches on every request."""
    with torch.inference_mode(False), torch.no_grad():
        rows = torch.zeros(grid, h, dtype=torch.bool)
        cols = torch.zeros(grid, w, dtype=torch.bool)
        for r, (a, b) in enumerate(window_bounds(h, grid)):
            rows[r, a:b] = True
        for c, (a, b) in enumerate(window_bounds(w, grid)):
            cols[c, a:b] = True
        mask = rows[:, None, :, None] & cols[None, :, None, :]  # [g, g, H, W]
        return mask.reshape(grid * grid, 1, h, w).to(device)


def occlusions(base: torch.Tensor, grid: int, fill: float) -> torch.Tensor:
    """``grid^2`` copies of ``base`` ``[C, H, W]``, window (r, c) set to ``fill``, row-major."""
    _, h, w = base.shape
    setup = _occlusion_masks if grid * grid * h * w <= GRID_CACHE_MAX_CELLS else _occlusion_masks.__wrapped__
    mask = setup(grid, h, w, str(base.device))
    return base.unsqueeze(0).expand(grid * grid, *base.shape).masked_fill(mask, fill)


def permutations(count: int, tiles: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` permutations of ``range(tiles)`` ``[count, tiles]`` (int64, on the CPU), each
    drawn with ``torch.randperm`` on ``generator`` and redrawn while it is the identity."""
    identity = torch.arange(tiles)
    out = []
    for _ in range(count):
        p = torch.randperm(tiles, generator=generator)
        while torch.equal(p, identity):
            p = torch.randperm(tiles, generator=generator)
        out.append(p)
    return torch.stack(out)


def shuffles(base: torch.Tensor, grid: int, perms: torch.Tensor) -> torch.Tensor:
    """Tile-shuffled copies of ``base`` ``[C, H, W]``: output tile i (row-major) of copy j
    is input tile ``perms[j, i]``. Returns ``[len(perms), C, H, W]``."""
    c, h, w = base.shape
    th, tw = h // grid, w // grid
    tiles = base.reshape(c, grid, th, grid, tw).permute(1, 3, 0, 2, 4).reshape(grid * grid, c, th, tw)
    out = tiles[perms]  # [n, g*g, C, th, tw]
    n = perms.shape[0]
    return out.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed % 2**64)


def gaussian_copies(base: torch.Tensor, section: probe_pb2.NoiseProbe, seed: int) -> torch.Tensor:
    """``section.count`` copies of ``base`` ``[C, H, W]`` plus N(0, sigma^2), not clamped (as
    trained), drawn on its device from a generator seeded with ``seed``: the jitter section,
    and the noise section of plan versions 1 and 2 (version 3: :func:`noise_stream`).
    Returns ``[count, C, H, W]``."""
    gen = _generator(seed, base.device)
    eps = torch.randn((section.count, *base.shape), generator=gen, device=base.device, dtype=base.dtype)
    return base + section.sigma * eps


_U64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea, Flood 2014) of ``x`` mod 2^64: a bijection
    on 64-bit integers that sends neighbouring inputs far apart."""
    z = (x + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def noise_stream(base: torch.Tensor, section: probe_pb2.NoiseProbe, seed: int) -> torch.Tensor:
    """Copies ``section.offset`` .. ``offset + count - 1`` of the seed's stream of noisy copies
    of ``base`` ``[C, H, W]`` (plan version 3): block k of the stream (copies 8k .. 8k + 7) is
    one standard-normal draw from a generator seeded with ``splitmix64(seed) + k``, so a
    copy's noise depends on the seed and its index alone, not on how the copies are split
    among plans (and the streams of seeds s and s + 1 almost surely share no block: PyTorch's
    CPU generator reads a seed's low 32 bits). Returns
    ``[count, C, H, W]``; at most 14 copies more are drawn than kept, whatever the offset."""
    first, stop = section.offset, section.offset + section.count
    if stop == first:
        return base.new_empty((0, *base.shape))
    head, skip = divmod(first, NOISE_BLOCK)
    blocks = -(-stop // NOISE_BLOCK) - head
    eps = torch.empty((blocks * NOISE_BLOCK, *base.shape), device=base.device, dtype=base.dtype)
    root = splitmix64(seed)
    for i in range(blocks):
        eps[i * NOISE_BLOCK:(i + 1) * NOISE_BLOCK].normal_(generator=_generator(root + head + i, base.device))
    return eps[skip:skip + section.count].mul_(section.sigma).add_(base)


def expand(base: torch.Tensor, plan: probe_pb2.ProbePlan | None) -> torch.Tensor:
    """The base image and every variant of a validated ``plan``, in plan order.

    ``base``: float32 ``[C, H, W]`` in [0, 1] on the model's device.
    Returns float32 ``[count_rows(plan), C, H, W]`` on the same device."""
    parts = [base.unsqueeze(0)]
    if plan is None:
        return parts[0]
    dev = base.device
    if plan.noise.count:
        draw = noise_stream if plan.version >= 3 else gaussian_copies
        parts.append(draw(base, plan.noise, plan.seed))
    if plan.squeeze.bit_depths:
        parts.append(bit_depths(base, tuple(plan.squeeze.bit_depths)))
    for k in plan.squeeze.median_sizes:
        parts.append(median_filter(base, k).unsqueeze(0))
    if plan.views:
        parts.append(views(base, list(plan.views)))
    if plan.occlusion.grid:
        parts.append(occlusions(base, plan.occlusion.grid, plan.occlusion.fill))
    if plan.shuffle.grid and plan.shuffle.count:
        # drawn on the CPU whatever the device: the same shuffles everywhere, and no wait for
        # the GPU at each identity check (a device-to-host copy per draw)
        perms = permutations(plan.shuffle.count, plan.shuffle.grid**2, _generator(plan.seed + 1, torch.device("cpu")))
        parts.append(shuffles(base, plan.shuffle.grid, perms.to(dev, non_blocking=True)))
    if plan.jitter.count:
        parts.append(gaussian_copies(base, plan.jitter, plan.seed + 2))
    return torch.cat(parts)
