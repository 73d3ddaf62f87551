"""Prepare stage for mini-ImageNet (Vinyals et al. 2016; the split of Ravi & Larochelle 2017).

Two inputs are accepted, as `download.locate_mini_imagenet` finds them:

- the widely shared pickled caches `mini-imagenet-cache-{train,val,test}.pkl`, each a dict with
  `image_data` uint8 (N, 84, 84, 3) and `class_dict` {wnid: [row indices]}. Pickles can run code
  when loaded, so they are read with an unpickler that only rebuilds numpy arrays and plain
  containers;
- a folder of the original JPEGs named as in the Ravi split files (`<wnid><8 digits>.jpg`),
  resized to 84x84 with LANCZOS as in Ravi & Larochelle's script.

Either way the result is `images.npy` (100, per_class, 3, 84, 84) uint8, classes ordered train |
val | test as in `splits.RAVI_WNIDS`, written through a memory map so the 1.3 GB array is never
held twice.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import Progress

from mamlbench.data.errors import DataError
from mamlbench.data.prepared import IMAGES
from mamlbench.data.splits import RAVI_PER_CLASS, RAVI_WNIDS, SPLITS
from mamlbench.io import atomic_path, write_json

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and containers; refuses any other global (which could run code)."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def load_cache(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            cache = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: unreadable mini-ImageNet cache ({err})") from None
    if not isinstance(cache, dict) or "image_data" not in cache or "class_dict" not in cache:
        raise DataError(f"{path}: expected a dict with 'image_data' and 'class_dict'")
    return cache


def _jpeg_files(folder: Path) -> dict[str, list[Path]]:
    by_class: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("n*.jpg")):
        match = re.fullmatch(r"(n\d{8})\d{8}\.jpg", path.name)
        if match:
            by_class.setdefault(match[1], []).append(path)
    return by_class


def prepare_mini_imagenet(source: dict, out_dir: str | os.PathLike, *, image_size: int = 84,
                          per_class: int = RAVI_PER_CLASS) -> dict:
    """Decode the user's mini-ImageNet into `out_dir` (see the module docstring).

    Args:
        source: {"kind": "pickles" | "jpeg", "path": folder}, as written by the download stage.
        per_class: images each class must hold (600; smaller in tests).
    """
    folder = Path(source["path"])
    wnids = [w for split in SPLITS for w in RAVI_WNIDS[split]]
    shape = (len(wnids), per_class, 3, image_size, image_size)
    out_dir = Path(out_dir)
    with atomic_path(out_dir / IMAGES) as tmp, Progress(transient=True) as progress:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        task = progress.add_task("decoding mini-ImageNet", total=len(wnids))
        if source["kind"] == "pickles":
            row = 0
            for split in SPLITS:
                path = folder / f"mini-imagenet-cache-{split}.pkl"
                cache = load_cache(path)
                data, class_dict = cache["image_data"], cache["class_dict"]
                if set(class_dict) != set(RAVI_WNIDS[split]):
                    raise DataError(f"{path}: classes differ from the Ravi {split} split "
                                    f"({len(class_dict)} found, {len(RAVI_WNIDS[split])} expected)")
                if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (image_size, image_size, 3):
                    raise DataError(f"{path}: image_data is {data.dtype} {data.shape}, expected uint8 (N, {image_size}, {image_size}, 3)")
                for wnid in RAVI_WNIDS[split]:
                    rows = list(class_dict[wnid])
                    if len(rows) != per_class:
                        raise DataError(f"{path}: class {wnid} has {len(rows)} images, expected {per_class}")
                    images[row] = data[rows].transpose(0, 3, 1, 2)  # (per_class, 3, H, W)
                    row += 1
                    progress.advance(task)
        else:
            files = _jpeg_files(folder)
            for row, wnid in enumerate(wnids):
                paths = files.get(wnid, [])
                if len(paths) != per_class:
                    raise DataError(f"{folder}: class {wnid} has {len(paths)} JPEGs, expected {per_class}")
                for j, path in enumerate(paths):
                    try:
                        with Image.open(path) as im:
                            im = im.convert("RGB").resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
                    except (OSError, SyntaxError, ValueError) as err:
                        raise DataError(f"{path}: unreadable JPEG ({err})") from None
                    images[row, j] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
                progress.advance(task)
        images.flush()
        del images
    bounds = np.cumsum([0] + [len(RAVI_WNIDS[s]) for s in SPLITS]).tolist()
    meta = dict(dataset="mini-imagenet", scheme="ravi", classes=[dict(wnid=w) for w in wnids],
                splits={"ravi": {s: list(range(bounds[i], bounds[i + 1])) for i, s in enumerate(SPLITS)}},
                rotations=[0], rotations_as_classes={"ravi": False}, shape=list(shape), image_size=image_size,
                source=source["kind"])
    write_json(out_dir / "meta.json", meta)
    return meta
