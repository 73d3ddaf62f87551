"""Parameters of the data stages (download, prepare, episodize): the `data` section of params.yaml."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataParams:
    """Filled in by the data stages (issue 3)."""
