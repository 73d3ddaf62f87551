"""Split facts: the Ravi WordNet ids against the original CSVs, and the Omniglot split rules."""
from __future__ import annotations

import csv

import pytest

from data_fakes import SHARED
from mamlbench.data.errors import DataError
from mamlbench.data.splits import RAVI_WNIDS, maml_split, vinyals_split

CSV_DIR = SHARED / "mini-imagenet"


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_ravi_wnids_match_the_split_csvs(split):
    path = CSV_DIR / f"{split}.csv"
    if not path.is_file():
        pytest.skip(f"{path} absent: the Ravi split CSVs are not beside this checkout (../shared/data/mini-imagenet)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [row["label"] for row in rows]
    assert list(dict.fromkeys(labels)) == RAVI_WNIDS[split]           # same classes, same order
    assert all(labels.count(w) == 600 for w in RAVI_WNIDS[split][:3])
    assert all(row["filename"].startswith(row["label"]) for row in rows)


def test_ravi_sizes_and_disjoint():
    sets = [set(RAVI_WNIDS[s]) for s in ("train", "val", "test")]
    assert [len(s) for s in sets] == [64, 16, 20] and len(set.union(*sets)) == 100


def test_vinyals_rule():
    assert vinyals_split("Latin", 3) == "train"
    assert vinyals_split("Hebrew", 1) == "val" and vinyals_split("Bengali", 46) == "val"
    assert vinyals_split("Gurmukhi", 41) == "train" and vinyals_split("Gurmukhi", 42) == "test"
    assert vinyals_split("ULOG", 1) == "test" and vinyals_split("Angelic", 1) == "train"


def test_maml_split_sizes_and_seed():
    names = maml_split(1623, 1100, 100, seed=1)
    assert [names.count(s) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert maml_split(1623, 1100, 100, seed=1) == names and maml_split(1623, 1100, 100, seed=2) != names
    with pytest.raises(DataError, match="leaves no test characters"):
        maml_split(10, 8, 2, seed=0)
