"""Image tables: an MLTable folder and CSV/TSV/Parquet files of (image path, label) rows.

An MLTable folder is what Azure ML data labeling exports and AutoML for images reads: an `MLTable`
file (YAML) naming JSON Lines files, one row per image, `{"image_url": ..., "label": "cat"}`. The
reader is strict and small instead of the `mltable` package: that package pulls in a native data
runtime (hundreds of MB) to read a file we can read in fifty lines, and it would fetch `https://`
or `azureml://` URLs over the network, which a training input must never make us do.

Image references are never fetched. A relative path is looked up inside the folder that holds the
table. A URI (`azureml://.../datastores/<ds>/paths/<dir>/img.jpg`, `https://<account>/<container>/
<dir>/img.jpg`, `AmlDatastore://<dir>/img.jpg`, `wasbs://`, `abfss://`) names a file on a datastore;
Azure ML mounts some folder of that datastore as the input, so its datastore path `<dir>/img.jpg`
is looked up inside the input folder, dropping as many leading folders as the mount point takes
off (found once, from the first URI row, then the same for every row). Nothing outside the input
folder is ever read: `..`, absolute paths and paths that are not found inside are named errors.

Tables stream: JSON Lines and CSV line by line, Parquet in record batches of two columns, so memory
is the index (one path and one label id per row), whatever the table's size.

Multi-label: a label cell that holds a list (`"label": ["can", "milk_bottle"]` in JSON Lines, a Parquet
list column, or JSON list text in a CSV cell) makes the table multi-label; its rows' categories are then
kept as label sets (label_sets.py), an empty list being an image with none of the categories.
"""

from __future__ import annotations

import csv
import logging
import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from .categories import MAX_CLASSES, category_name_problem
from .errors import InvalidDatasetError, quote
from .label_sets import LabelSets, as_label_list
from .legacy_format import (
    dump_json_line,
    dump_yaml,
    is_hidden,
    is_safe_relative,
    iter_json_lines,
    iter_lines,
    open_regular,
    parse_yaml,
    read_text,
    safe_join,
    write_text,
)

log = logging.getLogger(__name__)

MLTABLE_FILE = "MLTable"
DELIMITERS = {".csv": ",", ".tsv": "\t"}
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
# Column names tried in order when --image-column / --label-column are not given (case-insensitive).
IMAGE_COLUMNS = ("image_url", "image_path", "image", "path", "file", "file_name", "filename")
LABEL_COLUMNS = ("label", "category", "class")
URI_SCHEMES = ("azureml", "amldatastore", "https", "http", "wasbs", "wasb", "abfss", "abfs")
PARQUET_BATCH_ROWS = 8192

Error = Callable[[str], InvalidDatasetError]


@dataclass
class TableIndex:
    """Rows of an image table: `files[i]` (relative to the table's folder) has label `categories[labels[i]]`."""

    layout: str  # "mltable" or "table"
    files: list[str]
    ids: array
    labels: array
    categories: list[str] | None
    source: Path  # the MLTable or table file
    label_sets: LabelSets | None = None  # multi-label: each row's categories (then `labels` is 0, or -1 unlabeled)


@dataclass
class Columns:
    """The columns to read; None picks the first of IMAGE_COLUMNS / LABEL_COLUMNS the table has."""

    image: str | None = None
    label: str | None = None


def find_table(root: Path, error: Error) -> Path | None:
    """The table a folder is: its `MLTable` file, else its only top-level CSV/TSV/Parquet/JSONL file."""
    if os.path.lexists(root / MLTABLE_FILE):
        return root / MLTABLE_FILE
    tables = sorted(e.name for e in os.scandir(root)
                    if not is_hidden(e.name) and e.name.lower().endswith(TABLE_SUFFIXES) and not e.is_dir())
    if len(tables) > 1:
        raise error(f"it holds {len(tables)} tables {quote(tables)}; give the table file itself as the input.")
    return root / tables[0] if tables else None


def read_table(path: Path, columns: Columns, keep_unlabeled: bool, error: Error) -> TableIndex:
    """Index an `MLTable` file or a CSV/TSV/Parquet/JSONL table. Image paths are relative to its folder."""
    root = path.parent  # every file read stays inside it (input_files.open_input)
    rows = _RowCollector(root, keep_unlabeled, error)
    if path.name == MLTABLE_FILE:
        for data_file, kind, options in _read_mltable_spec(path, error):
            rows.add_all(_iter_rows(data_file, root, kind, options, columns, error))
        layout = "mltable"
    else:
        rows.add_all(_iter_rows(path, root, _kind_of(path, error), {}, columns, error))
        layout = "table"
    return rows.finish(layout, path)


