"""Download, verify and lay out the public datasets (MVTec AD, BTAD, MTD) under a data root.

Everything here uses the standard library only. A download goes to ``ROOT/.downloads/<file>.part`` and resumes with
an HTTP ``Range`` request when interrupted; the archive is checked against its published SHA-256, extracted safely
into a temporary folder under ``ROOT``, moved into ``ROOT/<name>/`` and marked complete with ``.adbench-complete``.
MTD has no published archive, so its extracted files are checked with :func:`manifest_sha256` instead.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from adbench.errors import DownloadError

MARKER = ".adbench-complete"
DOWNLOADS_DIR = ".downloads"
CHUNK_SIZE = 1 << 20
USER_AGENT = "adbench/0.1 (+urllib)"

ProgressFn = Callable[[int, int | None], None]

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MTD_FOLDERS = ("MT_Free", "MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
MTD_COMMIT = "cc4eb530b57b9cb7225bf76023873043ffd50655"


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from and how its archive is laid out under ``ROOT/<name>/``.

    Attributes:
        name: Dataset name and folder name under the data root.
        url: Archive URL (tests point it at a local server).
        filename: Name of the archive in ``ROOT/.downloads/``.
        sha256: Published SHA-256 of the archive, or None if there is none.
        archive: ``"tar"`` (any compression tarfile reads) or ``"zip"``.
        strip: Glob of a single top-level folder of the archive to descend into ("" keeps the top level).
        include: Globs of the top-level entries (after ``strip``) that are kept; the rest is dropped.
        expected: Paths relative to ``ROOT/<name>`` that must all exist in a complete install (the first one is
            quoted in error messages).
        manifest_sha256: Expected :func:`manifest_sha256` of the installed folder, or None.
        manifest_pattern: Glob of the top-level folders the manifest covers.
        size_hint: Approximate archive size in bytes, or None if unknown (for display only).
        licence: Licence as stated by the dataset's owners.
        homepage: Where a person downloads it by hand.
        manual: What to do by hand after downloading, completing "... so that <path> exists".
    """

    name: str
    url: str
    filename: str
    sha256: str | None
    archive: Literal["tar", "zip"]
    strip: str
    include: tuple[str, ...]
    expected: tuple[str, ...]
    manifest_sha256: str | None = None
    manifest_pattern: str = "*"
    size_hint: int | None = None
    licence: str = ""
    homepage: str = ""
    manual: str = "extract it"


SOURCES: dict[str, Source] = {
    "mvtec": Source(
        name="mvtec",
        url=(
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
            "mvtec_anomaly_detection.tar.xz"
        ),
        filename="mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        archive="tar",
        strip="",
        include=("*",),
        expected=tuple(f"{c}/train/good" for c in MVTEC_CATEGORIES),
        size_hint=4_900_000_000,
        licence="CC BY-NC-SA 4.0",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        manual="extract it",
    ),
    "btad": Source(
        name="btad",
        url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
        filename="btad.zip",
        sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        archive="zip",
        strip="BTech_Dataset_transformed",
        include=("*",),
        expected=("01/train/ok", "02/train/ok", "03/train/ok"),
        size_hint=None,
        licence="CC BY-SA 4.0 per the README.txt in the zip (anomalib states CC BY-NC-SA 4.0)",
        homepage="https://avires.dimi.uniud.it/papers/btad/btad.zip",
        manual="extract it, moving the folders 01, 02 and 03 out of BTech_Dataset_transformed/,",
    ),
    "mtd": Source(
        name="mtd",
        url=f"https://github.com/abin24/Magnetic-tile-defect-datasets./archive/{MTD_COMMIT}.zip",
        filename=f"mtd-{MTD_COMMIT[:8]}.zip",
        sha256=None,
        archive="zip",
        strip="Magnetic-tile-defect-datasets*",
        include=("MT_*",),
        expected=tuple(f"{f}/Imgs" for f in MTD_FOLDERS),
        manifest_sha256="d2601c3c228c0b4d340c8dae4216c25798bf4ff6339d1fe13fbfb23ad1667a25",
        manifest_pattern="MT_*",
        size_hint=None,
        licence="none stated; the authors ask to cite Huang, Qiu and Yuan, The Visual Computer 2020",
        homepage=f"https://github.com/abin24/Magnetic-tile-defect-datasets./tree/{MTD_COMMIT}",
        manual=f"copy its MT_* folders (commit {MTD_COMMIT[:8]})",
    ),
}
NAMES: tuple[str, ...] = tuple(SOURCES)


def get_source(name: str) -> Source:
    """The :class:`Source` called ``name``; raises DownloadError listing the valid names otherwise."""
    try:
        return SOURCES[name]
    except KeyError:
        raise DownloadError(f"unknown dataset {name!r} to download; valid: {', '.join(NAMES)}") from None


