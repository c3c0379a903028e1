import json
from pathlib import Path

import pytest

from model_store import build


def _card(store: Path, name: str = "fmnist-cnn") -> dict:
    return json.loads((store / name / "card.json").read_text())


def test_card_has_what_handlers_and_gate_read(tiny_store: Path, fmnist) -> None:
    card = _card(tiny_store)
    assert card["input"] == {"shape": [1, 28, 28], "dtype": "float32", "range": [0.0, 1.0], "mode": "L", "layout": "NCHW"}
    assert card["labels"][0] == "T-shirt/top" and len(card["labels"]) == 10
    assert card["noise_sigma"] == 0.25 and card["feature_dim"] == 256
    assert set(card["sweeps"]) == {"noise", "rotation", "shift"}
    assert card["accuracy"]["train_test_gap"] == pytest.approx(card["accuracy"]["train"] - card["accuracy"]["test"])
    names = {t["name"] for t in card["label_preserving_transforms"]}
    assert names == {k for k, v in card["transforms"].items() if v["preserves_label"]}
    # each transform's cost is measured against the same images' clean top-1, not the whole
    # test set's (the exported model's top-1 agrees with the trained one's: parity)
    import torch

    from model_store import evaluate

    model = torch.jit.load(str(tiny_store / "fmnist-cnn" / "model.pt"))
    same_images = evaluate.accuracy(model, fmnist.test, limit=card["sweep_images"])
    assert same_images != evaluate.accuracy(model, fmnist.test)  # else this could not tell them apart
    for t in card["transforms"].values():
        assert t["clean_accuracy"] == pytest.approx(same_images, abs=1e-9)
        assert t["preserves_label"] == (t["clean_accuracy"] - t["accuracy"] <= card["label_preserving_max_drop"])
    limit = card["training"]["limit"]
    assert card["data"]["train"] == (55_000 if limit is None else min(limit, 55_000))  # what it trained on
    assert (tiny_store / "fmnist-cnn" / "card.md").read_text().startswith("# Model card: fmnist-cnn")
    assert (tiny_store / "fmnist-cnn" / "sweeps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_model_meets_its_floor(default_store: Path) -> None:
    """The model the main command builds (full training) clears the issue's accuracy floor."""
    card = _card(default_store)
    assert card["accuracy"]["test"] >= build.PRESETS["fmnist-cnn"].floor == 0.90
    assert card["accuracy"]["test_noisy"] > 0.5  # noise training worked: still useful at sigma
    assert abs(card["accuracy"]["train_test_gap"]) < 0.05
    assert all(card["parity"][fmt]["ok"] and card["parity"][fmt]["images"] == 10_000 for fmt in ("torchscript", "onnx"))
    # The viewpoint check needs label-preserving small rotations and shifts.
    assert {"rotate+10", "rotate-10"} & {t["name"] for t in card["label_preserving_transforms"]}


def test_is_built_is_false_for_an_empty_store(tmp_path: Path) -> None:
    assert not build.is_built(tmp_path, "fmnist-cnn")
