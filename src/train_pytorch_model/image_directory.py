"""Reading ImageDirectory folders in every layout designer accepts (spec section 2).

Layouts, tried in this order:
1. meta route: `_meta.yaml` (or, without it, `images.lst` + `_schema.json`) → rows from
   `images.lst`, categories from the schema's annotation column. Errors are reported, never
   swallowed into a fallback as the original did.
2. an image table (tables.py): an `MLTable` folder (Azure ML data labeling, AutoML for images),
   or a CSV/TSV/Parquet/JSONL file of image paths and labels (the file itself, or the only one in
   the folder); categories sorted by name.
3. a COCO folder (a top-level `*.json` with `images` and `annotations`): never classification,
   so it is refused up front with a clear error instead of failing later.
4. a torchvision ImageFolder tree: `<class>/<image>`, classes sorted by name.
5. a flat folder of images: readable, but not labeled.

The result is an index (relative paths + label ids), built by streaming `images.lst`: memory
is the index itself. Images are opened later, by `data.py`.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .categories import MAX_CLASSES, category_list_problem
from .errors import DirectoryEmptyError, DirectoryNotFoundError, InvalidDatasetError, NotLabeledDatasetError, quote
from .label_sets import LabelSets
from .legacy_format import (
    is_hidden,
    is_safe_relative,
    iter_json_lines,
    read_json,
    read_meta,
    resolves_inside,
    safe_join,
)
from .output_folder import unfinished_publication
from .preprocessing import ImageDecodeError
from .shards import ShardIndex, ShardReader, read_shard_index, shard_files
from .tables import MLTABLE_FILE, TABLE_SUFFIXES, Columns, find_table, read_table

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"})
CLASSIFICATION = "COCO_classification"
DEFAULT_IMAGE_REF = "image_info"
CONVERT_HELP = "docs/data-formats.md lists what is read; `python -m train_pytorch_model convert` writes an " \
    "ImageDirectory"


@dataclass
class ImageDirectory:
    """An indexed ImageDirectory: row i is image `files[i]` with label `categories[labels[i]]`.

    Multi-label (`label_sets` set; only tables and MLTables are): row i's categories are
    `label_sets[i]`, and `labels[i]` only says whether the row is labeled (0) or not (-1)."""

    root: Path
    layout: str  # "meta", "mltable", "table", "image_folder" or "flat"
    files: list[str]  # relative POSIX paths, each checked to stay inside root
    ids: array  # the rows' integer ids (images.lst `id`, else the row number)
    labels: array  # index into `categories`, -1 for an unlabeled row
    categories: list[str] | None  # class names in category-id order; None when not labeled
    schema: dict = field(default_factory=dict)  # the `_schema.json` (generated for fallbacks)
    annotation_column: str | None = "category"
    label_sets: LabelSets | None = None
    shards: ShardIndex | None = None  # Parquet shards: `files` then name rows ("<shard> row <n>"), not files
    _reader: ShardReader | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def is_labeled(self) -> bool:
        return self.categories is not None

    @property
    def is_multilabel(self) -> bool:
        return self.label_sets is not None

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def subset(self, rows: list[int]) -> ImageDirectory:
        """These rows only (same root, categories and schema). Not for Parquet shards: their rows are read by
        position in the shard set (`shards`, data.py's streams), so a subset's row i would be the set's row i."""
        if self.shards is not None:
            raise InvalidDatasetError(f"Data '{self.root}' is a set of Parquet shards, whose rows are "
                                      "read by their position in the shards; a subset of its rows cannot be taken.")
        return replace(self, files=[self.files[i] for i in rows], ids=array("q", (self.ids[i] for i in rows)),
                       labels=array("l", (self.labels[i] for i in rows)),
                       label_sets=self.label_sets.subset(rows) if self.label_sets is not None else None)

    def label_names(self, i: int) -> list[str]:
        """Row i's category names: one, or a multi-label row's set (none for an unlabeled row)."""
        if self.label_sets is not None:
            return self.label_sets.names(i, self.categories) if self.labels[i] >= 0 else []
        return [self.categories[self.labels[i]]] if self.categories is not None and self.labels[i] >= 0 else []
    def image_source(self, i: int) -> Path | bytes:
        """What decode_image reads for row i: its file (to open inside `root`), or a shard row's bytes
        (ImageDecodeError, with the reason, for a row without an image)."""
        if self.shards is None:
            return self.path(i)
        if self._reader is None:  # kept: samples and examples read a few rows, each file opened once
            self._reader = ShardReader(self.shards)
        data = self._reader.row_bytes(i)
        if not isinstance(data, bytes):
            raise ImageDecodeError(data)
        return data


def load_image_directory(path: str | os.PathLike, role: str = "Image", keep_unlabeled: bool = False, *,
                         image_column: str | None = None, label_column: str | None = None) -> ImageDirectory:
    """Index the ImageDirectory at `path`. `role` ("Training", "Validation", ...) prefixes errors.

    `path` is a folder, or a table file (CSV/TSV/Parquet/JSONL, or an `MLTable` file) whose image paths are
    relative to its folder; `image_column` / `label_column` name a table's columns (defaults: tables.py).
    Rows without a label are left out (training cannot use them) unless `keep_unlabeled`
    (scoring, which like designer scores every row), where their label is -1."""
    given = Path(path)
    if not given.exists():
        raise DirectoryNotFoundError(f"{role} data folder '{given}' does not exist.")
    table = None
    if given.is_dir():
        root = given
    elif given.name == MLTABLE_FILE or given.name.lower().endswith(TABLE_SUFFIXES):
        root, table = given.parent, given
    else:
        raise DirectoryNotFoundError(
            f"{role} data path '{given}' is a file but not a table ({', '.join(TABLE_SUFFIXES)}, {MLTABLE_FILE}); "
            "give the folder that holds the images."
        )
    try:
        entries = [e for e in os.listdir(root) if not is_hidden(e)]
    except PermissionError:
        raise DirectoryNotFoundError(f"{role} data folder '{root}' is not readable (permission denied).") from None
    if not entries:
        raise DirectoryEmptyError(f"{role} data folder '{root}' is empty.")
    if unfinished_publication(root):
        raise InvalidDatasetError(
            f"{role} data folder '{root}' is incomplete: the run writing it was stopped while moving its files in. "
            "Run the command that writes it again (it replaces the incomplete files).")

    def error(message: str) -> InvalidDatasetError:
        return InvalidDatasetError(f"{role} data '{given}' is not valid: {message}")

    meta = read_meta(root, InvalidDatasetError) if table is None else None
    shards = shard_files(given, role, image_column) if meta is None else None
    if shards is not None:
        directory = _read_shards(given, shards, role, image_column, label_column, keep_unlabeled, error)
    elif table is None and (meta is not None or (os.path.lexists(root / "images.lst")
                                               and os.path.lexists(root / "_schema.json"))):
        directory = _read_meta_layout(root, meta or {}, error, keep_unlabeled)
    elif (table := table or find_table(root, error)) is not None:
        index = read_table(table, Columns(image_column, label_column), keep_unlabeled, error)
        labeled = index.categories is not None
        directory = ImageDirectory(root, index.layout, index.files, index.ids, index.labels, index.categories,
                                   default_schema(index.categories), "category" if labeled else None,
                                   index.label_sets)
    elif (coco := find_coco_file(root)) is not None:
        raise error(
            f"'{coco.name}' makes this a COCO folder, which never holds classification labels. "
            f"Training needs one category per image: arrange images as <class>/<image> folders ({CONVERT_HELP})."
        )
    else:
        directory = _read_image_folder(root) or _read_flat_folder(root)

    if len(directory) == 0:
        raise error(
            f"no image rows found. Images must have one of the extensions {sorted(IMAGE_SUFFIXES)} ({CONVERT_HELP})."
        )
    check_categories(directory.categories, directory.layout, error)
    return directory


def check_categories(categories: list[str] | None, layout: str, error) -> None:
    """The class list obeys categories.py's rules (count, names, no duplicates or look-alikes), whatever layout
    it came from; caught here rather than after training. A folder name with undecodable bytes (it arrives as
    surrogate escapes) is named by its bytes."""
    for name in categories or ():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            what = "class folder" if layout == "image_folder" else "category"
            raw = os.fsencode(name) if layout == "image_folder" else name
            raise error(f"{what} name {quote(raw)} is not valid UTF-8 text; rename it.") from None
    problem = category_list_problem(categories) if categories is not None else None
    if problem:
        raise error(f"{problem}.")


def _read_shards(given: Path, files: list[Path], role: str, image_column: str | None, label_column: str | None,
                 keep_unlabeled: bool, error) -> ImageDirectory:
    index, labels, categories, label_sets = read_shard_index(given, files, role, image_column, label_column)
    if categories is not None and not keep_unlabeled and -1 in labels:
        names = index.row_names()
        raise error(f"{labels.count(-1)} rows have no label (-1 or empty), first {names[labels.index(-1)]}; "
                    "training needs a label on every row (score reads unlabeled shards).")
    if categories is None:
        labels = array("q", [-1]) * index.rows
    return ImageDirectory(index.root, "parquet", index.row_names(), range(index.rows), labels, categories,
                          default_schema(categories), "category" if categories is not None else None,
                          label_sets=label_sets, shards=index)


# --- meta route -------------------------------------------------------------------------------------------


def _read_meta_layout(root: Path, meta: dict, error, keep_unlabeled: bool = False) -> ImageDirectory:
    kind = meta.get("type", "ImageDirectory")
    if kind != "ImageDirectory":
        raise error(f"_meta.yaml says type {quote(kind)}, but an ImageDirectory is needed here. "
                    "Connect an image dataset.")
    list_name = meta.get("image_list", "images.lst")
    schema_name = meta.get("schema", "_schema.json")
    for key, name in (("image_list", list_name), ("schema", schema_name)):
        if not isinstance(name, str) or safe_join(root, name) is None:
            raise error(f"_meta.yaml key '{key}' must be a relative file name inside the folder, got {quote(name)}.")
        if not resolves_inside(root, safe_join(root, name)):
            raise error(f"{quote(name)} (_meta.yaml key '{key}') is a symlink leading outside the folder; "
                        "copy the file in.")

    schema = read_json(safe_join(root, schema_name), InvalidDatasetError, inside=root)
    image_ref, annotation_column, categories = _parse_schema(schema, error)

    name_to_id = {name: i for i, name in enumerate(categories)} if categories is not None else {}
    files: list[str] = []
    ids, labels = array("q"), array("l")
    unlabeled = 0
    list_path = safe_join(root, list_name)
    for number, row in iter_json_lines(list_path, InvalidDatasetError, inside=root):
        where = f"{list_name} line {number}"
        info = row.get(image_ref)
        if not isinstance(info, dict):
            raise error(f"{where} has no {quote(image_ref)} object naming its image file.")
        relative = info.get("base_file_name") or info.get("file_name")
        if not isinstance(relative, str) or not relative:
            if info.get("coco_url"):
                raise error(f"{where} has only a coco_url; images must be files inside the folder "
                            "(downloads are not supported).")
            raise error(f"{where} names no image file ('file_name').")
        if not is_safe_relative(relative):
            raise error(f"{where} points outside the folder ({quote(relative)}); image paths must be relative "
                        "and stay inside it.")
        if categories is not None:
            value = row.get(annotation_column)
            if value is None or value == "" or value == []:
                unlabeled += 1
                if not keep_unlabeled:
                    continue
                value = None
            if value is None:
                labels.append(-1)
            elif isinstance(value, bool) or not isinstance(value, str):
                raise error(
                    f"{where}: label {quote(value)} in column {quote(annotation_column)} is not a category name; "
                    f"labels must be one of {_preview(categories)}."
                )
            elif value not in name_to_id:
                raise error(f"{where}: label {quote(value)} is not among the schema's categories "
                            f"{_preview(categories)}.")
            else:
                labels.append(name_to_id[value])
        else:
            labels.append(-1)
        files.append(relative)
        row_id = row.get("id")
        valid_id = isinstance(row_id, int) and not isinstance(row_id, bool) and -2**63 <= row_id < 2**63
        ids.append(row_id if valid_id else len(files) - 1)

    if unlabeled and not keep_unlabeled:
        log.warning("%s: %d rows without a label were left out.", list_path, unlabeled)
    return ImageDirectory(root, "meta", files, ids, labels, categories, schema, annotation_column)


def _parse_schema(schema, error) -> tuple[str, str | None, list[str] | None]:
    """(image reference column, annotation column, category names by id) from `_schema.json`."""
    columns = schema.get("columnAttributes") if isinstance(schema, dict) else None
    if not isinstance(columns, list) or not all(isinstance(c, dict) for c in columns):
        raise error("_schema.json needs a 'columnAttributes' list of column objects.")

    def props(column):
        value = column.get("properties") or {}
        return value if isinstance(value, dict) else {}

    def type_name(column):
        value = column.get("elementType") or {}
        return value.get("typeName") if isinstance(value, dict) else None

    image_columns = [c for c in columns if type_name(c) == "bytes" and props(c).get("mime_type") == "image/png"]
    if not image_columns:
        raise error("_schema.json has no image column (typeName 'bytes' with mime_type 'image/png').")
    image_ref = props(image_columns[0]).get("image_ref", DEFAULT_IMAGE_REF)
    if not isinstance(image_ref, str) or not image_ref:
        raise error(f"_schema.json: the image column's 'image_ref' must be a column name, got {quote(image_ref)}.")

    annotated = [c for c in columns if "annotation_type" in props(c)]
    if not annotated:
        return image_ref, None, None
    column = annotated[0]
    annotation_type = props(column)["annotation_type"]
    if annotation_type != CLASSIFICATION:
        raise error(f"annotation type is {quote(annotation_type)}; only {CLASSIFICATION} can train a classifier.")
    name = column.get("name")
    if not isinstance(name, str) or not name:
        raise error(f"_schema.json: the annotation column needs a string 'name' (the images.lst key), "
                    f"got {quote(name)}.")
    return image_ref, name, _parse_categories(props(column).get("categories"), error)


def _parse_categories(raw, error) -> list[str]:
    """Category names in id order. Gaps in ids are closed up (the original padded them with 'Others')."""
    if not isinstance(raw, list) or not raw:
        raise error("the annotation column has no 'categories' list; add [{\"id\": 0, \"name\": ...}, ...].")
    if len(raw) > MAX_CLASSES:  # before building anything from a million entries
        raise error(f"_schema.json lists {len(raw)} categories, more than the {MAX_CLASSES} allowed.")
    by_id: dict[int, str] = {}
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise error(f"category {quote(item)} needs a non-empty string 'name'.")
        cid = item.get("id")
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
            raise error(f"category {quote(item['name'])} needs a non-negative integer 'id', got {quote(cid)}.")
        if cid in by_id:
            raise error(f"category id {quote(cid)} is used twice ({quote(by_id[cid])} and {quote(item['name'])}).")
        by_id[cid] = item["name"]
    names = [by_id[i] for i in sorted(by_id)]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)  # linear: 100k names are fine
    if duplicates:
        raise error(f"category names must be unique; {quote(duplicates)} appear more than once.")
    return names