def manifest_sha256(root: Path, pattern: str = "MT_*") -> str:
    """SHA-256 of a sorted file manifest: ``LC_ALL=C find PATTERN -type f | sort | xargs sha256sum | sha256sum``.

    Args:
        root: Folder that holds the top-level entries matched by ``pattern``.
        pattern: Glob of the top-level folders (or files) to cover.

    Returns:
        Hex digest over the lines ``f"{sha256(file)}  {relative/path}\\n"``, sorted by the path's bytes.
    """
    root = Path(root)
    files: list[tuple[bytes, Path]] = []
    for top in root.glob(pattern):
        candidates = [top] if not top.is_dir() else (p for p in top.rglob("*"))
        for path in candidates:
            if path.is_file() and not path.is_symlink():
                files.append((os.fsencode(path.relative_to(root).as_posix()), path))
    files.sort(key=lambda item: item[0])
    outer = hashlib.sha256()
    for rel, path in files:
        outer.update(_file_sha256(path).encode() + b"  " + rel + b"\n")
    return outer.hexdigest()


def dataset_present(name: str, root: Path) -> bool:
    """Whether ``root/name`` holds a complete install (the marker file, or every expected folder)."""
    return _looks_complete(get_source(name), Path(root) / name)


def download_dataset(
    name: str,
    root: Path,
    *,
    progress: ProgressFn | None = None,
    force: bool = False,
    source: Source | None = None,
    keep_archive: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and install one dataset under ``root``.

    Args:
        name: One of :data:`NAMES`.
        root: Data root; the dataset ends up in ``root/name``.
        progress: Called as ``progress(done_bytes, total_bytes_or_None)`` while downloading.
        force: Download and install again even if ``root/name`` looks complete.
        source: Replaces the built-in source (its ``name`` must equal ``name``); used by tests and mirrors.
        keep_archive: Keep the archive in ``root/.downloads`` after a successful install.
        timeout: Socket timeout in seconds for connecting and each read.

    Returns:
        The dataset folder ``root/name``.

    Raises:
        DownloadError: Unknown name, network or HTTP failure, checksum mismatch or unsafe/unexpected archive.
    """
    src = source if source is not None else get_source(name)
    if src.name != name:
        raise ValueError(f"source {src.name!r} does not match dataset name {name!r}")
    root = Path(root)
    dest = root / name
    if not force and _looks_complete(src, dest):
        return dest
    (dest / MARKER).unlink(missing_ok=True)

    downloads = root / DOWNLOADS_DIR
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / src.filename
    if force:
        archive.unlink(missing_ok=True)
        archive.with_name(archive.name + ".part").unlink(missing_ok=True)
    if not archive.exists():
        _fetch(src, archive, dest, progress, timeout)
    _verify_archive(src, archive)
    _install(src, archive, root, dest)
    if not keep_archive:
        archive.unlink(missing_ok=True)
        _rmdir_if_empty(downloads)
    return dest


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _looks_complete(src: Source, dest: Path) -> bool:
    if (dest / MARKER).is_file():
        return True
    return bool(src.expected) and all((dest / rel).is_dir() for rel in src.expected)


def _manual_hint(src: Source, dest: Path) -> str:
    where = src.homepage or src.url
    return f"Download it by hand from {where} and {src.manual} so that {dest / src.expected[0]} exists"


def _one_line(text: object) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK_SIZE):
            digest.update(block)
    return digest.hexdigest()


def _fetch(src: Source, archive: Path, dest: Path, progress: ProgressFn | None, timeout: float) -> None:
    """Stream ``src.url`` into ``archive`` via a resumable ``.part`` file; network failures become DownloadError."""
    part = archive.with_name(archive.name + ".part")
    try:
        try:
            _fetch_once(src.url, part, progress, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not part.exists():
                raise
            # The server cannot serve the range we asked for (e.g. the file changed): start again from zero.
            part.unlink()
            _fetch_once(src.url, part, progress, timeout)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
        raise DownloadError(
            f"cannot download {src.name} from {src.url}: {_one_line(reason)}. {_manual_hint(src, dest)}"
        ) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise DownloadError(
            f"cannot download {src.name} from {src.url}: {_one_line(reason)}. {_manual_hint(src, dest)}"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        resume = " (run the download again to resume)" if part.exists() and part.stat().st_size else ""
        raise DownloadError(
            f"cannot download {src.name} from {src.url}: {_one_line(reason)}{resume}. {_manual_hint(src, dest)}"
        ) from None
    part.replace(archive)


class _Truncated(OSError):
    """The server closed the connection before sending the announced number of bytes."""


def _fetch_once(url: str, part: Path, progress: ProgressFn | None, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if offset and response.status == 206 and _range_start(response.headers.get("Content-Range")) == offset:
            mode = "ab"
        else:  # 200 (range ignored) or an unexpected range: restart from zero
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        done = offset
        if progress is not None:
            progress(done, total)
        with part.open(mode) as fh:
            while block := response.read(CHUNK_SIZE):
                fh.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
    if total is not None and done < total:
        raise _Truncated(f"connection closed after {done} of {total} bytes")


def _range_start(content_range: str | None) -> int | None:
    """Start offset of a ``Content-Range: bytes START-END/TOTAL`` header, or None."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    first = content_range[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


def _verify_archive(src: Source, archive: Path) -> None:
    if src.sha256 is None:
        return
    actual = _file_sha256(archive)
    if actual != src.sha256.lower():
        archive.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {src.name} archive {src.url}: expected sha256 {src.sha256[:12]}..., "
            f"got {actual[:12]}...; the file was deleted, run the download again"
        )


