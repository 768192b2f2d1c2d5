"""`convert`: images as people have them -> an ImageDirectory (designer's "Convert to Image Directory").

Input: a folder, a table file, a .zip/.tar/.tar.gz/.tgz/.tar.bz2/.tar.xz archive, or a folder holding
just one such archive (how Azure ML mounts an uploaded archive). Its images are laid out like this:
- an ImageDirectory, an MLTable folder or a CSV/TSV/Parquet/JSONL table (read as training reads
  them, image_directory.py / tables.py): their rows and categories, in table order;
- ImageFolder tree `<class>/<image>`: labeled, classes are the folder names (sorted). Images at
  the top level or nested deeper are skipped, as designer did (spec 2.6 b);
- otherwise a flat folder: every image below the root, unlabeled (spec 2.6 c).

Output (`--to`): an ImageDirectory, the layout "Convert to Image Directory" wrote (spec 2.1):
`image/<class id>_<row><suffix>` (flat: `image/<relative path>`) copied byte for byte, `images.lst`,
`_schema.json`, `_samples.json`, `_meta.yaml`; or an MLTable folder as AutoML for images reads it
(`MLTable` + `images.jsonl` with relative `image_url`s, the same `image/` files); or Parquet shards as
Hugging Face `datasets` writes them (shards.py: `data/train-NNNNN-of-MMMMM.parquet`, the bytes as they
came, or shrunk to `--max-side` and re-encoded as JPEG). Parquet shards are also read as input, to be
re-sharded or shrunk (`--to parquet`). A multi-label input (label lists, tables.py / shards.py) keeps its label
sets in an MLTable (a list per row) or in shards (`Sequence(ClassLabel)`); an ImageDirectory holds one category
per image, so it is refused for them. Rows are in sorted path order (table order for tables), so
the same input always gives the same output. Every file that is left out is reported on stderr with
the reason; hidden files and folders (.DS_Store, __MACOSX, ...) are never data and are ignored silently.

Archives are extracted (archives.py, shared with `score`) into the output's staging folder, never outside
it: members with absolute paths, `..`, links or special files are skipped, and extraction stops at
`--max-extracted-gib` (zip bombs; sizes are counted as bytes are written, not trusted from headers).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .archives import (
    ARCHIVE_SUFFIXES,
    MAX_EXTRACTED_GIB,
    MAX_EXTRACTED_HELP,
    archive_in,
    extract_archive,
    extracted_bytes_limit,
    is_archive,
    space_hint,
)
from .errors import (
    DirectoryEmptyError,
    DirectoryNotFoundError,
    InvalidDatasetError,
    InvalidParameterError,
    OutputDirectoryError,
    quote,
)
from .image_directory import (
    IMAGE_SUFFIXES,
    default_schema,
    find_coco_file,
    is_image_name,
    label_image_folder,
    load_image_directory,
    walk_files,
)
from .input_files import UnreadableInputError, read_input
from .label_sets import LabelSets
from .legacy_format import (
    META_FILE,
    dump_json,
    dump_json_line,
    dump_yaml,
    is_hidden,
    resolves_inside,
    safe_join,
    write_text,
)
from .model_directory import training_samples
from .output_folder import reserved_output, staged_output
from .preprocessing import ImageDecodeError, decode_image, probe_image
from .shards import (
    DEFAULT_SHARD_MIB,
    DEFAULT_SHARD_ROWS,
    MAX_IMAGE_BYTES,
    ShardIndex,
    ShardReader,
    ShardWriter,
    shard_files,
    stored_path,
)
from .tables import MLTABLE_FILE, TABLE_SUFFIXES, find_table, write_mltable

log = logging.getLogger(__name__)

IMAGE_LIST = "images.lst"
SCHEMA_FILE = "_schema.json"
SAMPLES_FILE = "_samples.json"
IMAGE_FOLDER = "image"
MAX_NAMED_SKIPS = 200
FORMATS = ("image_directory", "mltable", "parquet")
JPEG_QUALITY = 95  # what --max-side re-encodes with: visually lossless for training


@dataclass
class Conversion:
    """What was found: the rows to write and every file left out."""

    layout: str  # "image_folder", "flat", or the layout of a read dataset ("meta", "mltable", "table")
    files: list[str] = field(default_factory=list)  # relative POSIX paths below `root`
    categories: list[str] | None = None
    labels: list[int] = field(default_factory=list)  # -1: a row without a label
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    root: Path | None = None  # where `files` are, when not the scanned folder
    shards: ShardIndex | None = None  # the input is Parquet shards: `files` name their rows
    label_sets: LabelSets | None = None  # multi-label: each row's category ids (`labels` is then 0, or -1 unlabeled)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path,
                        help="ImageFolder tree (<class>/<image>), flat folder of images, ImageDirectory, MLTable "
                             "folder, CSV/TSV/Parquet/JSONL table, or a .zip/.tar(.gz) of one")
    parser.add_argument("--image-directory", "--output", dest="image_directory", required=True, type=Path,
                        help="output folder (new or empty)")
    parser.add_argument("--to", "--format", dest="to", choices=FORMATS, default="image_directory",
                        help="write an ImageDirectory (designer; default), an MLTable folder (AutoML for images) or "
                             "Parquet shards (Hugging Face datasets' layout; for large data on a mount)")
    parser.add_argument("--max-side", type=int, default=None, metavar="PIXELS",
                        help="--to parquet: shrink images whose longer side is larger to this many pixels (aspect "
                             f"kept, JPEG quality {JPEG_QUALITY}); default: store the bytes as they are")
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS,
                        help="--to parquet: images per shard file at most (default %(default)s)")
    parser.add_argument("--shard-mib", type=int, default=DEFAULT_SHARD_MIB,
                        help="--to parquet: MiB per shard file at most (default %(default)s)")
    parser.add_argument("--image-column", default=None,
                        help="a table's image path column (default: the first of image_url, image_path, image, path, "
                             "file, file_name, filename)")
    parser.add_argument("--label-column", default=None,
                        help="a table's label column (default: the first of label, category, class)")
    parser.add_argument("--max-extracted-gib", type=float, default=MAX_EXTRACTED_GIB, help=MAX_EXTRACTED_HELP)


def run(args: argparse.Namespace) -> int:
    limit = extracted_bytes_limit(args.max_extracted_gib)
    shards = ShardOptions(args.max_side, args.shard_rows, args.shard_mib)
    if args.to != "parquet" and args.max_side is not None:
        raise InvalidParameterError("Max side", args.max_side, "only applies to --to parquet")
    result = convert(args.input, args.image_directory, max_extracted_bytes=limit, to=args.to,
                     image_column=args.image_column, label_column=args.label_column, shards=shards)
    report_skipped(result.skipped)
    classes = f"{len(result.categories)} classes" if result.categories is not None else "unlabeled"
    classes += " (multi-label)" if result.label_sets is not None else ""
    kind = {"mltable": "MLTable", "parquet": "Parquet shards"}.get(args.to, "ImageDirectory")
    print(f"Converted {len(result.files)} images, {classes}, to {kind} {args.image_directory}; "
          f"{len(result.skipped)} files skipped.")
    return 0


@dataclass
class ShardOptions:
    """--to parquet: the longer side images are shrunk to (None: bytes kept), and the shard size bounds."""

    max_side: int | None = None
    shard_rows: int = DEFAULT_SHARD_ROWS
    shard_mib: int = DEFAULT_SHARD_MIB

    def __post_init__(self):
        if self.max_side is not None and not 8 <= self.max_side <= 65535:
            raise InvalidParameterError("Max side", self.max_side, "must be an integer from 8 to 65535")
        if not 1 <= self.shard_rows <= 10_000_000:
            raise InvalidParameterError("Shard rows", self.shard_rows, "must be an integer from 1 to 10000000")
        if not 1 <= self.shard_mib <= 65536:
            raise InvalidParameterError("Shard MiB", self.shard_mib, "must be an integer from 1 to 65536")


def convert(source: Path, out: Path, *, max_extracted_bytes: int = int(MAX_EXTRACTED_GIB * 2**30),
            to: str = "image_directory", image_column: str | None = None, label_column: str | None = None,
            shards: ShardOptions | None = None) -> Conversion:
    """Write the ImageDirectory (or MLTable, `to="mltable"`, or Parquet shards, `to="parquet"`) for `source`
    to `out` (atomically) and say what was converted."""
    source = Path(source)
    if not source.exists():
        raise DirectoryNotFoundError(f"Input '{source}' does not exist.")
    if to not in FORMATS:
        raise InvalidParameterError("To", to, f"must be one of {', '.join(FORMATS)}")
    with reserved_output(out, inputs=[source]), staged_output(out) as stage:
        extracted = stage / ".extracted"  # hidden: never part of the result, removed below
        try:
            skipped: list[tuple[str, str]] = []
            archive = _archive_in(source)
            if archive is not None:
                root = extract_archive(archive, extracted, max_extracted_bytes, skipped, _output_write_error)
            else:
                root = source
            result = scan(root, to, image_column, label_column)
            result.skipped[:0] = skipped
            if not result.files:
                report_skipped(result.skipped)
                raise InvalidDatasetError(
                    f"Input '{source}' holds no readable image (extensions {sorted(IMAGE_SUFFIXES)}); "
                    f"{len(result.skipped)} files skipped{_reason_summary(result.skipped)}."
                )
            # Files of an extraction are ours to move, unless table rows may name one file twice.
            move = archive is not None and result.layout in ("image_folder", "flat")
            if to == "parquet":
                write_parquet_shards(stage, result.root or root, result, shards or ShardOptions())
            elif result.shards is not None:
                raise InvalidDatasetError(f"Input '{source}' is Parquet shards, which training reads as they are; "
                                          "convert them only --to parquet (to re-shard, or shrink with --max-side).")
            elif result.label_sets is not None and to == "image_directory":
                raise InvalidDatasetError(f"Input '{source}' is multi-label (rows with lists of labels); an "
                                          "ImageDirectory holds one category per image. Convert it --to mltable or "
                                          "--to parquet, which keep the label sets.")
            elif to == "mltable":
                write_mltable_folder(stage, result.root or root, result, move=move)
            else:
                write_image_directory(stage, result.root or root, result, move=move)
        finally:
            shutil.rmtree(extracted, ignore_errors=True)
    return result


def _output_write_error(path: Path, exc: OSError) -> OutputDirectoryError:
    """convert extracts into its output's staging folder: a failed write there is an output error."""
    return OutputDirectoryError(f"Cannot write extracted file '{path}': {exc.strerror or exc}{space_hint(exc)}.")


