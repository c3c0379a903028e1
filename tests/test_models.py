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