def _install(src: Source, archive: Path, root: Path, dest: Path) -> None:
    """Extract into a temporary folder under ``root``, check, move into ``dest`` and write the marker."""
    staging = Path(tempfile.mkdtemp(prefix=f".{src.name}-", suffix=".extracting", dir=root))
    try:
        try:
            _extract(src, archive, staging)
        except DownloadError:
            archive.unlink(missing_ok=True)
            raise
        base = _find_base(src, staging)
        entries = sorted(p for p in base.iterdir() if any(fnmatch.fnmatchcase(p.name, g) for g in src.include))
        missing = [rel for rel in src.expected if not (base / rel).is_dir()]
        if not entries or missing:
            archive.unlink(missing_ok=True)
            raise DownloadError(
                f"{src.name} archive {src.filename} lacks {', '.join(missing or src.include)}; it was deleted. "
                f"{_manual_hint(src, dest)}"
            )
        if src.manifest_sha256 is not None:
            actual = manifest_sha256(base, src.manifest_pattern)
            if actual != src.manifest_sha256:
                archive.unlink(missing_ok=True)
                raise DownloadError(
                    f"content check failed for {src.name} ({src.url}): expected manifest sha256 "
                    f"{src.manifest_sha256[:12]}..., got {actual[:12]}...; "
                    "the archive was deleted, run the download again"
                )
        dest.mkdir(parents=True, exist_ok=True)
        for entry in entries:
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            entry.rename(target)
        info = {"name": src.name, "url": src.url, "sha256": src.sha256, "manifest_sha256": src.manifest_sha256}
        info["installed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (dest / MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()


def _find_base(src: Source, staging: Path) -> Path:
    if not src.strip:
        return staging
    matches = [p for p in staging.iterdir() if p.is_dir() and fnmatch.fnmatchcase(p.name, src.strip)]
    if len(matches) != 1:
        raise DownloadError(f"{src.name} archive {src.filename} does not have one top-level folder {src.strip!r}")
    return matches[0]


def _unsafe(name: str) -> bool:
    """Whether an archive member name is absolute or climbs out with ``..``."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return True
    return ".." in PurePosixPath(norm).parts


def _extract(src: Source, archive: Path, into: Path) -> None:
    try:
        if src.archive == "zip":
            _extract_zip(archive, into)
        elif src.archive == "tar":
            _extract_tar(archive, into)
        else:
            raise ValueError(f"unknown archive kind {src.archive!r}")
    except DownloadError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DownloadError(
            f"cannot extract {src.name} archive {src.filename}: {_one_line(exc)}; "
            "it was deleted, run the download again"
        ) from None


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            if _unsafe(info.filename):
                raise DownloadError(f"refusing to extract {archive.name}: unsafe member path {info.filename!r}")
        for info in infos:
            zf.extract(info, into)


def _extract_tar(archive: Path, into: Path) -> None:
    has_filter = hasattr(tarfile, "data_filter")

    def checked(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        for member in tf:
            if _unsafe(member.name):
                raise DownloadError(f"refusing to extract {archive.name}: unsafe member path {member.name!r}")
            # Without the "data" filter (old Pythons) links and special files are refused outright.
            if not has_filter and not (member.isfile() or member.isdir()):
                raise DownloadError(f"refusing to extract {archive.name}: link or special file {member.name!r}")
            yield member

    # Stream mode reads the (possibly multi-GB) archive once.
    with tarfile.open(archive, mode="r|*") as tf:
        if has_filter:
            try:
                tf.extractall(into, members=checked(tf), filter="data")
            except tarfile.FilterError as exc:
                raise DownloadError(f"refusing to extract {archive.name}: {_one_line(exc)}") from None
        else:  # pragma: no cover - Python without extraction filters
            tf.extractall(into, members=checked(tf))


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
