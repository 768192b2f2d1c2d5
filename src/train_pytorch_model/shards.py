"""Parquet image shards: images stored as bytes in a few large files, the layout Hugging Face `datasets` writes.

A shard set is a folder of Parquet files (any depth, e.g. the Hub's `data/train-00000-of-00003.parquet`) or
one such file, whose image column holds the encoded image: `struct<bytes: binary, path: string>` (datasets'
`Image` feature) or plain `binary`. That column type is what tells a shard set from a Parquet *table of image
paths* (tables.py), whose image column is text. Class names come from the `ClassLabel` feature in the
`huggingface` key of the schema metadata, which `datasets` writes and reads; an integer or text label column
without it works too (names sorted).

Why: on a blob-storage mount every file open costs milliseconds, so one file per image starves a GPU. Shards
are read a row group at a time, sequentially, with each file opened once per process (`ShardReader`).

- `read_shard_index` reads the footers and the label column only: memory is one label per row plus one entry
  per row group. Everything that can be checked without the image bytes is checked here, with named errors:
  a truncated or non-Parquet file, a missing or wrong-typed column, a label outside the class names, a row
  group larger than a reader may hold (MAX_ROW_GROUP_BYTES).
- `ShardReader` reads a row group's image bytes; a null image or a row group that cannot be read comes back
  as a per-row reason, and data.py skips those rows by name (`<file> row <n>`) like unreadable image files.
- `ShardWriter` writes shards `datasets` loads as they are (convert --to parquet): bounded row groups and
  shards, one row group in memory; multi-label rows as `Sequence(ClassLabel)` id lists.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .categories import MAX_CLASSES
from .errors import InvalidDatasetError, quote
from .input_files import UnreadableInputError, open_input
from .label_sets import LabelSets

HF_METADATA_KEY = b"huggingface"
IMAGE_FEATURE = "Image"
CLASS_LABEL_FEATURE = "ClassLabel"
LABEL_COLUMNS = ("label", "labels", "category", "class", "fine_label")
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}\.parquet$")
SPLIT_FOR_ROLE = {"Training": ("train",), "Validation": ("validation", "valid", "val", "dev")}
# A row group is read whole by one reader: bigger ones would make a worker's memory follow the file's layout.
MAX_ROW_GROUP_BYTES = 1 << 30
MAX_SHARD_FILES = 100_000

# What ShardWriter writes (datasets itself writes 100-row row groups for image data).
ROW_GROUP_ROWS = 100
ROW_GROUP_BYTES = 64 << 20
DEFAULT_SHARD_ROWS = 50_000
DEFAULT_SHARD_MIB = 256
MAX_IMAGE_BYTES = 256 << 20  # one value of a Parquet binary column must stay well under 2 GiB


def is_image_bytes_type(data_type) -> bool:
    """True for a column of encoded images: binary, or a struct with a binary `bytes` field (datasets' Image)."""
    import pyarrow as pa

    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return True
    if pa.types.is_struct(data_type):
        index = data_type.get_field_index("bytes")
        return index >= 0 and is_image_bytes_type(data_type.field(index).type) \
            and not pa.types.is_struct(data_type.field(index).type)
    return False


def hf_features(schema) -> dict:
    """The `features` datasets stored in the schema metadata ({} when absent or unreadable)."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if not raw:
        return {}
    try:
        info = json.loads(raw)
        features = info.get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}


# --- finding a shard set ---------------------------------------------------------------------------------


def shard_files(path: Path, role: str, image_column: str | None) -> list[Path] | None:
    """The Parquet files of the shard set at `path` (a folder or one .parquet file), sorted; None when `path`
    is not a shard set (no Parquet file, or its image column holds paths, not bytes)."""
    from .image_directory import IMAGE_SUFFIXES  # (image_directory imports this module)
    from .legacy_format import is_hidden, resolves_inside

    path = Path(path)
    if path.is_file():
        candidates = [path] if path.name.lower().endswith(".parquet") else []
    else:
        candidates = []
        real_root = os.path.realpath(path)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in filenames):
                return None  # a folder of images (or a table of their paths): not listed further, however large
            for name in sorted(filenames):
                if not is_hidden(name) and name.lower().endswith(".parquet"):
                    file = Path(dirpath, name)
                    if resolves_inside(real_root, file):  # a link out of the input is never read
                        candidates.append(file)
            if len(candidates) > MAX_SHARD_FILES:
                raise InvalidDatasetError(f"'{path}' holds more than {MAX_SHARD_FILES} Parquet files; merge them "
                                          "into fewer, larger shards (convert --to parquet).")
    if not candidates or not _holds_image_bytes(candidates, image_column):
        return None
    return _one_split(path, candidates, role)


def _holds_image_bytes(files: list[Path], image_column: str | None) -> bool:
    """Whether the first readable file's image column holds bytes. When none of the first few can be read, a
    folder of several Parquet files (or one named like a shard) is taken for shards, so that read_shard_index
    names the damaged file; a lone damaged table is tables.py's to report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files[:8]:
        try:
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError):
            continue
        if image_column is not None:
            index = schema.get_field_index(image_column)
            return index >= 0 and is_image_bytes_type(schema.field(index).type)
        return any(is_image_bytes_type(f.type) for f in schema)
    return len(files) > 1 or SHARD_NAME.match(files[0].name) is not None