# --- finding the images --------------------------------------------------------------------------------


def _archive_in(source: Path) -> Path | None:
    """The archive to unpack (archives.archive_in); a file that is neither an archive nor a table is refused."""
    if source.is_file() and source.name != MLTABLE_FILE and not source.name.lower().endswith(TABLE_SUFFIXES) \
            and not is_archive(source):
        raise InvalidDatasetError(
            f"Input '{source}' is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)}); "
            "give a folder of images or an archive of one."
        )
    if source.is_dir() and not any(not is_hidden(e.name) for e in source.iterdir()):
        raise DirectoryEmptyError(f"Input folder '{source}' is empty.")
    return archive_in(source)


def scan(root: Path, to: str = "image_directory", image_column: str | None = None,
         label_column: str | None = None) -> Conversion:
    """Sort the files below `root` into rows and skips: a dataset (ImageDirectory, MLTable, table) by its own
    rows, a folder by designer's layout rules."""
    if root.is_file():
        return _read_dataset(root, image_column, label_column)
    is_directory = (root / META_FILE).is_file() or ((root / IMAGE_LIST).is_file() and (root / SCHEMA_FILE).is_file())
    if not is_directory and shard_files(root, "Input", image_column) is not None:
        return _read_dataset(root, image_column, label_column)
    if is_directory and to == "image_directory":
        raise InvalidDatasetError(
            f"'{root}' is already an ImageDirectory ({META_FILE} / {IMAGE_LIST}); use it as it is."
        )
    table = None if is_directory else find_table(root, InvalidDatasetError)
    if table is not None and table.name == MLTABLE_FILE and to == "mltable":
        raise InvalidDatasetError(f"'{root}' is already an MLTable folder; use it as it is.")
    if is_directory or table is not None:
        return _read_dataset(root, image_column, label_column)
    coco = find_coco_file(root)
    if coco is not None:
        raise InvalidDatasetError(
            f"'{coco}' makes '{root}' a COCO dataset (images + annotations), which has no classification labels. "
            "Arrange the images as <class>/<image> folders to convert them."
        )
    images, skipped = [], []
    real_root = os.path.realpath(root)
    for relative, path in walk_files(root):
        reason = _check_file(relative, path, real_root)
        if reason:
            skipped.append((relative, reason))
        else:
            images.append(relative)
    images.sort()

    one_deep, categories, labels = label_image_folder(images)
    if not one_deep:
        unsafe = {f for f in images if safe_join(root, f) is None}
        skipped += [(f, "the file name cannot be stored in images.lst (backslash in the name)") for f in sorted(unsafe)]
        return Conversion("flat", [f for f in images if f not in unsafe], None, [], skipped)

    for f in images:
        if f.count("/") == 0:
            skipped.append((f, "top-level image outside any <class>/ folder (ImageFolder layout)"))
        elif f.count("/") > 1:
            skipped.append((f, "nested deeper than <class>/<image> (ImageFolder layout)"))
    return Conversion("image_folder", one_deep, categories, list(labels), skipped)


