"""Download stage: fetch, verify and safely extract the raw archives.

Omniglot comes from the official archives (Lake et al. 2015) or from a mirror folder that stands
in for the URLs: same file names under `<mirror>/omniglot/`, checked against the mirror's own
`MD5SUMS` (a mirror may re-encode the archives, so the official md5s need not hold there).

Why the care:
- a download is written to `<name>.part` and renamed only once its md5 matches, so a crash or a
  bad mirror never leaves a file that looks complete; the fixed `.part` name lets a retry resume
  with an HTTP Range request instead of starting over;
- transient failures (connection drops, timeouts, HTTP 5xx) are retried with exponential back-off,
  while a 404 or a checksum mismatch stops at once with a one-line `DataError`;
- extraction refuses absolute paths, `..` members and symlinks, which could write outside
  `data/raw` (the "zip slip" problem), and extracts into a temporary folder renamed at the end.

mini-ImageNet images fall under ImageNet's terms, so no URL is baked in: `locate_mini_imagenet`
only finds the user's copy (pickled caches or the original JPEGs) and records what it found.
"""
from __future__ import annotations

import http.client
import os
import shutil
import stat
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from mamlbench.data.errors import DataError
from mamlbench.io import file_digest, write_json

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}.zip"
# The official archives' md5s, as torchvision.datasets.Omniglot lists them.
OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
MIRROR_ENV = "MAMLBENCH_DATA_MIRROR"
MINI_IMAGENET_PICKLES = tuple(f"mini-imagenet-cache-{s}.pkl" for s in ("train", "val", "test"))


class _Retryable(Exception):
    """A failure worth another attempt (connection drop, timeout, 5xx)."""


def resolve_mirror(setting: str, root: str | os.PathLike = ".") -> Path | None:
    """The mirror folder for `data.mirror`, or None for the official URLs.

    `auto`: the MAMLBENCH_DATA_MIRROR environment variable when set, else `<root>/../shared/data`
    when that folder exists, else None. `off`: None. Anything else is a folder that must exist.
    """
    if setting == "off":
        return None
    if setting == "auto":
        if os.environ.get(MIRROR_ENV):
            setting = os.environ[MIRROR_ENV]
        else:
            shared = Path(root).resolve().parent / "shared" / "data"
            return shared if shared.is_dir() else None
    path = Path(setting)
    if not path.is_dir():
        raise DataError(f"data mirror {path}: no such folder (set data.mirror or {MIRROR_ENV})")
    return path


def read_md5sums(folder: Path) -> dict[str, str]:
    """`md5sum -c` format: '<md5>  <name>' per line (a '*' before the name marks binary mode)."""
    path = folder / "MD5SUMS"
    if not path.is_file():
        raise DataError(f"{path}: mirror has no MD5SUMS file to verify its archives against")
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def _verify(path: Path, expected: str | None, name: str) -> None:
    if expected is None:  # a user's archive given without an md5: its md5 is recorded instead
        return
    actual = file_digest(path, "md5")
    if actual != expected:
        path.unlink(missing_ok=True)
        raise DataError(f"{name}: md5 mismatch (expected {expected}, got {actual}); the file was deleted")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    transient=True)