def _one_split(root: Path, files: list[Path], role: str) -> list[Path]:
    """A Hub download can hold several splits (`train-*`, `validation-*`, `test-*`): training reads `train`,
    validation `validation`; any other role must be given one split's folder or file."""
    splits: dict[str, list[Path]] = {}
    for file in files:
        match = SHARD_NAME.match(file.name)
        splits.setdefault(match["split"] if match else "", []).append(file)
    if len(splits) <= 1:
        return files
    for split in SPLIT_FOR_ROLE.get(role, ()):
        if split in splits:
            return splits[split]
    raise InvalidDatasetError(
        f"{role} data '{root}' holds Parquet shards of several splits {quote(sorted(splits))}; give the folder "
        "or file of the one to use."
    )


# --- the index -------------------------------------------------------------------------------------------


class RowNames(Sequence):
    """`<shard> row <n>` for every row, computed on demand: what error messages and score tables call a row."""

    def __init__(self, files: list[str], starts: list[int], rows: int):
        self.files, self.starts, self.rows = files, starts, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.rows))]
        if i < 0:
            i += self.rows
        if not 0 <= i < self.rows:
            raise IndexError(i)
        f = bisect.bisect_right(self.starts, i) - 1
        return f"{self.files[f]} row {i - self.starts[f]}"


@dataclass
class ShardIndex:
    """Row groups of a shard set in file order: group g is row group `groups[g, 1]` of file `files[groups[g, 0]]`,
    holding rows `groups[g, 2]` to `groups[g + 1, 2]` of the set."""

    root: Path
    files: list[str]  # relative POSIX paths of the Parquet files, sorted
    image_column: str
    groups: np.ndarray  # int64 (row groups, 3): file, row group in the file, first row
    rows: int
    file_starts: list[int] = field(default_factory=list)

    @functools.cached_property  # read once per row group by ShardReader: computed once, not O(groups) each time
    def group_rows(self) -> np.ndarray:
        return np.diff(np.append(self.groups[:, 2], self.rows))

    def row_names(self) -> RowNames:
        return RowNames(self.files, self.file_starts, self.rows)

    def group_of_row(self, row: int) -> int:
        return int(np.searchsorted(self.groups[:, 2], row, side="right")) - 1


