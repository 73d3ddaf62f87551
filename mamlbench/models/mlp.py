"""Fully connected ReLU networks: the paper's sinusoid regressor (1-40-40-1)."""
from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """in_features -> hidden... -> out_features with ReLU between layers."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int, init: str = "torch"):
        """`init="reference"`: the original MAML code's construct_fc_weights (maml.py:168-177), weights
        N(0, 0.01) truncated at 2 std and zero biases; "torch": PyTorch's layer defaults."""
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)
        if init == "reference":
            for m in self.net:
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.01, a=-0.02, b=0.02)
                    nn.init.zeros_(m.bias)
        elif init != "torch":
            raise ValueError(f"init must be reference or torch, got {init!r}")

    def forward(self, x: Tensor) -> Tensor:  # (batch, in_features) -> (batch, out_features)
        return self.net(x)
