from pathlib import Path

import pytest
import torch
import torchvision

from model_store import models


@pytest.mark.parametrize("arch,dim", [("compact-cnn", 256), ("resnet18", 512)])
def test_models_take_pixels_and_return_logits_and_features(arch: str, dim: int) -> None:
    model = models.build(arch).eval()
    with torch.no_grad():
        logits, feats = model(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3, 10) and feats.shape == (3, dim)


def test_resnet18_fine_tunes_from_a_local_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = models.build("resnet18", weights=path)
    assert torch.equal(model.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    expected_stem = source.conv1.weight.sum(dim=1, keepdim=True)[:, :, 2:5, 2:5]
    assert torch.allclose(model.backbone.conv1.weight, expected_stem)


def test_weights_are_refused_for_the_compact_cnn(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resnet18"):
        models.build("compact-cnn", weights=tmp_path / "w.pth")


def test_weights_that_are_not_a_resnet18_state_dict_are_refused(tmp_path: Path) -> None:
    """Before, a checkpoint wrapping the state_dict loaded nothing (strict=False) and the card
    still named it as the pretrained weights."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    cases = {
        "wrapped": ({"state_dict": state}, "not a state_dict of tensors"),
        "tensor": (torch.zeros(3), "not a state_dict of tensors"),
        "partial": ({k: v for k, v in state.items() if not k.startswith("layer4.")}, "missing"),
        "extra": ({**state, "head.weight": torch.zeros(1)}, "unexpected"),
        # a CIFAR ResNet-18's 3x3 stem: its centre crop broadcast every kernel to one constant
        "3x3 stem": ({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, r"conv1.weight is \(64, 3, 3, 3\)"),
        # a wider block: load_state_dict's RuntimeError escaped as a traceback
        "size mismatch": ({**state, "layer1.0.conv1.weight": torch.zeros(32, 64, 3, 3)}, "size mismatch"),
    }
    for name, (obj, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        with pytest.raises(ValueError, match=message):
            models.build("resnet18", weights=path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")  # EOFError escaped
    for junk in ("junk.pth", "empty.pth"):
        with pytest.raises(ValueError, match="cannot load"):
            models.build("resnet18", weights=tmp_path / junk)
