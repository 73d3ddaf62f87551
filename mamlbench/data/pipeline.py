"""The three data stages as functions of (dataset, paths, params): what `stages/*.py` and
`mamlbench data ...` both call, so the DVC pipeline and the CLI cannot drift apart.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mamlbench.data.download import download_mini_imagenet, download_omniglot, resolve_mirror
from mamlbench.data.episodes import episodize
from mamlbench.data.imagefolder import locate_imagefolder, prepare_imagefolder
from mamlbench.data.errors import DataError
from mamlbench.data.miniimagenet import prepare_mini_imagenet
from mamlbench.data.omniglot import prepare_omniglot
from mamlbench.data.params import DataParams

@dataclass(frozen=True)
class Dataset:
    """What the download and prepare stages do for one dataset, given its `data.<section>`: a new
    few-shot dataset is its module, one entry here, its params section and its `data.opt_in` name."""
    download: Callable[[Path, Any, Path | None], object]   # (out, section, mirror)
    prepare: Callable[[Path, Path, Any], dict]             # (raw, out, section)


def _located(raw: Path, dataset: str) -> dict:
    """What the download stage of a located dataset recorded (`raw/source.json`)."""
    source_file = Path(raw) / "source.json"
    if not source_file.is_file():
        raise DataError(f"{source_file}: missing (run the download stage for {dataset} first)")
    return json.loads(source_file.read_text())


DATASETS: dict[str, Dataset] = {
    "omniglot": Dataset(
        download=lambda out, p, mirror: download_omniglot(out, p.archives, mirror),
        prepare=lambda raw, out, p: prepare_omniglot(
            raw, out, archives=p.archives, image_size=p.image_size, resample=p.resample, scheme=p.scheme,
            maml_sizes=tuple(p.maml_split), split_seed=p.split_seed, rotations=p.rotations,
            lake_val_alphabets=p.lake_val_alphabets)),
    "mini-imagenet": Dataset(
        download=lambda out, p, mirror: download_mini_imagenet(out, p.source, mirror),
        prepare=lambda raw, out, p: prepare_mini_imagenet(_located(raw, "mini-imagenet"), out,
                                                          image_size=p.image_size)),
    "imagefolder": Dataset(
        download=lambda out, p, mirror: locate_imagefolder(out, p.source, p.md5, p.subfolder, mirror),
        prepare=lambda raw, out, p: prepare_imagefolder(
            _located(raw, "imagefolder"), out, image_size=p.image_size, channels=p.channels,
            per_class=p.per_class, class_lists=p.class_lists, fractions=p.fractions, split_seed=p.split_seed)),
}


def _check(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r} (have: {', '.join(DATASETS)})")


def run_download(dataset: str, out: str | os.PathLike, data: DataParams, root: str | os.PathLike = ".") -> None:
    """Fetch and extract (Omniglot, an ImageFolder archive) or locate (mini-ImageNet, an ImageFolder
    folder) the raw data into `out`."""
    _check(dataset)
    DATASETS[dataset].download(Path(out), data.dataset(dataset), resolve_mirror(data.mirror, root))


def run_prepare(dataset: str, raw: str | os.PathLike, out: str | os.PathLike, data: DataParams) -> dict:
    """Decode the raw data into `out/images.npy` + `out/meta.json`."""
    _check(dataset)
    return DATASETS[dataset].prepare(Path(raw), Path(out), data.dataset(dataset))


def run_episodize(dataset: str, prepared: str | os.PathLike, out: str | os.PathLike, data: DataParams) -> list[Path]:
    """Write the fixed evaluation episodes of every setting in params."""
    _check(dataset)
    e = data.episodes
    return episodize(prepared, out, data.settings(dataset), splits=e.splits, n_val=e.n_val, n_test=e.n_test,
                     seed=e.seed)
