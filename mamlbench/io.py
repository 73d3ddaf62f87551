"""Atomic, verified file writes: a crash leaves the old file or the new one, never half of one.

Every write goes to a temporary file beside the target (`.<name>.<pid>.<random>.tmp`, a name no
reader looks for), is fsynced and renamed over the target. A temporary file left by a killed
writer is removed by the next write of the same target, or by `remove_stale_temps`, once its
writer's process is gone.

`save_torch` appends a sha256 trailer to the torch file; `load_torch` checks it, so a flipped
byte anywhere (tensor data included, where `torch.load` itself would succeed) or a cut file is
refused with a one-line `CorruptFile` instead of being read as valid. `torch.load` still reads
such files directly (the trailer sits after the zip archive).

`MAMLBENCH_FAULT=<point>:<file name glob>` pauses a writer at a named point (`before-write`,
`mid-write`, `before-rename`, `after-rename`; `Checkpointer.save` adds `after-prune`) after
printing `fault: paused at ...` to stderr, so the fault tests can kill it exactly there.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

FAULT_ENV = "MAMLBENCH_FAULT"
DIGEST_TAG = b"\n#mamlbench-sha256:"  # followed by 64 hex digits and a newline
TRAILER_LEN = len(DIGEST_TAG) + 65


class CorruptFile(ValueError):
    """A file failed its integrity check (truncated, bytes flipped); the message is one line."""


def fault_point(point: str, path: Path) -> None:
    """Test hook: pause here forever when MAMLBENCH_FAULT names this point and file (see module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, _, pattern = spec.partition(":")
    if want == point and fnmatch.fnmatch(path.name, pattern or "*"):
        print(f"fault: paused at {point} {path}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove temporary files in `folder` (for target `name`) whose writing process is gone."""
    removed = []
    for tmp in Path(folder).glob(f".{glob.escape(name) if name != '*' else '*'}.*.tmp"):
        stem = tmp.name[:-len(".tmp")].rsplit(".", 2)  # [.<name>, <pid>, <random>]
        if len(stem) == 3 and stem[1].isdigit() and int(stem[1]) != os.getpid() and not _pid_alive(int(stem[1])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        fault_point("before-write", path)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual mode
        fault_point("before-rename", path)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        fault_point("after-rename", path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            fault_point("mid-write", path)  # half a file on disk: only ever under the temporary name
            f.write(data[half:])


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save` atomically, with a sha256 trailer over the bytes that `load_torch` verifies."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    write_bytes(path, payload + DIGEST_TAG + hashlib.sha256(payload).hexdigest().encode() + b"\n")


def verified_payload(path: str | os.PathLike, require_digest: bool = False) -> bytes:
    """The torch bytes of `path` after checking its sha256 trailer; `CorruptFile` when it fails.

    A file without a trailer (written before trailers existed) passes unless `require_digest`.
    """
    data = Path(path).read_bytes()
    trailer = data[-TRAILER_LEN:]
    if len(data) < TRAILER_LEN or not trailer.startswith(DIGEST_TAG) or not trailer.endswith(b"\n"):
        if require_digest:
            raise CorruptFile(f"{path}: no sha256 trailer ({len(data)} bytes: truncated, or not written by mamlbench)")
        return data
    payload, expected = data[:-TRAILER_LEN], trailer[len(DIGEST_TAG):-1].decode("ascii", "replace")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CorruptFile(f"{path}: sha256 mismatch (stored {expected[:12]}..., content {actual[:12]}...): "
                          f"the file is corrupted")
    return payload


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
               require_digest: bool = False) -> Any:
    """Load tensors and plain containers only, after the sha256 check: a pickle that tries to run
    code is refused, and so is a corrupted or cut file (`CorruptFile`)."""
    payload = verified_payload(path, require_digest)
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file read in chunks (md5 for archive checksums, sha256 elsewhere)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
