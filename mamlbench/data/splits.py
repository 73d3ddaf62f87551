"""Class splits of the few-shot benchmarks, as facts written down once.

Omniglot (Lake et al. 2015) holds 1623 characters from 50 alphabets, 20 drawers each. Two splits
are in use, and papers that report on "Omniglot" silently pick one of them:

- `maml` (Finn et al. 2017, `data_generator.py`): all characters shuffled with a fixed seed, the
  first 1100 meta-train, the next 100 meta-validation, the remaining 423 meta-test. Rotations by
  0/90/180/270 degrees augment each *sampled* class: the N classes of a task are N distinct
  characters, each shown at one random rotation. The original shuffles `os.listdir` order, which
  depends on the file system, so its exact membership cannot be reproduced; here the characters are
  sorted by name first, which makes the split depend only on `split_seed`.
- `vinyals` (Vinyals et al. 2016, the lists of Snell et al. 2017, also used by MAML++): fixed
  alphabets. 1028 meta-train, 172 meta-validation, 423 meta-test characters, and every
  (character, rotation) pair is its own class: 4112 / 688 / 1692 classes.
- `lake` (Lake et al. 2015, Science, the archives as published): the 30 background alphabets (964
  characters, `images_background`) for meta-training, the 20 evaluation alphabets (659 characters,
  `images_evaluation`) for meta-testing. Lake et al. define no validation set, so `lake_val_alphabets`
  whole background alphabets, drawn with `split_seed`, are held out for it; rotations augment
  sampled classes as in `maml`.

mini-ImageNet (Ravi & Larochelle 2017): 64 / 16 / 20 ImageNet classes of 600 images each. The
WordNet ids below are checked against the original split CSVs by `tests/test_data_splits.py`.
"""
from __future__ import annotations

from mamlbench.data.errors import DataError

SPLITS = ("train", "val", "test")

# ---- Omniglot, Vinyals split (jakesnell/prototypical-networks data/omniglot/splits/vinyals) ----
VINYALS_VAL_ALPHABETS = frozenset({
    "Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"})      # 172 characters
VINYALS_TEST_ALPHABETS = frozenset({
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG"})             # 419 characters
# ... plus the last four Gurmukhi characters: the test list starts at Gurmukhi/character42.
VINYALS_TEST_GURMUKHI_FROM = 42


def vinyals_split(alphabet: str, character: int) -> str:
    """Which Vinyals split an Omniglot character (alphabet name, 1-based number) belongs to."""
    if alphabet in VINYALS_TEST_ALPHABETS or (alphabet == "Gurmukhi" and character >= VINYALS_TEST_GURMUKHI_FROM):
        return "test"
    return "val" if alphabet in VINYALS_VAL_ALPHABETS else "train"


def maml_split(n_characters: int, n_train: int, n_val: int, seed: int) -> list[str]:
    """Split names for characters 0..n-1 (sorted by name): shuffled, then train | val | test."""
    if n_train + n_val >= n_characters:
        raise DataError(f"MAML split [{n_train}, {n_val}] leaves no test characters out of {n_characters}")
    import torch  # here, so that loading params does not import torch

    order = torch.randperm(n_characters, generator=torch.Generator().manual_seed(seed)).tolist()
    names = [""] * n_characters
    for rank, i in enumerate(order):
        names[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return names


LAKE_TEST_ARCHIVES = frozenset({"images_evaluation"})   # the small archives are subsets of the background one
# Characters per Omniglot alphabet range from 14 to 55: bounds for checking episode sizes before preparing.
OMNIGLOT_ALPHABET_CHARACTERS = (14, 55)
OMNIGLOT_BACKGROUND, OMNIGLOT_EVALUATION = 964, 659


def lake_split(characters: list[dict], n_val_alphabets: int, seed: int) -> list[str]:
    """Split names for `characters` (dicts with `archive` and `alphabet`): the evaluation archive is
    test; `n_val_alphabets` background alphabets, shuffled with `seed` after sorting by name, are val."""
    background = sorted({c["alphabet"] for c in characters if c["archive"] not in LAKE_TEST_ARCHIVES})
    if not any(c["archive"] in LAKE_TEST_ARCHIVES for c in characters):
        raise DataError("lake split: it tests on images_evaluation, which was not prepared")
    if n_val_alphabets >= len(background):
        raise DataError(f"lake split: {n_val_alphabets} validation alphabets leave none of the "
                        f"{len(background)} background alphabets for meta-training")
    import torch  # here, so that loading params does not import torch

    order = torch.randperm(len(background), generator=torch.Generator().manual_seed(seed)).tolist()
    val = {background[i] for i in order[:n_val_alphabets]}
    return ["test" if c["archive"] in LAKE_TEST_ARCHIVES else "val" if c["alphabet"] in val else "train"
            for c in characters]


# ---- mini-ImageNet, Ravi & Larochelle split (twitter/meta-learning-lstm data/miniImagenet) ----
RAVI_WNIDS = {
    "train": (
        "n01532829 n01558993 n01704323 n01749939 n01770081 n01843383 n01910747 n02074367 "
        "n02089867 n02091831 n02101006 n02105505 n02108089 n02108551 n02108915 n02111277 "
        "n02113712 n02120079 n02165456 n02457408 n02606052 n02687172 n02747177 n02795169 "
        "n02823428 n02966193 n03017168 n03047690 n03062245 n03207743 n03220513 n03337140 "
        "n03347037 n03400231 n03476684 n03527444 n03676483 n03838899 n03854065 n03888605 "
        "n03908618 n03924679 n03998194 n04067472 n04243546 n04251144 n04258138 n04275548 "
        "n04296562 n04389033 n04435653 n04443257 n04509417 n04515003 n04596742 n04604644 "
        "n04612504 n06794110 n07584110 n07697537 n07747607 n09246464 n13054560 n13133613").split(),
    "val": (
        "n01855672 n02091244 n02114548 n02138441 n02174001 n02950826 n02971356 n02981792 "
        "n03075370 n03417042 n03535780 n03584254 n03770439 n03773504 n03980874 n09256479").split(),
    "test": (
        "n01930112 n01981276 n02099601 n02110063 n02110341 n02116738 n02129165 n02219486 "
        "n02443484 n02871525 n03127925 n03146219 n03272010 n03544143 n03775546 n04146614 "
        "n04149813 n04418357 n04522168 n07613480").split(),
}
RAVI_PER_CLASS = 600

# Split sizes in characters (Omniglot) or classes (mini-ImageNet), for validating params early.
OMNIGLOT_VINYALS_SIZES = {"train": 1028, "val": 172, "test": 423}
RAVI_SIZES = {split: len(ids) for split, ids in RAVI_WNIDS.items()}
