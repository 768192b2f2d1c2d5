"""Zip and tar archives given as input (`convert --input`, `score --image-directory`): one rule for what is an
archive, one size limit, one safe extraction.

An archive is a file whose name ends in ARCHIVE_SUFFIXES, or a folder whose only entry is one (how Azure ML
mounts an uploaded file's folder). Extraction writes regular files only, never outside the target: members
with absolute paths, `..`, links or special files are skipped by name, and extraction stops once more than
the limit (`--max-extracted-gib`, default MAX_EXTRACTED_GIB) has been written (zip bombs; sizes are counted
as bytes are written, never trusted from headers, and each member counts MEMBER_BYTES more, so that millions
of empty members are bounded too).
"""

from __future__ import annotations

import errno
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from .errors import InvalidDatasetError, InvalidParameterError, TrainPyTorchModelError
from .legacy_format import is_hidden, safe_join

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_EXTRACTED_GIB = 32.0  # the default limit of both commands' --max-extracted-gib
MAX_NAME_BYTES = 255  # one path component, as every common file system allows
# What every member costs against the limit, whatever its size: a tar header's bytes. Empty members are free
# otherwise, so a small .tar.gz of millions of them would create files (and skip entries) without bound.
MEMBER_BYTES = 512
COPY_CHUNK = 1 << 20
MAX_EXTRACTED_HELP = ("stop when an archive unpacks to more than this many GiB (zip-bomb guard; "
                      "default %(default)s)")

# Says where extraction failed to write, as the caller's own error: convert extracts into its output's
# staging folder (an output error), score into a temporary folder (TMPDIR).
WriteError = Callable[[Path, OSError], TrainPyTorchModelError]


def is_archive(path: Path) -> bool:
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_in(source: Path) -> Path | None:
    """The archive `source` stands for: `source` itself when it is an archive file, the only entry of a folder
    that holds nothing else, else None."""
    source = Path(source)
    if source.is_file():
        return source if is_archive(source) else None
    if not source.is_dir():
        return None
    entries = [e for e in source.iterdir() if not is_hidden(e.name)]
    if len(entries) == 1 and entries[0].is_file() and is_archive(entries[0]):
        return entries[0]
    return None


def extracted_bytes_limit(gib: float, name: str = "Max extracted GiB") -> int:
    """--max-extracted-gib as bytes, checked (a positive, finite number)."""
    if not (isinstance(gib, (int, float)) and 0 < gib < float("inf")):
        raise InvalidParameterError(name, gib, "must be a number > 0")
    return int(gib * 2**30)


def extract_archive(archive: Path, target: Path, max_bytes: int, skipped: list[tuple[str, str]],
                    write_error: WriteError) -> Path:
    """Unpack regular files of `archive` into `target`; returns the folder that holds the data."""
    target.mkdir(parents=True)
    budget = _Budget(archive, max_bytes)
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, target, budget, skipped, write_error)
        else:
            _extract_tar(archive, target, budget, skipped, write_error)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise InvalidDatasetError(f"Archive '{archive}' cannot be read: {exc}.") from None
    # Archives usually wrap everything in one folder ("dataset/cat/1.jpg"): look through it.
    root = target
    while True:
        entries = [e for e in root.iterdir() if not is_hidden(e.name)]
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        inner = [e for e in entries[0].iterdir() if not is_hidden(e.name)]
        if any(e.is_file() for e in inner):  # "cat/1.jpg": a one-class ImageFolder, not a wrapper
            return root
        root = entries[0]


class _MemberNameError(Exception):
    """A member's name the file system refuses: that member is skipped."""


class _Budget:
    def __init__(self, archive: Path, max_bytes: int):
        self.archive, self.max_bytes, self.used = archive, max_bytes, 0

    def take(self, count: int) -> None:
        self.used += count
        if self.used > self.max_bytes:
            raise InvalidDatasetError(
                f"Archive '{self.archive}' unpacks to more than {self.max_bytes / 2**30:.3g} GiB "
                "(--max-extracted-gib); raise the limit if the archive is genuine."
            )


