"""Small, real inputs for the data tests: Omniglot-like PNG trees, zips, mirrors, mini-ImageNet pickles."""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# archive -> alphabet -> character numbers. Hebrew is Vinyals-val, Kannada and Gurmukhi >= 42 Vinyals-test.
TREE = {
    "images_background": {"Latin": [1, 2, 3, 4], "Hebrew": [1, 2]},
    "images_evaluation": {"Kannada": [1, 2], "Gurmukhi": [41, 42]},
}
COUNTS = {a: sum(len(c) for c in alphabets.values()) for a, alphabets in TREE.items()}


def glyph(char_index: int, drawer: int) -> Image.Image:
    """A 105x105 1-bit image, white background, black strokes: a bar whose height encodes the
    character and a dot whose column encodes the drawer, so both can be read back after resizing."""
    im = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(im)
    draw.rectangle([8, 8, 20, 8 + 8 * (char_index + 1)], fill=0)
    draw.rectangle([30 + 3 * drawer, 90, 34 + 3 * drawer, 96], fill=0)
    return im


def make_tree(root: Path, tree: dict = TREE) -> Path:
    """`root/<archive>/<Alphabet>/characterNN/IIII_DD.png`, 20 drawers per character."""
    index = 0
    for archive, alphabets in tree.items():
        for alphabet, numbers in alphabets.items():
            for number in numbers:
                folder = root / archive / alphabet / f"character{number:02d}"
                folder.mkdir(parents=True)
                for drawer in range(1, 21):
                    glyph(index, drawer).save(folder / f"{index + 1:04d}_{drawer:02d}.png")
                index += 1
    return root


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return archive


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_mirror(tmp: Path, tree: dict = TREE) -> Path:
    """A mirror folder `<tmp>/mirror/omniglot/<archive>.zip` with its MD5SUMS file."""
    src = make_tree(tmp / "src", tree)
    mirror = tmp / "mirror"
    (mirror / "omniglot").mkdir(parents=True)
    lines = []
    for archive in tree:
        path = zip_folder(src / archive, mirror / "omniglot" / f"{archive}.zip")
        lines.append(f"{md5(path)}  {path.name}")
    (mirror / "omniglot" / "MD5SUMS").write_text("\n".join(lines) + "\n")
    return mirror


def make_mini_imagenet_pickles(folder: Path, per_class: int = 2, size: int = 84) -> Path:
    """Pickled caches in the common format, with the Ravi classes and `per_class` images each;
    image (class k, sample j) is filled with the value (k * 7 + j) % 256."""
    from mamlbench.data.splits import RAVI_WNIDS
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for split in ("train", "val", "test"):
        wnids = RAVI_WNIDS[split]
        data = np.zeros((len(wnids) * per_class, size, size, 3), dtype=np.uint8)
        class_dict = {}
        for c, wnid in enumerate(wnids):
            rows = list(range(c * per_class, (c + 1) * per_class))
            for j, row in enumerate(rows):
                data[row] = (k * 7 + j) % 256
            class_dict[wnid] = rows
            k += 1
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=4)
    return folder
