"""The three data stages as functions of (dataset, paths, params): what `stages/*.py` and
`mamlbench data ...` both call, so the DVC pipeline and the CLI cannot drift apart.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mamlbench.data.download import download_mini_imagenet, download_omniglot, resolve_mirror
from mamlbench.data.episodes import episodize
from mamlbench.data.imagefolder import locate_imagefolder, prepare_imagefolder
from mamlbench.data.errors import DataError
from mamlbench.data.miniimagenet import prepare_mini_imagenet
from mamlbench.data.omniglot import prepare_omniglot
from mamlbench.data.params import DataParams

DATASETS = ("omniglot", "mini-imagenet", "imagefolder")


def _check(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r} (have: {', '.join(DATASETS)})")


def run_download(dataset: str, out: str | os.PathLike, data: DataParams, root: str | os.PathLike = ".") -> None:
    """Fetch and extract (Omniglot, an ImageFolder archive) or locate (mini-ImageNet, an ImageFolder
    folder) the raw data into `out`."""
    _check(dataset)
    mirror = resolve_mirror(data.mirror, root)
    if dataset == "omniglot":
        download_omniglot(out, data.omniglot.archives, mirror)
    elif dataset == "imagefolder":
        f = data.imagefolder
        locate_imagefolder(out, f.source, f.md5, f.subfolder, mirror)
    else:
        download_mini_imagenet(out, data.mini_imagenet.source, mirror)


def run_prepare(dataset: str, raw: str | os.PathLike, out: str | os.PathLike, data: DataParams) -> dict:
    """Decode the raw data into `out/images.npy` + `out/meta.json`."""
    _check(dataset)
    if dataset == "omniglot":
        p = data.omniglot
        return prepare_omniglot(raw, out, archives=p.archives, image_size=p.image_size, resample=p.resample,
                                scheme=p.scheme,
                                maml_sizes=tuple(p.maml_split), split_seed=p.split_seed, rotations=p.rotations,
                                lake_val_alphabets=p.lake_val_alphabets)
    source_file = Path(raw) / "source.json"
    if not source_file.is_file():
        raise DataError(f"{source_file}: missing (run the download stage for {dataset} first)")
    if dataset == "imagefolder":
        f = data.imagefolder
        return prepare_imagefolder(json.loads(source_file.read_text()), out, image_size=f.image_size,
                                   channels=f.channels, per_class=f.per_class, class_lists=f.class_lists,
                                   fractions=f.fractions, split_seed=f.split_seed)
    return prepare_mini_imagenet(json.loads(source_file.read_text()), out, image_size=data.mini_imagenet.image_size)


def run_episodize(dataset: str, prepared: str | os.PathLike, out: str | os.PathLike, data: DataParams) -> list[Path]:
    """Write the fixed evaluation episodes of every setting in params."""
    _check(dataset)
    e = data.episodes
    return episodize(prepared, out, data.settings(dataset), splits=e.splits, n_val=e.n_val, n_test=e.n_test,
                     seed=e.seed)
