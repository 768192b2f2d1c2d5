"""Reading and writing the small YAML/JSON files of the legacy designer directories.

Written files follow the serialization conventions of the original (spec section 0), so
designer modules and people diffing folders see the same bytes: block-style YAML in key
order, 2-space JSON without a trailing newline, compact JSON lines. Readers are safe
loaders that turn every syntax error into ``error_type`` naming the file and line.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import TrainPyTorchModelError
from .input_files import UnreadableInputError, open_input, parent_of, resolves_inside  # noqa: F401 (re-exported)

META_FILE = "_meta.yaml"
MAX_METADATA_BYTES = 64 * 2**20  # _schema.json with a million categories fits; nothing legitimate is larger
MAX_LINE_BYTES = 1 * 2**20  # one row of images.lst / a JSON-lines table
MAX_YAML_EVENTS = 100_000


class _LegacyDumper(yaml.SafeDumper):
    """SafeDumper that writes None as an empty value, like ruamel's round-trip dump."""


_LegacyDumper.add_representer(
    type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null", "")
)


def dump_yaml(data: dict) -> str:
    return yaml.dump(
        data, Dumper=_LegacyDumper, sort_keys=False, default_flow_style=False,
        allow_unicode=False, indent=2, width=4096,
    )


def dump_json(data: Any) -> str:
    # Strict JSON: NaN/Infinity are not JSON and no other reader takes them.
    return json.dumps(data, indent=2, ensure_ascii=True, allow_nan=False)


def dump_json_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=True, allow_nan=False) + "\n"