def _read_dataset(path: Path, image_column: str | None, label_column: str | None) -> Conversion:
    """The rows of an ImageDirectory / MLTable / table, read as training reads them; unreadable images skipped."""
    directory = load_image_directory(path, "Input", keep_unlabeled=True,
                                     image_column=image_column, label_column=label_column)
    result = Conversion(directory.layout, categories=directory.categories, root=directory.root,
                        label_sets=directory.label_sets)
    if directory.shards is not None:  # rows of shards: their bytes are checked as they are written
        result.shards, result.files, result.labels = directory.shards, list(directory.files), list(directory.labels)
        return result
    real_root = os.path.realpath(directory.root)
    kept = []
    for i, relative in enumerate(directory.files):
        reason = _check_file(relative, directory.path(i), real_root, suffix=False)
        if reason:
            result.skipped.append((relative, reason))
        else:
            kept.append(i)
            result.files.append(relative)
            result.labels.append(directory.labels[i])
    if directory.label_sets is not None:
        result.label_sets = directory.label_sets.subset(kept)
    return result


def _check_file(relative: str, path: Path, real_root: str, suffix: bool = True) -> str | None:
    """Why the file cannot be an image row, or None when it can."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "the path is not valid UTF-8"
    if suffix and not is_image_name(relative):
        return f"not an image file extension ({', '.join(sorted(IMAGE_SUFFIXES))})"
    if not os.path.lexists(path):
        return "file not found"
    if not resolves_inside(real_root, path):
        return "symbolic link to a file outside the input folder"
    return probe_image(path, inside=real_root)


# --- writing -------------------------------------------------------------------------------------------


def image_file_name(result: Conversion, row: int) -> str:
    """Where row `row` goes (spec 2.6): `image/<class id>_<row><suffix>`, `image/<row><suffix>` for a row
    without a label (or with a multi-label set: no one class id), `image/<path>` for a flat folder."""
    relative = result.files[row]
    if result.layout == "flat":
        return f"{IMAGE_FOLDER}/{relative}"
    suffix = Path(relative).suffix  # original case kept, as designer did
    label = result.labels[row] if result.categories is not None and result.label_sets is None else -1
    return f"{IMAGE_FOLDER}/{label}_{row}{suffix}" if label >= 0 else f"{IMAGE_FOLDER}/{row}{suffix}"


def _place_images(stage: Path, root: Path, result: Conversion, move: bool):
    """Put every row's image in `stage` (moved from an extraction, else copied); yield (row, its new name)."""
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
        yield i, name


