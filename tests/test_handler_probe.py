"""Probe plans in process: the shared example plans, row order, seeding, and every probe
against an independent reference computation (NumPy, SciPy, the training augmentation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from google.protobuf import json_format

from handlers import probe
from model_store import data
from model_store.evaluate import apply_view
from robustgate.v1 import probe_pb2

EXAMPLES = Path(__file__).resolve().parent.parent / "proto" / "examples"
INDEX = json.loads((EXAMPLES / "index.json").read_text())
SHAPE = probe.Shape(1, 28, 28)


def load_plan(name: str) -> probe_pb2.ProbePlan:
    return json_format.Parse((EXAMPLES / name).read_text(), probe_pb2.ProbePlan())


@pytest.fixture(scope="module")
def base(fmnist: data.FashionMNIST) -> torch.Tensor:
    """A real test image, float32 [1, 28, 28] in [0, 1]."""
    return data.to_tensor(fmnist.test.images[:1])[0]


@pytest.mark.parametrize("name", sorted(INDEX["valid"]))
def test_example_plans_declare_their_rows(name: str, base: torch.Tensor) -> None:
    plan = load_plan(name)
    rows = INDEX["valid"][name]["rows"]
    assert probe.validate(plan, SHAPE, max_variants=2048) == rows == probe.count_rows(plan)
    out = probe.expand(base, plan)
    assert out.shape == (rows, 1, 28, 28) and out.dtype == torch.float32
    assert torch.equal(out[0], base)


@pytest.mark.parametrize("name", sorted(INDEX["invalid"]))
def test_invalid_example_plans_are_refused(name: str) -> None:
    with pytest.raises(probe.PlanError, match=INDEX["invalid"][name].replace(".", r"\.")):
        probe.validate(load_plan(name), SHAPE, max_variants=2048)


def test_rows_follow_plan_order(base: torch.Tensor) -> None:
    plan = load_plan("full.json")
    out = probe.expand(base, plan)
    i = 1 + plan.noise.count
    for b in plan.squeeze.bit_depths:
        assert torch.equal(out[i], probe.bit_depth(base, b)), f"bits {b} at row {i}"
        i += 1
    for k in plan.squeeze.median_sizes:
        assert torch.equal(out[i], probe.median_filter(base, k)), f"median {k} at row {i}"
        i += 1
    for v in plan.views:
        assert torch.equal(out[i], probe.views(base, [v])[0]), f"view at row {i}"
        i += 1
    assert torch.equal(out[i : i + 9], probe.occlusions(base, 3, 0.5))
    assert i + 9 + plan.shuffle.count + plan.jitter.count == out.shape[0]
    assert plan.jitter.count == 2  # the example holds every section


def test_same_plan_and_seed_give_bit_identical_variants(base: torch.Tensor) -> None:
    plan = load_plan("full.json")
    assert torch.equal(probe.expand(base, plan), probe.expand(base, plan))
    other = probe_pb2.ProbePlan()
    other.CopyFrom(plan)
    other.seed += 1
    a, b = probe.expand(base, plan), probe.expand(base, other)
    assert not torch.equal(a[1:17], b[1:17])  # noise differs
    assert torch.equal(a[17:-6], b[17:-6])  # deterministic probes do not
    assert not torch.equal(a[-6:-2], b[-6:-2]) and not torch.equal(a[-2:], b[-2:])  # shuffles, jitter


def test_noise_matches_reference_and_plan_statistics(base: torch.Tensor) -> None:
    sigma, n, seed = 0.25, 400, 123
    plan = probe_pb2.ProbePlan(version=1, seed=seed, noise=probe_pb2.NoiseProbe(sigma=sigma, count=n))
    out = probe.expand(base, plan)[1:]
    gen = torch.Generator().manual_seed(seed)
    ref = base + np.float32(sigma) * torch.randn((n, 1, 28, 28), generator=gen)
    assert torch.equal(out, ref)
    eps = (out - base).double()
    # n * 784 = 313,600 draws: the mean's standard error is sigma / 560.
    assert abs(eps.mean().item()) < 4 * sigma / np.sqrt(eps.numel())
    assert eps.std().item() == pytest.approx(sigma, rel=0.01)
    assert out.min() < 0.0  # not clamped, as trained


def stream_plan(count: int, offset: int = 0, seed: int = 99, sigma: float = 0.25) -> probe_pb2.ProbePlan:
    return probe_pb2.ProbePlan(version=3, seed=seed,
                               noise=probe_pb2.NoiseProbe(sigma=sigma, count=count, offset=offset))


def test_version_3_noise_is_one_stream_whatever_the_batches(base: torch.Tensor) -> None:
    """Copy i of the stream is row i % 8 of block i // 8, drawn from splitmix64(seed) + i // 8:
    pieces at any offsets and counts give the copies one plan of the whole budget gives, so
    the gateway's sequential batches draw exactly what the full budget would."""
    # SplitMix64's published first outputs from state 0: its output function at 0 and at 0 + gamma
    assert probe.splitmix64(0) == 0xE220A8397B1DCDAF and probe.splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    sigma, seed = 0.25, 99
    whole = probe.expand(base, stream_plan(40, seed=seed))[1:]
    root = probe.splitmix64(seed)
    blocks = [torch.randn((8, 1, 28, 28), generator=torch.Generator().manual_seed(root + k)) for k in range(5)]
    assert torch.equal(whole, base + np.float32(sigma) * torch.cat(blocks))
    pieces = [(0, 8), (8, 8), (16, 3), (19, 13), (32, 8)]  # block edges and not
    got = torch.cat([probe.expand(base, stream_plan(n, offset=o, seed=seed))[1:] for o, n in pieces])
    assert torch.equal(got, whole)
    assert torch.equal(probe.expand(base, stream_plan(5, offset=13, seed=seed))[1:], whole[13:18])
    # the next seed's stream shares no block with this one (seed + 3 + k would: its block k is
    # this one's block k + 1), nor is any block the shuffle's or the jitter's draw
    following = probe.expand(base, stream_plan(40, seed=seed + 1))[1:]
    assert not any(torch.equal(following[8 * j:8 * j + 8], whole[8 * k:8 * k + 8]) for j in range(5) for k in range(5))
    for other in (seed, seed + 1, seed + 2):
        assert not torch.equal(blocks[0], torch.randn((8, 1, 28, 28), generator=torch.Generator().manual_seed(other)))
    # the end of the uint32 range: the blocks it covers and no more
    far = stream_plan(3, offset=2**32 - 3, seed=2**64 - 1)
    last = torch.randn((8, 1, 28, 28), generator=torch.Generator().manual_seed((probe.splitmix64(2**64 - 1) + (2**32 - 3) // 8) % 2**64))
    assert torch.equal(probe.expand(base, far)[1:], base + np.float32(sigma) * last[5:])
    assert probe.noise_stream(base, probe_pb2.NoiseProbe(sigma=sigma, count=0, offset=16), seed).shape == (0, 1, 28, 28)


def test_noise_offset_needs_version_3_and_the_noise_section(base: torch.Tensor) -> None:
    shape = probe.Shape(1, 28, 28)
    v2 = stream_plan(8, offset=8)
    v2.version = 2
    with pytest.raises(probe.PlanError, match="noise.offset needs plan version 3"):
        probe.validate(v2, shape, 100)
    jitter = probe_pb2.ProbePlan(version=3, jitter=probe_pb2.NoiseProbe(sigma=0.03, count=4, offset=4))
    with pytest.raises(probe.PlanError, match="jitter.offset must be 0"):
        probe.validate(jitter, shape, 100)
    # a version 2 plan draws its noise in one piece, as it always did
    v2.noise.offset = 0
    gen = torch.Generator().manual_seed(99)
    assert probe.validate(v2, shape, 100) == 9
    assert torch.equal(probe.expand(base, v2)[1:], base + np.float32(0.25) * torch.randn((8, 1, 28, 28), generator=gen))


def test_shuffle_draws_do_not_depend_on_noise_count(base: torch.Tensor) -> None:
    def plan(noise: int) -> probe_pb2.ProbePlan:
        return probe_pb2.ProbePlan(version=1, seed=5, noise=probe_pb2.NoiseProbe(sigma=0.5, count=noise),
                                   shuffle=probe_pb2.ShuffleProbe(grid=4, count=3))

    assert torch.equal(probe.expand(base, plan(0))[-3:], probe.expand(base, plan(10))[-3:])


def test_jitter_rows_come_last_from_their_own_seed(base: torch.Tensor) -> None:
    sigma, n, seed = 0.03, 4, 77
    shuffle = probe_pb2.ShuffleProbe(grid=2, count=2)

    def plan(jitter: int, noise: int = 0) -> probe_pb2.ProbePlan:
        return probe_pb2.ProbePlan(version=2, seed=seed, shuffle=shuffle,
                                   noise=probe_pb2.NoiseProbe(sigma=0.25, count=noise),
                                   jitter=probe_pb2.NoiseProbe(sigma=sigma, count=jitter))

    out = probe.expand(base, plan(n, noise=3))
    assert out.shape[0] == probe.count_rows(plan(n, noise=3)) == 1 + 3 + 2 + n
    gen = torch.Generator().manual_seed(seed + 2)
    assert torch.equal(out[-n:], base + np.float32(sigma) * torch.randn((n, 1, 28, 28), generator=gen))
    # Its own generator: the noise and shuffle rows draw what they drew without jitter.
    assert torch.equal(out[:-n], probe.expand(base, plan(0, noise=3)))
    with pytest.raises(probe.PlanError, match="jitter.sigma"):
        probe.validate(probe_pb2.ProbePlan(version=2, jitter=probe_pb2.NoiseProbe(count=2)),
                       probe.Shape(1, 28, 28), 100)
    # Version 1 plans are still served, without jitter: a version 1 handler would drop it.
    with pytest.raises(probe.PlanError, match="jitter needs plan version 2"):
        probe.validate(probe_pb2.ProbePlan(version=1, jitter=probe_pb2.NoiseProbe(sigma=0.03, count=2)),
                       probe.Shape(1, 28, 28), 100)
    assert probe.validate(probe_pb2.ProbePlan(version=1, squeeze=probe_pb2.SqueezeProbe(bit_depths=[2])),
                          probe.Shape(1, 28, 28), 100) == 2


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bit_depth_matches_numpy(base: torch.Tensor, bits: int) -> None:
    m = np.float32(2**bits - 1)
    ref = np.rint(base.numpy() * m) / m
    assert np.array_equal(probe.bit_depth(base, bits).numpy(), ref)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_median_matches_scipy(base: torch.Tensor, k: int) -> None:
    ref = scipy.ndimage.median_filter(base.numpy(), size=(1, k, k), mode="reflect")
    assert np.array_equal(probe.median_filter(base, k).numpy(), ref)


VIEWS = [
    {"rotate_deg": 10.0},
    {"rotate_deg": -40.0},
    {"shift_x": 2.0, "shift_y": -3.0},
    {"scale": 0.9},
    {"scale": 1.2, "rotate_deg": 15.0, "shift_x": -1.5},
    {"hflip": True},
    {"vflip": True, "rotate_deg": 5.0},
]


def test_views_match_the_training_augmentation(base: torch.Tensor) -> None:
    plan = probe_pb2.ProbePlan(version=1, views=[probe_pb2.ViewTransform(**v) for v in VIEWS])
    out = probe.expand(base, plan)[1:]
    for i, v in enumerate(VIEWS):
        ref = apply_view(base[None], v)[0]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-6, msg=f"view {v}")


def test_view_grids_are_built_once_and_used_in_and_out_of_inference_mode(base: torch.Tensor) -> None:
    transforms = [probe_pb2.ViewTransform(**v) for v in VIEWS]
    probe._view_setup.cache_clear()
    with torch.inference_mode():
        first = probe.views(base, transforms)
    again = probe.views(base, transforms)  # outside inference mode, from the cache
    assert probe._view_setup.cache_info().hits == 1 and probe._view_setup.cache_info().misses == 1
    assert torch.equal(first, again)
    for i, v in enumerate(VIEWS):  # the cached grid gives what a fresh one gives
        assert torch.equal(again[i], probe.views(base, [transforms[i]])[0]), v
    # Grids too large to keep are built for the call and dropped; the cache stays bounded.
    big = torch.zeros(1, 1024, 1024)
    probe._view_setup.cache_clear()
    probe.views(big, transforms[:1])
    assert probe._view_setup.cache_info().currsize == 0
    for angle in range(probe.GRID_CACHE_ENTRIES + 3):
        probe.views(base, [probe_pb2.ViewTransform(rotate_deg=float(angle))])
    assert probe._view_setup.cache_info().currsize == probe.GRID_CACHE_ENTRIES


def test_rotation_is_counter_clockwise() -> None:
    x = torch.zeros(1, 28, 28)
    x[0, 4, 14] = 1.0  # a dot above the centre
    out = probe.views(x, [probe_pb2.ViewTransform(rotate_deg=90.0)])[0, 0]
    y, xx = divmod(int(out.argmax()), 28)
    assert xx < 14 and abs(y - 13.5) < 1.5  # CCW on screen: top goes to the left


@pytest.mark.parametrize("grid,fill", [(3, 0.5), (4, 0.0), (7, 1.0)])
def test_occlusion_matches_reference(base: torch.Tensor, grid: int, fill: float) -> None:
    out = probe.occlusions(base, grid, fill).numpy()
    x = base.numpy()
    k = 0
    for r in range(grid):
        for c in range(grid):
            ref = x.copy()
            ref[:, r * 28 // grid : (r + 1) * 28 // grid, c * 28 // grid : (c + 1) * 28 // grid] = fill
            assert np.array_equal(out[k], ref), (r, c)
            k += 1


def test_occlusion_masks_are_built_once_and_used_in_and_out_of_inference_mode(base: torch.Tensor) -> None:
    probe._occlusion_masks.cache_clear()
    with torch.inference_mode():
        first = probe.occlusions(base, 4, 0.5)
    again = probe.occlusions(base, 4, 0.5)  # outside inference mode, from the cache
    other_fill = probe.occlusions(base, 4, 0.0)  # the fill is not part of the mask
    info = probe._occlusion_masks.cache_info()
    assert (info.hits, info.misses) == (2, 1) and torch.equal(first, again)
    assert not torch.equal(first, other_fill)
    # masks too large to keep are built for the call and dropped; the cache stays bounded
    probe._occlusion_masks.cache_clear()
    probe.occlusions(torch.zeros(1, 1024, 1024), 2, 0.0)
    assert probe._occlusion_masks.cache_info().currsize == 0
    for grid in range(1, probe.GRID_CACHE_ENTRIES + 4):
        probe.occlusions(base, grid, 0.0)
    assert probe._occlusion_masks.cache_info().currsize == probe.GRID_CACHE_ENTRIES


@pytest.mark.parametrize("bits", [(2, 3, 4), (8, 1), (5,)])
def test_bit_depths_at_once_equal_one_depth_at_a_time(base: torch.Tensor, bits: tuple[int, ...]) -> None:
    out = probe.bit_depths(base, bits)
    assert out.shape == (len(bits), *base.shape)
    for i, b in enumerate(bits):  # the same float32 arithmetic: bit for bit
        assert torch.equal(out[i], probe.bit_depth(base, b)), b


@pytest.mark.parametrize("grid", [2, 4, 7])
def test_shuffle_matches_reference(base: torch.Tensor, grid: int) -> None:
    seed, count = 99, 6
    plan = probe_pb2.ProbePlan(version=1, seed=seed, shuffle=probe_pb2.ShuffleProbe(grid=grid, count=count))
    out = probe.expand(base, plan)[1:].numpy()
    gen = torch.Generator().manual_seed(seed + 1)
    t = 28 // grid
    x = base.numpy()
    tiles = [x[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r in range(grid) for c in range(grid)]
    for j in range(count):
        p = torch.randperm(grid * grid, generator=gen)
        while torch.equal(p, torch.arange(grid * grid)):
            p = torch.randperm(grid * grid, generator=gen)
        ref = np.zeros_like(x)
        for i, src in enumerate(p.tolist()):
            r, c = divmod(i, grid)
            ref[:, r * t : (r + 1) * t, c * t : (c + 1) * t] = tiles[src]
        assert np.array_equal(out[j], ref), f"copy {j}"
        assert not np.array_equal(out[j], x) or len({tile.tobytes() for tile in tiles}) < grid * grid


def test_seed_wraps_at_2_64(base: torch.Tensor) -> None:
    plan = probe_pb2.ProbePlan(version=1, seed=2**64 - 1, noise=probe_pb2.NoiseProbe(sigma=0.1, count=2),
                               shuffle=probe_pb2.ShuffleProbe(grid=2, count=1))
    assert probe.expand(base, plan).shape[0] == 4  # the shuffle generator is seeded with 0


def test_limits() -> None:
    plan = probe_pb2.ProbePlan(version=1, noise=probe_pb2.NoiseProbe(sigma=0.25, count=100))
    assert probe.validate(plan, SHAPE, max_variants=100) == 101
    with pytest.raises(probe.PlanError, match="at most 99"):
        probe.validate(plan, SHAPE, max_variants=99)
    # the size is checked before any entry is visited: a request of millions of views (8 MiB
    # of empty ones is four million) costs its lengths, not a loop over every one
    many = probe_pb2.ProbePlan(version=1, views=[probe_pb2.ViewTransform(rotate_deg=float("nan"))] * 101)
    with pytest.raises(probe.PlanError, match="asks for 101 variants; this model allows at most 100"):
        probe.validate(many, SHAPE, max_variants=100)
    for bad in (
        probe_pb2.ProbePlan(version=1, views=[probe_pb2.ViewTransform(rotate_deg=float("nan"))]),
        probe_pb2.ProbePlan(version=1, views=[probe_pb2.ViewTransform(shift_x=40.0)]),
        probe_pb2.ProbePlan(version=1, occlusion=probe_pb2.OcclusionProbe(grid=29)),
        probe_pb2.ProbePlan(version=1, noise=probe_pb2.NoiseProbe(sigma=float("inf"), count=1)),
        probe_pb2.ProbePlan(version=0),
    ):
        with pytest.raises(probe.PlanError):
            probe.validate(bad, SHAPE, max_variants=2048)
