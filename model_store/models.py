"""The model architectures. Every model has the same interface:

``forward(x: float32 [N, 1, 28, 28] in [0, 1]) -> (logits float32 [N, 10], features float32 [N, D])``

``features`` is the penultimate layer (the input of the classifier), which the gate's
feature-density check reads. Normalisation is inside the model, so every perturbation the
gate builds (noise, squeezing, transforms) works in plain [0, 1] pixel space.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

# Fashion-MNIST training-set statistics, in [0, 1] units.
MEAN = 0.2860
STD = 0.3530


class Normalize(nn.Module):
    def __init__(self, mean: float = MEAN, std: float = STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CompactCNN(nn.Module):
    """A compact CNN for 28x28 grey images: three conv blocks (32, 96, 192 channels), each
    followed by 2x2 max-pooling, then a 256-unit hidden layer (the features) and the classifier.

    About 0.65 M parameters and 14 M multiply-adds per image: sized so that training on
    2 CPU cores takes minutes, not hours. (A 32/64/128 version underfit: 90.5 % train,
    89.3 % test under the noise and augmentation the gate needs.)
    """

    feature_dim = 256

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.body = nn.Sequential(
            _conv_block(1, 32),
            nn.MaxPool2d(2),  # 14x14
            _conv_block(32, 96),
            nn.MaxPool2d(2),  # 7x7
            _conv_block(96, 192),
            nn.MaxPool2d(2),  # 3x3
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(192 * 3 * 3, self.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(self.feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.head(self.body(self.normalize(x)))
        return self.classifier(features), features


class ResNet18(nn.Module):
    """torchvision's ResNet-18 adapted to 1x28x28: a 3x3 stride-2 stem on one channel
    (28 -> 14; the four stages then run at 14, 7, 4, 2), no max-pool, and a 10-class
    classifier. A stride-1 stem costs 3.1x the compute (25 vs 7.9 min per epoch measured
    on 2 CPU cores) for a model already far larger than the task needs. Optionally starts from a local weights file
    (a ``state_dict`` of torchvision's ResNet-18, loaded with ``weights_only=True``);
    nothing is downloaded.
    """

    feature_dim = 512

    def __init__(self, num_classes: int = 10, weights: Path | None = None) -> None:
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        if weights is not None:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # weights_only refuses pickled code
                raise ValueError(f"cannot load {weights} as a state_dict: {str(e)[:300]}") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{weights} is not a state_dict of tensors (a checkpoint that wraps one, "
                                 "such as {'state_dict': ...}, must be unwrapped first)")
            conv1 = state.pop("conv1.weight", None)
            if conv1 is not None and tuple(conv1.shape) != (64, 3, 7, 7):  # a CIFAR 3x3 stem would broadcast
                raise ValueError(f"{weights} is not a torchvision ResNet-18 state_dict: conv1.weight is "
                                 f"{tuple(conv1.shape)}, not (64, 3, 7, 7)")
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            # The stem (conv1) and the head (fc) are replaced: everything else must be there.
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as e:  # a tensor of another shape: "size mismatch for ..."
                raise ValueError(f"{weights} is not a torchvision ResNet-18 state_dict: "
                                 f"{str(e).strip().splitlines()[-1][:300]}") from None
            missing = [k for k in missing if not k.startswith(("fc.", "conv1."))]
            if conv1 is None:  # popped above: the grey stem is made from it
                missing.append("conv1.weight")
            if missing or unexpected:
                raise ValueError(f"{weights} is not a torchvision ResNet-18 state_dict: "
                                 f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
        else:
            conv1 = None
        stem = nn.Conv2d(1, 64, 3, stride=2, padding=1, bias=False)
        if conv1 is not None:  # grey stem from the RGB 7x7 kernels: sum over RGB, centre 3x3
            with torch.no_grad():
                stem.weight.copy_(conv1.sum(dim=1, keepdim=True)[:, :, 2:5, 2:5])
        net.conv1 = stem
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.normalize = Normalize()
        self.backbone = net
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(self.normalize(x))
        return self.classifier(features), features


ARCHITECTURES = {"compact-cnn": CompactCNN, "resnet18": ResNet18}


def build(arch: str, weights: Path | None = None) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    if arch == "resnet18":
        return ResNet18(weights=weights)
    if weights is not None:
        raise ValueError("--weights is only supported for resnet18")
    return ARCHITECTURES[arch]()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