def _label_ids(result: Conversion, row: int) -> int | list[int] | None:
    """Row `row`'s class id (-1: none), or a multi-label row's list of ids (None: unlabeled)."""
    if result.label_sets is not None:
        return list(result.label_sets[row]) if result.labels[row] >= 0 else None
    return result.labels[row] if result.categories is not None else -1


def _category(result: Conversion, row: int) -> str | list[str] | None:
    """Row `row`'s label as a table cell holds it: a category name, a multi-label row's list of names (possibly
    empty), or None for a row without a label."""
    ids = _label_ids(result, row)
    if ids is None or ids == -1:
        return None
    return [result.categories[i] for i in ids] if isinstance(ids, list) else result.categories[ids]


def write_image_directory(stage: Path, root: Path, result: Conversion, *, move: bool) -> None:
    """The §2.1 files in `stage`: images, list, schema, samples, meta."""
    schema = default_schema(result.categories)
    with open(stage / IMAGE_LIST, "w", encoding="utf-8", newline="\n") as rows:
        for i, name in _place_images(stage, root, result, move):
            row = {"image_info": {"file_name": name}}
            if (category := _category(result, i)) is not None:
                row["category"] = category
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


def write_mltable_folder(stage: Path, root: Path, result: Conversion, *, move: bool) -> None:
    """An MLTable folder in `stage`: the images under `image/`, `images.jsonl` rows, the `MLTable` file."""
    write_mltable(stage, ((name, _category(result, i)) for i, name in _place_images(stage, root, result, move)))
    load_image_directory(stage, "Converted", keep_unlabeled=True)  # read back, as training will


