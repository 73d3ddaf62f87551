"""Bad params.yaml documents, generated: wrong types, out-of-range values, unknown keys, and N-way
K-shot cells the dataset cannot supply. Each is rejected by `load_params` with a one-line
`ConfigError` naming the key (never another exception), and by the real CLI before any work."""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ROOT
from mamlbench.config import Params, load_params
from mamlbench.schema import ConfigError

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())
BASE["profiles"]["bare"] = {}
BASE["profile"] = "bare"          # no profile overrides: a mutated section value is what gets validated
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def leaves(cls, raw: Any, path: tuple = ()) -> list[tuple[tuple, Any, dict]]:
    """(path, annotation, range metadata) of every knob present in `raw`, following the dataclasses."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if path == () and f.name in ("profile", "profiles"):
            continue
        tp, here = hints[f.name], path + (f.name,)
        value = raw.get(f.name) if isinstance(raw, dict) else None
        args = [a for a in get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, value or {}, here)
        elif get_origin(tp) is dict and args and dataclasses.is_dataclass(args[-1]):
            for key, cell in (value or {}).items():
                out += leaves(args[-1], cell, here + (key,))
        elif get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            if value:
                out += leaves(args[0], value[0], here + (0,))
        elif tp is Any or get_origin(tp) is dict:
            continue      # free-form overrides, validated through their own sections
        else:
            out.append((here, tp, dict(f.metadata)))
    return out


LEAVES = leaves(Params, BASE)
SCALARS = {int: ["many", 1.5, [1], {"a": 1}, True], float: ["fast", [0.1], {"a": 1}, True, float("nan"), float("inf")],
           bool: ["yes", 1, 0.5, [True]], str: [1, 2.5, ["a"], {"a": 1}, True]}


def wrong_values(tp: Any, meta: dict) -> list:
    """Values certain to be invalid for a knob of annotation `tp` with range `meta`."""
    if get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in get_args(tp) if a is not type(None))
        wrong = [v for v in wrong_values(tp, meta) if v is not None]
        return wrong
    if get_origin(tp) is Literal:
        return ["not-a-choice", 3, ["x"]]
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        return ["x", {"a": 1}] + [[v] for v in wrong_values(item, meta) if not isinstance(v, list)]
    wrong = list(SCALARS[tp])
    if meta.get("choices") is not None:
        wrong.append("bogus" if tp is str else -12345)
    for key, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if meta.get(key) is not None:
            wrong.append(meta[key] + delta if key in ("ge", "le") else meta[key])
    if tp is int:
        wrong = [v for v in wrong if not isinstance(v, float) or v != int(v)]
    return wrong


def dotted(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def set_in(raw: dict, path: tuple, value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[path[-1]] = value


@st.composite
def bad_value(draw):
    path, tp, meta = draw(st.sampled_from(LEAVES))
    value = draw(st.sampled_from(wrong_values(tp, meta)))
    raw = copy.deepcopy(BASE)
    via_profile = not any(isinstance(p, int) for p in path) and draw(st.booleans())
    if via_profile:                     # the same mistake as a profile's dotted override
        raw["profiles"]["bare"] = {".".join(path): value}
    else:
        set_in(raw, path, value)
    return raw, dotted(path)


@st.composite
def unknown_key(draw):
    sections = sorted({p[:i] for p, _, _ in LEAVES for i in range(len(p))    # mappings of knobs, not of cells
                       if all(isinstance(x, str) for x in p[:i + 1]) and p[i - 1:i] != ("settings",)})
    where = draw(st.sampled_from(sections))
    name = draw(st.from_regex(r"\A[a-z][a-z_]{0,10}\Z"))
    raw = copy.deepcopy(BASE)
    node = raw
    for part in where:
        node = node.setdefault(part, {})
    if name in node or (where == () and name in ("profile", "profiles")):
        name += "_typo"
    node[name] = draw(st.sampled_from([1, "x", 0.5, None, [1]]))
    return raw, dotted(where + (name,))


@st.composite
def impossible_cell(draw):
    """An N-way K-shot cell or episode setting that Omniglot's splits or its 20 drawers cannot supply."""
    raw = copy.deepcopy(BASE)
    k_shot = draw(st.integers(1, 19))
    too_deep = {"n_way": 5, "k_shot": k_shot, "n_query": draw(st.integers(21 - k_shot, 40))}
    if draw(st.booleans()):     # a training cell: N beyond the 1100 meta-train classes, or K + queries > 20
        name = draw(st.sampled_from(sorted(raw["omniglot"]["settings"])))
        raw["omniglot"]["run"]["settings"] = [name]
        too_wide = {"n_way": draw(st.integers(1101, 5000)), "k_shot": 1, "n_query": 5}
        raw["omniglot"]["settings"][name] = draw(st.sampled_from([too_wide, too_deep]))
        return raw, f"omniglot.settings.{name}"
    too_wide = {"n_way": draw(st.integers(101, 5000)), "k_shot": 1, "n_query": 5}   # beyond the 100 of meta-val
    raw["data"]["omniglot"]["episodes"] = [draw(st.sampled_from([too_wide, too_deep]))]
    return raw, "data.omniglot.episodes[0]"