def read_shard_index(root: Path, files: list[Path], role: str, image_column: str | None,
                     label_column: str | None):
    """(ShardIndex, labels, categories) of a shard set; labels are ids into categories, -1 for none (rows
    without a label are kept: the shards' row numbers name rows in messages)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .legacy_format import open_regular

    base = root if root.is_dir() else root.parent
    names = [file.relative_to(base).as_posix() for file in files]
    groups, starts = [], []
    labels = LabelColumn(role)
    image = label = None
    first_schema = None
    rows = 0
    for file, name in zip(files, names):
        def error(message: str, name=name) -> InvalidDatasetError:
            return InvalidDatasetError(f"{role} data '{root}': shard '{name}' {message}")

        try:
            with open_regular(file, InvalidDatasetError, max_bytes=None, inside=base) as handle:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
                if first_schema is None:
                    first_schema = schema
                    image = _image_column(schema, image_column, error)
                    label = _label_column(schema, label_column, error)
                    labels.start(label, hf_features(schema).get(label) if label else None)
                _check_columns(schema, image, label, first_schema, error)
                meta = parquet.metadata
                starts.append(rows)
                for g in range(meta.num_row_groups):
                    size = meta.row_group(g).total_byte_size
                    if size > MAX_ROW_GROUP_BYTES:
                        raise error(f"row group {g} holds {size / 2**20:.0f} MiB, more than a reader may hold "
                                    f"({MAX_ROW_GROUP_BYTES >> 20} MiB); rewrite it with smaller row groups "
                                    "(convert --to parquet).")
                    groups.append((len(starts) - 1, g, rows))
                    rows += meta.row_group(g).num_rows
                if label:
                    for batch in parquet.iter_batches(columns=[label], batch_size=65536):
                        labels.add(batch.column(0), name, error)
        except (pa.ArrowException, OSError) as exc:
            raise error(f"cannot be read as Parquet ({type(exc).__name__}: {str(exc)[:200]}); it may be truncated "
                        "or not a Parquet file.") from None
    if rows == 0:
        raise InvalidDatasetError(f"{role} data '{root}' holds Parquet shards without any row.")
    index = ShardIndex(base, names, image, np.array(groups, dtype=np.int64).reshape(-1, 3), rows, starts)
    ids, categories, label_sets = labels.finish()
    return index, ids, categories, label_sets


def _image_column(schema, wanted: str | None, error) -> str:
    if wanted is not None:
        if wanted not in schema.names:
            raise error(f"has no image column {quote(wanted)}; its columns are {quote(schema.names)}.")
        if not is_image_bytes_type(schema.field(wanted).type):
            raise error(f"column {quote(wanted)} is {schema.field(wanted).type}, not image bytes "
                        "(struct<bytes: binary, path: string> or binary).")
        return wanted
    return next(f.name for f in schema if is_image_bytes_type(f.type))


def _label_column(schema, wanted: str | None, error) -> str | None:
    if wanted is not None:
        if wanted not in schema.names:
            raise error(f"has no label column {quote(wanted)}; its columns are {quote(schema.names)}.")
        return wanted
    features = hf_features(schema)
    for name in schema.names:  # the column datasets marks as class labels, else a usual name
        feature = features.get(name)
        if isinstance(feature, dict) and (feature.get("_type") == CLASS_LABEL_FEATURE or isinstance(
                feature.get("feature"), dict) and feature["feature"].get("_type") == CLASS_LABEL_FEATURE):
            return name
    lower = {name.lower(): name for name in reversed(schema.names)}
    return next((lower[name] for name in LABEL_COLUMNS if name in lower), None)


def _check_columns(schema, image: str, label: str | None, first, error) -> None:
    for column in (image, label):
        if column is None:
            continue
        if column not in schema.names:
            raise error(f"has no column {quote(column)} (the first shard has it); its columns are "
                        f"{quote(schema.names)}.")
        if not schema.field(column).type.equals(first.field(column).type):
            raise error(f"column {quote(column)} is {schema.field(column).type}; the first shard's is "
                        f"{first.field(column).type}.")
    if label and hf_features(schema).get(label) != hf_features(first).get(label):
        raise error(f"has other class names for {quote(label)} than the first shard.")


class LabelColumn:
    """Every row's class id, from a label column read in batches: the one place label values are decoded.

    ClassLabel (datasets): integer ids into the feature's `names` (-1 or null: no label). Without it:
    integers or text, named by their values and sorted (numbers numerically). A list per row
    (`Sequence(ClassLabel)`, or a list of names) is multi-label: the rows' sets are kept as label sets
    (label_sets.py), a null list being no label and an empty one an image with none of the classes."""

    def __init__(self, role: str):
        self.role = role
        self.column: str | None = None
        self.names: list[str] | None = None  # from ClassLabel
        self.values: dict = {}  # value -> provisional id, without ClassLabel
        self.ids = array("q")
        self.sets: LabelSets | None = None  # multi-label: each row's ids (then `ids` is 0, or -1 unlabeled)
        self.file, self.file_rows = None, 0  # rows of the current file seen so far, for messages

    def start(self, column: str | None, feature) -> None:
        self.column = column
        if isinstance(feature, dict) and isinstance(feature.get("feature"), dict):
            feature = feature["feature"]  # Sequence(ClassLabel) / List(ClassLabel): multi-label class ids
        if isinstance(feature, dict) and feature.get("_type") == CLASS_LABEL_FEATURE:
            names = feature.get("names")
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
                raise InvalidDatasetError(f"{self.role} data: the ClassLabel of column {quote(column)} has no valid "
                                          "'names' list.")
            self.names = names

    def add(self, values, file: str, error) -> None:
        import pyarrow as pa

        if file != self.file:
            self.file, self.file_rows = file, 0
        kind = values.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            self._add_lists(values, error)
        elif self.sets is not None:  # a file of single labels after lists: one-label sets
            before = len(self.ids)
            self.add_single(values, error)
            for i in range(before, len(self.ids)):
                self.sets.append((self.ids[i],) if self.ids[i] >= 0 else ())
                self.ids[i] = 0 if self.ids[i] >= 0 else -1
        else:
            self.add_single(values, error)
        self.file_rows += len(values)

    def _add_lists(self, values, error) -> None:
        if self.sets is None:  # the first list: the rows so far become one-label sets
            self.sets = LabelSets.of_single_labels(self.ids)
            self.ids = array("q", (0 if i >= 0 else -1 for i in self.ids))
        for offset, row in enumerate(values.to_pylist()):
            if row is None:
                self.ids.append(-1)
                self.sets.append(())
                continue
            ids = []
            for value in row:
                if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
                    raise error(f"row {self.file_rows + offset}: label {quote(value)} in the list is not a class id "
                                "or name.")
                if self.names is not None:
                    if not isinstance(value, int) or not 0 <= value < len(self.names):
                        raise error(f"row {self.file_rows + offset}: label {quote(value)} is not a class id of its "
                                    f"ClassLabel (0 to {len(self.names) - 1}).")
                    ids.append(value)
                else:
                    ids.append(self.values[value] if value in self.values
                               else self._new_value(value, self.file_rows + offset, error))
            self.ids.append(0)
            self.sets.append(ids)

    def add_single(self, values, error) -> None:
        import pyarrow as pa

        kind = values.type
        if pa.types.is_integer(kind):
            data = np.asarray(values.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
            if self.names is not None:
                bad = np.flatnonzero((data < -1) | (data >= len(self.names)))
                if len(bad):
                    raise error(f"row {self.file_rows + int(bad[0])}: label {int(data[bad[0]])} is not a class id of "
                                f"its ClassLabel (0 to {len(self.names) - 1}, or -1 for none).")
                self.ids.extend(data.tolist())
            else:
                self.ids.extend(-1 if v < 0 else self.values[v] if v in self.values
                                else self._new_value(v, self.file_rows + row, error)
                                for row, v in enumerate(data.tolist()))
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if self.names is not None:
                raise error(f"column {quote(self.column)} holds text, but its ClassLabel expects class ids.")
            self.ids.extend(-1 if v is None or v == "" else self.values[v] if v in self.values
                            else self._new_value(v, self.file_rows + row, error)
                            for row, v in enumerate(values.to_pylist()))
        else:
            raise error(f"label column {quote(self.column)} is {kind}; class labels are integers (ClassLabel) "
                        "or text.")

    def _new_value(self, value, row: int, error) -> int:
        """The provisional id of a label value not seen before (without ClassLabel); past MAX_CLASSES it is refused,
        as tables.py does, before the index of a million labels is built."""
        if len(self.values) >= MAX_CLASSES:
            raise error(f"row {row}: label {quote(value)} is class number {MAX_CLASSES + 1}; "
                        f"at most {MAX_CLASSES} classes are allowed.")
        self.values[value] = len(self.values)
        return self.values[value]

    def finish(self) -> tuple[array, list[str] | None, LabelSets | None]:
        """(class id per row, class names, multi-label sets or None); (empty, None, None) without a label
        column. Multi-label: the id is 0 for a labeled row, -1 for none, and the classes are in the sets."""
        if self.column is None:
            return array("q"), None, None
        if self.names is not None:
            return self.ids, list(self.names), self.sets
        ordered = sorted(self.values, key=lambda v: (isinstance(v, str), v))
        new_id = np.full(len(self.values) + 1, -1, dtype=np.int64)  # the last entry maps -1 (no label) to -1
        for position, value in enumerate(ordered):
            new_id[self.values[value]] = position
        names = [str(v) for v in ordered]
        if self.sets is not None:
            return self.ids, names, self.sets.renumbered(new_id[:-1].tolist())
        return array("q", new_id[np.frombuffer(self.ids, dtype=np.int64)].tolist()), names, None


# --- reading rows ----------------------------------------------------------------------------------------


class ShardReader:
    """Reads the image bytes of whole row groups, keeping each file open: a process opens every shard once,
    however many images and epochs it reads. Handles belong to the process that opened them (a forked
    DataLoader worker opens its own: a shared file offset would mix up reads)."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        self._last: tuple[int, list] | None = None  # the row group row_bytes read last

    def __getstate__(self):
        return {"index": self.index}

    def __setstate__(self, state):
        self.__init__(state["index"])

    def _file(self, number: int):
        import pyarrow.parquet as pq

        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if number not in self._files:
            path = self.index.root / self.index.files[number]
            self._files[number] = pq.ParquetFile(open_input(path, inside=self.index.root, max_bytes=None))
        return self._files[number]

    def read_group(self, group: int) -> list[bytes | str]:
        """Row group `group`'s images: encoded bytes, or for a row that has none, why (a string)."""
        import pyarrow as pa

        file, row_group, _ = (int(v) for v in self.index.groups[group])
        count = int(self.index.group_rows[group])
        try:
            column = self._file(file).read_row_group(row_group, columns=[self.index.image_column]).column(0)
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            if pa.types.is_struct(column.type):
                has_path = column.type.get_field_index("path") >= 0
                parts = column.flatten()  # the struct's own nulls carried into its fields
                values = parts[column.type.get_field_index("bytes")].to_pylist()
                paths = parts[column.type.get_field_index("path")].to_pylist() if has_path else [None] * count
            else:
                values, paths = column.to_pylist(), [None] * count
        except (pa.ArrowException, OSError, UnreadableInputError) as exc:
            reason = f"row group {row_group} of the shard cannot be read ({type(exc).__name__}: {str(exc)[:160]})"
            return [reason] * count
        if len(values) != count:
            return [f"row group {row_group} holds {len(values)} rows, its footer says {count}"] * count
        return [value if value else _missing(path) for value, path in zip(values, paths)]

    def row_bytes(self, row: int) -> bytes | str:
        """One row's image (or why it has none); rows of one row group in a row read it once."""
        group = self.index.group_of_row(row)
        if self._last is None or self._last[0] != group:
            self._last = (group, self.read_group(group))
        return self._last[1][row - int(self.index.groups[group, 2])]

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._files.values():
                handle.close()
        self._files = {}