def write_text(path: Path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8", newline="\n")


SAME_FOLDER = object()  # `inside` default: a metadata file is read only where it lies, never through a link out


def open_regular(path: Path, error_type: type[TrainPyTorchModelError], max_bytes: int | None = MAX_METADATA_BYTES,
                 *, inside=SAME_FOLDER):
    """Open `path` for binary reading through the one input opener (input_files.open_input): a regular file
    only (a FIFO or a device would block the read forever), inside `inside` (default: its own folder; None: any
    path, for a file the user named), and when `max_bytes` is set, not larger than that. Refusals name the file,
    never its content."""
    try:
        return open_input(path, inside=parent_of(path) if inside is SAME_FOLDER else inside, max_bytes=max_bytes)
    except UnreadableInputError as exc:
        if exc.missing:
            raise error_type(f"'{path}' is missing; restore it, or regenerate the folder it belongs to.") from None
        if exc.strerror is not None:
            raise error_type(f"'{path}' cannot be read: {exc.strerror}. Check the file and its permissions.") from None
        if exc.size is not None:
            raise error_type(f"'{path}' is {exc.size} bytes; files of this kind are at most {max_bytes} bytes. "
                             "Regenerate the file.") from None
        raise error_type(f"'{path}' cannot be used: {exc.reason}. Replace it with a regular file inside the folder.") \
            from None


def read_yaml(path: Path, error_type: type[TrainPyTorchModelError], *, inside=SAME_FOLDER) -> Any:
    """Parse YAML with the safe loader (never constructs Python objects), refusing anchors and aliases:
    metadata never needs them, and a few hundred bytes of nested aliases expand to gigabytes."""
    return parse_yaml(read_text(path, error_type, inside=inside), str(path), error_type)


def parse_yaml(text: str, name: str, error_type: type[TrainPyTorchModelError]) -> Any:
    try:
        for count, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                raise error_type(
                    f"'{name}' uses a YAML anchor or alias (line {mark.line + 1}); these files must spell every "
                    "value out. Remove the '&' / '*' references."
                )
            if count > MAX_YAML_EVENTS:
                raise error_type(f"'{name}' has more than {MAX_YAML_EVENTS} YAML nodes; this is not a metadata file.")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error_type(f"'{name}' is not valid YAML{where}: {str(problem)[:200]}. Fix or regenerate the file.") \
            from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # The safe loader still converts values (dates, numbers) and recurses on nesting.
        raise error_type(
            f"'{name}' is not valid YAML: {type(exc).__name__}: {str(exc)[:200]}. Fix or regenerate the file."
        ) from None


def read_json(path: Path, error_type: type[TrainPyTorchModelError], *, inside=SAME_FOLDER) -> Any:
    text = read_text(path, error_type, inside=inside)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error_type(
            f"'{path}' is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. "
            "Fix or regenerate the file."
        ) from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, nesting deeper than Python's stack
        raise error_type(f"'{path}' cannot be read as JSON: {str(exc)[:200]}. Fix or regenerate the file.") from None


def read_text(path: Path, error_type: type[TrainPyTorchModelError], max_bytes: int = MAX_METADATA_BYTES, *,
              inside=SAME_FOLDER) -> str:
    """A small text file (metadata): regular files only, inside `inside`, at most `max_bytes`, UTF-8 (a BOM is
    dropped)."""
    with open_regular(path, error_type, max_bytes, inside=inside) as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise error_type(f"'{path}' cannot be read: {exc.strerror or exc}. Check the file.") from None
    if len(data) > max_bytes:  # grew while we read it
        raise error_type(f"'{path}' is larger than {max_bytes} bytes; regenerate the file.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error_type(f"'{path}' is not UTF-8 text (line {line}, byte {exc.start}); save it as UTF-8.") from None


def iter_lines(path: Path, error_type: type[TrainPyTorchModelError], *,
               inside=SAME_FOLDER) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) of a UTF-8 text file of any length, streaming; every line at most
    MAX_LINE_BYTES. Decoding is per line, so an undecodable byte is reported on its own line."""
    with open_regular(path, error_type, max_bytes=None, inside=inside) as handle:
        number = 0
        while True:
            try:
                raw = handle.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise error_type(f"'{path}' cannot be read: {exc.strerror or exc}. Check the file.") from None
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise error_type(f"'{path}' line {number} is longer than {MAX_LINE_BYTES} bytes; one row per line.")
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error_type(
                    f"'{path}' line {number} is not UTF-8 text (byte {exc.start + 1} of the line); save it as UTF-8."
                ) from None


def iter_json_lines(path: Path, error_type: type[TrainPyTorchModelError], *,
                    inside=SAME_FOLDER) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row) from a JSON-lines file, streaming: memory stays flat."""
    for number, line in iter_lines(path, error_type, inside=inside):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error_type(
                f"'{path}' line {number} is not valid JSON (column {exc.colno}: {exc.msg}). "
                "Each line must be one JSON object."
            ) from None
        except (ValueError, RecursionError) as exc:  # huge numbers, absurd nesting
            raise error_type(
                f"'{path}' line {number} cannot be read as JSON ({str(exc)[:200]}). "
                "Each line must be one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise error_type(f"'{path}' line {number} is not a JSON object. Each line must be one JSON object.")
        yield number, row


def read_meta(directory: Path, error_type: type[TrainPyTorchModelError]) -> dict | None:
    """The directory's `_meta.yaml` as a mapping, or None when the folder has none."""
    path = Path(directory) / META_FILE
    if not os.path.lexists(path):
        return None
    meta = read_yaml(path, error_type)
    if not isinstance(meta, dict):
        raise error_type(
            f"'{path}' must be a YAML mapping with a 'type' key, got {type(meta).__name__}. "
            "Fix or regenerate the file."
        )
    if not meta.get("type"):
        raise error_type(
            f"Required field 'type' is not found in meta file '{path}'. Add the line `type: ImageDirectory` "
            "(or `type: ModelDirectory`), or regenerate the folder."
        )
    return meta


def is_hidden(name: str) -> bool:
    """Hidden files and tool folders (.DS_Store, .ipynb_checkpoints, __MACOSX) are never data."""
    return name.startswith(".") or name == "__MACOSX"


def safe_join(root: Path, relative: str) -> Path | None:
    """`root/relative` when `relative` stays lexically inside `root` (`is_safe_relative`), else None."""
    if not is_safe_relative(relative):
        return None
    return Path(root, *[p for p in relative.split("/") if p not in ("", ".")])


def is_safe_relative(relative: str) -> bool:
    """True when `relative` is a relative POSIX path that stays lexically inside its folder.

    Rejects absolute paths, drive letters, URLs and `..` components. Symlinks are checked
    later, when the file is opened (`input_files.open_input`), to keep indexing cheap:
    this runs once per row of a table of millions, so it builds no Path.
    """
    if not relative or "://" in relative or "\\" in relative or "\x00" in relative:
        return False
    if relative.startswith("/") or (len(relative) > 1 and relative[1] == ":"):
        return False
    return ".." not in relative.split("/")
