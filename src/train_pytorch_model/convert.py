"""`convert`: images as people have them -> an ImageDirectory (designer's "Convert to Image Directory").

Input: a folder, a .zip/.tar/.tar.gz/.tgz/.tar.bz2/.tar.xz archive, or a folder holding just one
such archive (how Azure ML mounts an uploaded archive). Its images are laid out like this:
- ImageFolder tree `<class>/<image>`: labeled, classes are the folder names (sorted). Images at
  the top level or nested deeper are skipped, as designer did (spec 2.6 b).
- otherwise a flat folder: every image below the root, unlabeled (spec 2.6 c).

Output: the layout "Convert to Image Directory" wrote (spec 2.1): `image/<class id>_<row><suffix>`
(flat: `image/<relative path>`) copied byte for byte, `images.lst`, `_schema.json`,
`_samples.json`, `_meta.yaml`. Rows are in sorted path order, so the same input always gives the
same directory. Every file that is left out is reported on stderr with the reason; hidden files
and folders (.DS_Store, __MACOSX, ...) are never data and are ignored silently.

Archives are extracted into the output's staging folder, never outside it: members with
absolute paths, `..`, links or special files are skipped, and extraction stops at
`--max-extracted-gib` (zip bombs; sizes are counted as bytes are written, not trusted from headers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import stat
import sys
import tarfile
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import preprocessing  # noqa: F401 - sets Pillow's decompression-bomb limit used by check_image
from .errors import (DirectoryEmptyError, DirectoryNotFoundError, InvalidDatasetError, InvalidParameterError,
                     OutputDirectoryError)
from .image_directory import IMAGE_SUFFIXES, default_schema, load_image_directory
from .legacy_format import META_FILE, dump_json, dump_json_line, dump_yaml, is_hidden, safe_join, write_text
from .model_directory import staged_output, training_samples

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
IMAGE_LIST = "images.lst"
SCHEMA_FILE = "_schema.json"
SAMPLES_FILE = "_samples.json"
IMAGE_FOLDER = "image"
MAX_NAMED_SKIPS = 200
COPY_CHUNK = 1 << 20


@dataclass
class Conversion:
    """What was found: the rows to write and every file left out."""

    layout: str  # "image_folder" or "flat"
    files: list[str] = field(default_factory=list)  # relative POSIX paths in the source, sorted
    categories: list[str] | None = None
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path,
                        help="ImageFolder tree (<class>/<image>), flat folder of images, or a .zip/.tar(.gz) of one")
    parser.add_argument("--image-directory", required=True, type=Path, help="output ImageDirectory folder (new or empty)")
    parser.add_argument("--max-extracted-gib", type=float, default=32.0,
                        help="stop when an archive unpacks to more than this many GiB (zip-bomb guard; default 32)")


def run(args: argparse.Namespace) -> int:
    if not args.max_extracted_gib > 0:
        raise InvalidParameterError("Max extracted GiB", args.max_extracted_gib, "must be a number > 0")
    result = convert(args.input, args.image_directory, max_extracted_bytes=int(args.max_extracted_gib * 2**30))
    report_skipped(result.skipped)
    classes = f"{len(result.categories)} classes" if result.categories is not None else "unlabeled (flat folder)"
    print(f"Converted {len(result.files)} images, {classes}, to ImageDirectory {args.image_directory}; "
          f"{len(result.skipped)} files skipped.")
    return 0


def convert(source: Path, out: Path, *, max_extracted_bytes: int = 32 * 2**30) -> Conversion:
    """Write the ImageDirectory for `source` to `out` (atomically) and say what was converted."""
    source = Path(source)
    if not source.exists():
        raise DirectoryNotFoundError(f"Input '{source}' does not exist.")
    with staged_output(out) as stage:
        extracted = stage / ".extracted"  # hidden: never part of the result, removed below
        try:
            skipped: list[tuple[str, str]] = []
            archive = _archive_in(source)
            if archive is not None:
                root = extract_archive(archive, extracted, max_extracted_bytes, skipped)
                move = True
            else:
                root, move = source, False
            result = scan(root)
            result.skipped[:0] = skipped
            if not result.files:
                report_skipped(result.skipped)
                raise InvalidDatasetError(
                    f"Input '{source}' holds no readable image (extensions {sorted(IMAGE_SUFFIXES)}); "
                    f"{len(result.skipped)} files skipped{_reason_summary(result.skipped)}."
                )
            write_image_directory(stage, root, result, move=move)
        finally:
            shutil.rmtree(extracted, ignore_errors=True)
    return result


# --- finding the images --------------------------------------------------------------------------------


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _archive_in(source: Path) -> Path | None:
    """The archive to unpack: `source` itself, or the only entry of a folder."""
    if source.is_file():
        if not _is_archive(source):
            raise InvalidDatasetError(
                f"Input '{source}' is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)}); "
                "give a folder of images or an archive of one."
            )
        return source
    entries = [e for e in source.iterdir() if not is_hidden(e.name)]
    if not entries:
        raise DirectoryEmptyError(f"Input folder '{source}' is empty.")
    if len(entries) == 1 and entries[0].is_file() and _is_archive(entries[0]):
        return entries[0]
    return None


def scan(root: Path) -> Conversion:
    """Sort the files below `root` into rows and skips, by designer's layout rules."""
    if (root / META_FILE).is_file() or ((root / IMAGE_LIST).is_file() and (root / SCHEMA_FILE).is_file()):
        raise InvalidDatasetError(
            f"'{root}' is already an ImageDirectory ({META_FILE} / {IMAGE_LIST}); use it as it is."
        )
    coco = _coco_file(root)
    if coco is not None:
        raise InvalidDatasetError(
            f"'{coco}' makes '{root}' a COCO dataset (images + annotations), which has no classification labels. "
            "Arrange the images as <class>/<image> folders to convert them."
        )
    images, skipped = [], []
    real_root = os.path.realpath(root)
    for relative, path in _walk(root):
        reason = _check_file(relative, path, real_root)
        if reason:
            skipped.append((relative, reason))
        else:
            images.append(relative)
    images.sort()

    one_deep = [f for f in images if f.count("/") == 1]
    if not one_deep:
        unsafe = {f for f in images if safe_join(root, f) is None}
        skipped += [(f, "the file name cannot be stored in images.lst (backslash in the name)") for f in sorted(unsafe)]
        return Conversion("flat", [f for f in images if f not in unsafe], None, [], skipped)

    for f in images:
        if f.count("/") == 0:
            skipped.append((f, "top-level image outside any <class>/ folder (ImageFolder layout)"))
        elif f.count("/") > 1:
            skipped.append((f, "nested deeper than <class>/<image> (ImageFolder layout)"))
    categories = sorted({f.split("/", 1)[0] for f in one_deep})
    index = {name: i for i, name in enumerate(categories)}
    labels = [index[f.split("/", 1)[0]] for f in one_deep]
    return Conversion("image_folder", one_deep, categories, labels, skipped)


