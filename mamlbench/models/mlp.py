"""Fully connected ReLU networks: the paper's sinusoid regressor (1-40-40-1)."""
from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """in_features -> hidden... -> out_features with ReLU between layers."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (batch, in_features) -> (batch, out_features)
        return self.net(x)
