"""Parameters of meta-reinforcement learning: the `rl` section of params.yaml."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RLParams:
    """Filled in by the meta-RL stages (issue 5)."""
