"""Model build: data, training, export (TorchScript + ONNX), parity, model cards, archives."""