def _member_path(target: Path, name: str) -> tuple[Path | None, str | None]:
    """Where a member goes, or (None, reason) for one that must not be extracted (or None, None: hidden)."""
    clean = name.rstrip("/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        return None, "absolute path in the archive"
    parts = [part for part in clean.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None, "path leads outside the archive ('..')"
    path = safe_join(target, clean)
    if path is None or not parts:
        return None, "unsafe path in the archive"
    if any(is_hidden(part) for part in parts):
        return None, None
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in parts):
        return None, f"a name in the path is longer than {MAX_NAME_BYTES} bytes"
    return path, None


def _copy_stream(reader, path: Path, budget: _Budget, write_error: WriteError) -> None:
    """Copy a member's bytes, counting them against the budget. FileExistsError for a duplicate name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = open(path, "xb")  # "x": a duplicate member name never overwrites an earlier one
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL, errno.ENOTDIR, errno.EISDIR):
            raise _MemberNameError(exc.strerror or str(exc)) from None  # this member's name: skip it
        raise write_error(path, exc) from None
    with writer:
        while chunk := reader.read(COPY_CHUNK):
            budget.take(len(chunk))
            try:
                writer.write(chunk)
            except OSError as exc:
                raise write_error(path, exc) from None


def _extract_zip(archive: Path, target: Path, budget: _Budget, skipped, write_error: WriteError) -> None:
    with zipfile.ZipFile(archive) as zf:
        def members():
            for info in zf.infolist():
                budget.take(MEMBER_BYTES)
                if info.is_dir():
                    continue
                refusal = ("symbolic link (links are never extracted)" if stat.S_ISLNK(info.external_attr >> 16)
                           else "encrypted member" if info.flag_bits & 0x1 else None)
                yield info.filename, refusal, lambda info=info: zf.open(info)
        _extract_members(members(), target, budget, skipped, write_error)


def _extract_tar(archive: Path, target: Path, budget: _Budget, skipped, write_error: WriteError) -> None:
    # Reading members in order reads the (compressed) stream once: no seeking back in .tar.gz.
    with tarfile.open(archive, "r:*") as tf:
        def members():
            while (member := tf.next()) is not None:
                tf.members = []  # TarFile keeps every member it read: memory would grow with the member count
                budget.take(MEMBER_BYTES)
                if member.isdir():
                    continue
                refusal = ("link (links are never extracted)" if member.issym() or member.islnk()
                           else "not a regular file" if not member.isreg() else None)
                yield member.name, refusal, lambda member=member: tf.extractfile(member)
        _extract_members(members(), target, budget, skipped, write_error)


def _extract_members(members, target: Path, budget: _Budget, skipped: list[tuple[str, str]],
                     write_error: WriteError) -> None:
    """Extract (name, refusal or None, opener) members; the ones that must not or cannot be extracted are
    skipped by name with the reason, and the others still extracted."""
    for name, refusal, opener in members:
        path, reason = _member_path(target, name)
        if path is not None and refusal:
            path, reason = None, refusal
        if path is None:
            if reason:
                skipped.append((name, reason))
            continue
        try:
            with opener() as reader:
                _copy_stream(reader, path, budget, write_error)
        except FileExistsError:
            skipped.append((name, "duplicate name in the archive"))
        except _MemberNameError as exc:
            skipped.append((name, f"the name cannot be a file here ({exc})"))
        except (zipfile.BadZipFile, NotImplementedError, zlib.error, EOFError) as exc:  # a damaged zip member
            path.unlink(missing_ok=True)
            skipped.append((name, f"cannot be extracted ({type(exc).__name__}: {str(exc)[:120]})"))


def space_hint(exc: OSError) -> str:
    return " (the disk or quota is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""