# --- the MLTable file ----------------------------------------------------------------------------------


def _read_mltable_spec(path: Path, error: Error) -> list[tuple[Path, str, dict]]:
    """(data file, kind, reader options) for each `paths:` entry, checked against the documented format."""
    spec = parse_yaml(read_text(path, InvalidDatasetError, inside=path.parent), str(path), InvalidDatasetError)
    if not isinstance(spec, dict):
        raise error(f"'{path.name}' must be a YAML mapping with 'paths' and 'transformations'.")
    entries = spec.get("paths")
    if not isinstance(entries, list) or not entries:
        raise error(f"'{path.name}' needs a 'paths' list, e.g. `paths: [{{file: ./train.jsonl}}]`.")
    kind, options = None, {}
    transformations = spec.get("transformations") or []
    if not isinstance(transformations, list):
        raise error(f"'{path.name}': 'transformations' must be a list.")
    for step in transformations:
        if isinstance(step, str):
            name, value = step, {}
        elif isinstance(step, dict) and len(step) == 1:
            name, value = next(iter(step.items()))
        else:
            name, value = None, None
        if name in ("read_json_lines", "read_delimited", "read_parquet"):
            if kind is not None:
                raise error(f"'{path.name}' has two read transformations; keep one.")
            kind, options = name, value if isinstance(value, dict) else {}
        elif name == "convert_column_types":
            continue  # stream_info on image_url: how Azure ML opens the files; we read them from the folder
        else:
            raise error(
                f"'{path.name}': transformation {quote(name if name is not None else step)} is not supported; "
                "only read_json_lines, read_delimited, read_parquet and convert_column_types are read."
            )
    if kind is None:
        raise error(f"'{path.name}' has no read transformation (read_json_lines, read_delimited or read_parquet).")
    encoding = str(options.get("encoding", "utf8")).lower().replace("-", "")
    if encoding not in ("utf8", "utf8bom"):
        raise error(f"'{path.name}': encoding {quote(options.get('encoding'))} is not supported; use utf8.")
    if options.get("invalid_lines", "error") != "error":
        raise error(f"'{path.name}': invalid_lines {quote(options.get('invalid_lines'))} is not supported; use error.")
    files = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise error(f"'{path.name}': paths entry {quote(entry)} is not supported; each must be `file: <name>`.")
        relative = _datastore_path(entry["file"]) or entry["file"].removeprefix("./")
        data_file = safe_join(path.parent, relative)
        if data_file is None or not os.path.lexists(data_file):
            raise error(f"'{path.name}': file {quote(entry['file'])} is not found inside the folder.")
        files.append((data_file, {"read_json_lines": "jsonl", "read_parquet": "parquet"}.get(kind, "delimited"),
                      options))
    return files


def _kind_of(path: Path, error: Error) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in DELIMITERS:
        return "delimited"
    raise error(f"'{path.name}' is not a table ({', '.join(TABLE_SUFFIXES)}).")


# --- rows ----------------------------------------------------------------------------------------------


