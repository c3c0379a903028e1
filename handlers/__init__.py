"""TorchServe handlers. Never imports service/."""
