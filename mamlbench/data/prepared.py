"""The prepared-data format shared by every dataset, and its loader.

A prepared dataset is a folder with two files:

- `images.npy`: uint8, shape (classes, per_class, C, H, W): every image of every class, one
  regular array, so an episode is a single gather `images[class, sample]` (Omniglot: 1623 x 20 x
  1 x 28 x 28 with strokes = 255; mini-ImageNet: 100 x 600 x 3 x 84 x 84);
- `meta.json`: the dataset name, per-class metadata (`classes`, e.g. alphabet / character / id for
  Omniglot, WordNet id for mini-ImageNet), the class indices of each split under each scheme
  (`splits[scheme][split]`), the default scheme, and how rotations augment classes.

`load_split(folder, split)` returns one split as a `SplitData` (a uint8 tensor plus its class
metadata); `content_hash(folder)` fingerprints both files so that stored episodes can tell when
the data under them changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mamlbench.data.errors import DataError
from mamlbench.data.splits import SPLITS
from mamlbench.io import atomic_path, write_json

IMAGES, META = "images.npy", "meta.json"


@dataclass(frozen=True)
class SplitData:
    """One split of a prepared dataset.

    images: uint8 (classes, per_class, C, H, W), on the CPU unless moved.
    classes: metadata of each class, in the order of `images`.
    rotations: quarter turns (0..3) that augment sampled classes; (0,) means none.
    rotations_as_classes: True when each (class, rotation) pair is its own class (Vinyals);
        False when rotation is drawn per sampled class on top of distinct classes (MAML).
    """
    dataset: str
    scheme: str
    split: str
    images: torch.Tensor
    classes: list[dict] = field(repr=False)
    rotations: tuple[int, ...] = (0,)
    rotations_as_classes: bool = False

    @property
    def n_classes(self) -> int:
        """Classes an episode draws from: rotations count when they make classes."""
        return len(self.classes) * (len(self.rotations) if self.rotations_as_classes else 1)


def write_prepared(out_dir: str | os.PathLike, images: np.ndarray, meta: dict) -> Path:
    """Write `images.npy` and `meta.json` atomically (images first: meta marks completion)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / IMAGES) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, images)
    write_json(out_dir / META, meta)
    return out_dir


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not path.is_file() or not (Path(folder) / IMAGES).is_file():
        raise DataError(f"{folder}: no prepared data (run the prepare stage first)")
    return json.loads(path.read_text())


_HASHES: dict[tuple, str] = {}


def content_hash(folder: str | os.PathLike) -> str:
    """sha256 over `images.npy` and `meta.json` (memoised per file size and mtime)."""
    folder = Path(folder)
    read_meta(folder)
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (folder / IMAGES, folder / META))
    if key not in _HASHES:
        digest = hashlib.sha256()
        for name in (IMAGES, META):
            with open(folder / name, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def load_split(folder: str | os.PathLike, split: str, scheme: str | None = None) -> SplitData:
    """Load one split of a prepared dataset as a uint8 tensor (memory-mapped, then copied once).

    Args:
        folder: the prepared folder (e.g. data/prepared/omniglot).
        split: train, val or test.
        scheme: which class split (Omniglot: maml, vinyals or lake); None: the one chosen at prepare time.
    """
    meta = read_meta(folder)
    scheme = scheme or meta["scheme"]
    if scheme not in meta["splits"]:
        raise DataError(f"unknown split scheme {scheme!r} for {meta['dataset']} (have: {', '.join(meta['splits'])})")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (have: {', '.join(SPLITS)})")
    index = meta["splits"][scheme][split]
    if not index:
        raise DataError(f"split {scheme}/{split} of {folder} holds no classes")
    array = np.load(Path(folder) / IMAGES, mmap_mode="r")
    images = torch.from_numpy(np.ascontiguousarray(array[index]))  # (classes, per_class, C, H, W)
    return SplitData(dataset=meta["dataset"], scheme=scheme, split=split, images=images,
                     classes=[meta["classes"][i] for i in index], rotations=tuple(meta["rotations"]),
                     rotations_as_classes=bool(meta["rotations_as_classes"][scheme]))


def split_counts(folder: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Classes (before rotation) per split, for each scheme: {scheme: {split: count}}."""
    meta = read_meta(folder)
    return {scheme: {s: len(v) for s, v in splits.items()} for scheme, splits in meta["splits"].items()}