def _missing(path) -> str:
    if path:
        return f"the image has no bytes, only a path ({quote(path)}), which is never followed"
    return "the image is empty (null)"


# --- writing shards --------------------------------------------------------------------------------------


def shard_schema(categories: list[str] | None, multilabel: bool = False):
    """datasets' layout: `image` as its Image feature, `label` as a ClassLabel (absent when unlabeled), or for
    multi-label a `Sequence(ClassLabel)`: a list of class ids per row (null: unlabeled, empty: none of them)."""
    import pyarrow as pa

    fields = [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
    features = {"image": {"_type": IMAGE_FEATURE}}
    if categories is not None:
        class_label = {"names": list(categories), "_type": CLASS_LABEL_FEATURE}
        if multilabel:  # "Sequence", not datasets 4's "List": every datasets version reads it
            fields.append(pa.field("label", pa.list_(pa.int64())))
            features["label"] = {"feature": class_label, "_type": "Sequence"}
        else:
            fields.append(pa.field("label", pa.int64()))
            features["label"] = class_label
    metadata = {HF_METADATA_KEY: json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(fields, metadata=metadata)


class ShardWriter:
    """Writes rows into `data/train-NNNNN-of-MMMMM.parquet` below `folder` (the Hub's layout), starting a new
    shard past `shard_rows` rows or `shard_bytes` bytes; at most one row group is held in memory. A row's label
    is a class id (-1: none), or with `multilabel` a list of class ids (None: unlabeled)."""

    def __init__(self, folder: Path, categories: list[str] | None, *, multilabel: bool = False,
                 shard_rows: int = DEFAULT_SHARD_ROWS, shard_bytes: int = DEFAULT_SHARD_MIB << 20):
        self.folder = Path(folder) / "data"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = shard_schema(categories, multilabel)
        self.labeled = categories is not None
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.written: list[Path] = []
        self._writer = None
        self._in_shard = self._shard_size = 0
        self._rows: list[tuple[bytes, str, int | list[int] | None]] = []
        self._pending = 0

    def add(self, data: bytes, path: str, label: int | list[int] | None = -1) -> None:
        if self._in_shard and (self._in_shard >= self.shard_rows
                               or self._shard_size + self._pending + len(data) > self.shard_bytes):
            self._close_shard()
        self._rows.append((data, path, label))
        self._pending += len(data)
        self._in_shard += 1
        if len(self._rows) >= ROW_GROUP_ROWS or self._pending >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        if self._writer is None:
            path = self.folder / f".shard-{len(self.written):05d}.parquet"
            # Images are compressed already: Parquet compression would only cost time. No statistics on bytes.
            self._writer = pq.ParquetWriter(path, self.schema, compression="none", write_statistics=["label"])
            self.written.append(path)
        columns = {"image": pa.array([{"bytes": d, "path": p} for d, p, _ in self._rows], self.schema.field(0).type)}
        if self.labeled:
            columns["label"] = pa.array([label for _, _, label in self._rows], self.schema.field("label").type)
        self._writer.write_table(pa.table(columns, schema=self.schema), row_group_size=len(self._rows))
        self._shard_size += self._pending
        self._rows, self._pending = [], 0

    def _close_shard(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer, self._in_shard, self._shard_size = None, 0, 0

    def close(self) -> list[Path]:
        """Finish the last shard and give the shards their final names (the count is known only now)."""
        self._close_shard()
        named = []
        for i, path in enumerate(self.written):
            final = self.folder / f"train-{i:05d}-of-{len(self.written):05d}.parquet"
            os.replace(path, final)
            named.append(final)
        self.written = named
        return named


def stored_path(relative: str, reencoded: bool) -> str:
    """The Image feature's `path`: the image's name in the input (its suffix .jpg once re-encoded)."""
    return str(PurePosixPath(relative).with_suffix(".jpg")) if reencoded else relative
