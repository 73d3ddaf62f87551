"""What produced a result: the run identity a checkpoint resumes under, and the record beside each result.

A run's identity has three parts, kept apart so that a refused resume can say which one changed:

- `code`: sha256 of the source of the modules that decide the trajectory: the benchmark's module and
  every `mamlbench` module it imports, transitively (read from the files' imports, not from what
  happens to be loaded, so the CLI, the report, tuning and tracking stay out of it). File contents,
  not git: it works in an exported tree, and an uncommitted edit counts;
- `settings`: hash of the resolved settings that fix the trajectory (budgets and logging excluded);
- `data`: hash of the input data (prepared images and the episodes read); "none" for generated data.

`record(...)` is the provenance written into train.json / metrics.json and onto the MLflow run.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
NO_DATA = "none"
NOT_TRAJECTORY = ("mamlbench.provenance", "mamlbench.progress")  # imported by training, decide nothing in it


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able value (the settings hash)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(*paths: str | os.PathLike) -> str:
    """sha256 of the files' bytes, in the given order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def _module_file(name: str) -> Path | None:
    """The source file of `mamlbench.x.y` (a module or a package's __init__); None if there is none."""
    parts = name.split(".")[1:]
    base = PACKAGE.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """The `mamlbench` modules a source file imports (anywhere in it: function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mamlbench"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mamlbench":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from mamlbench import io`
    return {m for m in found if _module_file(m) is not None}


@lru_cache(maxsize=None)
def code_modules(root: str) -> tuple[str, ...]:
    """`root` and every mamlbench module it imports, transitively, sorted (`NOT_TRAJECTORY` left out)."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_TRAJECTORY:
            continue
        seen.add(name)
        todo.extend(_imports(_module_file(name)))
    return tuple(sorted(seen))


def code_hash(root: str) -> str:
    """sha256 over the source of `code_modules(root)` (names and bytes): the code part of an identity.

    Not cached: a long-lived process (tests) must see an edit made between two runs."""
    h = hashlib.sha256()
    for name in code_modules(root):
        h.update(name.encode() + b"\0" + _module_file(name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint may resume under: the same code, settings and data."""
    code: str
    settings: str
    data: str = NO_DATA

    @property
    def fingerprint(self) -> str:
        return digest(asdict(self))

    def changed(self, other: dict | None) -> list[str]:
        """Which parts differ from a checkpoint's stored identity (all three when it has none)."""
        if not isinstance(other, dict):
            return ["code", "settings", "data"]
        return [k for k, v in asdict(self).items() if other.get(k) != v]


def identity(root: str, settings: Any, data: str = NO_DATA) -> RunIdentity:
    return RunIdentity(code_hash(root), digest(settings), data)


# ----------------------------------------------------------------------------- the environment
def _pipeline_outputs(top: Path) -> set[str]:
    """The paths `dvc.lock` records as stage outputs: `dvc repro` rewrites the git-kept ones (the report,
    reports/rl/<env>/seed<k>/) while later stages still run, so they say nothing about the code a result
    came from. Empty when there is no readable lock (one being rewritten this instant included)."""
    import yaml
    try:
        lock = yaml.safe_load((top / "dvc.lock").read_text()) or {}
        stages = lock.get("stages") or {}
        return {str(out["path"]).rstrip("/") for stage in stages.values() for out in stage.get("outs") or []}
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return set()


def _dvc_bookkeeping(path: str, outputs: set[str]) -> bool:
    """DVC's own files (the lock, `.dvc/`, `*.dvc` pointers) and the pipeline's outputs: `dvc repro` edits
    them mid-run, so counting them would call every result of a clean checkout dirty."""
    parts = path.split("/")
    return (parts[-1] == "dvc.lock" or parts[0] == ".dvc" or path.endswith(".dvc")
            or any(path == out or path.startswith(out + "/") for out in outputs))


@lru_cache(maxsize=None)
def git_state(root: str | os.PathLike = ".") -> tuple[str, bool | None]:
    """(commit, dirty) of the git work tree at `root`; ("unknown", None) outside git. Dirty: a tracked file
    differs from the commit, DVC's bookkeeping left out (`_dvc_bookkeeping`)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD", "--show-toplevel"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown", None
        commit, top = head.stdout.split("\n")[:2]
        status = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=30)
        if status.returncode != 0:
            return commit, None
        # -z: "XY path\0", a rename or copy followed by "origin\0"; paths from the top of the work tree
        entries, changed = status.stdout.split("\0"), []
        while entries:
            entry = entries.pop(0)
            if entry:
                changed.append(entry[3:])
                if entry[0] in "RC" and entries:
                    changed.append(entries.pop(0))
        outputs = _pipeline_outputs(Path(top))
        return commit, any(not _dvc_bookkeeping(path, outputs) for path in changed)
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown", None


def _version(package: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {_cpu_name()}"


def environment(device) -> dict:
    """Library versions, the device and the torch thread count."""
    import torch
    commit, dirty = git_state(str(PACKAGE.parent))
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "mujoco": _version("mujoco"),
            "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads()}


def record(run: RunIdentity, profile: str, device, *, seconds: float | None = None, iterations: int | None = None,
           stopped: str | None = None, **more) -> dict:
    """The provenance of one result: identity, environment, and (training) wall time, iterations, why it stopped."""
    out = {"run_id": run.fingerprint, "code_hash": run.code, "settings_hash": run.settings, "data_hash": run.data,
           "profile": profile, **environment(device)}
    if seconds is not None:
        out["wall_seconds"] = round(seconds, 1)
    if iterations is not None:
        out["iterations"] = iterations
    if stopped is not None:
        out["stopped"] = stopped
    return {**out, **more}

