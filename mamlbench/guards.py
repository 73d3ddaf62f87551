"""Checks that turn an ordinary mistake into one line before any work, and the stops that keep a
run's state honest when it is interrupted.

Every check raises `ValueError` (or `ConfigError`) with a message in the style
`<what>: <why> (<how to fix>)`; the CLI prints it as `error: ...` and exits 2. None of them
trains or evaluates anything: they read a file header, try a write, open a socket.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from mamlbench.schema import ConfigError

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds like KeyboardInterrupt (the MLflow run ends KILLED, the checkpoints stay),
    but reaches the CLI's handler instead of Click's "Aborted!". `detail` says where training stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.detail = signum, ""


def install_signal_handlers() -> None:
    """SIGTERM (a scheduler, `kill`, `docker stop`) stops a run exactly as SIGINT does."""
    def handler(signum, frame):
        raise Interrupted(signum)
    for signum in SIGNAL_EXIT:
        signal.signal(signum, handler)


# ----------------------------------------------------------------------------- params
REQUIRED_SECTIONS = ("seed", "profile", "profiles", "tracking", "sinusoid", "omniglot", "mini_imagenet", "imagefolder", "variants",
                     "data", "rl", "tune")


def check_params_file(raw: dict, path: str | Path) -> None:
    """A params file names every top-level section and defines the profile it selects: an empty file or
    a lost section would otherwise train silently at the code's defaults (70 000 sinusoid iterations)."""
    missing = [name for name in REQUIRED_SECTIONS if name not in raw]
    if missing:
        raise ConfigError(f"{path}: missing section{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                          f"(start from the repository's params.yaml)")
    profiles = raw.get("profiles")
    name = raw.get("profile")
    if isinstance(profiles, dict) and name not in profiles:
        raise ConfigError(f"{path}: profile = {name!r}: no such entry under 'profiles' "
                          f"(have: {', '.join(map(str, profiles)) or 'none'}; add it, or pick one of those)")


def as_written(build_params, raw: dict, path: str | Path, profile: str) -> None:
    """Validate the sections as written, before the profile replaces some values: `iterations: -5`
    hidden under a profile would surface the day the profile changes."""
    written = {k: v for k, v in raw.items() if k not in ("profile", "profiles")}
    try:
        build_params(written)
    except ConfigError as err:
        raise ConfigError(f"{err} (as written in {path}, although profile {profile!r} may override it)") from None


# ----------------------------------------------------------------------------- files and folders
def check_writable_dir(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it, before hours of training."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder}: is a file, not a folder (pick a folder path)")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for p in created:   # a refused command leaves no empty folders behind; the writer makes them again
            p.rmdir()
    except OSError as err:
        raise ValueError(f"{what} {folder}: not writable: {err.strerror or err} (pick a folder you can write)") from None
    return folder


def check_new_file(path: str | Path, what: str) -> None:
    """An output file path must not be a folder, and its folder must be writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder, not a file (name a file, e.g. {path / 'episode.png'})")
    check_writable_dir(path.parent if str(path.parent) else Path("."), f"{what}'s folder")


def read_json(path: str | Path, what: str = "metrics file") -> Any:
    """JSON from `path`; a cut or hand-edited file is one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}): a truncated {what} "
                         f"(rerun the stage that writes it)") from None


def load_model_file(path: str | Path, hint: str) -> dict:
    """A trained model file (`load_torch`), or one line naming the file when it is cut or not a model."""
    from mamlbench.io import CorruptFile, load_torch
    try:
        state = load_torch(path)
    except CorruptFile as err:
        raise ValueError(f"{err} ({hint})") from None
    except Exception as err:  # a cut zip archive, a pickle weights_only refuses, a wrong file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path}: unreadable model file: {reason} ({hint})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a mamlbench model file ({hint})")
    return state