def write_parquet_shards(stage: Path, root: Path, result: Conversion, options: ShardOptions) -> None:
    """Parquet shards in `stage` (shards.ShardWriter), one row at a time; rows whose image cannot be read (or
    shrunk) are skipped by name. Progress on a terminal."""
    writer = ShardWriter(stage, result.categories, multilabel=result.label_sets is not None,
                         shard_rows=options.shard_rows, shard_bytes=options.shard_mib << 20)
    written = 0
    for i, data in _progress(_row_bytes(root, result), len(result.files), "images"):
        relative = result.files[i]
        if isinstance(data, str):
            result.skipped.append((relative, data))
            continue
        reencoded = False
        if options.max_side is not None:
            try:
                data, reencoded = shrink(data, options.max_side)
            except ImageDecodeError as exc:
                result.skipped.append((relative, f"not a readable image ({exc})"))
                continue
        writer.add(data, stored_path(relative, reencoded) if result.shards is None else relative,
                   _label_ids(result, i))
        written += 1
    paths = writer.close()
    if not written:
        raise InvalidDatasetError(f"No image of '{root}' could be written; {len(result.skipped)} skipped"
                                  f"{_reason_summary(result.skipped)}.")
    sizes = [path.stat().st_size for path in paths]
    log.info("Wrote %d images in %d shard(s) of %.1f to %.1f MiB.", written, len(paths), min(sizes) / 2**20,
             max(sizes) / 2**20)
    load_image_directory(stage, "Converted", keep_unlabeled=True)  # read back, as training will


def _row_bytes(root: Path, result: Conversion):
    """(row, encoded image or the reason it has none), in row order: files read one by one, shards a row group
    at a time."""
    if result.shards is not None:
        reader = ShardReader(result.shards)
        for group in range(len(result.shards.groups)):
            first = int(result.shards.groups[group, 2])
            for offset, data in enumerate(reader.read_group(group)):
                yield first + offset, data
        reader.close()
        return
    for i, relative in enumerate(result.files):
        try:
            yield i, read_input(root / relative, inside=root, max_bytes=MAX_IMAGE_BYTES)
        except UnreadableInputError as exc:
            yield i, exc.reason


def shrink(data: bytes, max_side: int) -> tuple[bytes, bool]:
    """The image with its longer side at most `max_side` (aspect kept, re-encoded as JPEG, EXIF orientation
    applied), or the bytes as they are when it is not larger."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as header:  # the size from the header: no pixels decoded
            side = max(header.size)
    except Exception as exc:  # Pillow raises many types for one damaged header
        raise ImageDecodeError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if side <= max_side:
        return data, False
    image = decode_image(data, max_side)  # a JPEG decodes at a reduced scale still >= max_side: fast
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), True


def _progress(items, total: int, unit: str):
    """`items` with a progress bar on a terminal (tqdm); plain iteration in logs."""
    if not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, unit=unit, dynamic_ncols=True, leave=False) as bar:
        yield from bar


# --- reporting -----------------------------------------------------------------------------------------


def _reason_summary(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    counts = Counter(reason.split(" (")[0] for _, reason in skipped)
    return ": " + "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(5))


def report_skipped(skipped: list[tuple[str, str]], stream=None) -> None:
    stream = stream or sys.stderr
    for path, reason in skipped[:MAX_NAMED_SKIPS]:
        print(f"Skipped {quote(path, 300)}: {reason}", file=stream)
    if len(skipped) > MAX_NAMED_SKIPS:
        print(f"... and {len(skipped) - MAX_NAMED_SKIPS} more skipped files", file=stream)
    if skipped:
        print(f"{len(skipped)} files skipped{_reason_summary(skipped)}", file=stream)
