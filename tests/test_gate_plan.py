"""ProbeSpec: row layout in plan order, protobuf-JSON mapping, validation, seeds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from service.gate.errors import PlanError
from service.gate.plan import (
    NoiseSpec, OcclusionSpec, ProbeSpec, ShuffleSpec, SqueezeSpec, ViewSpec, derive_seed,
)

FULL = ProbeSpec(
    seed=12345678901234567890,
    noise=NoiseSpec(sigma=0.25, count=5),
    squeeze=SqueezeSpec(bit_depths=(1, 2, 4), median_sizes=(2,)),
    views=(ViewSpec(rotate_deg=10.0), ViewSpec(shift_x=-2.0, shift_y=2.0, scale=1.5),
           ViewSpec(hflip=True)),
    occlusion=OcclusionSpec(grid=3, fill=0.5),
    shuffle=ShuffleSpec(grid=2, count=4),
    return_features=True,
    jitter=NoiseSpec(sigma=0.0625, count=2),  # exact in float32, as the wire sends it
)


def test_layout_follows_plan_order() -> None:
    lay = FULL.layout()
    assert (lay.base.start, lay.base.stop) == (0, 1)
    assert (lay.noise.start, lay.noise.stop) == (1, 6)
    assert (lay.squeeze_bits.start, lay.squeeze_bits.stop) == (6, 9)
    assert (lay.squeeze_median.start, lay.squeeze_median.stop) == (9, 10)
    assert (lay.squeeze.start, lay.squeeze.stop) == (6, 10)
    assert (lay.views.start, lay.views.stop) == (10, 13)
    assert (lay.occlusion.start, lay.occlusion.stop) == (13, 22)
    assert (lay.shuffle.start, lay.shuffle.stop) == (22, 26)
    assert (lay.jitter.start, lay.jitter.stop) == (26, 28)  # last: earlier rows keep their place
    assert lay.rows == FULL.rows == 28


def test_with_seed_changes_only_the_seed() -> None:
    for seed in (0, 7, 2**64 - 1):
        assert FULL.with_seed(seed) == replace(FULL, seed=seed)
    assert FULL.with_seed(7).layout() == FULL.layout()
    assert FULL.seed == 12345678901234567890  # the original is untouched
    for bad in (-1, 2**64):
        with pytest.raises(PlanError, match="plan.seed"):
            FULL.with_seed(bad)


def test_empty_plan_is_one_row() -> None:
    lay = ProbeSpec().layout()
    assert lay.rows == 1
    assert lay.noise.start == lay.noise.stop == 1
    assert lay.shuffle.start == lay.shuffle.stop == 1


def test_squeezer_names_in_row_order() -> None:
    assert FULL.squeeze.names() == ("bits1", "bits2", "bits4", "median2")


def test_dict_round_trip_through_json() -> None:
    d = FULL.to_dict()
    assert set(d) == {"version", "seed", "noise", "squeeze", "views", "occlusion", "shuffle",
                      "return_features", "jitter"}
    assert d["jitter"] == {"sigma": 0.0625, "count": 2}
    # A plan without jitter writes what plans wrote before it existed (older readers refuse
    # fields they do not know).
    assert "jitter" not in replace(FULL, jitter=NoiseSpec()).to_dict()
    assert d["squeeze"] == {"bit_depths": [1, 2, 4], "median_sizes": [2]}
    assert ProbeSpec.from_dict(json.loads(json.dumps(d))) == FULL
    # a noise offset is written only when set, as jitter: plans without one read as before
    assert "offset" not in d["noise"]
    streamed = replace(FULL, noise=NoiseSpec(sigma=0.25, count=5, offset=40))
    assert streamed.to_dict()["noise"] == {"sigma": 0.25, "count": 5, "offset": 40}
    assert ProbeSpec.from_dict(json.loads(json.dumps(streamed.to_dict()))) == streamed


def test_from_dict_accepts_protobuf_json_spellings() -> None:
    spec = ProbeSpec.from_dict({
        "version": 1, "seed": "42",
        "noise": {"sigma": 0.5, "count": "3"},
        "squeeze": {"bitDepths": [4], "medianSizes": [3]},
        "views": [{"rotateDeg": 5}], "returnFeatures": True,
    })
    assert spec.seed == 42 and spec.noise == NoiseSpec(0.5, 3)
    assert spec.squeeze == SqueezeSpec((4,), (3,))
    assert spec.views == (ViewSpec(rotate_deg=5.0),)
    assert spec.return_features is True
    assert spec.occlusion == OcclusionSpec() and spec.shuffle == ShuffleSpec()


@pytest.mark.parametrize("bad, where", [
    ({"version": 4}, "version"),
    ({"version": 2, "noise": {"count": 8, "sigma": 0.1, "offset": 8}}, "version 3"),
    ({"version": 3, "noise": {"count": 8, "sigma": 0.1, "offset": -1}}, "noise.offset"),
    ({"version": 3, "noise": {"count": 8, "sigma": 0.1, "offset": 2**32}}, "noise.offset"),
    ({"version": 3, "jitter": {"count": 4, "sigma": 0.1, "offset": 4}}, "jitter.offset"),
    ({"version": 1, "jitter": {"count": 1, "sigma": 0.1}}, "version 2"),
    ({"version": 1, "squeeze": {"bit_depths": [9]}}, "bit_depths"),
    ({"version": 1, "squeeze": {"median_sizes": [1]}}, "median_sizes"),
    ({"version": 1, "noise": {"count": 4}}, "sigma"),
    ({"version": 2, "jitter": {"count": 4}}, "jitter.sigma"),
    ({"version": 2, "jitter": {"count": 1, "sigma": -0.1}}, "jitter"),
    ({"version": 2, "jitter": {"count": 1, "sigma": 0.1, "seed": 3}}, "plan.jitter"),
    ({"version": 1, "shuffle": {"grid": 1, "count": 2}}, "shuffle"),
    ({"version": 1, "shuffle": {"grid": 0, "count": 2}}, "shuffle"),
    ({"version": 1, "occlusion": {"grid": 2, "fill": 1.5}}, "occlusion"),
    ({"version": 1, "views": [{"scale": -1}]}, "views[0]"),
    ({"version": 1, "views": [{"hflip": 1}]}, "views[0].hflip"),
    ({"version": 1, "nosie": {}}, "nosie"),
    ({"version": 1, "seed": -1}, "seed"),
    ({"version": 1, "seed": 2**64}, "seed"),
    ({"version": 1, "noise": {"count": 1.5, "sigma": 0.1}}, "noise.count"),
    ([1, 2], "plan"),
])
def test_from_dict_rejects_bad_plans(bad: object, where: str) -> None:
    with pytest.raises(PlanError, match=where.replace("[", r"\[").replace("]", r"\]")):
        ProbeSpec.from_dict(bad)  # type: ignore[arg-type]


def test_protobuf_json_agrees_with_generated_message() -> None:
    pb = pytest.importorskip("robustgate.v1.probe_pb2")
    json_format = pytest.importorskip("google.protobuf.json_format")
    msg = json_format.ParseDict(FULL.to_dict(), pb.ProbePlan())
    assert msg.shuffle.count == 4 and list(msg.squeeze.bit_depths) == [1, 2, 4]
    back = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    assert ProbeSpec.from_dict(back) == FULL  # seed arrives as a string, defaults omitted


def test_derive_seed_is_deterministic_and_distinct() -> None:
    seeds = [derive_seed(7, i) for i in range(50)]
    assert seeds == [derive_seed(7, i) for i in range(50)]
    assert len(set(seeds)) == 50
    assert derive_seed(8, 0) != seeds[0]
    assert all(0 <= s < 2**64 for s in seeds)
    ProbeSpec(seed=seeds[0])  # valid as a plan seed
