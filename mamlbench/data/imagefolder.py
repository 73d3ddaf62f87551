"""Any folder of class folders (CUB, a user's own) as a few-shot dataset: locate or download it,
decode at a size, split by class.

The layout is torchvision's ImageFolder: `<root>/<class>/<image>`, one folder per class, images of
any format PIL reads. `data.imagefolder.source` is that folder, or a .zip/.tar(.gz) archive (a path
or an http(s) URL) that the download stage verifies and extracts with the same refusals as
Omniglot's (no member outside the target, no links); `subfolder` points inside it when the class
folders sit deeper (CUB: `CUB_200_2011/images`).

The prepared array is regular, (classes, per_class, C, H, W), so every class keeps its first
`per_class` images in file-name order (null: the smallest class's count, so nothing is dropped from
that class and the rest lose their surplus). Images are resized to a square without cropping
(LANCZOS, as the mini-ImageNet preparation), in greyscale or RGB.

Classes go to meta-train / meta-val / meta-test either by lists (one class-folder name per line, a
file per split) or by seeded fractions of the sorted class names.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image
from rich.progress import Progress

from mamlbench.data.errors import DataError
from mamlbench.data.prepared import IMAGES
from mamlbench.data.splits import SPLITS
from mamlbench.io import atomic_path, file_digest, write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SCHEME = "folder"


def _archive_name(source: str) -> str | None:
    name = Path(urlparse(source).path).name if "://" in source else Path(source).name
    return name if name.lower().endswith(ARCHIVE_SUFFIXES) else None


def _extract(archive: Path, dest: Path) -> None:
    """Zip through `download.safe_extract`; tar through Python's `data` filter (absolute names, `..`,
    links out of the tree and device files are refused)."""
    from mamlbench.data.download import safe_extract
    if archive.name.lower().endswith(".zip"):
        safe_extract(archive, dest)
        return
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    except tarfile.FilterError as err:
        raise DataError(f"{archive}: refusing member that would land outside {dest} ({err})") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{archive}: not a readable tar archive ({err})") from None


def locate_imagefolder(out_dir: str | os.PathLike, source: str | None, md5: str | None, subfolder: str | None,
                       mirror: Path | None) -> dict:
    """Find (a folder) or fetch and extract (an archive) the class folders; write `out_dir/source.json`.

    An archive goes to `out_dir/<name>` (checked against `md5` when given, its md5 recorded either way)
    and is extracted into `out_dir/extracted/` through a temporary folder, so a failure leaves nothing
    that looks complete. Returns {"kind": "folder" | "archive", "path": the class folders' root, "md5"?}.
    """
    from mamlbench.data.download import copy_from_mirror, http_download
    if source is None:
        candidate = mirror / "imagefolder" if mirror is not None else None
        if candidate is None or not candidate.is_dir():
            raise DataError("data.imagefolder.source is null: set it to a folder of class folders, or to a "
                            ".zip/.tar archive (path or http(s) URL) holding one")
        source = str(candidate)
    out_dir = Path(out_dir)
    found: dict = {}
    name = _archive_name(source)
    if name is None:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DataError(f"data.imagefolder.source = {source!r}: no such folder (nor a .zip/.tar archive)")
        found["kind"] = "folder"
    else:
        archive = out_dir / name
        if not (archive.is_file() and (md5 is None or file_digest(archive, "md5") == md5)):
            if "://" in source:
                http_download(source, archive, md5)
            else:
                copy_from_mirror(Path(source).expanduser(), archive, md5)
        root = out_dir / "extracted"
        if not root.is_dir():
            tmp = out_dir / ".extracting"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _extract(archive, tmp)
                os.replace(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        found.update(kind="archive", archive=str(archive.resolve()), md5=file_digest(archive, "md5"))
    if subfolder:
        root = root / subfolder
        if not root.is_dir():
            raise DataError(f"data.imagefolder.subfolder = {subfolder!r}: no such folder inside {root.parent}")
    elif not _class_folders(root):  # an archive's single top folder
        inner = [p for p in root.iterdir() if p.is_dir()]
        if len(inner) == 1:
            root = inner[0]
    found["path"] = str(root.resolve())
    if found["kind"] == "folder":  # DVC reruns this stage every time: a changed folder changes this file
        found["fingerprint"] = fingerprint(root)
    write_json(out_dir / "source.json", found)
    return found


def fingerprint(root: Path) -> str:
    """sha256 over the class folders' image names, sizes and modification times: cheap enough to run
    on every `dvc repro` (CUB's 11 788 files: a stat each), and it changes when any image does."""
    digest = hashlib.sha256()
    for folder in _class_folders(root):
        for path in _images(folder):
            st = path.stat()
            digest.update(f"{folder.name}/{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _images(p))


def _read_list(path: str, split: str, known: set[str]) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.imagefolder.class_lists.{split} = {path!r}: no such file")
    names = [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"{file}: {len(unknown)} class{'es' if len(unknown) > 1 else ''} not in the folder: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if len(set(names)) != len(names):
        raise DataError(f"{file}: a class is listed twice")
    return names


def split_classes(names: list[str], class_lists: dict[str, str], fractions: list[float], seed: int) -> dict:
    """{split: [class names]}: the given lists, or a `seed`-shuffle of the sorted names cut at `fractions`."""
    if class_lists:
        splits = {s: _read_list(class_lists[s], s, set(names)) for s in SPLITS}
        seen: dict[str, str] = {}
        for split, listed in splits.items():
            for n in listed:
                if n in seen:
                    raise DataError(f"class {n!r} is in both the {seen[n]} and the {split} list")
                seen[n] = split
    else:
        order = sorted(names)
        random.Random(seed).shuffle(order)
        n_train, n_val = (round(f * len(order)) for f in fractions)
        splits = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for split, listed in splits.items():
        if not listed:
            raise DataError(f"the {split} split holds no classes ({len(names)} classes in the folder)")
    return splits


def prepare_imagefolder(source: dict, out_dir: str | os.PathLike, *, image_size: int, channels: int,
                        per_class: int | None, class_lists: dict[str, str], fractions: list[float],
                        split_seed: int) -> dict:
    """Decode the class folders into `out_dir/images.npy` + `meta.json` (see the module docstring)."""
    root = Path(source["path"])
    if not root.is_dir():
        raise DataError(f"{root}: the located image folder is gone (rerun the download stage)")
    folders = _class_folders(root)
    if not folders:
        raise DataError(f"{root}: no class folders with images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = {p.name: _images(p) for p in folders}
    counts = {n: len(f) for n, f in files.items()}
    keep = per_class if per_class is not None else min(counts.values())
    short = {n: c for n, c in counts.items() if c < keep}
    if short:
        listed = ", ".join(f"{n} ({c})" for n, c in sorted(short.items())[:5])
        raise DataError(f"{root}: {len(short)} class{'es' if len(short) > 1 else ''} with fewer than "
                        f"data.imagefolder.per_class = {keep} images: {listed}")
    splits = split_classes(list(files), class_lists, fractions, split_seed)
    order = [n for s in SPLITS for n in splits[s]]
    shape = (len(order), keep, channels, image_size, image_size)
    mode = "L" if channels == 1 else "RGB"
    out_dir = Path(out_dir)
    with atomic_path(out_dir / IMAGES) as tmp, Progress(transient=True) as progress:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        task = progress.add_task(f"decoding {root.name}", total=len(order))
        for row, name in enumerate(order):
            for j, path in enumerate(files[name][:keep]):
                try:
                    with Image.open(path) as im:
                        im = im.convert(mode).resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
                except (OSError, SyntaxError, ValueError) as err:
                    raise DataError(f"{path}: unreadable image ({err})") from None
                array = np.asarray(im, dtype=np.uint8)
                images[row, j] = array[None] if channels == 1 else array.transpose(2, 0, 1)
            progress.advance(task)
        images.flush()
        del images
    bounds = np.cumsum([0] + [len(splits[s]) for s in SPLITS]).tolist()
    meta = dict(dataset="imagefolder", scheme=SCHEME,
                classes=[dict(name=n, files=counts[n]) for n in order],
                splits={SCHEME: {s: list(range(bounds[i], bounds[i + 1])) for i, s in enumerate(SPLITS)}},
                rotations=[0], rotations_as_classes={SCHEME: False}, shape=list(shape), image_size=image_size,
                channels=channels, per_class=keep, source={k: v for k, v in source.items() if k in ("kind", "md5")},
                split_by="lists" if class_lists else f"fractions {fractions} seed {split_seed}")
    write_json(out_dir / "meta.json", meta)
    return meta
