"""Prepare stage: Omniglot PNG trees and mini-ImageNet pickles / JPEGs into one uint8 array."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from data_fakes import COUNTS, TREE, make_mini_imagenet_pickles, make_tree
from mamlbench.data.download import locate_mini_imagenet
from mamlbench.data.errors import DataError
from mamlbench.data.miniimagenet import prepare_mini_imagenet
from mamlbench.data.omniglot import prepare_omniglot
from mamlbench.data.prepared import content_hash, load_split, split_counts
from mamlbench.data.splits import RAVI_WNIDS

ARCHIVES = list(TREE)


def _prepare(raw, out, **kw):
    return prepare_omniglot(raw, out, archives=ARCHIVES, maml_sizes=(5, 2), expected=COUNTS, **kw)


def test_omniglot_prepare(tmp_path):
    raw = make_tree(tmp_path / "raw")
    meta = _prepare(raw, tmp_path / "prep")
    images = np.load(tmp_path / "prep" / "images.npy")
    assert images.shape == (10, 20, 1, 28, 28) and images.dtype == np.uint8
    # strokes are the foreground: mostly 0 background, bright strokes
    assert np.median(images) == 0 and images.max() == 255
    # the bar height encodes the character: class order (archive, alphabet, number) is kept
    ink = images[:, 0, 0, :, 4].astype(int).sum(axis=1)
    made_as = [4, 5, 0, 1, 2, 3, 8, 9, 6, 7]  # creation order of the characters listed below
    assert list(np.argsort(ink)) == list(np.argsort(made_as))
    names = [(c["alphabet"], c["character"]) for c in meta["classes"]]
    assert names == [("Hebrew", 1), ("Hebrew", 2), ("Latin", 1), ("Latin", 2), ("Latin", 3), ("Latin", 4),
                     ("Gurmukhi", 41), ("Gurmukhi", 42), ("Kannada", 1), ("Kannada", 2)]
    counts = split_counts(tmp_path / "prep")
    assert counts["maml"] == {"train": 5, "val": 2, "test": 3}
    assert counts["vinyals"] == {"train": 5, "val": 2, "test": 3}  # Hebrew val; Gurmukhi 42 + Kannada test
    vin_test = load_split(tmp_path / "prep", "test", "vinyals")
    assert {(c["alphabet"], c["character"]) for c in vin_test.classes} == {("Gurmukhi", 42), ("Kannada", 1), ("Kannada", 2)}
    assert vin_test.rotations_as_classes and vin_test.n_classes == 12
    maml_train = load_split(tmp_path / "prep", "train")
    assert maml_train.scheme == "maml" and maml_train.images.dtype == torch.uint8
    assert maml_train.images.shape == (5, 20, 1, 28, 28) and not maml_train.rotations_as_classes


def test_omniglot_prepare_is_deterministic(tmp_path):
    raw = make_tree(tmp_path / "raw")
    _prepare(raw, tmp_path / "a")
    _prepare(raw, tmp_path / "b")
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b")
    _prepare(raw, tmp_path / "c", split_seed=2)
    assert content_hash(tmp_path / "a") != content_hash(tmp_path / "c")


def test_truncated_png_names_its_path(tmp_path):
    raw = make_tree(tmp_path / "raw")
    bad = raw / "images_background" / "Latin" / "character03" / "0003_07.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DataError, match=r"character03/0003_07\.png: unreadable PNG"):
        _prepare(raw, tmp_path / "prep")
    assert not (tmp_path / "prep").exists() or not any((tmp_path / "prep").iterdir())


def test_missing_drawer_and_wrong_counts(tmp_path):
    raw = make_tree(tmp_path / "raw")
    with pytest.raises(DataError, match="expected 964 characters, found 6"):
        prepare_omniglot(raw, tmp_path / "prep", archives=ARCHIVES)  # the official counts
    (raw / "images_evaluation" / "Kannada" / "character02" / "0008_20.png").unlink()
    with pytest.raises(DataError, match=r"Kannada/character02: expected 20 drawers"):
        _prepare(raw, tmp_path / "prep")
    with pytest.raises(DataError, match="archive folder missing"):
        prepare_omniglot(tmp_path / "nowhere", tmp_path / "prep", archives=ARCHIVES)


def test_unknown_split_and_scheme(tmp_path):
    _prepare(make_tree(tmp_path / "raw"), tmp_path / "prep")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split(tmp_path / "prep", "dev")
    with pytest.raises(DataError, match="unknown split scheme 'ravi'"):
        load_split(tmp_path / "prep", "train", "ravi")
    with pytest.raises(DataError, match="no prepared data"):
        load_split(tmp_path / "nothing", "train")


# ---- mini-ImageNet ----

def test_mini_imagenet_from_pickles(tmp_path):
    src = make_mini_imagenet_pickles(tmp_path / "mi", per_class=2)
    found = locate_mini_imagenet(str(src), None)
    assert found["kind"] == "pickles"
    prepare_mini_imagenet(found, tmp_path / "prep", per_class=2)
    assert split_counts(tmp_path / "prep") == {"ravi": {"train": 64, "val": 16, "test": 20}}
    test = load_split(tmp_path / "prep", "test")
    assert test.images.shape == (20, 2, 3, 84, 84)
    assert test.classes[0]["wnid"] == RAVI_WNIDS["test"][0]
    assert int(test.images[0, 1, 0, 0, 0]) == (80 * 7 + 1) % 256  # class 80 overall, sample 1


def test_mini_imagenet_refuses_code_in_pickles(tmp_path):
    src = make_mini_imagenet_pickles(tmp_path / "mi", per_class=1)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(src / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"image_data": Evil(), "class_dict": {}}, f)
    with pytest.raises(DataError, match="refusing global builtins.print"):
        prepare_mini_imagenet({"kind": "pickles", "path": str(src)}, tmp_path / "prep", per_class=1)
    assert not list((tmp_path / "prep").glob("*")) if (tmp_path / "prep").exists() else True


def test_mini_imagenet_wrong_classes(tmp_path):
    src = make_mini_imagenet_pickles(tmp_path / "mi", per_class=1)
    with open(src / "mini-imagenet-cache-test.pkl", "rb") as f:
        cache = pickle.load(f)
    cache["class_dict"].pop(RAVI_WNIDS["test"][0])
    with open(src / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump(cache, f)
    with pytest.raises(DataError, match="classes differ from the Ravi test split"):
        prepare_mini_imagenet({"kind": "pickles", "path": str(src)}, tmp_path / "prep", per_class=1)


def test_mini_imagenet_from_jpegs(tmp_path):
    folder = tmp_path / "jpeg" / "images"
    folder.mkdir(parents=True)
    for k, wnid in enumerate(w for s in ("train", "val", "test") for w in RAVI_WNIDS[s]):
        for j in range(2):
            Image.new("RGB", (100, 90), (k, j * 100, 7)).save(folder / f"{wnid}{j + 1:08d}.jpg", quality=100)
    found = locate_mini_imagenet(str(tmp_path / "jpeg"), None)
    assert found == {"kind": "jpeg", "path": str(folder.resolve())}
    prepare_mini_imagenet(found, tmp_path / "prep", per_class=2, image_size=84)
    train = load_split(tmp_path / "prep", "train")
    assert train.images.shape == (64, 2, 3, 84, 84)
    assert abs(int(train.images[5, 1, 1, 40, 40]) - 100) <= 3  # JPEG-lossy green channel of sample 2


def test_mini_imagenet_missing_gives_instructions(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="set data.mini_imagenet.source .*mini-imagenet-cache-train.pkl"):
        locate_mini_imagenet(str(tmp_path / "empty"), None)
    with pytest.raises(DataError, match="no folder"):
        locate_mini_imagenet(None, None)


def test_lake_split_is_background_against_evaluation_alphabets(tmp_path):
    # Lake et al. 2015: background alphabets train (one held out whole for validation), evaluation ones test
    raw = make_tree(tmp_path / "raw")
    _prepare(raw, tmp_path / "prep", scheme="lake", lake_val_alphabets=1)
    by_split = {s: {(c["alphabet"], c["character"]) for c in load_split(tmp_path / "prep", s, "lake").classes}
                for s in ("train", "val", "test")}
    assert by_split["test"] == {("Kannada", 1), ("Kannada", 2), ("Gurmukhi", 41), ("Gurmukhi", 42)}
    background = {"Latin": {("Latin", n) for n in (1, 2, 3, 4)}, "Hebrew": {("Hebrew", 1), ("Hebrew", 2)}}
    held_out = next(a for a, chars in background.items() if chars == by_split["val"])  # one whole alphabet
    assert by_split["train"] == next(chars for a, chars in background.items() if a != held_out)
    assert not load_split(tmp_path / "prep", "test", "lake").rotations_as_classes
    with pytest.raises(DataError, match="leave none of the 2 background alphabets"):
        _prepare(raw, tmp_path / "bad", scheme="lake", lake_val_alphabets=2)
    only_background = {"images_background": COUNTS["images_background"]}
    with pytest.raises(DataError, match="images_evaluation"):
        prepare_omniglot(raw, tmp_path / "bg", archives=["images_background"], maml_sizes=(3, 1),
                         expected=only_background, scheme="lake")
