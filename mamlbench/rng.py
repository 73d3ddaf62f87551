"""Seeds derived from (seed, stream, index): any iteration's randomness without replaying the past.

Deriving rather than carrying RNG state is what makes a resumed run bit-identical to an
uninterrupted one: iteration i of seed s draws the same tasks wherever the run restarted.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """A 63-bit seed for `stream` (a name, e.g. 'train-tasks') at `index`, stable across processes."""
    entropy = [int(seed), zlib.crc32(stream.encode()), int(index)]
    high, low = (int(w) for w in np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32))
    return (high << 31) ^ low


def generator(seed: int, stream: str, index: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, index))
