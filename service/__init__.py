"""RobustGate's gateway: gRPC API, pipeline, robustness gate (service.gate), TorchServe backend."""
