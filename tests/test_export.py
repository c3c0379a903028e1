from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_store import data, export, models


def test_exports_are_single_files_with_logits_and_features(tiny_store: Path) -> None:
    model_dir = tiny_store / "fmnist-cnn"
    assert sorted(p.name for p in model_dir.iterdir() if p.suffix in {".pt", ".onnx", ".data"}) == [
        "model.onnx",
        "model.pt",
    ]
    proto = onnx.load(str(model_dir / "model.onnx"))
    assert [i.name for i in proto.graph.input] == [export.ONNX_INPUT]
    assert [o.name for o in proto.graph.output] == list(export.ONNX_OUTPUTS)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_both_exports_agree_on_real_images_at_any_batch(tiny_store: Path, fmnist: data.FashionMNIST, batch: int) -> None:
    model_dir = tiny_store / "fmnist-cnn"
    x = data.to_tensor(fmnist.test.images[:batch])
    ts = torch.jit.load(str(model_dir / "model.pt"))
    with torch.inference_mode():
        ts_logits, ts_feats = (t.numpy() for t in ts(x))
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ox_logits, ox_feats = sess.run(list(export.ONNX_OUTPUTS), {export.ONNX_INPUT: x.numpy()})
    assert ts_logits.shape == (batch, 10) and ts_feats.shape == (batch, models.CompactCNN.feature_dim)
    np.testing.assert_allclose(ox_logits, ts_logits, atol=1e-3)
    np.testing.assert_allclose(ox_feats, ts_feats, atol=1e-3)


def test_card_records_a_passing_parity_check(tiny_store: Path) -> None:
    import json

    card = json.loads((tiny_store / "fmnist-cnn" / "card.json").read_text())
    for fmt in ("torchscript", "onnx"):
        p = card["parity"][fmt]
        assert p["ok"] and p["max_logit_diff"] <= 1e-3 and p["top1_agreement"] >= 0.999


def test_parity_check_catches_a_diverging_export(tmp_path: Path, fmnist: data.FashionMNIST) -> None:
    torch.manual_seed(0)
    model = models.CompactCNN().eval()
    export.export_torchscript(model, tmp_path / "model.pt")
    export.export_onnx(model, tmp_path / "model.onnx")
    x = data.to_tensor(fmnist.test.images[:256])
    assert all(r.ok for r in export.parity(model, tmp_path / "model.pt", tmp_path / "model.onnx", x).values())
    with torch.no_grad():  # the eager model drifts away from its exports
        model.classifier[1].bias += 0.01
    reports = export.parity(model, tmp_path / "model.pt", tmp_path / "model.onnx", x)
    assert not reports["torchscript"].ok and not reports["onnx"].ok
    assert reports["onnx"].max_logit_diff == pytest.approx(0.01, abs=1e-4)


def test_resnet18_exports_agree_with_the_eager_model(tmp_path: Path, fmnist: data.FashionMNIST) -> None:
    """The ResNet-18 variant's export path, on a briefly trained model (batch-norm statistics
    moved off their defaults), with the build's own parity check."""
    from model_store.train import TrainConfig, train

    model = models.build("resnet18")
    train(model, fmnist.train, TrainConfig(epochs=1, batch_size=32, limit=320), progress=False)
    model.eval()
    export.export_torchscript(model, tmp_path / "model.pt")
    export.export_onnx(model, tmp_path / "model.onnx")
    x = data.to_tensor(fmnist.test.images[:256])
    reports = export.parity(model, tmp_path / "model.pt", tmp_path / "model.onnx", x)
    for fmt, r in reports.items():
        assert r.ok, (fmt, r)
        assert r.max_logit_diff <= 1e-3 and r.top1_agreement >= 0.999
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, feats = sess.run(list(export.ONNX_OUTPUTS), {export.ONNX_INPUT: x[:3].numpy()})
    assert logits.shape == (3, 10) and feats.shape == (3, models.ResNet18.feature_dim)
