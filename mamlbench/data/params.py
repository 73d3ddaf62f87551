"""Parameters of the data stages (download, prepare, episodize): the `data` section of params.yaml.

`DataParams.validate` rejects, before any download starts, evaluation settings that cannot be
drawn from a split: N-way larger than the classes of a split, or shots + queries larger than the
images of a class (20 drawers for Omniglot).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mamlbench.data.splits import (OMNIGLOT_ALPHABET_CHARACTERS, OMNIGLOT_BACKGROUND, OMNIGLOT_EVALUATION,
                                   OMNIGLOT_VINYALS_SIZES, RAVI_PER_CLASS, RAVI_SIZES, SPLITS)
from mamlbench.schema import ConfigError, knob, section

# Characters per official archive (Lake et al.); `prepare` checks what it decodes against these.
OMNIGLOT_ARCHIVES = {"images_background": 964, "images_evaluation": 659,
                     "images_background_small1": 136, "images_background_small2": 156}
OMNIGLOT_DRAWERS = 20


@dataclass(frozen=True)
class EpisodeSetting:
    """One (N-way, K-shot, queries) evaluation setting."""
    n_way: int = knob(5, "Classes per episode (N).", ge=2)
    k_shot: int = knob(1, "Support images per class (K).", ge=1)
    n_query: int = knob(15, "Query images per class.", ge=1)


def _settings(*triples):
    return [EpisodeSetting(n, k, q) for n, k, q in triples]


@dataclass(frozen=True)
class OmniglotParams:
    archives: list[str] = knob(["images_background", "images_evaluation"],
                               "Archives to download and prepare; the small ones are a declared subset.",
                               choices=list(OMNIGLOT_ARCHIVES))
    image_size: int = knob(28, "Side of the prepared images (the MAML code: 28).", ge=8)
    resample: Literal["reference", "lanczos"] = knob(
        "reference", "How the 105x105 1-bit PNGs shrink: reference (the MAML code's resize_images.py calls "
                     "LANCZOS on the 1-bit image, which PIL resizes nearest-neighbour: binary pixels) or lanczos "
                     "(greyscale first, then LANCZOS: anti-aliased grey levels).")
    scheme: Literal["maml", "vinyals", "lake"] = knob(
        "maml", "Default class split: maml (1100/100/423 shuffled characters), vinyals (1028/172/423 fixed "
                "alphabets) or lake (Lake et al. 2015: background alphabets train, evaluation alphabets test).")
    lake_val_alphabets: int = knob(5, "Background alphabets the lake split holds out for meta-validation "
                                      "(drawn with split_seed; Lake et al. define no validation set).", ge=1, le=29)
    maml_split: list[int] = knob([1100, 100], "Meta-train and meta-val characters of the maml split; "
                                 "the rest is meta-test.", ge=1)
    split_seed: int = knob(1, "Seed of the maml split's shuffle (the MAML code: random.seed(1)).", ge=0)
    rotations: list[int] = knob([0, 90, 180, 270], "Rotations in degrees applied to sampled classes.",
                                choices=[0, 90, 180, 270])
    episodes: list[EpisodeSetting] = knob(_settings((5, 1, 1), (5, 5, 5), (20, 1, 1), (20, 5, 5),
                                                    (5, 1, 15), (5, 5, 15), (20, 1, 5)),
                                          "Evaluation settings with fixed episodes: the original's K queries per "
                                          "class, and this project's quick ones.")

    def split_sizes(self) -> dict[str, int]:
        """Classes per split, statically: characters, times rotations where those are classes."""
        if self.scheme == "vinyals":
            return {s: n * len(self.rotations) for s, n in OMNIGLOT_VINYALS_SIZES.items()}
        if self.scheme == "lake":  # which alphabets validate is drawn at prepare time: the smallest case
            low, high = OMNIGLOT_ALPHABET_CHARACTERS
            n = self.lake_val_alphabets
            return {"train": OMNIGLOT_BACKGROUND - high * n, "val": low * n, "test": OMNIGLOT_EVALUATION}
        total = sum(OMNIGLOT_ARCHIVES[a] for a in self.archives)
        train, val = self.maml_split
        return {"train": train, "val": val, "test": total - train - val}

    def validate(self, where: str) -> None:
        if len(self.maml_split) != 2:
            raise ConfigError(f"{where}.maml_split = {self.maml_split}: expected [meta-train, meta-val]")
        if len(set(self.archives)) != len(self.archives) or not self.archives:
            raise ConfigError(f"{where}.archives = {self.archives}: expected distinct archive names")
        if not self.rotations or len(set(self.rotations)) != len(self.rotations):
            raise ConfigError(f"{where}.rotations = {self.rotations}: expected distinct angles")
        if self.scheme == "lake" and "images_evaluation" not in self.archives:
            raise ConfigError(f"{where}.scheme = 'lake' tests on the evaluation alphabets: add "
                              f"images_evaluation to {where}.archives")
        total = sum(OMNIGLOT_ARCHIVES[a] for a in self.archives)
        if self.scheme == "maml" and sum(self.maml_split) >= total:
            raise ConfigError(f"{where}.maml_split = {self.maml_split}: leaves no meta-test characters "
                              f"out of the {total} in {', '.join(self.archives)}")
        _check_settings(self.episodes, self.split_sizes() if _full(self.archives) else None,
                        OMNIGLOT_DRAWERS, f"{where}.episodes")

    def limits(self) -> tuple[int | None, int | None]:
        """(classes of the meta-train split, images per class) that training cells must fit; None: unknown."""
        return (self.split_sizes()["train"] if _full(self.archives) else None), OMNIGLOT_DRAWERS


def _full(archives) -> bool:
    return set(archives) == {"images_background", "images_evaluation"}


@dataclass(frozen=True)
class MiniImageNetParams:
    source: str | None = knob(None, "Folder holding your mini-ImageNet: mini-imagenet-cache-{train,val,test}.pkl, "
                                    "or the original JPEGs (n01532829...jpg) as named in the Ravi split files. "
                                    "null: <mirror>/mini-imagenet.")
    image_size: int = knob(84, "Side of the prepared RGB images (Ravi & Larochelle: 84).", ge=8)
    episodes: list[EpisodeSetting] = knob(_settings((5, 1, 1), (5, 5, 5), (5, 1, 15), (5, 5, 15)),
                                          "Evaluation settings with fixed episodes: the original's K queries per "
                                          "class, and this project's quick 15.")

    def validate(self, where: str) -> None:
        _check_settings(self.episodes, RAVI_SIZES, RAVI_PER_CLASS, f"{where}.episodes")

    def limits(self) -> tuple[int | None, int | None]:
        return RAVI_SIZES["train"], RAVI_PER_CLASS


@dataclass(frozen=True)
class ImageFolderParams:
    """A folder of class folders (`mamlbench.data.imagefolder`): where, at what size, split how."""
    source: str | None = knob(None, "A folder of class folders (<class>/<image>), or a .zip/.tar(.gz) archive holding "
                                    "one (a path or an http(s) URL). null: <mirror>/imagefolder.")
    md5: str | None = knob(None, "md5 of the archive; null: not checked (the md5 found is recorded in source.json).")
    subfolder: str | None = knob(None, "Path of the class folders inside source (CUB: CUB_200_2011/images); null: "
                                       "source itself, or an archive's single top folder.")
    image_size: int = knob(84, "Side of the square prepared images (resized, not cropped).", ge=8)
    channels: Literal[1, 3] = knob(3, "1: greyscale, 3: RGB.")
    per_class: int | None = knob(None, "Images kept per class (the first in file-name order); null: the smallest "
                                       "class's count. A class with fewer stops the prepare stage.", ge=2)
    class_lists: dict[str, str] = knob({}, "Split by lists: {train: file, val: file, test: file}, one class-folder "
                                           "name per line. Empty: split by fractions.")
    fractions: list[float] = knob([0.64, 0.16], "Meta-train and meta-val shares of the classes, the rest meta-test "
                                                "(mini-ImageNet's 64/16/20).", gt=0, lt=1)
    split_seed: int = knob(0, "Seed of the shuffle the fractions cut.", ge=0)
    episodes: list[EpisodeSetting] = knob(_settings((5, 1, 1), (5, 5, 5), (5, 1, 15), (5, 5, 15)),
                                          "Evaluation settings with fixed episodes.")

    def validate(self, where: str) -> None:
        if self.class_lists and set(self.class_lists) != set(SPLITS):
            raise ConfigError(f"{where}.class_lists: keys {sorted(self.class_lists)}, expected train, val, test")
        if len(self.fractions) != 2 or sum(self.fractions) >= 1:
            raise ConfigError(f"{where}.fractions = {self.fractions}: expected [train, val] summing below 1 "
                              f"(the rest is meta-test)")
        _check_settings(self.episodes, None, self.per_class or 10**9, f"{where}.episodes")

    def limits(self) -> tuple[int | None, int | None]:
        return None, self.per_class   # the classes are counted at prepare time


def _check_settings(settings, sizes: dict[str, int] | None, per_class: int, where: str) -> None:
    for i, s in enumerate(settings):
        if s.k_shot + s.n_query > per_class:
            raise ConfigError(f"{where}[{i}]: k_shot + n_query = {s.k_shot + s.n_query} > {per_class} images per class")
        for split, n in (sizes or {}).items():
            if s.n_way > n:
                raise ConfigError(f"{where}[{i}].n_way = {s.n_way}: more than the {n} classes of split '{split}'")


@dataclass(frozen=True)
class EpisodesParams:
    seed: int = knob(20170309, "Seed of the fixed evaluation episodes: never the training seed.", ge=0)
    n_test: int = knob(600, "Fixed meta-test episodes per setting (the MAML paper: 600).", ge=1)
    n_val: int = knob(200, "Fixed meta-validation episodes per setting.", ge=1)
    splits: list[str] = knob(["val", "test"], "Splits that get fixed episodes.", choices=list(SPLITS))


@dataclass(frozen=True)
class DataParams:
    mirror: str = knob("auto", "Where archives come from: auto (env MAMLBENCH_DATA_MIRROR, else ../shared/data "
                               "beside the project when present, else the official URLs), off (official URLs), "
                               "or a folder laid out <mirror>/<dataset>/<file> with an MD5SUMS file.")
    opt_in: list[Literal["mini-imagenet", "imagefolder"]] = knob(
        [], "Datasets beyond Omniglot that `dvc repro` builds: mini-imagenet needs images you supply "
            "(data.mini_imagenet.source); imagefolder is your folder of class folders (data.imagefolder.source).")
    omniglot: OmniglotParams = section(OmniglotParams)
    mini_imagenet: MiniImageNetParams = section(MiniImageNetParams)
    imagefolder: ImageFolderParams = section(ImageFolderParams)
    episodes: EpisodesParams = section(EpisodesParams)

    def dataset(self, name: str):
        """The section of a dataset (`mini-imagenet`: data.mini_imagenet)."""
        return getattr(self, name.replace("-", "_"))

    def settings(self, dataset: str) -> list[EpisodeSetting]:
        return self.dataset(dataset).episodes