def _fetch_once(url: str, part: Path, timeout: float, progress: Progress) -> None:
    """One attempt: resume `part` with a Range request when it holds bytes already."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # our partial file is not a prefix the server knows: start over
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 416 on resume from byte {have}") from None
        if err.code >= 500 or err.code == 429:
            raise _Retryable(f"HTTP {err.code}") from None
        raise DataError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Retryable(str(getattr(err, "reason", err))) from None
    with response:
        resumed = response.status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        task = progress.add_task(part.name.removesuffix(".part"), total=total, completed=start)
        written = start
        with open(part, "ab" if resumed else "wb") as f:
            try:
                while block := response.read(1 << 16):
                    f.write(block)
                    written += len(block)
                    progress.update(task, completed=written)
            except http.client.IncompleteRead as err:
                f.write(err.partial)  # keep what arrived; the next attempt resumes after it
                raise _Retryable(f"connection dropped at byte {written + len(err.partial)}") from None
            except (OSError, http.client.HTTPException) as err:
                raise _Retryable(f"connection dropped at byte {written}: {err}") from None
            finally:
                progress.remove_task(task)
        if total is not None and written < total:
            raise _Retryable(f"connection dropped at byte {written} of {total}")


def http_download(url: str, dest: str | os.PathLike, md5: str | None, *, retries: int = 4, backoff: float = 1.0,
                  timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically, resuming and retrying with back-off, then check `md5`.

    Retries `retries` times after the first attempt, sleeping backoff * 2**attempt seconds between.
    Raises `DataError` on a 4xx answer, when the retries run out, or on an md5 mismatch (the file is
    deleted first).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _progress() as progress:
        for attempt in range(retries + 1):
            try:
                _fetch_once(url, part, timeout, progress)
                break
            except _Retryable as err:
                if attempt == retries:
                    raise DataError(f"{url}: download failed after {retries + 1} attempts ({err})") from None
                time.sleep(backoff * 2 ** attempt)
    _verify(part, md5, dest.name)
    os.replace(part, dest)
    return dest


def copy_from_mirror(src: Path, dest: Path, md5: str | None) -> Path:
    """Copy a mirror file to `dest` atomically and check it against the mirror's md5."""
    if not src.is_file():
        raise DataError(f"mirror file missing: {src}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, part)
    _verify(part, md5, str(src))
    os.replace(part, dest)
    return dest


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract a zip into `dest`, refusing any member that would land outside it.

    Refused: absolute names, drive letters, `..` components, and symlink members (a link can point
    anywhere; Omniglot has none). Returns the top-level names extracted.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{archive}: not a readable zip archive ({err})") from None
    with zf:
        root = dest.resolve()
        for info in zf.infolist():
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
                raise DataError(f"{archive}: refusing member {name!r} that would land outside {dest}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{archive}: refusing symlink member {name!r}")
            if not (root / name).resolve().is_relative_to(root):
                raise DataError(f"{archive}: refusing member {name!r} that would land outside {dest}")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for info in zf.infolist():
                zf.extract(info, dest)
        except (zipfile.BadZipFile, OSError, EOFError) as err:  # CRC errors, truncated data
            raise DataError(f"{archive}: corrupt archive ({err})") from None
        return sorted({PurePosixPath(i.filename).parts[0] for i in zf.infolist()})


def download_omniglot(out_dir: str | os.PathLike, archives: list[str], mirror: Path | None, *,
                      retries: int = 4, backoff: float = 1.0) -> list[Path]:
    """Fetch and extract each Omniglot archive into `out_dir/<archive>/<Alphabet>/characterNN/*.png`.

    An archive already extracted and verified is kept. Each archive is extracted into a temporary
    folder renamed into place at the end, so a failure leaves either nothing or the whole folder.
    """
    out_dir = Path(out_dir)
    sums = read_md5sums(mirror / "omniglot") if mirror is not None else OMNIGLOT_MD5
    folders = []
    for name in archives:
        zip_path = out_dir / f"{name}.zip"
        if mirror is not None:
            if f"{name}.zip" not in sums:
                raise DataError(f"{mirror / 'omniglot' / 'MD5SUMS'}: no md5 listed for {name}.zip")
            expected = sums[f"{name}.zip"]
        else:
            expected = sums[name]
        if not (zip_path.is_file() and file_digest(zip_path, "md5") == expected):
            if mirror is not None:
                copy_from_mirror(mirror / "omniglot" / f"{name}.zip", zip_path, expected)
            else:
                http_download(OMNIGLOT_URL.format(name=name), zip_path, expected, retries=retries, backoff=backoff)
        folder = out_dir / name
        if not folder.is_dir():
            tmp = out_dir / f".{name}.extracting"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                safe_extract(zip_path, tmp)
                if not (tmp / name).is_dir():
                    raise DataError(f"{zip_path}: expected a top folder '{name}/' in the archive")
                os.replace(tmp / name, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        folders.append(folder)
    return folders


def locate_mini_imagenet(source: str | None, mirror: Path | None) -> dict:
    """Find the user's mini-ImageNet: the three pickled caches, or a folder of the original JPEGs.

    Returns {"kind": "pickles" | "jpeg", "path": ...}. Raises `DataError` with instructions when
    neither is there.
    """
    candidates = [Path(source)] if source else ([mirror / "mini-imagenet"] if mirror is not None else [])
    for folder in candidates:
        if all((folder / name).is_file() for name in MINI_IMAGENET_PICKLES):
            return {"kind": "pickles", "path": str(folder.resolve())}
        for sub in (folder / "images", folder):
            if sub.is_dir() and next(sub.glob("n[0-9]*.jpg"), None) is not None:
                return {"kind": "jpeg", "path": str(sub.resolve())}
    where = ", ".join(str(c) for c in candidates) or "no folder (data.mini_imagenet.source is null and no mirror)"
    raise DataError(f"mini-ImageNet not found in {where}: set data.mini_imagenet.source to a folder holding "
                    f"{', '.join(MINI_IMAGENET_PICKLES)} or the original JPEGs named as in the Ravi split "
                    f"files (e.g. n0153282900000005.jpg); ImageNet's terms forbid shipping them")


def download_mini_imagenet(out_dir: str | os.PathLike, source: str | None, mirror: Path | None) -> Path:
    """Record where the user's mini-ImageNet is (`out_dir/source.json`); nothing is copied."""
    found = locate_mini_imagenet(source, mirror)
    path = Path(out_dir) / "source.json"
    write_json(path, found)
    return path