def _walk(root: Path):
    """(relative POSIX path, path) of every non-hidden file below root. Symlinked folders are not entered."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            if not is_hidden(name):
                path = Path(dirpath, name)
                yield path.relative_to(root).as_posix(), path


def _check_file(relative: str, path: Path, real_root: str) -> str | None:
    """Why the file cannot be an image row, or None when it can."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "the path is not valid UTF-8"
    if Path(relative).suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file extension ({', '.join(sorted(IMAGE_SUFFIXES))})"
    if path.is_symlink():
        real = os.path.realpath(path)
        if not real.startswith(real_root.rstrip(os.sep) + os.sep):
            return "symbolic link to a file outside the input folder"
    return check_image(path)


def check_image(path: Path) -> str | None:
    """None when Pillow recognises the file as an image (header only, as designer checked), else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
        if width < 1 or height < 1:
            return "the image has no pixels"
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"the image has more than {Image.MAX_IMAGE_PIXELS} pixels (decompression-bomb guard)"
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError) as exc:
        return f"not a readable image ({type(exc).__name__}: {str(exc)[:120]})"


def _coco_file(root: Path) -> Path | None:
    for entry in sorted(root.iterdir()):
        if entry.suffix.lower() == ".json" and entry.is_file() and not is_hidden(entry.name):
            try:
                data = json.loads(entry.read_text(encoding="utf-8-sig"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "images" in data and "annotations" in data:
                return entry
    return None


# --- archives --------------------------------------------------------------------------------------------


def extract_archive(archive: Path, target: Path, max_bytes: int, skipped: list[tuple[str, str]]) -> Path:
    """Unpack regular files of `archive` into `target`; returns the folder that holds the data."""
    target.mkdir(parents=True)
    budget = _Budget(archive, max_bytes)
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, target, budget, skipped)
        else:
            _extract_tar(archive, target, budget, skipped)
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
    return path, None


def _copy_stream(reader, path: Path, budget: _Budget) -> None:
    """Copy a member's bytes, counting them against the budget. FileExistsError for a duplicate name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = open(path, "xb")  # "x": a duplicate member name never overwrites an earlier one
    except FileExistsError:
        raise
    except OSError as exc:
        raise OutputDirectoryError(f"Cannot write extracted file '{path}': {exc.strerror or exc}.") from None
    with writer:
        while chunk := reader.read(COPY_CHUNK):
            budget.take(len(chunk))
            try:
                writer.write(chunk)
            except OSError as exc:
                raise OutputDirectoryError(f"Cannot write extracted file '{path}': {exc.strerror or exc}.") from None


