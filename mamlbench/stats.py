"""The confidence interval every reported mean carries, in the reference code's formula.

The original MAML code (cbfinn/maml, main.py:199-201) reports `1.96 * np.std(x) / sqrt(n)` over its
600 test tasks: the population standard deviation (ddof 0). The same formula here keeps a CI
comparable with the paper's; with n = 600 it is 0.08% narrower than the ddof-1 one.
"""
from __future__ import annotations

import math

import numpy as np


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% CI, 1.96 std / sqrt(n) (std with ddof 0, as the
    reference); CI 0 for a single value."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(1.96 * values.std(ddof=0) / math.sqrt(values.size))
