"""Reading and writing the small YAML/JSON files of the legacy designer directories.

Written files follow the serialization conventions of the original (spec section 0), so
designer modules and people diffing folders see the same bytes: block-style YAML in key
order, 2-space JSON without a trailing newline, compact JSON lines. Readers are safe
loaders that turn every syntax error into ``error_type`` naming the file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import TrainPyTorchModelError

META_FILE = "_meta.yaml"


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
    return json.dumps(data, indent=2, ensure_ascii=True)


def dump_json_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=True) + "\n"


def write_text(path: Path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8", newline="\n")


def read_yaml(path: Path, error_type: type[TrainPyTorchModelError]) -> Any:
    """Parse YAML with the safe loader (never constructs Python objects)."""
    text = read_text(path, error_type)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error_type(f"'{path}' is not valid YAML{where}: {problem}. Fix or regenerate the file.") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # The safe loader still converts values (dates, numbers) and recurses on nesting.
        raise error_type(
            f"'{path}' is not valid YAML: {type(exc).__name__}: {str(exc)[:200]}. Fix or regenerate the file."
        ) from None


def read_json(path: Path, error_type: type[TrainPyTorchModelError]) -> Any:
    text = read_text(path, error_type)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error_type(
            f"'{path}' is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. "
            "Fix or regenerate the file."
        ) from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, nesting deeper than Python's stack
        raise error_type(f"'{path}' cannot be read as JSON: {str(exc)[:200]}. Fix or regenerate the file.") from None


def read_text(path: Path, error_type: type[TrainPyTorchModelError]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error_type(f"'{path}' is missing; restore it, or regenerate the folder it belongs to.") from None
    except UnicodeDecodeError as exc:
        raise error_type(f"'{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise error_type(f"'{path}' cannot be read: {exc.strerror or exc}. Check the file and its permissions.") from None


def iter_json_lines(path: Path, error_type: type[TrainPyTorchModelError]) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row) from a JSON-lines file, streaming: memory stays flat."""
    try:
        handle = open(path, encoding="utf-8-sig")
    except FileNotFoundError:
        raise error_type(f"'{path}' is missing; restore it, or regenerate the folder it belongs to.") from None
    except OSError as exc:
        raise error_type(f"'{path}' cannot be read: {exc.strerror or exc}. Check the file and its permissions.") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
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
        except UnicodeDecodeError as exc:
            raise error_type(f"'{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None


def read_meta(directory: Path, error_type: type[TrainPyTorchModelError]) -> dict | None:
    """The directory's `_meta.yaml` as a mapping, or None when the folder has none."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    meta = read_yaml(path, error_type)
    if not isinstance(meta, dict):
        raise error_type(
            f"'{path}' must be a YAML mapping with a 'type' key, got {type(meta).__name__}. Fix or regenerate the file."
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
    """`root/relative` when `relative` stays lexically inside `root`, else None.

    Rejects absolute paths, drive letters, URLs and `..` components. Symlinks are checked
    later, when the file is opened (see `data.open_image`), to keep indexing cheap.
    """
    if not relative or "://" in relative or "\\" in relative or "\x00" in relative:
        return None
    if relative.startswith("/") or (len(relative) > 1 and relative[1] == ":"):
        return None
    parts = relative.split("/")
    if any(part == ".." for part in parts):
        return None
    return Path(root, *[p for p in parts if p not in ("", ".")])


def resolves_inside(root: Path, path: Path) -> bool:
    """True when `path` (after following symlinks) is inside `root`."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)
