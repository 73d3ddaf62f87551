"""Prepare stage for Omniglot: decode the extracted PNGs into one uint8 array.

Each 105x105 1-bit PNG is resized to `image_size` as the MAML code's
`data/omniglot_resized/resize_images.py` does (`im.resize((28, 28), resample=Image.LANCZOS)` on the
image as opened): PIL resizes mode "1" images nearest-neighbour whatever the filter asked for, so
the original trained on binary 28x28 images (`resample="reference"`); `resample="lanczos"` converts
to greyscale first, which anti-aliases. Then inverted so that strokes are the foreground (255) on a
0 background, as MAML's data generator feeds them (data_generator.py:117-118, `1.0 - image`). The input must be complete: every
character has exactly 20 drawers and every archive holds its known number of characters, and an
unreadable or truncated PNG stops the stage with its path.

Characters are ordered by (archive, alphabet, character number), and both class splits are stored
in `meta.json` (see `mamlbench.data.splits`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import Progress

from mamlbench.data.errors import DataError
from mamlbench.data.params import OMNIGLOT_ARCHIVES, OMNIGLOT_DRAWERS
from mamlbench.data.prepared import write_prepared
from mamlbench.data.splits import LAKE_TEST_ARCHIVES, lake_split, maml_split, vinyals_split

_PNG = re.compile(r"^(\d{4})_(\d{2})\.png$")
_CHARACTER = re.compile(r"^character(\d+)$")


def list_characters(raw_dir: Path, archives: list[str], expected: dict[str, int] | None = None) -> list[dict]:
    """Scan `raw_dir/<archive>/<Alphabet>/characterNN/IIII_DD.png`; check counts; one dict per character."""
    expected = OMNIGLOT_ARCHIVES if expected is None else expected
    characters = []
    for archive in archives:
        root = raw_dir / archive
        if not root.is_dir():
            raise DataError(f"{root}: archive folder missing (run the download stage first)")
        found = []
        for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
            for folder in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                match = _CHARACTER.match(folder.name)
                if not match:
                    raise DataError(f"{folder}: expected a folder named characterNN")
                files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
                if len(files) != OMNIGLOT_DRAWERS or not all(_PNG.match(p.name) for p in files):
                    raise DataError(f"{folder}: expected {OMNIGLOT_DRAWERS} drawers named IIII_DD.png, found {len(files)} PNGs")
                found.append(dict(archive=archive, alphabet=alphabet.name, character=int(match[1]),
                                  id=int(_PNG.match(files[0].name)[1]), files=[str(p) for p in files]))
        found.sort(key=lambda c: (c["alphabet"], c["character"]))
        if archive in expected and len(found) != expected[archive]:
            raise DataError(f"{root}: expected {expected[archive]} characters, found {len(found)}")
        characters += found
    return characters


def decode(path: str, size: int, resample: str = "reference") -> np.ndarray:
    """One PNG as a (size, size) uint8 array, strokes 255 on a 0 background (see the module docstring)."""
    if resample not in ("reference", "lanczos"):
        raise ValueError(f"resample must be reference or lanczos, got {resample!r}")
    try:
        with Image.open(path) as im:
            if resample == "lanczos":
                im = im.convert("L")
            im = im.resize((size, size), resample=Image.Resampling.LANCZOS).convert("L")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable PNG ({err})") from None
    return 255 - np.asarray(im, dtype=np.uint8)


def prepare_omniglot(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, *, archives: list[str],
                     image_size: int = 28, resample: str = "reference", scheme: str = "maml", maml_sizes: tuple[int, int] = (1100, 100),
                     split_seed: int = 1, rotations: list[int] = (0, 90, 180, 270),
                     expected: dict[str, int] | None = None, lake_val_alphabets: int = 5) -> dict:
    """Decode every character into `out_dir/images.npy` (chars, 20, 1, size, size) and `meta.json`.

    Args:
        raw_dir: the download stage's folder, holding one extracted folder per archive.
        archives: which archives to read, in order.
        resample: reference (binary, as the MAML code) or lanczos; see `decode`.
        scheme: default class split recorded for `load_split` (maml, vinyals or lake).
        lake_val_alphabets: background alphabets the lake split holds out for meta-validation.
        maml_sizes: meta-train and meta-val characters of the maml split (the rest is meta-test).
        rotations: degrees (multiples of 90) that augment sampled classes.
        expected: characters per archive; None: the official counts (964, 659, 136, 156).
    Returns: the written meta (without the per-class file lists).
    """
    characters = list_characters(Path(raw_dir), list(archives), expected)
    images = np.empty((len(characters), OMNIGLOT_DRAWERS, 1, image_size, image_size), dtype=np.uint8)
    with Progress(transient=True) as progress:
        task = progress.add_task("decoding Omniglot", total=len(characters))
        for i, char in enumerate(characters):
            for j, path in enumerate(char.pop("files")):
                images[i, j, 0] = decode(path, image_size, resample)
            progress.advance(task)
    maml = maml_split(len(characters), *maml_sizes, split_seed)
    vinyals = [vinyals_split(c["alphabet"], c["character"]) for c in characters]
    assigned = [("maml", maml), ("vinyals", vinyals)]
    try:  # recorded whenever it exists (both kinds of archive read, enough alphabets); required for scheme lake
        assigned.append(("lake", lake_split(characters, lake_val_alphabets, split_seed)))
    except DataError:
        if scheme == "lake":
            raise
    splits = {name: {s: [i for i, x in enumerate(assign) if x == s] for s in ("train", "val", "test")}
              for name, assign in assigned}
    meta = dict(dataset="omniglot", scheme=scheme, classes=characters, splits=splits,
                rotations=[r // 90 for r in rotations],
                rotations_as_classes={"maml": False, "vinyals": True, "lake": False},
                shape=list(images.shape), image_size=image_size, resample=resample, archives=list(archives),
                maml_sizes=list(maml_sizes), split_seed=split_seed)
    write_prepared(out_dir, images, meta)
    return meta