def rejected(raw: dict, key: str, tmp_path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert "\n" not in message and key in message, (key, message)
    return message


@SETTINGS
@given(case=st.one_of(bad_value(), unknown_key(), impossible_cell()))
def test_bad_documents_are_rejected_naming_the_key(tmp_path_factory, case):
    raw, key = case
    rejected(raw, key, tmp_path_factory.mktemp("p"))


def test_the_generators_cover_the_schema():
    keys = {dotted(p) for p, _, _ in LEAVES}
    assert {"sinusoid.train.inner_lr", "omniglot.settings.5w1s.n_way", "data.omniglot.episodes[0].k_shot",
            "rl.navigation.max_kl", "tracking.enabled", "data.omniglot.scheme"} <= keys
    assert load_params(ROOT / "params.yaml")  # the unmutated document is valid


@pytest.mark.parametrize("override, key", [
    ({"sinusoid": {"train": {"device": "gpu"}}}, "sinusoid.train.device"),
    ({"omniglot": {"train": {"device": "cuda:x"}}}, "omniglot.train.device"),
    ({"tune": {"cells": [{"benchmark": "omniglot", "algorithm": "maml", "setting": "9w9s"}]}}, "tune.cells[0].setting"),
    ({"omniglot": {"settings": {"5w5s": {"n_way": 5, "k_shot": 5, "n_query": 5, "train": {"n_query": 16}}}}},
     "omniglot.settings.5w5s"),
    ({"variants": {"maml": {"train": {"n_query": 30}}}}, "omniglot.settings.5w1s"),
])
def test_values_only_a_running_job_would_have_refused(tmp_path, override, key):
    raw = copy.deepcopy(BASE)
    for section, value in override.items():
        if section in raw and isinstance(value, dict):
            for k, v in value.items():
                raw[section][k] = {**raw[section][k], **v} if isinstance(v, dict) and isinstance(raw[section].get(k), dict) else v
        else:
            raw[section] = value
    rejected(raw, key, tmp_path)


def test_cli_rejects_in_one_line_before_any_work(tmp_path):
    """Three kinds of mistake through the real command line, side by side in subprocesses."""
    cases = {"type": ({"sinusoid": {"train": {"meta_batch_size": "lots"}}}, "sinusoid.train.meta_batch_size", "sinusoid"),
             "unknown": ({"omniglot": {"train": {"inner_lrr": 0.1}}}, "omniglot.train.inner_lrr", "omniglot"),
             "way": ({"omniglot": {"settings": {"5w1s": {"n_way": 1500, "k_shot": 1, "n_query": 15}}}},
                     "omniglot.settings.5w1s.n_way", "omniglot")}
    procs = {}
    for name, (override, key, benchmark) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        raw = copy.deepcopy(BASE)
        for section, value in override.items():
            for k, v in value.items():
                raw[section][k] = {**raw[section][k], **v} if isinstance(v, dict) else v
        (folder / "params.yaml").write_text(yaml.safe_dump(raw))
        procs[name] = subprocess.Popen([sys.executable, "-m", "mamlbench.cli", "train", benchmark, "-p", "params.yaml",
                                        "--run-dir", "run"], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        key = cases[name][1]
        assert proc.returncode == 2, stderr
        (line,) = stderr.strip().splitlines()
        assert line.startswith("error: ") and key in line, line
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["params.yaml"], "no run folder, no mlflow.db"