def _pick(header: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, where: str,
          error: Error, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in header:
            raise error(f"{where} has no {what} column {quote(wanted)}; its columns are {quote(header)}.")
        return wanted
    lower = {name.lower(): name for name in reversed(header)}
    for name in defaults:
        if name in lower:
            return lower[name]
    if required:
        raise error(f"{where} has no {what} column (one of {', '.join(defaults)}); its columns are {quote(header)}. "
                    f"Name it with --{what}-column.")
    return None


def _iter_rows(path: Path, root: Path, kind: str, options: dict, columns: Columns, error: Error) -> Iterator[tuple]:
    """Yield (where, image value, label value, has label column) for each row of one data file inside `root`."""
    name = path.name
    if kind == "jsonl":
        image = label = None
        for number, row in iter_json_lines(path, InvalidDatasetError, inside=root):
            if image is None:
                header = list(row)
                image = _pick(header, columns.image, IMAGE_COLUMNS, "image", f"'{name}' line {number}", error, True)
                label = _pick(header, columns.label, LABEL_COLUMNS, "label", f"'{name}' line {number}", error, False)
            if image not in row:
                raise error(f"'{name}' line {number} has no {quote(image)} field.")
            yield f"'{name}' line {number}", row[image], row.get(label) if label else None, label is not None
    elif kind == "parquet":
        yield from _iter_parquet(path, root, columns, error)
    else:
        yield from _iter_delimited(path, root, options, columns, error)


def _iter_delimited(path: Path, root: Path, options: dict, columns: Columns, error: Error) -> Iterator[tuple]:
    delimiter = options.get("delimiter", DELIMITERS.get(path.suffix.lower(), ","))
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise error(f"'{path.name}': delimiter {quote(delimiter)} must be one character.")
    if options.get("header", "all_files_same_headers") == "no_header":
        raise error(f"'{path.name}': a table without a header row cannot name its image and label columns.")
    # legacy_format.iter_lines decodes and bounds each line (MAX_LINE_BYTES), so a bad byte or an endless line
    # is named on its own line; csv joins the lines of a quoted field that spans several.
    lines = (line for _, line in iter_lines(path, InvalidDatasetError, inside=root))
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise error(f"'{path.name}' is empty; it needs a header row naming the image and label columns.")
        image = _pick(header, columns.image, IMAGE_COLUMNS, "image", f"'{path.name}'", error, True)
        label = _pick(header, columns.label, LABEL_COLUMNS, "label", f"'{path.name}'", error, False)
        image_at, label_at = header.index(image), header.index(label) if label else None
        for row in reader:
            if not row or row == [""]:
                continue
            where = f"'{path.name}' line {reader.line_num}"
            if len(row) != len(header):
                raise error(f"{where} has {len(row)} fields; the header has {len(header)}.")
            yield where, row[image_at], row[label_at] if label else None, label is not None
    except csv.Error as exc:
        raise error(f"'{path.name}' line {reader.line_num} cannot be read as a table: {exc}.") from None


def _iter_parquet(path: Path, root: Path, columns: Columns, error: Error) -> Iterator[tuple]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular(path, InvalidDatasetError, max_bytes=None, inside=root) as raw:
        try:
            table = pq.ParquetFile(raw)
            header = table.schema_arrow.names
            image = _pick(header, columns.image, IMAGE_COLUMNS, "image", f"'{path.name}'", error, True)
            label = _pick(header, columns.label, LABEL_COLUMNS, "label", f"'{path.name}'", error, False)
            number = 0
            for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[c for c in (image, label) if c]):
                images = batch.column(image).to_pylist()
                labels = batch.column(label).to_pylist() if label else [None] * len(images)
                for value, category in zip(images, labels):
                    number += 1
                    yield f"'{path.name}' row {number}", value, category, label is not None
        except (pa.ArrowException, OSError) as exc:
            raise error(f"'{path.name}' cannot be read as Parquet: {str(exc)[:200]}.") from None