def check_model_identity(state: dict, path: str | Path, **expected: Any) -> None:
    """Refuse to score a model other than the one asked for: the file records what trained it."""
    if "learner" not in state or "benchmark" not in state:
        raise ValueError(f"{path}: not a few-shot model file (a sinusoid or RL run?); pass the folder of a "
                         f"`mamlbench train {expected.get('benchmark')}` run with --runs")
    for key, want in expected.items():
        have = state.get(key)
        if have is not None and have != want:
            raise ValueError(f"{path}: trained with {key} {have!r}, not {want!r} "
                             f"(pass --{key} {have}, or the run folder of {key} {want})")


# ----------------------------------------------------------------------------- data provenance
def episode_set_id(episodes: dict, n: int) -> str:
    """Identity of the first `n` stored episodes: what a paired comparison needs to be the same."""
    import hashlib
    keys = ("scheme", "split", "n_way", "k_shot", "n_query", "derived_seed", "prepared_hash")
    blob = json.dumps({**{k: episodes.get(k) for k in keys}, "n": n}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_prepared_provenance(meta: dict, split_seed: int, prepared: str | Path) -> None:
    """Prepared data records the split seed it was made with; training on another split is not the run asked for."""
    made = meta.get("split_seed")
    if made is not None and meta.get("scheme") == "maml" and made != split_seed:
        raise ValueError(f"{prepared}: prepared with data.omniglot.split_seed = {made}, params say {split_seed} "
                         f"(re-run `mamlbench data prepare`, or set split_seed back to {made})")


def check_episodes_seed(episodes: dict, seed: int, path: str | Path) -> None:
    made = episodes.get("seed")
    if made is not None and made != seed:
        raise ValueError(f"{path}: episodes drawn with data.episodes.seed = {made}, params say {seed} "
                         f"(re-run `mamlbench data episodize`, or set data.episodes.seed back to {made})")


def check_policy_width(policy, hidden: list[int], path: str | Path) -> None:
    """The random baseline is built from params: its width must be the trained policy's."""
    from torch import nn
    widths = [m.out_features for m in policy.modules() if isinstance(m, nn.Linear)][:-1]
    if widths and list(widths) != list(hidden):
        raise ValueError(f"{path}: trained with hidden {widths}, params say {list(hidden)} (evaluate with the "
                         f"params it was trained with)")


# ----------------------------------------------------------------------------- the run folder
@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """One training per run folder: a second on the same folder stops at once instead of interleaving
    checkpoints. `flock` dies with its process, so a killed run never leaves the folder locked."""
    import fcntl
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ValueError(f"--run-dir {run_dir}: another training (pid {holder}) is writing this run folder "
                             f"(wait for it to end, or pass another --run-dir)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- tracking and storage
def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """Reach the tracking store before any work: a dead server otherwise costs minutes of retries and a
    149-line traceback, an unwritable SQLite folder 105 s."""
    hint = "start it, or set MLFLOW_TRACKING_URI / tracking.uri to a reachable store, or tracking.enabled: false"
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri.split("sqlite:///", 1)[-1]) if uri.startswith("sqlite:///") else None
        if db is not None and str(db) not in ("", ":memory:"):
            try:
                check_writable_dir(db.parent, "folder")
            except ValueError as err:
                reason = str(err).split(" (")[0]
                raise ValueError(f"tracking store {uri}: {reason} (point tracking.uri or MLFLOW_TRACKING_URI at a "
                                 f"writable folder)") from None
        return
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                pass
        except OSError as err:
            raise ValueError(f"tracking store {uri}: not reachable ({err.strerror or err}) ({hint})") from None


def bound_tracking_retries() -> None:
    """MLflow's HTTP client retries for minutes by default; a few seconds, then the tracker's fallback."""
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"), ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")):
        os.environ.setdefault(name, value)


def check_storage_url(url: str | None) -> None:
    """An Optuna storage URL SQLAlchemy can open (or journal:<file>), checked before the study starts."""
    if url is None or url.startswith("journal:"):
        return
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url
    try:
        make_url(url).get_dialect()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(f"--storage {url}: not a storage URL Optuna can open: {reason} "
                         f"(use sqlite:///optuna.db, another SQLAlchemy URL, or journal:<file>)") from None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