def _extract_zip(archive: Path, target: Path, budget: _Budget, skipped) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            path, reason = _member_path(target, info.filename)
            mode = info.external_attr >> 16
            if path is not None and stat.S_ISLNK(mode):
                reason, path = "symbolic link (links are never extracted)", None
            if path is not None and info.flag_bits & 0x1:
                reason, path = "encrypted member", None
            if path is None:
                if reason:
                    skipped.append((info.filename, reason))
                continue
            try:
                with zf.open(info) as reader:
                    _copy_stream(reader, path, budget)
            except FileExistsError:
                skipped.append((info.filename, "duplicate name in the archive"))
            except (zipfile.BadZipFile, NotImplementedError, zlib.error, EOFError) as exc:  # a damaged member
                path.unlink(missing_ok=True)
                skipped.append((info.filename, f"cannot be extracted ({type(exc).__name__}: {str(exc)[:120]})"))


def _extract_tar(archive: Path, target: Path, budget: _Budget, skipped) -> None:
    # Iterating reads the (compressed) stream once, in order: no seeking back in .tar.gz.
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if member.isdir():
                continue
            path, reason = _member_path(target, member.name)
            if path is not None and (member.issym() or member.islnk()):
                reason, path = "link (links are never extracted)", None
            elif path is not None and not member.isreg():
                reason, path = "not a regular file", None
            if path is None:
                if reason:
                    skipped.append((member.name, reason))
                continue
            reader = tf.extractfile(member)
            try:
                _copy_stream(reader, path, budget)
            except FileExistsError:
                skipped.append((member.name, "duplicate name in the archive"))


# --- writing -------------------------------------------------------------------------------------------


def image_file_name(result: Conversion, row: int) -> str:
    """Where row `row` goes in the ImageDirectory (spec 2.6): `image/<class id>_<row><suffix>` or `image/<path>`."""
    relative = result.files[row]
    if result.categories is None:
        return f"{IMAGE_FOLDER}/{relative}"
    suffix = Path(relative).suffix  # original case kept, as designer did
    return f"{IMAGE_FOLDER}/{result.labels[row]}_{row}{suffix}"


def write_image_directory(stage: Path, root: Path, result: Conversion, *, move: bool) -> None:
    """The §2.1 files in `stage`: images (moved from an extraction, else copied), list, schema, samples, meta."""
    schema = default_schema(result.categories)
    with open(stage / IMAGE_LIST, "w", encoding="utf-8", newline="\n") as rows:
        for i, relative in enumerate(result.files):
            name = image_file_name(result, i)
            destination = stage / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = root / relative
            try:
                if move:
                    os.replace(source, destination)
                else:
                    shutil.copyfile(source, destination)
            except OSError as exc:
                raise OutputDirectoryError(f"Cannot copy '{source}' to '{destination}': {exc.strerror or exc}.") from None
            row = {"image_info": {"file_name": name}}
            if result.categories is not None:
                row["category"] = result.categories[result.labels[i]]
            row["id"] = i
            rows.write(dump_json_line(row))
    write_text(stage / SCHEMA_FILE, dump_json(schema))
    # Samples are built from the directory as written, through the same reader training uses.
    directory = load_image_directory(stage, "Converted")
    write_text(stage / SAMPLES_FILE, dump_json(training_samples(directory, schema)))
    write_text(stage / META_FILE, dump_yaml({
        "type": "ImageDirectory", "extension": {}, "image_list": IMAGE_LIST,
        "samples": SAMPLES_FILE, "schema": SCHEMA_FILE,
    }))


# --- reporting -----------------------------------------------------------------------------------------


def _reason_summary(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    counts = Counter(reason.split(" (")[0] for _, reason in skipped)
    return ": " + "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(5))


def report_skipped(skipped: list[tuple[str, str]], stream=None) -> None:
    stream = stream or sys.stderr
    for path, reason in skipped[:MAX_NAMED_SKIPS]:
        print(f"Skipped '{path}': {reason}", file=stream)
    if len(skipped) > MAX_NAMED_SKIPS:
        print(f"... and {len(skipped) - MAX_NAMED_SKIPS} more skipped files", file=stream)
    if skipped:
        print(f"{len(skipped)} files skipped{_reason_summary(skipped)}", file=stream)