class _RowCollector:
    """Turns (where, image value, label value) rows into the index, checking each row as it comes."""

    def __init__(self, root: Path, keep_unlabeled: bool, error: Error):
        self.root, self.keep_unlabeled, self.error = root, keep_unlabeled, error
        self.files: list[str] = []
        self.ids, self.labels = array("q"), array("l")
        self.names: dict[str, int] = {}  # category -> id in order of first appearance
        self.labeled = False
        self.unlabeled = 0
        self.sets: LabelSets | None = None  # set by the first list label
        self.mount_skip: int | None = None  # leading datastore folders the input mount takes off

    def add_all(self, rows: Iterator[tuple]) -> None:
        for where, image, label, has_label in rows:
            self.labeled |= has_label
            names = as_label_list(label)
            if names is not None:
                self._start_label_sets()
                self.labels.append(0)
                self.sets.append(self.names.setdefault(self._category(name, where), len(self.names))
                                 for name in names)
            elif label is None or label == "":
                self.unlabeled += 1
                if has_label and not self.keep_unlabeled:
                    continue
                self.labels.append(-1)
                if self.sets is not None:
                    self.sets.append(())
            else:
                category = self.names.setdefault(self._category(label, where), len(self.names))
                if self.sets is None:
                    self.labels.append(category)
                else:
                    self.labels.append(0)
                    self.sets.append((category,))
            self.files.append(self._relative(image, where))
            self.ids.append(len(self.files) - 1)

    def _start_label_sets(self) -> None:
        """The first list label: the table is multi-label; the rows so far become one-element sets."""
        if self.sets is None:
            self.sets = LabelSets.of_single_labels(self.labels)
            self.labels = array("l", (0 if label >= 0 else -1 for label in self.labels))

    def _category(self, value, where: str) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # integer class ids, as Parquet tables often have
        if not isinstance(value, str):
            raise self.error(f"{where}: label {quote(value)} is not a category name (a string).")
        if value not in self.names:
            problem = category_name_problem(value)
            if problem:
                raise self.error(f"{where}: {problem}.")
            if len(self.names) >= MAX_CLASSES:  # before the index of a million labels is built
                raise self.error(f"{where}: label {quote(value)} is class number {MAX_CLASSES + 1}; "
                                 f"at most {MAX_CLASSES} classes are allowed.")
        return value

    def _relative(self, value, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"{where}: image {quote(value)} is not a file path or URI.")
        datastore = _datastore_path(value)
        if datastore is None:
            if "://" in value:
                raise self.error(f"{where}: image {quote(value)} has a scheme that is not read "
                                 f"({', '.join(URI_SCHEMES)}, or a path relative to the table).")
            relative = value.removeprefix("./")
        else:
            relative = self._inside_mount(datastore, value, where)
        if not is_safe_relative(relative):
            raise self.error(f"{where}: image {quote(value)} points outside the folder; image paths must be relative "
                             "and stay inside it.")
        return relative

    def _inside_mount(self, datastore: str, value: str, where: str) -> str:
        parts = [p for p in datastore.split("/") if p not in ("", ".")]
        if ".." in parts or not parts:
            raise self.error(f"{where}: image {quote(value)} points outside the folder.")
        if self.mount_skip is None:
            found = [k for k in range(len(parts)) if os.path.lexists(Path(self.root, *parts[k:]))]
            if not found:
                raise self.error(
                    f"{where}: image {quote(value)} is not found inside the input folder '{self.root}' (looked for "
                    f"{quote('/'.join(parts))} and its trailing parts). Mount the datastore folder that holds the "
                    "images as this input."
                )
            self.mount_skip = found[0]
        return "/".join(parts[self.mount_skip:])

    def finish(self, layout: str, source: Path) -> TableIndex:
        if not self.labeled:
            return TableIndex(layout, self.files, self.ids, self.labels, None, source)
        # Categories sorted by name, like ImageFolder's classes: the same table in any row order gives the same ids.
        categories = sorted(self.names)
        new_id = array("l", [0] * len(self.names))
        for i, name in enumerate(categories):
            new_id[self.names[name]] = i
        sets = self.sets.renumbered(new_id) if self.sets is not None else None
        labels = self.labels if sets is not None else \
            array("l", (new_id[label] if label >= 0 else -1 for label in self.labels))
        files, ids = self.files, self.ids
        if not self.keep_unlabeled and -1 in labels:  # a data file of the MLTable without the label column
            keep = [i for i, label in enumerate(labels) if label >= 0]
            files, ids = [files[i] for i in keep], array("q", (ids[i] for i in keep))
            labels = array("l", (labels[i] for i in keep))
            sets = sets.subset(keep) if sets is not None else None
        if self.unlabeled and not self.keep_unlabeled:
            log.warning("%s: %d rows without a label were left out.", source, self.unlabeled)
        return TableIndex(layout, files, ids, labels, categories, source, sets)


def _datastore_path(value: str) -> str | None:
    """The datastore path a URI names (percent-decoded), or None when `value` is not a URI we read.
    Plain string splitting: this runs once per row, and urlsplit would be most of a big table's load time."""
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in URI_SCHEMES:
        return None
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    path = unquote(rest) if "%" in rest else rest
    if scheme == "amldatastore":
        return path
    path = path.partition("/")[2]  # after the host (wasbs/abfss: container@account)
    if scheme == "azureml":
        _, found, after = ("/" + path).partition("/paths/")
        return after if found else None
    if scheme in ("https", "http"):
        return path.partition("/")[2] or None  # blob URLs: /<container>/<path>
    return path or None


# --- writing an MLTable --------------------------------------------------------------------------------


def write_mltable(folder: Path, rows: Iterator[tuple[str, str | list[str] | None]],
                  data_file: str = "images.jsonl") -> None:
    """`MLTable` + JSON Lines in `folder`, the way AutoML for images reads them; `rows` are (relative image
    path, label, a multi-label row's list of labels, or None). Relative `image_url`s resolve against the
    MLTable's own folder."""
    with open(folder / data_file, "w", encoding="utf-8", newline="\n") as handle:
        for image, label in rows:
            row = {"image_url": str(PurePosixPath(image))}
            if label is not None:
                row["label"] = label
            handle.write(dump_json_line(row))
    write_text(folder / MLTABLE_FILE, dump_yaml({
        "paths": [{"file": f"./{data_file}"}],
        "transformations": [
            {"read_json_lines": {"encoding": "utf8", "invalid_lines": "error", "include_path_column": False}},
            {"convert_column_types": [{"columns": "image_url", "column_type": "stream_info"}]},
        ],
    }))