def _preview(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(quote(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


# --- fallbacks ---------------------------------------------------------------------------------------------


def find_coco_file(root: Path) -> Path | None:
    """The top-level `*.json` that makes `root` a COCO dataset (`images` + `annotations`), if any."""
    for entry in sorted(root.iterdir()):
        if entry.suffix.lower() == ".json" and not is_hidden(entry.name):
            try:
                data = read_json(entry, InvalidDatasetError)
            except InvalidDatasetError:
                continue  # not JSON, not a regular file, too big: not an annotation file
            if isinstance(data, dict) and "images" in data and "annotations" in data:
                return entry
    return None


def walk_files(root: Path):
    """(relative POSIX path, path) of every non-hidden file below root, in sorted order. Links to folders are
    not entered."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            if not is_hidden(name):
                path = Path(dirpath, name)
                yield path.relative_to(root).as_posix(), path


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk_images(root: Path) -> list[str]:
    return sorted(relative for relative, _ in walk_files(root) if is_image_name(relative))


def label_image_folder(images: list[str]) -> tuple[list[str], list[str], array]:
    """ImageFolder labelling of sorted relative paths: (the `<class>/<image>` ones, classes sorted by name,
    each one's class id). Paths at the top level or nested deeper are not part of the layout."""
    one_deep = [f for f in images if f.count("/") == 1]
    categories = sorted({f.split("/", 1)[0] for f in one_deep})
    index = {name: i for i, name in enumerate(categories)}
    return one_deep, categories, array("l", (index[f.split("/", 1)[0]] for f in one_deep))


def _read_image_folder(root: Path) -> ImageDirectory | None:
    files = _walk_images(root)
    one_deep, categories, labels = label_image_folder(files)
    if not one_deep:
        return None
    ignored = len(files) - len(one_deep)
    if ignored:
        log.warning("%s: %d images not exactly one folder deep (<class>/<image>) were ignored.", root, ignored)
    schema = default_schema(categories)
    return ImageDirectory(root, "image_folder", one_deep, array("q", range(len(one_deep))), labels, categories, schema)


def _read_flat_folder(root: Path) -> ImageDirectory:
    files = _walk_images(root)
    schema = default_schema(None)
    return ImageDirectory(root, "flat", files, array("q", range(len(files))), array("l", [-1] * len(files)),
                          None, schema, None)


def default_schema(categories: list[str] | None) -> dict:
    """The schema designer writes for a classification ImageDirectory (spec 2.3); unlabeled: image + id."""
    columns = [
        {
            "name": "image", "type": "Bytes", "isFeature": True,
            "elementType": {"typeName": "bytes", "isNullable": False},
            "properties": {"mime_type": "image/png", "image_ref": DEFAULT_IMAGE_REF},
        },
        {"name": "id", "type": "Numeric", "isFeature": False,
         "elementType": {"typeName": "int64", "isNullable": False}},
    ]
    if categories is not None:
        columns.append({
            "name": "category", "type": "String", "isFeature": False,
            "elementType": {"typeName": "str", "isNullable": False},
            "properties": {
                "annotation_type": CLASSIFICATION,
                "categories": [{"id": i, "name": name} for i, name in enumerate(categories)],
            },
        })
    return {"columnAttributes": columns}


def require_labeled(directory: ImageDirectory, role: str) -> None:
    if not directory.is_labeled:
        raise NotLabeledDatasetError(
            f'There is no label column in {role.lower()} data "{directory.root}" (layout: {directory.layout}). '
            "Prepare a labeled image dataset: <class>/<image> folders, a table or MLTable with a label column, "
            f"or an ImageDirectory with categories ({CONVERT_HELP})."
        )
