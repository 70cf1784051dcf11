"""Small models shared by tests: each exercises one structure passes must get right."""

from __future__ import annotations

import torch
import torch.nn as nn

from tilefx.passes.training.calibration import Calibration


class ConvBN(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every batch norm non-trivial statistics so folding is really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bn(self.fc1(x)))


class SharedProducer(nn.Module):
    """The conv output feeds a BN and something else: folding would change the other use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Informative(nn.Module):
    """conv1 makes 4 channels from a labelled signal (small filters) and 4 from zero-mean noise
    (large filters, normalised back to unit scale by the batch norm); conv2 reads the signal
    channels and all but ignores the noise ones. L1 on the producer's filters prefers the noise
    channels; DCP must keep the signal ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[:4, 0] = torch.tensor([1.0, -1.0, 0.8, -0.8]).reshape(4, 1, 1)
            self.conv1.weight[4:, 1] = 10.0
            self.bn.running_var[4:] = 100.0
            self.conv2.weight.fill_(1e-3)
            self.conv2.weight[:, :4] = torch.eye(4).reshape(4, 4, 1, 1) * 2
            self.conv2.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(self.bn(self.conv1(x)))).mean((2, 3)))


def informative_data(batches: int = 3, n: int = 32) -> Calibration:
    """Labelled batches for :class:`Informative`: channel 0 carries the label, channel 1 noise."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        labels = torch.randint(0, 2, (n,), generator=generator)
        signal = (labels.float() * 2 - 1).reshape(n, 1, 1, 1) + 0.3 * torch.randn(
            n, 1, 4, 4, generator=generator
        )
        noise = torch.randn(n, 1, 4, 4, generator=generator)
        out.append((torch.cat([signal, noise], 1), labels))
    return Calibration(out)


def tiny_bert(heads: int = 4) -> nn.Module:
    """A one-layer BERT encoder (hidden 32, FFN 64) from transformers, built from a config."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=heads, intermediate_size=64
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


class MLP(nn.Module):
    """Two linears with a ReLU: the smallest model with block-sparse-able layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))
